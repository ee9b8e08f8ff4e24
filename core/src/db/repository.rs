//! [`EventRepository`]: appends with optimistic locking and stream reads.

use std::collections::HashMap;
use std::str::FromStr;

use chrono::{DateTime, NaiveDate, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use serde_json::Value;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{NoTls, Row};
use uuid::Uuid;

use crate::db::config::{Pooler, RepositoryConfig};
use crate::db::conn::{Citus, Conn};
use crate::db::json::StoredJson;
use crate::db::migrate::{self, MigrationReport, MigrationStatus};
use crate::db::sql::{feed_days_ctes, feed_days_mark, stream_guard_ctes};
use crate::error::{Error, Result};
use crate::model::{AggregateType, EventRecord, EventSource, NewEvent};
use crate::query::{can_match, CountFilter, StreamOptions, UserStreamOptions};
use crate::validate::{self, IssueCode, Limits};

/// The event store: a pool of PostgreSQL connections and the queries over `events_v2`.
///
/// Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct EventRepository {
    pool: Pool,
    config: RepositoryConfig,
    append_sql: std::sync::Arc<str>,
    append_batch_sql: std::sync::Arc<str>,
    /// Set by [`EventRepository::for_user`]: every call runs in a transaction that first sets
    /// `app.current_user_id` with `SET LOCAL` semantics, which the row-level security policies read.
    pub(crate) scope: Option<std::sync::Arc<str>>,
    /// The connection settings of the subscriptions' LISTEN connections, outside the pool;
    /// `None` through a transaction-mode pooler without a direct URL for them (they poll).
    pub(crate) pg_config: Option<std::sync::Arc<tokio_postgres::Config>>,
    /// Through a transaction-mode pooler: the `SET LOCAL` statements every transaction begins
    /// with (crate::db::conn).
    pooled: Option<std::sync::Arc<crate::db::conn::Pooled>>,
    /// Set once the dual-write legacy table's history is known to be migrated.
    dual_write_ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Subscriber wake-ups ([`EventRepository::wake_subscribers`]).
    wake: std::sync::Arc<Wake>,
    /// Which statement single appends run ([`EventRepository::append_statement`]):
    /// [`ROUTE_UNKNOWN`] until the first append asks the database.
    routed_append: std::sync::Arc<std::sync::atomic::AtomicU8>,
}

const ROUTE_UNKNOWN: u8 = 0;
/// [`APPEND_SQL`], prepared once per connection.
const ROUTE_STATEMENT: u8 = 1;
/// `synap_append_routed` (the citus mode).
const ROUTE_FUNCTION: u8 = 2;
/// `synap_append` (through a transaction-mode pooler): [`APPEND_SQL`] in a PL/pgSQL function,
/// whose plan the server keeps per server connection. Through a pooler no statement can stay
/// prepared, and planning the statement afresh on every call cost more than the round trips
/// (0.7 ms of 1.5 ms a call, measured on PostgreSQL 15, fsync off: node-postgres running the
/// statement unnamed beside prepared).
const ROUTE_PLANNED: u8 = 3;

/// The state of [`EventRepository::wake_subscribers`], shared by clones and scoped handles.
#[derive(Default)]
struct Wake {
    /// Set while a wake-up is scheduled and not yet sent.
    pending: std::sync::atomic::AtomicBool,
    /// When the last one was sent.
    last_sent: std::sync::Mutex<Option<tokio::time::Instant>>,
}

/// The least time between two wake-ups from one repository: a writer appending in a loop
/// (0.4 ms an append) would otherwise pay for a `pg_notify` after each one.
const WAKE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(5);

pub(crate) use crate::db::conn::{in_session, set_user_sql, Session};

impl std::fmt::Debug for EventRepository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventRepository")
            .field("pool_size", &self.config.pool_size)
            .field("schema", &self.config.schema)
            .finish_non_exhaustive()
    }
}

pub(crate) const EVENT_COLUMNS: &str =
    "id, \"timestamp\", aggregate_id, aggregate_type, event_type, user_id, data, metadata, \
                             version, causation_id, correlation_id, source, position";

/// One round trip: the version guard on event_streams and the insert, in one statement. The
/// insert happens only when the guard row was created (version 1) or advanced from exactly
/// version - 1; concurrent appends of the same version serialize on the event_streams row and
/// all but one find the guard false.
const APPEND_SQL: &str = concat!(
    r#"
WITH ev AS (
    SELECT $1::uuid AS id, coalesce($2::timestamptz, now()) AS ts, $3::uuid AS aggregate_id,
           $4::text AS aggregate_type, $5::text AS event_type, $6::text AS user_id, $7::jsonb AS data,
           $8::jsonb AS metadata, $9::integer AS version, $10::uuid AS causation_id,
           $11::uuid AS correlation_id, $12::text AS source
), created AS (
    INSERT INTO event_streams (aggregate_id, aggregate_type, user_id, version, first_timestamp, last_timestamp)
    SELECT aggregate_id, aggregate_type, user_id, version, ts, ts FROM ev WHERE version = 1
    ON CONFLICT (aggregate_id) DO NOTHING
    RETURNING aggregate_id
), advanced AS (
    UPDATE event_streams s
       SET version = ev.version,
           first_timestamp = least(s.first_timestamp, ev.ts),
           last_timestamp = greatest(s.last_timestamp, ev.ts)
      FROM ev
     WHERE s.aggregate_id = ev.aggregate_id
       AND ev.version > 1
       AND s.version = ev.version - 1
       AND s.aggregate_type = ev.aggregate_type
    RETURNING s.aggregate_id
), inserted AS (
    INSERT INTO events_v2 (id, "timestamp", aggregate_id, aggregate_type, event_type, user_id, data, metadata,
                           version, causation_id, correlation_id, source)
    SELECT id, ts, aggregate_id, aggregate_type, event_type, user_id, data, metadata,
           version, causation_id, correlation_id, source
      FROM ev
     WHERE EXISTS (SELECT 1 FROM created UNION ALL SELECT 1 FROM advanced)
       AND "#,
    feed_days_mark!(),
    r#"
    RETURNING "timestamp", position/*DUAL_RETURNING*/
), ids AS (
    INSERT INTO events_v2_ids (id, aggregate_id, version, user_id)
    SELECT id, aggregate_id, version, user_id FROM ev WHERE EXISTS (SELECT 1 FROM created UNION ALL SELECT 1 FROM advanced)
), dirty AS (
    INSERT INTO events_daily_dirty (day)
    SELECT ("timestamp" AT TIME ZONE 'UTC')::date FROM inserted
    ON CONFLICT (day) DO NOTHING
), "#,
    feed_days_ctes!(),
    r#"/*DUAL_WRITE*/
SELECT "timestamp", position FROM inserted
"#
);

/// The append of the citus mode (migration 0014): the same parameters and result as
/// [`APPEND_SQL`], each step routed to the aggregate's shard.
const ROUTED_APPEND_SQL: &str =
    r#"SELECT "timestamp", "position" FROM synap_append_routed($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"#;
const ROUTED_APPEND_SIGNATURE: &str =
    "synap_append_routed(uuid, timestamptz, uuid, text, text, text, jsonb, jsonb, integer, uuid, uuid, text)";
const PLANNED_APPEND_SQL: &str =
    r#"SELECT out_timestamp, out_position FROM synap_append($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"#;
const PLANNED_APPEND_SIGNATURE: &str =
    "synap_append(uuid, timestamptz, uuid, text, text, text, jsonb, jsonb, integer, uuid, uuid, text)";

