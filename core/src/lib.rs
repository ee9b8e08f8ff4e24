//! The Synap event store.
//!
//! `events_v2` holds one row per event; [`EventRepository`] appends with optimistic locking and
//! reads aggregate, user and correlation streams. The pure part of this crate (the types,
//! [`validate`]) builds without the `postgres` feature, for wasm.
#![deny(missing_docs)]

mod error;

pub mod fold;
pub mod interop;
mod model;
pub mod numbers;
pub mod query;
pub mod upcast;
pub mod validate;

#[cfg(feature = "postgres")]
mod db;

pub use error::{Error, Result, UpcasterErrorKind};
pub use fold::{
    apply_delta, apply_merge_patch, fold_events, fold_records, format_timestamp, parse_fold_options, Bookkeeping,
    FoldErrorKind, FoldOptions, FoldResult, HistoryStep, RecordFolder, Snapshot,
};
pub use model::{AggregateType, EventRecord, EventSource, NewEvent, StoredShape, Unreadable};
pub use query::{CountFilter, StreamOptions, UserStreamOptions};
pub use upcast::Upcasters;
pub use validate::{Issue, IssueCode, Limits, Report};

#[cfg(feature = "postgres")]
pub use db::legacy::{
    infer_aggregate_type, CountDifference, DropLegacyReport, LegacyMigrationOptions, LegacyMigrationProgress,
    LegacyMigrationReport, LegacyRowFailure, Mismatch, OnInvalid, VerifyReport, DEFAULT_LEGACY_TABLE, DEFAULT_WRITERS,
    MAX_LISTED,
};
#[cfg(feature = "postgres")]
pub use db::retention::{
    LegacyMigrationStatus, RetentionAge, RetentionOptions, RetentionReport, RetentionTarget, StoreStats,
};
#[cfg(feature = "postgres")]
pub use db::sql::quote_table;
#[cfg(feature = "postgres")]
pub use db::{
    config::{Pooler, RepositoryConfig, StorageMode},
    erasure::{
        DeleteStreamOptions, EraseOptions, ErasedRows, ErasureNotice, ErasureReport, StreamDeletion, EVENT_ERASED,
        STREAM_DELETED, TABLES_WITHOUT_USER_DATA, USER_DATA_TABLES, USER_ERASED,
    },
    feed::{
        read_all_options, Checkpoint, ConsumerRepair, ConsumerStatus, FeedFilter, FeedRebase, Page, SubscribeOptions,
        Subscription, SCAN_ROWS,
    },
    groups::{
        GroupMember, GroupOptions, GroupPartitionStatus, GroupStatus, Handler, HandlerError, HandlerFuture,
        ParkedEvent, ProjectionTx, DEFAULT_PARTITIONS,
    },
    migrate::{Migration, MigrationReport, MigrationStatus, Repeatable, MIGRATIONS, REPEATABLE},
    replay::{fold_rules, replay_options, Replay, SnapshotAndTail},
    repository::EventRepository,
};
