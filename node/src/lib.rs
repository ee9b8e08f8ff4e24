//! `@synap/database`: the Node.js binding of `synap-events`.
//!
//! A thin adapter: JavaScript values in, core calls, JavaScript values and errors out. Every rule
//! lives in the core crate.
#![deny(clippy::all)]

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::FutureExt;
use napi::bindgen_prelude::*;
use napi_derive::napi;
use serde_json::Value;
use synap_events as core;

/// What an aggregate is.
#[napi(string_enum)]
#[allow(clippy::upper_case_acronyms)]
pub enum AggregateType {
    /// `entity`: notes, tasks, documents.
    #[napi(value = "entity")]
    ENTITY,
    /// `relation`: a link between entities.
    #[napi(value = "relation")]
    RELATION,
    /// `user`: a user account.
    #[napi(value = "user")]
    USER,
    /// `system`: the system itself.
    #[napi(value = "system")]
    SYSTEM,
}

/// Where an event came from.
#[napi(string_enum)]
#[allow(clippy::upper_case_acronyms)]
pub enum EventSource {
    /// `api`: a user action through the API.
    #[napi(value = "api")]
    API,
    /// `automation`: a rule or workflow.
    #[napi(value = "automation")]
    AUTOMATION,
    /// `sync`: a device or integration sync.
    #[napi(value = "sync")]
    SYNC,
    /// `migration`: copied from the legacy events table.
    #[napi(value = "migration")]
    MIGRATION,
    /// `system`: the system itself.
    #[napi(value = "system")]
    SYSTEM,
}

impl From<core::AggregateType> for AggregateType {
    fn from(t: core::AggregateType) -> Self {
        match t {
            core::AggregateType::Entity => AggregateType::ENTITY,
            core::AggregateType::Relation => AggregateType::RELATION,
            core::AggregateType::User => AggregateType::USER,
            core::AggregateType::System => AggregateType::SYSTEM,
        }
    }
}

impl From<&AggregateType> for core::AggregateType {
    fn from(t: &AggregateType) -> Self {
        match t {
            AggregateType::ENTITY => core::AggregateType::Entity,
            AggregateType::RELATION => core::AggregateType::Relation,
            AggregateType::USER => core::AggregateType::User,
            AggregateType::SYSTEM => core::AggregateType::System,
        }
    }
}

impl From<core::EventSource> for EventSource {
    fn from(s: core::EventSource) -> Self {
        match s {
            core::EventSource::Api => EventSource::API,
            core::EventSource::Automation => EventSource::AUTOMATION,
            core::EventSource::Sync => EventSource::SYNC,
            core::EventSource::Migration => EventSource::MIGRATION,
            core::EventSource::System => EventSource::SYSTEM,
        }
    }
}

/// An event to append. Objects with extra keys are accepted; `undefined` members count as absent.
#[napi(object)]
pub struct AppendEventData {
    /// Event id (UUID); generated when absent. Supplying it makes a retried append idempotent.
    pub id: Option<String>,
    /// When it happened; the database's clock when absent.
    pub timestamp: Option<DateTime<Utc>>,
    /// The aggregate (UUID).
    pub aggregate_id: String,
    /// The aggregate's type; fixed by its first event.
    pub aggregate_type: AggregateType,
    /// Dotted lowercase name, e.g. `entity.created`.
    pub event_type: String,
    /// The acting user.
    pub user_id: String,
    /// The change (deltas only), a JSON object.
    #[napi(ts_type = "Record<string, unknown>")]
    pub data: Value,
    /// Optional JSON object about the event.
    #[napi(ts_type = "Record<string, unknown>")]
    pub metadata: Option<Value>,
    /// The aggregate's version after this event: current version + 1 (1 creates it).
    pub version: u32,
    /// The event that caused this one (UUID).
    pub causation_id: Option<String>,
    /// The workflow this event belongs to (UUID).
    pub correlation_id: Option<String>,
    /// Where it came from; `api` when absent.
    pub source: Option<EventSource>,
}

/// A stored event.
#[napi(object)]
pub struct EventRecord {
    /// Event id (UUID).
    pub id: String,
    /// When it happened.
    pub timestamp: DateTime<Utc>,
    /// The aggregate (UUID).
    pub aggregate_id: String,
    /// The aggregate's type.
    pub aggregate_type: AggregateType,
    /// Dotted lowercase event name.
    pub event_type: String,
    /// The acting user.
    pub user_id: String,
    /// The delta.
    #[napi(ts_type = "Record<string, unknown>")]
    pub data: Value,
    /// Metadata; absent when none was given.
    #[napi(ts_type = "Record<string, unknown>")]
    pub metadata: Option<Value>,
    /// The aggregate's version after this event.
    pub version: u32,
    /// The event that caused this one; absent when none.
    pub causation_id: Option<String>,
    /// The workflow; absent when none.
    pub correlation_id: Option<String>,
    /// Where it came from.
    pub source: EventSource,
    /// Global insert order across aggregates (gaps are possible).
    pub position: i64,
}