/// A whole batch in one statement over arrays (no bind-parameter limit). $1..$12 are the events'
/// columns, $13..$20 one entry per aggregate, sorted by aggregate id (so that every batch locks
/// the guard rows it shares with another in the same order): its type, user, first and last
/// version in the batch, its earliest and latest given timestamps, and whether any of its events
/// takes the database's `now()`. Inserts happen only if every aggregate's guard passed; the caller
/// rolls back otherwise.
const APPEND_BATCH_SQL: &str = concat!(
    r#"
WITH ev AS (
    SELECT u.ord, u.id, coalesce(u.ts, now()) AS ts, u.aggregate_id, u.aggregate_type, u.event_type, u.user_id,
           u.data, u.metadata, u.version, u.causation_id, u.correlation_id, u.source
      FROM unnest($1::uuid[], $2::timestamptz[], $3::uuid[], $4::text[], $5::text[], $6::text[], $7::jsonb[],
                  $8::jsonb[], $9::integer[], $10::uuid[], $11::uuid[], $12::text[])
           WITH ORDINALITY AS u(id, ts, aggregate_id, aggregate_type, event_type, user_id, data, metadata,
                                version, causation_id, correlation_id, source, ord)
), req AS (
    SELECT r.aggregate_id, r.aggregate_type, r.user_id, r.first_version, r.last_version,
           least(r.first_ts, CASE WHEN r.takes_now THEN now() END) AS first_ts,
           greatest(r.last_ts, CASE WHEN r.takes_now THEN now() END) AS last_ts
      FROM unnest($13::uuid[], $14::text[], $15::text[], $16::integer[], $17::integer[],
                  $18::timestamptz[], $19::timestamptz[], $20::boolean[])
           AS r(aggregate_id, aggregate_type, user_id, first_version, last_version, first_ts, last_ts, takes_now)
), "#,
    stream_guard_ctes!(""),
    r#", passed AS (
    SELECT (SELECT count(*) FROM created) + (SELECT count(*) FROM advanced) = cardinality($13::uuid[]) AS ok
), inserted AS (
    INSERT INTO events_v2 (id, "timestamp", aggregate_id, aggregate_type, event_type, user_id, data, metadata,
                           version, causation_id, correlation_id, source)
    SELECT id, ts, aggregate_id, aggregate_type, event_type, user_id, data, metadata,
           version, causation_id, correlation_id, source
      FROM ev
     WHERE (SELECT ok FROM passed)
       AND "#,
    feed_days_mark!(),
    r#"
     ORDER BY ord
    RETURNING id, "timestamp", position/*DUAL_RETURNING*/
), ids AS (
    INSERT INTO events_v2_ids (id, aggregate_id, version, user_id)
    SELECT id, aggregate_id, version, user_id FROM ev WHERE (SELECT ok FROM passed)
), dirty AS (
    INSERT INTO events_daily_dirty (day)
    SELECT DISTINCT ("timestamp" AT TIME ZONE 'UTC')::date FROM inserted ORDER BY 1
    ON CONFLICT (day) DO NOTHING
), "#,
    feed_days_ctes!(),
    r#"/*DUAL_WRITE*/
SELECT id, "timestamp", position FROM inserted
"#
);

/// The time span of one aggregate's events in a batch: the earliest and latest given timestamps,
/// and whether an event without one takes the database's `now()`.
struct TimeSpan {
    earliest: Option<DateTime<Utc>>,
    latest: Option<DateTime<Utc>>,
    takes_now: bool,
}

impl TimeSpan {
    fn of(timestamp: Option<DateTime<Utc>>) -> Self {
        TimeSpan {
            earliest: timestamp,
            latest: timestamp,
            takes_now: timestamp.is_none(),
        }
    }

    fn add(&mut self, timestamp: Option<DateTime<Utc>>) {
        match timestamp {
            Some(t) => {
                self.earliest = Some(self.earliest.map_or(t, |e| e.min(t)));
                self.latest = Some(self.latest.map_or(t, |l| l.max(t)));
            }
            None => self.takes_now = true,
        }
    }
}

/// A direct connection's session settings, as its startup `options`: the schema, the statement
/// timeout, and Citus's per-shard deadlock prevention turned off.
fn with_session_options(pg: &mut tokio_postgres::Config, config: &RepositoryConfig) {
    let mut options = pg.get_options().map(str::to_owned).unwrap_or_default();
    if let Some(schema) = &config.schema {
        options.push_str(&format!(" -c search_path={schema}"));
    }
    if let Some(timeout) = config.statement_timeout {
        options.push_str(&format!(" -c statement_timeout={}", timeout.as_millis().max(1)));
    }
    // On Citus, a write over several shards takes a lock per shard that conflicts with every
    // other such write, shard by shard as each part of the statement runs: two batches whose
    // parts reach the shards in different orders deadlock although they share no aggregate.
    // Without those locks only row locks remain, as on one server (batches that share
    // aggregates in a different order meet Citus's deadlock detection, a retryable
    // TRANSACTION_CONFLICT). Elsewhere the setting is a placeholder that nothing reads.
    options.push_str(" -c citus.enable_deadlock_prevention=off");
    pg.options(options.trim());
}

/// The append statements, with the dual-write CTEs spliced in when a legacy table is configured:
/// the legacy row and its `legacy_migration_map` row are written by the same statement as the
/// event, so they commit or roll back together.
fn with_dual_write(sql: &str, legacy_table: Option<&str>) -> Result<String> {
    let Some(name) = legacy_table else {
        return Ok(sql.replace("/*DUAL_RETURNING*/", "").replace("/*DUAL_WRITE*/", ""));
    };
    let quoted = crate::db::sql::quote_table(name)?;
    let returning = if sql.contains("RETURNING id,") {
        ", aggregate_id, version, event_type, user_id, data, source, correlation_id"
    } else {
        ", id, aggregate_id, version, event_type, user_id, data, source, correlation_id"
    };
    // `quoted` passed quote_table: only [a-z0-9_."], safe inside a literal. The map is keyed by
    // the table's schema-qualified name, as the legacy migration keys it.
    let dual = format!(
        r#", legacy AS (
    INSERT INTO {quoted} (id, user_id, "timestamp", type, data, source, correlation_id)
    SELECT id, user_id, "timestamp", event_type, data, source, correlation_id FROM inserted
), legacy_map AS (
    INSERT INTO legacy_migration_map (legacy_table, legacy_id, event_id, aggregate_id, version, origin)
    SELECT synap_legacy_table_key('{quoted}'::regclass), id, id, aggregate_id, version, 'dual_write' FROM inserted
)"#
    );
    Ok(sql
        .replace("/*DUAL_RETURNING*/", returning)
        .replace("/*DUAL_WRITE*/", &dual))
}

/// The stream read, bounded by the stream's first and last timestamps so that only the chunks
/// or partitions in its time span are scanned.
pub(crate) const STREAM_SQL: &str = r#"
SELECT id, "timestamp", aggregate_id, aggregate_type, event_type, user_id, data, metadata,
       version, causation_id, correlation_id, source, position
  FROM events_v2
 WHERE aggregate_id = $1
   AND "timestamp" >= $2 AND "timestamp" <= $3
   AND version > $4 AND version <= $5
   AND ($6::text[] IS NULL OR event_type = ANY ($6))
 ORDER BY version
"#;

/// `$2` is computed by the caller (now - days): a constant lets the planner prune partitions
/// before planning them, where `now() - interval` is only pruned after planning every one.
const USER_STREAM_SQL: &str = r#"
SELECT id, "timestamp", aggregate_id, aggregate_type, event_type, user_id, data, metadata,
       version, causation_id, correlation_id, source, position
  FROM events_v2
 WHERE user_id = $1
   AND "timestamp" >= $2
   AND ($3::text[] IS NULL OR event_type = ANY ($3))
   AND ($4::text[] IS NULL OR aggregate_type = ANY ($4))
 ORDER BY "timestamp" DESC, position DESC
 LIMIT $5
"#;

const CORRELATED_SQL: &str = r#"
SELECT id, "timestamp", aggregate_id, aggregate_type, event_type, user_id, data, metadata,
       version, causation_id, correlation_id, source, position
  FROM events_v2
 WHERE correlation_id = $1
 ORDER BY "timestamp", position
"#;

const BY_TYPE_SQL: &str = r#"
SELECT id, "timestamp", aggregate_id, aggregate_type, event_type, user_id, data, metadata,
       version, causation_id, correlation_id, source, position
  FROM events_v2
 WHERE event_type = $1
 ORDER BY "timestamp" DESC, position DESC
 LIMIT $2
"#;

const COUNT_SQL: &str = r#"
SELECT count(*)
  FROM events_v2
 WHERE ($1::text IS NULL OR user_id = $1)
   AND ($2::text IS NULL OR event_type = $2)
   AND ($3::text IS NULL OR aggregate_type = $3)
   AND ($4::timestamptz IS NULL OR "timestamp" >= $4)
   AND ($5::timestamptz IS NULL OR "timestamp" < $5)
"#;

