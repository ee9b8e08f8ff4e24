use serde::Serialize;
use uuid::Uuid;

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every failure of this crate. [`Error::code`] gives a stable code for each variant.
#[non_exhaustive]
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// An input failed validation. Nothing was written.
    #[error("invalid {field}: {message}")]
    Validation {
        /// Path of the offending field, e.g. `data.title` or `events[3].version`.
        field: String,
        /// What is wrong, as a stable code.
        reason: IssueCode,
        /// A sentence for people.
        message: String,
    },

    /// The aggregate was not at the version the append expected (optimistic locking).
    #[error(
        "Concurrency conflict detected: expected version {expected_version}, got {actual_version} \
         (aggregate {aggregate_id}; reload the aggregate and retry)"
    )]
    ConcurrencyConflict {
        /// The aggregate whose version moved.
        aggregate_id: Uuid,
        /// The version the append expected the aggregate to be at (its `version` - 1).
        expected_version: i32,
        /// The aggregate's version in the store (0 when it has no events).
        actual_version: i32,
    },

    /// An event with this id is already stored, as another event (ids are unique across the
    /// store). Nothing was written.
    #[error("event id {id} is already stored as another event")]
    DuplicateEventId {
        /// The id.
        id: Uuid,
        /// Where in a batch (`events[i].id`), or `id` for a single append.
        field: String,
    },

    /// Some events of a batch are already stored with these ids at these versions and the others
    /// are not: it is neither a retry of a stored batch nor a new one. Nothing was written.
    #[error("events {stored:?} of the batch are already stored with these ids and versions, the others are not")]
    BatchPartlyStored {
        /// Indexes of the events already stored.
        stored: Vec<usize>,
    },

    /// The aggregate exists with another aggregate type than the appended event names.
    #[error("aggregate {aggregate_id} is a {stored}, not a {given}")]
    AggregateTypeMismatch {
        /// The aggregate.
        aggregate_id: Uuid,
        /// The type it was created with.
        stored: String,
        /// The type the new event named.
        given: String,
    },

    /// Replayed events were not one aggregate's consecutive versions in order.
    #[error("cannot fold events[{index}]: {message}")]
    Fold {
        /// Which rule was broken.
        reason: FoldErrorKind,
        /// Index of the offending event in the input.
        index: usize,
        /// A sentence for people.
        message: String,
    },

    /// The connection to PostgreSQL failed or was lost. Retryable: nothing of the failed
    /// operation was committed unless the failure came after COMMIT was sent.
    #[error("database connection failed: {message}")]
    ConnectionFailed {
        /// What the driver said.
        message: String,
    },

    /// No pooled connection became free within the configured acquire timeout. Retryable.
    #[error("no database connection available within {timeout_ms} ms (pool exhausted or database unreachable)")]
    PoolTimeout {
        /// The timeout that ran out.
        timeout_ms: u64,
    },

    /// The statement ran past the configured statement timeout and was cancelled. Retryable.
    #[error("statement cancelled: {message}")]
    StatementTimeout {
        /// What the server said.
        message: String,
    },

    /// The transaction lost a serialization or deadlock check. Retryable.
    #[error("transaction conflict, retry: {message}")]
    TransactionConflict {
        /// What the server said.
        message: String,
    },

    /// The schema is missing: run the migrations first.
    #[error("the event store schema is missing ({message}); run migrate() first")]
    SchemaNotReady {
        /// What the server said.
        message: String,
    },

    /// An applied migration file was edited after it ran.
    #[error("migration {version} ({name}) was edited after it was applied: checksum {applied} in the database, {current} on disk")]
    MigrationChecksumMismatch {
        /// Migration number.
        version: i32,
        /// Migration name.
        name: String,
        /// Checksum recorded when it ran.
        applied: String,
        /// Checksum of the file now.
        current: String,
    },

    /// A migration failed; its transaction was rolled back.
    #[error("migration {version} ({name}) failed: {message}")]
    MigrationFailed {
        /// Migration number.
        version: i32,
        /// Migration name.
        name: String,
        /// What the server said.
        message: String,
    },

    /// The storage mode asked for cannot be had on this server (e.g. `timescaledb` where the
    /// extension is not installed or not in `shared_preload_libraries`). Nothing was created.
    #[error("storage mode {requested} is not available: {message}")]
    StorageModeUnavailable {
        /// The mode asked for.
        requested: String,
        /// Why, and what to change on the server.
        message: String,
    },

    /// The configuration is unusable (bad connection string, schema name, missing variable).
    #[error("invalid configuration: {message}")]
    InvalidConfig {
        /// What is wrong.
        message: String,
    },

    /// The database refused the operation for this role: a row-level security policy (a scoped
    /// handle writing another user's event) or a missing privilege. Nothing was written.
    #[error("permission denied: {message}")]
    PermissionDenied {
        /// What the server said.
        message: String,
    },

    /// Any other database error, with its SQLSTATE.
    #[error("database error {sqlstate}: {message}")]
    Database {
        /// The five-character SQLSTATE, or empty when the driver gave none.
        sqlstate: String,
        /// What the server or driver said.
        message: String,
    },

    /// The legacy events table named for a migration, verify or drop does not exist.
    #[error("legacy events table \"{table}\" not found")]
    LegacyTableNotFound {
        /// The table name as given.
        table: String,
    },

    /// Another backend holds the migration lock of the same legacy table, and kept it for the
    /// whole wait: another migration is running (or a killed one's backend is still finishing a
    /// statement that cannot be proven orphaned).
    #[error("legacy table \"{table}\" is being migrated: {holder}")]
    LegacyMigrationBusy {
        /// The legacy table.
        table: String,
        /// What holds the lock, as PostgreSQL reports it (backend, client, since when), and how
        /// long this call waited.
        holder: String,
    },

    /// Retention removed this aggregate's events before `retained_from` (keeping a snapshot of
    /// the state they made): the versions asked for are not stored any more. A replay of the
    /// current state works; a stream read from `retained_from - 1` on does too.
    #[error(
        "aggregate {aggregate_id}: versions before {retained_from} were removed by retention; read from fromVersion {snapshot_version} on, or replay (which starts from the snapshot at version {snapshot_version} that keeps their state)"
    )]
    HistoryRemoved {
        /// The aggregate.
        aggregate_id: Uuid,
        /// The first version still stored.
        retained_from: i32,
        /// The last removed version: a snapshot at it stands for the removed events (unless
        /// retention was forced past an aggregate whose events did not fold).
        snapshot_version: i32,
    },

    /// Dual-write is on for a legacy table whose history has not been migrated yet: an append
    /// now would number an aggregate's versions out of time order. Migrate the history first
    /// (`synap-events migrate-events`), then turn dual-write on. Nothing was written.
    #[error(
        "dual-write into legacy table \"{table}\" waits for its history to be migrated (run migrate-events first)"
    )]
    LegacyHistoryPending {
        /// The legacy table.
        table: String,
    },

    /// A migration of this legacy table already ran (fully or in part) and the call did not ask
    /// to resume it.
    #[error("legacy table \"{table}\" was already (partly) migrated ({migrated} rows); pass resume to continue")]
    LegacyMigrationStarted {
        /// The legacy table.
        table: String,
        /// Rows migrated so far.
        migrated: i64,
    },

    /// `verify` found differences between the legacy table and events_v2, so the legacy table
    /// was not dropped.
    #[error("verify found differences between \"{table}\" and events_v2: {summary}")]
    VerifyFailed {
        /// The legacy table.
        table: String,
        /// What differs, in one line.
        summary: String,
    },

    /// A destructive operation was called without its explicit confirmation.
    #[error("{action} needs an explicit confirmation")]
    ConfirmationRequired {
        /// What was refused.
        action: String,
    },

    /// Retention would remove events of aggregates that no snapshot can stand for (their stored
    /// events do not fold), and was not forced. Nothing was removed.
    #[error(
        "retention refused: before the cut-off {cutoff}, {aggregates} aggregate(s) have events that do not fold into a \
         snapshot (e.g. {sample:?}), so their history would be lost; repair them, choose an older cut-off, or force it"
    )]
    RetentionRefused {
        /// The effective cut-off (a UTC midnight), RFC 3339.
        cutoff: String,
        /// How many aggregates could not be kept by a snapshot.
        aggregates: i64,
        /// Some of them.
        sample: Vec<Uuid>,
    },

    /// A named consumer's checkpoint was stored by the ordering that skipped events (before
    /// migration 0005), so it may sit past events the consumer never saw. Repair the consumer
    /// (its events are delivered again) or accept its checkpoint first.
    #[error(
        "consumer \"{consumer}\" stored its checkpoint with the old feed ordering, which could skip events; \
         repair it (synap-events consumers repair {consumer}) or accept its checkpoint before reading on"
    )]
    ConsumerNeedsRepair {
        /// The consumer.
        consumer: String,
    },

    /// A consumer group member's lease on a partition was taken by another member (it stalled
    /// past its lease, or its connection was lost) while it handled events. Nothing was stored;
    /// the partition's new holder hands the events out again.
    #[error("a partition lease of consumer group \"{group}\" was taken by another member; nothing was stored")]
    LeaseLost {
        /// The group.
        group: String,
    },

    /// A member joined a consumer group with another filter than the group's own
    /// (`eventTypes`, `eventTypePrefixes`, `aggregateTypes`): a group's members share its
    /// checkpoints, so they read with one filter. Nothing was stored.
    #[error("consumer group \"{group}\" reads with the filter {stored}, not {given}; a new filter needs a new group")]
    GroupFilterMismatch {
        /// The group.
        group: String,
        /// The group's filter, as the options name it (`{}` for every event).
        stored: Box<serde_json::Value>,
        /// The filter the member joined with.
        given: Box<serde_json::Value>,
    },

    /// A named consumer's checkpoint would move backwards: another instance of the same consumer
    /// has stored a later one. Nothing was stored.
    #[error(
        "consumer \"{consumer}\" is already at {stored}, past {given}: another instance of it is reading; \
         run one instance per consumer name"
    )]
    CheckpointConflict {
        /// The consumer.
        consumer: String,
        /// The stored checkpoint, `txid:position`.
        stored: String,
        /// The checkpoint that was refused, `txid:position`.
        given: String,
    },

    /// The stored events' transaction ids come from another cluster (the store was restored
    /// from a dump, or is a logical replica): the global feed cannot be read in order until they
    /// are renumbered with `rebase_feed` (CLI: `synap-events rebase-feed`).
    #[error("the global feed holds another cluster's transaction ids ({message}); run synap-events rebase-feed first")]
    FeedRebaseRequired {
        /// What differs.
        message: String,
    },

    /// A checkpoint from another store, or from before this store was restored or rebased: its
    /// place means nothing here. Start from a checkpoint of this store.
    #[error(
        "the checkpoint comes from another store (or from before a restore); read again from a checkpoint of this one"
    )]
    CheckpointFromAnotherStore,

    /// The user is being erased (`erase_user`): the store refuses their appends until the
    /// erasure ends. Nothing was written.
    #[error("{message}")]
    UserBeingErased {
        /// What the server said, naming the user.
        message: String,
    },

    /// The stream was deleted for good (`delete_stream` with `hard`): its id cannot be used
    /// again. Nothing was written.
    #[error("stream {aggregate_id} was deleted: its id cannot be used again")]
    StreamDeleted {
        /// The stream.
        aggregate_id: Uuid,
    },

    /// An erasure could not go on: transactions that were running when it began did not end in
    /// time (it must wait for them, see docs/erasure.md). The user's appends stay refused until
    /// the erasure is run again and completes; nothing was deleted.
    #[error("erasure waited {waited_ms} ms for {transactions} older transaction(s) to end (backends {pids:?}); run it again")]
    ErasureBlocked {
        /// How long it waited.
        waited_ms: u64,
        /// Transactions still running.
        transactions: usize,
        /// Their backends' process ids.
        pids: Vec<i32>,
    },

    /// An upcaster definition was refused (see [`crate::upcast`]).
    #[error("invalid upcasters: {message}")]
    InvalidUpcasters {
        /// The step, as `eventType@fromVersion` (`upcasters[i]` when the step has no valid name
        /// yet, empty for the definition as a whole).
        step: String,
        /// Which rule was broken.
        reason: UpcasterErrorKind,
        /// A sentence for people.
        message: String,
    },

    /// A bug: an invariant broke or a panic was caught at a language boundary.
    #[error("internal error: {message}")]
    Internal {
        /// What broke.
        message: String,
    },
}

