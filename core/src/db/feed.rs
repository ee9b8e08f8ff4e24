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

use chrono::{DateTime, Days, NaiveDate, NaiveTime, Utc};
use serde::Serialize;
use tokio::sync::Notify;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::db::feed_plan::{plan_windows, IndexRow, Window};
use crate::db::repository::{in_session, record_from_row, EventRepository, Session};
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
    /// The store and cluster it was read from (`synap_feed_identity()`), so that a checkpoint
    /// from another store, or from before a restore, is refused; 0 when unknown (not checked).
    pub store: i64,
}

impl Checkpoint {
    /// Before the first event.
    pub const START: Checkpoint = Checkpoint::at(0, 0);

    /// Where it is in the global order, whatever store it names: `(txid, position)`.
    pub fn place(&self) -> (u64, i64) {
        (self.txid, self.position)
    }

    /// The place `(txid, position)`, of no particular store.
    pub const fn at(txid: u64, position: i64) -> Checkpoint {
        Checkpoint {
            txid,
            position,
            store: 0,
        }
    }

    /// A checkpoint from its parts as text carries them (`txid` is a 64-bit number, as a
    /// string in JavaScript).
    ///
    /// Fails with [`Error::Validation`] (field `after.txid` or `after.position`) when `txid` is
    /// not a number or `position` is negative.
    pub fn parse(txid: &str, position: i64) -> Result<Checkpoint> {
        let txid = txid.parse().map_err(|_| {
            Error::invalid(
                "after.txid",
                IssueCode::InvalidType,
                format!("\"{txid}\" is not a transaction id"),
            )
        })?;
        if position < 0 {
            return Err(Error::invalid(
                "after.position",
                IssueCode::OutOfRange,
                format!("a checkpoint's position is 0 or more, not {position}"),
            ));
        }
        Ok(Checkpoint::at(txid, position))
    }
}

impl Checkpoint {
    /// A checkpoint as JavaScript holds it (`{ txid, position, store }`, the 64-bit numbers as
    /// strings), the option `field` of a call; `None` for null.
    ///
    /// Fails with [`Error::Validation`] naming `field.key` for a part of the wrong type or a key
    /// that is not a part of a checkpoint.
    pub fn from_json(field: &str, value: &serde_json::Value) -> Result<Option<Checkpoint>> {
        if value.is_null() {
            return Ok(None);
        }
        let o = crate::query::Options::of(value, &["txid", "position", "store"]).map_err(|e| match e {
            Error::Validation {
                field: key,
                reason,
                message,
            } => Error::Validation {
                field: format!("{field}.{key}"),
                reason,
                message,
            },
            other => other,
        })?;
        let prefixed = |e: Error| match e {
            Error::Validation {
                field: key,
                reason,
                message,
            } => Error::Validation {
                field: format!("{field}.{key}"),
                reason,
                message,
            },
            other => other,
        };
        let txid = o.string("txid").map_err(prefixed)?.unwrap_or_default();
        let position = o.whole("position").map_err(prefixed)?.unwrap_or(-1);
        let store = match o.string("store").map_err(prefixed)? {
            None => 0,
            Some(s) => s.parse::<i64>().map_err(|_| {
                Error::invalid(
                    format!("{field}.store"),
                    IssueCode::InvalidType,
                    format!("{field}.store must be the store string of a checkpoint"),
                )
            })?,
        };
        let place = Checkpoint::parse(&txid, position).map_err(|e| match e {
            Error::Validation {
                field: key,
                reason,
                message,
            } => Error::Validation {
                field: key.replacen("after", field, 1),
                reason,
                message,
            },
            other => other,
        })?;
        Ok(Some(Checkpoint { store, ..place }))
    }
}

/// The options of `readAll` as JavaScript passes them: `{ after, limit }` (limit 1000 when
/// absent).
///
/// Fails with [`Error::Validation`] for a value of the wrong type or a key that is not an option.
pub fn read_all_options(value: &serde_json::Value) -> Result<(Option<Checkpoint>, i64)> {
    let o = crate::query::Options::of(value, &["after", "limit"])?;
    let after = Checkpoint::from_json("after", o.get("after").unwrap_or(&serde_json::Value::Null))?;
    Ok((after, o.whole("limit")?.unwrap_or(1000)))
}