impl EventRepository {
    /// A repository over a new connection pool. Connections open lazily, on first use.
    ///
    /// Fails with [`Error::InvalidConfig`] when the connection string or settings are invalid.
    pub fn new(config: RepositoryConfig) -> Result<EventRepository> {
        config.check()?;
        let (url, pooler_in_url) = crate::db::config::split_pooler(&config.database_url)?;
        let parse = |url: &str| -> Result<tokio_postgres::Config> {
            let mut pg: tokio_postgres::Config = url.parse().map_err(|e| Error::InvalidConfig {
                message: format!("cannot parse the connection string: {e}"),
            })?;
            pg.connect_timeout(config.connect_timeout);
            if pg.get_application_name().is_none() {
                pg.application_name("synap-events");
            }
            Ok(pg)
        };
        let mut pg = parse(&url)?;
        let pooled = match (config.pooler, pooler_in_url) {
            (Pooler::Transaction, _) => true,
            (Pooler::None, _) => false,
            (Pooler::Auto, Some(p)) => p == Pooler::Transaction,
            (Pooler::Auto, None) => crate::db::config::looks_pooled(&pg),
        };
        // Through a transaction-mode pooler no startup parameter but PgBouncer's own may be sent
        // (it refuses `options`), and a session's settings would not last: every transaction
        // sets them instead (crate::db::conn).
        let settings = pooled.then(|| {
            std::sync::Arc::new(crate::db::conn::Pooled::new(
                config.schema.as_deref(),
                config.statement_timeout.map(|t| t.as_millis()),
            ))
        });
        // The LISTEN of subscriptions needs a session: the connection string itself, or through
        // a pooler the direct one given for it (none: subscribers poll).
        let listen = match (&settings, &config.listen_url) {
            (None, _) => {
                with_session_options(&mut pg, &config);
                Some(std::sync::Arc::new(pg.clone()))
            }
            (Some(_), Some(direct)) => {
                let (direct, _) = crate::db::config::split_pooler(direct)?;
                let mut listen = parse(&direct)?;
                with_session_options(&mut listen, &config);
                Some(std::sync::Arc::new(listen))
            }
            (Some(_), None) => None,
        };
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.pool_size)
            .wait_timeout(Some(config.acquire_timeout))
            .create_timeout(Some(config.connect_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| Error::InvalidConfig { message: e.to_string() })?;
        let dual = config.dual_write_legacy_table.as_deref();
        let append_sql = with_dual_write(APPEND_SQL, dual)?.into();
        let append_batch_sql = with_dual_write(APPEND_BATCH_SQL, dual)?.into();
        Ok(EventRepository {
            pool,
            config,
            append_sql,
            append_batch_sql,
            scope: None,
            pooled: settings,
            pg_config: listen,
            dual_write_ready: Default::default(),
            wake: Default::default(),
            routed_append: Default::default(),
        })
    }

    /// A handle whose every call is limited to `user_id`'s rows by the row-level security
    /// policies on `events_v2` and `event_streams`: each call runs in a transaction that sets
    /// `app.current_user_id` locally. Shares this repository's pool.
    ///
    /// The policies bind roles that are not the tables' owner (owners bypass RLS unless it is
    /// forced), so connect as the application's role. Schema, legacy and retention operations
    /// are not scoped. Fails with [`Error::Validation`] for a blank or oversized user id.
    pub fn for_user(&self, user_id: &str) -> Result<EventRepository> {
        validate::check_user_id_arg("userId", user_id, self.limits())?;
        if let Some(current) = &self.scope {
            return Err(Error::invalid(
                "userId",
                IssueCode::OutOfRange,
                format!("this handle is already scoped to user \"{current}\""),
            ));
        }
        let mut scoped = self.clone();
        scoped.scope = Some(user_id.into());
        Ok(scoped)
    }

    /// The user this handle is scoped to, if any.
    pub fn scoped_user(&self) -> Option<&str> {
        self.scope.as_deref()
    }

    /// The rule for user-scoped handles (docs/reliability.md, "Threat model"): they serve the
    /// calls that read and write events, within the user's rows; every other call (schema and
    /// upkeep, the legacy migration, retention, snapshots' writes, named consumers, consumer
    /// groups and their parked events, store-wide numbers) is the owner's, and a scoped handle
    /// refuses it with [`Error::PermissionDenied`] before it reaches the database.
    pub(crate) fn refuse_scoped(&self, call: &str) -> Result<()> {
        match self.scoped_user() {
            Some(user) => Err(Error::PermissionDenied {
                message: format!(
                    "{call} is not a call of a user-scoped handle (user \"{user}\"): run it on the unscoped repository, as the owner"
                ),
            }),
            None => Ok(()),
        }
    }

    /// A repository configured from the `DATABASE_URL` environment variable.
    ///
    /// Fails with [`Error::InvalidConfig`] when the variable is unset or unusable.
    pub fn from_env() -> Result<EventRepository> {
        EventRepository::new(RepositoryConfig::from_env()?)
    }

    /// The settings this repository was built with.
    pub fn config(&self) -> &RepositoryConfig {
        &self.config
    }

    /// Closes the pool: idle connections close now, busy ones when returned; later calls fail
    /// with `CONNECTION_FAILED`.
    pub fn close(&self) {
        self.pool.close();
    }

    pub(crate) async fn client(&self) -> Result<Conn> {
        let client = self.pool.get().await.map_err(|e| match Error::from(e) {
            Error::PoolTimeout { .. } => Error::PoolTimeout {
                timeout_ms: self.config.acquire_timeout.as_millis() as u64,
            },
            other => other,
        })?;
        Ok(Conn::new(client, self.pooled.clone()))
    }

    /// A pooled connection as it is, for what needs a session of its own and refuses to run
    /// through a transaction-mode pooler ([`EventRepository::refuse_pooled`]): the legacy
    /// migration's reader and writers.
    pub(crate) async fn object(&self) -> Result<Object> {
        Ok(self.client().await?.into_parts().0)
    }

    /// Whether this repository's connections go through a transaction-mode pooler.
    pub fn through_pooler(&self) -> bool {
        self.pooled.is_some()
    }

    /// Fails with [`Error::InvalidConfig`] through a transaction-mode pooler: `call` needs a
    /// session of its own (session locks, several connections in step).
    pub(crate) fn refuse_pooled(&self, call: &str) -> Result<()> {
        if self.through_pooler() {
            return Err(Error::InvalidConfig {
                message: format!(
                    "{call} needs a direct connection (it holds session locks, which a transaction-mode pooler cannot keep): \
                     run it with the database's direct URL"
                ),
            });
        }
        Ok(())
    }

    fn limits(&self) -> &Limits {
        &self.config.limits
    }

    /// Applies the pending schema migrations and creates native partitions ahead.
    ///
    /// Safe to run repeatedly and from several processes at once. Fails with
    /// [`Error::MigrationChecksumMismatch`] when an applied file was edited, and
    /// [`Error::MigrationFailed`] when a migration's SQL fails (its transaction is rolled back).
    pub async fn migrate(&self) -> Result<MigrationReport> {
        self.refuse_scoped("migrate")?;
        let mut client = self.client().await?;
        let report = migrate::run(&mut client, self.config.storage_mode).await?;
        drop(client);
        // A migration may have added the routed append: the next append asks again.
        self.routed_append
            .store(ROUTE_UNKNOWN, std::sync::atomic::Ordering::Relaxed);
        self.maintain().await?;
        Ok(report)
    }

    /// Which migrations have run.
    pub async fn migration_status(&self) -> Result<Vec<MigrationStatus>> {
        self.refuse_scoped("migration_status")?;
        let mut client = self.client().await?;
        migrate::status(&mut client).await
    }

    /// `timescaledb` or `native`, as chosen by the first migration.
    pub async fn storage_mode(&self) -> Result<String> {
        self.refuse_scoped("storage_mode")?;
        let mut client = self.client().await?;
        Ok(client
            .query_one("SELECT value FROM synap_settings WHERE key = 'storage_mode'", &[])
            .await?
            .get(0))
    }

    /// Routine upkeep: creates native daily partitions from 7 days back to 30 days ahead.
    /// Returns how many partitions were created (always 0 on TimescaleDB).
    pub async fn maintain(&self) -> Result<i32> {
        self.refuse_scoped("maintain")?;
        let today = Utc::now().date_naive();
        self.ensure_partitions(today - chrono::Days::new(7), today + chrono::Days::new(30))
            .await
    }

