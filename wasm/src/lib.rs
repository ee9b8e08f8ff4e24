//! Browser (and Node) build of the `synap-events` rules: event validation and the replay fold.
//!
//! A thin adapter: JavaScript values cross as JSON (exactly as `JSON.stringify` sees them, so a
//! `Date` becomes its ISO string), the core does the work, and errors become `Error` objects with
//! a `code`.

use serde_json::Value;
use synap_events::interop;
use wasm_bindgen::prelude::*;

#[wasm_bindgen(typescript_custom_section)]
const TS_TYPES: &str = r#"
/** A JSON value. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** An event as stored (the EventRecord shape); `timestamp` is a Date, an ISO string or ms. */
export interface FoldEvent {
  aggregateId: string;
  eventType: string;
  version: number;
  data: { [key: string]: Json };
  timestamp: Date | string | number;
  [key: string]: unknown;
}

/** Which keys of an event's data are bookkeeping rather than state. */
export interface BookkeepingRule {
  /** Keys always left out; default `["updatedFields"]`. */
  ignoreKeys?: string[];
  /** Leave out `previousX` when the same data has `x`; default true. */
  dropPreviousCompanions?: boolean;
}

/** Options of `foldEvents`. */
export interface FoldOptions {
  /** Stop after this version (inclusive). */
  toVersion?: number;
  /** Include only events at or before this time. */
  toTimestamp?: Date | string | number;
  /** Also return the state after each event. */
  history?: boolean;
  /** The bookkeeping rule. */
  bookkeeping?: BookkeepingRule;
  /** Start from a snapshot instead of from nothing. */
  from?: { state: Json; version: number; deleted?: boolean };
  /** Bring each event to its type's latest shape first (docs/upcasting.md). */
  upcasters?: UpcasterStep[];
}

/** A path into an event: `'data.a.b'`, `'metadata.x'`, or keys (`['data', 'a.b']`). */
export type UpcastPath = string | string[];

/** One operation of an upcaster step (docs/upcasting.md). */
export type UpcasterOperation =
  | { op: 'rename'; from: UpcastPath; to: UpcastPath }
  | { op: 'remove'; path: UpcastPath }
  | { op: 'default'; path: UpcastPath; value: Json }
  | { op: 'map'; path: UpcastPath; values: { [from: string]: Json } }
  | { op: 'renameType'; to: string; version?: number; when?: { path: UpcastPath; equals: Json } };

/** How `eventType` events stored at `fromVersion` become `fromVersion + 1`. */
export interface UpcasterStep {
  eventType: string;
  fromVersion: number;
  operations: UpcasterOperation[];
}

/** Thrown for a refused upcaster definition. */
export interface UpcasterError extends Error {
  code: 'INVALID_UPCASTERS';
  /** The step, as `eventType@fromVersion`. */
  step: string;
  reason: 'invalidDefinition' | 'unknownOperation' | 'invalidOperation' | 'duplicateStep' | 'gap' | 'cycle';
}

/** The state after one event (history mode). */
export interface HistoryStep {
  version: number;
  timestamp: string;
  eventType: string;
  state: Json;
  deleted: boolean;
}

/** The folded aggregate. */
export interface FoldResult {
  /** The state; `null` when no event was applied. */
  state: Json;
  /** The version of the last applied event (0 when none). */
  version: number;
  /** Whether the aggregate is deleted. */
  deleted: boolean;
  /** ISO timestamp of the last applied event, or null. */
  lastTimestamp: string | null;
  /** Present when `history` was requested. */
  history?: HistoryStep[];
}

/** One validation problem. */
export interface ValidationIssue {
  /** Field path, e.g. `data.tags[2]`. */
  path: string;
  /** Stable code, e.g. `INVALID_UUID`. */
  code: string;
  /** A sentence for people. */
  message: string;
}

/** The result of `validateEvent`. */
export interface ValidationReport {
  valid: boolean;
  errors: ValidationIssue[];
}

/** Thrown by `foldEvents`: a JavaScript Error with a stable code and the event index. */
export interface FoldError extends Error {
  code: 'VERSION_GAP' | 'DUPLICATE_VERSION' | 'UNORDERED_EVENTS' | 'MIXED_AGGREGATES' | 'INVALID_EVENT' | 'INVALID_OPTIONS' | 'INTERNAL_ERROR';
  index: number;
}
"#;

/// Checks an event the way the server's `append` does; returns the problems as data.
#[wasm_bindgen(js_name = validateEvent, unchecked_return_type = "ValidationReport")]
pub fn validate_event(#[wasm_bindgen(unchecked_param_type = "unknown")] input: JsValue) -> Result<JsValue, JsValue> {
    let value = to_json(&input)?;
    from_json(&interop::validate_event_json(&value))
}

/// Replays one aggregate's events (in version order) into its state.
///
/// Throws a `FoldError` (`code`, `index`) for malformed events or options, a version gap or
/// repeat, unordered input, or events of two aggregates.
#[wasm_bindgen(js_name = foldEvents, unchecked_return_type = "FoldResult")]
pub fn fold_events(
    #[wasm_bindgen(unchecked_param_type = "FoldEvent[]")] events: JsValue,
    #[wasm_bindgen(unchecked_param_type = "FoldOptions")] options: Option<JsValue>,
) -> Result<JsValue, JsValue> {
    let options = to_json(&options.unwrap_or(JsValue::UNDEFINED))?;
    // As JSON text, folded event by event as it is parsed (no tree of every event).
    let result = match to_json_text(&events)? {
        Some(text) => interop::fold_events_json_text(&text, &options),
        None => interop::fold_events_json(&Value::Null, &options),
    }
    .map_err(|e| js_error(&e))?;
    from_json(&result)
}