impl SubscribeOptions {
    /// The options as JavaScript passes them: `{ consumer, from, batchSize, pollIntervalMs }`.
    ///
    /// Fails with [`Error::Validation`] for a value of the wrong type or a key that is not an
    /// option.
    pub fn from_json(value: &serde_json::Value) -> Result<SubscribeOptions> {
        let o = crate::query::Options::of(value, &["consumer", "from", "batchSize", "pollIntervalMs"])?;
        let mut options = SubscribeOptions {
            consumer: o.string("consumer")?,
            from: Checkpoint::from_json("from", o.get("from").unwrap_or(&serde_json::Value::Null))?,
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

/// One page of [`EventRepository::read_all`].
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// Events in global order.
    pub events: Vec<EventRecord>,
    /// Where the next read starts. After a full page: its last event. After a shorter page
    /// (every event below the horizon was read): the horizon itself, `(horizon, 0)`, so that the
    /// next read starts where new events can appear. Never before the last event of the page.
    pub checkpoint: Checkpoint,
}

/// A named consumer, as [`EventRepository::consumers`] lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerStatus {
    /// Its name.
    pub name: String,
    /// Its stored checkpoint.
    #[serde(serialize_with = "checkpoint_json")]
    pub checkpoint: Checkpoint,
    /// When it was stored.
    pub updated_at: DateTime<Utc>,
    /// Stored by the old feed ordering, not yet repaired or accepted.
    pub needs_repair: bool,
}

/// What [`EventRepository::repair_consumer`] did, or would do in a dry run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerRepair {
    /// The consumer.
    pub consumer: String,
    /// Whether its checkpoint was stored by the old ordering.
    pub needed_repair: bool,
    /// Its checkpoint before.
    #[serde(serialize_with = "checkpoint_json")]
    pub before: Checkpoint,
    /// Its checkpoint after (the start, when its events are delivered again).
    #[serde(serialize_with = "checkpoint_json")]
    pub after: Checkpoint,
    /// Events at or before the old checkpoint that it will be given again.
    pub events_delivered_again: i64,
    /// Whether nothing was changed.
    pub dry_run: bool,
}

/// What [`EventRepository::rebase_feed`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FeedRebase {
    /// Whether the stored ids were another cluster's.
    pub needed: bool,
    /// Events whose `txid` was renumbered.
    pub events_renumbered: i64,
    /// Transaction ids consumed first, so that the renumbered ones lie in this cluster's past.
    pub transaction_ids_consumed: u64,
}

