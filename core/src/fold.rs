//! The replay fold: the state of one aggregate, computed from its events.
//!
//! One file of about 830 lines and 270 more of tests: the options, the three entry points (JSON
//! values, streaming JSON text, typed records) and the one `Folder` they share are one algorithm,
//! best read together; the wasm build and the Node module run exactly this.
//!
//! [`fold_events`] (untyped JSON, as JavaScript sends it) and [`fold_records`] (typed
//! [`EventRecord`]s) run the same algorithm and give the same [`FoldResult`].
//!
//! # Contract
//!
//! The input is the events of **one** aggregate, in version order.
//!
//! - The state starts as `null` at version 0, not deleted, unless [`FoldOptions::from`] gives a
//!   [`Snapshot`] to start from. With no event applied, `lastTimestamp` is `null` (or the
//!   snapshot's `lastTimestamp`).
//! - Before an event's `data` is applied, its bookkeeping keys are removed (top level only; see
//!   [`Bookkeeping`]).
//! - An event type ending in `.created` resets the aggregate: the state becomes `{}` with `data`
//!   merged in (so `null` members are dropped), and `deleted` becomes false.
//! - An event type ending in `.deleted` applies `data` as a merge patch, then sets `deleted`.
//! - Any other event applies `data` as a JSON Merge Patch ([RFC 7396], see
//!   [`apply_merge_patch`]): `null` removes a key, objects merge recursively, arrays and scalars
//!   replace. A patch onto a non-object state starts from `{}`. Such events leave `deleted` as it
//!   was: only a `.created` event revives a deleted aggregate.
//! - Versions: the first event must be version 1 (or the snapshot's version + 1) and each next
//!   event the previous version + 1. A repeated version is `DUPLICATE_VERSION`, a lower one
//!   `UNORDERED_EVENTS`, a higher one (or a wrong first version) `VERSION_GAP`.
//! - Every event must belong to the aggregate of the first event (`MIXED_AGGREGATES`). In JSON,
//!   `aggregateId`s are compared as strings (the store writes lowercase hyphenated UUIDs);
//!   [`fold_records`] compares the UUIDs.
//! - Each event is checked in this order: well-formed (`INVALID_EVENT`: an object with string
//!   `aggregateId` and `eventType`, an integer `version` in 1..=2147483647, an object `data`, and
//!   a `timestamp` that is an RFC 3339 string or integer milliseconds since 1970), then the
//!   aggregate, then the version rules. Errors carry the index of the offending event.
//!
//! Time travel: [`FoldOptions::to_version`] stops once the state reaches that version
//! (inclusive); [`FoldOptions::to_timestamp`] includes events whose timestamp is at or before
//! it and stops at the first event later than it, even if an even later event would have an
//! earlier timestamp. Events after the stopping point are not validated: the fold never reads
//! them, except that the first event past a timestamp cut must be well-formed, since its
//! timestamp has to be read (it is not checked against the aggregate or version rules).
//!
//! [`FoldOptions::history`] also returns the state after each applied event, built as the fold
//! goes (one clone per step, never a re-fold).
//!
//! Timestamps serialize as JavaScript's `Date.prototype.toISOString()` does
//! (`2024-01-02T03:04:05.678Z`, see [`format_timestamp`]).
//!
//! [RFC 7396]: https://www.rfc-editor.org/rfc/rfc7396

use std::fmt;

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

pub use crate::error::FoldErrorKind;
use crate::error::{Error, Result};
use crate::model::EventRecord;
use crate::upcast::{json_schema_version, EventShape, Upcasters};
use crate::validate::{json_integer, json_kind, parse_timestamp};

/// Which top-level keys of an event's `data` are bookkeeping, removed before the data is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bookkeeping {
    /// Keys always removed. Default `["updatedFields"]`.
    pub ignore_keys: Vec<String>,
    /// Remove a key `previousX` when the same `data` also has the key `x` (X with its first
    /// letter lowercased, e.g. `previousDueDate` beside `dueDate`). X must start with an
    /// uppercase letter. A `previousX` without its companion is kept as ordinary state.
    /// Default true.
    pub drop_previous_companions: bool,
}

impl Default for Bookkeeping {
    fn default() -> Self {
        Bookkeeping {
            ignore_keys: vec!["updatedFields".to_owned()],
            drop_previous_companions: true,
        }
    }
}

impl Bookkeeping {
    /// Whether the top-level `key` of `data` is bookkeeping under this rule.
    pub fn is_bookkeeping(&self, key: &str, data: &Map<String, Value>) -> bool {
        self.ignore_keys.iter().any(|k| k == key)
            || (self.drop_previous_companions && previous_companion(key).is_some_and(|c| data.contains_key(&c)))
    }
}

/// `previousDueDate` → `dueDate`; `None` when `key` is not `previous` + an uppercase letter + ....
fn previous_companion(key: &str) -> Option<String> {
    let rest = key.strip_prefix("previous")?;
    let mut chars = rest.chars();
    let first = chars.next().filter(|c| c.is_uppercase())?;
    let mut companion: String = first.to_lowercase().collect();
    companion.push_str(chars.as_str());
    Some(companion)
}

