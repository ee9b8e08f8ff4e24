//! Erasure: forgetting one user everywhere ([`EventRepository::erase_user`], docs/erasure.md).
//!
//! Owns the list of the store's tables with a user's data ([`USER_DATA_TABLES`]) and of those
//! without ([`TABLES_WITHOUT_USER_DATA`]); a test compares both with the catalog, so a new table
//! is placed in one of them before it ships. Calls the connections ([`crate::db::conn`]) and the
//! append functions of migrations/repeatable/20_streams.sql (for the notice).
//!
//! One erasure, in four steps:
//! 1. A row in `synap_erasures` commits: from then on every append of the user is refused
//!    (`USER_BEING_ERASED`, the trigger of migrations/repeatable/70_erasure.sql).
//! 2. It waits for every transaction of the database that was running then to end: an append of
//!    the user that began before step 1 has then either committed (and step 3 sees its events) or
//!    ended without them.
//! 3. One transaction deletes the user's rows from every table, redacts the user's events in
//!    other users' streams, queues the relations it touched for a rewrite, removes the row of
//!    step 1 and appends the erasure notice to the feed. A run killed before this commits has
//!    erased nothing, and the next run goes on from step 2.
//! 4. After waiting again (so that no snapshot can still see the deleted rows), each queued
//!    relation is rewritten with `VACUUM (FULL, ANALYZE)`, which writes its live rows into new
//!    files (heap, TOAST and indexes) and refreshes its planner statistics; the old files are
//!    truncated. A run killed here leaves the queue, which the next erasure finishes.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::db::repository::EventRepository;
use crate::error::{Error, Result};

/// The event type of an erasure notice: `aggregateType` `system`, `source` `system`, version 1 of
/// a stream of its own, the erased user's `userId`, and `data` `{ "userId": ... }`.
pub const USER_ERASED: &str = "synap.user_erased";

/// The event type that stands in for a user's event in another user's stream after the user was
/// erased: same id, version and timestamp (the stream keeps consecutive versions), the stream
/// owner's `userId`, `data` `{}`, no metadata, causation or correlation, `source` `system`. The
/// fold applies it as an empty patch: the state does not change.
pub const EVENT_ERASED: &str = "synap.event_erased";

/// Every table of the store that can hold a user's data, and what an erasure does with it.
pub const USER_DATA_TABLES: &[(&str, &str)] = &[
    ("events_v2", "the user's events and every event of the user's streams: deleted; the user's events in other users' streams: redacted (synap.event_erased)"),
    ("event_streams", "the user's streams: deleted"),
    ("events_v2_ids", "the ids of the deleted events: deleted"),
    ("event_snapshots", "snapshots of the user's streams and of streams that held a redacted event: deleted"),
    ("events_daily", "the user's daily counts: deleted (days of other users' removed events are recounted)"),
    ("consumer_group_parked", "parked events of the user's streams or redacted events: deleted"),
    ("legacy_migration_map", "rows of the user's legacy rows or deleted events: deleted"),
    ("legacy_migration_failures", "failures of the user's legacy rows: deleted"),
    ("event_stream_tombstones", "tombstones of the user's hard-deleted streams: deleted"),
    ("synap_erasures", "the erasure's own row: deleted when the erasure commits"),
];

/// Every other table of the store, and why it holds no user's data.
pub const TABLES_WITHOUT_USER_DATA: &[(&str, &str)] = &[
    ("events_daily_dirty", "UTC days"),
    ("events_v2_feed_days", "feed buckets, days and transaction ids"),
    ("event_consumers", "consumer names chosen by the operator, checkpoints"),
    ("consumer_groups", "group names chosen by the operator"),
    ("consumer_group_partitions", "leases and checkpoints"),
    ("consumer_group_members", "member names chosen by the operator"),
    (
        "legacy_migration_runs",
        "progress counters of a legacy table's migration",
    ),
    ("synap_settings", "the store's settings"),
    ("synap_application_roles", "role names"),
    ("synap_migrations", "applied migrations"),
    ("synap_repeatable_migrations", "applied repeatable migrations"),
    ("synap_erasure_rewrites", "relation names"),
];

/// Options of [`EventRepository::erase_user`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EraseOptions {
    /// Count what would go; change nothing.
    pub dry_run: bool,
    /// How long step 2 waits for older transactions before it fails with
    /// [`Error::ErasureBlocked`]. Default 60 s.
    pub wait_timeout: Duration,
}

