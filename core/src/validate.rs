//! Validation of events and query inputs: one set of rules for Rust, Node and the browser.
//!
//! About 770 lines and 180 of tests: the field checks are shared by the typed and the untyped
//! paths, and splitting them would split one rule set.
//!
//! [`parse_event`] checks untyped JSON (what JavaScript sends) and returns a typed [`NewEvent`]
//! or every [`Issue`] found; [`NewEvent::validate`] checks a typed event. Both use the same
//! field checks below.

use std::io;
use std::str::FromStr;

use chrono::{DateTime, Datelike, TimeZone, Utc};
use serde::Serialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::error::{Error, Result};
pub use crate::error::{Issue, IssueCode};
use crate::model::{AggregateType, EventSource, NewEvent};

/// Size limits applied by validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest `data` (and, separately, `metadata`) as serialized JSON, in bytes. Default 1 MiB.
    pub max_data_bytes: usize,
    /// Longest `event_type`, in bytes. Default 128.
    pub max_event_type_len: usize,
    /// Longest `user_id`, in bytes. Default 255.
    pub max_user_id_len: usize,
    /// Largest `limit` a read accepts. Default 10,000.
    pub max_read_limit: i64,
    /// Largest `days` a user-stream read accepts. Default 3,650.
    pub max_days: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_data_bytes: 1024 * 1024,
            max_event_type_len: 128,
            max_user_id_len: 255,
            max_read_limit: 10_000,
            max_days: 3_650,
        }
    }
}

/// How deep `data` and `metadata` may nest (arrays and objects; the value itself is level 1):
/// what every reader of the store parses back (serde_json's limit: 127 levels). Appends from Rust
/// and Node, batches, the legacy migration and dual-write all refuse deeper values (`TOO_DEEP`).
pub const MAX_JSON_DEPTH: usize = 127;

/// Whether `value` nests arrays and objects deeper than `max` levels. Iterative: a value too deep
/// for a recursive walk (or for serde_json's own recursion) is measured without one.
pub fn deeper_than(value: &Value, max: usize) -> bool {
    let mut stack: Vec<(&Value, usize)> = vec![(value, 1)];
    while let Some((v, level)) = stack.pop() {
        match v {
            Value::Array(_) | Value::Object(_) if level > max => return true,
            Value::Array(items) => stack.extend(items.iter().map(|c| (c, level + 1))),
            Value::Object(map) => stack.extend(map.values().map(|c| (c, level + 1))),
            _ => {}
        }
    }
    false
}

/// The result of validating an event for display: `{ valid, errors }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// True when `errors` is empty.
    pub valid: bool,
    /// Every problem found.
    pub errors: Vec<Issue>,
}

/// Validates untyped JSON as an event to append, returning every problem as data.
pub fn report(value: &Value, limits: &Limits) -> Report {
    match parse_event(value, limits) {
        Ok(_) => Report {
            valid: true,
            errors: Vec::new(),
        },
        Err(errors) => Report { valid: false, errors },
    }
}

/// Parses untyped JSON (camelCase keys, as the TypeScript API sends them) into a [`NewEvent`].
///
/// Fails with every [`Issue`] found. Unknown keys are ignored.
pub fn parse_event(value: &Value, limits: &Limits) -> std::result::Result<NewEvent, Vec<Issue>> {
    let obj = value.as_object().ok_or_else(not_an_object)?;
    parse_fields(obj, obj.get("data").cloned(), obj.get("metadata").cloned(), limits)
}

/// [`parse_event`] for an event the caller no longer needs: its `data` and `metadata` are moved
/// into the [`NewEvent`] rather than copied.
pub fn parse_event_owned(value: Value, limits: &Limits) -> std::result::Result<NewEvent, Vec<Issue>> {
    let Value::Object(mut obj) = value else {
        return Err(not_an_object());
    };
    let (data, metadata) = (obj.remove("data"), obj.remove("metadata"));
    parse_fields(&obj, data, metadata, limits)
}

fn not_an_object() -> Vec<Issue> {
    vec![Issue::new("", IssueCode::InvalidType, "an event must be a JSON object")]
}

