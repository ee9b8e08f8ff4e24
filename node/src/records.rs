//! The shapes that cross between JavaScript and the core: enums, events, checkpoints, and the
//! option objects (declared here for their TypeScript types; their values are read by the core
//! from JSON, see `synap_events::query`).

use chrono::{DateTime, Utc};
use napi::bindgen_prelude::{Env, Function, Object, ToNapiValue, TypeName, Unknown, ValueType};
use napi::{sys, Error, Result};
use napi_derive::napi;
use serde_json::Value;
use synap_events as core;

use crate::{IntoJs, Json};

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
    /// The version of this event type's shape that `data` and `metadata` follow
    /// (docs/upcasting.md); 1 when absent.
    pub schema_version: Option<u32>,
}

/// A stored event.
#[napi(object, object_from_js = false)]
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
    /// The delta. Plain JSON data, as `JSON.parse` makes it: own keys only, numbers (never
    /// BigInt; the store refuses numbers a double cannot hold exactly).
    #[napi(ts_type = "Record<string, unknown>")]
    pub data: Json,
    /// Metadata; absent when none was given.
    #[napi(ts_type = "Record<string, unknown>")]
    pub metadata: Option<Json>,
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
    /// Present only on a stored row that cannot be read back as an event (written by other means
    /// than the store): `{ column, reason, raw }`. It stands in the event's place, so that one
    /// such row never fails a read or stops a feed; skip it or park it.
    #[napi(ts_type = "{ column: string; reason: string; raw: string }")]
    pub unreadable: Option<Json>,
    /// The version of this event type's shape that `data` and `metadata` follow, as delivered:
    /// the repository's upcasters bring each event to its type's latest (docs/upcasting.md).
    pub schema_version: u32,
    /// The schema version the event was stored at.
    pub stored_schema_version: u32,
    /// The event type the event was stored as; present only when an upcaster renamed it.
    pub stored_event_type: Option<String>,
}

impl From<core::EventRecord> for EventRecord {
    fn from(r: core::EventRecord) -> Self {
        let stored_schema_version = r.stored_schema_version() as u32;
        let stored_event_type = r.renamed_from().map(str::to_owned);
        EventRecord {
            id: r.id.to_string(),
            timestamp: r.timestamp,
            aggregate_id: r.aggregate_id.to_string(),
            aggregate_type: r.aggregate_type.into(),
            user_id: r.user_id,
            data: Json(r.data),
            metadata: r.metadata.map(Json),
            version: r.version as u32,
            causation_id: r.causation_id.map(|u| u.to_string()),
            correlation_id: r.correlation_id.map(|u| u.to_string()),
            source: r.source.into(),
            position: r.position,
            stored_schema_version,
            stored_event_type,
            schema_version: r.schema_version as u32,
            event_type: r.event_type,
            unreadable: r.unreadable.and_then(|u| serde_json::to_value(u).ok()).map(Json),
        }
    }
}

impl IntoJs<EventRecord> for core::EventRecord {
    fn into_js(self) -> EventRecord {
        self.into()
    }
}

/// Stored events on their way to JavaScript, as an array of [`EventRecord`]s. They cross as JSON
/// text, a slice of records per `JSON.parse` (so `data` and `metadata` are plain JSON data, as
/// node-postgres gives them), and each record's `timestamp` then becomes a `Date`: three N-API
/// calls per record instead of one per field.
pub struct Records(pub Vec<core::EventRecord>);

/// Records per `JSON.parse`: keeps each text far below V8's string length limit.
const RECORDS_PER_PARSE: usize = 1024;

impl TypeName for Records {
    fn type_name() -> &'static str {
        "Array<EventRecord>"
    }

    fn value_type() -> ValueType {
        ValueType::Object
    }
}