/// `foldEvents` for events given as JSON text (e.g. a fetched response body): the fastest path,
/// since no JavaScript objects are built and serialized again.
///
/// Throws like `foldEvents`, and `VALIDATION_FAILED` when the text is not JSON.
#[wasm_bindgen(js_name = foldEventsJson, unchecked_return_type = "FoldResult")]
pub fn fold_events_json(
    #[wasm_bindgen(unchecked_param_type = "string")] events_json: JsValue,
    #[wasm_bindgen(unchecked_param_type = "FoldOptions")] options: Option<JsValue>,
) -> Result<JsValue, JsValue> {
    let Some(events_json) = utf8(&events_json) else {
        return Err(js_error(&synap_events::Error::invalid_input(
            "eventsJson must be a string",
        )));
    };
    let options = to_json(&options.unwrap_or(JsValue::UNDEFINED))?;
    let result = interop::fold_events_json_text(&events_json, &options).map_err(|e| js_error(&e))?;
    from_json(&result)
}

#[wasm_bindgen]
extern "C" {
    /// The platform's `TextEncoder` (browsers, Node): UTF-8 at native speed, where a `&str`
    /// parameter is copied into wasm memory one character at a time by the generated glue
    /// (80 ms of a 20 MB text's 100 ms, measured in Node).
    type TextEncoder;
    #[wasm_bindgen(constructor)]
    fn new() -> TextEncoder;
    #[wasm_bindgen(method)]
    fn encode(this: &TextEncoder, input: &JsValue) -> js_sys::Uint8Array;
}

/// A JavaScript string as UTF-8 (a lone surrogate becomes U+FFFD, as `TextEncoder` and the
/// generated glue both do); `None` for anything else.
fn utf8(value: &JsValue) -> Option<String> {
    if !value.is_string() {
        return None;
    }
    String::from_utf8(TextEncoder::new().encode(value).to_vec()).ok()
}

/// Brings events (the record shape) to their types' latest shapes under an upcaster definition:
/// the repository's upcasting, in the browser. Upcast events get `schemaVersion`,
/// `storedSchemaVersion` and, when renamed, `storedEventType`.
///
/// Throws an `UpcasterError` (`INVALID_UPCASTERS`) for a refused definition.
#[wasm_bindgen(js_name = upcastEvents, unchecked_return_type = "FoldEvent[]")]
pub fn upcast_events(
    #[wasm_bindgen(unchecked_param_type = "FoldEvent[]")] events: JsValue,
    #[wasm_bindgen(unchecked_param_type = "UpcasterStep[]")] upcasters: JsValue,
) -> Result<JsValue, JsValue> {
    let events = to_json(&events)?;
    let upcasters = to_json(&upcasters)?;
    from_json(&interop::upcast_events_json(events, &upcasters).map_err(|e| js_error(&e))?)
}

/// Applies `delta` to `state` as a JSON Merge Patch (RFC 7396): `null` removes a key, objects
/// merge recursively, anything else replaces.
#[wasm_bindgen(js_name = applyDelta, unchecked_return_type = "Json")]
pub fn apply_delta(
    #[wasm_bindgen(unchecked_param_type = "Json")] state: JsValue,
    #[wasm_bindgen(unchecked_param_type = "Json")] delta: JsValue,
) -> Result<JsValue, JsValue> {
    let state = to_json(&state)?;
    let delta = to_json(&delta)?;
    from_json(&interop::apply_delta_json(&state, &delta))
}

#[wasm_bindgen(start)]
fn start() {
    // A panic aborts (wasm32 has no unwinding) and reaches JavaScript as a thrown
    // WebAssembly.RuntimeError; this hook puts the Rust message in the console first.
    std::panic::set_hook(Box::new(|info| console_error(&info.to_string())));
}

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_namespace = console, js_name = error)]
    fn console_error(message: &str);
}

/// JavaScript value → JSON, as `JSON.stringify` sees it (`undefined` → null).
/// `JSON.stringify(value)`; `None` for `undefined` and what it turns into nothing.
fn to_json_text(value: &JsValue) -> Result<Option<String>, JsValue> {
    if value.is_undefined() {
        return Ok(None);
    }
    Ok(utf8(&js_sys::JSON::stringify(value)?.into()))
}

fn to_json(value: &JsValue) -> Result<Value, JsValue> {
    if value.is_undefined() {
        return Ok(Value::Null);
    }
    let text = js_sys::JSON::stringify(value)?;
    match text.as_string() {
        // serde_json refuses nesting deeper than 128 levels: bad input, not a bug.
        Some(text) => serde_json::from_str(&text)
            .map_err(|e| js_error(&synap_events::Error::invalid_input(format!("unreadable input: {e}")))),
        None => Ok(Value::Null),
    }
}

fn from_json(value: &Value) -> Result<JsValue, JsValue> {
    let text = serde_json::to_string(value).map_err(|e| JsValue::from(js_sys::Error::new(&e.to_string())))?;
    js_sys::JSON::parse(&text)
}

/// An `Error` with `code` and the core error's details as properties.
fn js_error(e: &synap_events::Error) -> JsValue {
    let err = js_sys::Error::new(&e.to_string());
    let obj: &js_sys::Object = err.as_ref();
    let _ = js_sys::Reflect::set(obj, &"code".into(), &e.code().into());
    for (key, value) in e.details() {
        if let Ok(v) = from_json(&value) {
            let _ = js_sys::Reflect::set(obj, &key.as_str().into(), &v);
        }
    }
    err.into()
}
