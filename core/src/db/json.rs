//! jsonb in and out of Rust: passed through as text ([`RawJsonb`]), or read into a
//! [`serde_json::Value`] in a way that never fails on a number ([`StoredJson`]).

use serde_json::Value;
use tokio_postgres::types::{accepts, private::BytesMut, to_sql_checked, FromSql, IsNull, ToSql, Type};

type BoxError = Box<dyn std::error::Error + Sync + Send>;

/// The JSON text of a binary jsonb value (a version byte, 1, then the text).
fn jsonb_text(raw: &[u8]) -> Result<&[u8], BoxError> {
    match raw.split_first() {
        Some((1, text)) => Ok(text),
        _ => Err("unsupported jsonb version".into()),
    }
}

/// A jsonb value passed through as its text, never parsed: the migration copies `data` as is.
#[derive(Debug)]
pub(crate) struct RawJsonb(pub(crate) Vec<u8>);

impl<'a> FromSql<'a> for RawJsonb {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        Ok(RawJsonb(jsonb_text(raw)?.to_vec()))
    }
    accepts!(JSONB);
}

impl ToSql for RawJsonb {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        out.extend_from_slice(&[1]);
        out.extend_from_slice(&self.0);
        Ok(IsNull::No)
    }
    accepts!(JSONB);
    to_sql_checked!();
}

impl RawJsonb {
    /// What kind of JSON value it is, from its first character.
    pub(crate) fn kind(&self) -> &'static str {
        match self.0.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => "object",
            Some(b'[') => "array",
            Some(b'"') => "string",
            Some(b'n') => "null",
            Some(b't' | b'f') => "boolean",
            _ => "number",
        }
    }
}

/// A stored jsonb value, read so that no number makes the read fail: a number beyond a double's
/// range (stored before appends refused it, or written by other means) reads as `null`, where
/// JavaScript's `JSON.parse` would make it `Infinity`; every other number reads as the nearest
/// double, as `JSON.parse` does.
pub(crate) struct StoredJson(pub(crate) Value);

impl<'a> FromSql<'a> for StoredJson {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        // json is its text as written (snapshots' states keep their keys' order); jsonb has a
        // version byte first.
        let text = if *ty == Type::JSON { raw } else { jsonb_text(raw)? };
        match serde_json::from_slice(text) {
            Ok(value) => Ok(StoredJson(value)),
            Err(first) => match crate::numbers::without_unreadable_numbers(text) {
                Some(readable) => Ok(StoredJson(serde_json::from_str(&readable)?)),
                None => Err(first.into()),
            },
        }
    }
    accepts!(JSON, JSONB);
}

/// A stored timestamptz: the time, or PostgreSQL's text for one that has no time the store reads
/// back (`infinity`, `-infinity`, or beyond the range of times the driver reads).
pub(crate) struct StoredTimestamp(pub(crate) Result<chrono::DateTime<chrono::Utc>, String>);

impl<'a> FromSql<'a> for StoredTimestamp {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        match chrono::DateTime::<chrono::Utc>::from_sql(ty, raw) {
            Ok(t) => Ok(StoredTimestamp(Ok(t))),
            Err(_) => {
                let micros = <i64 as FromSql>::from_sql(&Type::INT8, raw)?;
                Ok(StoredTimestamp(Err(match micros {
                    i64::MAX => "infinity".to_owned(),
                    i64::MIN => "-infinity".to_owned(),
                    other => format!("{other} microseconds after 2000-01-01"),
                })))
            }
        }
    }
    accepts!(TIMESTAMPTZ);
}

/// Orders the keys of every object in `value` as jsonb stores them (shorter keys first, then by
/// bytes), which is the order every read gives back: so the record an append returns has its
/// keys in the order a read of it will have them.
pub(crate) fn in_jsonb_order(value: &mut Value) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = std::mem::take(map).into_iter().collect();
            entries.sort_by(|(a, _), (b, _)| a.len().cmp(&b.len()).then_with(|| a.cmp(b)));
            for (key, mut member) in entries {
                in_jsonb_order(&mut member);
                map.insert(key, member);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(in_jsonb_order),
        _ => {}
    }
}