impl From<core::EventRecord> for EventRecord {
    fn from(r: core::EventRecord) -> Self {
        EventRecord {
            id: r.id.to_string(),
            timestamp: r.timestamp,
            aggregate_id: r.aggregate_id.to_string(),
            aggregate_type: r.aggregate_type.into(),
            event_type: r.event_type,
            user_id: r.user_id,
            data: r.data,
            metadata: r.metadata,
            version: r.version as u32,
            causation_id: r.causation_id.map(|u| u.to_string()),
            correlation_id: r.correlation_id.map(|u| u.to_string()),
            source: r.source.into(),
            position: r.position,
        }
    }
}

/// Options of `getAggregateStream`.
#[napi(object)]
pub struct EventStreamOptions {
    /// First version to return (inclusive); default 1.
    pub from_version: Option<i32>,
    /// Last version to return (inclusive); default the latest.
    pub to_version: Option<i32>,
    /// Only these event types.
    pub event_types: Option<Vec<String>>,
}

/// Options of `getUserStream`.
#[napi(object)]
pub struct UserStreamOptions {
    /// How many days back from now; default 7.
    pub days: Option<i64>,
    /// Most events returned; default 1000.
    pub limit: Option<i64>,
    /// Only these event types.
    pub event_types: Option<Vec<String>>,
    /// Only these aggregate types.
    pub aggregate_types: Option<Vec<AggregateType>>,
}

/// Filters of `countEvents`; they combine with AND.
#[napi(object)]
pub struct CountEventsOptions {
    /// Only this user's events.
    pub user_id: Option<String>,
    /// Only this event type.
    pub event_type: Option<String>,
    /// Only this aggregate type.
    pub aggregate_type: Option<AggregateType>,
    /// Only events at or after this time.
    pub from_date: Option<DateTime<Utc>>,
    /// Only events before this time.
    pub to_date: Option<DateTime<Utc>>,
}

/// Settings of `new EventRepository(options)`.
#[napi(object)]
pub struct RepositoryOptions {
    /// PostgreSQL connection string; default `process.env.DATABASE_URL` at first use.
    pub connection_string: Option<String>,
    /// Largest number of pooled connections; default 10.
    pub pool_size: Option<u32>,
    /// How long opening a connection may take, in ms; default 10000.
    pub connect_timeout_ms: Option<u32>,
    /// How long a call waits for a free connection before `POOL_TIMEOUT`, in ms; default 30000.
    pub acquire_timeout_ms: Option<u32>,
    /// Server-side statement timeout in ms; default: the server's.
    pub statement_timeout_ms: Option<u32>,
    /// Schema holding the tables (lowercase letters, digits, `_`); default: the server's search_path.
    pub schema: Option<String>,
    /// `auto` (default), `timescaledb` or `native`: how `migrate()` creates events_v2.
    pub storage_mode: Option<String>,
    /// Largest `data` or `metadata`, in bytes of JSON; default 1 MiB.
    pub max_data_bytes: Option<u32>,
    /// During the switch-over: also write every appended event into this legacy table (e.g.
    /// `events`), in the same statement, so old readers keep working.
    pub dual_write_legacy_table: Option<String>,
}

/// Options of `migrateLegacyEvents`.
#[napi(object)]
pub struct LegacyMigrationOptions {
    /// The legacy table; default `events`.
    pub legacy_table: Option<String>,
    /// Rows per transaction; default 5000.
    pub batch_size: Option<u32>,
    /// Migrate at most this many rows in this call.
    pub limit: Option<i64>,
    /// Check every row and report, writing nothing.
    pub dry_run: Option<bool>,
    /// Continue a run that was interrupted (required once a run has started).
    pub resume: Option<bool>,
    /// `skip` (default: record bad rows and go on) or `fail` (stop before the first bad row).
    pub on_invalid: Option<String>,
}

/// Options of `repairConsumer`.
#[napi(object)]
pub struct RepairConsumerOptions {
    /// Keep the consumer's checkpoint instead of going back to the start.
    pub accept: Option<bool>,
    /// Say what would happen; change nothing.
    pub dry_run: Option<bool>,
}

/// Options of `applyRetention`.
#[napi(object)]
pub struct RetentionOptions {
    /// Age such as `90d`, `12w` or `2y`: events older than now minus it go.
    pub older_than: String,
    /// List what would go, remove nothing.
    pub dry_run: Option<bool>,
    /// Cut through aggregates that have events on both sides of the cut-off.
    pub force: Option<bool>,
}

/// What `migrate()` did.
#[napi(object)]
pub struct MigrationReport {
    /// Versions applied now.
    pub applied: Vec<i32>,
    /// Versions that had been applied before.
    pub already_applied: Vec<i32>,
    /// `timescaledb` or `native`.
    pub storage_mode: String,
}

enum Source {
    Env,
    Config(Box<core::RepositoryConfig>),
}

/// The event store. `new EventRepository()` reads `DATABASE_URL` at first use; pass a connection
/// string or options to configure it. Connections open lazily and close with `close()`; an open
/// pool does not keep the process alive.
#[napi]
pub struct EventRepository {
    source: Arc<Source>,
    inner: Arc<Mutex<Option<core::EventRepository>>>,
    /// Set by `close()`, also before the first call opened anything.
    closed: Arc<std::sync::atomic::AtomicBool>,
}

