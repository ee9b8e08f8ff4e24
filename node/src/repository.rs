//! The `EventRepository` class.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use napi::bindgen_prelude::*;
use napi_derive::napi;
use serde_json::Value;
use synap_events as core;

use crate::records::{EventRecord, MigrationReport, ReadAllPage, Records, ReplayResult, SnapshotAndTail};
use crate::subscription::EventSubscription;
use crate::{js_to_json, options_json, spawn, to_js_error, to_json_value, Checked, IntoJs, Json};

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
    closed: Arc<AtomicBool>,
    /// For a handle from `forUser`: the closed flag of the repository that owns the pool.
    owner_closed: Option<Arc<AtomicBool>>,
}

#[napi]
impl EventRepository {
    /// A repository; nothing connects until the first call.
    ///
    /// Throws `INVALID_CONFIG` for unusable options.
    #[napi(constructor, catch_unwind)]
    pub fn new(env: Env, #[napi(ts_arg_type = "RepositoryOptions | string")] options: Option<Unknown>) -> Result<Self> {
        let source = source_of(&env, options).map_err(|e| to_js_error(&env, e))?;
        let repo = EventRepository {
            source: Arc::new(source),
            inner: Arc::new(Mutex::new(None)),
            closed: Arc::new(AtomicBool::new(false)),
            owner_closed: None,
        };
        // Report bad options now rather than at the first call, unless only the URL is missing.
        if let Source::Config(c) = &*repo.source {
            if !c.database_url.is_empty() {
                repo.repository().map_err(|e| to_js_error(&env, e))?;
            }
        }
        Ok(repo)
    }

    fn repository(&self) -> core::Result<core::EventRepository> {
        let closed =
            self.closed.load(Ordering::SeqCst) || self.owner_closed.as_ref().is_some_and(|c| c.load(Ordering::SeqCst));
        if closed {
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
    /// `aggregateId`, `expectedVersion`, `actualVersion`), `AGGREGATE_TYPE_MISMATCH`,
    /// `DUPLICATE_EVENT_ID` or `PERMISSION_DENIED`; nothing is written then. A retry with the same
    /// `id` after a lost reply resolves to the stored event.
    #[napi(catch_unwind, ts_args_type = "event: AppendEventData")]
    pub fn append<'env>(&self, env: &'env Env, event: Unknown<'env>) -> Result<PromiseRaw<'env, EventRecord>> {
        let event = js_to_json(env, event, Checked::Events);
        self.run(env, move |repo| async move { repo.append_json(event?).await })
    }

    /// Appends events atomically (all or none), any number of them.
    ///
    /// Rejects like `append`, with `field` paths such as `events[3].version`. A retry of a batch
    /// whose events are all stored (same ids, same versions) resolves to the stored events.
    #[napi(
        catch_unwind,
        ts_return_type = "Promise<Array<EventRecord>>",
        ts_args_type = "events: AppendEventData[]"
    )]
    pub fn append_batch<'env>(&self, env: &'env Env, events: Unknown<'env>) -> Result<PromiseRaw<'env, Records>> {
        let events = js_to_json(env, events, Checked::Events);
        self.run(env, move |repo| async move { repo.append_batch_json(events?).await })
    }