/// A known state to start a fold from, instead of `null` at version 0.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The state at `version`.
    pub state: Value,
    /// The version the state is at; the first folded event must be this + 1.
    pub version: i32,
    /// Whether the aggregate was deleted at `version`. JSON key `deleted`, optional, default
    /// false.
    pub deleted: bool,
    /// The timestamp of the event at `version`: the result's `lastTimestamp` when no event
    /// follows. JSON key `lastTimestamp`, optional (an RFC 3339 string or milliseconds).
    pub last_timestamp: Option<DateTime<Utc>>,
}

/// How to fold. Deserializes from camelCase JSON (see [`parse_fold_options`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FoldOptions {
    /// Stop once the state reaches this version (inclusive).
    pub to_version: Option<i32>,
    /// Include events with a timestamp at or before this; stop at the first later event.
    pub to_timestamp: Option<DateTime<Utc>>,
    /// Also return the state after each applied event.
    pub history: bool,
    /// Which keys of `data` are bookkeeping.
    pub bookkeeping: Bookkeeping,
    /// Start from this snapshot instead of `null` at version 0.
    pub from: Option<Snapshot>,
    /// Bring each event to its type's latest shape before it is applied (see
    /// [`crate::upcast`]). Events already at it (as a repository with the same definition
    /// delivers them) are applied as they are.
    pub upcasters: Upcasters,
}

impl<'de> Deserialize<'de> for FoldOptions {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        parse_fold_options(&value).map_err(serde::de::Error::custom)
    }
}

/// Reads [`FoldOptions`] from camelCase JSON: `toVersion` (integer ≥ 0), `toTimestamp`
/// (RFC 3339 string or integer milliseconds since 1970), `history` (boolean), `bookkeeping`
/// (`{ ignoreKeys: string[], dropPreviousCompanions: boolean }`, each optional) and `from`
/// (`{ state, version, deleted? }`; `version` an integer ≥ 0 is required, `state` defaults to
/// `null`). `null` or a missing key means the default; `null` itself gives the default options.
///
/// Fails with [`Error::Fold`] with reason [`FoldErrorKind::InvalidOptions`] (index 0) when
/// `value` is not an object or null, a key is not one of these (at any level), or a key has the
/// wrong type or range.
pub fn parse_fold_options(value: &Value) -> Result<FoldOptions> {
    let obj = match value {
        Value::Null => return Ok(FoldOptions::default()),
        Value::Object(obj) => obj,
        other => {
            return Err(options_error(format!(
                "options must be an object, not {}",
                json_kind(other)
            )))
        }
    };
    refuse_unknown_keys(
        obj,
        "",
        &[
            "toVersion",
            "toTimestamp",
            "history",
            "bookkeeping",
            "from",
            "upcasters",
        ],
    )?;
    let to_version = match present(obj, "toVersion") {
        None => None,
        Some(v) => Some(non_negative_i32(v).ok_or_else(|| {
            options_error(format!(
                "toVersion must be an integer between 0 and 2147483647, not {}",
                describe(v)
            ))
        })?),
    };
    let to_timestamp = match present(obj, "toTimestamp") {
        None => None,
        Some(v) => Some(parse_timestamp(v).ok_or_else(|| {
            options_error(format!(
                "toTimestamp must be an RFC 3339 date-time or integer milliseconds since 1970, not {}",
                describe(v)
            ))
        })?),
    };
    let history = match present(obj, "history") {
        None => false,
        Some(v) => v
            .as_bool()
            .ok_or_else(|| options_error(format!("history must be a boolean, not {}", describe(v))))?,
    };
    let bookkeeping = match present(obj, "bookkeeping") {
        None => Bookkeeping::default(),
        Some(v) => parse_bookkeeping(v)?,
    };
    let from = match present(obj, "from") {
        None => None,
        Some(v) => Some(parse_snapshot(v)?),
    };
    let upcasters = match present(obj, "upcasters") {
        None => Upcasters::none(),
        Some(v) => Upcasters::parse(v)?,
    };
    Ok(FoldOptions {
        to_version,
        to_timestamp,
        history,
        bookkeeping,
        from,
        upcasters,
    })
}