#[napi]
impl EventRepository {
    /// A repository; nothing connects until the first call.
    ///
    /// Throws `INVALID_CONFIG` for unusable options.
    #[napi(constructor, catch_unwind)]
    pub fn new(
        env: Env,
        #[napi(ts_arg_type = "RepositoryOptions | string")] options: Option<Either<String, RepositoryOptions>>,
    ) -> Result<Self> {
        let source = match options {
            None => Source::Env,
            Some(Either::A(url)) => Source::Config(Box::new(core::RepositoryConfig::new(url))),
            Some(Either::B(o)) => {
                let mut config = match o.connection_string {
                    Some(url) => core::RepositoryConfig::new(url),
                    None => match core::RepositoryConfig::from_env() {
                        Ok(c) => c,
                        // Without a URL yet, keep the options and fail at first use.
                        Err(_) => core::RepositoryConfig::new(String::new()),
                    },
                };
                if let Some(n) = o.pool_size {
                    config.pool_size = n as usize;
                }
                if let Some(ms) = o.connect_timeout_ms {
                    config.connect_timeout = Duration::from_millis(ms.into());
                }
                if let Some(ms) = o.acquire_timeout_ms {
                    config.acquire_timeout = Duration::from_millis(ms.into());
                }
                if let Some(ms) = o.statement_timeout_ms {
                    config.statement_timeout = Some(Duration::from_millis(ms.into()));
                }
                config.schema = o.schema;
                if let Some(mode) = o.storage_mode {
                    config.storage_mode = core::StorageMode::parse(&mode).map_err(|e| to_js_error(&env, e))?;
                }
                if let Some(bytes) = o.max_data_bytes {
                    config.limits.max_data_bytes = bytes as usize;
                }
                config.dual_write_legacy_table = o.dual_write_legacy_table;
                Source::Config(Box::new(config))
            }
        };
        let repo = EventRepository {
            source: Arc::new(source),
            inner: Arc::new(Mutex::new(None)),
            closed: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        if matches!(*repo.source, Source::Config(_)) {
            // Report bad options now rather than at the first call, unless only the URL is missing.
            if let Source::Config(c) = &*repo.source {
                if !c.database_url.is_empty() {
                    repo.repository().map_err(|e| to_js_error(&env, e))?;
                }
            }
        }
        Ok(repo)
    }

    fn repository(&self) -> core::Result<core::EventRepository> {
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(core::Error::ConnectionFailed {
                message: "the repository was closed".into(),
            });
        }
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(repo) = &*guard {
            return Ok(repo.clone());
        }
        let repo = match &*self.source {
            Source::Env => core::EventRepository::from_env()?,
            Source::Config(c) if c.database_url.is_empty() => {
                let mut c = (**c).clone();
                c.database_url = core::RepositoryConfig::from_env()?.database_url;
                core::EventRepository::new(c)?
            }
            Source::Config(c) => core::EventRepository::new((**c).clone())?,
        };
        *guard = Some(repo.clone());
        Ok(repo)
    }

