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
    let build = || -> Result<Error> {
        let mut obj = env.create_error(Error::new(Status::GenericFailure, e.to_string()))?;
        obj.set("code", code)?;
        for (key, value) in e.details() {
            obj.set(key, Json(value))?;
        }
        Ok(Error::from(obj.to_unknown()))
    };
    build().unwrap_or_else(|_| Error::new(Status::GenericFailure, format!("{code}: {e}")))
}

/// An error raised outside a JavaScript call frame (the iterator's promise): the code leads
/// the message and is the error's `code`.
pub(crate) fn coded_reason(e: core::Error) -> Error {
    Error::new(Status::GenericFailure, format!("{}: {e}", e.code()))
}

/// Which members of a JavaScript value [`js_to_json`] checks before `JSON.stringify` could hide
/// them: an invalid `Date` becomes `null`, and so does a number that is NaN or infinite, which
/// would then read as "absent".
pub(crate) enum Checked<'a> {
    /// These keys of the object, or of each element of an array of objects.
    Keys(&'a [&'a str]),
    /// Every key of the object (call options, which are small).
    AllKeys,
}

/// JavaScript value to JSON exactly as `JSON.stringify` (what node-postgres sends) sees it:
/// `undefined` members dropped, Dates as ISO strings, `toJSON` honoured; but an invalid `Date`
/// or a non-finite number in a `checked` member is refused rather than read as absent.
pub(crate) fn js_to_json(env: &Env, value: Unknown, checked: Checked) -> core::Result<Value> {
    match js_to_json_text(env, value, checked)? {
        // serde_json refuses nesting deeper than 128 levels: bad input, not a bug.
        Some(text) => {
            serde_json::from_str(&text).map_err(|e| core::Error::invalid_input(format!("unreadable input: {e}")))
        }
        None => Ok(Value::Null),
    }
}

/// Call options as JSON (every member checked, see [`Checked::AllKeys`]); `null` when absent.
pub(crate) fn options_json(env: &Env, options: Option<Unknown>) -> core::Result<Value> {
    match options {
        Some(o) => js_to_json(env, o, Checked::AllKeys),
        None => Ok(Value::Null),
    }
}

/// [`js_to_json`] as text: what `JSON.stringify` makes of the value (`None` when nothing, as for
/// `undefined`), for callers that parse it their own way.
pub(crate) fn js_to_json_text(env: &Env, value: Unknown, checked: Checked) -> core::Result<Option<String>> {
    refuse_hidden_values(&value, &checked).map_err(|e| core::Error::invalid_input(e.reason))??;
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
/// `Date` (`INVALID_TIMESTAMP`) or a NaN or infinite number (`OUT_OF_RANGE`).
fn refuse_hidden_values(value: &Unknown, checked: &Checked) -> Result<core::Result<()>> {
    if matches!(checked, Checked::Keys(keys) if keys.is_empty()) {
        return Ok(Ok(())); // nothing to check: do not walk a large array for it
    }
    let check = |obj: &Object, prefix: &str| -> Result<core::Result<()>> {
        let keys: Vec<String> = match checked {
            Checked::Keys(keys) => keys.iter().map(|k| (*k).to_owned()).collect(),
            Checked::AllKeys => {
                let names = obj.get_property_names()?;
                (0..names.get_array_length()?)
                    .map(|i| names.get_element::<String>(i))
                    .collect::<Result<Vec<String>>>()?
            }
        };
        for key in keys {
            let v: Unknown = obj.get_named_property(&key)?;
            if let Err(e) = refuse_hidden_value(&v, format!("{prefix}{key}"))? {
                return Ok(Err(e));
            }
        }
        Ok(Ok(()))
    };
    match value.get_type()? {
        ValueType::Object if value.is_array()? => {
            let items: Object = unsafe { value.cast()? };
            for i in 0..items.get_array_length()? {
                let item: Unknown = items.get_element(i)?;
                if item.get_type()? == ValueType::Object {
                    let obj: Object = unsafe { item.cast()? };
                    if let Err(e) = check(&obj, &format!("events[{i}]."))? {
                        return Ok(Err(e));
                    }
                }
            }
            Ok(Ok(()))
        }
        ValueType::Object => check(&unsafe { value.cast()? }, ""),
        _ => Ok(Ok(())),
    }
}
