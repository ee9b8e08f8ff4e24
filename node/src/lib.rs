//! `@synap/database`: the Node.js binding of `synap-events`.
//!
//! A thin adapter: JavaScript values in, core calls, JavaScript values and errors out. Every rule
//! lives in the core crate. `records` holds the shapes that cross, `repository` the
//! `EventRepository` class, `subscription` its async iterator, `fold` the replay functions.
#![deny(clippy::all)]

pub mod fold;
pub mod groups;
pub mod records;
pub mod repository;
pub mod subscription;

/// The module's allocator: faster than glibc's for the many small allocations of JSON values
/// (docs/performance.md, the fold section). Its local-dynamic TLS model is the one that is safe in a
/// library loaded by `dlopen`, as Node loads this module.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;
use napi::bindgen_prelude::*;
use serde_json::Value;
use synap_events as core;

/// JSON that reaches JavaScript through `JSON.parse`, as node-postgres gives the design's
/// repository its jsonb: keys are own properties (`__proto__` included, never the prototype) and
/// numbers are JavaScript numbers (never BigInt), so records stay plain, JSON-serialisable data.
pub struct Json(pub Value);

impl TypeName for Json {
    fn type_name() -> &'static str {
        "Json"
    }

    fn value_type() -> ValueType {
        ValueType::Unknown
    }
}

impl ToNapiValue for Json {
    unsafe fn to_napi_value(raw_env: sys::napi_env, val: Json) -> Result<sys::napi_value> {
        let env = Env::from_raw(raw_env);
        let text = serde_json::to_string(&val.0).map_err(|e| Error::from_reason(e.to_string()))?;
        let json: Object = env.get_global()?.get_named_property("JSON")?;
        let parse: Function<String, Unknown> = json.get_named_property("parse")?;
        Ok(parse.call(text)?.raw())
    }
}

/// Converts a core result into the JavaScript value of a resolved promise.
pub(crate) trait IntoJs<V> {
    fn into_js(self) -> V;
}

macro_rules! into_js_as_is {
    ($($t:ty),*) => {$(
        impl IntoJs<$t> for $t {
            fn into_js(self) -> $t {
                self
            }
        }
    )*};
}
into_js_as_is!(i32, i64, Option<i32>, (), groups::GroupRun);

impl IntoJs<Json> for Value {
    fn into_js(self) -> Json {
        Json(self)
    }
}

pub(crate) fn to_json_value(report: &impl serde::Serialize) -> core::Result<Value> {
    serde_json::to_value(report).map_err(|e| core::Error::Internal { message: e.to_string() })
}

/// Runs a core future on the runtime; resolves with its value or rejects with a coded Error.
/// A panic inside becomes an `INTERNAL_ERROR` rejection.
pub(crate) fn spawn<'env, T, V, Fut>(env: &'env Env, fut: Fut) -> Result<PromiseRaw<'env, V>>
where
    T: IntoJs<V> + Send + 'static,
    V: ToNapiValue + 'static,
    Fut: Future<Output = core::Result<T>> + Send + 'static,
{
    let guarded = async move {
        Ok(AssertUnwindSafe(fut).catch_unwind().await.unwrap_or_else(|panic| {
            Err(core::Error::Internal {
                message: panic_message(&panic),
            })
        }))
    };
    env.spawn_future_with_callback(guarded, |env, result: core::Result<T>| match result {
        Ok(value) => Ok(value.into_js()),
        Err(e) => Err(to_js_error(env, e)),
    })
}

pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// A JavaScript `Error` with `code` and the core error's details as properties.
pub(crate) fn to_js_error(env: &Env, e: core::Error) -> Error {
    let code = e.code();
    let message = message_of(&e);
    let build = || -> Result<Error> {
        let mut obj = env.create_error(Error::new(Status::GenericFailure, message.clone()))?;
        obj.set("code", code)?;
        for (key, value) in e.details() {
            obj.set(key, Json(value))?;
        }
        Ok(Error::from(obj.to_unknown()))
    };
    build().unwrap_or_else(|_| Error::new(Status::GenericFailure, format!("{code}: {e}")))
}

/// An error raised where no JavaScript object can be made (the async iterator's promise): the
/// message is `CODE: text`, followed by a line holding the error's details as JSON after
/// [`DETAILS_MARK`]. database.js turns it back into an error with `code`, `retryable` and the
/// details as properties, as [`to_js_error`] makes them.
pub(crate) fn coded_reason(e: core::Error) -> Error {
    let details = serde_json::Value::Object(e.details());
    Error::new(
        Status::GenericFailure,
        format!("{}: {}\n{DETAILS_MARK}{details}", e.code(), message_of(&e)),
    )
}

/// Starts the details line of a [`coded_reason`] message (database.js reads it).
pub(crate) const DETAILS_MARK: &str = "synap-error-details: ";