fn parse_bookkeeping(value: &Value) -> Result<Bookkeeping> {
    let Value::Object(obj) = value else {
        return Err(options_error(format!(
            "bookkeeping must be an object, not {}",
            describe(value)
        )));
    };
    refuse_unknown_keys(obj, "bookkeeping.", &["ignoreKeys", "dropPreviousCompanions"])?;
    let mut rule = Bookkeeping::default();
    if let Some(v) = present(obj, "ignoreKeys") {
        let bad = || {
            options_error(format!(
                "bookkeeping.ignoreKeys must be an array of strings, not {}",
                describe(v)
            ))
        };
        let items = v.as_array().ok_or_else(bad)?;
        rule.ignore_keys = items
            .iter()
            .map(|k| k.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(bad)?;
    }
    if let Some(v) = present(obj, "dropPreviousCompanions") {
        rule.drop_previous_companions = v.as_bool().ok_or_else(|| {
            options_error(format!(
                "bookkeeping.dropPreviousCompanions must be a boolean, not {}",
                describe(v)
            ))
        })?;
    }
    Ok(rule)
}

fn parse_snapshot(value: &Value) -> Result<Snapshot> {
    let Value::Object(obj) = value else {
        return Err(options_error(format!(
            "from must be an object, not {}",
            describe(value)
        )));
    };
    refuse_unknown_keys(obj, "from.", &["state", "version", "deleted", "lastTimestamp"])?;
    let version = match present(obj, "version") {
        None => return Err(options_error("from.version is required".to_owned())),
        Some(v) => non_negative_i32(v).ok_or_else(|| {
            options_error(format!(
                "from.version must be an integer between 0 and 2147483647, not {}",
                describe(v)
            ))
        })?,
    };
    let deleted = match present(obj, "deleted") {
        None => false,
        Some(v) => v
            .as_bool()
            .ok_or_else(|| options_error(format!("from.deleted must be a boolean, not {}", describe(v))))?,
    };
    let last_timestamp = match present(obj, "lastTimestamp") {
        None => None,
        Some(v) => Some(parse_timestamp(v).ok_or_else(|| {
            options_error(format!(
                "from.lastTimestamp must be an RFC 3339 date-time or integer milliseconds since 1970, not {}",
                describe(v)
            ))
        })?),
    };
    Ok(Snapshot {
        state: obj.get("state").cloned().unwrap_or(Value::Null),
        version,
        deleted,
        last_timestamp,
    })
}

/// A misspelt option must never fold to a plausible wrong state: keys that are not options are
/// refused, naming the key (and the new name of the two renamed ones).
fn refuse_unknown_keys(obj: &Map<String, Value>, prefix: &str, known: &[&str]) -> Result<()> {
    match obj.keys().find(|k| !known.contains(&k.as_str())) {
        None => Ok(()),
        Some(key) => {
            let hint = match key.as_str() {
                "upToVersion" => " (it is toVersion now)".to_owned(),
                "upToTimestamp" => " (it is toTimestamp now)".to_owned(),
                _ => format!("; the options are {}", known.join(", ")),
            };
            Err(options_error(format!("unknown option {prefix}{key}{hint}")))
        }
    }
}

/// The value of `key`, treating `null` as absent.
fn present<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn non_negative_i32(v: &Value) -> Option<i32> {
    let Value::Number(n) = v else { return None };
    json_integer(n).and_then(|i| i32::try_from(i).ok()).filter(|i| *i >= 0)
}

fn options_error(message: String) -> Error {
    Error::Fold {
        reason: FoldErrorKind::InvalidOptions,
        index: 0,
        message: format!("bad fold options: {message}"),
    }
}

/// The outcome of a fold. Serializes with camelCase keys; `history` is omitted when it was not
/// asked for.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FoldResult {
    /// The aggregate's state: `null` when nothing was folded, otherwise (normally) an object.
    pub state: Value,
    /// The version of the last applied event (the snapshot's version, or 0, when none was).
    pub version: i32,
    /// Whether the last `.created`/`.deleted` event applied was a `.deleted` one.
    pub deleted: bool,
    /// The timestamp of the last applied event; `None` when none was applied.
    #[serde(serialize_with = "serialize_optional_timestamp")]
    pub last_timestamp: Option<DateTime<Utc>>,
    /// The state after each applied event, when [`FoldOptions::history`] was set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<Vec<HistoryStep>>,
}

/// The aggregate right after one event was applied.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryStep {
    /// The event's version.
    pub version: i32,
    /// The event's timestamp.
    #[serde(serialize_with = "serialize_timestamp")]
    pub timestamp: DateTime<Utc>,
    /// The event's type.
    pub event_type: String,
    /// The state after the event.
    pub state: Value,
    /// Whether the aggregate was deleted after the event.
    pub deleted: bool,
}

/// Formats a timestamp as JavaScript's `Date.prototype.toISOString()` does: UTC with
/// milliseconds (truncated), e.g. `2024-01-02T03:04:05.678Z`; years outside 0..=9999 get a sign
/// and six digits (`+010000-01-01T00:00:00.000Z`).
pub fn format_timestamp(t: &DateTime<Utc>) -> String {
    let year = t.year();
    let year = if (0..=9999).contains(&year) {
        format!("{year:04}")
    } else if year < 0 {
        format!("-{:06}", year.unsigned_abs())
    } else {
        format!("+{year:06}")
    };
    // A leap second holds nanoseconds >= 1e9; JavaScript has no leap seconds.
    let millis = t.timestamp_subsec_millis().min(999);
    format!(
        "{year}-{:02}-{:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        t.month(),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn serialize_timestamp<S: Serializer>(t: &DateTime<Utc>, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&format_timestamp(t))
}

fn serialize_optional_timestamp<S: Serializer>(
    t: &Option<DateTime<Utc>>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match t {
        Some(t) => serialize_timestamp(t, s),
        None => s.serialize_none(),
    }
}

/// Applies `patch` to `target` as a JSON Merge Patch, exactly as RFC 7396 says: when `patch` is
/// an object, `target` becomes an object (`{}` if it was not one), a `null` member removes that
/// key and any other member is merged in recursively; any other `patch` replaces `target`.
pub fn apply_merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if let Value::Object(target) = object_target(target) {
        for (key, value) in patch {
            patch_member(target, key, value);
        }
    }
}

