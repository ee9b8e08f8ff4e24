//! Global ordered reads and subscriptions, for projections.
//!
//! Events are read in `(txid, position)` order, and only from transactions older than
//! `pg_snapshot_xmin(pg_current_snapshot())`: every transaction below that horizon has ended, and
//! any transaction that commits later has a txid at or above it, so it sorts after everything
//! already handed out. A reader that resumes from its last checkpoint therefore never skips an
//! event that committed late and never sees one twice, and writers never wait for each other.
//! The price: a transaction left open (anywhere in the cluster) holds the horizon back, and new
//! events wait behind it.
//!
//! Rooms: this file holds the checkpoint, the read of a page (its plan over the day index and
//! the windows it reads); [`consumers`] named consumers' checkpoints, their repair and the
//! feed's rebase; [`subscribe`] subscriptions.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Days, NaiveDate, NaiveTime, Utc};
use serde::Serialize;
use tokio::sync::Notify;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::db::feed_plan::{plan_windows, IndexRow, Window};
use crate::db::repository::{in_session, EventRepository, Session};
use crate::error::{Error, Result};
use crate::model::EventRecord;
use crate::validate::{self, IssueCode};

mod consumers;
mod filter;
mod subscribe;

pub use consumers::{ConsumerRepair, ConsumerStatus, FeedRebase};
pub use filter::{is_notice, FeedFilter, FILTER_OPTIONS, SCAN_ROWS};
pub use subscribe::{SubscribeOptions, Subscription};

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

/// The options of `readAll` as JavaScript passes them: `{ after, limit, eventTypes,
/// eventTypePrefixes, aggregateTypes }` (limit 1000 when absent).
///
/// Fails with [`Error::Validation`] for a value of the wrong type or a key that is not an option.
pub fn read_all_options(value: &serde_json::Value) -> Result<(Option<Checkpoint>, i64, FeedFilter)> {
    let mut known = vec!["after", "limit"];
    known.extend(FILTER_OPTIONS);
    let o = crate::query::Options::of(value, &known)?;
    let after = Checkpoint::from_json("after", o.get("after").unwrap_or(&serde_json::Value::Null))?;
    let limit = o.whole("limit")?.unwrap_or(1000);
    // Entries are checked against the repository's limits when it reads.
    Ok((after, limit, FeedFilter::from_options(&o)?))
}

/// One page of [`EventRepository::read_all`].
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// Events in global order.
    pub events: Vec<EventRecord>,
    /// Where the next read starts. After a full page: its last event. After a shorter page
    /// (every event below the horizon was read): the horizon itself, `(horizon, 0)`, so that the
    /// next read starts where new events can appear. After a filtered page that ended its scan
    /// ([`SCAN_ROWS`]): the last row scanned. Never before the last event of the page.
    pub checkpoint: Checkpoint,
    /// Every event below the horizon has been read: the checkpoint is the horizon. A shorter page
    /// that is not caught up (a filtered read, which scans at most [`SCAN_ROWS`] rows a page,
    /// even none matching) means: read on.
    pub caught_up: bool,
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
fn read_window_sql(runs: usize, filter: bool, types: Option<&FeedFilter>) -> String {
    let limit = 4 + 2 * runs;
    let (part, only) = partition_sql(limit, filter);
    let typed = TypedSql::new(types, limit, filter);
    let rows = typed.rows(limit);
    let branches: Vec<String> = (0..runs)
        .map(|i| {
            format!(
                "(SELECT id, \"timestamp\", aggregate_id, aggregate_type, event_type, user_id, data, metadata, \
                         version, causation_id, correlation_id, source, position, schema_version, txid, txid::text AS txid_text{part}{} \
                    FROM events_v2 e \
                   WHERE (e.txid, e.position) > ($1::text::xid8, $2) AND e.txid < $3::text::xid8 \
                     AND e.\"timestamp\" >= ${} AND e.\"timestamp\" < ${}{only} \
                   ORDER BY e.txid, e.position LIMIT ${rows})",
                typed.hit_column(),
                4 + 2 * i,
                5 + 2 * i
            )
        })
        .collect();
    let outer_part = if filter { ", part" } else { "" };
    let outer_typed = if types.is_some() { ", hit, txid" } else { "" };
    typed.wrap(format!(
        "SELECT id, \"timestamp\", aggregate_id, aggregate_type, event_type, user_id, data, metadata, version, \
                causation_id, correlation_id, source, position, schema_version, txid_text{outer_part}{outer_typed} \
           FROM ({}) w ORDER BY w.txid, w.position LIMIT ${rows}",
        branches.join(" UNION ALL ")
    ))
}