impl Default for EraseOptions {
    fn default() -> EraseOptions {
        EraseOptions {
            dry_run: false,
            wait_timeout: Duration::from_secs(60),
        }
    }
}

impl EraseOptions {
    /// The options as JavaScript passes them: `{ dryRun, waitTimeoutMs }`, both optional;
    /// `undefined` or `null` for the defaults.
    ///
    /// Fails with [`Error::Validation`] for a value of the wrong type or a key that is not an
    /// option.
    pub fn from_json(value: &serde_json::Value) -> Result<EraseOptions> {
        if value.is_null() {
            return Ok(EraseOptions::default());
        }
        let o = crate::query::Options::of(value, &["dryRun", "waitTimeoutMs"])?;
        let mut options = EraseOptions {
            dry_run: o.bool("dryRun")?.unwrap_or(false),
            ..EraseOptions::default()
        };
        if let Some(ms) = o.whole("waitTimeoutMs")? {
            if !(1..=3_600_000).contains(&ms) {
                return Err(Error::invalid(
                    "waitTimeoutMs",
                    crate::validate::IssueCode::OutOfRange,
                    format!("waitTimeoutMs must be between 1 and 3600000, not {ms}"),
                ));
            }
            options.wait_timeout = Duration::from_millis(ms as u64);
        }
        Ok(options)
    }
}

/// Rows of one table that an erasure removed or changed (or would, in a dry run).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ErasedRows {
    /// The table (a legacy table by the name its migration was given).
    pub table: String,
    /// `deleted` or `redacted`.
    pub action: String,
    /// How many rows.
    pub rows: i64,
}

/// The erasure notice appended to the feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ErasureNotice {
    /// The notice's event id.
    pub id: Uuid,
    /// The notice's own stream.
    pub aggregate_id: Uuid,
    /// When it was appended.
    pub timestamp: DateTime<Utc>,
}

/// What [`EventRepository::erase_user`] did, or would do in a dry run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ErasureReport {
    /// The user.
    pub user_id: String,
    /// Whether nothing was changed.
    pub dry_run: bool,
    /// Per table, in the order of [`USER_DATA_TABLES`] (legacy tables after them); tables with
    /// no rows of the user are listed with 0.
    pub tables: Vec<ErasedRows>,
    /// Streams of the user removed (also counted in `tables`).
    pub streams: i64,
    /// Events of other users that were in the user's streams and went with them.
    pub other_users_events: i64,
    /// The notice appended to the feed; none when nothing of the user was left to erase.
    pub notice: Option<ErasureNotice>,
    /// Relations rewritten (`VACUUM (FULL, ANALYZE)`), schema-qualified; also those a killed
    /// earlier erasure had left.
    pub rewritten: Vec<String>,
    /// Milliseconds spent waiting for older transactions (steps 2 and 4).
    pub waited_ms: u64,
    /// Milliseconds of the deleting transaction (step 3).
    pub delete_ms: u64,
    /// Milliseconds of the rewrites (step 4).
    pub rewrite_ms: u64,
}

impl ErasureReport {
    fn count(&mut self, table: &str, action: &str, rows: i64) {
        match self.tables.iter_mut().find(|t| t.table == table && t.action == action) {
            Some(t) => t.rows += rows,
            None => self.tables.push(ErasedRows {
                table: table.to_owned(),
                action: action.to_owned(),
                rows,
            }),
        }
    }

    /// The rows counted for `table` (every action).
    pub fn rows(&self, table: &str) -> i64 {
        self.tables.iter().filter(|t| t.table == table).map(|t| t.rows).sum()
    }

    /// Whether anything of the user was found.
    pub fn found_anything(&self) -> bool {
        self.tables.iter().any(|t| t.rows > 0)
    }
}

/// Marks the UTC days of some timestamps for the next analytics refresh (other users' counts of
/// the days whose events went or changed).
const MARK_DAYS_SQL: &str = "INSERT INTO events_daily_dirty (day)
   SELECT DISTINCT (ts AT TIME ZONE 'UTC')::date FROM unnest($1::timestamptz[]) ts
   ON CONFLICT (day) DO NOTHING";

/// The qualified name of each relation behind `oids` (partitions, chunks or tables).
const QUALIFIED_SQL: &str = "SELECT DISTINCT format('%I.%I', n.nspname, c.relname)
   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = ANY ($1::oid[])";

