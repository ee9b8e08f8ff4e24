//! Retention: removing events older than a cut-off by dropping whole TimescaleDB chunks or whole
//! native daily partitions, never by deleting rows of events_v2; plus [`EventRepository::stats`].

use chrono::{DateTime, Days, Months, NaiveDate, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::db::replay::keep_before_cutoff;
use crate::db::repository::EventRepository;
use crate::error::{Error, Result};

/// An age such as `90d`, `12w` or `2y`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetentionAge {
    /// Whole days.
    Days(u32),
    /// Whole weeks.
    Weeks(u32),
    /// Calendar years.
    Years(u32),
}

impl RetentionAge {
    /// Parses `<n>d`, `<n>w` or `<n>y` with n ≥ 1.
    ///
    /// Fails with [`Error::InvalidConfig`] for anything else.
    pub fn parse(s: &str) -> Result<RetentionAge> {
        let bad = || Error::InvalidConfig {
            message: format!("an age must look like 90d, 12w or 2y, not \"{s}\""),
        };
        let s = s.trim();
        // The unit is the last character, whatever its width in bytes.
        let unit_at = s.char_indices().last().map_or(0, |(i, _)| i);
        let (number, unit) = s.split_at(unit_at);
        let n: u32 = number.parse().map_err(|_| bad())?;
        if n == 0 || n > 100_000 {
            return Err(bad());
        }
        match unit {
            "d" => Ok(RetentionAge::Days(n)),
            "w" => Ok(RetentionAge::Weeks(n)),
            "y" => Ok(RetentionAge::Years(n)),
            _ => Err(bad()),
        }
    }

    /// The cut-off for this age at `now`: the UTC midnight at or before `now` minus the age, so
    /// that it falls on a partition or chunk boundary.
    ///
    /// Fails with [`Error::InvalidConfig`] when the age reaches before year 1.
    pub fn cutoff(self, now: DateTime<Utc>) -> Result<DateTime<Utc>> {
        let today = now.date_naive();
        let day = match self {
            RetentionAge::Days(n) => today.checked_sub_days(Days::new(n.into())),
            RetentionAge::Weeks(n) => today.checked_sub_days(Days::new(u64::from(n) * 7)),
            RetentionAge::Years(n) => today.checked_sub_months(Months::new(n.saturating_mul(12))),
        };
        day.map(midnight)
            .filter(|cutoff| *cutoff >= crate::validate::earliest_stored())
            .ok_or_else(|| Error::InvalidConfig {
                message: format!("the age {self:?} reaches before 4714-11-24 BC, the earliest time PostgreSQL stores"),
            })
    }
}

impl RetentionOptions {
    /// The options as JavaScript passes them: `{ olderThan, dryRun, force }` (`olderThan`
    /// required, an age such as `90d`, `12w` or `2y`), with the cut-off taken from `now`.
    ///
    /// Fails with [`Error::Validation`] for a missing `olderThan`, a value of the wrong type or a
    /// key that is not an option, and [`Error::InvalidConfig`] for an age that does not parse or
    /// reaches before the earliest time PostgreSQL stores.
    pub fn from_json(value: &serde_json::Value, now: DateTime<Utc>) -> Result<RetentionOptions> {
        if value.is_null() {
            return Err(Error::invalid(
                "options",
                crate::validate::IssueCode::Required,
                "options must be an object with olderThan",
            ));
        }
        let o = crate::query::Options::of(value, &["olderThan", "dryRun", "force"])?;
        let age = o.string("olderThan")?.ok_or_else(|| {
            Error::invalid(
                "olderThan",
                crate::validate::IssueCode::Required,
                "olderThan is required: an age such as 90d, 12w or 2y",
            )
        })?;
        Ok(RetentionOptions {
            cutoff: RetentionAge::parse(&age)?.cutoff(now)?,
            dry_run: o.bool("dryRun")?.unwrap_or(false),
            force: o.bool("force")?.unwrap_or(false),
        })
    }
}

fn midnight(day: NaiveDate) -> DateTime<Utc> {
    day.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc()
}

/// Options of [`EventRepository::apply_retention`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionOptions {
    /// Events before this instant go. Rounded down to a UTC midnight.
    pub cutoff: DateTime<Utc>,
    /// List what would go; change nothing.
    pub dry_run: bool,
    /// Go ahead even when some aggregates cannot be kept by a snapshot (their stored events do
    /// not fold): their events before the cut-off are lost.
    pub force: bool,
}