impl ToNapiValue for Records {
    unsafe fn to_napi_value(raw_env: sys::napi_env, val: Records) -> Result<sys::napi_value> {
        use napi::bindgen_prelude::{JsObjectValue, JsValue};
        let env = Env::from_raw(raw_env);
        let mut array = env.create_array(val.0.len() as u32)?;
        let json: Object = env.get_global()?.get_named_property("JSON")?;
        let parse: Function<String, Unknown> = json.get_named_property("parse")?;
        let mut text = Vec::new();
        for (slice_index, slice) in val.0.chunks(RECORDS_PER_PARSE).enumerate() {
            text.clear();
            text.push(b'[');
            for (i, record) in slice.iter().enumerate() {
                if i > 0 {
                    text.push(b',');
                }
                write_record(&mut text, record).map_err(|e| Error::from_reason(e.to_string()))?;
            }
            text.push(b']');
            // Only valid UTF-8 went in: serde_json's output and ASCII.
            let parsed: Object = parse
                .call(String::from_utf8(std::mem::take(&mut text)).map_err(|e| Error::from_reason(e.to_string()))?)?
                .coerce_to_object()?;
            for (i, record) in slice.iter().enumerate() {
                let mut object: Object = parsed.get_element(i as u32)?;
                object.set_named_property(
                    "timestamp",
                    env.create_date(record.timestamp.timestamp_millis() as f64)?,
                )?;
                array.set((slice_index * RECORDS_PER_PARSE + i) as u32, object)?;
            }
        }
        Ok(array.raw())
    }
}

/// One record as the JSON of an [`EventRecord`] (`timestamp` a placeholder number; absent
/// optional fields left out).
fn write_record(out: &mut Vec<u8>, r: &core::EventRecord) -> serde_json::Result<()> {
    use std::io::Write;
    let uuid = |out: &mut Vec<u8>, key: &str, id: &uuid::Uuid| {
        let _ = write!(out, ",\"{key}\":\"{}\"", id.hyphenated());
    };
    let _ = write!(out, "{{\"id\":\"{}\",\"timestamp\":0", r.id.hyphenated());
    uuid(out, "aggregateId", &r.aggregate_id);
    let _ = write!(
        out,
        ",\"aggregateType\":\"{}\",\"eventType\":",
        r.aggregate_type.as_str()
    );
    serde_json::to_writer(&mut *out, &r.event_type)?;
    out.extend_from_slice(b",\"userId\":");
    serde_json::to_writer(&mut *out, &r.user_id)?;
    out.extend_from_slice(b",\"data\":");
    serde_json::to_writer(&mut *out, &r.data)?;
    if let Some(metadata) = &r.metadata {
        out.extend_from_slice(b",\"metadata\":");
        serde_json::to_writer(&mut *out, metadata)?;
    }
    let _ = write!(out, ",\"version\":{}", r.version);
    if let Some(id) = &r.causation_id {
        uuid(out, "causationId", id);
    }
    if let Some(id) = &r.correlation_id {
        uuid(out, "correlationId", id);
    }
    let _ = write!(
        out,
        ",\"source\":\"{}\",\"position\":{},\"schemaVersion\":{},\"storedSchemaVersion\":{}",
        r.source.as_str(),
        r.position,
        r.schema_version,
        r.stored_schema_version()
    );
    if let Some(stored) = r.renamed_from() {
        out.extend_from_slice(b",\"storedEventType\":");
        serde_json::to_writer(&mut *out, stored)?;
    }
    if let Some(unreadable) = &r.unreadable {
        out.extend_from_slice(b",\"unreadable\":");
        serde_json::to_writer(&mut *out, unreadable)?;
    }
    out.push(b'}');
    Ok(())
}

impl IntoJs<Records> for Vec<core::EventRecord> {
    fn into_js(self) -> Records {
        Records(self)
    }
}

/// Options of `getAggregateStream`, as in the design: the versions after `fromVersion` up to and
/// including `toVersion`.
#[napi(object, object_to_js = false)]
pub struct EventStreamOptions {
    /// Return the versions after this one (exclusive); default 0, from the first. A caller that
    /// holds the state at version N asks for `fromVersion: N`.
    pub from_version: Option<f64>,
    /// The last version to return (inclusive); default the latest.
    pub to_version: Option<f64>,
    /// Only these event types (any strings; one that no event has matches nothing).
    pub event_types: Option<Vec<String>>,
}

/// Options of `getUserStream`.
#[napi(object, object_to_js = false)]
pub struct UserStreamOptions {
    /// How many days back from now; default 7.
    pub days: Option<f64>,
    /// Most events returned; default 1000.
    pub limit: Option<f64>,
    /// Only these event types.
    pub event_types: Option<Vec<String>>,
    /// Only these aggregate types.
    pub aggregate_types: Option<Vec<AggregateType>>,
}

/// Filters of `countEvents`; they combine with AND. A filter that no event has counts 0.
#[napi(object, object_to_js = false)]
pub struct CountEventsOptions {
    /// Only this user's events.
    pub user_id: Option<String>,
    /// Only this event type.
    pub event_type: Option<String>,
    /// Only this aggregate type.
    pub aggregate_type: Option<AggregateType>,
    /// Only events at or after this time (an invalid Date is refused).
    pub from_date: Option<DateTime<Utc>>,
    /// Only events before this time (an invalid Date is refused).
    pub to_date: Option<DateTime<Utc>>,
}