    fn run<'env, T, V, F, Fut>(&self, env: &'env Env, work: F) -> Result<PromiseRaw<'env, V>>
    where
        T: Send + 'static,
        V: ToNapiValue + 'static,
        F: FnOnce(core::EventRepository) -> Fut,
        Fut: Future<Output = core::Result<T>> + Send + 'static,
        T: IntoJs<V>,
    {
        let fut = match self.repository() {
            Ok(repo) => futures_util::future::Either::Left(work(repo)),
            Err(e) => futures_util::future::Either::Right(std::future::ready(Err(e))),
        };
        spawn(env, fut)
    }

    /// Applies pending schema migrations (safe to repeat, and from several processes at once).
    #[napi(catch_unwind)]
    pub fn migrate<'env>(&self, env: &'env Env) -> Result<PromiseRaw<'env, MigrationReport>> {
        self.run(env, |repo| async move { repo.migrate().await })
    }

    /// Appends one event with optimistic locking: `version` must be the aggregate's version + 1.
    ///
    /// Rejects with `VALIDATION_FAILED` (with `field`), `CONCURRENCY_CONFLICT` (with
    /// `aggregateId`, `expectedVersion`, `actualVersion`) or `AGGREGATE_TYPE_MISMATCH`; nothing is
    /// written then.
    #[napi(catch_unwind, ts_args_type = "event: AppendEventData")]
    pub fn append<'env>(&self, env: &'env Env, event: Unknown<'env>) -> Result<PromiseRaw<'env, EventRecord>> {
        let event = js_to_json(env, event);
        self.run(env, move |repo| async move { repo.append_json(&event?).await })
    }

    /// Appends events atomically (all or none), any number of them.
    ///
    /// Rejects like `append`, with `field` paths such as `events[3].version`.
    #[napi(catch_unwind, ts_args_type = "events: AppendEventData[]")]
    pub fn append_batch<'env>(
        &self,
        env: &'env Env,
        events: Unknown<'env>,
    ) -> Result<PromiseRaw<'env, Vec<EventRecord>>> {
        let events = js_to_json(env, events);
        self.run(env, move |repo| async move { repo.append_batch_json(&events?).await })
    }

    /// The aggregate's events in version order; `[]` for an unknown aggregate.
    #[napi(catch_unwind)]
    pub fn get_aggregate_stream<'env>(
        &self,
        env: &'env Env,
        aggregate_id: String,
        options: Option<EventStreamOptions>,
    ) -> Result<PromiseRaw<'env, Vec<EventRecord>>> {
        let id = core::validate::parse_uuid_arg("aggregateId", &aggregate_id);
        let options = options.map(|o| core::StreamOptions {
            from_version: o.from_version,
            to_version: o.to_version,
            event_types: o.event_types,
        });
        self.run(env, move |repo| async move {
            repo.get_aggregate_stream(id?, &options.unwrap_or_default()).await
        })
    }

    /// The aggregate's current version, or `null` when it has no events.
    #[napi(catch_unwind)]
    pub fn get_aggregate_version<'env>(
        &self,
        env: &'env Env,
        aggregate_id: String,
    ) -> Result<PromiseRaw<'env, Option<i32>>> {
        let id = core::validate::parse_uuid_arg("aggregateId", &aggregate_id);
        self.run(env, move |repo| async move { repo.get_aggregate_version(id?).await })
    }

    /// A user's recent events, newest first (`days` 7 and `limit` 1000 by default).
    #[napi(catch_unwind)]
    pub fn get_user_stream<'env>(
        &self,
        env: &'env Env,
        user_id: String,
        options: Option<UserStreamOptions>,
    ) -> Result<PromiseRaw<'env, Vec<EventRecord>>> {
        let mut opts = core::UserStreamOptions::default();
        if let Some(o) = options {
            opts.days = o.days.unwrap_or(opts.days);
            opts.limit = o.limit.unwrap_or(opts.limit);
            opts.event_types = o.event_types;
            opts.aggregate_types = o.aggregate_types.map(|ts| ts.iter().map(Into::into).collect());
        }
        self.run(
            env,
            move |repo| async move { repo.get_user_stream(&user_id, &opts).await },
        )
    }

    /// Every event of a workflow, oldest first.
    #[napi(catch_unwind)]
    pub fn get_correlated_events<'env>(
        &self,
        env: &'env Env,
        correlation_id: String,
    ) -> Result<PromiseRaw<'env, Vec<EventRecord>>> {
        let id = core::validate::parse_uuid_arg("correlationId", &correlation_id);
        self.run(env, move |repo| async move { repo.get_correlated_events(id?).await })
    }

    /// The latest events of one type, newest first (`limit` 100 by default).
    #[napi(catch_unwind)]
    pub fn get_events_by_type<'env>(
        &self,
        env: &'env Env,
        event_type: String,
        limit: Option<i64>,
    ) -> Result<PromiseRaw<'env, Vec<EventRecord>>> {
        self.run(env, move |repo| async move {
            repo.get_events_by_type(&event_type, limit.unwrap_or(100)).await
        })
    }

    /// How many events match every given filter.
    #[napi(catch_unwind)]
    pub fn count_events<'env>(
        &self,
        env: &'env Env,
        options: Option<CountEventsOptions>,
    ) -> Result<PromiseRaw<'env, i64>> {
        let filter = options
            .map(|o| core::CountFilter {
                user_id: o.user_id,
                event_type: o.event_type,
                aggregate_type: o.aggregate_type.as_ref().map(Into::into),
                from_date: o.from_date,
                to_date: o.to_date,
            })
            .unwrap_or_default();
        self.run(env, move |repo| async move { repo.count_events(&filter).await })
    }

    /// Recomputes the `events_daily` days that received events since the last refresh (all days
    /// when `full`). Resolves to the number of days recomputed.
    #[napi(catch_unwind)]
    pub fn refresh_analytics<'env>(&self, env: &'env Env, full: Option<bool>) -> Result<PromiseRaw<'env, i32>> {
        self.run(env, move |repo| async move {
            repo.refresh_analytics(full.unwrap_or(false)).await
        })
    }

    /// A handle limited to `userId`'s events and streams by the database's row-level security:
    /// each call runs in a transaction that sets `app.current_user_id` locally. Shares the pool.
    ///
    /// Throws `VALIDATION_FAILED` for a blank user id and `INVALID_CONFIG` when no connection
    /// string is known yet.
    #[napi(catch_unwind)]
    pub fn for_user(&self, env: Env, user_id: String) -> Result<EventRepository> {
        let scoped = self
            .repository()
            .and_then(|repo| repo.for_user(&user_id))
            .map_err(|e| to_js_error(&env, e))?;
        Ok(EventRepository {
            source: self.source.clone(),
            inner: Arc::new(Mutex::new(Some(scoped))),
            closed: self.closed.clone(),
        })
    }

    /// Events of every aggregate in global order, after `after` (from the start without it).
    /// Never skips an event whose transaction commits late: pass the returned `checkpoint` to
    /// the next call.
    #[napi(catch_unwind)]
    pub fn read_all<'env>(
        &self,
        env: &'env Env,
        options: Option<ReadAllOptions>,
    ) -> Result<PromiseRaw<'env, ReadAllPage>> {
        let (after, limit) = match options {
            Some(o) => (o.after.map(|c| c.parse()).transpose(), o.limit.unwrap_or(1000)),
            None => (Ok(None), 1000),
        };
        self.run(
            env,
            move |repo| async move { repo.read_all(after?.as_ref(), limit).await },
        )
    }

    /// An async iterator over every event in global order: catches up, then follows new events
    /// (woken by LISTEN/NOTIFY, polling as a fallback). With `consumer`, resumes from that
    /// consumer's stored checkpoint and stores progress as it goes: at-least-once, a batch is
    /// acknowledged when the loop asks for the event after it.
    ///
    /// `for await (const event of repo.subscribe({ consumer: 'search-index' })) { ... }`
    #[napi(catch_unwind)]
    pub fn subscribe(&self, env: Env, options: Option<SubscribeOptions>) -> Result<EventSubscription> {
        let repo = self.repository().map_err(|e| to_js_error(&env, e))?;
        let mut core_options = core::SubscribeOptions::default();
        if let Some(o) = options {
            core_options.consumer = o.consumer;
            core_options.from = o
                .from
                .map(|c| c.parse())
                .transpose()
                .map_err(|e| to_js_error(&env, e))?;
            if let Some(n) = o.batch_size {
                core_options.batch_size = n;
            }
            if let Some(ms) = o.poll_interval_ms {
                core_options.poll_interval = Duration::from_millis(ms.into());
            }
        }
        Ok(EventSubscription {
            stop: Arc::new(tokio::sync::Notify::new()),
            stopped: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            state: Arc::new(tokio::sync::Mutex::new(SubscriptionState {
                repo,
                options: Some(core_options),
                subscription: None,
                buffer: std::collections::VecDeque::new(),
            })),
        })
    }

    /// Copies the legacy `events` table into events_v2 exactly once (see docs/migration.md);
    /// safe to interrupt and resume. Resolves to the report (migrated, skipped, failed rows).
    #[napi(catch_unwind, ts_return_type = "Promise<Record<string, unknown>>")]
    pub fn migrate_legacy_events<'env>(
        &self,
        env: &'env Env,
        options: Option<LegacyMigrationOptions>,
    ) -> Result<PromiseRaw<'env, Value>> {
        let mut opts = core::LegacyMigrationOptions::default();
        let mut on_invalid = Ok(core::OnInvalid::Skip);
        if let Some(o) = options {
            if let Some(t) = o.legacy_table {
                opts.legacy_table = t;
            }
            if let Some(n) = o.batch_size {
                opts.batch_size = n as usize;
            }
            opts.limit = o.limit.map(|n| n.max(0) as u64);
            opts.dry_run = o.dry_run.unwrap_or(false);
            opts.resume = o.resume.unwrap_or(false);
            if let Some(mode) = o.on_invalid {
                on_invalid = core::OnInvalid::parse(&mode);
            }
        }
        self.run(env, move |repo| async move {
            opts.on_invalid = on_invalid?;
            let report = repo.migrate_legacy_events(&opts, &mut |_| {}).await?;
            to_json_value(&report)
        })
    }

    /// Compares the legacy table with events_v2 (counts per user and type, checksums of ids,
    /// types, timestamps and data) and resolves to what differs.
    #[napi(catch_unwind, ts_return_type = "Promise<Record<string, unknown>>")]
    pub fn verify_legacy<'env>(&self, env: &'env Env, legacy_table: Option<String>) -> Result<PromiseRaw<'env, Value>> {
        let table = legacy_table.unwrap_or_else(|| core::DEFAULT_LEGACY_TABLE.to_owned());
        self.run(env, move |repo| async move {
            to_json_value(&repo.verify_legacy(&table).await?)
        })
    }

    /// Verifies, then drops the legacy table; refuses without `confirm: true` or when verify
    /// finds a difference.
    #[napi(catch_unwind, ts_return_type = "Promise<Record<string, unknown>>")]
    pub fn drop_legacy_table<'env>(
        &self,
        env: &'env Env,
        legacy_table: Option<String>,
        confirm: Option<bool>,
    ) -> Result<PromiseRaw<'env, Value>> {
        let table = legacy_table.unwrap_or_else(|| core::DEFAULT_LEGACY_TABLE.to_owned());
        let confirm = confirm.unwrap_or(false);
        self.run(env, move |repo| async move {
            to_json_value(&repo.drop_legacy_table(&table, confirm).await?)
        })
    }

    /// Removes events older than `olderThan` by dropping whole partitions or chunks; refuses to
    /// cut through a live aggregate unless `force`.
    #[napi(catch_unwind, ts_return_type = "Promise<Record<string, unknown>>")]
    pub fn apply_retention<'env>(&self, env: &'env Env, options: RetentionOptions) -> Result<PromiseRaw<'env, Value>> {
        let cutoff = core::RetentionAge::parse(&options.older_than).and_then(|age| age.cutoff(Utc::now()));
        let dry_run = options.dry_run.unwrap_or(false);
        let force = options.force.unwrap_or(false);
        self.run(env, move |repo| async move {
            let opts = core::RetentionOptions {
                cutoff: cutoff?,
                dry_run,
                force,
            };
            to_json_value(&repo.apply_retention(&opts).await?)
        })
    }

    /// Store-wide numbers: events, aggregates, partitions, storage mode.
    #[napi(catch_unwind, ts_return_type = "Promise<Record<string, unknown>>")]
    pub fn stats<'env>(&self, env: &'env Env) -> Result<PromiseRaw<'env, Value>> {
        self.run(env, |repo| async move { to_json_value(&repo.stats().await?) })
    }

    /// Every named consumer of the global feed: `{ name, checkpoint, updatedAt, needsRepair }`.
    #[napi(catch_unwind, ts_return_type = "Promise<Array<Record<string, unknown>>>")]
    pub fn consumers<'env>(&self, env: &'env Env) -> Result<PromiseRaw<'env, Value>> {
        self.run(env, |repo| async move { to_json_value(&repo.consumers().await?) })
    }

    /// Repairs a named consumer whose checkpoint the old feed ordering stored (it may have passed
    /// over events): it goes back to the start and gets every event again, or, with
    /// `accept: true`, keeps its checkpoint. `dryRun` says what would happen. Until then,
    /// `subscribe` with that consumer rejects with `CONSUMER_NEEDS_REPAIR`.
    #[napi(catch_unwind, ts_return_type = "Promise<Record<string, unknown>>")]
    pub fn repair_consumer<'env>(
        &self,
        env: &'env Env,
        consumer: String,
        options: Option<RepairConsumerOptions>,
    ) -> Result<PromiseRaw<'env, Value>> {
        let accept = options.as_ref().and_then(|o| o.accept).unwrap_or(false);
        let dry_run = options.as_ref().and_then(|o| o.dry_run).unwrap_or(false);
        self.run(env, move |repo| async move {
            to_json_value(&repo.repair_consumer(&consumer, accept, dry_run).await?)
        })
    }

    /// Closes the connection pool. Later calls reject with `CONNECTION_FAILED`.
    #[napi(catch_unwind)]
    pub fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(repo) = &*guard {
            repo.close();
        }
    }
}