/// One chunk, partition or set of default-partition rows that goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetentionTarget {
    /// The chunk or partition.
    pub name: String,
    /// `chunk`, `partition`, or `default_rows` (rows of `events_v2_default`, moved into their
    /// day's partition and dropped with it).
    pub kind: String,
    /// Its rows.
    pub rows: i64,
    /// Its oldest event.
    pub from: Option<DateTime<Utc>>,
    /// Its newest event.
    pub to: Option<DateTime<Utc>>,
}

/// What [`EventRepository::apply_retention`] did, or would do in a dry run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetentionReport {
    /// `timescaledb` or `native`.
    pub storage_mode: String,
    /// The effective cut-off (a UTC midnight).
    pub cutoff: DateTime<Utc>,
    /// Whether nothing was changed.
    pub dry_run: bool,
    /// What goes.
    pub targets: Vec<RetentionTarget>,
    /// Events that go.
    pub rows: i64,
    /// Aggregates with events both before and after the cut-off.
    pub cut_through_count: i64,
    /// Some of them.
    pub cut_through_sample: Vec<Uuid>,
    /// Snapshots stored so that aggregates keep their state without the removed events (one per
    /// aggregate with events before the cut-off, at its last version before it).
    pub snapshots_stored: i64,
    /// Live aggregates whose every event goes: kept, as a snapshot.
    pub streams_kept: i64,
    /// Aggregates no snapshot can stand for (their events do not fold); with `force`, their
    /// events before the cut-off go anyway.
    pub unfoldable_count: i64,
    /// Some of them.
    pub unfoldable_sample: Vec<Uuid>,
    /// event_streams rows deleted: deleted aggregates whose every event goes (and, forced,
    /// unfoldable ones).
    pub streams_deleted: i64,
    /// Cut-through streams whose first_timestamp moves to their oldest remaining event.
    pub streams_trimmed: i64,
    /// events_daily rows deleted (days before the cut-off).
    pub daily_rows_deleted: i64,
}

/// Store-wide numbers for `stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StoreStats {
    /// `timescaledb` or `native`.
    pub storage_mode: String,
    /// Events in events_v2.
    pub events: i64,
    /// Aggregates (event_streams rows).
    pub streams: i64,
    /// Oldest event (per event_streams).
    pub oldest: Option<DateTime<Utc>>,
    /// Newest event (per event_streams).
    pub newest: Option<DateTime<Utc>>,
    /// Native daily partitions, or TimescaleDB chunks.
    pub partitions: i64,
    /// Rows in the native default partition (0 on TimescaleDB).
    pub default_partition_rows: i64,
    /// Days waiting for the incremental analytics refresh.
    pub dirty_days: i64,
    /// Legacy migrations, one per legacy table.
    pub legacy_migrations: Vec<LegacyMigrationStatus>,
}

/// The bookkeeping of one legacy table's migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LegacyMigrationStatus {
    /// The legacy table.
    pub legacy_table: String,
    /// Rows migrated.
    pub migrated: i64,
    /// Rows that failed.
    pub failed: i64,
    /// Last batch.
    pub updated_at: DateTime<Utc>,
    /// When a run last reached the end of the table.
    pub finished_at: Option<DateTime<Utc>>,
}

const CUT_THROUGH_SQL: &str = "SELECT count(*), coalesce((array_agg(aggregate_id ORDER BY aggregate_id))[1:10], '{}')
  FROM event_streams WHERE first_timestamp < $1 AND last_timestamp >= $1";