/// Settings of `new EventRepository(options)`.
#[napi(object, object_to_js = false)]
pub struct RepositoryOptions {
    /// PostgreSQL connection string; default `process.env.DATABASE_URL` at first use.
    pub connection_string: Option<String>,
    /// Largest number of pooled connections; default 10.
    pub pool_size: Option<f64>,
    /// How long opening a connection may take, in ms; default 10000.
    pub connect_timeout_ms: Option<f64>,
    /// How long a call waits for a free connection before `POOL_TIMEOUT`, in ms; default 30000.
    pub acquire_timeout_ms: Option<f64>,
    /// Server-side statement timeout in ms; default: the server's.
    pub statement_timeout_ms: Option<f64>,
    /// Schema holding the tables (lowercase letters, digits, `_`); default: the server's search_path.
    pub schema: Option<String>,
    /// `auto` (default), `timescaledb` or `native`: how `migrate()` creates events_v2.
    pub storage_mode: Option<String>,
    /// Largest `data` or `metadata`, in bytes of JSON; default 1 MiB.
    pub max_data_bytes: Option<f64>,
    /// During the switch-over: also write every appended event into this legacy table (e.g.
    /// `events`), in the same statement, so old readers keep working.
    pub dual_write_legacy_table: Option<String>,
    /// Snapshot policy: a `replay` that folds at least this many events past the newest
    /// snapshot stores a snapshot of its result. Default: none (only `snapshot()` and retention
    /// write them).
    pub snapshot_every: Option<f64>,
    /// `transaction` when the connection string goes through a transaction-mode pooler
    /// (PgBouncer, Neon's or Supabase's pooled URL), `none` when it does not; default `auto`:
    /// `?pooler=transaction` or `?pgbouncer=true` in the URL, a Neon `-pooler` host or port 6543
    /// say so (docs/api.md, "Connection poolers").
    pub pooler: Option<String>,
    /// Through a transaction-mode pooler: a direct URL for `subscribe`'s LISTEN (Neon's
    /// unpooled URL). Without it, subscribers there poll (`pollIntervalMs`).
    pub listen_url: Option<String>,
    /// Upcasters applied to every event this repository reads (docs/upcasting.md). A refused
    /// definition throws `INVALID_UPCASTERS`, naming the step.
    pub upcasters: Option<Vec<UpcasterStep>>,
}

/// One step of an upcaster definition: how `eventType` events stored at `fromVersion` become
/// `fromVersion + 1` (docs/upcasting.md).
#[napi(object)]
pub struct UpcasterStep {
    /// The event type the step applies to.
    pub event_type: String,
    /// The schema version it starts from.
    pub from_version: u32,
    /// What it does, in order.
    pub operations: Vec<UpcasterOperation>,
}

/// One operation of an upcaster step. A path is `'data.a.b'`, `'metadata.x'`, or an array of
/// keys (`['data', 'a.b']`).
#[napi(object)]
pub struct UpcasterOperation {
    /// `rename` { from, to }, `remove` { path }, `default` { path, value }, `map` { path, values },
    /// `renameType` { to, version?, when? }.
    #[napi(ts_type = "'rename' | 'remove' | 'default' | 'map' | 'renameType'")]
    pub op: String,
    /// `rename`: the key's path now.
    #[napi(ts_type = "string | string[]")]
    pub from: Option<Value>,
    /// `rename`: the key's new path; `renameType`: the new event type.
    #[napi(ts_type = "string | string[]")]
    pub to: Option<Value>,
    /// `remove`, `default`, `map`: the key's path.
    #[napi(ts_type = "string | string[]")]
    pub path: Option<Value>,
    /// `default`: the value when the key is missing.
    #[napi(ts_type = "unknown")]
    pub value: Option<Value>,
    /// `map`: old string values to new values.
    #[napi(ts_type = "Record<string, unknown>")]
    pub values: Option<Value>,
    /// `renameType`: the version the event continues at; default the new type's latest.
    pub version: Option<u32>,
    /// `renameType`: only events whose value at `path` equals `equals`.
    #[napi(ts_type = "{ path: string | string[]; equals: unknown }")]
    pub when: Option<Value>,
}