/// A checkpoint as JSON: `{ "txid": "<64-bit number>", "position": n, "store": "<64-bit number>" }`
/// (the 64-bit numbers as text: JavaScript numbers cannot hold them).
fn checkpoint_json<S: serde::Serializer>(c: &Checkpoint, s: S) -> std::result::Result<S::Ok, S::Error> {
    use serde::ser::SerializeStruct;
    let mut st = s.serialize_struct("Checkpoint", 3)?;
    st.serialize_field("txid", &c.txid.to_string())?;
    st.serialize_field("position", &c.position)?;
    st.serialize_field("store", &c.store.to_string())?;
    st.end()
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

/// Day-index rows read per plan; a reader far behind plans again when it has read them.
const PLAN_ROWS: i64 = 2000;

/// The horizon and the day index from the reader's position on, in one snapshot: every
/// transaction below the horizon has ended, so the days it recorded are visible here. Bucket rows
/// (txid NULL) come before a bucket's transaction rows. `h` is materialized: inlined, its
/// functions ran once per index row returned (20 ms for 759 rows). On Citus its fence waits until
/// the transactions below the horizon are visible on every worker, and says that the store is
/// distributed (migration 0013).
const FEED_PLAN_SQL: &str = "WITH h AS MATERIALIZED (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS horizon, \
                       pg_snapshot_xmax(pg_current_snapshot()) AS next, \
                       synap_feed_identity() AS store, synap_feed_is_current() AS current, \
                       synap_feed_fence() AS distributed) \
     SELECT h.horizon::text, f.bucket, f.txid::text, f.day, h.store, h.current, h.distributed, h.next::text \
       FROM h LEFT JOIN LATERAL ( \
            SELECT DISTINCT bucket, txid, day FROM events_v2_feed_days \
             WHERE bucket >= synap_feed_bucket($1::text::xid8) AND bucket <= synap_feed_bucket(h.horizon) \
               AND (txid IS NULL OR (txid >= $1::text::xid8 AND txid < h.horizon)) \
             ORDER BY bucket, txid NULLS FIRST, day LIMIT $2) f ON true";

/// One window of the global order: events after the checkpoint and below a transaction id, on
/// the window's runs of days. The order is the `xid8` column itself; the transaction id goes out
/// as text (JavaScript cannot hold 64 bits) under another name, because an output column named
/// `txid` would win over the table's column in `ORDER BY` and sort by text ('1000' before '999'),
/// which skipped events whenever ids crossed a power of ten. Each run of days is a branch whose
/// bounds the planner sees (the statement is planned for its values every time), so it reads only
/// that run's partitions or chunks; in each, an index scan of `events_v2_global_order_idx`
/// (txid, position) starts at the checkpoint, and the scans are merged in order, with no sort.
/// Parameters: $1 the checkpoint's txid (text), $2 its position, $3 the window's end (text), then
/// each run's first and next-after-last midnight, then the limit.
fn read_window_sql(runs: usize, filter: bool) -> String {
    let limit = 4 + 2 * runs;
    let (part, only) = partition_sql(limit, filter);
    let branches: Vec<String> = (0..runs)
        .map(|i| {
            format!(
                "(SELECT id, \"timestamp\", aggregate_id, aggregate_type, event_type, user_id, data, metadata, \
                         version, causation_id, correlation_id, source, position, txid, txid::text AS txid_text{part} \
                    FROM events_v2 e \
                   WHERE (e.txid, e.position) > ($1::text::xid8, $2) AND e.txid < $3::text::xid8 \
                     AND e.\"timestamp\" >= ${} AND e.\"timestamp\" < ${}{only} \
                   ORDER BY e.txid, e.position LIMIT ${limit})",
                4 + 2 * i,
                5 + 2 * i
            )
        })
        .collect();
    let outer_part = if filter { ", part" } else { "" };
    format!(
        "SELECT id, \"timestamp\", aggregate_id, aggregate_type, event_type, user_id, data, metadata, version, \
                causation_id, correlation_id, source, position, txid_text{outer_part} \
           FROM ({}) w ORDER BY w.txid, w.position LIMIT ${limit}",
        branches.join(" UNION ALL ")
    )
}

/// For a read of some partitions of a consumer group (parameters `$limit + 1`, the group's
/// partition count, and `$limit + 2`, the partitions read): the selected partition column and
/// the condition. Empty for a read of everything.
fn partition_sql(limit: usize, filter: bool) -> (String, String) {
    if !filter {
        return (String::new(), String::new());
    }
    let (count, owned) = (limit + 1, limit + 2);
    (
        format!(", synap_group_partition(e.aggregate_id, ${count}::integer) AS part"),
        format!(" AND synap_group_partition(e.aggregate_id, ${count}::integer) = ANY (${owned}::integer[])"),
    )
}

/// [`read_window_sql`] for a window whose days are unknown: every partition or chunk.
fn read_window_any_day_sql(filter: bool) -> String {
    let (part, only) = partition_sql(4, filter);
    format!(
        "SELECT id, \"timestamp\", aggregate_id, aggregate_type, event_type, user_id, \
                data, metadata, version, causation_id, correlation_id, source, position, txid::text AS txid_text{part} \
           FROM events_v2 e \
          WHERE (e.txid, e.position) > ($1::text::xid8, $2) \
            AND e.txid < $3::text::xid8{only} \
          ORDER BY e.txid, e.position \
          LIMIT $4"
    )
}

/// Some partitions of a consumer group: `owned` of `partitions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PartitionFilter {
    pub partitions: i32,
    pub owned: Vec<i32>,
}

