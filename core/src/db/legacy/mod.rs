//! The switch-over from the legacy `events` table: copying its rows into events_v2 exactly once,
//! verifying both tables agree, and dropping the legacy table.
//!
//! The legacy table has `id uuid primary key, user_id text, timestamp timestamptz, type text,
//! data jsonb, source text, correlation_id uuid`. Each copied row gets a `legacy_migration_map`
//! row in the same transaction as its event, which is what makes a re-run or a resume after a
//! crash copy nothing twice.
//!
//! Rooms: this file holds the copy (options, the reader, the writers, locks and progress);
//! [`verify`] compares the two tables; [`drop`] verifies under a lock and drops the legacy table.
//! Dual-write is a form of the append statement (`with_dual_write` in `crate::db::repository`).

mod drop;
mod verify;

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

/// One legacy row as read by the migration (everything but `data`, which stays on the server).
struct LegacyRow {
    id: Uuid,
    /// `None` when NULL or out of range (see `timestamp_out_of_range`).
    timestamp: Option<DateTime<Utc>>,
    /// The row's timestamp is `infinity`, `-infinity` or past the latest time the store holds
    /// ([`readable_timestamp`]).
    timestamp_out_of_range: bool,
    user_id: Option<String>,
    event_type: Option<String>,
    entity_id: Option<String>,
    data: Option<RawJsonb>,
    source: Option<String>,
    correlation_id: Option<Uuid>,
}

/// The aggregate of a row: `data.entityId` when that is a UUID, else the row's own id.
fn aggregate_of(row: &LegacyRow) -> Uuid {
    row.entity_id
        .as_deref()
        .and_then(|s| Uuid::try_parse(s).ok())
        .unwrap_or(row.id)
}

