//! The switch-over from the legacy `events` table: copying its rows into events_v2 exactly once,
//! verifying both tables agree, and dropping the legacy table.
//!
//! The legacy table has `id uuid primary key, user_id text, timestamp timestamptz, type text,
//! data jsonb, source text, correlation_id uuid`. Each copied row gets a `legacy_migration_map`
//! row in the same transaction as its event, which is what makes a re-run or a resume after a
//! crash copy nothing twice.
//!
//! Rooms: this file holds the copy's options, reports and entry point (`migrate_legacy_events`)
//! and what identifies a run (its table key, its client name); [`copy`] the run itself (locks,
//! the reader loop); [`rows`] a legacy row and its checks; [`writers`] the batches, failures and
//! progress; [`verify`] compares the two tables; [`drop`] verifies under a lock and drops the
//! legacy table. Dual-write is a form of the append statement (`with_dual_write` in
//! `crate::db::repository`).

mod copy;
mod drop;
mod rows;
mod verify;
mod writers;

pub use drop::DropLegacyReport;
pub use verify::{CountDifference, Mismatch, VerifyReport};

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::types::ToSql;
use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::db::json::RawJsonb;
use crate::db::repository::EventRepository;
use crate::db::sql::{feed_days_ctes, feed_days_mark, quote_table, stream_guard_ctes};
use crate::error::{Error, Result};
use crate::model::AggregateType;
use crate::validate::{self, Limits};
use copy::*;
use rows::*;
use writers::*;

/// The legacy table's default name.
pub const DEFAULT_LEGACY_TABLE: &str = "events";

/// Writers of a migration unless told otherwise.
pub const DEFAULT_WRITERS: usize = 2;

/// At most this many failed rows, missing ids or mismatches are listed in a report (all are
/// counted).
pub const MAX_LISTED: usize = 100;

/// What to do with a legacy row that cannot become an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnInvalid {
    /// Record it in `legacy_migration_failures`, report it, and go on (the default).
    #[default]
    Skip,
    /// Stop before it: the rows before it are migrated, it and the rows after it are not, and it
    /// is not recorded, so a resume after fixing it migrates it in order.
    Fail,
}

impl OnInvalid {
    /// Parses `skip` or `fail`.
    ///
    /// Fails with [`Error::InvalidConfig`] for anything else.
    pub fn parse(s: &str) -> Result<OnInvalid> {
        match s {
            "skip" => Ok(OnInvalid::Skip),
            "fail" => Ok(OnInvalid::Fail),
            other => Err(Error::InvalidConfig {
                message: format!("on-invalid must be skip or fail, not \"{other}\""),
            }),
        }
    }
}

/// Options of [`EventRepository::migrate_legacy_events`].
#[derive(Debug, Clone)]
pub struct LegacyMigrationOptions {
    /// The legacy table. Default `events`.
    pub legacy_table: String,
    /// Rows per transaction. Default 5,000.
    pub batch_size: usize,
    /// Connections writing batches at once, each for its own share of the aggregates (by a hash
    /// of the aggregate id), so each aggregate's rows still go in one after another. Default 2;
    /// between 1 and 16. A dry run, and a run with [`OnInvalid::Fail`] (which must stop at the
    /// first bad row in the table's order), use one.
    pub writers: usize,
    /// Process at most this many rows in this run. Default: all.
    pub limit: Option<u64>,
    /// Read and check the rows, write nothing.
    pub dry_run: bool,
    /// Continue a migration of this table that already ran (fully or in part). Without it such
    /// a run fails with [`Error::LegacyMigrationStarted`].
    pub resume: bool,
    /// Skip (default) or stop at rows that cannot be migrated.
    pub on_invalid: OnInvalid,
    /// A pause after each batch, to throttle a migration on a busy database (and for tests).
    pub batch_delay: Option<Duration>,
    /// How long to wait for another backend's migration lock of the same table before failing
    /// with [`Error::LegacyMigrationBusy`]. A killed run's backend keeps the lock until its last
    /// statement ends. Default 30 s.
    pub busy_timeout: Duration,
}

impl Default for LegacyMigrationOptions {
    fn default() -> Self {
        LegacyMigrationOptions {
            legacy_table: DEFAULT_LEGACY_TABLE.to_owned(),
            batch_size: 5000,
            writers: DEFAULT_WRITERS,
            limit: None,
            dry_run: false,
            resume: false,
            on_invalid: OnInvalid::Skip,
            batch_delay: None,
            busy_timeout: Duration::from_secs(30),
        }
    }
}