fn midnight(day: NaiveDate) -> DateTime<Utc> {
    day.and_time(NaiveTime::MIN).and_utc()
}

impl EventRepository {
    /// Up to `limit` events after `after` (from the start when `None`), in global order. Never
    /// skips an event whose transaction commits late; see the module documentation.
    ///
    /// Fails with [`Error::Validation`] for a limit outside 1..=10,000.
    pub async fn read_all(&self, after: Option<&Checkpoint>, limit: i64) -> Result<Page> {
        let limit = validate::check_limit("limit", limit, &self.config().limits)?;
        Ok(self.read_feed(after, limit, None).await?.0)
    }

    /// [`EventRepository::read_all`], of only some partitions of a consumer group when `filter`
    /// is given; with each event's partition and place in the order then (empty otherwise).
    pub(crate) async fn read_feed(
        &self,
        after: Option<&Checkpoint>,
        limit: i64,
        filter: Option<&PartitionFilter>,
    ) -> Result<(Page, Vec<(i32, Checkpoint)>)> {
        let after = after.copied().unwrap_or(Checkpoint::START);
        in_session!(self, |client| {
            let mut parts = Vec::new();
            let mut checkpoint = after;
            let mut events = Vec::new();
            // Where the next window's query starts: the checkpoint, or the end of a window read
            // to its end (positions start at 1, so position 0 is before every event of a
            // transaction).
            let mut scan_from = after;
            loop {
                let FeedPlan {
                    horizon,
                    windows,
                    truncated,
                    store: identity,
                } = plan(&client, scan_from.txid, &after).await?;
                let store = identity;
                checkpoint.store = store;
                for window in &windows {
                    if window.end <= scan_from.txid {
                        continue;
                    }
                    if !window.days.is_empty() {
                        let want = limit - events.len() as i64;
                        let rows = read_window(&client, &scan_from, window, want, filter, false).await?;
                        let got = rows.len() as i64;
                        for row in &rows {
                            checkpoint = parse_checkpoint(row.get(13), row.get(12), store)?;
                            events.push(record_from_row(row)?);
                            if filter.is_some() {
                                parts.push((row.get(14), checkpoint));
                            }
                        }
                        if got == want {
                            return Ok((Page { events, checkpoint }, parts));
                        }
                    }
                    scan_from = scan_from.max(Checkpoint::at(window.end, 0));
                }
                match windows.last() {
                    Some(last) if truncated && last.end < horizon => {}
                    // Every event below the horizon has been read, and every transaction that
                    // commits later has an id at or above it.
                    _ => {
                        let horizon = Checkpoint {
                            store,
                            ..Checkpoint::at(horizon, 0)
                        };
                        return Ok((
                            Page {
                                events,
                                checkpoint: checkpoint.max(horizon),
                            },
                            parts,
                        ));
                    }
                }
            }
        })
    }

    /// The query plan of the first query of a [`EventRepository::read_all`] page, as
    /// PostgreSQL's text EXPLAIN (ANALYZE), to check that a page reads few partitions or chunks
    /// and reads them in index order rather than sorting.
    pub async fn explain_read_all(&self, after: Option<&Checkpoint>, limit: i64) -> Result<String> {
        let after = after.copied().unwrap_or(Checkpoint::START);
        in_session!(self, |session| {
            let FeedPlan { windows, .. } = plan(&session, after.txid, &after).await?;
            let Some(window) = windows.iter().find(|w| w.end > after.txid && !w.days.is_empty()) else {
                return Ok(String::new());
            };
            let rows = read_window(&session, &after, window, limit, None, true).await?;
            Ok(rows
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
                .join("\n"))
        })
    }