/// `state` with `delta` applied as a JSON Merge Patch (see [`apply_merge_patch`]). No
/// bookkeeping keys are removed.
pub fn apply_delta(state: &Value, delta: &Value) -> Value {
    let mut next = state.clone();
    apply_merge_patch(&mut next, delta);
    next
}

/// Makes `target` an object (`{}` unless it already is one) and returns it.
fn object_target(target: &mut Value) -> &mut Value {
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    target
}

fn patch_member(target: &mut Map<String, Value>, key: &str, value: &Value) {
    if value.is_null() {
        // As JavaScript's `delete`: the other keys keep their order.
        target.shift_remove(key);
    } else if let Some(existing) = target.get_mut(key) {
        apply_merge_patch(existing, value);
    } else {
        let mut fresh = Value::Null;
        apply_merge_patch(&mut fresh, value);
        target.insert(key.to_owned(), fresh);
    }
}

/// Applies an event's data, without its bookkeeping keys, as a merge patch.
fn apply_event_data(state: &mut Value, data: &Map<String, Value>, bookkeeping: &Bookkeeping) {
    if let Value::Object(target) = object_target(state) {
        for (key, value) in data {
            if !bookkeeping.is_bookkeeping(key, data) {
                patch_member(target, key, value);
            }
        }
    }
}

/// The fields of an event that the fold reads.
struct FoldEvent<'a, Id> {
    aggregate_id: Id,
    event_type: &'a str,
    /// As given; checked against 1..=i32::MAX by the fold.
    version: i64,
    data: &'a Map<String, Value>,
    timestamp: DateTime<Utc>,
    /// Read only when an upcaster step applies.
    metadata: Option<&'a Value>,
    schema_version: i32,
}

/// Folds events given as JSON in the [`EventRecord`] camelCase shape (`aggregateId`,
/// `eventType`, `version`, `data`, `timestamp`; other keys are ignored). See the
/// [module documentation](self) for the rules.
///
/// Fails with [`Error::Fold`] at the first offending event: [`FoldErrorKind::InvalidEvent`] when
/// an event is not an object or a field is missing or has the wrong type,
/// [`FoldErrorKind::MixedAggregates`] when its `aggregateId` differs from the first event's, and
/// [`FoldErrorKind::VersionGap`], [`FoldErrorKind::DuplicateVersion`] or
/// [`FoldErrorKind::UnorderedEvents`] when the versions do not run on by one.
pub fn fold_events(events: &[Value], options: &FoldOptions) -> Result<FoldResult> {
    fold(events, options, read_json_event)
}

/// Folds stored events. Same rules and failures as [`fold_events`]; `aggregate_id`s are
/// compared as UUIDs, and an event whose `data` is not a JSON object or whose `version` is below
/// 1 fails with [`FoldErrorKind::InvalidEvent`].
pub fn fold_records(events: &[EventRecord], options: &FoldOptions) -> Result<FoldResult> {
    fold(events, options, read_record)
}

fn read_json_event(index: usize, value: &Value) -> Result<FoldEvent<'_, &str>> {
    let Value::Object(obj) = value else {
        return Err(invalid_event(
            index,
            format!("an event must be an object, not {}", json_kind(value)),
        ));
    };
    let field = |key: &str, expected: &str| {
        let message = match obj.get(key) {
            None => format!("{key} is missing"),
            Some(other) => format!("{key} must be {expected}, not {}", describe(other)),
        };
        invalid_event(index, message)
    };
    let aggregate_id = match obj.get("aggregateId") {
        Some(Value::String(s)) => s.as_str(),
        _ => return Err(field("aggregateId", "a string")),
    };
    let event_type = match obj.get("eventType") {
        Some(Value::String(s)) => s.as_str(),
        _ => return Err(field("eventType", "a string")),
    };
    let version = match obj.get("version") {
        Some(Value::Number(n)) => json_integer(n).ok_or_else(|| field("version", "an integer"))?,
        _ => return Err(field("version", "an integer")),
    };
    if obj.get("unreadable").is_some_and(|u| !u.is_null()) {
        let id = obj.get("id").and_then(Value::as_str).unwrap_or("?");
        let column = obj
            .get("unreadable")
            .and_then(|u| u.get("column"))
            .and_then(Value::as_str)
            .unwrap_or("?");
        return Err(unreadable_event(index, id, column));
    }
    let data = match obj.get("data") {
        Some(Value::Object(d)) => d,
        _ => return Err(field("data", "an object")),
    };
    let timestamp = obj
        .get("timestamp")
        .and_then(parse_timestamp)
        .ok_or_else(|| field("timestamp", "an RFC 3339 date-time or integer milliseconds since 1970"))?;
    let schema_version = json_schema_version(obj.get("schemaVersion"))
        .ok_or_else(|| field("schemaVersion", "an integer between 1 and 2147483647"))?;
    Ok(FoldEvent {
        aggregate_id,
        event_type,
        version,
        data,
        timestamp,
        metadata: obj.get("metadata"),
        schema_version,
    })
}