/// The rules a fold input can break; see [`crate::fold`].
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FoldErrorKind {
    /// A version was skipped.
    VersionGap,
    /// The same version appeared twice.
    DuplicateVersion,
    /// A version was lower than the one before it.
    UnorderedEvents,
    /// The events belong to more than one aggregate.
    MixedAggregates,
    /// An event is not a well-formed event record.
    InvalidEvent,
    /// The fold options are malformed; `index` is 0.
    InvalidOptions,
}

/// The rules an upcaster definition can break; see [`crate::upcast`].
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpcasterErrorKind {
    /// Not an array of well-formed steps (a key missing, unknown or of the wrong type).
    InvalidDefinition,
    /// An operation this version does not know.
    UnknownOperation,
    /// A known operation with a missing, unknown or malformed key.
    InvalidOperation,
    /// Two steps of one type from the same version.
    DuplicateStep,
    /// A type's steps leave a version out, or a `renameType` goes past its target's latest.
    Gap,
    /// Steps that could bring an event back where it has been.
    Cycle,
}

impl UpcasterErrorKind {
    /// The reason as it appears in error details (camelCase).
    pub fn as_str(self) -> &'static str {
        match self {
            UpcasterErrorKind::InvalidDefinition => "invalidDefinition",
            UpcasterErrorKind::UnknownOperation => "unknownOperation",
            UpcasterErrorKind::InvalidOperation => "invalidOperation",
            UpcasterErrorKind::DuplicateStep => "duplicateStep",
            UpcasterErrorKind::Gap => "gap",
            UpcasterErrorKind::Cycle => "cycle",
        }
    }
}