    /// The stored checkpoint of a named consumer, if it has one.
    ///
    /// Fails with [`Error::ConsumerNeedsRepair`] when the checkpoint was stored by the old feed
    /// ordering and the consumer was neither repaired nor accepted since
    /// ([`EventRepository::repair_consumer`]).
    pub async fn consumer_checkpoint(&self, consumer: &str) -> Result<Option<Checkpoint>> {
        self.refuse_scoped("consumer_checkpoint")?;
        check_consumer(consumer)?;
        in_session!(self, |client| {
            let row = client
                .query_opt(
                    "SELECT txid::text, position, needs_repair, synap_feed_identity() FROM event_consumers WHERE name = $1",
                    &[&consumer],
                )
                .await?;
            match row {
                Some(r) if r.get::<_, bool>(2) => Err(Error::ConsumerNeedsRepair {
                    consumer: consumer.to_owned(),
                }),
                Some(r) => Ok(Some(parse_checkpoint(r.get(0), r.get(1), r.get(3))?)),
                None => Ok(None),
            }
        })
    }

    /// Stores a named consumer's checkpoint. A checkpoint only moves forward.
    ///
    /// Fails with [`Error::CheckpointConflict`] when the stored checkpoint is already past this
    /// one (another instance of the consumer has read further); nothing is stored then.
    pub async fn save_consumer_checkpoint(&self, consumer: &str, checkpoint: &Checkpoint) -> Result<()> {
        self.refuse_scoped("save_consumer_checkpoint")?;
        check_consumer(consumer)?;
        in_session!(self, |client| {
            let saved = client
                .query_opt(
                    "INSERT INTO event_consumers (name, txid, position) \
                     SELECT $1, $2::text::xid8, $3 WHERE $4 IN (0, synap_feed_identity()) \
                     ON CONFLICT (name) DO UPDATE SET txid = EXCLUDED.txid, position = EXCLUDED.position, \
                            updated_at = now() \
                      WHERE (event_consumers.txid, event_consumers.position) <= (EXCLUDED.txid, EXCLUDED.position) \
                        AND NOT event_consumers.needs_repair \
                     RETURNING true",
                    &[
                        &consumer,
                        &checkpoint.txid.to_string(),
                        &checkpoint.position,
                        &checkpoint.store,
                    ],
                )
                .await?;
            if saved.is_some() {
                return Ok(());
            }
            let identity: i64 = client.query_one("SELECT synap_feed_identity()", &[]).await?.get(0);
            if checkpoint.store != 0 && checkpoint.store != identity {
                return Err(Error::CheckpointFromAnotherStore);
            }
            let stored = client
                .query_one(
                    "SELECT txid::text, position, needs_repair FROM event_consumers WHERE name = $1",
                    &[&consumer],
                )
                .await?;
            if stored.get::<_, bool>(2) {
                return Err(Error::ConsumerNeedsRepair {
                    consumer: consumer.to_owned(),
                });
            }
            Err(Error::CheckpointConflict {
                consumer: consumer.to_owned(),
                stored: format!("{}:{}", stored.get::<_, String>(0), stored.get::<_, i64>(1)),
                given: format!("{}:{}", checkpoint.txid, checkpoint.position),
            })
        })
    }