/// A place in the global order (from `readAll`): pass it back to continue after it.
#[napi(object)]
#[derive(Clone)]
pub struct Checkpoint {
    /// The writing transaction of the last event read (a 64-bit number, as a string).
    pub txid: String,
    /// The position of the last event read.
    pub position: i64,
}

impl Checkpoint {
    fn parse(&self) -> core::Result<core::Checkpoint> {
        core::Checkpoint::parse(&self.txid, self.position)
    }
}

/// Options of `readAll`.
#[napi(object)]
pub struct ReadAllOptions {
    /// Continue after this checkpoint; from the start when absent.
    pub after: Option<Checkpoint>,
    /// Most events returned; default 1000.
    pub limit: Option<i64>,
}

/// A page of `readAll`.
#[napi(object)]
pub struct ReadAllPage {
    /// Events in global order.
    pub events: Vec<EventRecord>,
    /// Where the next read continues.
    pub checkpoint: Checkpoint,
}

impl IntoJs<ReadAllPage> for core::Page {
    fn into_js(self) -> ReadAllPage {
        ReadAllPage {
            events: self.events.into_iter().map(Into::into).collect(),
            checkpoint: Checkpoint {
                txid: self.checkpoint.txid.to_string(),
                position: self.checkpoint.position,
            },
        }
    }
}