/// Folds events given as JSON text (an array in the shape of [`fold_events`]), parsing one event
/// at a time and folding it before the next is parsed, so the whole array never exists as a
/// tree of values. Returns `None` when the text is not a JSON array or any event fails to fold:
/// the caller then takes the path that parses everything first, whose errors (and their
/// precedence: a syntax error anywhere before a fold error) are the contract.
pub fn fold_events_text_streaming(text: &str, options: &FoldOptions) -> Option<FoldResult> {
    let mut fold = StreamingFold {
        folder: Folder::new(options),
        index: 0,
        failed: false,
    };
    let mut de = serde_json::Deserializer::from_str(text);
    let is_array = de.deserialize_seq(&mut fold).is_ok() && de.end().is_ok();
    (is_array && !fold.failed).then(|| fold.folder.finish())
}

struct StreamingFold<'o> {
    folder: Folder<'o, String>,
    index: usize,
    failed: bool,
}

impl<'de> serde::de::Visitor<'de> for &mut StreamingFold<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of events")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        while !self.failed && !self.folder.is_done() {
            let Some(mut value) = seq.next_element::<Value>()? else {
                return Ok(());
            };
            // The event is this fold's own: upcast it in place (no copy of its data).
            if let (false, Value::Object(obj)) = (self.folder.options.upcasters.is_empty(), &mut value) {
                self.folder.options.upcasters.upcast_fields(obj);
            }
            let index = self.index;
            self.index += 1;
            match self.folder.apply(index, || {
                read_json_event(index, &value).map(|e| FoldEvent {
                    aggregate_id: e.aggregate_id.to_owned(),
                    event_type: e.event_type,
                    version: e.version,
                    data: e.data,
                    timestamp: e.timestamp,
                    metadata: e.metadata,
                    schema_version: e.schema_version,
                })
            }) {
                Ok(true) => {}
                Ok(false) => break,
                Err(_) => self.failed = true,
            }
        }
        // The rest is parsed (a syntax error there must still fail) but not kept.
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(())
    }
}

/// The one fold algorithm; `read` turns the event at an index into the fields the fold needs.
fn fold<'a, T, Id>(
    events: &'a [T],
    options: &FoldOptions,
    read: impl Fn(usize, &'a T) -> Result<FoldEvent<'a, Id>>,
) -> Result<FoldResult>
where
    Id: Clone + PartialEq + fmt::Display,
{
    let mut folder = Folder::new(options);
    for (index, raw) in events.iter().enumerate() {
        if folder.is_done() || !folder.apply(index, || read(index, raw))? {
            break;
        }
    }
    Ok(folder.finish())
}

/// A fold that takes its events one at a time, as they arrive (a stored stream read in pages),
/// with exactly the rules and errors of [`fold_records`]. Feed it with [`RecordFolder::push`]
/// until that returns false or the events run out, then take [`RecordFolder::finish`].
pub struct RecordFolder<'o> {
    inner: Folder<'o, uuid::Uuid>,
    index: usize,
}

impl<'o> RecordFolder<'o> {
    /// A fold from the options' snapshot (or `null` at version 0).
    pub fn new(options: &'o FoldOptions) -> RecordFolder<'o> {
        RecordFolder {
            inner: Folder::new(options),
            index: 0,
        }
    }

    /// Applies the next event. Returns false when the fold has stopped (at `to_version`, or at
    /// this event because it is later than `to_timestamp`); later events are then not read.
    ///
    /// Fails like [`fold_records`], with the index counted from the first pushed event.
    pub fn push(&mut self, record: &EventRecord) -> Result<bool> {
        if self.inner.is_done() {
            return Ok(false);
        }
        let index = self.index;
        self.index += 1;
        self.inner.apply(index, || read_record(index, record))
    }

    /// The version the state is at now.
    pub fn version(&self) -> i32 {
        self.inner.version
    }

    /// The result so far.
    pub fn finish(self) -> FoldResult {
        self.inner.finish()
    }
}

/// An event the store could not read back (`EventRecord::unreadable`): no fold can take it.
fn unreadable_event(index: usize, id: &str, column: &str) -> Error {
    invalid_event(
        index,
        format!("event {id} could not be read back from the store (its {column}), so it cannot be folded"),
    )
}

fn read_record(index: usize, record: &EventRecord) -> Result<FoldEvent<'_, uuid::Uuid>> {
    if let Some(u) = &record.unreadable {
        return Err(unreadable_event(index, &record.id.to_string(), &u.column));
    }
    Ok(FoldEvent {
        aggregate_id: record.aggregate_id,
        event_type: &record.event_type,
        version: i64::from(record.version),
        data: record.data.as_object().ok_or_else(|| {
            invalid_event(
                index,
                format!("data must be an object, not {}", json_kind(&record.data)),
            )
        })?,
        timestamp: record.timestamp,
        metadata: record.metadata.as_ref(),
        schema_version: record.schema_version,
    })
}

/// The fold's state between events.
struct Folder<'o, Id> {
    options: &'o FoldOptions,
    state: Value,
    version: i32,
    deleted: bool,
    last_timestamp: Option<DateTime<Utc>>,
    history: Option<Vec<HistoryStep>>,
    first_aggregate: Option<Id>,
    stopped: bool,
}