    /// Renumbers the stored transaction ids of the global feed after this store was restored
    /// from a dump (or copied by logical replication) into another cluster, whose transaction
    /// ids are unrelated: the stored ids become this cluster's past, in the same order, and named
    /// consumers' checkpoints move with them. Checkpoints taken before are refused afterwards
    /// ([`Error::CheckpointFromAnotherStore`]). A no-op (`needed: false`) when the store is on
    /// the cluster it records. Rewrites `txid` in every row of `events_v2`, holding back writes
    /// while it runs.
    pub async fn rebase_feed(&self) -> Result<FeedRebase> {
        self.refuse_scoped("rebase_feed")?;
        let mut client = self.client().await?;
        let row = client
            .query_one(
                "SELECT synap_feed_is_current(), (SELECT count(DISTINCT txid) FROM events_v2),
                        pg_current_xact_id()::text::bigint",
                &[],
            )
            .await?;
        if row.get::<_, bool>(0) {
            return Ok(FeedRebase {
                needed: false,
                events_renumbered: 0,
                transaction_ids_consumed: 0,
            });
        }
        let (distinct, next): (i64, i64) = (row.get(1), row.get(2));
        // The renumbered ids (1..=distinct) must lie below every id this cluster hands out from
        // now on: consume ids (one per written subtransaction) until they do.
        let consume = (distinct + 100 - next).max(0);
        if consume > 0 {
            client
                .batch_execute(&format!(
                    "CREATE TEMP TABLE IF NOT EXISTS synap_consumed_ids (x int) ON COMMIT DROP;
                     DO $$ BEGIN FOR i IN 1..{consume} LOOP
                         BEGIN INSERT INTO synap_consumed_ids VALUES (1); RAISE EXCEPTION 'consumed';
                         EXCEPTION WHEN OTHERS THEN NULL; END;
                     END LOOP; END $$;"
                ))
                .await?;
        }
        let mut client = client;
        let tx = client.transaction().await?;
        tx.batch_execute("SET LOCAL statement_timeout = 0").await?;
        let renumbered: i64 = tx.query_one("SELECT synap_rebase_feed()", &[]).await?.get(0);
        tx.commit().await?;
        Ok(FeedRebase {
            needed: true,
            events_renumbered: renumbered,
            transaction_ids_consumed: consume as u64,
        })
    }