/// Options of `subscribe`.
#[napi(object)]
pub struct SubscribeOptions {
    /// A named consumer resumes from its stored checkpoint and stores progress.
    pub consumer: Option<String>,
    /// Where to start when the consumer has no stored checkpoint; default the beginning.
    pub from: Option<Checkpoint>,
    /// Events fetched per round trip; default 100.
    pub batch_size: Option<i64>,
    /// How often to poll when no notification arrives, in ms; default 1000.
    pub poll_interval_ms: Option<u32>,
}

struct SubscriptionState {
    repo: core::EventRepository,
    options: Option<core::SubscribeOptions>,
    subscription: Option<core::Subscription>,
    buffer: std::collections::VecDeque<core::EventRecord>,
}

/// The async iterator returned by `subscribe`. Breaking out of the loop closes it.
#[napi(async_iterator)]
pub struct EventSubscription {
    state: Arc<tokio::sync::Mutex<SubscriptionState>>,
    /// Set and signalled by `return()`: a `next()` waiting for new events gives up at once.
    stop: Arc<tokio::sync::Notify>,
    stopped: Arc<std::sync::atomic::AtomicBool>,
}

#[napi]
impl AsyncGenerator for EventSubscription {
    type Yield = EventRecord;
    type Next = ();
    type Return = ();

    fn next(&mut self, _value: Option<()>) -> impl Future<Output = Result<Option<EventRecord>>> + Send + 'static {
        let state = self.state.clone();
        let stop = self.stop.clone();
        let stopped = self.stopped.clone();
        async move {
            let step = AssertUnwindSafe(async move {
                let mut state = state.lock().await;
                if stopped.load(std::sync::atomic::Ordering::SeqCst) {
                    return Ok(None);
                }
                if state.subscription.is_none() {
                    let Some(options) = state.options.take() else {
                        return Ok(None); // closed
                    };
                    let subscription = state.repo.subscribe(options).await?;
                    state.subscription = Some(subscription);
                }
                while state.buffer.is_empty() {
                    let Some(subscription) = state.subscription.as_mut() else {
                        return Ok(None);
                    };
                    let outcome = {
                        let batch = std::pin::pin!(subscription.next_batch());
                        let stopping = std::pin::pin!(stop.notified());
                        match futures_util::future::select(batch, stopping).await {
                            futures_util::future::Either::Left((batch, _)) => Some(batch),
                            futures_util::future::Either::Right(_) => None,
                        }
                    };
                    match outcome {
                        Some(batch) => state.buffer.extend(batch?),
                        None => {
                            state.subscription = None;
                            return Ok(None);
                        }
                    }
                }
                Ok(state.buffer.pop_front())
            })
            .catch_unwind()
            .await;
            match step {
                Ok(Ok(event)) => Ok(event.map(Into::into)),
                Ok(Err(e)) => Err(coded_reason(e)),
                Err(panic) => Err(coded_reason(core::Error::Internal {
                    message: panic_message(&panic),
                })),
            }
        }
    }

    fn complete(&mut self, _value: Option<()>) -> impl Future<Output = Result<Option<EventRecord>>> + Send + 'static {
        let state = self.state.clone();
        // Wake a `next()` that waits for events (a stored permit covers one about to wait).
        self.stopped.store(true, std::sync::atomic::Ordering::SeqCst);
        self.stop.notify_one();
        async move {
            let mut state = state.lock().await;
            state.subscription = None;
            state.options = None;
            state.buffer.clear();
            Ok(None)
        }
    }
}