/// The fields of an event object, with its `data` and `metadata` members given apart.
fn parse_fields(
    obj: &serde_json::Map<String, Value>,
    data: Option<Value>,
    metadata: Option<Value>,
    limits: &Limits,
) -> std::result::Result<NewEvent, Vec<Issue>> {
    let mut issues = Vec::new();
    let id = optional_uuid(obj, "id", &mut issues);
    let timestamp = optional_timestamp(obj, "timestamp", &mut issues);
    let aggregate_id =
        required_str(obj, "aggregateId", &mut issues).and_then(|s| parse_uuid("aggregateId", s, &mut issues));
    let aggregate_type = required_str(obj, "aggregateType", &mut issues).and_then(|s| {
        AggregateType::from_str(s)
            .map_err(|()| {
                issues.push(Issue::new(
                    "aggregateType",
                    IssueCode::InvalidAggregateType,
                    format!("\"{}\" is not one of entity, relation, user, system", truncate(s)),
                ))
            })
            .ok()
    });
    let event_type = required_str(obj, "eventType", &mut issues).map(str::to_owned);
    let user_id = required_str(obj, "userId", &mut issues).map(str::to_owned);
    let data = match data {
        None | Some(Value::Null) => {
            issues.push(Issue::new("data", IssueCode::Required, "data is required"));
            None
        }
        d => d,
    };
    let metadata = metadata.filter(|m| !m.is_null());
    let version = match obj.get("version") {
        None | Some(Value::Null) => {
            issues.push(Issue::new("version", IssueCode::Required, "version is required"));
            None
        }
        Some(Value::Number(n)) => match n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 1e18)
                .map(|f| f as i64)
        }) {
            Some(v) => match check_version(v) {
                Ok(v) => Some(v),
                Err(issue) => {
                    issues.push(issue);
                    None
                }
            },
            None => {
                issues.push(Issue::new(
                    "version",
                    IssueCode::InvalidVersion,
                    format!("version must be an integer, not {n}"),
                ));
                None
            }
        },
        Some(_) => {
            issues.push(Issue::new(
                "version",
                IssueCode::InvalidType,
                "version must be a number",
            ));
            None
        }
    };
    let schema_version = match obj.get("schemaVersion") {
        None | Some(Value::Null) => 1,
        Some(Value::Number(n)) => match json_integer(n) {
            Some(v) if (1..=i64::from(i32::MAX)).contains(&v) => v as i32,
            _ => {
                issues.push(Issue::new(
                    "schemaVersion",
                    IssueCode::InvalidVersion,
                    format!("schemaVersion must be an integer between 1 and 2147483647, not {n}"),
                ));
                1
            }
        },
        Some(_) => {
            issues.push(Issue::new(
                "schemaVersion",
                IssueCode::InvalidType,
                "schemaVersion must be a number",
            ));
            1
        }
    };
    let causation_id = optional_uuid(obj, "causationId", &mut issues);
    let correlation_id = optional_uuid(obj, "correlationId", &mut issues);
    let source = match obj.get("source") {
        None | Some(Value::Null) => Some(EventSource::Api),
        Some(Value::String(s)) => match EventSource::from_str(s) {
            Ok(src) => Some(src),
            Err(()) => {
                issues.push(Issue::new(
                    "source",
                    IssueCode::InvalidSource,
                    format!(
                        "\"{}\" is not one of api, automation, sync, migration, system",
                        truncate(s)
                    ),
                ));
                None
            }
        },
        Some(_) => {
            issues.push(Issue::new("source", IssueCode::InvalidType, "source must be a string"));
            None
        }
    };

    match (aggregate_id, aggregate_type, event_type, user_id, data, version, source) {
        (
            Some(aggregate_id),
            Some(aggregate_type),
            Some(event_type),
            Some(user_id),
            Some(data),
            Some(version),
            Some(source),
        ) if issues.is_empty() => {
            let event = NewEvent {
                id: id.flatten(),
                timestamp: timestamp.flatten(),
                aggregate_id,
                aggregate_type,
                event_type,
                user_id,
                data,
                metadata,
                version,
                causation_id: causation_id.flatten(),
                correlation_id: correlation_id.flatten(),
                source,
                schema_version,
            };
            let more = check_fields(&event, limits);
            if more.is_empty() {
                Ok(event)
            } else {
                Err(more)
            }
        }
        (_, _, event_type, user_id, data, _, _) => {
            // Report the content problems too, so a form can show them all at once.
            if let Some(t) = &event_type {
                issues.extend(check_event_type(t, limits).err());
                issues.extend(check_not_reserved(t).err());
            }
            if let Some(u) = &user_id {
                issues.extend(check_user_id(u, limits).err());
            }
            if let Some(d) = &data {
                issues.extend(check_data(d, limits));
            }
            if let Some(m) = &metadata {
                issues.extend(check_metadata(m, limits));
            }
            Err(issues)
        }
    }
}