    /// Every named consumer with its checkpoint, by name.
    pub async fn consumers(&self) -> Result<Vec<ConsumerStatus>> {
        self.refuse_scoped("consumers")?;
        let mut client = self.client().await?;
        let rows = client
            .query(
                "SELECT name, txid::text, position, updated_at, needs_repair, synap_feed_identity() \
                   FROM event_consumers ORDER BY name",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(ConsumerStatus {
                    name: r.get(0),
                    checkpoint: parse_checkpoint(r.get(1), r.get(2), r.get(5))?,
                    updated_at: r.get(3),
                    needs_repair: r.get(4),
                })
            })
            .collect()
    }

    /// Repairs a named consumer whose checkpoint was stored by the old feed ordering, which
    /// sorted pages by the text of the transaction id and so passed over events whenever ids
    /// crossed a power of ten. Every event such a reader could have passed over has a
    /// transaction id with fewer digits than the stored checkpoint's; when any such event exists
    /// the checkpoint goes back to the start, so the consumer gets every event again (delivery
    /// is at-least-once: a projection skips the ones it has by event id). `accept` keeps the
    /// checkpoint instead, for a consumer known to be whole. Either way the consumer may read on.
    /// A consumer that does not need repair is left alone.
    ///
    /// Fails with [`Error::Validation`] for a bad name, and with [`Error::PermissionDenied`] on a
    /// user-scoped handle.
    pub async fn repair_consumer(&self, consumer: &str, accept: bool, dry_run: bool) -> Result<ConsumerRepair> {
        self.refuse_scoped("repair_consumer")?;
        check_consumer(consumer)?;
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let Some(row) = tx
            .query_opt(
                "SELECT txid::text, position, needs_repair, synap_feed_identity() FROM event_consumers \
                  WHERE name = $1 FOR UPDATE",
                &[&consumer],
            )
            .await?
        else {
            return Err(Error::invalid(
                "consumer",
                IssueCode::OutOfRange,
                format!("no consumer named \"{consumer}\""),
            ));
        };
        let before = parse_checkpoint(row.get(0), row.get(1), row.get(3))?;
        let needed: bool = row.get(2);
        let mut report = ConsumerRepair {
            consumer: consumer.to_owned(),
            needed_repair: needed,
            before,
            after: before,
            events_delivered_again: 0,
            dry_run,
        };
        if needed && !accept {
            // A skipped event's id has fewer digits than the checkpoint that passed it.
            let digits = before.txid.to_string().len() as u32;
            let below = 10u64.pow(digits - 1).to_string();
            let suspects: i64 = tx
                .query_one("SELECT count(*) FROM events_v2 WHERE txid < $1::text::xid8", &[&below])
                .await?
                .get(0);
            if suspects > 0 {
                report.after = Checkpoint::START;
                report.events_delivered_again = tx
                    .query_one(
                        "SELECT count(*) FROM events_v2 WHERE (txid, position) <= ($1::text::xid8, $2)",
                        &[&before.txid.to_string(), &before.position],
                    )
                    .await?
                    .get(0);
            }
        }
        if dry_run {
            tx.rollback().await?;
            return Ok(report);
        }
        tx.execute(
            "UPDATE event_consumers SET txid = $2::text::xid8, position = $3, needs_repair = false, updated_at = now() \
              WHERE name = $1",
            &[&consumer, &report.after.txid.to_string(), &report.after.position],
        )
        .await?;
        tx.commit().await?;
        Ok(report)
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
            read_from: start,
            delivered: start,
            committed: start,
            batch_size: options.batch_size,
            poll_interval: options.poll_interval,
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
            let page = self.repo.read_all(Some(&self.read_from), self.batch_size).await?;
            // An empty page still moves the reading position up to the horizon, so that polling
            // does not scan the same stretch again; it is stored with the next batch.
            self.read_from = page.checkpoint;
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

/// What a reader needs before reading: the horizon, the windows from a transaction on, whether
/// the day index had more rows, and the store's identity.
struct FeedPlan {
    horizon: u64,
    windows: Vec<Window>,
    truncated: bool,
    store: i64,
}

/// The plan from transaction `from` on, for a reader at `after`.
///
/// Fails with [`Error::FeedRebaseRequired`] when the stored transaction ids are another
/// cluster's, and [`Error::CheckpointFromAnotherStore`] when `after` is another store's.
async fn plan(client: &Session<'_, '_>, from: u64, after: &Checkpoint) -> Result<FeedPlan> {
    // A transaction id is below 2^63 (xid8: an epoch and a 32-bit id); one above could only be
    // made up, and PostgreSQL would refuse it as out of range.
    if after.txid > i64::MAX as u64 {
        return Err(beyond_the_horizon(after));
    }
    let stmt = client.prepare_cached(FEED_PLAN_SQL).await?;
    let rows = client.query(&stmt, &[&from.to_string(), &PLAN_ROWS]).await?;
    let number = |text: String| {
        text.parse::<u64>().map_err(|_| Error::Internal {
            message: format!("transaction id {text} is not a number"),
        })
    };
    let first = rows.first().ok_or_else(|| Error::Internal {
        message: "the feed plan returned no row".into(),
    })?;
    if !first.get::<_, bool>(5) {
        return Err(Error::FeedRebaseRequired {
            message: "the store records another cluster than this server".into(),
        });
    }
    let store: i64 = first.get(4);
    if after.store != 0 && after.store != store {
        return Err(Error::CheckpointFromAnotherStore);
    }
    let horizon = number(first.get(0))?;
    // Every checkpoint the feed gave is at or below the next transaction id to be assigned (a
    // horizon of a moment when no transaction ran is that id): one past it comes from elsewhere,
    // and a reader started there would skip every event until then.
    if after.txid > number(first.get(7))? {
        return Err(beyond_the_horizon(after));
    }
    if first.get::<_, bool>(6) {
        // On Citus the day index misses the rows that other statements than the repository's
        // insert (its trigger cannot run on a distributed table): one window over every day.
        return Ok(FeedPlan {
            horizon,
            windows: vec![Window {
                end: horizon,
                days: crate::db::feed_plan::DaySet::Any,
            }],
            truncated: false,
            store,
        });
    }
    let mut index: Vec<IndexRow> = Vec::with_capacity(rows.len());
    for r in &rows {
        if let Some(bucket) = r.get::<_, Option<i64>>(1) {
            let txid = r.get::<_, Option<String>>(2).map(number).transpose()?;
            index.push((bucket, txid, r.get(3)));
        }
    }
    let truncated = index.len() as i64 == PLAN_ROWS;
    Ok(FeedPlan {
        horizon,
        windows: plan_windows(&index, from, horizon, truncated),
        truncated,
        store,
    })
}

/// A checkpoint whose transaction id this cluster has not assigned yet.
fn beyond_the_horizon(after: &Checkpoint) -> Error {
    Error::invalid(
        "after.txid",
        IssueCode::OutOfRange,
        format!(
            "checkpoint transaction id {} is past every transaction of this server: not a checkpoint this store gave",
            after.txid
        ),
    )
}

/// Up to `limit` events of `window` after `from`; `explain` runs EXPLAIN ANALYZE instead and
/// returns the plan's lines.
async fn read_window(
    client: &Session<'_, '_>,
    from: &Checkpoint,
    window: &Window,
    limit: i64,
    filter: Option<&PartitionFilter>,
    explain: bool,
) -> Result<Vec<tokio_postgres::Row>> {
    use tokio_postgres::types::Type;
    let txid = from.txid.to_string();
    let end = window.end.to_string();
    let prefix = if explain {
        "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) "
    } else {
        ""
    };
    let Some(runs) = window.days.runs() else {
        let sql = format!("{prefix}{}", read_window_any_day_sql(filter.is_some()));
        let mut params: Vec<(&(dyn ToSql + Sync), Type)> = vec![
            (&txid, Type::TEXT),
            (&from.position, Type::INT8),
            (&end, Type::TEXT),
            (&limit, Type::INT8),
        ];
        if let Some(f) = filter {
            params.push((&f.partitions, Type::INT4));
            params.push((&f.owned, Type::INT4_ARRAY));
        }
        return Ok(client.query_typed(&sql, &params).await?);
    };
    // Each run as [first midnight, midnight after its last day).
    let bounds: Vec<DateTime<Utc>> = runs
        .iter()
        .flat_map(|(first, last)| {
            let end = last
                .checked_add_days(Days::new(1))
                .map_or_else(crate::validate::end_of_time, midnight);
            [midnight(*first), end]
        })
        .collect();
    let sql = format!("{prefix}{}", read_window_sql(runs.len(), filter.is_some()));
    let mut params: Vec<(&(dyn ToSql + Sync), Type)> =
        vec![(&txid, Type::TEXT), (&from.position, Type::INT8), (&end, Type::TEXT)];
    params.extend(bounds.iter().map(|b| (b as &(dyn ToSql + Sync), Type::TIMESTAMPTZ)));
    params.push((&limit, Type::INT8));
    if let Some(f) = filter {
        params.push((&f.partitions, Type::INT4));
        params.push((&f.owned, Type::INT4_ARRAY));
    }
    Ok(client.query_typed(&sql, &params).await?)
}

pub(crate) fn parse_checkpoint(txid: String, position: i64, store: i64) -> Result<Checkpoint> {
    // The database wrote it: a bad value is a bug, not bad input.
    let place = Checkpoint::parse(&txid, position).map_err(|_| Error::Internal {
        message: format!("txid {txid} is not a number"),
    })?;
    Ok(Checkpoint { store, ..place })
}

fn check_consumer(name: &str) -> Result<()> {
    // Named consumers are projections over the whole store; a user-scoped handle sees only part
    // of it and would move a shared checkpoint past events it cannot see.
    check_name("consumer", name)
}

/// A consumer's, group's or member's name: 1 to 200 bytes, not blank, no NUL.
pub(crate) fn check_name(field: &str, name: &str) -> Result<()> {
    if name.trim().is_empty() || name.len() > 200 || name.contains('\0') {
        return Err(Error::invalid(
            field,
            IssueCode::OutOfRange,
            format!("a {field} name is 1 to 200 bytes, not blank"),
        ));
    }
    Ok(())
}
