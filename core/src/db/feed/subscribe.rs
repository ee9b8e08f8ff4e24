//! Subscriptions: catching up through the feed, then following it, woken by LISTEN/NOTIFY (on
//! `listenUrl` through a pooler) or by polling, with a named consumer's checkpoint stored as it
//! goes.
//!
//! Owns [`SubscribeOptions`] and [`Subscription`]. Calls [`EventRepository::read_all`] and the
//! consumers' checkpoints.

use super::*;

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
    /// Only the events this passes (every event when empty); see [`FeedFilter`].
    pub filter: FeedFilter,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions {
            consumer: None,
            from: None,
            batch_size: 100,
            poll_interval: Duration::from_secs(1),
            filter: FeedFilter::default(),
        }
    }
}

impl SubscribeOptions {
    /// The options as JavaScript passes them: `{ consumer, from, batchSize, pollIntervalMs,
    /// eventTypes, eventTypePrefixes, aggregateTypes }`.
    ///
    /// Fails with [`Error::Validation`] for a value of the wrong type or a key that is not an
    /// option.
    pub fn from_json(value: &serde_json::Value) -> Result<SubscribeOptions> {
        let mut known = vec!["consumer", "from", "batchSize", "pollIntervalMs"];
        known.extend(FILTER_OPTIONS);
        let o = crate::query::Options::of(value, &known)?;
        let mut options = SubscribeOptions {
            consumer: o.string("consumer")?,
            from: Checkpoint::from_json("from", o.get("from").unwrap_or(&serde_json::Value::Null))?,
            filter: FeedFilter::from_options(&o)?,
            ..Default::default()
        };
        if let Some(n) = o.whole("batchSize")? {
            options.batch_size = n;
        }
        if let Some(ms) = o.whole("pollIntervalMs")? {
            options.poll_interval = Duration::from_millis(ms.max(0) as u64);
        }
        Ok(options)
    }
}

impl EventRepository {
    /// Follows the global order: catches up from the consumer's checkpoint (or `from`), then
    /// waits for new events, woken by LISTEN/NOTIFY and polling every `poll_interval` in case a
    /// notification is missed.
    ///
    /// Delivery is at-least-once: a named consumer's checkpoint advances past a batch when the
    /// next batch is asked for (or on [`Subscription::commit`]), so a consumer that stops
    /// mid-batch gets that batch again. With a filter, the server skips what it does not pass,
    /// and the checkpoint of a named consumer also moves past scanned rows that matched nothing
    /// (stored at most once a second while nothing is delivered). Fails like
    /// [`EventRepository::read_all_filtered`]; a failed LISTEN connection only means polling.
    pub async fn subscribe(&self, options: SubscribeOptions) -> Result<Subscription> {
        validate::check_limit("batchSize", options.batch_size, &self.config().limits)?;
        options.filter.check(&self.config().limits)?;
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
            read_from: start,
            delivered: start,
            committed: start,
            batch_size: options.batch_size,
            poll_interval: options.poll_interval,
            filter: options.filter,
            last_commit: std::time::Instant::now(),
            notify,
            _listener: listener,
        })
    }

    /// A connection outside the pool that LISTENs on `synap_events` and wakes `notify`. Through a
    /// transaction-mode pooler, which cannot hold a LISTEN, it connects to the direct URL given
    /// for it ([`crate::RepositoryConfig::listen_url`]); without one it fails, and subscribers poll.
    pub(crate) async fn listen(&self, notify: Arc<Notify>) -> Result<tokio_postgres::Client> {
        let Some(config) = &self.pg_config else {
            return Err(Error::InvalidConfig {
                message: "no direct URL to LISTEN on through a transaction-mode pooler: subscribers poll".into(),
            });
        };
        let (client, mut connection) = config.connect(NoTls).await?;
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

/// A running subscription; see [`EventRepository::subscribe`].
pub struct Subscription {
    repo: EventRepository,
    consumer: Option<String>,
    /// Where the next read starts.
    read_from: Checkpoint,
    /// After the last delivered batch.
    delivered: Checkpoint,
    committed: Checkpoint,
    batch_size: i64,
    poll_interval: Duration,
    filter: FeedFilter,
    /// When the checkpoint was last stored.
    last_commit: std::time::Instant,
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
            let page = self
                .repo
                .read_all_filtered(Some(&self.read_from), self.batch_size, &self.filter)
                .await?;
            // An empty page still moves the reading position up to the horizon, so that polling
            // does not scan the same stretch again; it is stored with the next batch.
            self.read_from = page.checkpoint;
            if !page.events.is_empty() {
                self.delivered = page.checkpoint;
                return Ok(page.events);
            }
            if !self.filter.is_empty() {
                // A filtered read passes over rows it does not deliver: a named consumer stores
                // that progress too (at most once a second), so that after a restart it does not
                // scan them again.
                self.delivered = page.checkpoint;
                if self.last_commit.elapsed() >= Duration::from_secs(1) {
                    self.commit().await?;
                }
            }
            if !page.caught_up {
                continue;
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
                self.last_commit = std::time::Instant::now();
            }
        }
        Ok(())
    }

    /// The checkpoint after the last delivered batch.
    pub fn checkpoint(&self) -> Checkpoint {
        self.delivered
    }
}
