//! The options of the repository's reads, and how they are read from the JSON that JavaScript
//! sends (camelCase keys, as the design's TypeScript API names them).
//!
//! Filters are parameters, not events: any string matches the events that have it and nothing
//! else (`countEvents({ eventType: "x' OR '1'='1" })` is 0, as in the design). What cannot be
//! meant is refused with `VALIDATION_FAILED` naming the field and the value: a negative or
//! fractional number, NaN, a date that does not parse, a list that is not a list, and a key that
//! is not an option of the call (`UNKNOWN_OPTION`: a misspelt `dryRun` must never run for real).
//! Every options object of the API is read through [`Options`], the one place these rules live.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::validate::{json_kind as kind, parse_timestamp, IssueCode};

/// Options of `get_aggregate_stream`, with the design's meaning: the versions after
/// `from_version` up to and including `to_version`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamOptions {
    /// Return the versions after this one (exclusive): a caller that holds the state at version
    /// N asks for `from_version: N`. Default 0: from the first.
    pub from_version: Option<i32>,
    /// The last version to return (inclusive). Default: the latest.
    pub to_version: Option<i32>,
    /// Only these event types. Default: all.
    pub event_types: Option<Vec<String>>,
}

/// Options of `get_user_stream`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserStreamOptions {
    /// How many days back from now. Default 7.
    pub days: i64,
    /// Most events returned. Default 1,000.
    pub limit: i64,
    /// Only these event types. Default: all.
    pub event_types: Option<Vec<String>>,
    /// Only these aggregate types. Default: all.
    pub aggregate_types: Option<Vec<String>>,
}

impl Default for UserStreamOptions {
    fn default() -> Self {
        UserStreamOptions {
            days: 7,
            limit: 1000,
            event_types: None,
            aggregate_types: None,
        }
    }
}

/// Filters of `count_events`; every field is optional and they combine with AND.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CountFilter {
    /// Only this user's events.
    pub user_id: Option<String>,
    /// Only this event type.
    pub event_type: Option<String>,
    /// Only this aggregate type.
    pub aggregate_type: Option<String>,
    /// Only events at or after this time.
    pub from_date: Option<DateTime<Utc>>,
    /// Only events before this time.
    pub to_date: Option<DateTime<Utc>>,
}

/// Whether a filter string can match a stored value at all: PostgreSQL text never holds U+0000.
pub fn can_match(filter: &str) -> bool {
    !filter.contains('\0')
}

/// Reads stream options from JSON (`null` for the defaults).
///
/// Fails with [`Error::Validation`] for a version that is negative, fractional or not a number,
/// or `eventTypes` that is not a list of strings. Versions above 2,147,483,647 mean "no later
/// limit" and are taken as that.
pub fn stream_options(value: &Value) -> Result<StreamOptions> {
    let o = Options::of(value, &["fromVersion", "toVersion", "eventTypes"])?;
    Ok(StreamOptions {
        from_version: version_bound(o, "fromVersion")?,
        to_version: version_bound(o, "toVersion")?,
        event_types: o.strings("eventTypes")?,
    })
}

/// Reads user-stream options from JSON (`null` for the defaults).
///
/// Fails with [`Error::Validation`] for `days` or `limit` that are not whole positive numbers,
/// lists that are not lists of strings, or an aggregate type that does not exist.
pub fn user_stream_options(value: &Value) -> Result<UserStreamOptions> {
    let mut options = UserStreamOptions::default();
    let o = Options::of(value, &["days", "limit", "eventTypes", "aggregateTypes"])?;
    if let Some(days) = o.whole("days")? {
        options.days = days;
    }
    if let Some(limit) = o.whole("limit")? {
        options.limit = limit;
    }
    options.event_types = o.strings("eventTypes")?;
    options.aggregate_types = o.strings("aggregateTypes")?;
    Ok(options)
}

