//! Global ordered reads and subscriptions, for projections.
//!
//! Events are read in `(txid, position)` order, and only from transactions older than
//! `pg_snapshot_xmin(pg_current_snapshot())`: every transaction below that horizon has ended, and
//! any transaction that commits later has a txid at or above it, so it sorts after everything
//! already handed out. A reader that resumes from its last checkpoint therefore never skips an
//! event that committed late and never sees one twice, and writers never wait for each other.
//! The price: a transaction left open (anywhere in the cluster) holds the horizon back, and new
//! events wait behind it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::db::repository::{in_session, record_from_row, EventRepository, Session, EVENT_COLUMNS, SET_USER_SQL};
use crate::error::{Error, Result};
use crate::model::EventRecord;
use crate::validate::{self, IssueCode};

/// A place in the global order: the position after the last event read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord)]
pub struct Checkpoint {
    /// The writing transaction of the last event read (PostgreSQL `xid8`).
    pub txid: u64,
    /// The position of the last event read.
    pub position: i64,
}

impl Checkpoint {
    /// Before the first event.
    pub const START: Checkpoint = Checkpoint { txid: 0, position: 0 };

    /// A checkpoint from its parts as text carries them (`txid` is a 64-bit number, as a
    /// string in JavaScript).
    ///
    /// Fails with [`Error::Validation`] (field `after.txid`) when `txid` is not a number.
    pub fn parse(txid: &str, position: i64) -> Result<Checkpoint> {
        let txid = txid.parse().map_err(|_| {
            Error::invalid(
                "after.txid",
                IssueCode::InvalidType,
                format!("\"{txid}\" is not a transaction id"),
            )
        })?;
        Ok(Checkpoint { txid, position })
    }
}

/// One page of [`EventRepository::read_all`].
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// Events in global order.
    pub events: Vec<EventRecord>,
    /// Where the next read starts: after the last event of this page (or where this read
    /// started, when the page is empty).
    pub checkpoint: Checkpoint,
}

/// Options of [`EventRepository::subscribe`].
#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    /// A named consumer resumes from its stored checkpoint and stores a new one as it goes.
    pub consumer: Option<String>,
    /// Where to start when the consumer has no stored checkpoint (default: the beginning).
    pub from: Option<Checkpoint>,
    /// Most events per batch. Default 100.
    pub batch_size: i64,
    /// How often to look for new events when no notification arrives. Default 1 s.
    pub poll_interval: Duration,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions {
            consumer: None,
            from: None,
            batch_size: 100,
            poll_interval: Duration::from_secs(1),
        }
    }
}

const READ_ALL_SQL: &str = "WHERE (txid, position) > ($1::text::xid8, $2) \
     AND txid < pg_snapshot_xmin(pg_current_snapshot()) \
     ORDER BY txid, position LIMIT $3";

impl EventRepository {
    /// Up to `limit` events after `after` (from the start when `None`), in global order. Never
    /// skips an event whose transaction commits late; see the module documentation.
    ///
    /// Fails with [`Error::Validation`] for a limit outside 1..=10,000.
    pub async fn read_all(&self, after: Option<&Checkpoint>, limit: i64) -> Result<Page> {
        let limit = validate::check_limit("limit", limit, &self.config().limits)?;
        let after = after.copied().unwrap_or(Checkpoint::START);
        in_session!(self, |client| {
            let sql = format!("SELECT {EVENT_COLUMNS}, txid::text FROM events_v2 {READ_ALL_SQL}");
            let stmt = client.prepare_cached(&sql).await?;
            let rows = client
                .query(&stmt, &[&after.txid.to_string(), &after.position, &limit])
                .await?;
            let mut checkpoint = after;
            let mut events = Vec::with_capacity(rows.len());
            for row in &rows {
                checkpoint = parse_checkpoint(row.get(13), row.get(12))?;
                events.push(record_from_row(row)?);
            }
            Ok(Page { events, checkpoint })
        })
    }

    /// The stored checkpoint of a named consumer, if it has one.
    pub async fn consumer_checkpoint(&self, consumer: &str) -> Result<Option<Checkpoint>> {
        check_consumer(consumer)?;
        self.refuse_scoped_consumer()?;
        in_session!(self, |client| {
            let row = client
                .query_opt(
                    "SELECT txid::text, position FROM event_consumers WHERE name = $1",
                    &[&consumer],
                )
                .await?;
            row.map(|r| parse_checkpoint(r.get(0), r.get(1))).transpose()
        })
    }

    /// Stores a named consumer's checkpoint.
    pub async fn save_consumer_checkpoint(&self, consumer: &str, checkpoint: &Checkpoint) -> Result<()> {
        check_consumer(consumer)?;
        self.refuse_scoped_consumer()?;
        in_session!(self, |client| {
            client
                .query(
                    "INSERT INTO event_consumers (name, txid, position) VALUES ($1, $2::text::xid8, $3) \
                     ON CONFLICT (name) DO UPDATE SET txid = EXCLUDED.txid, position = EXCLUDED.position, \
                     updated_at = now()",
                    &[&consumer, &checkpoint.txid.to_string(), &checkpoint.position],
                )
                .await?;
            Ok(())
        })
    }