/// The error's message in JavaScript: the design's text for a conflict.
fn message_of(e: &core::Error) -> String {
    match e {
        // The design's repository throws `new Error('Concurrency conflict detected')`: callers
        // that compare the message keep working; the versions are the error's properties.
        core::Error::ConcurrencyConflict { .. } => "Concurrency conflict detected".to_owned(),
        _ => e.to_string(),
    }
}

/// Which members of a JavaScript value [`js_to_json`] checks before `JSON.stringify` could hide
/// them: an invalid `Date` becomes `null`, and so does a number that is NaN or infinite, which
/// would then read as "absent".
pub(crate) enum Checked<'a> {
    /// These keys of the object, or of each element of an array of objects.
    Keys(&'a [&'a str]),
    /// An event, or each of an array of events: `timestamp`, and every member at any depth of
    /// `data` and `metadata` (`{ price: NaN }` would otherwise be stored as `{ price: null }`,
    /// which a fold reads as "remove price").
    Events,
    /// Every key of the object (call options, which are small).
    AllKeys,
}

/// JavaScript value to JSON exactly as `JSON.stringify` (what node-postgres sends) sees it:
/// `undefined` members dropped, Dates as ISO strings, `toJSON` honoured; but an invalid `Date`
/// or a non-finite number in a `checked` member is refused rather than read as absent.
pub(crate) fn js_to_json(env: &Env, value: Unknown, checked: Checked) -> core::Result<Value> {
    let parsed = match js_to_json_text(env, value)? {
        // serde_json refuses nesting deeper than 128 levels: bad input, not a bug.
        Some(text) => {
            serde_json::from_str(&text).map_err(|e| core::Error::invalid_input(format!("unreadable input: {e}")))?
        }
        None => Value::Null,
    };
    refuse_hidden_values(&value, &parsed, &checked).map_err(|e| core::Error::invalid_input(e.reason))??;
    Ok(parsed)
}

/// Call options as JSON (every member checked, see [`Checked::AllKeys`]); `null` when absent.
pub(crate) fn options_json(env: &Env, options: Option<Unknown>) -> core::Result<Value> {
    match options {
        Some(o) => js_to_json(env, o, Checked::AllKeys),
        None => Ok(Value::Null),
    }
}

/// What `JSON.stringify` makes of the value, as text (`None` when nothing, as for `undefined`),
/// for callers that parse it their own way. Nothing is checked (see [`js_to_json`]).
pub(crate) fn js_to_json_text(env: &Env, value: Unknown) -> core::Result<Option<String>> {
    let text = (|| -> Result<Option<String>> {
        let json: Object = env.get_global()?.get_named_property("JSON")?;
        let stringify: Function<Unknown, Unknown> = json.get_named_property("stringify")?;
        let out = stringify.call(value)?;
        match out.get_type()? {
            ValueType::String => Ok(Some(unsafe { out.cast::<String>() }?)),
            _ => Ok(None),
        }
    })();
    match text {
        Ok(text) => Ok(text),
        Err(e) => Err(core::Error::invalid_input(format!(
            "not JSON-serializable: {}",
            e.reason
        ))),
    }
}

/// `VALIDATION_FAILED` naming `path` when `v` is an invalid `Date` (`INVALID_TIMESTAMP`) or a NaN
/// or infinite number (`OUT_OF_RANGE`): `JSON.stringify` would make either `null`.
pub(crate) fn refuse_hidden_value(v: &Unknown, path: String) -> Result<core::Result<()>> {
    if v.is_date()? && unsafe { v.cast::<napi::JsDate>()? }.value_of()?.is_nan() {
        return Ok(Err(core::Error::Validation {
            message: format!("{path} is an invalid Date"),
            field: path,
            reason: core::IssueCode::InvalidTimestamp,
        }));
    }
    if v.get_type()? == ValueType::Number {
        let n: f64 = unsafe { v.cast()? };
        if !n.is_finite() {
            return Ok(Err(core::Error::Validation {
                message: format!("{path} must be a finite number, not {n}"),
                field: path,
                reason: core::IssueCode::OutOfRange,
            }));
        }
    }
    Ok(Ok(()))
}

