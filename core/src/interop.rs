//! JSON in, JSON out: the entry points the Node and wasm bindings share, so that both return
//! byte-for-byte the same answers as Rust callers.

use serde_json::Value;

use crate::error::{Error, FoldErrorKind, Result};
use crate::fold::{fold_events, parse_fold_options};
use crate::validate::{report, Limits};

/// Validates an event given as JSON: `{ valid, errors: [{ path, code, message }] }`.
pub fn validate_event_json(input: &Value) -> Value {
    serde_json::to_value(report(input, &Limits::default())).unwrap_or(Value::Null)
}

/// Folds a JSON array of events with JSON options (`null` for the defaults) into the JSON of a
/// [`crate::fold::FoldResult`].
///
/// Fails with [`Error::Fold`] when `events` is not an array, an event is malformed, the options
/// are malformed, or the events break a version or aggregate rule.
pub fn fold_events_json(events: &Value, options: &Value) -> Result<Value> {
    let Some(events) = events.as_array() else {
        return Err(Error::Fold {
            reason: FoldErrorKind::InvalidEvent,
            index: 0,
            message: "events must be an array".into(),
        });
    };
    let options = parse_fold_options(options)?;
    let result = fold_events(events, &options)?;
    serde_json::to_value(result).map_err(|e| Error::Internal { message: e.to_string() })
}

/// Like [`fold_events_json`], for events that arrive as JSON text (a fetched stream): parsing the
/// text here skips building JavaScript objects only to serialize them again.
///
/// Fails with [`Error::Validation`] when the text is not JSON, and like [`fold_events_json`].
pub fn fold_events_json_text(events: &str, options: &Value) -> Result<Value> {
    // Fast path: fold each event as it is parsed. Any failure takes the path below, which
    // parses everything first and gives the errors their documented precedence.
    if let Ok(parsed) = parse_fold_options(options) {
        if let Some(result) = crate::fold::fold_events_text_streaming(events, &parsed) {
            return serde_json::to_value(result).map_err(|e| Error::Internal { message: e.to_string() });
        }
    }
    let events: Value =
        serde_json::from_str(events).map_err(|e| Error::invalid_input(format!("events are not JSON: {e}")))?;
    fold_events_json(&events, options)
}

/// Brings a JSON array of events (the record shape) to their types' latest shapes under a JSON
/// upcaster definition (see [`crate::upcast`]), and returns them. Each upcast event gets
/// `storedSchemaVersion` (and `storedEventType` when renamed), as the repository's records have.
///
/// Fails with [`Error::InvalidUpcasters`] for a refused definition, and [`Error::Validation`]
/// when `events` is not an array.
pub fn upcast_events_json(events: Value, upcasters: &Value) -> Result<Value> {
    let upcasters = crate::upcast::Upcasters::parse(upcasters)?;
    let Value::Array(mut events) = events else {
        return Err(Error::invalid_input("events must be an array"));
    };
    for event in &mut events {
        upcasters.upcast_json(event);
    }
    Ok(Value::Array(events))
}

/// Applies `delta` to `state` as a JSON Merge Patch (RFC 7396) and returns the new state.
pub fn apply_delta_json(state: &Value, delta: &Value) -> Value {
    crate::fold::apply_delta(state, delta)
}