impl FoldErrorKind {
    /// The stable code.
    pub fn code(self) -> &'static str {
        match self {
            FoldErrorKind::VersionGap => "VERSION_GAP",
            FoldErrorKind::DuplicateVersion => "DUPLICATE_VERSION",
            FoldErrorKind::UnorderedEvents => "UNORDERED_EVENTS",
            FoldErrorKind::MixedAggregates => "MIXED_AGGREGATES",
            FoldErrorKind::InvalidEvent => "INVALID_EVENT",
            FoldErrorKind::InvalidOptions => "INVALID_OPTIONS",
        }
    }
}

impl Error {
    /// The stable, SCREAMING_SNAKE code of this error. Codes never change meaning.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Validation { .. } => "VALIDATION_FAILED",
            Error::ConcurrencyConflict { .. } => "CONCURRENCY_CONFLICT",
            Error::AggregateTypeMismatch { .. } => "AGGREGATE_TYPE_MISMATCH",
            Error::DuplicateEventId { .. } => "DUPLICATE_EVENT_ID",
            Error::BatchPartlyStored { .. } => "BATCH_PARTLY_STORED",
            Error::Fold { reason, .. } => reason.code(),
            Error::ConnectionFailed { .. } => "CONNECTION_FAILED",
            Error::PoolTimeout { .. } => "POOL_TIMEOUT",
            Error::StatementTimeout { .. } => "STATEMENT_TIMEOUT",
            Error::TransactionConflict { .. } => "TRANSACTION_CONFLICT",
            Error::SchemaNotReady { .. } => "SCHEMA_NOT_READY",
            Error::MigrationChecksumMismatch { .. } => "MIGRATION_CHECKSUM_MISMATCH",
            Error::MigrationFailed { .. } => "MIGRATION_FAILED",
            Error::StorageModeUnavailable { .. } => "STORAGE_MODE_UNAVAILABLE",
            Error::InvalidConfig { .. } => "INVALID_CONFIG",
            Error::PermissionDenied { .. } => "PERMISSION_DENIED",
            Error::Database { .. } => "DATABASE_ERROR",
            Error::LegacyTableNotFound { .. } => "LEGACY_TABLE_NOT_FOUND",
            Error::LegacyMigrationBusy { .. } => "LEGACY_MIGRATION_BUSY",
            Error::LegacyMigrationStarted { .. } => "LEGACY_MIGRATION_STARTED",
            Error::LegacyHistoryPending { .. } => "LEGACY_HISTORY_PENDING",
            Error::HistoryRemoved { .. } => "HISTORY_REMOVED",
            Error::VerifyFailed { .. } => "VERIFY_FAILED",
            Error::ConfirmationRequired { .. } => "CONFIRMATION_REQUIRED",
            Error::RetentionRefused { .. } => "RETENTION_REFUSED",
            Error::ConsumerNeedsRepair { .. } => "CONSUMER_NEEDS_REPAIR",
            Error::CheckpointConflict { .. } => "CHECKPOINT_CONFLICT",
            Error::LeaseLost { .. } => "LEASE_LOST",
            Error::GroupFilterMismatch { .. } => "GROUP_FILTER_MISMATCH",
            Error::FeedRebaseRequired { .. } => "FEED_REBASE_REQUIRED",
            Error::CheckpointFromAnotherStore => "CHECKPOINT_FROM_ANOTHER_STORE",
            Error::UserBeingErased { .. } => "USER_BEING_ERASED",
            Error::ErasureBlocked { .. } => "ERASURE_BLOCKED",
            Error::InvalidUpcasters { .. } => "INVALID_UPCASTERS",
            Error::StreamDeleted { .. } => "STREAM_DELETED",
            Error::Internal { .. } => "INTERNAL_ERROR",
        }
    }

    /// Whether the same call may succeed when simply retried.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::ConnectionFailed { .. }
                | Error::PoolTimeout { .. }
                | Error::StatementTimeout { .. }
                | Error::TransactionConflict { .. }
        )
    }

    /// A validation error from the first of `issues` (as [`crate::validate::parse_event`]
    /// returns them).
    pub fn from_issue_list(mut issues: Vec<Issue>) -> Error {
        if issues.is_empty() {
            return Error::Internal {
                message: "validation failed without an issue".into(),
            };
        }
        let first = issues.swap_remove(0);
        Error::Validation {
            field: first.path,
            reason: first.code,
            message: first.message,
        }
    }

    /// A validation error for input that is not JSON at all (e.g. a function or a cycle).
    pub fn invalid_input(message: impl Into<String>) -> Error {
        Error::invalid("", IssueCode::InvalidType, message)
    }

    pub(crate) fn invalid(field: impl Into<String>, reason: IssueCode, message: impl Into<String>) -> Error {
        Error::Validation {
            field: field.into(),
            reason,
            message: message.into(),
        }
    }
}