/// Options of `migrateLegacyEvents`.
#[napi(object, object_to_js = false)]
pub struct LegacyMigrationOptions {
    /// The legacy table; default `events`.
    pub legacy_table: Option<String>,
    /// Rows per transaction; default 5000.
    pub batch_size: Option<f64>,
    /// Connections writing at once, each for its own share of the aggregates; default 2 (1 with
    /// `onInvalid: 'fail'`).
    pub writers: Option<f64>,
    /// Migrate at most this many rows in this call.
    pub limit: Option<i64>,
    /// Check every row and report, writing nothing.
    pub dry_run: Option<bool>,
    /// Continue a run that was interrupted (required once a run has started).
    pub resume: Option<bool>,
    /// `skip` (default: record bad rows and go on) or `fail` (stop before the first bad row).
    pub on_invalid: Option<String>,
}

/// Options of `dropLegacyTable`.
#[napi(object, object_to_js = false)]
pub struct DropLegacyOptions {
    /// Accept the rows that could not be migrated (listed in the report) as lost; without it the
    /// drop is refused while any row is neither migrated nor accepted.
    pub accept_lost: Option<bool>,
}

/// Options of `deleteStream`.
#[napi(object, object_to_js = false)]
pub struct DeleteStreamOptions {
    /// Remove the stream's rows and leave a tombstone instead of appending its deletion event.
    pub hard: Option<bool>,
}

/// Options of `eraseUser`.
#[napi(object, object_to_js = false)]
pub struct EraseUserOptions {
    /// Count what would go; change nothing.
    pub dry_run: Option<bool>,
    /// How long to wait for transactions older than the erasure to end (default 60000).
    pub wait_timeout_ms: Option<f64>,
}

/// Options of `repairConsumer`.
#[napi(object, object_to_js = false)]
pub struct RepairConsumerOptions {
    /// Keep the consumer's checkpoint instead of going back to the start.
    pub accept: Option<bool>,
    /// Say what would happen; change nothing.
    pub dry_run: Option<bool>,
}

/// Options of `applyRetention`.
#[napi(object, object_to_js = false)]
pub struct RetentionOptions {
    /// Age such as `90d`, `12w` or `2y`: events older than now minus it go.
    pub older_than: String,
    /// List what would go, remove nothing.
    pub dry_run: Option<bool>,
    /// Cut through aggregates that have events on both sides of the cut-off.
    pub force: Option<bool>,
}

/// What `migrate()` did.
#[napi(object, object_from_js = false)]
pub struct MigrationReport {
    /// Versions applied now.
    pub applied: Vec<i32>,
    /// Versions that had been applied before.
    pub already_applied: Vec<i32>,
    /// Repeatable files (functions, policies, grants) applied now: all of them, or none when
    /// none changed.
    pub repeatable_applied: Vec<String>,
    /// `timescaledb`, `native` or `citus`.
    pub storage_mode: String,
}

impl IntoJs<MigrationReport> for core::MigrationReport {
    fn into_js(self) -> MigrationReport {
        MigrationReport {
            applied: self.applied,
            already_applied: self.already_applied,
            repeatable_applied: self.repeatable_applied,
            storage_mode: self.storage_mode,
        }
    }
}

/// A place in the global order (from `readAll`): pass it back to continue after it.
#[napi(object)]
#[derive(Clone)]
pub struct Checkpoint {
    /// A transaction id (a 64-bit number, as a string).
    pub txid: String,
    /// A position within it.
    pub position: i64,
    /// The store it belongs to (a 64-bit number, as a string): a checkpoint from another store,
    /// or from before a restore, is refused with `CHECKPOINT_FROM_ANOTHER_STORE`. Absent in
    /// checkpoints saved before it existed; those are not checked.
    pub store: Option<String>,
}

impl From<core::Checkpoint> for Checkpoint {
    fn from(c: core::Checkpoint) -> Self {
        Checkpoint {
            txid: c.txid.to_string(),
            position: c.position,
            store: Some(c.store.to_string()),
        }
    }
}

/// Options of `readAll`.
#[napi(object, object_to_js = false)]
pub struct ReadAllOptions {
    /// Continue after this checkpoint; from the start when absent.
    pub after: Option<Checkpoint>,
    /// Most events returned; default 1000.
    pub limit: Option<f64>,
    /// Only events of these types (and of `eventTypePrefixes`).
    pub event_types: Option<Vec<String>>,
    /// Only events whose type starts with one of these (`entity.`).
    pub event_type_prefixes: Option<Vec<String>>,
    /// Only events of these aggregate types.
    pub aggregate_types: Option<Vec<AggregateType>>,
}