impl<'o, Id> Folder<'o, Id>
where
    Id: Clone + PartialEq + fmt::Display,
{
    fn new(options: &'o FoldOptions) -> Folder<'o, Id> {
        let (state, version, deleted, last_timestamp) = match &options.from {
            Some(s) => (s.state.clone(), s.version, s.deleted, s.last_timestamp),
            None => (Value::Null, 0, false, None),
        };
        Folder {
            options,
            state,
            version,
            deleted,
            last_timestamp,
            history: options.history.then(Vec::new),
            first_aggregate: None,
            stopped: false,
        }
    }

    /// Whether no further event will be applied (the state has reached `to_version`, or an
    /// event past `to_timestamp` was seen).
    fn is_done(&self) -> bool {
        self.stopped || self.options.to_version.is_some_and(|limit| self.version >= limit)
    }

    /// Reads the event at `index` and applies it; false when it is past `to_timestamp`.
    fn apply<'a>(&mut self, index: usize, read: impl FnOnce() -> Result<FoldEvent<'a, Id>>) -> Result<bool> {
        let options = self.options;
        let event = read()?;
        let event_version = i32::try_from(event.version).ok().filter(|v| *v >= 1).ok_or_else(|| {
            invalid_event(
                index,
                format!("version must be between 1 and 2147483647, not {}", event.version),
            )
        })?;
        if options.to_timestamp.is_some_and(|cut| event.timestamp > cut) {
            self.stopped = true;
            return Ok(false);
        }
        let first = self
            .first_aggregate
            .get_or_insert_with(|| event.aggregate_id.clone())
            .clone();
        if event.aggregate_id != first {
            return Err(Error::Fold {
                reason: FoldErrorKind::MixedAggregates,
                index,
                message: format!(
                    "aggregate {} is not the aggregate of the first event ({first}); fold one aggregate at a time",
                    event.aggregate_id
                ),
            });
        }
        check_version(index, self.version, event_version, options.from.is_some())?;

        let upcast;
        let (event_type, data) = if options.upcasters.applies_to(event.event_type, event.schema_version) {
            let mut shape = EventShape {
                event_type: event.event_type.to_owned(),
                schema_version: event.schema_version,
                data: Value::Object(event.data.clone()),
                metadata: event.metadata.filter(|m| !m.is_null()).cloned(),
            };
            options.upcasters.upcast(&mut shape);
            upcast = shape;
            let data = match &upcast.data {
                Value::Object(d) => d,
                _ => event.data,
            };
            (upcast.event_type.as_str(), data)
        } else {
            (event.event_type, event.data)
        };
        if event_type.ends_with(".created") {
            self.state = Value::Object(Map::new());
            self.deleted = false;
        }
        apply_event_data(&mut self.state, data, &options.bookkeeping);
        if event_type.ends_with(".deleted") {
            self.deleted = true;
        }
        self.version = event_version;
        self.last_timestamp = Some(event.timestamp);
        if let Some(steps) = &mut self.history {
            steps.push(HistoryStep {
                version: self.version,
                timestamp: event.timestamp,
                event_type: event_type.to_owned(),
                state: self.state.clone(),
                deleted: self.deleted,
            });
        }
        Ok(true)
    }

    fn finish(self) -> FoldResult {
        FoldResult {
            state: self.state,
            version: self.version,
            deleted: self.deleted,
            last_timestamp: self.last_timestamp,
            history: self.history,
        }
    }
}

/// Checks that the event at `index`, of version `got`, follows version `previous`.
fn check_version(index: usize, previous: i32, got: i32, from_snapshot: bool) -> Result<()> {
    let expected = i64::from(previous) + 1;
    let got_wide = i64::from(got);
    if got_wide == expected {
        return Ok(());
    }
    let (reason, message) = if index == 0 {
        let start = if from_snapshot {
            format!(" (the snapshot is at version {previous})")
        } else {
            String::new()
        };
        (
            FoldErrorKind::VersionGap,
            format!("the first event must be version {expected}{start}, not {got}"),
        )
    } else if got == previous {
        (FoldErrorKind::DuplicateVersion, format!("version {got} appears twice"))
    } else if got < previous {
        (
            FoldErrorKind::UnorderedEvents,
            format!("version {got} comes after version {previous}; events must be in version order"),
        )
    } else {
        (
            FoldErrorKind::VersionGap,
            format!(
                "version {got} follows version {previous}: versions {expected} to {} are missing",
                got_wide - 1
            ),
        )
    };
    Err(Error::Fold { reason, index, message })
}

fn invalid_event(index: usize, message: String) -> Error {
    Error::Fold {
        reason: FoldErrorKind::InvalidEvent,
        index,
        message,
    }
}