/// The parts of a window's query that a type filter ([`FeedFilter`]) adds. A filtered window
/// scans at most `$scan` rows in order and marks the matching ones (`hit`), keeping only the
/// place of the others; it returns up to `$limit + 1` of the matching rows and, last, the last
/// row scanned with the number of rows scanned (`scanned`, NULL on the matching rows), so that
/// the reader's checkpoint can move past rows that did not match.
struct TypedSql<'a> {
    filter: Option<&'a FeedFilter>,
    /// The parameter number of the page's limit.
    limit: usize,
    /// The parameter number of the scan limit; the filter's lists follow it.
    scan: usize,
}

impl<'a> TypedSql<'a> {
    fn new(filter: Option<&'a FeedFilter>, limit: usize, partitions: bool) -> TypedSql<'a> {
        let scan = if partitions { limit + 3 } else { limit + 1 };
        TypedSql { filter, limit, scan }
    }

    /// The parameter that limits the rows each branch reads.
    fn rows(&self, limit: usize) -> usize {
        if self.filter.is_some() {
            self.scan
        } else {
            limit
        }
    }

    fn hit(&self) -> String {
        self.filter.map(|f| f.sql(self.scan + 1)).unwrap_or_default()
    }

    fn hit_column(&self) -> String {
        if self.filter.is_some() {
            format!(", {} AS hit", self.hit())
        } else {
            String::new()
        }
    }

    fn wrap(&self, scan: String) -> String {
        if self.filter.is_none() {
            return scan;
        }
        let limit = self.limit;
        // Only the matching rows keep their columns: the others are held as their place.
        let kept = [
            "id",
            "\"timestamp\"",
            "aggregate_id",
            "aggregate_type",
            "event_type",
            "user_id",
            "data",
            "metadata",
            "version",
            "causation_id",
            "correlation_id",
            "source",
        ]
        .map(|c| format!("CASE WHEN q.hit THEN q.{c} END AS {c}"))
        .join(", ");
        let part = if self.limit + 3 == self.scan { ", q.part" } else { "" };
        format!(
            "WITH s AS MATERIALIZED (SELECT {kept}, q.position, q.schema_version, q.txid_text{part}, q.hit, q.txid \
                                       FROM ({scan}) q) \
             (SELECT s.*, NULL::bigint AS scanned FROM s WHERE s.hit ORDER BY s.txid, s.position LIMIT ${limit} + 1) \
             UNION ALL \
             (SELECT s.*, (SELECT count(*) FROM s) AS scanned FROM s ORDER BY s.txid DESC, s.position DESC LIMIT 1)"
        )
    }
}

/// For a read of some partitions of a consumer group (parameters `$limit + 1`, the group's
/// partition count, and `$limit + 2`, the partitions read): the selected partition column and
/// the condition. Empty for a read of everything.
fn partition_sql(limit: usize, filter: bool) -> (String, String) {
    if !filter {
        return (String::new(), String::new());
    }
    let (count, owned) = (limit + 1, limit + 2);
    // The store's notices (erasure, a hard-deleted stream) reach every member: each has to
    // forget what it derived (docs/erasure.md).
    (
        format!(", synap_group_partition(e.aggregate_id, ${count}::integer) AS part"),
        format!(
            " AND (synap_group_partition(e.aggregate_id, ${count}::integer) = ANY (${owned}::integer[]) \
               OR {})",
            filter::notice_sql()
        ),
    )
}

/// [`read_window_sql`] for a window whose days are unknown: every partition or chunk.
fn read_window_any_day_sql(filter: bool, types: Option<&FeedFilter>) -> String {
    let (part, only) = partition_sql(4, filter);
    let typed = TypedSql::new(types, 4, filter);
    let txid = if types.is_some() { ", txid" } else { "" };
    typed.wrap(format!(
        "SELECT id, \"timestamp\", aggregate_id, aggregate_type, event_type, user_id, \
                data, metadata, version, causation_id, correlation_id, source, position, schema_version, txid::text AS txid_text{part}{}{txid} \
           FROM events_v2 e \
          WHERE (e.txid, e.position) > ($1::text::xid8, $2) \
            AND e.txid < $3::text::xid8{only} \
          ORDER BY e.txid, e.position \
          LIMIT ${}",
        typed.hit_column(),
        typed.rows(4)
    ))
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
        self.read_all_filtered(after, limit, &FeedFilter::default()).await
    }

    /// [`EventRepository::read_all`] of the events `filter` passes (every event when it is
    /// empty). The server scans at most [`SCAN_ROWS`] rows a page: a page can hold fewer events
    /// than `limit`, even none, before the reader is caught up ([`Page::caught_up`]); its
    /// checkpoint is then the last row scanned, so no row is scanned twice.
    ///
    /// Fails like [`EventRepository::read_all`].
    pub async fn read_all_filtered(&self, after: Option<&Checkpoint>, limit: i64, filter: &FeedFilter) -> Result<Page> {
        let limit = validate::check_limit("limit", limit, &self.config().limits)?;
        filter.check(&self.config().limits)?;
        let types = (!filter.is_empty()).then_some(filter);
        Ok(self.read_feed(after, limit, None, types).await?.0)
    }