/// Parses untyped JSON as a batch: an array of events. Paths are prefixed with `events[i]`.
///
/// Fails with [`Error::Validation`] naming the first problem.
pub fn parse_batch(value: &Value, limits: &Limits) -> Result<Vec<NewEvent>> {
    let items = value.as_array().ok_or_else(not_an_array)?;
    first_problem(items.iter().map(|item| parse_event(item, limits)))
}

/// [`parse_batch`] for a batch the caller no longer needs (see [`parse_event_owned`]).
pub fn parse_batch_owned(value: Value, limits: &Limits) -> Result<Vec<NewEvent>> {
    let Value::Array(items) = value else {
        return Err(not_an_array());
    };
    first_problem(items.into_iter().map(|item| parse_event_owned(item, limits)))
}

fn not_an_array() -> Error {
    Error::invalid("events", IssueCode::InvalidType, "events must be an array")
}

/// The parsed events, or the first problem of the first event that has one, its path prefixed
/// with `events[i]`.
fn first_problem(parsed: impl Iterator<Item = std::result::Result<NewEvent, Vec<Issue>>>) -> Result<Vec<NewEvent>> {
    let mut events = Vec::with_capacity(parsed.size_hint().0);
    for (i, outcome) in parsed.enumerate() {
        match outcome {
            Ok(event) => events.push(event),
            Err(issues) => {
                let first = issues.into_iter().next();
                let (path, code, message) = first
                    .map(|f| (f.path, f.code, f.message))
                    .unwrap_or_else(|| (String::new(), IssueCode::InvalidType, "invalid event".into()));
                let path = if path.is_empty() {
                    format!("events[{i}]")
                } else {
                    format!("events[{i}].{path}")
                };
                return Err(Error::invalid(path, code, message));
            }
        }
    }
    Ok(events)
}

impl NewEvent {
    /// Checks every rule of a typed event.
    ///
    /// Fails with [`Error::Validation`] naming the first offending field.
    pub fn validate(&self, limits: &Limits) -> Result<()> {
        let issues = check_fields(self, limits);
        if issues.is_empty() {
            Ok(())
        } else {
            Err(Error::from_issue_list(issues))
        }
    }
}

/// Checks a batch: each event, no duplicate ids, and the versions of each aggregate consecutive
/// in batch order. Paths are prefixed with `events[i]`.
///
/// Fails with [`Error::Validation`] naming the first problem.
pub fn validate_batch(events: &[NewEvent], limits: &Limits) -> Result<()> {
    check_batch(events, Some(limits))
}

/// The batch rules alone (not empty, no duplicate ids, consecutive versions per aggregate), for
/// events whose fields were already checked by [`parse_batch`] (the repository's JSON entry).
#[cfg(feature = "postgres")]
pub(crate) fn validate_batch_shape(events: &[NewEvent]) -> Result<()> {
    check_batch(events, None)
}