/// An integer JSON number; a float with no fraction counts (JavaScript has only floats).
/// The kind of a value, with the value itself when it is a short scalar.
fn describe(v: &Value) -> String {
    match v {
        Value::Number(n) => format!("{n}"),
        Value::Bool(b) => format!("{b}"),
        Value::String(s) if s.chars().count() <= 40 => format!("the string {s:?}"),
        other => json_kind(other).to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const AGG: &str = "00000000-0000-0000-0000-000000000001";

    fn ev(version: i64, event_type: &str, data: Value) -> Value {
        json!({
            "aggregateId": AGG,
            "eventType": event_type,
            "version": version,
            "data": data,
            "timestamp": format!("2024-01-01T00:00:{:02}Z", version.clamp(0, 59)),
        })
    }

    fn code(err: &Error) -> (&'static str, usize) {
        match err {
            Error::Fold { index, .. } => (err.code(), *index),
            other => panic!("not a fold error: {other:?}"),
        }
    }

    #[test]
    fn no_events_is_null_at_version_zero() {
        let r = fold_events(&[], &FoldOptions::default()).unwrap();
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"state": null, "version": 0, "deleted": false, "lastTimestamp": null})
        );
    }

    #[test]
    fn created_then_patches() {
        let events = [
            ev(1, "task.created", json!({"title": "a", "tags": ["x"], "note": null})),
            ev(
                2,
                "task.updated",
                json!({"title": "b", "tags": ["y"], "meta": {"k": 1}}),
            ),
            ev(3, "task.updated", json!({"meta": {"j": 2, "k": null}})),
        ];
        let r = fold_events(&events, &FoldOptions::default()).unwrap();
        assert_eq!(r.state, json!({"title": "b", "tags": ["y"], "meta": {"j": 2}}));
        assert_eq!(r.version, 3);
        assert!(!r.deleted);
        assert_eq!(
            serde_json::to_value(&r).unwrap()["lastTimestamp"],
            json!("2024-01-01T00:00:03.000Z")
        );
    }

    #[test]
    fn deleted_then_created_resets() {
        let events = [
            ev(1, "task.created", json!({"title": "a", "done": false})),
            ev(2, "task.deleted", json!({"reason": "spam"})),
            ev(3, "task.renamed", json!({"title": "c"})),
        ];
        let r = fold_events(&events, &FoldOptions::default()).unwrap();
        assert_eq!(r.state, json!({"title": "c", "done": false, "reason": "spam"}));
        assert!(r.deleted);
        let mut more = events.to_vec();
        more.push(ev(4, "task.created", json!({"title": "new"})));
        let r = fold_events(&more, &FoldOptions::default()).unwrap();
        assert_eq!(r.state, json!({"title": "new"}));
        assert!(!r.deleted);
    }

    #[test]
    fn bookkeeping_rule() {
        let data = json!({"title": "b", "previousTitle": "a", "previousOwner": "z", "updatedFields": ["title"]});
        let events = [ev(1, "task.created", json!({})), ev(2, "task.updated", data)];
        let r = fold_events(&events, &FoldOptions::default()).unwrap();
        assert_eq!(r.state, json!({"title": "b", "previousOwner": "z"}));

        let options = FoldOptions {
            bookkeeping: Bookkeeping {
                ignore_keys: vec![],
                drop_previous_companions: false,
            },
            ..FoldOptions::default()
        };
        let r = fold_events(&events, &options).unwrap();
        assert_eq!(
            r.state,
            json!({"title": "b", "previousTitle": "a", "previousOwner": "z", "updatedFields": ["title"]})
        );
    }

    #[test]
    fn previous_companion_names() {
        assert_eq!(previous_companion("previousDueDate").as_deref(), Some("dueDate"));
        assert_eq!(previous_companion("previousÉtat").as_deref(), Some("état"));
        assert_eq!(previous_companion("previous"), None);
        assert_eq!(previous_companion("previously"), None);
        assert_eq!(previous_companion("title"), None);
    }

    #[test]
    fn version_errors() {
        let opts = FoldOptions::default();
        let gap = [ev(1, "a.created", json!({})), ev(3, "a.updated", json!({}))];
        assert_eq!(code(&fold_events(&gap, &opts).unwrap_err()), ("VERSION_GAP", 1));
        let first = [ev(2, "a.created", json!({}))];
        assert_eq!(code(&fold_events(&first, &opts).unwrap_err()), ("VERSION_GAP", 0));
        let dup = [ev(1, "a.created", json!({})), ev(1, "a.updated", json!({}))];
        assert_eq!(code(&fold_events(&dup, &opts).unwrap_err()), ("DUPLICATE_VERSION", 1));
        let unordered = [
            ev(1, "a.created", json!({})),
            ev(2, "a.updated", json!({})),
            ev(1, "a.updated", json!({})),
        ];
        assert_eq!(
            code(&fold_events(&unordered, &opts).unwrap_err()),
            ("UNORDERED_EVENTS", 2)
        );
    }

    #[test]
    fn mixed_aggregates_checked_before_versions() {
        let mut other = ev(5, "a.updated", json!({}));
        other["aggregateId"] = json!("00000000-0000-0000-0000-000000000002");
        let events = [ev(1, "a.created", json!({})), other];
        assert_eq!(
            code(&fold_events(&events, &FoldOptions::default()).unwrap_err()),
            ("MIXED_AGGREGATES", 1)
        );
    }

    #[test]
    fn invalid_events() {
        let opts = FoldOptions::default();
        for bad in [
            json!(null),
            json!([]),
            json!({"eventType": "a.b", "version": 1, "data": {}, "timestamp": 0}),
            json!({"aggregateId": AGG, "eventType": "a.b", "version": "1", "data": {}, "timestamp": 0}),
            json!({"aggregateId": AGG, "eventType": "a.b", "version": 1.5, "data": {}, "timestamp": 0}),
            json!({"aggregateId": AGG, "eventType": "a.b", "version": 0, "data": {}, "timestamp": 0}),
            json!({"aggregateId": AGG, "eventType": "a.b", "version": 1, "data": [], "timestamp": 0}),
            json!({"aggregateId": AGG, "eventType": "a.b", "version": 1, "data": {}, "timestamp": "yesterday"}),
            json!({"aggregateId": AGG, "eventType": "a.b", "version": 1, "data": {}, "timestamp": 1.5}),
        ] {
            let err = fold_events(std::slice::from_ref(&bad), &opts).unwrap_err();
            assert_eq!(code(&err), ("INVALID_EVENT", 0), "{bad}");
        }
    }

    #[test]
    fn time_travel_and_history() {
        let events = [
            ev(1, "a.created", json!({"n": 1})),
            ev(2, "a.updated", json!({"n": 2})),
            ev(3, "a.updated", json!({"n": 3})),
            json!("not even an event"),
        ];
        let opts = FoldOptions {
            to_version: Some(2),
            history: true,
            ..FoldOptions::default()
        };
        let r = fold_events(&events, &opts).unwrap();
        assert_eq!((r.state.clone(), r.version), (json!({"n": 2}), 2));
        let steps = r.history.unwrap();
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[0].state, json!({"n": 1}));

        let opts = parse_fold_options(&json!({"toTimestamp": "2024-01-01T00:00:02Z"})).unwrap();
        let r = fold_events(&events[..3], &opts).unwrap();
        assert_eq!(r.version, 2);
        assert!(r.history.is_none());
    }

    #[test]
    fn from_snapshot() {
        let opts = parse_fold_options(&json!({"from": {"state": {"n": 5}, "version": 5}})).unwrap();
        let r = fold_events(&[ev(6, "a.updated", json!({"m": 1}))], &opts).unwrap();
        assert_eq!((r.state, r.version), (json!({"n": 5, "m": 1}), 6));
        let err = fold_events(&[ev(1, "a.created", json!({}))], &opts).unwrap_err();
        assert_eq!(code(&err), ("VERSION_GAP", 0));
    }

    #[test]
    fn records_and_json_agree() {
        let events = [
            ev(1, "a.created", json!({"n": 1, "previousN": 0})),
            ev(2, "a.deleted", json!({})),
        ];
        let records: Vec<EventRecord> = events
            .iter()
            .map(|e| {
                let mut e = e.clone();
                e["id"] = json!(AGG);
                e["aggregateType"] = json!("entity");
                e["userId"] = json!("u");
                e["source"] = json!("api");
                serde_json::from_value(e).unwrap()
            })
            .collect();
        let opts = FoldOptions {
            history: true,
            ..FoldOptions::default()
        };
        assert_eq!(
            fold_records(&records, &opts).unwrap(),
            fold_events(&events, &opts).unwrap()
        );
    }

    #[test]
    fn options_parse_and_reject() {
        let o: FoldOptions = serde_json::from_value(json!({
            "toVersion": 3, "toTimestamp": 1000, "history": true,
            "bookkeeping": {"ignoreKeys": ["x"]}, "from": {"version": 2}
        }))
        .unwrap();
        assert_eq!(o.to_version, Some(3));
        assert_eq!(o.to_timestamp.map(|t| t.timestamp_millis()), Some(1000));
        assert!(o.history && o.bookkeeping.drop_previous_companions);
        assert_eq!(o.bookkeeping.ignore_keys, vec!["x".to_owned()]);
        assert_eq!(o.from.map(|f| (f.state, f.version)), Some((Value::Null, 2)));
        assert_eq!(parse_fold_options(&Value::Null).unwrap(), FoldOptions::default());
        for bad in [
            json!([]),
            json!({"unknown": 1}),
            json!({"upToVersion": 2}),
            json!({"bookkeeping": {"ignorekeys": []}}),
            json!({"from": {"version": 1, "State": {}}}),
            json!({"toVersion": "3"}),
            json!({"toVersion": -1}),
            json!({"toTimestamp": "soon"}),
            json!({"history": 1}),
            json!({"bookkeeping": {"ignoreKeys": [1]}}),
            json!({"bookkeeping": {"dropPreviousCompanions": "no"}}),
            json!({"from": {"state": {}}}),
        ] {
            let err = parse_fold_options(&bad).unwrap_err();
            assert_eq!(code(&err), ("INVALID_OPTIONS", 0), "{bad}");
        }
    }

    #[test]
    fn merge_patch_rfc_examples() {
        assert_eq!(
            apply_delta(&json!({}), &json!({"a": {"bb": {"ccc": null}}})),
            json!({"a": {"bb": {}}})
        );
        assert_eq!(
            apply_delta(&json!([1, 2]), &json!({"a": "b", "c": null})),
            json!({"a": "b"})
        );
        assert_eq!(apply_delta(&json!({"a": "foo"}), &json!(null)), json!(null));
    }

    #[test]
    fn iso_format_matches_javascript() {
        let t = parse_timestamp(&json!("2024-02-03T04:05:06.789123+02:00")).unwrap();
        assert_eq!(format_timestamp(&t), "2024-02-03T02:05:06.789Z");
        let t = parse_timestamp(&json!(253402300800000_i64)).unwrap();
        assert_eq!(format_timestamp(&t), "+010000-01-01T00:00:00.000Z");
        let t = parse_timestamp(&json!(-62198755200000_i64)).unwrap();
        assert_eq!(format_timestamp(&t), "-000001-01-01T00:00:00.000Z");
    }
}