impl Error {
    /// The error's details as a JSON object with camelCase keys (`aggregateId`,
    /// `expectedVersion`, `actualVersion`, `field`, `reason`, ...), for language bindings to
    /// copy onto their error objects. Always holds `retryable`.
    pub fn details(&self) -> serde_json::Map<String, serde_json::Value> {
        use serde_json::json;
        let value = match self {
            Error::Validation { field, reason, .. } => {
                json!({ "field": field, "path": field, "reason": reason.as_str() })
            }
            Error::ConcurrencyConflict {
                aggregate_id,
                expected_version,
                actual_version,
            } => json!({
                "aggregateId": aggregate_id.to_string(),
                "expectedVersion": expected_version,
                "actualVersion": actual_version,
            }),
            Error::AggregateTypeMismatch {
                aggregate_id,
                stored,
                given,
            } => json!({ "aggregateId": aggregate_id.to_string(), "storedType": stored, "givenType": given }),
            Error::Fold { index, .. } => json!({ "index": index }),
            Error::DuplicateEventId { id, field } => json!({ "eventId": id.to_string(), "field": field }),
            Error::BatchPartlyStored { stored } => json!({ "stored": stored }),
            Error::PoolTimeout { timeout_ms } => json!({ "timeoutMs": timeout_ms }),
            Error::MigrationChecksumMismatch { version, name, .. } | Error::MigrationFailed { version, name, .. } => {
                json!({ "migrationVersion": version, "migrationName": name })
            }
            Error::Database { sqlstate, .. } => json!({ "sqlstate": sqlstate }),
            Error::StorageModeUnavailable { requested, .. } => json!({ "storageMode": requested }),
            Error::ConsumerNeedsRepair { consumer } => json!({ "consumer": consumer }),
            Error::LeaseLost { group } => json!({ "group": group }),
            Error::GroupFilterMismatch { group, stored, given } => {
                json!({ "group": group, "stored": stored, "given": given })
            }
            Error::StreamDeleted { aggregate_id } => json!({ "aggregateId": aggregate_id.to_string() }),
            Error::InvalidUpcasters { step, reason, .. } => json!({ "step": step, "reason": reason.as_str() }),
            Error::ErasureBlocked {
                waited_ms,
                transactions,
                pids,
            } => json!({ "waitedMs": waited_ms, "transactions": transactions, "pids": pids }),
            Error::CheckpointConflict {
                consumer,
                stored,
                given,
            } => {
                json!({ "consumer": consumer, "stored": stored, "given": given })
            }
            Error::HistoryRemoved {
                aggregate_id,
                retained_from,
                snapshot_version,
            } => json!({
                "aggregateId": aggregate_id.to_string(),
                "retainedFrom": retained_from,
                "snapshotVersion": snapshot_version,
            }),
            Error::LegacyTableNotFound { table }
            | Error::VerifyFailed { table, .. }
            | Error::LegacyHistoryPending { table } => json!({ "table": table }),
            Error::LegacyMigrationBusy { table, holder } => json!({ "table": table, "holder": holder }),
            Error::LegacyMigrationStarted { table, migrated } => json!({ "table": table, "migrated": migrated }),
            Error::RetentionRefused {
                cutoff,
                aggregates,
                sample,
            } => json!({
                "cutoff": cutoff,
                "aggregates": aggregates,
                "sample": sample.iter().map(Uuid::to_string).collect::<Vec<_>>(),
            }),
            _ => json!({}),
        };
        let mut map = match value {
            serde_json::Value::Object(map) => map,
            _ => serde_json::Map::new(),
        };
        map.insert("retryable".into(), self.is_retryable().into());
        map
    }
}

