use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// What kind of thing an aggregate is. Stored as lowercase text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AggregateType {
    /// `entity`: notes, tasks, documents.
    Entity,
    /// `relation`: a link between entities.
    Relation,
    /// `user`: a user account.
    User,
    /// `system`: the system itself.
    System,
}

impl AggregateType {
    /// Every value, in schema order.
    pub const ALL: [AggregateType; 4] = [
        AggregateType::Entity,
        AggregateType::Relation,
        AggregateType::User,
        AggregateType::System,
    ];

    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            AggregateType::Entity => "entity",
            AggregateType::Relation => "relation",
            AggregateType::User => "user",
            AggregateType::System => "system",
        }
    }
}

impl FromStr for AggregateType {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        AggregateType::ALL.into_iter().find(|t| t.as_str() == s).ok_or(())
    }
}

impl fmt::Display for AggregateType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an event came from. Stored as lowercase text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventSource {
    /// `api`: a user action through the API (the default).
    #[default]
    Api,
    /// `automation`: a rule or workflow.
    Automation,
    /// `sync`: a device or integration sync.
    Sync,
    /// `migration`: copied from the legacy events table.
    Migration,
    /// `system`: the system itself.
    System,
}

impl EventSource {
    /// Every value, in schema order.
    pub const ALL: [EventSource; 5] = [
        EventSource::Api,
        EventSource::Automation,
        EventSource::Sync,
        EventSource::Migration,
        EventSource::System,
    ];

    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            EventSource::Api => "api",
            EventSource::Automation => "automation",
            EventSource::Sync => "sync",
            EventSource::Migration => "migration",
            EventSource::System => "system",
        }
    }
}

impl FromStr for EventSource {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        EventSource::ALL.into_iter().find(|t| t.as_str() == s).ok_or(())
    }
}

impl fmt::Display for EventSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event to append. Check it with [`NewEvent::validate`], or build it from untyped JSON with
/// [`crate::validate::parse_event`].
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// The event id; generated (UUIDv7) when absent. Supplying it makes a retried append
    /// idempotent.
    pub id: Option<Uuid>,
    /// When it happened; the database's `now()` when absent.
    pub timestamp: Option<DateTime<Utc>>,
    /// The aggregate (entity being modified).
    pub aggregate_id: Uuid,
    /// The aggregate's type; fixed by the aggregate's first event.
    pub aggregate_type: AggregateType,
    /// Dotted lowercase name, e.g. `entity.created`.
    pub event_type: String,
    /// The acting user.
    pub user_id: String,
    /// The change, as a JSON object (deltas only).
    pub data: Value,
    /// Optional JSON object about the event.
    pub metadata: Option<Value>,
    /// The aggregate's version after this event: its current version + 1 (1 creates it).
    pub version: i32,
    /// The event that caused this one.
    pub causation_id: Option<Uuid>,
    /// The workflow this event belongs to.
    pub correlation_id: Option<Uuid>,
    /// Where it came from.
    pub source: EventSource,
    /// The version of this event type's shape that `data` and `metadata` follow (see
    /// [`crate::upcast`]). 1 unless the writer says otherwise.
    pub schema_version: i32,
}

impl NewEvent {
    /// A new event with the given required fields, source `api` and no options.
    pub fn new(
        aggregate_id: Uuid,
        aggregate_type: AggregateType,
        event_type: impl Into<String>,
        user_id: impl Into<String>,
        data: Value,
        version: i32,
    ) -> NewEvent {
        NewEvent {
            id: None,
            timestamp: None,
            aggregate_id,
            aggregate_type,
            event_type: event_type.into(),
            user_id: user_id.into(),
            data,
            metadata: None,
            version,
            causation_id: None,
            correlation_id: None,
            source: EventSource::Api,
            schema_version: 1,
        }
    }
}

/// A stored event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventRecord {
    /// Event id.
    pub id: Uuid,
    /// When it happened.
    pub timestamp: DateTime<Utc>,
    /// The aggregate.
    pub aggregate_id: Uuid,
    /// The aggregate's type.
    pub aggregate_type: AggregateType,
    /// Dotted lowercase event name.
    pub event_type: String,
    /// The acting user.
    pub user_id: String,
    /// The delta.
    pub data: Value,
    /// Metadata, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    /// The aggregate's version after this event.
    pub version: i32,
    /// The event that caused this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    /// The workflow this event belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<Uuid>,
    /// Where it came from.
    pub source: EventSource,
    /// Global insert order across all aggregates (gaps are possible).
    #[serde(default)]
    pub position: i64,
    /// Set when the stored row cannot be read back as an event: a row written by other means than
    /// the store (plain SQL, another client) with JSON nested deeper than any reader parses, a
    /// timestamp of `infinity`, and the like. The record still names the event (id, aggregate,
    /// version, position) and stands in its place, so that one such row never fails a whole read
    /// or stops a feed; the unreadable column's own field holds a stand-in (`{}`, the Unix
    /// epoch). A fold refuses it (`INVALID_EVENT`); a consumer skips it, or parks it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreadable: Option<Unreadable>,
    /// The version of this event type's shape that `data` and `metadata` follow, as delivered:
    /// the stored one, or the one the repository's upcasters brought it to.
    #[serde(default = "first_schema_version")]
    pub schema_version: i32,
    /// What the event was stored as, when upcasters changed it on the way (see
    /// [`crate::upcast`]); `None` when it is delivered as stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upcast_from: Option<StoredShape>,
}

fn first_schema_version() -> i32 {
    1
}

impl EventRecord {
    /// The schema version the event was stored at.
    pub fn stored_schema_version(&self) -> i32 {
        self.upcast_from
            .as_ref()
            .map_or(self.schema_version, |s| s.schema_version)
    }

    /// The event type the event was stored as.
    pub fn stored_event_type(&self) -> &str {
        self.upcast_from.as_ref().map_or(&self.event_type, |s| &s.event_type)
    }

    /// The event type it was stored as, only when an upcaster renamed it (the record's
    /// `storedEventType` in JavaScript).
    pub fn renamed_from(&self) -> Option<&str> {
        Some(self.stored_event_type()).filter(|t| *t != self.event_type)
    }
}

/// What an upcast event was stored as (see [`EventRecord::upcast_from`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredShape {
    /// The stored event type.
    pub event_type: String,
    /// The stored schema version.
    pub schema_version: i32,
}

/// What could not be read of a stored event (see [`EventRecord::unreadable`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Unreadable {
    /// The column: `data`, `metadata`, `timestamp`, `aggregate_type` or `source`.
    pub column: String,
    /// Why it could not be read.
    pub reason: String,
    /// The stored value as PostgreSQL's text, cut at 64 KiB.
    pub raw: String,
}