    /// Follows the global order: catches up from the consumer's checkpoint (or `from`), then
    /// waits for new events, woken by LISTEN/NOTIFY and polling every `poll_interval` in case a
    /// notification is missed.
    ///
    /// Delivery is at-least-once: a named consumer's checkpoint advances past a batch when the
    /// next batch is asked for (or on [`Subscription::commit`]), so a consumer that stops
    /// mid-batch gets that batch again. Fails like [`EventRepository::read_all`]; a failed LISTEN
    /// connection only means polling.
    pub async fn subscribe(&self, options: SubscribeOptions) -> Result<Subscription> {
        validate::check_limit("batchSize", options.batch_size, &self.config().limits)?;
        if options.poll_interval.is_zero() {
            return Err(Error::invalid(
                "pollInterval",
                IssueCode::OutOfRange,
                "pollInterval must be positive",
            ));
        }
        let stored = match &options.consumer {
            Some(name) => self.consumer_checkpoint(name).await?,
            None => None,
        };
        let start = stored.or(options.from).unwrap_or(Checkpoint::START);
        let notify = Arc::new(Notify::new());
        let listener = self.listen(notify.clone()).await.ok();
        Ok(Subscription {
            repo: self.clone(),
            consumer: options.consumer,
            delivered: start,
            committed: start,
            batch_size: options.batch_size,
            poll_interval: options.poll_interval,
            notify,
            _listener: listener,
        })
    }

    /// A connection outside the pool that LISTENs on `synap_events` and wakes `notify`.
    async fn listen(&self, notify: Arc<Notify>) -> Result<tokio_postgres::Client> {
        let (client, mut connection) = self.pg_config.connect(NoTls).await?;
        tokio::spawn(async move {
            while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                match message {
                    Ok(AsyncMessage::Notification(_)) => notify.notify_one(),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            // The connection is gone: wake the subscriber, whose polling carries on.
            notify.notify_one();
        });
        client.batch_execute("LISTEN synap_events").await?;
        Ok(client)
    }
}

impl EventRepository {
    fn refuse_scoped_consumer(&self) -> Result<()> {
        match self.scoped_user() {
            Some(_) => Err(Error::invalid(
                "consumer",
                IssueCode::OutOfRange,
                "named consumers belong to unscoped handles: a user-scoped one sees only that user's events",
            )),
            None => Ok(()),
        }
    }
}

/// A running subscription; see [`EventRepository::subscribe`].
pub struct Subscription {
    repo: EventRepository,
    consumer: Option<String>,
    delivered: Checkpoint,
    committed: Checkpoint,
    batch_size: i64,
    poll_interval: Duration,
    notify: Arc<Notify>,
    /// Dropping it closes the LISTEN connection, which ends its task.
    _listener: Option<tokio_postgres::Client>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("consumer", &self.consumer)
            .field("delivered", &self.delivered)
            .field("committed", &self.committed)
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// The next batch of events in global order, waiting until there is one. Commits the
    /// previous batch first for a named consumer.
    pub async fn next_batch(&mut self) -> Result<Vec<EventRecord>> {
        loop {
            self.commit().await?;
            let page = self.repo.read_all(Some(&self.delivered), self.batch_size).await?;
            if !page.events.is_empty() {
                self.delivered = page.checkpoint;
                return Ok(page.events);
            }
            // Either wakes us; a timeout is the polling fallback.
            let _ = tokio::time::timeout(self.poll_interval, self.notify.notified()).await;
        }
    }

    /// Stores the checkpoint after the last delivered batch (named consumers only).
    pub async fn commit(&mut self) -> Result<()> {
        if let Some(name) = &self.consumer {
            if self.committed != self.delivered {
                self.repo.save_consumer_checkpoint(name, &self.delivered).await?;
                self.committed = self.delivered;
            }
        }
        Ok(())
    }

    /// The checkpoint after the last delivered batch.
    pub fn checkpoint(&self) -> Checkpoint {
        self.delivered
    }
}

fn parse_checkpoint(txid: String, position: i64) -> Result<Checkpoint> {
    // The database wrote it: a bad value is a bug, not bad input.
    Checkpoint::parse(&txid, position).map_err(|_| Error::Internal {
        message: format!("txid {txid} is not a number"),
    })
}

fn check_consumer(name: &str) -> Result<()> {
    // Named consumers are projections over the whole store; a user-scoped handle sees only part
    // of it and would move a shared checkpoint past events it cannot see.
    if name.trim().is_empty() || name.len() > 200 || name.contains('\0') {
        return Err(Error::invalid(
            "consumer",
            IssueCode::OutOfRange,
            "a consumer name is 1 to 200 bytes, not blank",
        ));
    }
    Ok(())
}