/// The writer (of `lanes`) of a row's aggregate, the one [`check_row`] gives it when the row
/// is valid: all rows of an aggregate go through one writer, in order.
fn writer_of(row: &LegacyRow, lanes: usize) -> usize {
    if lanes == 1 {
        return 0;
    }
    // A fixed mix of all 128 bits: ids with structure in some bits still spread.
    let n = aggregate_of(row).as_u128();
    let mixed = ((n >> 64) as u64 ^ n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((mixed >> 32) % lanes as u64) as usize
}

/// A row that passed the static checks.
struct Candidate {
    aggregate_id: Uuid,
    aggregate_type: AggregateType,
}

const LEGACY_COLUMNS: [(&str, &[&str]); 7] = [
    ("id", &["uuid"]),
    ("user_id", &["text", "character varying"]),
    ("timestamp", &["timestamp with time zone"]),
    ("type", &["text", "character varying"]),
    ("data", &["jsonb"]),
    ("source", &["text", "character varying"]),
    ("correlation_id", &["uuid"]),
];

/// Fails with [`Error::LegacyTableNotFound`] or, for missing or mistyped columns,
/// [`Error::InvalidConfig`].
async fn check_legacy_table<C: GenericClient>(client: &C, name: &str) -> Result<()> {
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
        .await?
        .get(0);
    if !exists {
        return Err(Error::LegacyTableNotFound { table: name.to_owned() });
    }
    // The type without its modifier (`varchar(255)` and `timestamptz(3)` are what they modify;
    // `uuid[]` is not `uuid`).
    let rows = client
        .query(
            "SELECT attname::text, format_type(atttypid, NULL) FROM pg_attribute \
             WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
            &[&name],
        )
        .await?;
    let columns: HashMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    for (column, types) in LEGACY_COLUMNS {
        match columns.get(column) {
            None => {
                return Err(Error::InvalidConfig {
                    message: format!("legacy table \"{name}\" has no column {column}"),
                })
            }
            Some(t) if !types.contains(&t.as_str()) => {
                return Err(Error::InvalidConfig {
                    message: format!("legacy table \"{name}\": column {column} is {t}, expected {}", types[0]),
                })
            }
            Some(_) => {}
        }
    }
    // Each row is known by its id (the map's and the failures' key): a table whose constraints
    // let ids be missing or repeated is checked row by row.
    let legacy = quote_table(name)?;
    let guarded = client
        .query_one(
            "SELECT a.attnotnull,
                    EXISTS (SELECT 1 FROM pg_index i
                             WHERE i.indrelid = a.attrelid AND i.indisunique AND i.indpred IS NULL
                               AND i.indkey::int2[] = ARRAY[a.attnum])
               FROM pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attname = 'id'",
            &[&name],
        )
        .await?;
    let (not_null, unique): (bool, bool) = (guarded.get(0), guarded.get(1));
    if !not_null {
        let missing: i64 = client
            .query_one(&format!("SELECT count(*) FROM {legacy} WHERE id IS NULL"), &[])
            .await?
            .get(0);
        if missing > 0 {
            return Err(Error::InvalidConfig {
                message: format!(
                    "legacy table \"{name}\": {missing} row(s) have no id; the migration knows each row by its \
                     id, so give them one or delete them"
                ),
            });
        }
    }
    if !unique {
        let repeated: Vec<Uuid> = client
            .query(
                &format!(
                    "SELECT id FROM {legacy} WHERE id IS NOT NULL GROUP BY id HAVING count(*) > 1 ORDER BY id LIMIT 3"
                ),
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !repeated.is_empty() {
            let ids: Vec<String> = repeated.iter().map(Uuid::to_string).collect();
            return Err(Error::InvalidConfig {
                message: format!(
                    "legacy table \"{name}\": ids are repeated ({}); the migration knows each row by its id, so \
                     make them unique",
                    ids.join(", ")
                ),
            });
        }
    }
    Ok(())
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

/// A row older than its aggregate's newest event: appending it would number it after events that
/// happened later.
fn out_of_order(row: &LegacyRow, aggregate: Uuid, newest: DateTime<Utc>) -> LegacyRowFailure {
    failure(
        row,
        "OUT_OF_ORDER",
        format!(
            "aggregate {aggregate} already has an event at {} after this row's time {}: appended, it would \
             put versions out of time order",
            newest.to_rfc3339(),
            row.timestamp.map_or("-".into(), |t| t.to_rfc3339())
        ),
    )
}

fn failure(row: &LegacyRow, code: &str, reason: impl Into<String>) -> LegacyRowFailure {
    LegacyRowFailure {
        legacy_id: row.id,
        reason_code: code.to_owned(),
        reason: reason.into(),
    }
}

/// The checks that need nothing but the row itself.
fn check_row(row: &LegacyRow, limits: &Limits) -> std::result::Result<Candidate, LegacyRowFailure> {
    let issue = |i: validate::Issue| failure(row, i.code.as_str(), i.message);
    if row.timestamp_out_of_range {
        return Err(failure(
            row,
            "INVALID_TIMESTAMP",
            "timestamp is infinite or past 262142-12-31T23:59:59.999998Z, so it could not be read back",
        ));
    }
    if row.timestamp.is_none() {
        return Err(failure(row, "REQUIRED", "timestamp is null"));
    }
    let Some(event_type) = &row.event_type else {
        return Err(failure(row, "REQUIRED", "type is null"));
    };
    validate::check_event_type(event_type, limits).map_err(issue)?;
    let Some(user_id) = &row.user_id else {
        return Err(failure(row, "REQUIRED", "user_id is null"));
    };
    validate::check_user_id(user_id, limits).map_err(issue)?;
    let Some(data) = &row.data else {
        return Err(failure(row, "REQUIRED", "data is null"));
    };
    match data.kind() {
        "object" => {}
        kind => {
            return Err(failure(
                row,
                "INVALID_DATA",
                format!("data must be a JSON object, not {kind}"),
            ))
        }
    }
    if crate::numbers::text_depth(&data.0) > validate::MAX_JSON_DEPTH {
        return Err(failure(
            row,
            "TOO_DEEP",
            format!(
                "data nests arrays and objects deeper than {} levels, which no reader could parse back",
                validate::MAX_JSON_DEPTH
            ),
        ));
    }
    if !crate::numbers::all_number_tokens(&data.0, crate::numbers::number_text_is_carried) {
        return Err(failure(
            row,
            "INEXACT_NUMBER",
            "data holds a number that a JavaScript number cannot hold exactly (beyond 2^53 or a double's \
             range, or more digits than a double keeps), so it would read back changed",
        ));
    }
    let bytes = data.0.len();
    if bytes > limits.max_data_bytes {
        return Err(failure(
            row,
            "TOO_LARGE",
            format!("data is {bytes} bytes as JSON; the limit is {}", limits.max_data_bytes),
        ));
    }
    if row.source.as_deref().is_some_and(|s| s.contains('\0')) {
        return Err(failure(row, "NUL_CHARACTER", "source contains U+0000"));
    }
    let aggregate_id = aggregate_of(row);
    Ok(Candidate {
        aggregate_id,
        aggregate_type: infer_aggregate_type(event_type),
    })
}

const PENDING_FILTER: &str =
    "NOT EXISTS (SELECT 1 FROM legacy_migration_map m WHERE m.legacy_table = $1 AND m.legacy_id = l.id)
   AND NOT EXISTS (SELECT 1 FROM legacy_migration_failures f WHERE f.legacy_table = $1 AND f.legacy_id = l.id)";

/// SQL that is true when `{alias}."timestamp"` is neither NULL, `infinity` nor `-infinity`, and
/// before the store's end of time (`validate::end_of_time`; the earliest timestamp PostgreSQL
/// stores is readable).
fn readable_timestamp(alias: &str) -> String {
    use chrono::{Datelike, Timelike};
    let end = crate::validate::end_of_time();
    format!(
        "isfinite({alias}.\"timestamp\") AND {alias}.\"timestamp\" < '{}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}+00'",
        end.year(),
        end.month(),
        end.day(),
        end.hour(),
        end.minute(),
        end.second(),
        end.timestamp_subsec_micros()
    )
}

/// One batch in one statement over arrays: the stream guards (created for new aggregates,
/// advanced from exactly first_version - 1 for known ones, as in the repository's batch
/// append), the events, the dirty days and the map rows. Nothing is inserted unless every guard
/// passed.
const BATCH_SQL: &str = concat!(
    r#"
WITH src AS (
    SELECT u.* FROM unnest($1::uuid[], $2::uuid[], $3::timestamptz[], $4::uuid[], $5::text[], $6::text[], $7::text[],
                           $8::integer[], $9::uuid[], $10::text[], $17::jsonb[])
           WITH ORDINALITY AS u(legacy_id, event_id, ts, aggregate_id, aggregate_type, event_type, user_id,
                                version, correlation_id, legacy_source, data, ord)
), req AS (
    SELECT * FROM unnest($11::uuid[], $12::text[], $13::text[], $14::integer[], $15::integer[], $18::timestamptz[],
                         $19::timestamptz[])
           AS r(aggregate_id, aggregate_type, user_id, first_version, last_version, first_ts, last_ts)
), "#,
    stream_guard_ctes!("ON CONFLICT (aggregate_id) DO NOTHING"),
    r#", passed AS (
    SELECT (SELECT count(*) FROM created) + (SELECT count(*) FROM advanced) = cardinality($11::uuid[]) AS ok
), inserted AS (
    INSERT INTO events_v2 (id, "timestamp", aggregate_id, aggregate_type, event_type, user_id, data, metadata,
                           version, causation_id, correlation_id, source)
    SELECT event_id, ts, aggregate_id, aggregate_type, event_type, user_id, data,
           jsonb_build_object('legacyId', legacy_id, 'legacySource', legacy_source),
           version, NULL, correlation_id, 'migration'
      FROM src
     WHERE (SELECT ok FROM passed)
       AND "#,
    feed_days_mark!(),
    r#"
     ORDER BY ord
    RETURNING "timestamp"
), dirty AS (
    INSERT INTO events_daily_dirty (day)
    SELECT DISTINCT ("timestamp" AT TIME ZONE 'UTC')::date FROM inserted ORDER BY 1
    ON CONFLICT (day) DO NOTHING
), "#,
    feed_days_ctes!(),
    r#", ids AS (
    INSERT INTO events_v2_ids (id, aggregate_id, version, user_id)
    SELECT event_id, aggregate_id, version, user_id FROM src WHERE (SELECT ok FROM passed)
), mapped AS (
    INSERT INTO legacy_migration_map (legacy_table, legacy_id, event_id, aggregate_id, version, origin)
    SELECT $16, legacy_id, event_id, aggregate_id, version, 'migration' FROM src WHERE (SELECT ok FROM passed)
)
SELECT (SELECT ok FROM passed), (SELECT count(*) FROM inserted)
"#
);

/// The migration lock of one legacy table, keyed by its schema-qualified name.
const LOCK_SQL: &str = "SELECT pg_try_advisory_lock(hashtext('synap.legacy_migration'), hashtext($1))";
const UNLOCK_SQL: &str = "SELECT pg_advisory_unlock(hashtext('synap.legacy_migration'), hashtext($1))";
const MIGRATION_LOCK_CLASS: &str = "synap.legacy_migration";

/// Held in share mode by each writer connection of a run for its whole session; a new run takes
/// it exclusively (and lets go at once) to know that every writer of an earlier run is gone.
const WRITERS_TRY_SQL: &str = "SELECT pg_try_advisory_lock(hashtext('synap.legacy_migration_writers'), hashtext($1))";
const WRITERS_UNLOCK_SQL: &str = "SELECT pg_advisory_unlock(hashtext('synap.legacy_migration_writers'), hashtext($1))";
const WRITER_SHARED_SQL: &str =
    "SELECT pg_advisory_lock_shared(hashtext('synap.legacy_migration_writers'), hashtext($1))";
const WRITERS_LOCK_CLASS: &str = "synap.legacy_migration_writers";

const RECORD_FAILURES_SQL: &str = "INSERT INTO legacy_migration_failures (legacy_table, legacy_id, reason_code, reason)
SELECT $1, * FROM unnest($2::uuid[], $3::text[], $4::text[])
ON CONFLICT (legacy_table, legacy_id) DO NOTHING";

/// A run's row, made (and its counts taken from the map and the failures, which are exact even
/// when a killed run did not record its last round) before its first batch.
const START_RUN_SQL: &str = "INSERT INTO legacy_migration_runs (legacy_table, migrated, failed)
VALUES ($1, (SELECT count(*) FROM legacy_migration_map WHERE legacy_table = $1 AND origin = 'migration'),
        (SELECT count(*) FROM legacy_migration_failures WHERE legacy_table = $1))
ON CONFLICT (legacy_table) DO UPDATE
   SET migrated = EXCLUDED.migrated, failed = EXCLUDED.failed, updated_at = now(), finished_at = NULL";

const RECORD_PROGRESS_SQL: &str =
    "INSERT INTO legacy_migration_runs (legacy_table, migrated, failed, last_timestamp, last_id)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (legacy_table) DO UPDATE
   SET migrated = legacy_migration_runs.migrated + EXCLUDED.migrated,
       failed = legacy_migration_runs.failed + EXCLUDED.failed,
       last_timestamp = coalesce(EXCLUDED.last_timestamp, legacy_migration_runs.last_timestamp),
       last_id = coalesce(EXCLUDED.last_id, legacy_migration_runs.last_id),
       updated_at = now(),
       finished_at = NULL";

/// TimescaleDB creates a chunk inside the inserting transaction and keeps the hypertable's
/// chunk-creation lock until that transaction ends, so writers that each create chunks take
/// turns (two writers over a year of legacy rows: 33.5 s against 24 s). A run creates the chunks
/// of its days first, a few dozen days per short transaction, by inserting a placeholder row per
/// day and deleting it before the commit: no event, feed entry or wake-up is left behind, and the
/// chunks are secured in the same transaction.
/// (TimescaleDB's `create_chunk()` is not in its Apache-licensed build.)
const CHUNK_PLACEHOLDERS_SQL: &str = concat!(
    r#"INSERT INTO events_v2 (id, "timestamp", aggregate_id, aggregate_type, event_type, user_id, version, source)
SELECT gen_random_uuid(), d::timestamp AT TIME ZONE 'UTC', '00000000-0000-0000-0000-000000000000', 'system',
       'synap.chunk_placeholder', $2, 1, 'system'
  FROM unnest($1::date[]) d
 WHERE "#,
    feed_days_mark!(),
    r#"
RETURNING id, "timestamp""#
);
const DELETE_CHUNK_PLACEHOLDERS_SQL: &str =
    r#"DELETE FROM events_v2 WHERE user_id = $3 AND "timestamp" = ANY ($2) AND id = ANY ($1)"#;
const CHUNK_PLACEHOLDER_USER: &str = "synap:chunk-placeholder";

/// See [`CHUNK_PLACEHOLDERS_SQL`]. Best effort: where it fails (a role that row-level security
/// keeps from writing the placeholder, or without EXECUTE on `synap_secure_partitions`), or where
/// the database has a publication, the batches create the chunks as they go.
async fn create_chunks_ahead(client: &mut tokio_postgres::Client, days: &[chrono::NaiveDate]) {
    let timescaledb = client
        .query_opt(
            // Not where a publication exists: logical decoding would send the placeholders' inserts
            // (and deletes) to subscribers and change-data-capture readers.
            "SELECT 1 FROM synap_settings WHERE key = 'storage_mode' AND value = 'timescaledb'
                AND NOT EXISTS (SELECT 1 FROM pg_publication)",
            &[],
        )
        .await;
    if !matches!(timescaledb, Ok(Some(_))) {
        return;
    }
    for group in days.chunks(4) {
        let created = async {
            let tx = client.transaction().await?;
            let rows = tx
                .query(CHUNK_PLACEHOLDERS_SQL, &[&group, &CHUNK_PLACEHOLDER_USER])
                .await?;
            let ids: Vec<Uuid> = rows.iter().map(|r| r.get(0)).collect();
            let times: Vec<DateTime<Utc>> = rows.iter().map(|r| r.get(1)).collect();
            tx.execute(DELETE_CHUNK_PLACEHOLDERS_SQL, &[&ids, &times, &CHUNK_PLACEHOLDER_USER])
                .await?;
            // The new chunks get the events' row-level security now, as a batch's chunks do
            // when it commits (synap_feed_days_secure): left to a writer's commit, securing them
            // would wait for the other writers' batches in them.
            tx.execute("SELECT synap_secure_partitions()", &[]).await?;
            tx.commit().await
        };
        if created.await.is_err() {
            return;
        }
    }
}

/// What one batch wrote.
struct BatchOutcome {
    migrated: u64,
    failures: Vec<LegacyRowFailure>,
    stopped: bool,
    /// The (timestamp, id) of the batch's last processed row.
    last: Option<(Option<DateTime<Utc>>, Uuid)>,
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

    /// Adds the run's other writers to `writers` (which holds the one with the migration lock),
    /// and enlists every writer and the reader (see [`enlist`]).
    async fn open_writers(
        &self,
        writers: &mut Vec<deadpool_postgres::ClientWrapper>,
        reader: &tokio_postgres::Client,
        table: &str,
        options: &LegacyMigrationOptions,
    ) -> Result<()> {
        let lanes = match options.on_invalid {
            OnInvalid::Fail => 1,
            OnInvalid::Skip => options.writers,
        };
        while writers.len() < lanes {
            writers.push(deadpool_postgres::Object::take(self.object().await?));
        }
        // The reader records the run's progress: a later run must wait for it as for a writer.
        for client in writers.iter().map(|w| &**w).chain([reader]) {
            enlist(client, table).await?;
        }
        Ok(())
    }

    /// Takes the session lock of `table`'s migration on `writer`, then waits until every writer
    /// connection of an earlier run has ended (they hold the writers' lock in share mode), so
    /// that no transaction of theirs can commit after this run has read what is pending. When
    /// another backend holds either lock, waits up to `busy_timeout` for it to end; a run of
    /// this program on this host that was killed (its process is gone) has its backends
    /// terminated at once instead.
    ///
    /// Fails with [`Error::LegacyMigrationBusy`], naming the holder, when a lock stays taken.
    async fn take_migration_lock(
        &self,
        writer: &tokio_postgres::Client,
        table: &str,
        busy_timeout: Duration,
    ) -> Result<()> {
        // Who we are, so that a later run can tell that this one is gone.
        writer
            .execute(
                "SELECT set_config('application_name', $1, false)",
                &[&migration_client_name()],
            )
            .await?;
        let started = Instant::now();
        self.wait_for_lock(writer, LOCK_SQL, MIGRATION_LOCK_CLASS, table, started, busy_timeout)
            .await?;
        self.wait_for_lock(
            writer,
            WRITERS_TRY_SQL,
            WRITERS_LOCK_CLASS,
            table,
            started,
            busy_timeout,
        )
        .await?;
        writer.execute(WRITERS_UNLOCK_SQL, &[&table]).await?;
        Ok(())
    }

    /// Runs `try_sql` (a `pg_try_advisory_lock` of class `class` and key `table`) until it takes
    /// the lock.
    async fn wait_for_lock(
        &self,
        writer: &tokio_postgres::Client,
        try_sql: &str,
        class: &str,
        table: &str,
        started: Instant,
        busy_timeout: Duration,
    ) -> Result<()> {
        loop {
            if writer.query_one(try_sql, &[&table]).await?.get::<_, bool>(0) {
                return Ok(());
            }
            let holder = writer
                .query_opt(
                    "SELECT a.pid, coalesce(a.application_name, ''), a.backend_start, a.state, a.query_start,
                            coalesce(a.client_addr::text, 'local')
                       FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                      WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                        AND l.classid = (hashtext($2)::bigint & 4294967295)::text::oid
                        AND l.objid = (hashtext($1)::bigint & 4294967295)::text::oid
                        AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                        AND l.pid <> pg_backend_pid()
                      LIMIT 1",
                    &[&table, &class],
                )
                .await?;
            let Some(holder) = holder else {
                continue; // released between the two queries
            };
            let pid: i32 = holder.get(0);
            let name: String = holder.get(1);
            if orphaned_here(&name) {
                // Every backend of the dead run: each may be inside a batch's transaction.
                writer
                    .execute(
                        "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity
                          WHERE application_name = $1 AND pid <> pg_backend_pid()",
                        &[&name],
                    )
                    .await?;
                continue;
            }
            if started.elapsed() >= busy_timeout {
                let since: Option<DateTime<Utc>> = holder.get(4);
                return Err(Error::LegacyMigrationBusy {
                    table: table.to_owned(),
                    holder: format!(
                        "backend {pid} ({}, client {}, connected {}) holds the migration lock, {} since {}; \
                         waited {} s",
                        if name.is_empty() { "no application name" } else { &name },
                        holder.get::<_, String>(5),
                        holder.get::<_, DateTime<Utc>>(2).to_rfc3339(),
                        holder
                            .get::<_, Option<String>>(3)
                            .unwrap_or_else(|| "state unknown".into()),
                        since.map_or("-".into(), |t| t.to_rfc3339()),
                        started.elapsed().as_secs()
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// One run with the locks held: `reader` reads the legacy rows through one snapshot while
    /// `writers` write the batches, each the rows of its share of the aggregates.
    #[allow(clippy::too_many_arguments)]
    async fn run_migration(
        &self,
        reader: &mut tokio_postgres::Client,
        writers: &mut [deadpool_postgres::ClientWrapper],
        legacy: &str,
        table: &str,
        options: &LegacyMigrationOptions,
        progress: &mut (dyn FnMut(&LegacyMigrationProgress) + Send),
        started: Instant,
    ) -> Result<LegacyMigrationReport> {
        let counts = writers[0]
            .query_one(
                "SELECT (SELECT count(*) FROM legacy_migration_map WHERE legacy_table = $1),
                        (SELECT count(*) FROM legacy_migration_failures WHERE legacy_table = $1)",
                &[&table],
            )
            .await?;
        let previously_migrated = counts.get::<_, i64>(0) as u64;
        let previously_failed = counts.get::<_, i64>(1) as u64;

        // One snapshot and one sort for the whole run, kept by a cursor that outlives the
        // snapshot's transaction: the server materializes the sorted rows at its commit, and the
        // run then reads them batch by batch holding no snapshot. (A snapshot held for the whole
        // run kept every stream row version the run made from being pruned, so that each update of
        // a stream row wrote a new index entry.) The commit sorts and copies every pending row
        // (data included) at once, in work_mem and then temporary files, as one statement: a
        // `statement_timeout` or `temp_file_limit` of the role applies to it.
        reader
            .batch_execute(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;
                 SET LOCAL work_mem = '256MB'",
            )
            .await?;
        let pending: i64 = reader
            .query_one(
                &format!("SELECT count(*) FROM {legacy} l WHERE {PENDING_FILTER}"),
                &[&table],
            )
            .await?
            .get(0);
        let pending = pending as u64;
        let total = options.limit.map_or(pending, |l| l.min(pending));
        reader
            .execute(
                &format!(
                    "DECLARE synap_legacy_rows NO SCROLL CURSOR WITH HOLD FOR
                     SELECT l.id, CASE WHEN {readable} THEN l.\"timestamp\" END, l.user_id::text, l.type::text,
                            l.data->>'entityId', l.data, l.source::text, l.correlation_id,
                            l.\"timestamp\" IS NOT NULL AND NOT ({readable})
                       FROM {legacy} l
                      WHERE {PENDING_FILTER}
                      ORDER BY l.\"timestamp\", l.id
                      LIMIT {total}",
                    readable = readable_timestamp("l")
                ),
                &[&table],
            )
            .await?;
        reader.batch_execute("COMMIT").await?;
        let reader = &*reader;
        let fetch = |n: i32| async move {
            reader
                .query_typed(&format!("FETCH FORWARD {n} FROM synap_legacy_rows"), &[])
                .await
        };

        // Each round reads a batch for every writer and writes them at once.
        let lanes = writers.len().max(1);
        let round = (options.batch_size * lanes) as u64;
        let batch = |fetched: u64| (total - fetched).min(round) as i32;
        // The first round is read while the writer prepares the days.
        let first = async {
            if total > 0 {
                fetch(batch(0)).await
            } else {
                Ok(Vec::new())
            }
        };
        let prepare = async {
            let mut days = Vec::new();
            if !options.dry_run && total > 0 {
                // The days of the rows this run will write: with a limit, only the first rows'.
                let days_sql = if total < pending {
                    format!(
                        "SELECT DISTINCT (r.\"timestamp\" AT TIME ZONE 'UTC')::date FROM (
                             SELECT l.\"timestamp\" FROM {legacy} l WHERE {PENDING_FILTER}
                              ORDER BY l.\"timestamp\", l.id LIMIT {total}) r
                          WHERE {readable} ORDER BY 1",
                        readable = readable_timestamp("r")
                    )
                } else {
                    format!(
                        "SELECT DISTINCT (l.\"timestamp\" AT TIME ZONE 'UTC')::date
                           FROM {legacy} l WHERE {PENDING_FILTER} AND {readable} ORDER BY 1",
                        readable = readable_timestamp("l")
                    )
                };
                days = writers[0]
                    .query(&days_sql, &[&table])
                    .await?
                    .iter()
                    .map(|r| r.get::<_, chrono::NaiveDate>(0))
                    .collect();
                // Historical days get their native daily partitions before any row goes in,
                // rather than piling up in the default partition (a no-op on TimescaleDB).
                writers[0]
                    .execute(
                        "SELECT synap_ensure_partitions(d, d) FROM unnest($1::date[]) d",
                        &[&days],
                    )
                    .await?;
            }
            Ok::<_, Error>(days)
        };
        let (first, prepared) = futures_util::future::join(first, prepare).await;
        let days = prepared?;
        let mut next = first?;
        // TimescaleDB chunks are created by a connection of their own, ahead of the writers.
        let mut chunk_client = match days.is_empty() {
            true => None,
            false => self.object().await.ok(),
        };
        let chunks = async {
            if let Some(client) = chunk_client.as_mut() {
                create_chunks_ahead(client, &days).await;
            }
        };
        let mut batch_stmts = Vec::new();
        if !options.dry_run {
            for writer in writers.iter() {
                batch_stmts.push(writer.prepare(BATCH_SQL).await?);
            }
        }
        let mut report = LegacyMigrationReport {
            legacy_table: table.to_owned(),
            dry_run: options.dry_run,
            pending_at_start: pending,
            previously_migrated,
            previously_failed,
            processed: 0,
            migrated: 0,
            failed: 0,
            batches: 0,
            failures: Vec::new(),
            stopped_on_invalid: false,
            remaining: pending,
            elapsed_ms: 0,
            events_per_second: 0.0,
            success_rate: 100.0,
        };
        // Dry runs write no streams, so they remember each aggregate's newest event themselves.
        let mut dry_newest: HashMap<Uuid, DateTime<Utc>> = HashMap::new();
        progress(&LegacyMigrationProgress {
            total,
            processed: 0,
            migrated: 0,
            failed: 0,
        });
        let to_rows = |rows: Vec<tokio_postgres::Row>| -> Vec<LegacyRow> {
            rows.iter()
                .map(|r| LegacyRow {
                    id: r.get(0),
                    timestamp: r.get(1),
                    user_id: r.get(2),
                    event_type: r.get(3),
                    entity_id: r.get(4),
                    data: r.get(5),
                    source: r.get(6),
                    correlation_id: r.get(7),
                    timestamp_out_of_range: r.get(8),
                })
                .collect()
        };
        // Each writer takes its share of a round as soon as it has written its share of the
        // round before, so a writer that finishes first does not wait for the others (each
        // writer's channel holds one share, so no writer gets more than two rounds ahead of the
        // slowest). The rounds are settled (counted, recorded, reported) in order, once every
        // writer has written its share.
        let (share_txs, share_rxs): (Vec<_>, Vec<_>) = (0..lanes)
            .map(|_| tokio::sync::mpsc::channel::<(u64, Vec<LegacyRow>)>(1))
            .unzip();
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Result<Vec<BatchOutcome>>)>();
        let mut dry_known = Some(&mut dry_newest);
        let writes = writers
            .iter_mut()
            .zip(share_rxs)
            .enumerate()
            .map(|(lane, (writer, mut shares))| {
                let done = done_tx.clone();
                let stmt = batch_stmts.get(lane);
                // Dry runs have one writer: only it uses the map of known aggregates.
                let mut newest = if lane == 0 { dry_known.take() } else { None };
                async move {
                    while let Some((round, share)) = shares.recv().await {
                        if done.is_closed() {
                            break; // the run ended (a failed read or write): write nothing more
                        }
                        let written = match (stmt, share.is_empty()) {
                            (_, true) => Ok(Vec::new()),
                            (Some(stmt), false) => self.write_share(writer, stmt, table, &share, options).await,
                            (None, false) => match newest.as_deref_mut() {
                                Some(known) => self
                                    .dry_run_batch(writer, &share, options.on_invalid, known)
                                    .await
                                    .map(|outcome| vec![outcome]),
                                None => Err(Error::Internal {
                                    message: "a dry run with more than one writer".into(),
                                }),
                            },
                        };
                        let last = written.as_ref().map_or(true, |o| o.iter().any(|b| b.stopped));
                        if done.send((round, written)).is_err() || last {
                            break;
                        }
                        if let (Some(delay), false) = (options.batch_delay, share.is_empty()) {
                            tokio::time::sleep(delay).await;
                        }
                    }
                }
            })
            .collect::<Vec<_>>();
        drop(done_tx);
        let writing = futures_util::future::join_all(writes);

        let mut exhausted = false;
        let dispatch = async {
            // Moved in: the writers see the end of the rounds when the dispatch ends.
            let share_txs = share_txs;
            let mut fetched = 0u64;
            let mut round = 0u64;
            while fetched < total {
                if next.is_empty() {
                    exhausted = true;
                    break;
                }
                let rows = to_rows(std::mem::take(&mut next));
                fetched += rows.len() as u64;
                let mut shares: Vec<Vec<LegacyRow>> = (0..lanes).map(|_| Vec::new()).collect();
                for row in rows {
                    shares[writer_of(&row, lanes)].push(row);
                }
                for (tx, share) in share_txs.iter().zip(shares) {
                    if tx.send((round, share)).await.is_err() {
                        return Ok(()); // the writer stopped: the run ends with what is settled
                    }
                }
                round += 1;
                // The next round is read while this one is written.
                let want = batch(fetched);
                if want > 0 {
                    next = fetch(want).await?;
                }
            }
            Ok::<(), Error>(())
        };

        let settle = async {
            let mut arrived: HashMap<u64, (usize, Vec<BatchOutcome>)> = HashMap::new();
            let mut round = 0u64;
            while report.processed < total {
                let Some((share_round, written)) = done_rx.recv().await else {
                    break; // every writer is done
                };
                let entry = arrived.entry(share_round).or_default();
                entry.0 += 1;
                entry.1.extend(written?);
                if arrived.get(&round).map(|e| e.0) != Some(lanes) {
                    continue;
                }
                let (_, outcomes) = arrived.remove(&round).unwrap_or_default();
                round += 1;
                let mut stopped = false;
                // The round's counts and last row, recorded once the round committed: a row
                // that every writer updated inside its batch would make the writers wait for
                // each other.
                let mut recorded = (0i64, 0i64);
                let mut last = None;
                for outcome in &outcomes {
                    recorded.0 += outcome.migrated as i64;
                    recorded.1 += (outcome.failures.len() - usize::from(outcome.stopped)) as i64;
                    // In the read's order: by timestamp (nulls last), then id.
                    let key = |l: &Option<(Option<DateTime<Utc>>, Uuid)>| l.map(|(t, id)| (t.is_none(), t, id));
                    if key(&outcome.last) > key(&last) {
                        last = outcome.last;
                    }
                }
                if !options.dry_run {
                    let (last_ts, last_id) = (last.and_then(|l| l.0), last.map(|l| l.1));
                    reader
                        .execute(
                            RECORD_PROGRESS_SQL,
                            &[&table, &recorded.0, &recorded.1, &last_ts, &last_id],
                        )
                        .await?;
                }
                for outcome in outcomes {
                    let processed = if outcome.stopped {
                        // The stopped-on row and everything after it stay pending (one writer).
                        stopped = true;
                        outcome.migrated + outcome.failures.len() as u64 - 1
                    } else {
                        outcome.migrated + outcome.failures.len() as u64
                    };
                    report.processed += processed;
                    report.migrated += outcome.migrated;
                    report.failed += outcome.failures.len() as u64;
                    report.batches += u64::from(!options.dry_run);
                    let room = MAX_LISTED.saturating_sub(report.failures.len());
                    report.failures.extend(outcome.failures.into_iter().take(room));
                }
                progress(&LegacyMigrationProgress {
                    total,
                    processed: report.processed,
                    migrated: report.migrated,
                    failed: report.failed,
                });
                if stopped {
                    report.stopped_on_invalid = true;
                    break;
                }
            }
            // Whatever happens next, no writer may take another round.
            drop(done_rx);
            Ok::<(), Error>(())
        };
        // A failed read or write ends the run: no writer takes another share, the shares being
        // written are finished (each batch commits or rolls back whole; a resume skips what
        // committed), and the error is returned.
        let run = futures_util::future::try_join(dispatch, settle);
        let run = async {
            let (ran, _) = futures_util::future::join(run, writing).await;
            ran
        };
        let ((), written) = futures_util::future::join(chunks, run).await;
        written?;
        // The connection's end closes it too: a failure here must not fail a finished run.
        let _ = reader.batch_execute("CLOSE synap_legacy_rows").await;
        if !options.dry_run && !report.stopped_on_invalid && (exhausted || report.processed == pending) {
            writers[0]
                .execute(
                    "INSERT INTO legacy_migration_runs (legacy_table, finished_at, history_migrated_at)
                     VALUES ($1, now(), now())
                     ON CONFLICT (legacy_table) DO UPDATE
                        SET finished_at = now(), updated_at = now(),
                            history_migrated_at = coalesce(legacy_migration_runs.history_migrated_at, now()),
                            migrated = (SELECT count(*) FROM legacy_migration_map
                                         WHERE legacy_table = $1 AND origin = 'migration'),
                            failed = (SELECT count(*) FROM legacy_migration_failures WHERE legacy_table = $1)",
                    &[&table],
                )
                .await?;
        }
        report.remaining = pending - report.processed;
        let elapsed = started.elapsed();
        report.elapsed_ms = elapsed.as_millis() as u64;
        report.events_per_second = report.processed as f64 / elapsed.as_secs_f64().max(1e-9);
        let done = report.migrated + report.failed;
        report.success_rate = if done == 0 {
            100.0
        } else {
            report.migrated as f64 * 100.0 / done as f64
        };
        Ok(report)
    }

    /// A writer's share of a round, in batches of at most `batch_size` rows one after another
    /// (a round whose rows belong to few aggregates gives one writer more than a batch).
    async fn write_share(
        &self,
        writer: &mut tokio_postgres::Client,
        stmt: &tokio_postgres::Statement,
        table: &str,
        share: &[LegacyRow],
        options: &LegacyMigrationOptions,
    ) -> Result<Vec<BatchOutcome>> {
        let mut outcomes = Vec::new();
        for rows in share.chunks(options.batch_size) {
            let outcome = self.write_batch_retrying(writer, stmt, table, rows, options).await?;
            let stopped = outcome.stopped;
            outcomes.push(outcome);
            if stopped {
                break;
            }
        }
        Ok(outcomes)
    }

    /// [`EventRepository::write_batch`], again (up to five times) when it fails in a way that a
    /// new try can mend (a concurrent append moved one of the batch's aggregates, a
    /// serialization failure).
    async fn write_batch_retrying(
        &self,
        writer: &mut tokio_postgres::Client,
        stmt: &tokio_postgres::Statement,
        table: &str,
        rows: &[LegacyRow],
        options: &LegacyMigrationOptions,
    ) -> Result<BatchOutcome> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.write_batch(writer, stmt, table, rows, options.on_invalid).await {
                Err(e) if attempt < 5 && e.is_retryable() && !matches!(e, Error::ConnectionFailed { .. }) => continue,
                other => break other,
            }
        }
    }

    /// One batch in one transaction: lock the known streams, check and number the rows, insert
    /// events, guards, dirty days and map rows, record failures and progress.
    async fn write_batch(
        &self,
        writer: &mut tokio_postgres::Client,
        stmt: &tokio_postgres::Statement,
        table: &str,
        rows: &[LegacyRow],
        on_invalid: OnInvalid,
    ) -> Result<BatchOutcome> {
        let limits = self.config().limits;
        let checked: Vec<_> = rows.iter().map(|r| check_row(r, &limits)).collect();
        let mut agg_ids: Vec<Uuid> = checked
            .iter()
            .filter_map(|c| c.as_ref().ok().map(|c| c.aggregate_id))
            .collect();
        agg_ids.sort_unstable();
        agg_ids.dedup();

        let tx = writer.transaction().await?;
        // event_streams is the source of truth for versions: lock the known streams of this
        // batch (in a fixed order) so no append moves them before this batch commits, and so
        // that a live append and a batch never take two streams in opposite orders.
        let known = tx
            .query(
                "SELECT aggregate_id, version, aggregate_type, last_timestamp FROM synap_lock_streams($1)",
                &[&agg_ids],
            )
            .await?;
        let mut streams: HashMap<Uuid, (i32, String)> =
            known.iter().map(|r| (r.get(0), (r.get(1), r.get(2)))).collect();
        // The newest event of each aggregate: a row older than it cannot be appended without
        // putting versions out of time order.
        let mut newest: HashMap<Uuid, DateTime<Utc>> = known.iter().map(|r| (r.get(0), r.get(3))).collect();

        let n = rows.len();
        let mut legacy_ids = Vec::with_capacity(n);
        let mut event_ids = Vec::with_capacity(n);
        let mut timestamps = Vec::with_capacity(n);
        let mut aggregate_ids = Vec::with_capacity(n);
        let mut aggregate_types = Vec::with_capacity(n);
        let mut event_types = Vec::with_capacity(n);
        let mut user_ids = Vec::with_capacity(n);
        let mut versions = Vec::with_capacity(n);
        let mut correlation_ids = Vec::with_capacity(n);
        let mut legacy_sources = Vec::with_capacity(n);
        let mut datas = Vec::with_capacity(n);
        // Per aggregate of the batch: index into the agg_* arrays.
        let mut agg_index: HashMap<Uuid, usize> = HashMap::new();
        let mut batch_aggs = Vec::new();
        let mut batch_types = Vec::new();
        let mut batch_users = Vec::new();
        let mut batch_first = Vec::new();
        let mut batch_last = Vec::new();
        let mut batch_first_ts = Vec::new();
        let mut batch_last_ts = Vec::new();
        let mut failures = Vec::new();
        let mut stopped = false;
        let mut last_processed: Option<&LegacyRow> = None;
        for (row, checked) in rows.iter().zip(checked) {
            // An event that belongs to an aggregate by the aggregate rule is part of its history,
            // whatever its type's first segment says: it takes the aggregate's type.
            let candidate = checked.map(|mut c| {
                if let Some(stored) = streams
                    .get(&c.aggregate_id)
                    .and_then(|(_, t)| t.parse::<AggregateType>().ok())
                {
                    c.aggregate_type = stored;
                }
                c
            });
            let candidate = candidate.and_then(|c| match newest.get(&c.aggregate_id) {
                Some(&last) if row.timestamp.is_some_and(|t| t < last) => Err(out_of_order(row, c.aggregate_id, last)),
                _ => Ok(c),
            });
            let c = match candidate {
                Ok(c) => c,
                Err(f) => {
                    failures.push(f);
                    if on_invalid == OnInvalid::Fail {
                        stopped = true;
                        break;
                    }
                    last_processed = Some(row);
                    continue;
                }
            };
            last_processed = Some(row);
            let entry = streams
                .entry(c.aggregate_id)
                .or_insert_with(|| (0, c.aggregate_type.as_str().to_owned()));
            entry.0 += 1;
            let version = entry.0;
            let ts = row.timestamp.expect("checked by check_row");
            newest.insert(c.aggregate_id, ts);
            match agg_index.get(&c.aggregate_id) {
                Some(&i) => {
                    batch_last[i] = version;
                    batch_first_ts[i] = ts.min(batch_first_ts[i]);
                    batch_last_ts[i] = ts.max(batch_last_ts[i]);
                }
                None => {
                    agg_index.insert(c.aggregate_id, batch_aggs.len());
                    batch_aggs.push(c.aggregate_id);
                    batch_types.push(c.aggregate_type.as_str());
                    batch_users.push(row.user_id.as_deref().unwrap_or_default());
                    batch_first.push(version);
                    batch_last.push(version);
                    batch_first_ts.push(ts);
                    batch_last_ts.push(ts);
                }
            }
            legacy_ids.push(row.id);
            event_ids.push(Uuid::now_v7());
            timestamps.push(row.timestamp);
            aggregate_ids.push(c.aggregate_id);
            aggregate_types.push(c.aggregate_type.as_str());
            event_types.push(row.event_type.as_deref());
            user_ids.push(row.user_id.as_deref());
            versions.push(version);
            correlation_ids.push(row.correlation_id);
            legacy_sources.push(row.source.as_deref());
            datas.push(row.data.as_ref());
        }

        let migrated = legacy_ids.len() as u64;
        if migrated > 0 {
            let params: [&(dyn ToSql + Sync); 19] = [
                &legacy_ids,
                &event_ids,
                &timestamps,
                &aggregate_ids,
                &aggregate_types,
                &event_types,
                &user_ids,
                &versions,
                &correlation_ids,
                &legacy_sources,
                &batch_aggs,
                &batch_types,
                &batch_users,
                &batch_first,
                &batch_last,
                &table,
                &datas,
                &batch_first_ts,
                &batch_last_ts,
            ];
            let row = tx.query_one(stmt, &params).await?;
            let ok: bool = row.get(0);
            if !ok {
                tx.rollback().await?;
                // A concurrent append created one of the batch's new aggregates, or a legacy
                // row vanished: the caller retries with fresh stream versions.
                return Err(Error::TransactionConflict {
                    message: "an aggregate of the migration batch moved or a legacy row vanished; retry".into(),
                });
            }
        }
        // In fail mode the stopped-on row is not recorded, so a resume meets it again in order.
        let recorded: &[LegacyRowFailure] = if stopped {
            &failures[..failures.len() - 1]
        } else {
            &failures
        };
        if !recorded.is_empty() {
            let ids: Vec<Uuid> = recorded.iter().map(|f| f.legacy_id).collect();
            let codes: Vec<&str> = recorded.iter().map(|f| f.reason_code.as_str()).collect();
            let reasons: Vec<&str> = recorded.iter().map(|f| f.reason.as_str()).collect();
            tx.execute(RECORD_FAILURES_SQL, &[&table, &ids, &codes, &reasons])
                .await?;
        }
        tx.commit().await?;
        if migrated > 0 {
            self.wake_subscribers();
        }
        Ok(BatchOutcome {
            migrated,
            failures,
            stopped,
            last: last_processed.map(|r| (r.timestamp, r.id)),
        })
    }

    /// The checks of [`EventRepository::write_batch`] without writing.
    async fn dry_run_batch(
        &self,
        client: &tokio_postgres::Client,
        rows: &[LegacyRow],
        on_invalid: OnInvalid,
        known: &mut HashMap<Uuid, DateTime<Utc>>,
    ) -> Result<BatchOutcome> {
        let limits = self.config().limits;
        let checked: Vec<_> = rows.iter().map(|r| check_row(r, &limits)).collect();
        let ids: Vec<Uuid> = checked
            .iter()
            .filter_map(|c| c.as_ref().ok().map(|c| c.aggregate_id))
            .filter(|id| !known.contains_key(id))
            .collect();
        let stored = client
            .query(
                "SELECT aggregate_id, last_timestamp FROM event_streams WHERE aggregate_id = ANY ($1)",
                &[&ids],
            )
            .await?;
        known.extend(
            stored
                .iter()
                .map(|r| (r.get::<_, Uuid>(0), r.get::<_, DateTime<Utc>>(1))),
        );
        let mut outcome = BatchOutcome {
            migrated: 0,
            failures: Vec::new(),
            stopped: false,
            last: None,
        };
        for (row, checked) in rows.iter().zip(checked) {
            // As in a real run: a row older than its aggregate's newest event is refused.
            let result = checked.and_then(|c| match (known.get(&c.aggregate_id), row.timestamp) {
                (Some(&last), Some(t)) if t < last => Err(out_of_order(row, c.aggregate_id, last)),
                (_, Some(t)) => {
                    known.insert(c.aggregate_id, t);
                    Ok(())
                }
                (_, None) => Ok(()),
            });
            match result {
                Ok(()) => outcome.migrated += 1,
                Err(f) => {
                    outcome.failures.push(f);
                    if on_invalid == OnInvalid::Fail {
                        outcome.stopped = true;
                        break;
                    }
                }
            }
        }
        Ok(outcome)
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