/// `VALIDATION_FAILED` for the first checked member (see [`Checked`]) that holds an invalid
/// `Date` (`INVALID_TIMESTAMP`) or a NaN or infinite number (`OUT_OF_RANGE`). `JSON.stringify`
/// makes either `null`, so only the members that are `null` in `parsed` (what it made of `value`)
/// are looked at in `value`: a batch without such members costs no call into JavaScript.
fn refuse_hidden_values(value: &Unknown, parsed: &Value, checked: &Checked) -> Result<core::Result<()>> {
    if matches!(checked, Checked::Keys(keys) if keys.is_empty()) {
        return Ok(Ok(())); // nothing to check: do not walk a large array for it
    }
    let nulled = |v: &Value| -> Vec<String> {
        let Some(members) = v.as_object() else {
            return Vec::new();
        };
        match checked {
            Checked::Events => ["timestamp"]
                .iter()
                .filter(|k| members.get(**k).is_some_and(Value::is_null))
                .map(|k| (*k).to_owned())
                .collect(),
            Checked::Keys(keys) => keys
                .iter()
                .filter(|k| members.get(**k).is_some_and(Value::is_null))
                .map(|k| (*k).to_owned())
                .collect(),
            Checked::AllKeys => members
                .iter()
                .filter(|(_, v)| v.is_null())
                .map(|(k, _)| k.clone())
                .collect(),
        }
    };
    let check = |obj: &Unknown, keys: Vec<String>, prefix: &str| -> Result<core::Result<()>> {
        if obj.get_type()? != ValueType::Object {
            return Ok(Ok(())); // a toJSON made this member: it hides nothing of its own
        }
        let obj: Object = unsafe { obj.cast()? };
        for key in keys {
            let v: Unknown = obj.get_named_property(&key)?;
            if let Err(e) = refuse_hidden_value(&v, format!("{prefix}{key}"))? {
                return Ok(Err(e));
            }
        }
        Ok(Ok(()))
    };
    // The members of an event's data and metadata, at any depth.
    let deep = |event: &Unknown, parsed: &Value, prefix: &str| -> Result<core::Result<()>> {
        if !matches!(checked, Checked::Events) || event.get_type()? != ValueType::Object {
            return Ok(Ok(()));
        }
        let event: Object = unsafe { event.cast()? };
        for key in ["data", "metadata"] {
            if let Some(member) = parsed.get(key).filter(|m| holds_null(m)) {
                let v: Unknown = event.get_named_property(key)?;
                if let Err(e) = refuse_hidden_inside(&v, member, format!("{prefix}{key}"))? {
                    return Ok(Err(e));
                }
            }
        }
        Ok(Ok(()))
    };
    match parsed {
        Value::Array(items) if value.is_array()? => {
            let array: Object = unsafe { value.cast()? };
            for (i, item) in items.iter().enumerate() {
                let keys = nulled(item);
                let inside = matches!(checked, Checked::Events)
                    && ["data", "metadata"]
                        .iter()
                        .any(|k| item.get(*k).is_some_and(holds_null));
                if !keys.is_empty() || inside {
                    let element: Unknown = array.get_element(i as u32)?;
                    if let Err(e) = check(&element, keys, &format!("events[{i}]."))? {
                        return Ok(Err(e));
                    }
                    if let Err(e) = deep(&element, item, &format!("events[{i}]."))? {
                        return Ok(Err(e));
                    }
                }
            }
            Ok(Ok(()))
        }
        Value::Object(_) => {
            if let Err(e) = check(value, nulled(parsed), "")? {
                return Ok(Err(e));
            }
            deep(value, parsed, "")
        }
        _ => Ok(Ok(())),
    }
}

/// Whether a JSON value holds a `null` anywhere (iterative: values here are at most 128 deep,
/// but arrays may be long).
fn holds_null(v: &Value) -> bool {
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            Value::Null => return true,
            Value::Array(items) => stack.extend(items),
            Value::Object(map) => stack.extend(map.values()),
            _ => {}
        }
    }
    false
}

/// The first member of `value` (a JavaScript value whose `JSON.stringify` gave `parsed`) that
/// became `null` while it is no `null`: an invalid `Date`, a NaN or infinite number. Only the
/// branches of `parsed` that hold a `null` are looked at in JavaScript.
fn refuse_hidden_inside(value: &Unknown, parsed: &Value, path: String) -> Result<core::Result<()>> {
    match parsed {
        Value::Null => refuse_hidden_value(value, path),
        Value::Object(members) if value.get_type()? == ValueType::Object && !value.is_date()? => {
            let obj: Object = unsafe { value.cast()? };
            for (key, member) in members.iter().filter(|(_, m)| holds_null(m)) {
                let v: Unknown = obj.get_named_property(key)?;
                if let Err(e) = refuse_hidden_inside(&v, member, format!("{path}.{key}"))? {
                    return Ok(Err(e));
                }
            }
            Ok(Ok(()))
        }
        Value::Array(items) if value.is_array()? => {
            let array: Object = unsafe { value.cast()? };
            for (i, item) in items.iter().enumerate().filter(|(_, m)| holds_null(m)) {
                let v: Unknown = array.get_element(i as u32)?;
                if let Err(e) = refuse_hidden_inside(&v, item, format!("{path}[{i}]"))? {
                    return Ok(Err(e));
                }
            }
            Ok(Ok(()))
        }
        // A toJSON made this member: it hides nothing of its own.
        _ => Ok(Ok(())),
    }
}