/// What is wrong with a field. Serialized as its SCREAMING_SNAKE code.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IssueCode {
    /// A required field is missing or null.
    Required,
    /// A field has the wrong JSON type (e.g. a number where a string belongs).
    InvalidType,
    /// Not a UUID.
    InvalidUuid,
    /// Not one of entity, relation, user, system.
    InvalidAggregateType,
    /// Not one of api, automation, sync, migration, system.
    InvalidSource,
    /// Not a dotted lowercase name such as `entity.created`, or too long.
    InvalidEventType,
    /// Empty, blank or too long.
    InvalidUserId,
    /// `data` is not a JSON object.
    InvalidData,
    /// `metadata` is not a JSON object.
    InvalidMetadata,
    /// Not an integer in 1..=2147483647, or not consecutive within a batch.
    InvalidVersion,
    /// A string or key holds U+0000, which PostgreSQL's jsonb and text cannot store.
    NulCharacter,
    /// Larger than the configured limit.
    TooLarge,
    /// A number outside its allowed range (limits, days, dates).
    OutOfRange,
    /// Not an RFC 3339 date-time or a millisecond timestamp.
    InvalidTimestamp,
    /// Two events of one batch share an id.
    DuplicateEventId,
    /// A number that a JavaScript number (an IEEE double) cannot hold exactly, such as `1e400` or
    /// `9007199254740993`: it would read back changed. See [`crate::numbers`].
    InexactNumber,
    /// A batch with no events.
    EmptyBatch,
    /// JSON nested deeper than [`crate::validate::MAX_JSON_DEPTH`] levels: no reader could parse it back.
    TooDeep,
    /// A key of an options object that is not an option of the call (a misspelt `dryRun`, say).
    UnknownOption,
}