/// Reads count filters from JSON (`null` for none).
///
/// Fails with [`Error::Validation`] for a filter of the wrong JSON type, a date that does not
/// parse (an invalid `Date` included), or a key that is not a filter. An aggregate type that no
/// event has (`widget`) matches nothing, as an unknown user or event type does.
pub fn count_filter(value: &Value) -> Result<CountFilter> {
    let o = Options::of(value, &["userId", "eventType", "aggregateType", "fromDate", "toDate"])?;
    Ok(CountFilter {
        user_id: o.string("userId")?,
        event_type: o.string("eventType")?,
        aggregate_type: o.string("aggregateType")?,
        from_date: o.date("fromDate")?,
        to_date: o.date("toDate")?,
    })
}

/// A whole number given for `field`, as JavaScript sends it (a double).
///
/// Fails with [`Error::Validation`] for NaN, infinities and fractions, naming the value.
pub fn whole_number_arg(field: &str, value: f64) -> Result<i64> {
    if value.is_finite() && value.fract() == 0.0 && value.abs() < 9.007_199_254_740_992e15 {
        Ok(value as i64)
    } else {
        Err(Error::invalid(
            field,
            IssueCode::OutOfRange,
            format!("{field} must be a whole number, not {value}"),
        ))
    }
}

/// The options object of a call, read by the rules of this module: `null` (or absent) for none,
/// otherwise an object whose every key is one of the call's options, each of the type the getter
/// asks for (`null` counts as absent). Fails with `VALIDATION_FAILED` naming the key.
#[derive(Debug, Clone, Copy)]
pub struct Options<'a> {
    obj: Option<&'a Map<String, Value>>,
}

impl<'a> Options<'a> {
    /// Checks `value` against the call's option names `known`.
    pub fn of(value: &'a Value, known: &[&str]) -> Result<Options<'a>> {
        let obj = options_object(value)?;
        if let Some(key) = obj.and_then(|o| o.keys().find(|k| !known.contains(&k.as_str()))) {
            return Err(Error::invalid(
                key.clone(),
                IssueCode::UnknownOption,
                format!("{key} is not an option here; the options are {}", known.join(", ")),
            ));
        }
        Ok(Options { obj })
    }

    /// The value of an option, `None` when absent or null.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.and_then(|o| present(o, key))
    }

    /// A string option.
    pub fn string(&self, key: &str) -> Result<Option<String>> {
        self.obj.map_or(Ok(None), |o| string(o, key))
    }

    /// A whole-number option (any JavaScript number that is whole).
    pub fn whole(&self, key: &str) -> Result<Option<i64>> {
        self.obj.map_or(Ok(None), |o| whole_number(o, key))
    }

    /// A boolean option.
    pub fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(Error::invalid(
                key,
                IssueCode::InvalidType,
                format!("{key} must be true or false, not {}", kind(other)),
            )),
        }
    }

    /// A list-of-strings option.
    pub fn strings(&self, key: &str) -> Result<Option<Vec<String>>> {
        self.obj.map_or(Ok(None), |o| string_list(o, key))
    }

    /// A date option (an RFC 3339 date-time, milliseconds since 1970, or a JavaScript `Date`).
    pub fn date(&self, key: &str) -> Result<Option<DateTime<Utc>>> {
        self.obj.map_or(Ok(None), |o| date(o, key))
    }
}

fn options_object(value: &Value) -> Result<Option<&Map<String, Value>>> {
    match value {
        Value::Null => Ok(None),
        Value::Object(obj) => Ok(Some(obj)),
        other => Err(Error::invalid(
            "options",
            IssueCode::InvalidType,
            format!("options must be an object, not {}", kind(other)),
        )),
    }
}

/// A key's value, with `null` (and an absent key) as `None`.
pub(crate) fn present<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn whole_number(obj: &Map<String, Value>, key: &str) -> Result<Option<i64>> {
    match present(obj, key) {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(i) => Ok(Some(i)),
            None => whole_number_arg(key, n.as_f64().unwrap_or(f64::NAN)).map(Some),
        },
        Some(other) => Err(Error::invalid(
            key,
            IssueCode::InvalidType,
            format!("{key} must be a number, not {}", kind(other)),
        )),
    }
}