/// The citus mode's partitions of `events_v2` for some UTC days (RETURNING tableoid names a
/// shard there, on a worker): each day's partition, else the default one.
const CITUS_PARTITIONS_SQL: &str = "SELECT DISTINCT format('%I.%I', n.nspname, c.relname)
   FROM unnest($1::date[]) d
   JOIN pg_class c ON c.relname = coalesce(
            (SELECT p.relname FROM pg_class p
              WHERE p.relname = 'events_v2_p' || to_char(d, 'YYYYMMDD')
                AND p.relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = 'events_v2'::regclass)),
            'events_v2_default')
   JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE c.relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = 'events_v2'::regclass)";

/// The transactions of this database running now, but this one: virtual transaction ids and
/// backends. `pg_locks` and these columns of `pg_stat_activity` are readable by every role.
const RUNNING_SQL: &str = "SELECT l.virtualtransaction, l.pid
   FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
  WHERE l.locktype = 'virtualxid' AND l.mode = 'ExclusiveLock' AND l.granted
    AND l.pid <> pg_backend_pid() AND a.datname = current_database()";

const STILL_RUNNING_SQL: &str = "SELECT coalesce(array_agg(DISTINCT pid), '{}') FROM pg_locks
  WHERE locktype = 'virtualxid' AND mode = 'ExclusiveLock' AND granted AND virtualtransaction = ANY ($1)";

impl EventRepository {
    /// Removes every row of the store that holds `user_id`'s data and appends one erasure notice
    /// ([`USER_ERASED`]) to the feed; see the module documentation and docs/erasure.md.
    ///
    /// Fails with [`Error::Validation`] for a blank or oversized user id,
    /// [`Error::PermissionDenied`] on a user-scoped handle, and [`Error::ErasureBlocked`] when
    /// transactions older than the erasure do not end within `options.wait_timeout` (the user's
    /// appends stay refused until a run completes). Running it again after it completed finds
    /// nothing and appends no second notice.
    pub async fn erase_user(&self, user_id: &str, options: &EraseOptions) -> Result<ErasureReport> {
        self.refuse_scoped("erase_user")?;
        crate::validate::check_user_id(user_id, &self.config().limits)
            .map_err(|i| Error::invalid("userId", i.code, i.message))?;
        let mut report = ErasureReport {
            user_id: user_id.to_owned(),
            dry_run: options.dry_run,
            tables: Vec::new(),
            streams: 0,
            other_users_events: 0,
            notice: None,
            rewritten: Vec::new(),
            waited_ms: 0,
            delete_ms: 0,
            rewrite_ms: 0,
        };
        for (table, _) in USER_DATA_TABLES.iter().filter(|(t, _)| *t != "synap_erasures") {
            report.count(table, "deleted", 0);
        }
        report.count("events_v2", "redacted", 0);
        if options.dry_run {
            self.erase_in_one_transaction(user_id, &mut report, true).await?;
            return Ok(report);
        }
        let mut client = self.client().await?;
        client
            .execute(
                "INSERT INTO synap_erasures (user_id) VALUES ($1) ON CONFLICT (user_id) DO NOTHING",
                &[&user_id],
            )
            .await?;
        drop(client);
        report.waited_ms += self.wait_for_older_transactions(options.wait_timeout).await?;
        let started = Instant::now();
        self.erase_in_one_transaction(user_id, &mut report, false).await?;
        report.delete_ms = started.elapsed().as_millis() as u64;
        report.waited_ms += self.wait_for_older_transactions(options.wait_timeout).await?;
        let started = Instant::now();
        report.rewritten = self.rewrite_queued().await?;
        report.rewrite_ms = started.elapsed().as_millis() as u64;
        Ok(report)
    }