fn check_batch(events: &[NewEvent], field_limits: Option<&Limits>) -> Result<()> {
    if events.is_empty() {
        return Err(Error::invalid(
            "events",
            IssueCode::EmptyBatch,
            "a batch needs at least one event",
        ));
    }
    let mut last_version: std::collections::HashMap<Uuid, i32> = std::collections::HashMap::new();
    let mut ids = std::collections::HashSet::new();
    for (i, event) in events.iter().enumerate() {
        if let Some(first) = field_limits.and_then(|limits| check_fields(event, limits).into_iter().next()) {
            let path = if first.path.is_empty() {
                format!("events[{i}]")
            } else {
                format!("events[{i}].{}", first.path)
            };
            return Err(Error::invalid(path, first.code, first.message));
        }
        if let Some(id) = event.id {
            if !ids.insert(id) {
                return Err(Error::invalid(
                    format!("events[{i}].id"),
                    IssueCode::DuplicateEventId,
                    format!("event id {id} appears twice in the batch"),
                ));
            }
        }
        if let Some(prev) = last_version.insert(event.aggregate_id, event.version) {
            if event.version != prev + 1 {
                return Err(Error::invalid(
                    format!("events[{i}].version"),
                    IssueCode::InvalidVersion,
                    format!(
                        "aggregate {} has version {prev} earlier in the batch, so this event must be version {}, not {}",
                        event.aggregate_id,
                        prev + 1,
                        event.version
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn check_fields(event: &NewEvent, limits: &Limits) -> Vec<Issue> {
    let mut issues = Vec::new();
    issues.extend(check_event_type(&event.event_type, limits).err());
    issues.extend(check_not_reserved(&event.event_type).err());
    issues.extend(check_user_id(&event.user_id, limits).err());
    issues.extend(check_data(&event.data, limits));
    if let Some(m) = &event.metadata {
        issues.extend(check_metadata(m, limits));
    }
    issues.extend(check_version(i64::from(event.version)).err());
    issues.extend(event.timestamp.and_then(|t| check_timestamp(t).err()));
    issues
}

/// Checks an event's time: from 4714-11-24 BC, the earliest PostgreSQL stores, to before the
/// store's end of time (see [`end_of_time`]).
pub fn check_timestamp(t: DateTime<Utc>) -> std::result::Result<(), Issue> {
    let issue = |message: &str| Err(Issue::new("timestamp", IssueCode::InvalidTimestamp, message.to_owned()));
    if t < earliest_stored() {
        issue("timestamp is before 4714-11-24 BC, the earliest time PostgreSQL stores")
    } else if t >= end_of_time() {
        issue("timestamp is past 262142-12-31T23:59:59.999998Z, the latest time the store holds")
    } else {
        Ok(())
    }
}

/// Checks a version number: an integer in 1..=2147483647.
pub fn check_version(v: i64) -> std::result::Result<i32, Issue> {
    if (1..=i64::from(i32::MAX)).contains(&v) {
        Ok(v as i32)
    } else {
        Err(Issue::new(
            "version",
            IssueCode::InvalidVersion,
            format!("version must be between 1 and 2147483647, not {v}"),
        ))
    }
}

/// Checks an event type: dotted lowercase segments (`[a-z][a-z0-9_]*`, at least two, e.g.
/// `entity.title_changed`), at most [`Limits::max_event_type_len`] bytes.
pub fn check_event_type(s: &str, limits: &Limits) -> std::result::Result<(), Issue> {
    let issue = |msg: String| Issue::new("eventType", IssueCode::InvalidEventType, msg);
    if s.len() > limits.max_event_type_len {
        return Err(issue(format!(
            "eventType is longer than {} bytes",
            limits.max_event_type_len
        )));
    }
    let segment_ok = |seg: &str| {
        let mut chars = seg.chars();
        matches!(chars.next(), Some('a'..='z')) && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
    };
    if s.split('.').count() < 2 || !s.split('.').all(segment_ok) {
        return Err(issue(format!(
            "\"{}\" is not a dotted lowercase event type such as entity.created",
            truncate(s)
        )));
    }
    Ok(())
}

/// The event types the store writes itself (docs/erasure.md): `synap.user_erased`, and any
/// other `synap.` type it may add. An append of one is refused, so that a notice in the feed
/// always comes from the store and an erasure never leaves a user's own event behind as one.
pub const RESERVED_EVENT_TYPE_PREFIX: &str = "synap.";

/// Refuses an appended event type in the store's own namespace ([`RESERVED_EVENT_TYPE_PREFIX`]).
pub fn check_not_reserved(s: &str) -> std::result::Result<(), Issue> {
    if s.starts_with(RESERVED_EVENT_TYPE_PREFIX) {
        return Err(Issue::new(
            "eventType",
            IssueCode::InvalidEventType,
            format!(
                "\"{}\" is reserved: event types under synap. are the store's own notices",
                truncate(s)
            ),
        ));
    }
    Ok(())
}

/// Checks a user id: not blank, no U+0000, at most [`Limits::max_user_id_len`] bytes.
pub fn check_user_id(s: &str, limits: &Limits) -> std::result::Result<(), Issue> {
    let issue = |code, msg: String| Issue::new("userId", code, msg);
    if s.trim().is_empty() {
        return Err(issue(IssueCode::InvalidUserId, "userId must not be empty".into()));
    }
    if s.len() > limits.max_user_id_len {
        return Err(issue(
            IssueCode::InvalidUserId,
            format!("userId is longer than {} bytes", limits.max_user_id_len),
        ));
    }
    if s.contains('\0') {
        return Err(issue(IssueCode::NulCharacter, "userId contains U+0000".into()));
    }
    Ok(())
}

fn check_data(data: &Value, limits: &Limits) -> Vec<Issue> {
    check_json_object("data", data, IssueCode::InvalidData, limits)
}

fn check_metadata(metadata: &Value, limits: &Limits) -> Vec<Issue> {
    check_json_object("metadata", metadata, IssueCode::InvalidMetadata, limits)
}

fn check_json_object(field: &str, value: &Value, not_object: IssueCode, limits: &Limits) -> Vec<Issue> {
    if !value.is_object() {
        return vec![Issue::new(
            field,
            not_object,
            format!("{field} must be a JSON object, not {}", json_kind(value)),
        )];
    }
    // First, and without recursion: the other checks walk the value recursively.
    if deeper_than(value, MAX_JSON_DEPTH) {
        return vec![Issue::new(
            field,
            IssueCode::TooDeep,
            format!("{field} nests arrays and objects deeper than {MAX_JSON_DEPTH} levels"),
        )];
    }
    let mut issues = Vec::new();
    find_nul(value, &mut field.to_owned(), &mut issues);
    if issues.is_empty() {
        if let Some(path) = crate::numbers::first_uncarried(value, &mut field.to_owned()) {
            issues.push(Issue::new(
                path,
                IssueCode::InexactNumber,
                "a JavaScript number cannot hold this number exactly, so it would read back changed; \
                 store it as a string",
            ));
        }
    }
    if issues.is_empty() {
        let size = json_size(value);
        if size > limits.max_data_bytes {
            issues.push(Issue::new(
                field,
                IssueCode::TooLarge,
                format!(
                    "{field} is {size} bytes as JSON; the limit is {}",
                    limits.max_data_bytes
                ),
            ));
        }
    }
    issues
}

/// Reports the first U+0000 in a string or key under `value`.
fn find_nul(value: &Value, path: &mut String, issues: &mut Vec<Issue>) {
    if !issues.is_empty() {
        return;
    }
    match value {
        Value::String(s) if s.contains('\0') => {
            issues.push(Issue::new(
                path.clone(),
                IssueCode::NulCharacter,
                "string contains U+0000, which PostgreSQL cannot store",
            ));
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                find_nul(item, path, issues);
                path.truncate(len);
            }
        }
        Value::Object(map) => {
            for (key, item) in map {
                let len = path.len();
                path.push('.');
                path.push_str(key);
                if key.contains('\0') {
                    issues.push(Issue::new(
                        path.clone(),
                        IssueCode::NulCharacter,
                        "key contains U+0000, which PostgreSQL cannot store",
                    ));
                    return;
                }
                find_nul(item, path, issues);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

/// Serialized size of a JSON value, without keeping the bytes.
pub fn json_size(value: &Value) -> usize {
    struct Counter(usize);
    impl io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Writing a Value to an infallible writer cannot fail.
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

/// Checks a read limit: 1..=[`Limits::max_read_limit`].
pub fn check_limit(field: &str, limit: i64, limits: &Limits) -> Result<i64> {
    if (1..=limits.max_read_limit).contains(&limit) {
        Ok(limit)
    } else {
        Err(Error::invalid(
            field,
            IssueCode::OutOfRange,
            format!("{field} must be between 1 and {}, not {limit}", limits.max_read_limit),
        ))
    }
}

/// Checks a day count: 1..=[`Limits::max_days`].
pub fn check_days(field: &str, days: i64, limits: &Limits) -> Result<i64> {
    if (1..=limits.max_days).contains(&days) {
        Ok(days)
    } else {
        Err(Error::invalid(
            field,
            IssueCode::OutOfRange,
            format!("{field} must be between 1 and {}, not {days}", limits.max_days),
        ))
    }
}

/// Checks a user id given as a query argument.
pub fn check_user_id_arg(field: &str, user_id: &str, limits: &Limits) -> Result<()> {
    check_user_id(user_id, limits).map_err(|i| Error::invalid(field, i.code, i.message))
}

/// Checks an event type given as a query argument.
pub fn check_event_type_arg(field: &str, event_type: &str, limits: &Limits) -> Result<()> {
    check_event_type(event_type, limits).map_err(|i| Error::invalid(field, i.code, i.message))
}

/// Parses a UUID given as a query argument.
pub fn parse_uuid_arg(field: &str, s: &str) -> Result<Uuid> {
    Uuid::parse_str(s).map_err(|_| {
        Error::invalid(
            field,
            IssueCode::InvalidUuid,
            format!("\"{}\" is not a UUID", truncate(s)),
        )
    })
}

/// Parses an aggregate type given as a query argument.
pub fn parse_aggregate_type_arg(field: &str, s: &str) -> Result<AggregateType> {
    AggregateType::from_str(s).map_err(|()| {
        Error::invalid(
            field,
            IssueCode::InvalidAggregateType,
            format!("\"{}\" is not one of entity, relation, user, system", truncate(s)),
        )
    })
}

fn required_str<'a>(obj: &'a Map<String, Value>, key: &str, issues: &mut Vec<Issue>) -> Option<&'a str> {
    match obj.get(key) {
        None | Some(Value::Null) => {
            issues.push(Issue::new(key, IssueCode::Required, format!("{key} is required")));
            None
        }
        Some(Value::String(s)) => Some(s),
        Some(other) => {
            issues.push(Issue::new(
                key,
                IssueCode::InvalidType,
                format!("{key} must be a string, not {}", json_kind(other)),
            ));
            None
        }
    }
}

fn parse_uuid(key: &str, s: &str, issues: &mut Vec<Issue>) -> Option<Uuid> {
    match Uuid::parse_str(s) {
        Ok(u) => Some(u),
        Err(_) => {
            issues.push(Issue::new(
                key,
                IssueCode::InvalidUuid,
                format!("\"{}\" is not a UUID", truncate(s)),
            ));
            None
        }
    }
}

/// `Some(None)`: absent; `Some(Some(_))`: valid; `None`: invalid (issue pushed).
fn optional_uuid(obj: &Map<String, Value>, key: &str, issues: &mut Vec<Issue>) -> Option<Option<Uuid>> {
    match obj.get(key) {
        None | Some(Value::Null) => Some(None),
        Some(Value::String(s)) => parse_uuid(key, s, issues).map(Some),
        Some(other) => {
            issues.push(Issue::new(
                key,
                IssueCode::InvalidType,
                format!("{key} must be a UUID string, not {}", json_kind(other)),
            ));
            None
        }
    }
}

fn optional_timestamp(obj: &Map<String, Value>, key: &str, issues: &mut Vec<Issue>) -> Option<Option<DateTime<Utc>>> {
    match obj.get(key) {
        None | Some(Value::Null) => Some(None),
        Some(v) => match parse_timestamp(v) {
            Some(t) => Some(Some(t)),
            None => {
                issues.push(Issue::new(
                    key,
                    IssueCode::InvalidTimestamp,
                    format!(
                        "{key} must be an RFC 3339 date-time or milliseconds since 1970, at most in the year 262142"
                    ),
                ));
                None
            }
        },
    }
}

/// Reads a timestamp from an RFC 3339 string or a number of milliseconds since 1970.
///
/// Strings may also carry the six-digit signed year that JavaScript's `toISOString()` writes
/// outside the years 0000 to 9999 (`+010000-01-01T00:00:00.000Z`, `-000001-...`): what
/// [`crate::fold::format_timestamp`] writes is read back.
pub fn parse_timestamp(v: &Value) -> Option<DateTime<Utc>> {
    match v {
        Value::String(s) => match DateTime::parse_from_rfc3339(s) {
            Ok(t) => Some(t.with_timezone(&Utc)),
            Err(_) => parse_expanded_year(s),
        },
        Value::Number(n) => {
            let ms = n.as_f64()?;
            if !ms.is_finite() || ms.fract() != 0.0 || ms.abs() > 8.64e15 {
                return None;
            }
            Utc.timestamp_millis_opt(ms as i64).single()
        }
        _ => None,
    }
}

/// The earliest `timestamptz` PostgreSQL stores: 4714-11-24 BC, the year -4713 in ISO 8601's
/// numbering (the latest, in the year 294276, is past chrono's, so every parsed time is below it).
pub(crate) fn earliest_stored() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(-4713, 11, 24, 0, 0, 0)
        .single()
        .expect("within chrono's range")
}

/// The first instant the store does not hold: the last microsecond of chrono's last day
/// (262142-12-31). The feed reads a day up to the next midnight, which that day does not have, so
/// it reads the last day up to this instant instead; nothing stored is at or after it.
pub(crate) fn end_of_time() -> DateTime<Utc> {
    chrono::NaiveDate::MAX
        .and_hms_micro_opt(23, 59, 59, 999_999)
        .expect("a valid time")
        .and_utc()
}

/// `±YYYYYY-MM-DDTHH:MM:SS[.fff](Z|±HH:MM)`: ECMAScript's expanded years (`-000000` is not one).
fn parse_expanded_year(s: &str) -> Option<DateTime<Utc>> {
    let (sign, digits, rest) = (s.get(..1)?, s.get(1..7)?, s.get(7..)?);
    if !digits.bytes().all(|b| b.is_ascii_digit()) || !rest.starts_with('-') {
        return None;
    }
    let year: i32 = match (sign, digits.parse::<i32>().ok()?) {
        ("-", 0) => return None,
        ("-", y) => -y,
        ("+", y) => y,
        _ => return None,
    };
    // The rest read in a stand-in year that has a 29 February exactly when `year` has, then
    // moved to `year` before the offset applies.
    let leap = chrono::NaiveDate::from_ymd_opt(year, 2, 29).is_some();
    let stand_in = DateTime::parse_from_rfc3339(&format!("{}{rest}", if leap { 2000 } else { 2001 })).ok()?;
    let local = stand_in.naive_local().with_year(year)?;
    local
        .and_local_timezone(*stand_in.offset())
        .single()
        .map(|t| t.with_timezone(&Utc))
}

/// A JSON number as a whole number: an integer, or a float without a fraction that a double
/// holds exactly (`2.0`); `None` otherwise.
pub(crate) fn json_integer(n: &serde_json::Number) -> Option<i64> {
    n.as_i64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
            .map(|f| f as i64)
    })
}

/// What kind of JSON value `v` is, as a message names it ("a string", "null").
pub(crate) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// At most 64 characters of user input in a message.
fn truncate(s: &str) -> String {
    if s.chars().count() <= 64 {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(64).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    /// `{"a":{"a":...}}` nested `levels` deep.
    fn nested(levels: usize) -> serde_json::Value {
        let mut v = serde_json::json!({});
        for _ in 1..levels {
            v = serde_json::json!({ "a": v });
        }
        v
    }

    /// The depth rule is the readers' limit: what it accepts parses back, what it refuses does not.
    #[test]
    fn the_depth_limit_is_what_a_reader_parses() {
        let at = nested(super::MAX_JSON_DEPTH);
        assert!(!super::deeper_than(&at, super::MAX_JSON_DEPTH));
        let text = at.to_string();
        assert_eq!(crate::numbers::text_depth(text.as_bytes()), super::MAX_JSON_DEPTH);
        assert!(serde_json::from_str::<serde_json::Value>(&text).is_ok());
        let over = nested(super::MAX_JSON_DEPTH + 1);
        assert!(super::deeper_than(&over, super::MAX_JSON_DEPTH));
        let text = over.to_string();
        assert_eq!(crate::numbers::text_depth(text.as_bytes()), super::MAX_JSON_DEPTH + 1);
        assert!(serde_json::from_str::<serde_json::Value>(&text).is_err());
        // Brackets inside strings are not nesting.
        assert_eq!(crate::numbers::text_depth(br#"{"a":"[[[{\"}","b":[1]}"#), 2);
        assert!(!super::deeper_than(&serde_json::json!("[[["), 0));
    }

    use super::*;
    use serde_json::json;

    fn valid() -> Value {
        json!({
            "aggregateId": "00000000-0000-0000-0000-000000000001",
            "aggregateType": "entity",
            "eventType": "entity.created",
            "userId": "user-1",
            "data": {"title": "x"},
            "version": 1,
            "source": "api"
        })
    }

    #[test]
    fn timestamps_read_back_as_written_in_every_year() {
        use crate::fold::format_timestamp;
        for ms in [
            -8_640_000_000_000_000i64 + 1, // JavaScript's earliest Date, give or take chrono
            -210_866_803_200_000,          // -004713-11-24T00:00:00.000Z, PostgreSQL's earliest
            -62_198_755_200_000,           // -000001-01-01
            -62_167_219_200_000,           // 0000-01-01
            -1,
            0,
            253_402_300_799_999,                                     // 9999-12-31T23:59:59.999Z
            253_402_300_800_000,                                     // +010000-01-01
            951_782_400_000 + 253_402_300_800_000 - 946_684_800_000, // 29 February of the year 10000
            8_210_266_876_799_999,                                   // chrono's last millisecond, +262142-12-31
        ] {
            let Some(t) = Utc.timestamp_millis_opt(ms).single() else {
                continue;
            };
            let text = format_timestamp(&t);
            assert_eq!(parse_timestamp(&Value::String(text.clone())), Some(t), "{text}");
        }
        for bad in [
            "-000000-01-01T00:00:00.000Z",
            "+10000-01-01T00:00:00Z",
            "+010000-02-30T00:00:00Z",
            "010000-01-01T00:00:00Z",
            "+0a0000-01-01T00:00:00Z",
        ] {
            assert_eq!(parse_timestamp(&json!(bad)), None, "{bad}");
        }
        // An offset applies after the year: +010000-01-01T01:00+02:00 is 23:00 the day before.
        assert_eq!(
            parse_timestamp(&json!("+010000-01-01T01:00:00+02:00")),
            Some(Utc.with_ymd_and_hms(9999, 12, 31, 23, 0, 0).unwrap())
        );
        let mut before = valid();
        before["timestamp"] = json!(-210_866_803_200_001i64);
        let issues = report(&before, &Limits::default()).errors;
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].code, IssueCode::InvalidTimestamp);
        let mut last = valid();
        last["timestamp"] = json!("+262142-12-31T23:59:59.999999Z");
        assert_eq!(
            report(&last, &Limits::default()).errors[0].code,
            IssueCode::InvalidTimestamp
        );
        last["timestamp"] = json!("+262142-12-31T23:59:59.999998Z");
        assert!(report(&last, &Limits::default()).valid);
        let mut typed = parse_event(&valid(), &Limits::default()).unwrap();
        typed.timestamp = Some(Utc.timestamp_millis_opt(-210_866_803_200_001).unwrap());
        assert_eq!(
            typed.validate(&Limits::default()).unwrap_err().code(),
            "VALIDATION_FAILED"
        );
        typed.timestamp = Some(end_of_time());
        assert_eq!(
            typed.validate(&Limits::default()).unwrap_err().code(),
            "VALIDATION_FAILED"
        );
        let mut earliest = valid();
        earliest["timestamp"] = json!(-210_866_803_200_000i64);
        assert!(report(&earliest, &Limits::default()).valid);
    }

    #[test]
    fn accepts_the_design_sample() {
        let e = parse_event(&valid(), &Limits::default()).unwrap();
        assert_eq!(e.version, 1);
        assert_eq!(e.aggregate_type, AggregateType::Entity);
    }

    #[test]
    fn reports_every_problem() {
        let v = json!({"aggregateId": "nope", "aggregateType": "thing", "eventType": "Bad", "userId": "", "data": [], "version": 0});
        let codes: Vec<_> = parse_event(&v, &Limits::default())
            .unwrap_err()
            .into_iter()
            .map(|i| i.code)
            .collect();
        for code in [
            IssueCode::InvalidUuid,
            IssueCode::InvalidAggregateType,
            IssueCode::InvalidVersion,
            IssueCode::InvalidEventType,
            IssueCode::InvalidUserId,
            IssueCode::InvalidData,
        ] {
            assert!(codes.contains(&code), "{code} missing from {codes:?}");
        }
    }

    #[test]
    fn nul_is_found_with_its_path() {
        let mut v = valid();
        v["data"] = json!({"tags": ["a", "b\u{0}"]});
        let issues = parse_event(&v, &Limits::default()).unwrap_err();
        assert_eq!(issues[0].path, "data.tags[1]");
        assert_eq!(issues[0].code, IssueCode::NulCharacter);
    }

    #[test]
    fn event_type_shapes() {
        let l = Limits::default();
        for ok in ["entity.created", "task.completed", "entity.title_changed", "a.b.c2"] {
            assert!(check_event_type(ok, &l).is_ok(), "{ok}");
        }
        for bad in [
            "entity",
            "Entity.created",
            "entity..created",
            ".x",
            "x.",
            "entity.1x",
            "entity-created.x",
            "",
        ] {
            assert!(check_event_type(bad, &l).is_err(), "{bad}");
        }
        assert!(check_not_reserved("synap.user_erased").is_err());
        assert!(check_not_reserved("synapse.created").is_ok());
        let mut v = valid();
        v["eventType"] = json!("synap.user_erased");
        let issues = parse_event(&v, &l).unwrap_err();
        assert_eq!(issues[0].code, IssueCode::InvalidEventType);
    }

    #[test]
    fn batch_versions_must_be_consecutive_per_aggregate() {
        let a = Uuid::from_u128(1);
        let b = Uuid::from_u128(2);
        let ev = |agg, v| NewEvent::new(agg, AggregateType::Entity, "entity.updated", "u", json!({}), v);
        let l = Limits::default();
        assert!(validate_batch(&[ev(a, 3), ev(b, 1), ev(a, 4)], &l).is_ok());
        let err = validate_batch(&[ev(a, 3), ev(b, 1), ev(a, 5)], &l).unwrap_err();
        assert!(
            matches!(err, Error::Validation { ref field, reason: IssueCode::InvalidVersion, .. } if field == "events[2].version")
        );
    }
}