/// An error raised outside a JavaScript call frame (the iterator's promise): the code leads
/// the message and is the error's `code`.
fn coded_reason(e: core::Error) -> Error {
    Error::new(Status::GenericFailure, format!("{}: {e}", e.code()))
}

/// Checks an event the way `append` does, returning the problems as data.
#[napi(catch_unwind, ts_args_type = "event: unknown", ts_return_type = "ValidationReport")]
pub fn validate_event(env: &Env, event: Unknown) -> Result<Value> {
    let value = js_to_json(env, event).map_err(|e| to_js_error(env, e))?;
    let report = core::validate::report(&value, &core::Limits::default());
    serde_json::to_value(report).map_err(|e| Error::from_reason(e.to_string()))
}

/// Replays one aggregate's events (in version order) into `{ state, version, deleted,
/// lastTimestamp }` — the same fold the wasm build runs in browsers.
///
/// Throws an Error with `code` (`VERSION_GAP`, `DUPLICATE_VERSION`, `UNORDERED_EVENTS`,
/// `MIXED_AGGREGATES`, `INVALID_EVENT`, `INVALID_OPTIONS`) and `index` for bad input.
#[napi(
    catch_unwind,
    ts_args_type = "events: Array<EventRecord | Record<string, unknown>>, options?: FoldOptions",
    ts_return_type = "FoldResult"
)]
pub fn fold_events(env: &Env, events: Unknown, options: Option<Unknown>) -> Result<Value> {
    let events = js_to_json(env, events).map_err(|e| to_js_error(env, e))?;
    let options = match options {
        Some(o) => js_to_json(env, o).map_err(|e| to_js_error(env, e))?,
        None => Value::Null,
    };
    core::interop::fold_events_json(&events, &options).map_err(|e| to_js_error(env, e))
}

/// `foldEvents` for events given as JSON text: skips building and re-serializing JS objects.
///
/// Throws like `foldEvents`, and `VALIDATION_FAILED` when the text is not JSON.
#[napi(
    catch_unwind,
    ts_args_type = "eventsJson: string, options?: FoldOptions",
    ts_return_type = "FoldResult"
)]
pub fn fold_events_json(env: &Env, events_json: String, options: Option<Unknown>) -> Result<Value> {
    let options = match options {
        Some(o) => js_to_json(env, o).map_err(|e| to_js_error(env, e))?,
        None => Value::Null,
    };
    core::interop::fold_events_json_text(&events_json, &options).map_err(|e| to_js_error(env, e))
}

/// Applies `delta` to `state` as a JSON Merge Patch (RFC 7396).
#[napi(
    catch_unwind,
    ts_args_type = "state: unknown, delta: unknown",
    ts_return_type = "unknown"
)]
pub fn apply_delta(env: &Env, state: Unknown, delta: Unknown) -> Result<Value> {
    let state = js_to_json(env, state).map_err(|e| to_js_error(env, e))?;
    let delta = js_to_json(env, delta).map_err(|e| to_js_error(env, e))?;
    Ok(core::interop::apply_delta_json(&state, &delta))
}

/// Options of `foldEvents`.
#[napi(object)]
pub struct FoldOptions {
    /// Stop after this version (inclusive).
    pub to_version: Option<u32>,
    /// Include only events at or before this time (a Date, an ISO string or ms).
    #[napi(ts_type = "Date | string | number")]
    pub to_timestamp: Option<Value>,
    /// Also return the state after each event.
    pub history: Option<bool>,
    /// Which data keys are bookkeeping rather than state.
    pub bookkeeping: Option<BookkeepingRule>,
    /// Start from a snapshot instead of from nothing.
    pub from: Option<FoldSnapshot>,
}

/// Which keys of an event's data are left out of the state.
#[napi(object)]
pub struct BookkeepingRule {
    /// Keys always left out; default `["updatedFields"]`.
    pub ignore_keys: Option<Vec<String>>,
    /// Leave out `previousX` when the same data has `x`; default true.
    pub drop_previous_companions: Option<bool>,
}

/// A state to continue folding from.
#[napi(object)]
pub struct FoldSnapshot {
    /// The state at `version`.
    #[napi(ts_type = "unknown")]
    pub state: Value,
    /// Its version.
    pub version: u32,
    /// Whether it was deleted.
    pub deleted: Option<bool>,
}