impl LegacyMigrationOptions {
    /// The options as JavaScript passes them (`legacyTable`, `batchSize`, `writers`, `limit`,
    /// `dryRun`, `resume`, `onInvalid`; `null` or absent keys keep the defaults).
    ///
    /// Fails with [`Error::InvalidConfig`] for a value of the wrong type or below its least
    /// value, and [`Error::Validation`] for a number that is not whole or a key that is not an
    /// option (`UNKNOWN_OPTION`); upper bounds are checked when the migration starts.
    pub fn from_json(value: &serde_json::Value) -> Result<LegacyMigrationOptions> {
        let mut opts = LegacyMigrationOptions::default();
        let o = match value {
            serde_json::Value::Null => return Ok(opts),
            serde_json::Value::Object(o) => o,
            _ => {
                return Err(Error::InvalidConfig {
                    message: "options must be an object".into(),
                })
            }
        };
        crate::query::Options::of(
            value,
            &[
                "legacyTable",
                "batchSize",
                "writers",
                "limit",
                "dryRun",
                "resume",
                "onInvalid",
            ],
        )?;
        let wrong = |field: &str, expected: &str| Error::InvalidConfig {
            message: format!("{field} must be {expected}"),
        };
        let get = |field: &str| crate::query::present(o, field);
        // A whole number of at least `min`.
        let count = |field: &str, min: i64| -> Result<Option<i64>> {
            let Some(v) = get(field) else { return Ok(None) };
            let n = crate::query::whole_number_arg(field, v.as_f64().ok_or_else(|| wrong(field, "a number"))?)?;
            if n < min {
                return Err(Error::InvalidConfig {
                    message: format!("{field} must be at least {min}, not {n}"),
                });
            }
            Ok(Some(n))
        };
        let flag = |field: &str| -> Result<bool> {
            get(field).map_or(Ok(false), |v| v.as_bool().ok_or_else(|| wrong(field, "true or false")))
        };
        if let Some(t) = get("legacyTable") {
            opts.legacy_table = t.as_str().ok_or_else(|| wrong("legacyTable", "a string"))?.to_owned();
        }
        if let Some(n) = count("batchSize", 1)? {
            opts.batch_size = usize::try_from(n).unwrap_or(usize::MAX);
        }
        if let Some(n) = count("writers", 1)? {
            opts.writers = usize::try_from(n).unwrap_or(usize::MAX);
        }
        opts.limit = count("limit", 0)?.map(|n| n as u64);
        opts.dry_run = flag("dryRun")?;
        opts.resume = flag("resume")?;
        if let Some(mode) = get("onInvalid") {
            opts.on_invalid = OnInvalid::parse(mode.as_str().ok_or_else(|| wrong("onInvalid", "skip or fail"))?)?;
        }
        Ok(opts)
    }
}

/// Where a running migration is, passed to the progress callback after every batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LegacyMigrationProgress {
    /// Rows this run will look at (pending rows, capped by the limit).
    pub total: u64,
    /// Rows looked at so far.
    pub processed: u64,
    /// Rows migrated so far (would be, in a dry run).
    pub migrated: u64,
    /// Rows that could not be migrated so far.
    pub failed: u64,
}

/// A legacy row that could not be migrated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LegacyRowFailure {
    /// The legacy row's id.
    pub legacy_id: Uuid,
    /// A stable code: a validation code (`INVALID_EVENT_TYPE`, `INVALID_DATA`, `REQUIRED`,
    /// `INEXACT_NUMBER`, ...).
    pub reason_code: String,
    /// A sentence for people.
    pub reason: String,
}

/// What [`EventRepository::migrate_legacy_events`] did.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LegacyMigrationReport {
    /// The legacy table.
    pub legacy_table: String,
    /// Whether this was a dry run (nothing written).
    pub dry_run: bool,
    /// Rows neither migrated nor recorded as failed when the run started.
    pub pending_at_start: u64,
    /// Rows migrated by earlier runs (and dual-written rows) when this run started.
    pub previously_migrated: u64,
    /// Rows recorded as failed by earlier runs; they are not retried.
    pub previously_failed: u64,
    /// Rows this run looked at.
    pub processed: u64,
    /// Rows this run migrated (would migrate, in a dry run).
    pub migrated: u64,
    /// Rows this run could not migrate.
    pub failed: u64,
    /// Transactions committed.
    pub batches: u64,
    /// The failed rows (at most [`MAX_LISTED`]; `failed` counts all).
    pub failures: Vec<LegacyRowFailure>,
    /// True when `on_invalid` was `fail` and the run stopped at an invalid row (the first of
    /// `failures`).
    pub stopped_on_invalid: bool,
    /// Rows left after this run (pending at start minus processed, plus a stopped-on row).
    pub remaining: u64,
    /// Wall time of the run.
    pub elapsed_ms: u64,
    /// Processed rows per second.
    pub events_per_second: f64,
    /// migrated / (migrated + failed), in percent; 100 when nothing was processed.
    pub success_rate: f64,
}