    /// [`EventRepository::read_all`], of only some partitions of a consumer group when `filter`
    /// is given; with each event's partition and place in the order then (empty otherwise); of
    /// only the events `types` passes when given.
    pub(crate) async fn read_feed(
        &self,
        after: Option<&Checkpoint>,
        limit: i64,
        filter: Option<&PartitionFilter>,
        types: Option<&FeedFilter>,
    ) -> Result<(Page, Vec<(i32, Checkpoint)>)> {
        let after = after.copied().unwrap_or(Checkpoint::START);
        in_session!(self, |client| {
            let mut parts = Vec::new();
            let mut checkpoint = after;
            let mut events = Vec::new();
            // Rows a filtered page may still scan.
            let mut scan_left = self.config().feed_scan_rows.max(1);
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
                        let read = Read {
                            limit: want,
                            partitions: filter,
                            types,
                            scan: scan_left,
                        };
                        let rows = read_window(&client, &scan_from, window, &read, false).await?;
                        let mut got = 0;
                        let mut scanned = None;
                        for row in &rows {
                            let place = parse_checkpoint(row.get(14), row.get(12), store)?;
                            if types.is_some() {
                                if let Some(n) = row.get::<_, Option<i64>>("scanned") {
                                    // The last row scanned: the checkpoint moves past it when
                                    // every match before it is on this page.
                                    scanned = Some((n, place));
                                    continue;
                                }
                                if got == want {
                                    continue;
                                }
                            }
                            got += 1;
                            checkpoint = place;
                            events.push(self.delivered(row)?);
                            if filter.is_some() {
                                parts.push((row.get(15), checkpoint));
                            }
                        }
                        // A full page ends at its last event; a filtered one whose budget ran
                        // out, at the last row it scanned.
                        let mut done = got == want;
                        if let Some((n, last)) = scanned.filter(|_| !done) {
                            checkpoint = checkpoint.max(last);
                            scan_left -= n;
                            done = scan_left <= 0;
                        }
                        if done {
                            return Ok((
                                Page {
                                    events,
                                    checkpoint,
                                    caught_up: false,
                                },
                                parts,
                            ));
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
                                caught_up: true,
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
            let read = Read {
                limit,
                partitions: None,
                types: None,
                scan: SCAN_ROWS,
            };
            let rows = read_window(&session, &after, window, &read, true).await?;
            Ok(rows
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
                .join("\n"))
        })
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

/// What a window's query reads: up to `limit` events, of only some partitions of a group, of
/// only the events a filter passes, scanning at most `scan` rows (with a filter).
struct Read<'a> {
    limit: i64,
    partitions: Option<&'a PartitionFilter>,
    types: Option<&'a FeedFilter>,
    scan: i64,
}

/// Up to `read.limit` events of `window` after `from`; `explain` runs EXPLAIN ANALYZE instead
/// and returns the plan's lines.
async fn read_window(
    client: &Session<'_, '_>,
    from: &Checkpoint,
    window: &Window,
    read: &Read<'_>,
    explain: bool,
) -> Result<Vec<tokio_postgres::Row>> {
    let (limit, filter, types) = (read.limit, read.partitions, read.types);
    let lists = types.map(|t| t.params()).unwrap_or_default();
    use tokio_postgres::types::Type;
    let txid = from.txid.to_string();
    let end = window.end.to_string();
    let prefix = if explain {
        "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) "
    } else {
        ""
    };
    let Some(runs) = window.days.runs() else {
        let sql = format!("{prefix}{}", read_window_any_day_sql(filter.is_some(), types));
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
        if types.is_some() {
            params.push((&read.scan, Type::INT8));
            params.extend(lists.iter().map(|l| (l as &(dyn ToSql + Sync), Type::TEXT_ARRAY)));
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
    let sql = format!("{prefix}{}", read_window_sql(runs.len(), filter.is_some(), types));
    let mut params: Vec<(&(dyn ToSql + Sync), Type)> =
        vec![(&txid, Type::TEXT), (&from.position, Type::INT8), (&end, Type::TEXT)];
    params.extend(bounds.iter().map(|b| (b as &(dyn ToSql + Sync), Type::TIMESTAMPTZ)));
    params.push((&limit, Type::INT8));
    if let Some(f) = filter {
        params.push((&f.partitions, Type::INT4));
        params.push((&f.owned, Type::INT4_ARRAY));
    }
    if types.is_some() {
        params.push((&read.scan, Type::INT8));
        params.extend(lists.iter().map(|l| (l as &(dyn ToSql + Sync), Type::TEXT_ARRAY)));
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