/// The folded aggregate.
#[napi(object)]
pub struct FoldResult {
    /// The state; `null` when no event was applied.
    #[napi(ts_type = "Record<string, unknown> | null")]
    pub state: Value,
    /// Version of the last applied event (0 when none).
    pub version: u32,
    /// Whether the aggregate is deleted.
    pub deleted: bool,
    /// ISO timestamp of the last applied event, or null.
    pub last_timestamp: Option<String>,
    /// The state after each event, when `history` was requested.
    pub history: Option<Vec<FoldHistoryStep>>,
}

/// The aggregate right after one event.
#[napi(object)]
pub struct FoldHistoryStep {
    /// The event's version.
    pub version: u32,
    /// The event's ISO timestamp.
    pub timestamp: String,
    /// The event's type.
    pub event_type: String,
    /// The state after the event.
    #[napi(ts_type = "Record<string, unknown> | null")]
    pub state: Value,
    /// Whether the aggregate was deleted after it.
    pub deleted: bool,
}

/// The result of `validateEvent`.
#[napi(object)]
pub struct ValidationReport {
    /// True when `errors` is empty.
    pub valid: bool,
    /// Every problem found.
    pub errors: Vec<ValidationIssue>,
}

/// One problem found by `validateEvent`.
#[napi(object)]
pub struct ValidationIssue {
    /// Path of the field, e.g. `data.tags[2]`.
    pub path: String,
    /// Stable code, e.g. `INVALID_UUID`.
    pub code: String,
    /// A sentence for people.
    pub message: String,
}

/// Converts a core result into the JavaScript value of a resolved promise.
trait IntoJs<V> {
    fn into_js(self) -> V;
}

impl IntoJs<EventRecord> for core::EventRecord {
    fn into_js(self) -> EventRecord {
        self.into()
    }
}

impl IntoJs<Vec<EventRecord>> for Vec<core::EventRecord> {
    fn into_js(self) -> Vec<EventRecord> {
        self.into_iter().map(Into::into).collect()
    }
}

impl IntoJs<MigrationReport> for core::MigrationReport {
    fn into_js(self) -> MigrationReport {
        MigrationReport {
            applied: self.applied,
            already_applied: self.already_applied,
            storage_mode: self.storage_mode,
        }
    }
}

macro_rules! into_js_as_is {
    ($($t:ty),*) => {$(
        impl IntoJs<$t> for $t {
            fn into_js(self) -> $t {
                self
            }
        }
    )*};
}
into_js_as_is!(i32, i64, Option<i32>, Value);

fn to_json_value(report: &impl serde::Serialize) -> core::Result<Value> {
    serde_json::to_value(report).map_err(|e| core::Error::Internal { message: e.to_string() })
}

/// Runs a core future on the runtime; resolves with its value or rejects with a coded Error.
/// A panic inside becomes an `INTERNAL_ERROR` rejection.
fn spawn<'env, T, V, Fut>(env: &'env Env, fut: Fut) -> Result<PromiseRaw<'env, V>>
where
    T: IntoJs<V> + Send + 'static,
    V: ToNapiValue + 'static,
    Fut: Future<Output = core::Result<T>> + Send + 'static,
{
    let guarded = async move {
        Ok(AssertUnwindSafe(fut).catch_unwind().await.unwrap_or_else(|panic| {
            Err(core::Error::Internal {
                message: panic_message(&panic),
            })
        }))
    };
    env.spawn_future_with_callback(guarded, |env, result: core::Result<T>| match result {
        Ok(value) => Ok(value.into_js()),
        Err(e) => Err(to_js_error(env, e)),
    })
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// A JavaScript `Error` with `code` and the core error's details as properties.
fn to_js_error(env: &Env, e: core::Error) -> Error {
    let code = e.code();
    let build = || -> Result<Error> {
        let mut obj = env.create_error(Error::new(Status::GenericFailure, e.to_string()))?;
        obj.set("code", code)?;
        for (key, value) in e.details() {
            obj.set(key, value)?;
        }
        Ok(Error::from(obj.to_unknown()))
    };
    build().unwrap_or_else(|_| Error::new(Status::GenericFailure, format!("{code}: {e}")))
}

/// JavaScript value to JSON exactly as `JSON.stringify` (what node-postgres sends) sees it:
/// `undefined` members dropped, Dates as ISO strings, `toJSON` honoured.
fn js_to_json(env: &Env, value: Unknown) -> core::Result<Value> {
    let text = (|| -> Result<Option<String>> {
        let json: Object = env.get_global()?.get_named_property("JSON")?;
        let stringify: Function<Unknown, Unknown> = json.get_named_property("stringify")?;
        let out = stringify.call(value)?;
        match out.get_type()? {
            ValueType::String => Ok(Some(unsafe { out.cast::<String>() }?)),
            _ => Ok(None),
        }
    })();
    match text {
        // serde_json refuses nesting deeper than 128 levels: bad input, not a bug.
        Ok(Some(text)) => {
            serde_json::from_str(&text).map_err(|e| core::Error::invalid_input(format!("unreadable input: {e}")))
        }
        Ok(None) => Ok(Value::Null),
        Err(e) => Err(core::Error::invalid_input(format!(
            "not JSON-serializable: {}",
            e.reason
        ))),
    }
}