impl IssueCode {
    /// The stable code.
    pub fn as_str(self) -> &'static str {
        match self {
            IssueCode::Required => "REQUIRED",
            IssueCode::InvalidType => "INVALID_TYPE",
            IssueCode::InvalidUuid => "INVALID_UUID",
            IssueCode::InvalidAggregateType => "INVALID_AGGREGATE_TYPE",
            IssueCode::InvalidSource => "INVALID_SOURCE",
            IssueCode::InvalidEventType => "INVALID_EVENT_TYPE",
            IssueCode::InvalidUserId => "INVALID_USER_ID",
            IssueCode::InvalidData => "INVALID_DATA",
            IssueCode::InvalidMetadata => "INVALID_METADATA",
            IssueCode::InvalidVersion => "INVALID_VERSION",
            IssueCode::NulCharacter => "NUL_CHARACTER",
            IssueCode::TooLarge => "TOO_LARGE",
            IssueCode::OutOfRange => "OUT_OF_RANGE",
            IssueCode::InvalidTimestamp => "INVALID_TIMESTAMP",
            IssueCode::DuplicateEventId => "DUPLICATE_EVENT_ID",
            IssueCode::InexactNumber => "INEXACT_NUMBER",
            IssueCode::EmptyBatch => "EMPTY_BATCH",
            IssueCode::TooDeep => "TOO_DEEP",
            IssueCode::UnknownOption => "UNKNOWN_OPTION",
        }
    }
}

impl std::fmt::Display for IssueCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for IssueCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// One problem found by validation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Issue {
    /// Path of the field, e.g. `aggregateId`, `data.tags[2]`.
    pub path: String,
    /// What is wrong.
    pub code: IssueCode,
    /// A sentence for people.
    pub message: String,
}

impl Issue {
    pub(crate) fn new(path: impl Into<String>, code: IssueCode, message: impl Into<String>) -> Issue {
        Issue {
            path: path.into(),
            code,
            message: message.into(),
        }
    }
}