/// A version bound: a whole number from 0; above 2^31 - 1 means "no limit" and is clamped.
fn version_bound(o: Options, key: &str) -> Result<Option<i32>> {
    match o.whole(key)? {
        None => Ok(None),
        Some(v) if v < 0 => Err(Error::invalid(
            key,
            IssueCode::OutOfRange,
            format!("{key} must be 0 or more, not {v}"),
        )),
        Some(v) => Ok(Some(v.min(i64::from(i32::MAX)) as i32)),
    }
}

fn string(obj: &Map<String, Value>, key: &str) -> Result<Option<String>> {
    match present(obj, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(Error::invalid(
            key,
            IssueCode::InvalidType,
            format!("{key} must be a string, not {}", kind(other)),
        )),
    }
}

fn string_list(obj: &Map<String, Value>, key: &str) -> Result<Option<Vec<String>>> {
    match present(obj, key) {
        None => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(s.clone()),
                other => Err(Error::invalid(
                    format!("{key}[{i}]"),
                    IssueCode::InvalidType,
                    format!("{key}[{i}] must be a string, not {}", kind(other)),
                )),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some),
        Some(other) => Err(Error::invalid(
            key,
            IssueCode::InvalidType,
            format!("{key} must be a list of strings, not {}", kind(other)),
        )),
    }
}

fn date(obj: &Map<String, Value>, key: &str) -> Result<Option<DateTime<Utc>>> {
    match present(obj, key) {
        None => Ok(None),
        Some(v) => parse_timestamp(v).map(Some).ok_or_else(|| {
            Error::invalid(
                key,
                IssueCode::InvalidTimestamp,
                format!("{key} must be a valid date, an RFC 3339 date-time or milliseconds since 1970"),
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn code(e: Error) -> (String, String) {
        match e {
            Error::Validation { field, reason, .. } => (field, reason.as_str().to_owned()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn version_bounds_are_whole_and_never_wrap() {
        let o = stream_options(&json!({"fromVersion": 3, "toVersion": 4294967297u64})).unwrap();
        assert_eq!((o.from_version, o.to_version), (Some(3), Some(i32::MAX)));
        let o = stream_options(&json!({"toVersion": 2147483648u64})).unwrap();
        assert_eq!(o.to_version, Some(i32::MAX));
        assert_eq!(
            code(stream_options(&json!({"fromVersion": -1})).unwrap_err()),
            ("fromVersion".into(), "OUT_OF_RANGE".into())
        );
        assert_eq!(
            code(stream_options(&json!({"toVersion": 2.5})).unwrap_err()),
            ("toVersion".into(), "OUT_OF_RANGE".into())
        );
        assert_eq!(
            code(stream_options(&json!({"eventTypes": "entity.created"})).unwrap_err()),
            ("eventTypes".into(), "INVALID_TYPE".into())
        );
        assert_eq!(stream_options(&Value::Null).unwrap(), StreamOptions::default());
    }

    #[test]
    fn filters_take_any_string_and_refuse_what_cannot_be_meant() {
        let f = count_filter(&json!({"eventType": "x' OR '1'='1", "userId": "", "aggregateType": "widget"})).unwrap();
        assert_eq!(f.event_type.as_deref(), Some("x' OR '1'='1"));
        assert_eq!(f.user_id.as_deref(), Some(""));
        assert_eq!(f.aggregate_type.as_deref(), Some("widget"));
        // A key that is not a filter is refused, naming it: a misspelt filter must not count
        // every event.
        assert_eq!(
            code(count_filter(&json!({"userid": "nobody"})).unwrap_err()),
            ("userid".into(), "UNKNOWN_OPTION".into())
        );
        assert_eq!(
            code(count_filter(&json!({"toDate": "not a date"})).unwrap_err()),
            ("toDate".into(), "INVALID_TIMESTAMP".into())
        );
        // Ranges are the reads' to check (days and limit from 1); fractions are refused here.
        assert_eq!(user_stream_options(&json!({"days": -1})).unwrap().days, -1);
        assert_eq!(
            code(user_stream_options(&json!({"limit": 1.5})).unwrap_err()),
            ("limit".into(), "OUT_OF_RANGE".into())
        );
    }
}
