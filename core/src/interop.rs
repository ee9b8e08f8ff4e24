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

/// Applies `delta` to `state` as a JSON Merge Patch (RFC 7396) and returns the new state.
pub fn apply_delta_json(state: &Value, delta: &Value) -> Value {
    crate::fold::apply_delta(state, delta)
}