    /// The aggregate's events in version order: the versions after `fromVersion` (default 0) up
    /// to and including `toVersion` (default the latest); `[]` for an unknown aggregate.
    #[napi(
        catch_unwind,
        ts_return_type = "Promise<Array<EventRecord>>",
        ts_args_type = "aggregateId: string, options?: EventStreamOptions"
    )]
    pub fn get_aggregate_stream<'env>(
        &self,
        env: &'env Env,
        aggregate_id: String,
        options: Option<Unknown<'env>>,
    ) -> Result<PromiseRaw<'env, Records>> {
        let id = core::validate::parse_uuid_arg("aggregateId", &aggregate_id);
        let options = options_json(env, options).and_then(|o| core::query::stream_options(&o));
        self.run(env, move |repo| async move {
            repo.get_aggregate_stream(id?, &options?).await
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
    #[napi(
        catch_unwind,
        ts_return_type = "Promise<Array<EventRecord>>",
        ts_args_type = "userId: string, options?: UserStreamOptions"
    )]
    pub fn get_user_stream<'env>(
        &self,
        env: &'env Env,
        user_id: String,
        options: Option<Unknown<'env>>,
    ) -> Result<PromiseRaw<'env, Records>> {
        let options = options_json(env, options).and_then(|o| core::query::user_stream_options(&o));
        self.run(env, move |repo| async move {
            repo.get_user_stream(&user_id, &options?).await
        })
    }

    /// Every event of a workflow, oldest first.
    #[napi(catch_unwind, ts_return_type = "Promise<Array<EventRecord>>")]
    pub fn get_correlated_events<'env>(
        &self,
        env: &'env Env,
        correlation_id: String,
    ) -> Result<PromiseRaw<'env, Records>> {
        let id = core::validate::parse_uuid_arg("correlationId", &correlation_id);
        self.run(env, move |repo| async move { repo.get_correlated_events(id?).await })
    }

    /// The latest events of one type, newest first (`limit` 100 by default).
    #[napi(catch_unwind, ts_return_type = "Promise<Array<EventRecord>>")]
    pub fn get_events_by_type<'env>(
        &self,
        env: &'env Env,
        event_type: String,
        limit: Option<f64>,
    ) -> Result<PromiseRaw<'env, Records>> {
        let limit = limit.map_or(Ok(100), |l| core::query::whole_number_arg("limit", l));
        self.run(env, move |repo| async move {
            repo.get_events_by_type(&event_type, limit?).await
        })
    }

    /// How many events match every given filter.
    #[napi(catch_unwind, ts_args_type = "options?: CountEventsOptions")]
    pub fn count_events<'env>(&self, env: &'env Env, options: Option<Unknown<'env>>) -> Result<PromiseRaw<'env, i64>> {
        let filter = options_json(env, options).and_then(|o| core::query::count_filter(&o));
        self.run(env, move |repo| async move { repo.count_events(&filter?).await })
    }

    /// Recomputes the `events_daily` days that received events since the last refresh (all days
    /// when `full`). Resolves to the number of days recomputed. The tables' owner runs it (and
    /// roles granted EXECUTE on `refresh_events_daily`); others get `PERMISSION_DENIED`.
    #[napi(catch_unwind)]
    pub fn refresh_analytics<'env>(&self, env: &'env Env, full: Option<bool>) -> Result<PromiseRaw<'env, i32>> {
        self.run(env, move |repo| async move {
            repo.refresh_analytics(full.unwrap_or(false)).await
        })
    }

    /// A handle limited to `userId`'s events and streams by the database's row-level security:
    /// each call runs in a transaction that sets `app.current_user_id` locally. Shares the pool:
    /// its `close()` ends only the handle.
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
            closed: Arc::new(AtomicBool::new(false)),
            owner_closed: Some(self.owner_closed.clone().unwrap_or_else(|| self.closed.clone())),
        })
    }

    /// Events of every aggregate in global order, after `after` (from the start without it).
    /// Never skips an event whose transaction commits late: pass the returned `checkpoint` to
    /// the next call.
    #[napi(catch_unwind, ts_args_type = "options?: ReadAllOptions")]
    pub fn read_all<'env>(
        &self,
        env: &'env Env,
        options: Option<Unknown<'env>>,
    ) -> Result<PromiseRaw<'env, ReadAllPage>> {
        let args = options_json(env, options).and_then(|o| core::read_all_options(&o));
        self.run(env, move |repo| async move {
            let (after, limit, filter) = args?;
            repo.read_all_filtered(after.as_ref(), limit, &filter).await
        })
    }

    /// An async iterator over every event in global order: catches up, then follows new events
    /// (woken by LISTEN/NOTIFY, polling as a fallback). With `consumer`, resumes from that
    /// consumer's stored checkpoint and stores progress as it goes: at-least-once, a batch is
    /// acknowledged when the loop asks for the event after it.
    ///
    /// `for await (const event of repo.subscribe({ consumer: 'search-index' })) { ... }`
    #[napi(catch_unwind, ts_args_type = "options?: SubscribeOptions")]
    pub fn subscribe(&self, env: Env, options: Option<Unknown>) -> Result<EventSubscription> {
        let repo = self.repository().map_err(|e| to_js_error(&env, e))?;
        let parse = || -> core::Result<core::SubscribeOptions> {
            core::SubscribeOptions::from_json(&options_json(&env, options)?)
        };
        let core_options = parse().map_err(|e| to_js_error(&env, e))?;
        Ok(EventSubscription::new(repo, core_options))
    }

    /// Copies the legacy `events` table into events_v2 exactly once (see docs/migration.md);
    /// safe to interrupt and resume. Resolves to the report (migrated, skipped, failed rows).
    /// A bad option rejects with `INVALID_CONFIG` (or `VALIDATION_FAILED` for a number that is
    /// not whole) and writes nothing.
    #[napi(
        catch_unwind,
        ts_args_type = "options?: LegacyMigrationOptions | undefined | null",
        ts_return_type = "Promise<Record<string, unknown>>"
    )]
    pub fn migrate_legacy_events<'env>(
        &self,
        env: &'env Env,
        options: Option<Unknown<'env>>,
    ) -> Result<PromiseRaw<'env, Json>> {
        let opts = options_json(env, options).and_then(|o| core::LegacyMigrationOptions::from_json(&o));
        self.run(env, move |repo| async move {
            let report = repo.migrate_legacy_events(&opts?, &mut |_| {}).await?;
            to_json_value(&report)
        })
    }

    /// Compares the legacy table with events_v2 (counts per user and type, checksums of ids,
    /// types, timestamps and data) and resolves to what differs.
    #[napi(catch_unwind, ts_return_type = "Promise<Record<string, unknown>>")]
    pub fn verify_legacy<'env>(&self, env: &'env Env, legacy_table: Option<String>) -> Result<PromiseRaw<'env, Json>> {
        let table = legacy_table.unwrap_or_else(|| core::DEFAULT_LEGACY_TABLE.to_owned());
        self.run(env, move |repo| async move {
            to_json_value(&repo.verify_legacy(&table).await?)
        })
    }

    /// Verifies, then drops the legacy table; refuses without `confirm: true`, or when verify
    /// finds a difference, or while a row could not be migrated (unless `acceptLost`, which
    /// accepts those rows as lost and lists them).
    #[napi(
        catch_unwind,
        ts_return_type = "Promise<Record<string, unknown>>",
        ts_args_type = "legacyTable?: string | undefined | null, confirm?: boolean | undefined | null, options?: DropLegacyOptions | undefined | null"
    )]
    pub fn drop_legacy_table<'env>(
        &self,
        env: &'env Env,
        legacy_table: Option<String>,
        confirm: Option<bool>,
        options: Option<Unknown<'env>>,
    ) -> Result<PromiseRaw<'env, Json>> {
        let table = legacy_table.unwrap_or_else(|| core::DEFAULT_LEGACY_TABLE.to_owned());
        let confirm = confirm.unwrap_or(false);
        let accept_lost = options_json(env, options).and_then(|o| {
            Ok(core::query::Options::of(&o, &["acceptLost"])?
                .bool("acceptLost")?
                .unwrap_or(false))
        });
        self.run(env, move |repo| async move {
            to_json_value(&repo.drop_legacy_table(&table, confirm, accept_lost?).await?)
        })
    }

    /// Removes events older than `olderThan` by dropping whole partitions or chunks; refuses to
    /// cut through a live aggregate unless `force`.
    #[napi(
        catch_unwind,
        ts_return_type = "Promise<Record<string, unknown>>",
        ts_args_type = "options: RetentionOptions"
    )]
    pub fn apply_retention<'env>(
        &self,
        env: &'env Env,
        options: Option<Unknown<'env>>,
    ) -> Result<PromiseRaw<'env, Json>> {
        let opts = options_json(env, options).and_then(|o| core::RetentionOptions::from_json(&o, Utc::now()));
        self.run(env, move |repo| async move {
            to_json_value(&repo.apply_retention(&opts?).await?)
        })
    }

    /// Deletes a stream. Soft (the default): appends `<aggregateType>.deleted` at the next
    /// version, so that the fold says `deleted: true` and appends stay possible. `{ hard: true }`
    /// (unscoped handles only): removes its rows, leaves a tombstone (a later append with the id
    /// rejects with `STREAM_DELETED`) and puts a `synap.stream_deleted` notice on the feed.
    /// Resolves to `{ aggregateId, hard, found, events, event, notice }`.
    #[napi(
        catch_unwind,
        ts_return_type = "Promise<Record<string, unknown>>",
        ts_args_type = "aggregateId: string, options?: DeleteStreamOptions | undefined | null"
    )]
    pub fn delete_stream<'env>(
        &self,
        env: &'env Env,
        aggregate_id: String,
        options: Option<Unknown<'env>>,
    ) -> Result<PromiseRaw<'env, Json>> {
        let id = core::validate::parse_uuid_arg("aggregateId", &aggregate_id);
        let opts = options_json(env, options).and_then(|o| core::DeleteStreamOptions::from_json(&o));
        self.run(env, move |repo| async move {
            to_json_value(&repo.delete_stream(id?, &opts?).await?)
        })
    }

    /// Removes every row that holds `userId`'s data (events, streams, ids, snapshots, daily
    /// counts, parked events, legacy rows and their bookkeeping), redacts the user's events in
    /// other users' streams, appends one `synap.user_erased` notice to the feed and rewrites the
    /// relations it touched (docs/erasure.md). Resolves to a report per table; `{ dryRun: true }`
    /// counts and changes nothing. Rejects with `PERMISSION_DENIED` on a `forUser` handle and
    /// `ERASURE_BLOCKED` when older transactions do not end within `waitTimeoutMs`.
    #[napi(
        catch_unwind,
        ts_return_type = "Promise<Record<string, unknown>>",
        ts_args_type = "userId: string, options?: EraseUserOptions | undefined | null"
    )]
    pub fn erase_user<'env>(
        &self,
        env: &'env Env,
        user_id: String,
        options: Option<Unknown<'env>>,
    ) -> Result<PromiseRaw<'env, Json>> {
        let opts = options_json(env, options).and_then(|o| core::EraseOptions::from_json(&o));
        self.run(env, move |repo| async move {
            to_json_value(&repo.erase_user(&user_id, &opts?).await?)
        })
    }

    /// Store-wide numbers: events, aggregates, partitions, storage mode.
    #[napi(catch_unwind, ts_return_type = "Promise<Record<string, unknown>>")]
    pub fn stats<'env>(&self, env: &'env Env) -> Result<PromiseRaw<'env, Json>> {
        self.run(env, |repo| async move { to_json_value(&repo.stats().await?) })
    }

    /// After this store was restored from a dump into another cluster (or copied by logical
    /// replication), renumbers the global feed's transaction ids into this cluster's past; until
    /// then the feed rejects with `FEED_REBASE_REQUIRED`. Resolves to
    /// `{ needed, eventsRenumbered, transactionIdsConsumed }`.
    #[napi(catch_unwind, ts_return_type = "Promise<Record<string, unknown>>")]
    pub fn rebase_feed<'env>(&self, env: &'env Env) -> Result<PromiseRaw<'env, Json>> {
        self.run(env, |repo| async move { to_json_value(&repo.rebase_feed().await?) })
    }

    /// Joins a consumer group and runs `handler` on batches of its events (used by the package's
    /// `consume` and `project`, which check the handler and make it return a promise). Resolves
    /// to the running member once it has joined; rejects with `VALIDATION_FAILED` (with
    /// `field`) for a bad option, having written nothing.
    #[napi(
        catch_unwind,
        js_name = "runGroup",
        ts_args_type = "options: Record<string, unknown>, handler: (events: EventRecord[], tx?: ProjectionTransaction) => Promise<void>, transactional: boolean",
        ts_return_type = "Promise<GroupRun>"
    )]
    pub fn run_group<'env>(
        &self,
        env: &'env Env,
        options: Unknown,
        handler: crate::groups::HandlerFn,
        transactional: bool,
    ) -> Result<PromiseRaw<'env, crate::groups::GroupRun>> {
        let parsed = js_to_json(env, options, Checked::AllKeys).and_then(|o| core::GroupOptions::from_json(&o));
        let options = parsed.map_err(|e| to_js_error(env, e))?;
        self.run(env, move |repo| async move {
            crate::groups::start(repo, options, handler, transactional)
                .await
                .map(crate::groups::GroupRun::new)
        })
    }

    /// Every consumer group: `{ group, members, partitions: [{ partition, owner, leaseExpires,
    /// checkpoint, lagEvents, lagSeconds }], lagEvents, lagSeconds, parked, waiting }`.
    #[napi(catch_unwind, ts_return_type = "Promise<Array<Record<string, unknown>>>")]
    pub fn groups<'env>(&self, env: &'env Env) -> Result<PromiseRaw<'env, Json>> {
        self.run(env, |repo| async move { to_json_value(&repo.groups().await?) })
    }

    /// A group's failed (`state: 'failed'`, with `error` and `attempts`) and queued (`'waiting'`)
    /// events, in feed order.
    #[napi(catch_unwind, ts_return_type = "Promise<Array<Record<string, unknown>>>")]
    pub fn parked<'env>(&self, env: &'env Env, group: String) -> Result<PromiseRaw<'env, Json>> {
        self.run(
            env,
            move |repo| async move { to_json_value(&repo.parked(&group).await?) },
        )
    }

    /// Hands a failed event to its group again, then the events queued behind it, in order.
    #[napi(catch_unwind)]
    pub fn retry_parked<'env>(&self, env: &'env Env, group: String, event_id: String) -> Result<PromiseRaw<'env, ()>> {
        self.run(env, move |repo| async move {
            let id = core::validate::parse_uuid_arg("eventId", &event_id)?;
            repo.retry_parked(&group, id).await
        })
    }

    /// Gives up on a failed event; the events queued behind it go on.
    #[napi(catch_unwind)]
    pub fn skip_parked<'env>(&self, env: &'env Env, group: String, event_id: String) -> Result<PromiseRaw<'env, ()>> {
        self.run(env, move |repo| async move {
            let id = core::validate::parse_uuid_arg("eventId", &event_id)?;
            repo.skip_parked(&group, id).await
        })
    }

    /// Every named consumer of the global feed: `{ name, checkpoint, updatedAt, needsRepair }`.
    #[napi(catch_unwind, ts_return_type = "Promise<Array<Record<string, unknown>>>")]
    pub fn consumers<'env>(&self, env: &'env Env) -> Result<PromiseRaw<'env, Json>> {
        self.run(env, |repo| async move { to_json_value(&repo.consumers().await?) })
    }

    /// Repairs a named consumer whose checkpoint the old feed ordering stored (it may have passed
    /// over events): it goes back to the start and gets every event again, or, with
    /// `accept: true`, keeps its checkpoint. `dryRun` says what would happen. Until then,
    /// `subscribe` with that consumer rejects with `CONSUMER_NEEDS_REPAIR`.
    #[napi(
        catch_unwind,
        ts_return_type = "Promise<Record<string, unknown>>",
        ts_args_type = "consumer: string, options?: RepairConsumerOptions | undefined | null"
    )]
    pub fn repair_consumer<'env>(
        &self,
        env: &'env Env,
        consumer: String,
        options: Option<Unknown<'env>>,
    ) -> Result<PromiseRaw<'env, Json>> {
        let flags = options_json(env, options).and_then(|o| {
            let o = core::query::Options::of(&o, &["accept", "dryRun"])?;
            Ok((o.bool("accept")?.unwrap_or(false), o.bool("dryRun")?.unwrap_or(false)))
        });
        self.run(env, move |repo| async move {
            let (accept, dry_run) = flags?;
            to_json_value(&repo.repair_consumer(&consumer, accept, dry_run).await?)
        })
    }

    /// The aggregate's state, folded where the events are read (no JavaScript object per event):
    /// from the newest snapshot made by the same fold rules, then the events after it. Options
    /// as `foldEvents`: `toVersion`, `toTimestamp`, `bookkeeping` (not `history` or `from`). An
    /// unknown aggregate gives `null` at version 0.
    ///
    /// Rejects with `HISTORY_REMOVED` when retention removed versions the target needs, and
    /// with the fold's codes (`INVALID_OPTIONS`, ...).
    #[napi(catch_unwind, ts_args_type = "aggregateId: string, options?: ReplayOptions")]
    pub fn replay<'env>(
        &self,
        env: &'env Env,
        aggregate_id: String,
        options: Option<Unknown<'env>>,
    ) -> Result<PromiseRaw<'env, ReplayResult>> {
        let id = core::validate::parse_uuid_arg("aggregateId", &aggregate_id);
        let options = options_json(env, options).and_then(|o| core::replay_options(&o));
        self.run(env, move |repo| async move { repo.replay(id?, &options?).await })
    }

    /// Replays the aggregate to its current version and stores a snapshot of the result, so
    /// that later replays fold only the events after it.
    #[napi(catch_unwind)]
    pub fn snapshot<'env>(&self, env: &'env Env, aggregate_id: String) -> Result<PromiseRaw<'env, ReplayResult>> {
        let id = core::validate::parse_uuid_arg("aggregateId", &aggregate_id);
        self.run(env, move |repo| async move { repo.snapshot(id?).await })
    }

    /// The newest snapshot of the aggregate and the events after it, read together: what a
    /// browser needs to finish the fold itself with the wasm build's `foldEvents`.
    #[napi(catch_unwind)]
    pub fn get_snapshot_and_tail<'env>(
        &self,
        env: &'env Env,
        aggregate_id: String,
    ) -> Result<PromiseRaw<'env, SnapshotAndTail>> {
        let id = core::validate::parse_uuid_arg("aggregateId", &aggregate_id);
        self.run(env, move |repo| async move { repo.get_snapshot_and_tail(id?).await })
    }

    /// Closes the connection pool; later calls reject with `CONNECTION_FAILED`. On a handle from
    /// `forUser`, ends only that handle: the pool stays open for the repository it came from.
    #[napi(catch_unwind)]
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        if self.owner_closed.is_none() {
            let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(repo) = &*guard {
                repo.close();
            }
        }
    }
}

