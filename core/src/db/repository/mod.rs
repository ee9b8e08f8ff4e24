//! [`EventRepository`]: appends with optimistic locking and stream reads.
//!
//! Rooms: this file holds the repository itself (its pool, configuration, scoped handles,
//! migrations and partition upkeep, subscriber wake-ups) and the reading of a stored row into a
//! record; [`append`] single appends; [`batch`] batch appends; [`read`] the reads, counts and
//! analytics. The consumer groups, the feed, replay, retention and the legacy migration add
//! their calls to [`EventRepository`] from their own modules.

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

mod append;
mod batch;
mod read;

use append::*;
use batch::*;
pub(crate) use read::STREAM_SQL;

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
                             version, causation_id, correlation_id, source, position, schema_version";

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

impl EventRepository {
    /// A stored event as this repository delivers it: read from a row of [`EVENT_COLUMNS`] and
    /// brought to its latest shape by the repository's upcasters.
    pub(crate) fn delivered(&self, row: &Row) -> Result<EventRecord> {
        let mut record = record_from_row(row)?;
        self.config.upcasters.upcast_record(&mut record);
        Ok(record)
    }
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
        schema_version: row.try_get(13)?,
        upcast_from: None,
    })
}