    /// Creates the missing native daily partitions for `from..=to` (UTC days), moving rows that
    /// the default partition holds for those days. A no-op on TimescaleDB.
    pub async fn ensure_partitions(&self, from: NaiveDate, to: NaiveDate) -> Result<i32> {
        self.refuse_scoped("ensure_partitions")?;
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // Upkeep, not an application query: the configured statement timeout does not apply.
        tx.batch_execute("SET LOCAL statement_timeout = 0").await?;
        let created: i32 = tx
            .query_one("SELECT synap_ensure_partitions($1, $2)", &[&from, &to])
            .await?
            .get(0);
        tx.commit().await?;
        Ok(created)
    }

    /// Appends one event. `event.version` must be the aggregate's current version + 1 (1 creates
    /// the aggregate).
    ///
    /// Fails with [`Error::Validation`] for a bad event, [`Error::ConcurrencyConflict`] when the
    /// aggregate is at another version, and [`Error::AggregateTypeMismatch`] when it exists with
    /// another type; nothing is written then. When `event.id` is given and that event is already
    /// stored as this aggregate's event at this version, returns the stored event (a retried
    /// append is idempotent).
    pub async fn append(&self, event: NewEvent) -> Result<EventRecord> {
        event.validate(self.limits())?;
        self.append_valid(event).await
    }

    /// [`EventRepository::append`] for an event given as JSON in the TypeScript API's shape
    /// (camelCase keys): parsed and checked once, by [`validate::parse_event`].
    ///
    /// Fails like [`EventRepository::append`], with the first problem [`validate::parse_event`]
    /// reports.
    pub async fn append_json(&self, event: Value) -> Result<EventRecord> {
        let event = validate::parse_event_owned(event, self.limits()).map_err(Error::from_issue_list)?;
        self.append_valid(event).await
    }