/// Makes `client` one of a run's writers: named as the run's connections are (so that a later
/// run can end them when this process is gone), and holding the writers' lock in share mode.
async fn enlist(client: &tokio_postgres::Client, table: &str) -> Result<()> {
    client
        .execute(
            "SELECT set_config('application_name', $1, false)",
            &[&migration_client_name()],
        )
        .await?;
    client.execute(WRITER_SHARED_SQL, &[&table]).await?;
    Ok(())
}

/// The application name a migration's connection carries: this process and host, so that a
/// later run can prove that the process is gone.
fn migration_client_name() -> String {
    format!(
        "synap-events migrate-events pid={} host={}",
        std::process::id(),
        host_name()
    )
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// Whether a lock holder named `name` is a migration started by a process of this host that no
/// longer exists (Linux: no `/proc/<pid>`): its backend is an orphan finishing its last statement.
fn orphaned_here(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("synap-events migrate-events pid=") else {
        return false;
    };
    let Some((pid, host)) = rest.split_once(" host=") else {
        return false;
    };
    let here = host_name();
    // The server keeps 63 bytes of an application name: a long host name arrives cut short.
    let same_host = host == here || (name.len() >= 63 && !host.is_empty() && here.starts_with(host));
    !here.is_empty()
        && same_host
        && pid.parse::<u32>().is_ok_and(|p| p != std::process::id())
        && std::path::Path::new("/proc/self").exists()
        && !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The legacy table's key in the bookkeeping tables: its schema-qualified name, however it was
/// spelt (`events` and `public.events` are one table).
///
/// Fails with [`Error::LegacyTableNotFound`] when there is no such table.
async fn table_key<C: GenericClient>(client: &C, name: &str) -> Result<String> {
    client
        .query_one("SELECT synap_legacy_table_key(to_regclass($1))", &[&name])
        .await?
        .get::<_, Option<String>>(0)
        .ok_or_else(|| Error::LegacyTableNotFound { table: name.to_owned() })
}

/// The aggregate type a legacy event type implies: its first segment when that is relation,
/// user or system, else entity.
pub fn infer_aggregate_type(event_type: &str) -> AggregateType {
    match event_type.split('.').next() {
        Some("relation") => AggregateType::Relation,
        Some("user") => AggregateType::User,
        Some("system") => AggregateType::System,
        _ => AggregateType::Entity,
    }
}

impl EventRepository {
    /// Copies the legacy table's rows into events_v2, in batches of one transaction each, in
    /// (timestamp, id) order. Each row becomes an event of aggregate `data.entityId` (when that
    /// is a UUID, else the row's id) whose version continues after the aggregate's version in
    /// `event_streams`; timestamp, user id, type, data and correlation id are kept, source becomes
    /// `migration` and metadata holds `{"legacyId", "legacySource"}`. Rows already copied (or
    /// dual-written) and rows recorded as failed are passed over, so the call can be repeated or
    /// resumed after a crash without copying anything twice. `progress` is called after every
    /// batch.
    ///
    /// Fails with [`Error::LegacyTableNotFound`], [`Error::InvalidConfig`] (bad table name or
    /// columns, batch size 0), [`Error::LegacyMigrationBusy`] when another process migrates the
    /// same table, [`Error::LegacyMigrationStarted`] when an earlier run exists and
    /// `options.resume` is false, and database errors; batches committed before an error stay.
    pub async fn migrate_legacy_events(
        &self,
        options: &LegacyMigrationOptions,
        progress: &mut (dyn FnMut(&LegacyMigrationProgress) + Send),
    ) -> Result<LegacyMigrationReport> {
        self.refuse_scoped("migrate_legacy_events")?;
        self.refuse_pooled("migrate_legacy_events")?;
        let legacy = quote_table(&options.legacy_table)?;
        if options.batch_size == 0 || options.batch_size > 100_000 {
            return Err(Error::InvalidConfig {
                message: format!("batch size must be between 1 and 100000, not {}", options.batch_size),
            });
        }
        if options.writers == 0 || options.writers > 16 {
            return Err(Error::InvalidConfig {
                message: format!("writers must be between 1 and 16, not {}", options.writers),
            });
        }
        let started = Instant::now();
        // The connections leave the pool: they close when the run ends, which also releases the
        // session advisory locks even when the run fails half way.
        let mut reader = deadpool_postgres::Object::take(self.object().await?);
        let writer = deadpool_postgres::Object::take(self.object().await?);
        check_legacy_table(&*reader, &options.legacy_table).await?;
        let key = table_key(&*reader, &options.legacy_table).await?;
        let table = key.as_str();
        let mut writers = vec![writer];
        if options.dry_run {
            return self
                .run_migration(&mut reader, &mut writers, &legacy, table, options, progress, started)
                .await;
        }
        self.take_migration_lock(&writers[0], table, options.busy_timeout)
            .await?;
        let result = match options.resume {
            false => match writers[0]
                .query_opt(
                    "SELECT migrated + failed FROM legacy_migration_runs WHERE legacy_table = $1",
                    &[&table],
                )
                .await
            {
                Ok(Some(row)) => Err(Error::LegacyMigrationStarted {
                    table: table.to_owned(),
                    migrated: row.get(0),
                }),
                Ok(None) => Ok(()),
                Err(e) => Err(e.into()),
            },
            true => Ok(()),
        };
        let result = match result {
            Ok(()) => match writers[0].execute(START_RUN_SQL, &[&table]).await {
                Ok(_) => self.open_writers(&mut writers, &reader, table, options).await,
                Err(e) => Err(e.into()),
            },
            Err(e) => Err(e),
        };
        let result = match result {
            Ok(()) => {
                self.run_migration(&mut reader, &mut writers, &legacy, table, options, progress, started)
                    .await
            }
            Err(e) => Err(e),
        };
        // Released explicitly: the connection's close is noticed by the server asynchronously.
        let _ = writers[0].execute(UNLOCK_SQL, &[&table]).await;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readable_timestamps_end_at_the_stores_end_of_time() {
        assert_eq!(
            readable_timestamp("l"),
            "isfinite(l.\"timestamp\") AND l.\"timestamp\" < '262142-12-31 23:59:59.999999+00'"
        );
    }

    #[test]
    fn writers_share_the_aggregates_evenly() {
        let row = |id: Uuid, entity: Option<String>| LegacyRow {
            id,
            timestamp: None,
            timestamp_out_of_range: false,
            user_id: None,
            event_type: None,
            entity_id: entity,
            data: None,
            source: None,
            correlation_id: None,
        };
        // Random (v4-shaped) ids from a fixed sequence.
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut random = move || {
            let mut bytes = [0u8; 16];
            for half in bytes.chunks_mut(8) {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                half.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
            }
            uuid::Builder::from_random_bytes(bytes).into_uuid()
        };
        for lanes in [2, 3, 4] {
            let mut counts = vec![0usize; lanes];
            for i in 0..6000u128 {
                // Random ids, and sequential ones with structure in the low bits only.
                let id = if i % 2 == 0 { random() } else { Uuid::from_u128(i) };
                counts[writer_of(&row(id, None), lanes)] += 1;
            }
            let fair = 6000 / lanes;
            assert!(
                counts.iter().all(|&c| c > fair * 8 / 10 && c < fair * 12 / 10),
                "{lanes} writers: {counts:?}"
            );
        }
        // The entity id decides, as for the aggregate.
        let entity = random();
        let a = writer_of(&row(random(), Some(entity.to_string())), 4);
        assert!((0..50).all(|_| writer_of(&row(random(), Some(entity.to_string())), 4) == a));
        assert_eq!(writer_of(&row(entity, None), 4), a);
    }

    #[test]
    fn aggregate_type_comes_from_the_first_segment() {
        assert_eq!(infer_aggregate_type("relation.created"), AggregateType::Relation);
        assert_eq!(infer_aggregate_type("user.renamed"), AggregateType::User);
        assert_eq!(infer_aggregate_type("system.booted"), AggregateType::System);
        assert_eq!(infer_aggregate_type("task.done"), AggregateType::Entity);
        assert_eq!(infer_aggregate_type("entity.created"), AggregateType::Entity);
    }
}