/// A numeric option of the constructor as the whole number it must be (0 to 2^32 - 1): JavaScript
/// numbers are not wrapped around (`-1` is not 4294967295) nor truncated.
/// The constructor's options: nothing (`DATABASE_URL` at first use), a connection string, or a
/// `RepositoryOptions` object, every key of which must be an option (`INVALID_CONFIG` naming
/// the key otherwise: a misspelt `connectionString` must not quietly connect elsewhere).
fn source_of(env: &Env, options: Option<Unknown>) -> core::Result<Source> {
    const KNOWN: &[&str] = &[
        "connectionString",
        "poolSize",
        "connectTimeoutMs",
        "acquireTimeoutMs",
        "statementTimeoutMs",
        "schema",
        "storageMode",
        "maxDataBytes",
        "dualWriteLegacyTable",
        "snapshotEvery",
        "pooler",
        "listenUrl",
        "upcasters",
    ];
    let as_config = |e: core::Error| match e {
        core::Error::Validation { message, .. } => core::Error::InvalidConfig { message },
        other => other,
    };
    let value = options_json(env, options).map_err(as_config)?;
    let o = match &value {
        Value::Null => return Ok(Source::Env),
        Value::String(url) => return Ok(Source::Config(Box::new(core::RepositoryConfig::new(url.clone())))),
        Value::Object(_) => core::query::Options::of(&value, KNOWN).map_err(as_config)?,
        _ => {
            return Err(core::Error::InvalidConfig {
                message: "options must be a connection string or an object of RepositoryOptions".into(),
            })
        }
    };
    let string = |key: &str| o.string(key).map_err(as_config);
    let count = |key: &str| -> core::Result<Option<u32>> {
        match o.get(key) {
            None => Ok(None),
            Some(v) => config_count(
                key,
                Some(v.as_f64().ok_or_else(|| core::Error::InvalidConfig {
                    message: format!("{key} must be a number"),
                })?),
            ),
        }
    };
    let mut config = match string("connectionString")? {
        Some(url) => core::RepositoryConfig::new(url),
        None => match core::RepositoryConfig::from_env() {
            Ok(c) => c,
            // Without a URL yet, keep the options and fail at first use.
            Err(_) => core::RepositoryConfig::new(String::new()),
        },
    };
    if let Some(n) = count("poolSize")? {
        config.pool_size = n as usize;
    }
    if let Some(ms) = count("connectTimeoutMs")? {
        config.connect_timeout = Duration::from_millis(ms.into());
    }
    if let Some(ms) = count("acquireTimeoutMs")? {
        config.acquire_timeout = Duration::from_millis(ms.into());
    }
    if let Some(ms) = count("statementTimeoutMs")? {
        config.statement_timeout = Some(Duration::from_millis(ms.into()));
    }
    config.schema = string("schema")?;
    if let Some(mode) = string("storageMode")? {
        config.storage_mode = core::StorageMode::parse(&mode)?;
    }
    if let Some(bytes) = count("maxDataBytes")? {
        config.limits.max_data_bytes = bytes as usize;
    }
    config.dual_write_legacy_table = string("dualWriteLegacyTable")?;
    config.snapshot_every = count("snapshotEvery")?;
    if let Some(pooler) = string("pooler")? {
        config.pooler = core::Pooler::parse(&pooler)?;
    }
    config.listen_url = string("listenUrl")?;
    if let Some(definition) = o.get("upcasters") {
        config.upcasters = std::sync::Arc::new(core::Upcasters::parse(definition)?);
    }
    Ok(Source::Config(Box::new(config)))
}

fn config_count(name: &str, value: Option<f64>) -> core::Result<Option<u32>> {
    match value {
        None => Ok(None),
        Some(v) if v.is_finite() && v.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&v) => Ok(Some(v as u32)),
        Some(v) => Err(core::Error::InvalidConfig {
            message: format!("{name} must be a whole number from 0 to 4294967295, not {v}"),
        }),
    }
}