/// Native daily partitions with their real upper bounds (not the day in their name: partitions
/// made by an older `synap_ensure_partitions` in a session with another DateStyle or TimeZone
/// may be off by hours). The bound is read back in this same session, so its text round-trips.
const PARTITIONS_SQL: &str = "SELECT c.relname::text,
        (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \\(''([^'']*)''\\)'))[1]::timestamptz
   FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
  WHERE i.inhparent = to_regclass('events_v2') AND c.relname ~ '^events_v2_p[0-9]{8}$' ORDER BY 1";

/// The schema TimescaleDB's functions live in, quoted for SQL: they are called qualified, so
/// they work whatever the search_path.
pub(crate) async fn timescaledb_schema<C: tokio_postgres::GenericClient>(client: &C) -> Result<String> {
    client
        .query_opt(
            "SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'timescaledb'",
            &[],
        )
        .await?
        .map(|r| r.get(0))
        .ok_or_else(|| Error::SchemaNotReady {
            message: "events_v2 is a hypertable but the timescaledb extension is gone".into(),
        })
}

async fn span<C: tokio_postgres::GenericClient>(
    client: &C,
    relation: &str,
    filter: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<(i64, Option<DateTime<Utc>>, Option<DateTime<Utc>>)> {
    let row = client
        .query_one(
            &format!("SELECT count(*), min(\"timestamp\"), max(\"timestamp\") FROM {relation} {filter}"),
            params,
        )
        .await?;
    Ok((row.get(0), row.get(1), row.get(2)))
}

impl EventRepository {
    /// Removes the events before `options.cutoff` (rounded down to a UTC midnight) by dropping
    /// whole chunks (TimescaleDB `drop_chunks`) or whole native daily partitions (DETACH + DROP).
    /// Rows of the native default partition before the cut-off are first moved into their days'
    /// partitions (`synap_ensure_partitions`), which are then dropped too.
    ///
    /// Aggregates stay whole: first, every aggregate with events before the cut-off is folded
    /// (default fold rules, from its newest snapshot) into a snapshot at its last version before
    /// the cut-off, and its stream's `retained_from` moves past it, so that
    /// [`EventRepository::replay`] returns the same state after the drop, and reads of removed
    /// versions fail with [`Error::HistoryRemoved`]. Deleted aggregates whose every event goes
    /// are removed entirely. All in one transaction, which holds back appends while it runs;
    /// events_daily and events_daily_dirty lose the days before the cut-off.
    ///
    /// Fails with [`Error::RetentionRefused`] when some aggregate's events do not fold (no
    /// snapshot can stand for them) and `options.force` is false (a dry run reports them
    /// instead); nothing changes then.
    pub async fn apply_retention(&self, options: &RetentionOptions) -> Result<RetentionReport> {
        self.refuse_scoped("apply_retention")?;
        let cutoff = midnight(options.cutoff.date_naive());
        let cutoff_day = cutoff.date_naive();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let mode: String = tx
            .query_one("SELECT value FROM synap_settings WHERE key = 'storage_mode'", &[])
            .await?
            .get(0);
        if !options.dry_run {
            // Appends wait, so no stream moves between the check and the drop. The locks are
            // taken in the order appends take theirs (event_streams, then events_v2), so an
            // append can never hold one while waiting for the other: it waits at the first.
            // Native mode needs the parent's ACCESS EXCLUSIVE for DETACH anyway.
            tx.batch_execute("LOCK TABLE event_streams IN EXCLUSIVE MODE").await?;
            if mode != "timescaledb" {
                tx.batch_execute("LOCK TABLE events_v2 IN ACCESS EXCLUSIVE MODE")
                    .await?;
            }
        }
        let cut = tx.query_one(CUT_THROUGH_SQL, &[&cutoff]).await?;
        // Every aggregate with events before the cut-off keeps its state as a snapshot at its
        // last version before it (written now, before the events go; counted in a dry run).
        let kept = keep_before_cutoff(&tx, cutoff, !options.dry_run, &self.config().upcasters).await?;
        let mut report = RetentionReport {
            storage_mode: mode.clone(),
            cutoff,
            dry_run: options.dry_run,
            targets: Vec::new(),
            rows: 0,
            cut_through_count: cut.get(0),
            cut_through_sample: cut.get(1),
            snapshots_stored: kept.snapshots,
            streams_kept: kept.whole_streams_kept,
            unfoldable_count: kept.unfoldable.len() as i64,
            unfoldable_sample: kept.unfoldable.iter().take(10).copied().collect(),
            streams_deleted: 0,
            streams_trimmed: 0,
            daily_rows_deleted: 0,
        };
        if !kept.unfoldable.is_empty() && !options.force && !options.dry_run {
            tx.rollback().await?;
            return Err(Error::RetentionRefused {
                cutoff: cutoff.to_rfc3339(),
                aggregates: report.unfoldable_count,
                sample: report.unfoldable_sample,
            });
        }
        // Streams that go entirely: deleted aggregates with nothing after the cut-off, and,
        // forced, unfoldable ones with nothing after it.
        let mut gone = kept.deleted_streams.clone();
        if options.force && !kept.unfoldable.is_empty() {
            let whole: Vec<Uuid> = tx
                .query(
                    "SELECT aggregate_id FROM event_streams WHERE aggregate_id = ANY($1) AND last_timestamp < $2",
                    &[&kept.unfoldable, &cutoff],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            gone.extend(whole);
        }

        if mode == "timescaledb" {
            let ts = timescaledb_schema(tx.client()).await?;
            // older_than is "any" in TimescaleDB's signature: the cast gives the parameter a type.
            let chunks = tx
                .query(
                    &format!(
                        "SELECT c::text FROM {ts}.show_chunks('events_v2'::regclass, older_than => $1::timestamptz) c"
                    ),
                    &[&cutoff],
                )
                .await?;
            for chunk in &chunks {
                // The name comes from the catalog, already quoted as regclass text.
                let name: String = chunk.get(0);
                let (rows, from, to) = span(tx.client(), &name, "", &[]).await?;
                report.targets.push(RetentionTarget {
                    name,
                    kind: "chunk".into(),
                    rows,
                    from,
                    to,
                });
            }
            if !options.dry_run && !chunks.is_empty() {
                tx.execute(
                    &format!("SELECT {ts}.drop_chunks('events_v2'::regclass, older_than => $1::timestamptz)"),
                    &[&cutoff],
                )
                .await?;
            }
        } else {
            let (default_rows, from, to) =
                span(tx.client(), "events_v2_default", "WHERE \"timestamp\" < $1", &[&cutoff]).await?;
            if default_rows > 0 {
                if options.dry_run {
                    report.targets.push(RetentionTarget {
                        name: "events_v2_default".into(),
                        kind: "default_rows".into(),
                        rows: default_rows,
                        from,
                        to,
                    });
                } else {
                    // Give each old day of the default partition its own partition (moving the
                    // rows), so it goes with a DROP like every other day.
                    tx.execute(
                        "SELECT synap_ensure_partitions(d, d) FROM (
                             SELECT DISTINCT (\"timestamp\" AT TIME ZONE 'UTC')::date AS d
                               FROM events_v2_default WHERE \"timestamp\" < $1) days",
                        &[&cutoff],
                    )
                    .await?;
                }
            }
            for row in tx.query(PARTITIONS_SQL, &[]).await? {
                let name: String = row.get(0);
                // Only a partition whose every instant is before the cut-off goes.
                match row.get::<_, Option<DateTime<Utc>>>(1) {
                    Some(upper) if upper <= cutoff => {}
                    _ => continue,
                }
                // `name` matched ^events_v2_p[0-9]{8}$, so it needs no quoting.
                let (rows, from, to) = span(tx.client(), &name, "", &[]).await?;
                if !options.dry_run {
                    // Two commands, not one string: Citus forwards a DDL command's text to the
                    // workers, and refuses a text that holds two.
                    tx.batch_execute(&format!("ALTER TABLE events_v2 DETACH PARTITION {name}"))
                        .await?;
                    tx.batch_execute(&format!("DROP TABLE {name}")).await?;
                }
                report.targets.push(RetentionTarget {
                    name,
                    kind: "partition".into(),
                    rows,
                    from,
                    to,
                });
            }
        }
        report.rows = report.targets.iter().map(|t| t.rows).sum();

        if options.dry_run {
            report.streams_deleted = gone.len() as i64;
            report.streams_trimmed = report.cut_through_count;
            report.daily_rows_deleted = tx
                .query_one("SELECT count(*) FROM events_daily WHERE day < $1", &[&cutoff_day])
                .await?
                .get(0);
            tx.rollback().await?;
            return Ok(report);
        }
        report.streams_deleted = tx
            .execute("DELETE FROM event_streams WHERE aggregate_id = ANY($1)", &[&gone])
            .await? as i64;
        tx.execute("DELETE FROM event_snapshots WHERE aggregate_id = ANY($1)", &[&gone])
            .await?;
        report.streams_trimmed = tx
            .execute(
                "UPDATE event_streams s
                    SET first_timestamp = coalesce(
                        (SELECT min(e.\"timestamp\") FROM events_v2 e
                          WHERE e.aggregate_id = s.aggregate_id
                            AND e.\"timestamp\" >= $1 AND e.\"timestamp\" <= s.last_timestamp), $1)
                  WHERE s.first_timestamp < $1 AND s.last_timestamp >= $1",
                &[&cutoff],
            )
            .await? as i64;
        report.daily_rows_deleted = tx
            .execute("DELETE FROM events_daily WHERE day < $1", &[&cutoff_day])
            .await? as i64;
        tx.execute("DELETE FROM events_daily_dirty WHERE day < $1", &[&cutoff_day])
            .await?;
        tx.commit().await?;
        Ok(report)
    }

    /// Store-wide numbers: events, streams, time span, partitions or chunks, analytics backlog
    /// and legacy migration bookkeeping. Counts are exact (they scan).
    pub async fn stats(&self) -> Result<StoreStats> {
        self.refuse_scoped("stats")?;
        let mut client = self.client().await?;
        // One snapshot of the store (and one transaction through a pooler).
        let tx = client
            .transaction_with(tokio_postgres::IsolationLevel::RepeatableRead, true)
            .await?;
        let mode: String = tx
            .query_one("SELECT value FROM synap_settings WHERE key = 'storage_mode'", &[])
            .await?
            .get(0);
        let row = tx
            .query_one(
                "SELECT (SELECT count(*) FROM events_v2), (SELECT count(*) FROM event_streams),
                        (SELECT min(first_timestamp) FROM event_streams), (SELECT max(last_timestamp) FROM event_streams),
                        (SELECT count(*) FROM events_daily_dirty)",
                &[],
            )
            .await?;
        let (partitions, default_rows): (i64, i64) = if mode == "timescaledb" {
            let n: i64 = tx
                .query_one(
                    &format!(
                        "SELECT count(*) FROM {}.show_chunks('events_v2'::regclass)",
                        timescaledb_schema(tx.client()).await?
                    ),
                    &[],
                )
                .await?
                .get(0);
            (n, 0)
        } else {
            let n = tx.query(PARTITIONS_SQL, &[]).await?.len() as i64;
            let d: i64 = tx
                .query_one("SELECT count(*) FROM events_v2_default", &[])
                .await?
                .get(0);
            (n, d)
        };
        let legacy = tx
            .query(
                "SELECT legacy_table, migrated, failed, updated_at, finished_at FROM legacy_migration_runs ORDER BY 1",
                &[],
            )
            .await?;
        tx.commit().await?;
        Ok(StoreStats {
            storage_mode: mode,
            events: row.get(0),
            streams: row.get(1),
            oldest: row.get(2),
            newest: row.get(3),
            partitions,
            default_partition_rows: default_rows,
            dirty_days: row.get(4),
            legacy_migrations: legacy
                .iter()
                .map(|r| LegacyMigrationStatus {
                    legacy_table: r.get(0),
                    migrated: r.get(1),
                    failed: r.get(2),
                    updated_at: r.get(3),
                    finished_at: r.get(4),
                })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn ages_parse_and_cut_at_midnight() {
        let now = Utc.with_ymd_and_hms(2024, 3, 10, 15, 30, 0).unwrap();
        assert_eq!(
            RetentionAge::parse("90d").unwrap().cutoff(now).unwrap(),
            Utc.with_ymd_and_hms(2023, 12, 11, 0, 0, 0).unwrap()
        );
        assert_eq!(
            RetentionAge::parse("2w").unwrap().cutoff(now).unwrap(),
            Utc.with_ymd_and_hms(2024, 2, 25, 0, 0, 0).unwrap()
        );
        assert_eq!(
            RetentionAge::parse("2y").unwrap().cutoff(now).unwrap(),
            Utc.with_ymd_and_hms(2022, 3, 10, 0, 0, 0).unwrap()
        );
        for bad in [
            "", "d", "0d", "-3d", "12", "3m", "1.5y", "10 d", "9é", "é", "日", "90d✓", "９０d",
        ] {
            assert_eq!(RetentionAge::parse(bad).unwrap_err().code(), "INVALID_CONFIG", "{bad}");
        }
    }
}
