//! The replay fold, validation and merge patch: the same core functions as the wasm build.

use napi::bindgen_prelude::*;
use napi_derive::napi;
use serde_json::Value;
use synap_events as core;

use crate::{js_to_json, js_to_json_text, options_json, to_js_error, Checked, Json};

/// Checks an event the way `append` does, returning the problems as data.
#[napi(catch_unwind, ts_args_type = "event: unknown", ts_return_type = "ValidationReport")]
pub fn validate_event(env: &Env, event: Unknown) -> Result<Json> {
    let value = js_to_json(env, event, Checked::Keys(&[])).map_err(|e| to_js_error(env, e))?;
    let report = core::validate::report(&value, &core::Limits::default());
    serde_json::to_value(report)
        .map(Json)
        .map_err(|e| Error::from_reason(e.to_string()))
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
pub fn fold_events(env: &Env, events: Unknown, options: Option<Unknown>) -> Result<Json> {
    let events = js_to_json_text(env, events).map_err(|e| to_js_error(env, e))?;
    let options = options_json(env, options).map_err(|e| to_js_error(env, e))?;
    // As JSON text, folded event by event as it is parsed (no tree of every event).
    match events {
        Some(text) => core::interop::fold_events_json_text(&text, &options),
        None => core::interop::fold_events_json(&Value::Null, &options),
    }
    .map(Json)
    .map_err(|e| to_js_error(env, e))
}

/// `foldEvents` for events given as JSON text: skips building and re-serializing JS objects.
///
/// Throws like `foldEvents`, and `VALIDATION_FAILED` when the text is not JSON.
#[napi(
    catch_unwind,
    ts_args_type = "eventsJson: string, options?: FoldOptions",
    ts_return_type = "FoldResult"
)]
pub fn fold_events_json(env: &Env, events_json: Unknown, options: Option<Unknown>) -> Result<Json> {
    let events_json = match events_json.get_type()? {
        ValueType::String => unsafe { events_json.cast::<String>() }?,
        _ => {
            return Err(to_js_error(
                env,
                core::Error::invalid_input("eventsJson must be a string"),
            ))
        }
    };
    let options = options_json(env, options).map_err(|e| to_js_error(env, e))?;
    core::interop::fold_events_json_text(&events_json, &options)
        .map(Json)
        .map_err(|e| to_js_error(env, e))
}

/// Applies `delta` to `state` as a JSON Merge Patch (RFC 7396).
#[napi(
    catch_unwind,
    ts_args_type = "state: unknown, delta: unknown",
    ts_return_type = "unknown"
)]
pub fn apply_delta(env: &Env, state: Unknown, delta: Unknown) -> Result<Json> {
    let state = js_to_json(env, state, Checked::Keys(&[])).map_err(|e| to_js_error(env, e))?;
    let delta = js_to_json(env, delta, Checked::Keys(&[])).map_err(|e| to_js_error(env, e))?;
    Ok(Json(core::interop::apply_delta_json(&state, &delta)))
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
    /// Bring each event to its type's latest shape before it is applied (docs/upcasting.md).
    pub upcasters: Option<Vec<crate::records::UpcasterStep>>,
}

/// Options of `replay`: the time travel and bookkeeping options of `foldEvents`.
#[napi(object, object_to_js = false)]
pub struct ReplayOptions {
    /// Stop after this version (inclusive).
    pub to_version: Option<u32>,
    /// Include only events at or before this time (a Date, an ISO string or ms).
    #[napi(ts_type = "Date | string | number")]
    pub to_timestamp: Option<Value>,
    /// Which data keys are bookkeeping rather than state.
    pub bookkeeping: Option<BookkeepingRule>,
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
    /// When its last event happened: the result's `lastTimestamp` when no event follows.
    #[napi(ts_type = "Date | string | number")]
    pub last_timestamp: Option<Value>,
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