    /// Step 3 (or, in a dry run, its counts in a transaction that is rolled back).
    async fn erase_in_one_transaction(&self, user: &str, report: &mut ErasureReport, dry_run: bool) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let mode: String = tx
            .query_one("SELECT value FROM synap_settings WHERE key = 'storage_mode'", &[])
            .await?
            .get(0);
        // The notices of earlier erasures of this user stay (and so do their streams).
        let notices = tx
            .query(
                "SELECT id, aggregate_id FROM events_v2 WHERE user_id = $1 AND event_type = $2 AND aggregate_type = 'system'",
                &[&user, &USER_ERASED],
            )
            .await?;
        let notice_ids: Vec<Uuid> = notices.iter().map(|r| r.get(0)).collect();
        let notice_streams: Vec<Uuid> = notices.iter().map(|r| r.get(1)).collect();
        let streams: Vec<Uuid> = tx
            .query(
                "SELECT aggregate_id FROM event_streams WHERE user_id = $1 AND aggregate_id <> ALL ($2::uuid[])",
                &[&user, &notice_streams],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        report.streams = streams.len() as i64;
        if !dry_run {
            // The user's stream rows first, as appends take them: an append of another user to
            // one of them (an unscoped handle may write one) waits, then finds the stream gone
            // and writes nothing, instead of leaving its event behind in a stream that no
            // longer exists. (On Citus the rows are locked shard by shard.)
            tx.query("SELECT 1 FROM synap_lock_streams($1)", &[&streams]).await?;
        }
        let mut touched: Vec<u32> = Vec::new();
        let mut touched_days: BTreeSet<chrono::NaiveDate> = BTreeSet::new();
        let mut recount_days: Vec<DateTime<Utc>> = Vec::new();

        // The user's events in other users' streams: redacted in place, so that those streams
        // keep consecutive versions.
        let redact_sql = if dry_run {
            "SELECT e.id, e.aggregate_id, s.user_id, e.tableoid::oid, e.\"timestamp\"
               FROM events_v2 e JOIN event_streams s ON s.aggregate_id = e.aggregate_id
              WHERE e.user_id = $1 AND s.user_id <> $1"
        } else {
            "UPDATE events_v2 e
                SET event_type = 'synap.event_erased', user_id = s.user_id, data = '{}'::jsonb, metadata = NULL,
                    schema_version = 1, causation_id = NULL, correlation_id = NULL, source = 'system'
               FROM event_streams s
              WHERE s.aggregate_id = e.aggregate_id AND e.user_id = $1 AND s.user_id <> $1
          RETURNING e.id, e.aggregate_id, s.user_id, e.tableoid::oid, e.\"timestamp\""
        };
        let redacted = tx.query(redact_sql, &[&user]).await?;
        let redacted_ids: Vec<Uuid> = redacted.iter().map(|r| r.get(0)).collect();
        let redacted_streams: Vec<Uuid> = redacted.iter().map(|r| r.get(1)).collect();
        let redacted_owners: Vec<String> = redacted.iter().map(|r| r.get(2)).collect();
        for r in &redacted {
            touched.push(r.get(3));
            let ts: DateTime<Utc> = r.get(4);
            touched_days.insert(ts.date_naive());
            recount_days.push(ts);
        }
        report.count("events_v2", "redacted", redacted.len() as i64);

        // The user's events and every event of the user's streams.
        let events_sql = if dry_run {
            "SELECT id, user_id <> $1, tableoid::oid, \"timestamp\" FROM events_v2
              WHERE (user_id = $1 OR aggregate_id = ANY ($2::uuid[])) AND id <> ALL ($3::uuid[])
                AND id <> ALL ($4::uuid[])"
        } else {
            "DELETE FROM events_v2
              WHERE (user_id = $1 OR aggregate_id = ANY ($2::uuid[])) AND id <> ALL ($3::uuid[])
                AND id <> ALL ($4::uuid[])
          RETURNING id, user_id <> $1, tableoid::oid, \"timestamp\""
        };
        let events = tx
            .query(events_sql, &[&user, &streams, &notice_ids, &redacted_ids])
            .await?;
        let event_ids: Vec<Uuid> = events.iter().map(|r| r.get(0)).collect();
        for r in &events {
            touched.push(r.get(2));
            let ts: DateTime<Utc> = r.get(3);
            touched_days.insert(ts.date_naive());
            if r.get::<_, bool>(1) {
                report.other_users_events += 1;
                recount_days.push(ts);
            }
        }
        report.count("events_v2", "deleted", events.len() as i64);

        let mut counts = Vec::new();
        counts.push(
            remove(
                &tx,
                dry_run,
                "events_v2_ids",
                "SELECT 1 FROM events_v2_ids WHERE (id = ANY ($1::uuid[]) OR user_id = $2 OR aggregate_id = ANY ($3::uuid[]))
                    AND id <> ALL ($4::uuid[])",
                &[&event_ids, &user, &streams, &notice_ids],
            )
            .await?,
        );
        counts.push(
            remove(
                &tx,
                dry_run,
                "event_streams",
                "SELECT 1 FROM event_streams WHERE aggregate_id = ANY ($1::uuid[])",
                &[&streams],
            )
            .await?,
        );
        counts.push(
            remove(
                &tx,
                dry_run,
                "event_snapshots",
                "SELECT 1 FROM event_snapshots
                  WHERE (user_id = $1 OR aggregate_id = ANY ($2::uuid[]) OR aggregate_id = ANY ($3::uuid[]))
                    AND aggregate_id <> ALL ($4::uuid[])",
                &[&user, &streams, &redacted_streams, &notice_streams],
            )
            .await?,
        );
        counts.push(
            remove(
                &tx,
                dry_run,
                "event_stream_tombstones",
                "SELECT 1 FROM event_stream_tombstones WHERE user_id = $1",
                &[&user],
            )
            .await?,
        );
        counts.push(
            remove(
                &tx,
                dry_run,
                "events_daily",
                "SELECT 1 FROM events_daily WHERE user_id = $1",
                &[&user],
            )
            .await?,
        );
        counts.push(
            remove(
                &tx,
                dry_run,
                "consumer_group_parked",
                "SELECT 1 FROM consumer_group_parked WHERE aggregate_id = ANY ($1::uuid[]) OR event_id = ANY ($2::uuid[])",
                &[&streams, &redacted_ids],
            )
            .await?,
        );
        for (table, n) in counts {
            report.count(table, "deleted", n);
        }

        // The legacy tables whose switch-over has not finished (still there), each once under
        // every name a migration knew it by.
        let legacy = tx
            .query(
                "SELECT array_agg(t ORDER BY length(t), t) FROM (
                     SELECT legacy_table AS t FROM legacy_migration_runs UNION SELECT $1::text) l
                  WHERE to_regclass(t) IS NOT NULL GROUP BY to_regclass(t)::oid ORDER BY 1",
                &[&crate::db::legacy::DEFAULT_LEGACY_TABLE],
            )
            .await?;
        let mut legacy_touched = Vec::new();
        let (mut legacy_names, mut legacy_ids): (Vec<String>, Vec<Uuid>) = (Vec::new(), Vec::new());
        for names in legacy.iter().map(|r| r.get::<_, Vec<String>>(0)) {
            let table = &names[0];
            let Ok(quoted) = crate::db::sql::quote_table(table) else {
                continue;
            };
            let has_user_id: bool = tx
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass($1) AND attname = 'user_id' AND NOT attisdropped)",
                    &[table],
                )
                .await?
                .get(0);
            if !has_user_id {
                continue;
            }
            let rows = if dry_run {
                tx.query(
                    &*format!("SELECT id, tableoid::oid FROM {quoted} WHERE user_id::text = $1"),
                    &[&user],
                )
                .await?
            } else {
                tx.query(
                    &*format!("DELETE FROM {quoted} WHERE user_id::text = $1 RETURNING id, tableoid::oid"),
                    &[&user],
                )
                .await?
            };
            if let Some(r) = rows.first() {
                legacy_touched.push(r.get::<_, u32>(1));
            }
            report.count(table, "deleted", rows.len() as i64);
            for r in &rows {
                for name in &names {
                    legacy_names.push(name.clone());
                    legacy_ids.push(r.get(0));
                }
            }
        }
        let map = remove(
            &tx,
            dry_run,
            "legacy_migration_map",
            "SELECT 1 FROM legacy_migration_map
              WHERE event_id = ANY ($1::uuid[])
                 OR (legacy_table, legacy_id) IN (SELECT * FROM unnest($2::text[], $3::uuid[]))",
            &[&event_ids, &legacy_names, &legacy_ids],
        )
        .await?;
        let failures = remove(
            &tx,
            dry_run,
            "legacy_migration_failures",
            "SELECT 1 FROM legacy_migration_failures
              WHERE (legacy_table, legacy_id) IN (SELECT * FROM unnest($1::text[], $2::uuid[]))",
            &[&legacy_names, &legacy_ids],
        )
        .await?;
        report.count(map.0, "deleted", map.1);
        report.count(failures.0, "deleted", failures.1);

        if dry_run {
            tx.rollback().await?;
            return Ok(());
        }

        if !redacted_ids.is_empty() {
            tx.execute(
                "UPDATE events_v2_ids i SET user_id = v.owner
                   FROM unnest($1::uuid[], $2::text[]) v(id, owner) WHERE i.id = v.id",
                &[&redacted_ids, &redacted_owners],
            )
            .await?;
        }
        // Other users' counts of the days whose events went or changed are recounted.
        tx.execute(MARK_DAYS_SQL, &[&recount_days]).await?;

        // The relations to rewrite.
        let mut relations: BTreeSet<String> = BTreeSet::new();
        let oids: Vec<u32> = if mode == "citus" {
            let days: Vec<chrono::NaiveDate> = touched_days.iter().copied().collect();
            relations.extend(
                tx.query(CITUS_PARTITIONS_SQL, &[&days])
                    .await?
                    .iter()
                    .map(|r| r.get::<_, String>(0)),
            );
            legacy_touched
        } else {
            touched.sort_unstable();
            touched.dedup();
            touched.extend(legacy_touched);
            touched
        };
        relations.extend(
            tx.query(QUALIFIED_SQL, &[&oids])
                .await?
                .iter()
                .map(|r| r.get::<_, String>(0)),
        );
        for t in &report.tables {
            let own_table = USER_DATA_TABLES.iter().any(|(name, _)| *name == t.table) && t.table != "events_v2";
            if t.rows > 0 && own_table {
                relations.extend(
                    tx.query(QUALIFIED_SQL_BY_NAME, &[&t.table])
                        .await?
                        .iter()
                        .map(|r| r.get::<_, String>(0)),
                );
            }
        }
        let relations: Vec<String> = relations.into_iter().collect();
        tx.execute(
            "INSERT INTO synap_erasure_rewrites (relation) SELECT unnest($1::text[]) ON CONFLICT (relation) DO NOTHING",
            &[&relations],
        )
        .await?;

        tx.execute("DELETE FROM synap_erasures WHERE user_id = $1", &[&user])
            .await?;
        if report.found_anything() {
            let data = serde_json::json!({ "userId": user });
            report.notice = Some(append_notice(&tx, &mode, USER_ERASED, user, &data).await?);
        }
        tx.commit().await?;
        Ok(())
    }

    /// Waits until every transaction of this database running now (but the caller's) has ended;
    /// returns the milliseconds it waited.
    async fn wait_for_older_transactions(&self, budget: Duration) -> Result<u64> {
        let mut client = self.client().await?;
        let running = client.query(RUNNING_SQL, &[]).await?;
        let vxids: Vec<String> = running.iter().map(|r| r.get(0)).collect();
        let started = Instant::now();
        let mut pause = Duration::from_millis(2);
        loop {
            let pids: Vec<i32> = client.query_one(STILL_RUNNING_SQL, &[&vxids]).await?.get(0);
            if pids.is_empty() {
                return Ok(started.elapsed().as_millis() as u64);
            }
            if started.elapsed() >= budget {
                return Err(Error::ErasureBlocked {
                    waited_ms: started.elapsed().as_millis() as u64,
                    transactions: pids.len(),
                    pids,
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// Step 4: rewrites every queued relation (also those a killed erasure left) and takes it off
    /// the queue. Returns their names.
    async fn rewrite_queued(&self) -> Result<Vec<String>> {
        let mut client = self.client().await?;
        let parent: String = client.query_one(QUALIFIED_SQL_BY_NAME, &[&"events_v2"]).await?.get(0);
        // Each queued relation that still exists, whether it is a partition or chunk of
        // events_v2, and whether events_v2 has statistics of its own (gathered over every
        // partition: then one ANALYZE of events_v2 refreshes them and every partition's at once).
        let queued: Vec<(String, bool, bool)> = client
            .query(
                "SELECT q.relation, to_regclass(q.relation) IS NOT NULL,
                        EXISTS (SELECT 1 FROM pg_inherits WHERE inhrelid = to_regclass(q.relation))
                   FROM synap_erasure_rewrites q ORDER BY q.relation",
                &[],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let parent_has_statistics: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_stats WHERE format('%I.%I', schemaname, tablename) = $1)",
                &[&parent],
            )
            .await?
            .get(0);
        drop(client);
        let any_partition = queued.iter().any(|(_, exists, partition)| *exists && *partition);
        // Two connections rewrite at once, taking the relations in turn.
        let lanes: Vec<Vec<(String, bool, bool)>> = (0..2)
            .map(|lane| queued.iter().skip(lane).step_by(2).cloned().collect())
            .collect();
        let rewrite = |lane: Vec<(String, bool, bool)>| async move {
            let mut client = self.client().await?;
            let mut done = Vec::new();
            for (relation, exists, partition) in lane {
                if exists {
                    // Outside a transaction block, as VACUUM must be; the name is
                    // schema-qualified, so no search_path is needed (also through a pooler).
                    let analyze = if partition && parent_has_statistics {
                        ""
                    } else {
                        ", ANALYZE"
                    };
                    client
                        .raw()
                        .batch_execute(&format!("VACUUM (FULL{analyze}) {relation}"))
                        .await?;
                    done.push(relation.clone());
                }
                client
                    .execute("DELETE FROM synap_erasure_rewrites WHERE relation = $1", &[&relation])
                    .await?;
            }
            Ok::<_, Error>(done)
        };
        let mut lanes = lanes.into_iter();
        let (a, b) = futures_util::future::join(
            rewrite(lanes.next().unwrap_or_default()),
            rewrite(lanes.next().unwrap_or_default()),
        )
        .await;
        let mut done = a?;
        done.extend(b?);
        done.sort();
        if any_partition && parent_has_statistics {
            self.client()
                .await?
                .raw()
                .batch_execute(&format!("ANALYZE {parent}"))
                .await?;
        }
        Ok(done)
    }
}

/// The event type of the notice of a hard [`EventRepository::delete_stream`]: `aggregateType`
/// `system`, `source` `system`, version 1 of a stream of its own, the deleted stream owner's
/// `userId`, and `data` `{ "aggregateId": ... }`.
pub const STREAM_DELETED: &str = "synap.stream_deleted";

/// What [`EventRepository::delete_stream`] did.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamDeletion {
    /// The stream.
    pub aggregate_id: Uuid,
    /// Whether its rows were removed for good.
    pub hard: bool,
    /// Whether there was a stream to delete (false: no such stream, or, hard, one already gone).
    pub found: bool,
    /// Hard: the events removed.
    pub events: i64,
    /// Soft: the `<aggregateType>.deleted` event appended.
    pub event: Option<crate::model::EventRecord>,
    /// Hard: the notice appended to the feed.
    pub notice: Option<ErasureNotice>,
}

/// Options of [`EventRepository::delete_stream`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeleteStreamOptions {
    /// Remove the stream's rows and leave a tombstone, instead of marking it deleted.
    pub hard: bool,
}

impl DeleteStreamOptions {
    /// The options as JavaScript passes them: `{ hard }`, optional.
    ///
    /// Fails with [`Error::Validation`] for a value of the wrong type or an unknown key.
    pub fn from_json(value: &serde_json::Value) -> Result<DeleteStreamOptions> {
        if value.is_null() {
            return Ok(DeleteStreamOptions::default());
        }
        let o = crate::query::Options::of(value, &["hard"])?;
        Ok(DeleteStreamOptions {
            hard: o.bool("hard")?.unwrap_or(false),
        })
    }
}

impl EventRepository {
    /// Deletes a stream (docs/erasure.md, "Deleting a stream").
    ///
    /// Soft (the default): appends the fold's deletion event, `<aggregateType>.deleted` with
    /// `data` `{}` and `source` `system`, as the stream's owner, at the next version: a replay
    /// or fold of the stream says `deleted: true`, and appends stay possible (a `.created` event
    /// revives it, as in the fold). A scoped handle may delete its own user's streams so.
    ///
    /// Hard: removes the stream's events, id rows, snapshots and parked events and its stream
    /// row, leaves a tombstone (a later append with the id is refused with
    /// [`Error::StreamDeleted`]) and appends a [`STREAM_DELETED`] notice to the feed, in one
    /// transaction. Unscoped handles only ([`Error::PermissionDenied`]). Deleting a stream that
    /// is already gone changes nothing (`found: false`).
    pub async fn delete_stream(&self, aggregate_id: Uuid, options: &DeleteStreamOptions) -> Result<StreamDeletion> {
        let mut out = StreamDeletion {
            aggregate_id,
            hard: options.hard,
            found: false,
            events: 0,
            event: None,
            notice: None,
        };
        if !options.hard {
            let stream = crate::db::conn::in_session!(self, |client| {
                Ok(client
                    .query_opt(
                        "SELECT version, aggregate_type, user_id FROM event_streams WHERE aggregate_id = $1",
                        &[&aggregate_id],
                    )
                    .await?
                    .map(|r| (r.get::<_, i32>(0), r.get::<_, String>(1), r.get::<_, String>(2))))
            })?;
            let Some((version, aggregate_type, owner)) = stream else {
                return Ok(out);
            };
            let aggregate_type: crate::model::AggregateType = aggregate_type.parse().map_err(|_| Error::Internal {
                message: format!("stream {aggregate_id} has the aggregate type {aggregate_type:?}"),
            })?;
            let mut event = crate::model::NewEvent::new(
                aggregate_id,
                aggregate_type,
                format!("{}.deleted", aggregate_type.as_str()),
                &owner,
                serde_json::json!({}),
                version + 1,
            );
            event.source = crate::model::EventSource::System;
            out.event = Some(self.append(event).await?);
            out.found = true;
            return Ok(out);
        }
        self.refuse_scoped("delete_stream with hard")?;
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let mode: String = tx
            .query_one("SELECT value FROM synap_settings WHERE key = 'storage_mode'", &[])
            .await?
            .get(0);
        let Some(stream) = tx
            .query_opt(
                "SELECT user_id, version FROM event_streams WHERE aggregate_id = $1 FOR UPDATE",
                &[&aggregate_id],
            )
            .await?
        else {
            tx.rollback().await?;
            return Ok(out);
        };
        let (owner, version): (String, i32) = (stream.get(0), stream.get(1));
        let events = tx
            .query(
                "DELETE FROM events_v2 WHERE aggregate_id = $1 RETURNING id, \"timestamp\"",
                &[&aggregate_id],
            )
            .await?;
        let ids: Vec<Uuid> = events.iter().map(|r| r.get(0)).collect();
        let days: Vec<DateTime<Utc>> = events.iter().map(|r| r.get(1)).collect();
        tx.execute("DELETE FROM events_v2_ids WHERE aggregate_id = $1", &[&aggregate_id])
            .await?;
        tx.execute("DELETE FROM event_snapshots WHERE aggregate_id = $1", &[&aggregate_id])
            .await?;
        tx.execute(
            "DELETE FROM consumer_group_parked WHERE aggregate_id = $1",
            &[&aggregate_id],
        )
        .await?;
        tx.execute(
            "DELETE FROM legacy_migration_map WHERE event_id = ANY ($1::uuid[])",
            &[&ids],
        )
        .await?;
        tx.execute(MARK_DAYS_SQL, &[&days]).await?;
        tx.execute("DELETE FROM event_streams WHERE aggregate_id = $1", &[&aggregate_id])
            .await?;
        tx.execute(
            "INSERT INTO event_stream_tombstones (aggregate_id, user_id, version) VALUES ($1, $2, $3)",
            &[&aggregate_id, &owner, &version],
        )
        .await?;
        let data = serde_json::json!({ "aggregateId": aggregate_id });
        out.notice = Some(append_notice(&tx, &mode, STREAM_DELETED, &owner, &data).await?);
        tx.commit().await?;
        out.found = true;
        out.events = ids.len() as i64;
        Ok(out)
    }
}

/// Appends a notice of the store's (a stream of its own, version 1, `system`) in `tx`.
async fn append_notice(
    tx: &crate::db::conn::Tx<'_>,
    mode: &str,
    event_type: &str,
    user: &str,
    data: &serde_json::Value,
) -> Result<ErasureNotice> {
    let fresh = tx.query_one("SELECT gen_random_uuid(), gen_random_uuid()", &[]).await?;
    let (id, aggregate_id): (Uuid, Uuid) = (fresh.get(0), fresh.get(1));
    let append = if mode == "citus" {
        "SELECT \"timestamp\" FROM synap_append_routed($1, NULL, $2, 'system', $3, $4, $5, NULL, 1, NULL, NULL, 'system', 1)"
    } else {
        "SELECT out_timestamp FROM synap_append($1, NULL, $2, 'system', $3, $4, $5, NULL, 1, NULL, NULL, 'system', 1)"
    };
    let row = tx
        .query_one(append, &[&id, &aggregate_id, &event_type, &user, data])
        .await?;
    Ok(ErasureNotice {
        id,
        aggregate_id,
        timestamp: row.get(0),
    })
}

/// Deletes the rows `sql` selects (`SELECT 1 FROM table WHERE ...`), or counts them in a dry run.
async fn remove(
    tx: &crate::db::conn::Tx<'_>,
    dry_run: bool,
    table: &'static str,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<(&'static str, i64)> {
    let n = if dry_run {
        tx.query_one(format!("SELECT count(*) FROM ({sql}) s").as_str(), params)
            .await?
            .get::<_, i64>(0)
    } else {
        tx.execute(sql.replacen("SELECT 1 FROM", "DELETE FROM", 1).as_str(), params)
            .await? as i64
    };
    Ok((table, n))
}

/// The qualified name of one of the store's tables.
const QUALIFIED_SQL_BY_NAME: &str = "SELECT format('%I.%I', n.nspname, c.relname)
   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($1)";