    /// With dual-write on: fails with [`Error::LegacyHistoryPending`] until the legacy table's
    /// history has been migrated once. An append before would become an aggregate's first
    /// version, and its older legacy history would then be numbered after it.
    async fn check_dual_write(&self) -> Result<()> {
        let Some(table) = &self.config.dual_write_legacy_table else {
            return Ok(());
        };
        if self.dual_write_ready.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        let quoted = crate::db::sql::quote_table(table)?;
        let mut client = self.client().await?;
        let migrated: bool = client
            .query_one(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM legacy_migration_runs
                                     WHERE legacy_table = synap_legacy_table_key('{quoted}'::regclass)
                                       AND history_migrated_at IS NOT NULL)"
                ),
                &[],
            )
            .await?
            .get(0);
        if !migrated {
            return Err(Error::LegacyHistoryPending { table: table.clone() });
        }
        self.dual_write_ready.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    async fn append_valid(&self, event: NewEvent) -> Result<EventRecord> {
        self.check_dual_write().await?;
        let id = event.id.unwrap_or_else(Uuid::now_v7);
        let stored = match self.append_at_once(&event, id).await? {
            Some(row) => record_from_new(event, id, row.get(0), row.get(1)),
            None => in_session!(self, |client| { self.append_in(&client, event, id).await })?,
        };
        self.wake_subscribers();
        Ok(stored)
    }

    /// The usual append in one round trip ([`Conn::at_once`]): its statement in a transaction of
    /// its own, written together with `BEGIN`, the settings (through a pooler) or the scoped
    /// user, and `COMMIT`. The stored row's timestamp and position, or `None` where the guard
    /// did not pass (a version conflict, an existing id, another user's aggregate) or the
    /// repository does not know its append statement yet: then [`EventRepository::append_in`]
    /// runs, tries again and says why, in a transaction of the usual kind.
    async fn append_at_once(&self, event: &NewEvent, id: Uuid) -> Result<Option<Row>> {
        let Some(sql) = self.known_append_statement() else {
            return Ok(None);
        };
        let params: [&(dyn ToSql + Sync); 12] = [
            &id,
            &event.timestamp,
            &event.aggregate_id,
            &event.aggregate_type.as_str(),
            &event.event_type,
            &event.user_id,
            &event.data,
            &event.metadata,
            &event.version,
            &event.causation_id,
            &event.correlation_id,
            &event.source.as_str(),
        ];
        let user = self.scope.as_deref().map(set_user_sql).unwrap_or_default();
        // `synap_append` is the route only where `synap_append_routed` is absent: not on Citus.
        let citus = match sql == PLANNED_APPEND_SQL {
            true => Citus::Absent,
            false => Citus::Maybe,
        };
        match self.client().await?.at_once(&user, citus, sql, &params).await {
            Ok(found) => Ok(found.and_then(|(mut rows, _)| rows.pop())),
            Err(e) if is_duplicate_id(&e) => Err(Error::DuplicateEventId { id, field: "id".into() }),
            Err(e) => Err(e.into()),
        }
    }

    /// Tells LISTENing subscribers that events were committed: one `pg_notify` on a pooled
    /// connection, after the commit, shared by every commit that finished before it is sent, and
    /// at most one per [`WAKE_INTERVAL`]. A NOTIFY inside the writing transaction would hold
    /// PostgreSQL's database-wide notify lock through that commit and serialise concurrent
    /// writers (migration 0010). Best effort: a subscriber that misses it finds the events at
    /// its next poll.
    pub(crate) fn wake_subscribers(&self) {
        use std::sync::atomic::Ordering;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.wake.pending.swap(true, Ordering::AcqRel) {
            return; // a wake-up is scheduled and not yet sent: it covers this commit
        }
        let wake = self.wake.clone();
        let pool = self.pool.clone();
        // Clears the flag when the task ends before it does (its runtime shut down while it
        // waited): left set, it would keep every later commit from scheduling a wake-up.
        struct Clear(std::sync::Arc<Wake>);
        impl Drop for Clear {
            fn drop(&mut self) {
                self.0.pending.store(false, Ordering::Release);
            }
        }
        runtime.spawn(async move {
            let clear = Clear(wake.clone());
            let last = *wake.last_sent.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(last) = last {
                tokio::time::sleep_until(last + WAKE_INTERVAL).await;
            }
            // Cleared before sending: a commit after this point schedules the next wake-up.
            drop(clear);
            *wake.last_sent.lock().unwrap_or_else(|e| e.into_inner()) = Some(tokio::time::Instant::now());
            if let Ok(client) = pool.get().await {
                let _ = client.batch_execute("SELECT pg_notify('synap_events', '')").await;
            }
        });
    }

    /// The statement single appends run, once the repository knows it: `synap_append_routed`
    /// in the citus mode (created by the repeatable migrations there only), `synap_append`
    /// through a transaction-mode pooler ([`ROUTE_PLANNED`]), [`APPEND_SQL`] otherwise. With
    /// dual-write on, the statement in every mode: it also writes the legacy table.
    fn known_append_statement(&self) -> Option<&str> {
        if self.config.dual_write_legacy_table.is_some() {
            return Some(&self.append_sql);
        }
        match self.routed_append.load(std::sync::atomic::Ordering::Relaxed) {
            ROUTE_STATEMENT => Some(&self.append_sql),
            ROUTE_FUNCTION => Some(ROUTED_APPEND_SQL),
            ROUTE_PLANNED => Some(PLANNED_APPEND_SQL),
            _ => None,
        }
    }

    /// [`EventRepository::known_append_statement`], asking the database the first time.
    async fn append_statement(&self, client: &Session<'_, '_>) -> Result<&str> {
        if let Some(sql) = self.known_append_statement() {
            return Ok(sql);
        }
        let row = client
            .query_one(
                &format!(
                    "SELECT to_regprocedure('{ROUTED_APPEND_SIGNATURE}') IS NOT NULL, \
                            to_regprocedure('{PLANNED_APPEND_SIGNATURE}') IS NOT NULL"
                ),
                &[],
            )
            .await?;
        let route = match (row.get(0), row.get(1)) {
            (true, _) => ROUTE_FUNCTION,
            (false, true) if self.pooled.is_some() => ROUTE_PLANNED,
            _ => ROUTE_STATEMENT,
        };
        self.routed_append.store(route, std::sync::atomic::Ordering::Relaxed);
        Ok(self.known_append_statement().expect("the route was just stored"))
    }

    async fn append_in(&self, client: &Session<'_, '_>, event: NewEvent, id: Uuid) -> Result<EventRecord> {
        let stmt = client.prepare_cached(self.append_statement(client).await?).await?;
        // Racing writers can move the aggregate to exactly version - 1 between the failed guard
        // and the diagnosis below; then the append is simply tried again.
        for _ in 0..3 {
            let params: [&(dyn ToSql + Sync); 12] = [
                &id,
                &event.timestamp,
                &event.aggregate_id,
                &event.aggregate_type.as_str(),
                &event.event_type,
                &event.user_id,
                &event.data,
                &event.metadata,
                &event.version,
                &event.causation_id,
                &event.correlation_id,
                &event.source.as_str(),
            ];
            match client.query(&stmt, &params).await.map(|mut rows| rows.pop()) {
                Ok(Some(row)) => return Ok(record_from_new(event, id, row.get(0), row.get(1))),
                Ok(None) => {}
                Err(e) if is_duplicate_id(&e) => return Err(Error::DuplicateEventId { id, field: "id".into() }),
                Err(e) => return Err(e.into()),
            }
            let stream = client
                .query_opt(
                    "SELECT version, aggregate_type, first_timestamp, last_timestamp FROM event_streams WHERE aggregate_id = $1",
                    &[&event.aggregate_id],
                )
                .await?;
            let Some(stream) = stream else {
                // No stream is visible: there is none, or row-level security hides another
                // user's, or one was created by a writer that committed after the read above.
                match unseen_aggregate(client, event.aggregate_id).await? {
                    Unseen::Hidden => return Err(hidden_aggregate(event.aggregate_id)),
                    Unseen::JustCreated => continue,
                    // A version 1 whose guard found a stream that is gone again: try again.
                    Unseen::Absent if event.version == 1 => continue,
                    Unseen::Absent => return Err(conflict(&event, 0)),
                }
            };
            let actual: i32 = stream.get(0);
            let stored_type: String = stream.get(1);
            if let Some(given_id) = event.id {
                if actual >= event.version {
                    let rows = client
                        .query(
                            &format!(
                                "SELECT {EVENT_COLUMNS} FROM events_v2 WHERE aggregate_id = $1 AND version = $2 \
                                 AND \"timestamp\" >= $3 AND \"timestamp\" <= $4"
                            ),
                            &[
                                &event.aggregate_id,
                                &event.version,
                                &stream.get::<_, DateTime<Utc>>(2),
                                &stream.get::<_, DateTime<Utc>>(3),
                            ],
                        )
                        .await?;
                    if let Some(row) = rows.iter().find(|r| r.get::<_, Uuid>(0) == given_id) {
                        return record_from_row(row);
                    }
                }
            }
            if stored_type != event.aggregate_type.as_str() {
                return Err(Error::AggregateTypeMismatch {
                    aggregate_id: event.aggregate_id,
                    stored: stored_type,
                    given: event.aggregate_type.as_str().to_owned(),
                });
            }
            if actual != event.version - 1 {
                return Err(conflict(&event, actual));
            }
        }
        Err(Error::TransactionConflict {
            message: format!("aggregate {} kept moving while appending; retry", event.aggregate_id),
        })
    }

    /// Appends events atomically: all of them or none. Several events of one aggregate must have
    /// consecutive versions in batch order, the first being the aggregate's current version + 1.
    /// Any size works (arrays, not one parameter per value).
    ///
    /// Fails like [`EventRepository::append`] (field paths are prefixed with `events[i]`);
    /// nothing is written then.
    pub async fn append_batch(&self, events: Vec<NewEvent>) -> Result<Vec<EventRecord>> {
        validate::validate_batch(&events, self.limits())?;
        self.append_batch_valid(events).await
    }

    /// [`EventRepository::append_batch`] for a JSON array of events in the TypeScript API's
    /// shape: each event parsed and checked once, by [`validate::parse_batch`].
    ///
    /// Fails like [`EventRepository::append_batch`].
    pub async fn append_batch_json(&self, events: Value) -> Result<Vec<EventRecord>> {
        let events = validate::parse_batch_owned(events, self.limits())?;
        validate::validate_batch_shape(&events)?;
        self.append_batch_valid(events).await
    }

    async fn append_batch_valid(&self, events: Vec<NewEvent>) -> Result<Vec<EventRecord>> {
        self.check_dual_write().await?;
        let n = events.len();
        let mut ids = Vec::with_capacity(n);
        let mut timestamps = Vec::with_capacity(n);
        let mut aggregate_ids = Vec::with_capacity(n);
        let mut aggregate_types = Vec::with_capacity(n);
        let mut event_types = Vec::with_capacity(n);
        let mut user_ids = Vec::with_capacity(n);
        let mut datas = Vec::with_capacity(n);
        let mut metadatas = Vec::with_capacity(n);
        let mut versions = Vec::with_capacity(n);
        let mut causation_ids = Vec::with_capacity(n);
        let mut correlation_ids = Vec::with_capacity(n);
        let mut sources = Vec::with_capacity(n);
        // One entry per aggregate, in order of first appearance.
        let mut agg_index: HashMap<Uuid, usize> = HashMap::new();
        let mut agg_ids = Vec::new();
        let mut agg_types: Vec<&str> = Vec::new();
        let mut agg_users = Vec::new();
        let mut agg_first = Vec::new();
        let mut agg_last = Vec::new();
        let mut agg_spans: Vec<TimeSpan> = Vec::new();
        for event in &events {
            ids.push(event.id.unwrap_or_else(Uuid::now_v7));
            timestamps.push(event.timestamp);
            aggregate_ids.push(event.aggregate_id);
            aggregate_types.push(event.aggregate_type.as_str());
            event_types.push(event.event_type.as_str());
            user_ids.push(event.user_id.as_str());
            datas.push(&event.data);
            metadatas.push(event.metadata.as_ref());
            versions.push(event.version);
            causation_ids.push(event.causation_id);
            correlation_ids.push(event.correlation_id);
            sources.push(event.source.as_str());
            match agg_index.get(&event.aggregate_id) {
                Some(&i) => {
                    if agg_types[i] != event.aggregate_type.as_str() {
                        return Err(Error::AggregateTypeMismatch {
                            aggregate_id: event.aggregate_id,
                            stored: agg_types[i].to_owned(),
                            given: event.aggregate_type.as_str().to_owned(),
                        });
                    }
                    agg_last[i] = event.version;
                    agg_spans[i].add(event.timestamp);
                }
                None => {
                    agg_index.insert(event.aggregate_id, agg_ids.len());
                    agg_ids.push(event.aggregate_id);
                    agg_types.push(event.aggregate_type.as_str());
                    agg_users.push(event.user_id.as_str());
                    agg_first.push(event.version);
                    agg_last.push(event.version);
                    agg_spans.push(TimeSpan::of(event.timestamp));
                }
            }
        }
        // The statement's entries per aggregate, sorted by aggregate id.
        let mut order: Vec<usize> = (0..agg_ids.len()).collect();
        order.sort_unstable_by_key(|&i| agg_ids[i]);
        let sorted_ids: Vec<Uuid> = order.iter().map(|&i| agg_ids[i]).collect();
        let sorted_types: Vec<&str> = order.iter().map(|&i| agg_types[i]).collect();
        let sorted_users: Vec<&str> = order.iter().map(|&i| agg_users[i]).collect();
        let sorted_first: Vec<i32> = order.iter().map(|&i| agg_first[i]).collect();
        let sorted_last: Vec<i32> = order.iter().map(|&i| agg_last[i]).collect();
        let sorted_earliest: Vec<_> = order.iter().map(|&i| agg_spans[i].earliest).collect();
        let sorted_latest: Vec<_> = order.iter().map(|&i| agg_spans[i].latest).collect();
        let sorted_takes_now: Vec<bool> = order.iter().map(|&i| agg_spans[i].takes_now).collect();

        let mut client = self.client().await?;
        let user_sql = self.scope.as_deref().map(set_user_sql).unwrap_or_default();
        let params: [&(dyn ToSql + Sync); 20] = [
            &ids,
            &timestamps,
            &aggregate_ids,
            &aggregate_types,
            &event_types,
            &user_ids,
            &datas,
            &metadatas,
            &versions,
            &causation_ids,
            &correlation_ids,
            &sources,
            &sorted_ids,
            &sorted_types,
            &sorted_users,
            &sorted_first,
            &sorted_last,
            &sorted_earliest,
            &sorted_latest,
            &sorted_takes_now,
        ];
        // On Citus, batches that share aggregates can deadlock across workers (on one server they
        // lock the streams in aggregate order and never do): the transaction is rolled back, so
        // the batch is tried again, a few times. So is a batch whose guard failed only because a
        // concurrent append created or moved one of its aggregates in between.
        let mut deadlocks = 0;
        let mut raced = 0;
        let mut rows = loop {
            let tx = client.begin(&user_sql).await?;
            // The id of a unique violation on the id registry: row-level security may hide the
            // stored event that holds it (another user's) from the diagnosis below.
            let mut duplicate = None;
            let inserted = match Session::Tx(&tx).prepare_cached(&self.append_batch_sql).await {
                Ok(stmt) => tx.query(&stmt, &params).await,
                Err(e) => Err(e),
            };
            match inserted {
                Ok(rows) if rows.len() == n => {
                    tx.commit().await?;
                    break rows;
                }
                Ok(_) => {}
                Err(e) if is_duplicate_id(&e) => {
                    duplicate = Some(duplicate_id_of(&e, &ids));
                }
                Err(e) if is_existing_stream(&e) => {}
                Err(e) if deadlocks < 3 && is_deadlock(&e) => {
                    deadlocks += 1;
                    tx.rollback().await?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            // The guard may have moved some stream rows before failing: undo.
            tx.rollback().await?;
            // Look at the committed state (in a transaction of its own, which carries a scoped
            // user).
            let tx = client.begin(&user_sql).await?;
            let session = Session::Tx(&tx);
            let outcome = match stored_batch(&session, &events, &ids).await {
                Ok(Some(stored)) => Ok(Some(stored)),
                Ok(None) => match duplicate {
                    Some((index, id)) => Err(Error::DuplicateEventId {
                        id,
                        field: format!("events[{index}].id"),
                    }),
                    None => match self
                        .diagnose_batch(&session, &events, &agg_ids, &agg_first, &agg_types)
                        .await
                    {
                        Some(error) => Err(error),
                        None => Ok(None),
                    },
                },
                Err(e) => Err(e),
            };
            tx.rollback().await?;
            match outcome {
                Ok(Some(stored)) => return Ok(stored),
                Ok(None) if raced < 3 => raced += 1,
                Ok(None) => return Err(moved_concurrently()),
                Err(e) => return Err(e),
            }
        };
        self.wake_subscribers();

        // Positions are drawn in batch order, so sorting by position restores it.
        rows.sort_by_key(|r| r.get::<_, i64>(2));
        drop(datas);
        drop(metadatas);
        let mut out = Vec::with_capacity(n);
        for ((event, row), id) in events.into_iter().zip(&rows).zip(&ids) {
            if row.get::<_, Uuid>(0) != *id {
                return Err(Error::Internal {
                    message: "batch insert returned rows out of order".into(),
                });
            }
            out.push(record_from_new(event, *id, row.get(1), row.get(2)));
        }
        Ok(out)
    }

    /// Names the first aggregate of a failed batch whose guard did not pass (in batch order), or
    /// `None` when the committed state lets every guard pass: a concurrent append moved or
    /// created an aggregate of the batch after its statement read it.
    async fn diagnose_batch(
        &self,
        client: &Session<'_, '_>,
        events: &[NewEvent],
        agg_ids: &[Uuid],
        agg_first: &[i32],
        agg_types: &[&str],
    ) -> Option<Error> {
        let rows = match client
            .query(
                "SELECT aggregate_id, version, aggregate_type FROM event_streams WHERE aggregate_id = ANY ($1)",
                &[&agg_ids],
            )
            .await
        {
            Ok(rows) => rows,
            Err(e) => return Some(e.into()),
        };
        let current: HashMap<Uuid, (i32, String)> = rows.iter().map(|r| (r.get(0), (r.get(1), r.get(2)))).collect();
        for (i, agg) in agg_ids.iter().enumerate() {
            if !current.contains_key(agg) {
                match unseen_aggregate(client, *agg).await {
                    Ok(Unseen::Hidden) => return Some(hidden_aggregate(*agg)),
                    Ok(Unseen::JustCreated) => return None,
                    // A new aggregate that does not exist yet: not what failed the batch.
                    Ok(Unseen::Absent) if agg_first[i] == 1 => continue,
                    Ok(Unseen::Absent) => {}
                    Err(e) => return Some(e),
                }
            }
            let (actual, stored_type) = current.get(agg).cloned().unwrap_or((0, agg_types[i].to_owned()));
            if stored_type != agg_types[i] {
                return Some(Error::AggregateTypeMismatch {
                    aggregate_id: *agg,
                    stored: stored_type,
                    given: agg_types[i].to_owned(),
                });
            }
            if actual != agg_first[i] - 1 {
                let event = events
                    .iter()
                    .find(|e| e.aggregate_id == *agg)
                    .expect("aggregate comes from the batch");
                return Some(conflict(event, actual));
            }
        }
        None
    }

    /// The aggregate's events in version order (an empty list for an unknown aggregate).
    ///
    /// Reads only the chunks or partitions between the stream's first and last event. Fails with
    /// [`Error::Validation`] for bad options, and with [`Error::HistoryRemoved`] when retention
    /// removed versions the read asks for (`from_version` below the retained snapshot's).
    pub async fn get_aggregate_stream(&self, aggregate_id: Uuid, options: &StreamOptions) -> Result<Vec<EventRecord>> {
        let after = options.from_version.unwrap_or(0);
        if after < 0 {
            return Err(Error::invalid(
                "fromVersion",
                IssueCode::OutOfRange,
                format!("fromVersion must be 0 or more, not {after}"),
            ));
        }
        let to = options.to_version.unwrap_or(i32::MAX);
        let types = matchable(options.event_types.as_deref());
        if to <= after || types.as_ref().is_some_and(Vec::is_empty) && options.event_types.is_some() {
            return Ok(Vec::new());
        }
        in_session!(self, |client| {
            let Some(span) = client
                .query_opt(
                    "SELECT first_timestamp, last_timestamp, version, retained_from FROM event_streams WHERE aggregate_id = $1",
                    &[&aggregate_id],
                )
                .await?
            else {
                return Ok(Vec::new());
            };
            let first: DateTime<Utc> = span.get(0);
            let last: DateTime<Utc> = span.get(1);
            // Retention removed the versions before retained_from (a snapshot keeps their state):
            // say so rather than return a stream with its start missing.
            let retained_from: i32 = span.get(3);
            if retained_from > 1 && after < retained_from - 1 {
                return Err(Error::HistoryRemoved {
                    aggregate_id,
                    retained_from,
                    snapshot_version: retained_from - 1,
                });
            }
            // The versions the stream row counts: an append that commits between the two reads
            // may extend the span, so without this bound a read could return 1..n and n + 2.
            let to = to.min(span.get::<_, i32>(2));
            let rows = client
                .query_typed(
                    STREAM_SQL,
                    &[
                        (&aggregate_id, Type::UUID),
                        (&first, Type::TIMESTAMPTZ),
                        (&last, Type::TIMESTAMPTZ),
                        (&after, Type::INT4),
                        (&to, Type::INT4),
                        (&types, Type::TEXT_ARRAY),
                    ],
                )
                .await?;
            rows.iter().map(record_from_row).collect::<Result<Vec<_>>>()
        })
    }

    /// The query plan of [`EventRepository::get_aggregate_stream`] for this aggregate, as
    /// PostgreSQL's text EXPLAIN (to check which chunks or partitions a read touches).
    pub async fn explain_aggregate_stream(&self, aggregate_id: Uuid) -> Result<String> {
        let mut client = self.client().await?;
        let Some(span) = client
            .query_opt(
                "SELECT first_timestamp, last_timestamp FROM event_streams WHERE aggregate_id = $1",
                &[&aggregate_id],
            )
            .await?
        else {
            return Ok(String::new());
        };
        let first: DateTime<Utc> = span.get(0);
        let last: DateTime<Utc> = span.get(1);
        let none: Option<Vec<String>> = None;
        let rows = client
            .query(
                &format!("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) {STREAM_SQL}"),
                &[&aggregate_id, &first, &last, &0i32, &i32::MAX, &none],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
            .join("\n"))
    }

    /// The aggregate's current version, or `None` when it has no events.
    pub async fn get_aggregate_version(&self, aggregate_id: Uuid) -> Result<Option<i32>> {
        in_session!(self, |client| {
            Ok(client
                .query_opt(
                    "SELECT version FROM event_streams WHERE aggregate_id = $1",
                    &[&aggregate_id],
                )
                .await?
                .map(|r| r.get(0)))
        })
    }

    /// A user's recent events, newest first.
    ///
    /// Fails with [`Error::Validation`] for a bad user id or options.
    pub async fn get_user_stream(&self, user_id: &str, options: &UserStreamOptions) -> Result<Vec<EventRecord>> {
        let limits = self.limits();
        let days = validate::check_days("days", options.days, limits)?;
        let since = Utc::now() - chrono::Duration::days(days);
        let limit = validate::check_limit("limit", options.limit, limits)?;
        let types = matchable(options.event_types.as_deref());
        if !can_match(user_id) || types.as_ref().is_some_and(Vec::is_empty) && options.event_types.is_some() {
            return Ok(Vec::new());
        }
        let aggregate_types = matchable(options.aggregate_types.as_deref());
        in_session!(self, |client| {
            let rows = client
                .query_typed(
                    USER_STREAM_SQL,
                    &[
                        (&user_id, Type::TEXT),
                        (&since, Type::TIMESTAMPTZ),
                        (&types, Type::TEXT_ARRAY),
                        (&aggregate_types, Type::TEXT_ARRAY),
                        (&limit, Type::INT8),
                    ],
                )
                .await?;
            rows.iter().map(record_from_row).collect::<Result<Vec<_>>>()
        })
    }

    /// The query plan of [`EventRepository::get_user_stream`], as PostgreSQL's text EXPLAIN
    /// (ANALYZE), to check that the read touches only the chunks or partitions of its days.
    ///
    /// Fails like [`EventRepository::get_user_stream`].
    pub async fn explain_user_stream(&self, user_id: &str, options: &UserStreamOptions) -> Result<String> {
        let limits = self.limits();
        let days = validate::check_days("days", options.days, limits)?;
        let since = Utc::now() - chrono::Duration::days(days);
        let limit = validate::check_limit("limit", options.limit, limits)?;
        let aggregate_types = matchable(options.aggregate_types.as_deref());
        let mut client = self.client().await?;
        let rows = client
            .query(
                &format!("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) {USER_STREAM_SQL}"),
                &[&user_id, &since, &options.event_types, &aggregate_types, &limit],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
            .join("\n"))
    }

    /// Every event of a workflow, oldest first.
    pub async fn get_correlated_events(&self, correlation_id: Uuid) -> Result<Vec<EventRecord>> {
        in_session!(self, |client| {
            let stmt = client.prepare_cached(CORRELATED_SQL).await?;
            let rows = client.query(&stmt, &[&correlation_id]).await?;
            rows.iter().map(record_from_row).collect::<Result<Vec<_>>>()
        })
    }

    /// The latest events of one type, newest first.
    ///
    /// Fails with [`Error::Validation`] for a bad type or limit.
    pub async fn get_events_by_type(&self, event_type: &str, limit: i64) -> Result<Vec<EventRecord>> {
        let limit = validate::check_limit("limit", limit, self.limits())?;
        if !can_match(event_type) {
            return Ok(Vec::new());
        }
        in_session!(self, |client| {
            let stmt = client.prepare_cached(BY_TYPE_SQL).await?;
            let rows = client.query(&stmt, &[&event_type, &limit]).await?;
            rows.iter().map(record_from_row).collect::<Result<Vec<_>>>()
        })
    }

    /// How many events match every given filter (0 when a filter matches nothing, such as a
    /// `to_date` before the `from_date`).
    pub async fn count_events(&self, filter: &CountFilter) -> Result<i64> {
        let filters = [&filter.user_id, &filter.event_type];
        if filters.iter().any(|f| f.as_deref().is_some_and(|f| !can_match(f))) {
            return Ok(0);
        }
        let aggregate_type = filter.aggregate_type.as_deref();
        in_session!(self, |client| {
            let stmt = client.prepare_cached(COUNT_SQL).await?;
            Ok(client
                .query_one(
                    &stmt,
                    &[
                        &filter.user_id,
                        &filter.event_type,
                        &aggregate_type,
                        &filter.from_date,
                        &filter.to_date,
                    ],
                )
                .await?
                .get(0))
        })
    }

    /// Recomputes `events_daily` for the days that received events since the last refresh
    /// (every day when `full`). Returns how many days were recomputed. Appends wait while it runs.
    pub async fn refresh_analytics(&self, full: bool) -> Result<i32> {
        self.refuse_scoped("refresh_analytics")?;
        let mut client = self.client().await?;
        Ok(client
            .query_one("SELECT refresh_events_daily($1)", &[&full])
            .await?
            .get(0))
    }
}

/// The event types of a filter that can match a stored type (none holds U+0000).
fn matchable(types: Option<&[String]>) -> Option<Vec<&str>> {
    types.map(|types| types.iter().map(String::as_str).filter(|t| can_match(t)).collect())
}

/// A batch that failed, seen through the id registry: `Some(records)` when every event is
/// already stored with its id at its aggregate and version (a retry after a lost reply), `None`
/// when none is.
///
/// Fails with [`Error::DuplicateEventId`] when an id is stored as another event, and
/// [`Error::BatchPartlyStored`] when some events are stored and others not.
async fn stored_batch(client: &Session<'_, '_>, events: &[NewEvent], ids: &[Uuid]) -> Result<Option<Vec<EventRecord>>> {
    let registered: HashMap<Uuid, (Uuid, i32)> = client
        .query(
            "SELECT id, aggregate_id, version FROM events_v2_ids WHERE id = ANY ($1)",
            &[&ids],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let mut stored = Vec::new();
    for (i, (event, id)) in events.iter().zip(ids).enumerate() {
        match registered.get(id) {
            Some(&(aggregate, version)) if aggregate == event.aggregate_id && version == event.version => {
                stored.push(i)
            }
            Some(_) => {
                return Err(Error::DuplicateEventId {
                    id: *id,
                    field: format!("events[{i}].id"),
                })
            }
            None => {}
        }
    }
    if stored.is_empty() {
        return Ok(None);
    }
    if stored.len() < events.len() {
        return Err(Error::BatchPartlyStored { stored });
    }
    // Every event is stored: read them back, bounded by their streams' time spans.
    let aggregates: Vec<Uuid> = events.iter().map(|e| e.aggregate_id).collect();
    let versions: Vec<i32> = events.iter().map(|e| e.version).collect();
    let span = client
        .query_one(
            "SELECT min(first_timestamp), max(last_timestamp) FROM event_streams WHERE aggregate_id = ANY ($1)",
            &[&aggregates],
        )
        .await?;
    let (Some(first), Some(last)) = (
        span.get::<_, Option<DateTime<Utc>>>(0),
        span.get::<_, Option<DateTime<Utc>>>(1),
    ) else {
        return Err(Error::Internal {
            message: "a stored batch's streams are not visible".into(),
        });
    };
    let rows = client
        .query_typed(
            &format!(
                "SELECT {EVENT_COLUMNS} FROM events_v2 e \
                  WHERE e.\"timestamp\" >= $3 AND e.\"timestamp\" <= $4 \
                    AND (e.aggregate_id, e.version) IN (SELECT a, v FROM unnest($1::uuid[], $2::int4[]) AS k(a, v))"
            ),
            &[
                (&aggregates, Type::UUID_ARRAY),
                (&versions, Type::INT4_ARRAY),
                (&first, Type::TIMESTAMPTZ),
                (&last, Type::TIMESTAMPTZ),
            ],
        )
        .await?;
    let mut by_key: HashMap<(Uuid, i32), EventRecord> = HashMap::new();
    for row in &rows {
        let record = record_from_row(row)?;
        by_key.insert((record.aggregate_id, record.version), record);
    }
    events
        .iter()
        .map(|e| {
            by_key
                .remove(&(e.aggregate_id, e.version))
                .ok_or_else(|| Error::Internal {
                    message: format!("stored event {} v{} was not found", e.aggregate_id, e.version),
                })
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// Whether the statement failed on the id registry's key: an id that is already stored.
fn is_duplicate_id(e: &tokio_postgres::Error) -> bool {
    violates(e, "events_v2_ids_pkey")
}

/// The batch index and id named by a unique violation on the id registry ("Key (id)=(...)
/// already exists."); the batch's first id when the server's detail does not say.
fn duplicate_id_of(e: &tokio_postgres::Error, ids: &[Uuid]) -> (usize, Uuid) {
    let named = e
        .as_db_error()
        .and_then(|db| db.detail())
        .and_then(|d| d.strip_prefix("Key (id)=("))
        .and_then(|d| d.split_once(')'))
        .and_then(|(id, _)| Uuid::parse_str(id).ok());
    named
        .and_then(|id| ids.iter().position(|i| *i == id).map(|i| (i, id)))
        .unwrap_or((0, ids[0]))
}

/// A deadlock, on one server or across a Citus cluster's workers (Citus reports its distributed
/// deadlocks with the same SQLSTATE).
fn is_deadlock(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED)
}

/// A batch's version 1 for an aggregate that exists (see `stream_guard_ctes`).
fn is_existing_stream(e: &tokio_postgres::Error) -> bool {
    violates(e, "event_streams_pkey")
}

/// Whether `e` is a unique violation of the constraint `name`. On Citus the violation happens on
/// a shard, whose constraint is `name` followed by `_` and the shard's number, and the error
/// reaches the coordinator with that name in its message only.
fn violates(e: &tokio_postgres::Error, name: &str) -> bool {
    let shard_of = |text: &str| {
        text.strip_prefix(name).is_some_and(|rest| {
            rest.is_empty()
                || rest
                    .strip_prefix('_')
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
    };
    e.as_db_error().is_some_and(|db| {
        *db.code() == tokio_postgres::error::SqlState::UNIQUE_VIOLATION
            && match db.constraint() {
                Some(constraint) => shard_of(constraint),
                None => db.message().split('"').nth(1).is_some_and(shard_of),
            }
    })
}

/// Whether the aggregate exists, whoever it belongs to (`synap_aggregate_exists` runs with the
/// owner's rights and answers nothing more).
/// What an aggregate is whose stream row a statement of this session did not see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unseen {
    /// There is none.
    Absent,
    /// Row-level security hides it: another user's.
    Hidden,
    /// A writer created it and committed after the statement that missed it.
    JustCreated,
}

/// Tells the three [`Unseen`] cases apart. `synap_aggregate_exists` answers with the owner's
/// rights; a row it finds is committed, so it is visible to this session's next statement unless
/// row-level security hides it. A stream created by a concurrent writer is thus never taken for
/// another user's (which would be `PERMISSION_DENIED`, where the caller should see a conflict).
async fn unseen_aggregate(client: &Session<'_, '_>, aggregate_id: Uuid) -> Result<Unseen> {
    let exists: bool = client
        .query_one("SELECT synap_aggregate_exists($1)", &[&aggregate_id])
        .await?
        .get(0);
    if !exists {
        return Ok(Unseen::Absent);
    }
    let visible = client
        .query_opt("SELECT 1 FROM event_streams WHERE aggregate_id = $1", &[&aggregate_id])
        .await?
        .is_some();
    Ok(if visible { Unseen::JustCreated } else { Unseen::Hidden })
}

/// A batch whose guard failed although the committed state, read after it, lets it pass: a
/// concurrent append moved or created one of its aggregates in between. The batch is tried again.
fn moved_concurrently() -> Error {
    Error::TransactionConflict {
        message: "a concurrent append moved an aggregate of the batch; retry".into(),
    }
}

fn hidden_aggregate(aggregate_id: Uuid) -> Error {
    Error::PermissionDenied {
        message: format!("aggregate {aggregate_id} exists but belongs to another user"),
    }
}

fn conflict(event: &NewEvent, actual: i32) -> Error {
    Error::ConcurrencyConflict {
        aggregate_id: event.aggregate_id,
        expected_version: event.version - 1,
        actual_version: actual,
    }
}

fn record_from_new(mut event: NewEvent, id: Uuid, timestamp: DateTime<Utc>, position: i64) -> EventRecord {
    crate::db::json::in_jsonb_order(&mut event.data);
    if let Some(metadata) = event.metadata.as_mut() {
        crate::db::json::in_jsonb_order(metadata);
    }
    EventRecord {
        id,
        timestamp,
        aggregate_id: event.aggregate_id,
        aggregate_type: event.aggregate_type,
        event_type: event.event_type,
        user_id: event.user_id,
        data: event.data,
        metadata: event.metadata,
        version: event.version,
        causation_id: event.causation_id,
        correlation_id: event.correlation_id,
        source: event.source,
        position,
        unreadable: None,
    }
}

/// A jsonb column, read without failing on a number (see [`StoredJson`]).
/// The raw text of what could not be read, cut at 64 KiB (on a character boundary).
fn raw_text(text: String) -> String {
    const MAX: usize = 64 * 1024;
    if text.len() <= MAX {
        return text;
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// A stored event from a row of [`EVENT_COLUMNS`]. A column that cannot be read (see
/// [`EventRecord::unreadable`]) gives a record flagged unreadable, never a failed read.
pub(crate) fn record_from_row(row: &Row) -> Result<EventRecord> {
    let mut unreadable: Option<crate::model::Unreadable> = None;
    let mut flag = |column: &str, reason: String, raw: String| {
        unreadable.get_or_insert(crate::model::Unreadable {
            column: column.to_owned(),
            reason,
            raw: raw_text(raw),
        });
    };
    let timestamp = match row.try_get::<_, crate::db::json::StoredTimestamp>(1) {
        Ok(crate::db::json::StoredTimestamp(Ok(t))) => t,
        Ok(crate::db::json::StoredTimestamp(Err(raw))) => {
            flag("timestamp", "outside the times the store reads back".into(), raw);
            DateTime::<Utc>::UNIX_EPOCH
        }
        Err(e) => {
            flag("timestamp", e.to_string(), String::new());
            DateTime::<Utc>::UNIX_EPOCH
        }
    };
    let mut json = |column: usize, name: &str| -> Option<Value> {
        match row.try_get::<_, Option<StoredJson>>(column) {
            Ok(v) => v.map(|j| j.0),
            Err(e) => {
                let raw = row
                    .try_get::<_, Option<crate::db::json::RawJsonb>>(column)
                    .ok()
                    .flatten()
                    .map(|r| String::from_utf8_lossy(&r.0).into_owned())
                    .unwrap_or_default();
                flag(name, e.to_string(), raw);
                Some(Value::Object(Default::default()))
            }
        }
    };
    let data = json(6, "data").unwrap_or(Value::Null);
    let metadata = json(7, "metadata");
    let aggregate_type: &str = row.try_get(3).unwrap_or_default();
    let aggregate_type = AggregateType::from_str(aggregate_type).unwrap_or_else(|()| {
        flag(
            "aggregate_type",
            "not a known aggregate type".into(),
            aggregate_type.to_owned(),
        );
        AggregateType::Entity
    });
    let source: &str = row.try_get(11).unwrap_or_default();
    let source = EventSource::from_str(source).unwrap_or_else(|()| {
        flag("source", "not a known source".into(), source.to_owned());
        EventSource::Api
    });
    Ok(EventRecord {
        id: row.try_get(0)?,
        timestamp,
        aggregate_id: row.try_get(2)?,
        aggregate_type,
        event_type: row.try_get(4)?,
        user_id: row.try_get(5)?,
        data,
        metadata,
        version: row.try_get(8)?,
        causation_id: row.try_get(9)?,
        correlation_id: row.try_get(10)?,
        source,
        position: row.try_get(12)?,
        unreadable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `synap_append` (migrations/repeatable/20_streams.sql) runs [`APPEND_SQL`] word for word:
    /// through a pooler and directly connected, an append is the same statement.
    #[test]
    fn the_pooled_append_function_runs_the_append_statement() {
        let file = include_str!("../../../migrations/repeatable/20_streams.sql");
        let start = file
            .find("CREATE OR REPLACE FUNCTION synap_append(")
            .expect("synap_append is defined");
        let body = &file[start..];
        let body = &body[body.find("RETURN QUERY").expect("a RETURN QUERY") + "RETURN QUERY".len()..];
        let body = &body[..body.find(";\nEND").expect("the statement ends the function")];
        let words = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        assert_eq!(words(body), words(&with_dual_write(APPEND_SQL, None).unwrap()));
        assert!(PLANNED_APPEND_SIGNATURE.starts_with("synap_append("));
    }
}