/// A page of `readAll`.
#[napi(object, object_from_js = false)]
pub struct ReadAllPage {
    /// Events in global order.
    #[napi(ts_type = "Array<EventRecord>")]
    pub events: Records,
    /// Where the next read continues: after the last event of a full page, the horizon after
    /// a shorter one (every event before it has been read), or the last row a filtered page
    /// scanned.
    pub checkpoint: Checkpoint,
    /// Every event before the horizon has been read. A filtered read scans a bounded number of
    /// rows a page, so a page short of `limit` (even empty) that is not caught up means: read on.
    pub caught_up: bool,
}

impl IntoJs<ReadAllPage> for core::Page {
    fn into_js(self) -> ReadAllPage {
        ReadAllPage {
            events: Records(self.events),
            checkpoint: self.checkpoint.into(),
            caught_up: self.caught_up,
        }
    }
}

/// Options of `subscribe`.
#[napi(object, object_to_js = false)]
pub struct SubscribeOptions {
    /// A named consumer resumes from its stored checkpoint and stores progress.
    pub consumer: Option<String>,
    /// Where to start when the consumer has no stored checkpoint; default the beginning.
    pub from: Option<Checkpoint>,
    /// Events fetched per round trip; default 100.
    pub batch_size: Option<f64>,
    /// How often to poll when no notification arrives, in ms; default 1000.
    pub poll_interval_ms: Option<f64>,
    /// Only events of these types (and of `eventTypePrefixes`).
    pub event_types: Option<Vec<String>>,
    /// Only events whose type starts with one of these (`entity.`).
    pub event_type_prefixes: Option<Vec<String>>,
    /// Only events of these aggregate types.
    pub aggregate_types: Option<Vec<AggregateType>>,
}

/// What `replay` and `snapshot` resolve to: the fold's result, as `foldEvents` gives it, and how
/// it was reached.
#[napi(object, object_from_js = false)]
pub struct ReplayResult {
    /// The state; `null` when the aggregate has no events.
    #[napi(ts_type = "Record<string, unknown> | null")]
    pub state: Json,
    /// Version of the last applied event (0 when none).
    pub version: u32,
    /// Whether the aggregate is deleted.
    pub deleted: bool,
    /// ISO time of the last applied event; `null` when none.
    #[napi(ts_type = "string | null")]
    pub last_timestamp: Json,
    /// The version of the snapshot the fold started from; `null` when it started at version 0.
    #[napi(ts_type = "number | null")]
    pub snapshot_version: Json,
    /// How many stored events were folded after it.
    pub events_folded: i64,
    /// Whether this call stored a snapshot of the result.
    pub snapshot_stored: bool,
}

impl IntoJs<ReplayResult> for core::Replay {
    fn into_js(self) -> ReplayResult {
        ReplayResult {
            state: Json(self.result.state),
            version: self.result.version as u32,
            deleted: self.result.deleted,
            last_timestamp: Json(
                self.result
                    .last_timestamp
                    .map_or(Value::Null, |t| Value::String(core::format_timestamp(&t))),
            ),
            snapshot_version: Json(self.snapshot_version.map_or(Value::Null, Value::from)),
            events_folded: self.events_folded as i64,
            snapshot_stored: self.snapshot_stored,
        }
    }
}

/// What `getSnapshotAndTail` resolves to: finish the fold with
/// `foldEvents(events, { from: snapshot ?? undefined })`.
#[napi(object, object_from_js = false)]
pub struct SnapshotAndTail {
    /// The newest snapshot (default fold rules), or `null`.
    #[napi(ts_type = "FoldSnapshot | null")]
    pub snapshot: Json,
    /// The events after it, in version order.
    #[napi(ts_type = "Array<EventRecord>")]
    pub events: Records,
}

impl IntoJs<SnapshotAndTail> for core::SnapshotAndTail {
    fn into_js(self) -> SnapshotAndTail {
        let snapshot = self.snapshot.map_or(Value::Null, |s| {
            serde_json::json!({
                "state": s.state,
                "version": s.version,
                "deleted": s.deleted,
                "lastTimestamp": s.last_timestamp.map(|t| core::format_timestamp(&t)),
            })
        });
        SnapshotAndTail {
            snapshot: Json(snapshot),
            events: Records(self.events),
        }
    }
}
