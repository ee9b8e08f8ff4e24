//! The projection transaction: what a projection's handler writes its read model in
//! ([`GroupMember::project`](super::GroupMember::project)), and its `query_json`, which takes
//! and gives JSON as node-postgres does (parameters converted to the types PostgreSQL infers,
//! rows as objects of their columns).
//!
//! Owns: [`ProjectionTx`] and the JSON ↔ SQL value conversions. Calls: the connection layer
//! (`crate::db::conn`). The member (`super`) begins, settles and ends the transaction.

use std::future::Future;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::validate::IssueCode;

/// The transaction a projection's handler writes in; see [`GroupMember::project`](super::GroupMember::project). Cloning it
/// shares the one transaction.
#[derive(Clone)]
pub struct ProjectionTx(pub(super) Arc<TxInner>);

pub(super) struct TxInner {
    pub(super) client: Option<deadpool_postgres::Object>,
    /// Through a transaction-mode pooler: its settings, and statements run unnamed.
    pub(super) pooled: Option<Arc<crate::db::conn::Pooled>>,
    pub(super) finished: std::sync::atomic::AtomicBool,
    /// Open while the handler runs: [`ProjectionTx::query_json`] takes it for reading when it
    /// is called and holds it through its statements, and the batch closes it (waiting for
    /// those) before it settles, so that a statement on its way when the handler's promise
    /// settles runs inside the batch, not after its COMMIT or ROLLBACK.
    pub(super) open: Arc<tokio::sync::RwLock<bool>>,
}

impl Drop for TxInner {
    fn drop(&mut self) {
        // A transaction neither committed nor rolled back (its task was cancelled) must not go
        // back to the pool: the connection is closed instead, and the server rolls it back.
        if !self.finished.load(std::sync::atomic::Ordering::Acquire) {
            if let Some(client) = self.client.take() {
                drop(deadpool_postgres::Object::take(client));
            }
        }
    }
}

impl ProjectionTx {
    /// The connection, inside the transaction. Statements on it must be awaited before the
    /// handler returns: unlike [`ProjectionTx::query_json`], a statement still running then is
    /// not waited for, and may run after the batch's COMMIT or ROLLBACK.
    pub fn client(&self) -> &tokio_postgres::Client {
        self.0.client.as_ref().expect("present until dropped")
    }
}

impl std::fmt::Debug for ProjectionTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProjectionTx")
    }
}

impl ProjectionTx {
    /// Runs a statement in the transaction with JSON parameters and returns
    /// `{ rows, rowCount }` as node-postgres does: each parameter converted to the type
    /// PostgreSQL infers for it, each row an object of its columns. Types: boolean, smallint,
    /// integer, bigint (as a string, as node-postgres gives it), real, double precision, text and
    /// its kin, uuid, json, jsonb, timestamptz and timestamp (ISO 8601 strings), date; cast others
    /// to one of these in the SQL (`$1::text::numeric`, `total::text`).
    ///
    /// Fails with [`Error::Validation`] for a parameter of the wrong type or count, or a column of
    /// another type, and with the database's error for a failing statement (which aborts the
    /// transaction: the batch is retried).
    ///
    /// The statement belongs to the batch from this call on (not from when the future is first
    /// polled): one started before the handler returns runs before the batch commits or rolls
    /// back, also when the handler does not wait for it. Refused once the handler has returned.
    pub fn query_json(
        &self,
        sql: String,
        params: Vec<serde_json::Value>,
    ) -> impl Future<Output = Result<serde_json::Value>> + Send + 'static {
        let turn = self.0.open.clone().try_read_owned().ok().filter(|open| **open);
        let tx = self.clone();
        async move {
            let Some(_turn) = turn else {
                return Err(Error::Validation {
                    field: "tx".into(),
                    reason: IssueCode::OutOfRange,
                    message: "the batch's transaction is over: use tx only until the handler's promise settles".into(),
                });
            };
            if sql.contains('\0') {
                // PostgreSQL's protocol ends a statement's text at U+0000: the server would see
                // the connection break, and the caller a retryable error for a bad statement.
                return Err(Error::invalid(
                    "sql",
                    IssueCode::NulCharacter,
                    "the statement contains U+0000",
                ));
            }
            tx.run_json(&sql, &params).await
        }
    }

    async fn run_json(&self, sql: &str, params: &[serde_json::Value]) -> Result<serde_json::Value> {
        use tokio_postgres::types::ToSql;
        let client = self.client();
        // Through a pooler the statement runs unnamed (crate::db::conn::Pooled); otherwise it is
        // prepared here, and closed with the rows at the end.
        let (stmt, types, returns_rows) = match &self.0.pooled {
            Some(p) => {
                let d = p.describe(client, None, sql).await?;
                (None, d.params.clone(), d.returns_rows)
            }
            None => {
                let stmt = client.prepare(sql).await?;
                let (types, returns) = (stmt.params().to_vec(), !stmt.columns().is_empty());
                (Some(stmt), types, returns)
            }
        };
        if types.len() != params.len() {
            return Err(Error::invalid(
                "params",
                IssueCode::OutOfRange,
                format!("the statement takes {} parameters, {} given", types.len(), params.len()),
            ));
        }
        let values: Vec<Box<dyn ToSql + Sync + Send>> = types
            .iter()
            .zip(params)
            .enumerate()
            .map(|(i, (ty, v))| sql_param(i, ty, v))
            .collect::<Result<_>>()?;
        let refs: Vec<&(dyn ToSql + Sync)> = values.iter().map(|b| &**b as &(dyn ToSql + Sync)).collect();
        let (rows, n) = match (&stmt, &self.0.pooled) {
            (Some(stmt), _) if !returns_rows => (Vec::new(), client.execute(stmt, &refs).await?),
            (Some(stmt), _) => {
                let rows = client.query(stmt, &refs).await?;
                let n = rows.len() as u64;
                (rows, n)
            }
            (None, Some(p)) => p.run(client, None, sql, &refs).await?,
            (None, None) => {
                return Err(Error::Internal {
                    message: "a projection statement neither prepared nor pooled".into(),
                })
            }
        };
        if !returns_rows {
            return Ok(serde_json::json!({ "rows": [], "rowCount": n }));
        }
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut obj = serde_json::Map::new();
            for (i, col) in row.columns().iter().enumerate() {
                obj.insert(col.name().to_owned(), sql_value(row, i, col.type_())?);
            }
            out.push(serde_json::Value::Object(obj));
        }
        Ok(serde_json::json!({ "rows": out, "rowCount": rows.len() }))
    }
}

fn sql_param(
    i: usize,
    ty: &tokio_postgres::types::Type,
    v: &serde_json::Value,
) -> Result<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> {
    use serde_json::Value;
    use tokio_postgres::types::Type;
    let field = format!("params[{i}]");
    let wrong = || {
        Error::invalid(
            field.clone(),
            IssueCode::InvalidType,
            format!("{v} is not a {ty} value"),
        )
    };
    let text = |v: &Value| -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    };
    let null = v.is_null();
    Ok(match *ty {
        Type::BOOL => Box::new(if null {
            None
        } else {
            Some(v.as_bool().ok_or_else(wrong)?)
        }),
        Type::INT2 => Box::new(if null {
            None
        } else {
            Some(i16::try_from(int_of(v).ok_or_else(wrong)?).map_err(|_| wrong())?)
        }),
        Type::INT4 => Box::new(if null {
            None
        } else {
            Some(i32::try_from(int_of(v).ok_or_else(wrong)?).map_err(|_| wrong())?)
        }),
        Type::INT8 => Box::new(if null { None } else { Some(int_of(v).ok_or_else(wrong)?) }),
        Type::FLOAT4 => Box::new(if null {
            None
        } else {
            // Beyond real's range it would be stored as infinity: refused, as PostgreSQL would.
            Some(
                v.as_f64()
                    .map(|f| f as f32)
                    .filter(|f| f.is_finite())
                    .ok_or_else(wrong)?,
            )
        }),
        Type::FLOAT8 => Box::new(if null {
            None
        } else {
            Some(v.as_f64().ok_or_else(wrong)?)
        }),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
            Box::new(if null { None } else { Some(text(v).ok_or_else(wrong)?) })
        }
        Type::UUID => Box::new(if null {
            None
        } else {
            Some(v.as_str().and_then(|s| Uuid::parse_str(s).ok()).ok_or_else(wrong)?)
        }),
        Type::JSON | Type::JSONB => Box::new(if null { None } else { Some(v.clone()) }),
        Type::TIMESTAMPTZ => Box::new(if null {
            None
        } else {
            Some(
                v.as_str()
                    .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                    .map(|t| t.with_timezone(&Utc))
                    .ok_or_else(wrong)?,
            )
        }),
        Type::TIMESTAMP => Box::new(if null {
            None
        } else {
            Some(
                v.as_str()
                    .and_then(|s| {
                        // An offset other than UTC is refused: PostgreSQL ignores it for this
                        // type, so the stored time would depend on who reads the string.
                        DateTime::parse_from_rfc3339(s)
                            .ok()
                            .filter(|t| t.offset().local_minus_utc() == 0)
                            .map(|t| t.naive_utc())
                            .or_else(|| s.parse::<chrono::NaiveDateTime>().ok())
                    })
                    .ok_or_else(wrong)?,
            )
        }),
        Type::DATE => Box::new(if null {
            None
        } else {
            Some(
                v.as_str()
                    .and_then(|s| {
                        // `YYYY-MM-DD`, or a timestamp at midnight UTC (a JavaScript `Date` made
                        // for a day); another time of day names no one day.
                        s.parse::<chrono::NaiveDate>().ok().or_else(|| {
                            DateTime::parse_from_rfc3339(s)
                                .ok()
                                .map(|t| t.naive_utc())
                                .filter(|t| t.time() == chrono::NaiveTime::MIN)
                                .map(|t| t.date())
                        })
                    })
                    .ok_or_else(wrong)?,
            )
        }),
        Type::BOOL_ARRAY => Box::new(array(v, |e| e.as_bool()).ok_or_else(wrong)?),
        Type::INT2_ARRAY => Box::new(array(v, |e| int_of(e).and_then(|n| i16::try_from(n).ok())).ok_or_else(wrong)?),
        Type::INT4_ARRAY => Box::new(array(v, |e| int_of(e).and_then(|n| i32::try_from(n).ok())).ok_or_else(wrong)?),
        Type::INT8_ARRAY => Box::new(array(v, int_of).ok_or_else(wrong)?),
        Type::FLOAT8_ARRAY => Box::new(array(v, |e| e.as_f64()).ok_or_else(wrong)?),
        Type::TEXT_ARRAY | Type::VARCHAR_ARRAY => Box::new(array(v, text).ok_or_else(wrong)?),
        Type::UUID_ARRAY => Box::new(array(v, |e| e.as_str().and_then(|s| Uuid::parse_str(s).ok())).ok_or_else(wrong)?),
        Type::JSONB_ARRAY | Type::JSON_ARRAY => Box::new(array(v, |e| Some(e.clone())).ok_or_else(wrong)?),
        _ => {
            return Err(Error::invalid(
                field,
                IssueCode::InvalidType,
                format!(
                    "parameters of type {ty} are not converted; cast in the SQL, e.g. ${}::text::{ty}",
                    i + 1
                ),
            ))
        }
    })
}

/// A JSON array (or null) as a PostgreSQL array, each element converted by `f` (`null` elements
/// stay NULL); `None` when it is not an array or an element does not convert.
#[allow(clippy::type_complexity)]
fn array<T>(v: &serde_json::Value, f: impl Fn(&serde_json::Value) -> Option<T>) -> Option<Option<Vec<Option<T>>>> {
    match v {
        serde_json::Value::Null => Some(None),
        serde_json::Value::Array(items) => items
            .iter()
            .map(|e| if e.is_null() { Some(None) } else { f(e).map(Some) })
            .collect::<Option<Vec<_>>>()
            .map(Some),
        _ => None,
    }
}

/// A PostgreSQL array as a JSON array (NULL elements as `null`).
fn list<T>(items: Option<Vec<Option<T>>>, f: impl Fn(T) -> serde_json::Value) -> Option<serde_json::Value> {
    items.map(|items| {
        serde_json::Value::Array(
            items
                .into_iter()
                .map(|e| e.map_or(serde_json::Value::Null, &f))
                .collect(),
        )
    })
}

/// The largest integer a JavaScript number holds exactly.
const MAX_SAFE_INTEGER: u64 = 9_007_199_254_740_991;

/// A whole number from a JSON number (at most 2^53 - 1 either way) or a string of digits.
fn int_of(v: &serde_json::Value) -> Option<i64> {
    match v {
        // A number beyond 2^53 - 1 may not be the one the caller wrote (JavaScript's `2 ** 62`
        // prints as 4611686018427388000): such integers come as strings.
        serde_json::Value::Number(n) => n.as_i64().filter(|i| i.unsigned_abs() <= MAX_SAFE_INTEGER).or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() <= MAX_SAFE_INTEGER as f64)
                .map(|f| f as i64)
        }),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn sql_value(row: &tokio_postgres::Row, i: usize, ty: &tokio_postgres::types::Type) -> Result<serde_json::Value> {
    use serde_json::Value;
    use tokio_postgres::types::Type;
    let name = row.columns()[i].name();
    // A value that does not convert (an infinite date, an array of several dimensions, a
    // number jsonb holds beyond f64) is the column's problem, not the connection's.
    let refused = |why: String| {
        Error::invalid(
            format!("columns[{i}]"),
            IssueCode::InvalidType,
            format!("column \"{name}\" of type {ty}: {why}; cast it in the SQL, e.g. {name}::text"),
        )
    };
    macro_rules! get {
        ($t:ty) => {
            row.try_get::<_, $t>(i).map_err(|e| refused(format!("{e}")))?
        };
    }
    // NaN and the infinities have no JSON form (they would read as null, like SQL NULL).
    let finite = |f: f64| {
        if f.is_finite() {
            Ok(Value::from(f))
        } else {
            Err(refused(format!("{f} has no JSON form")))
        }
    };
    let v = match *ty {
        Type::BOOL => get!(Option<bool>).map(Value::from),
        Type::INT2 => get!(Option<i16>).map(Value::from),
        Type::INT4 => get!(Option<i32>).map(Value::from),
        Type::INT8 => get!(Option<i64>).map(|n| Value::from(n.to_string())),
        // The shortest decimal that reads back as the same real (0.1, not 0.10000000149011612).
        Type::FLOAT4 => get!(Option<f32>)
            .map(|f| finite(f.to_string().parse::<f64>().unwrap_or(f64::NAN)))
            .transpose()?,
        Type::FLOAT8 => get!(Option<f64>).map(finite).transpose()?,
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => get!(Option<String>).map(Value::from),
        Type::UUID => get!(Option<Uuid>).map(|u| Value::from(u.to_string())),
        Type::JSON | Type::JSONB => get!(Option<Value>),
        // Milliseconds as JavaScript writes them, microseconds when the value has them.
        Type::TIMESTAMPTZ => get!(Option<DateTime<Utc>>).map(|t| {
            Value::from(if t.timestamp_subsec_micros() % 1000 == 0 {
                crate::fold::format_timestamp(&t)
            } else {
                t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
            })
        }),
        Type::TIMESTAMP => {
            get!(Option<chrono::NaiveDateTime>).map(|t| Value::from(t.format("%Y-%m-%dT%H:%M:%S%.f").to_string()))
        }
        Type::DATE => get!(Option<chrono::NaiveDate>).map(|d| Value::from(d.to_string())),
        Type::BOOL_ARRAY => list(get!(Option<Vec<Option<bool>>>), Value::from),
        Type::INT2_ARRAY => list(get!(Option<Vec<Option<i16>>>), Value::from),
        Type::INT4_ARRAY => list(get!(Option<Vec<Option<i32>>>), Value::from),
        Type::INT8_ARRAY => list(get!(Option<Vec<Option<i64>>>), |n| Value::from(n.to_string())),
        Type::FLOAT8_ARRAY => {
            let items = get!(Option<Vec<Option<f64>>>);
            if let Some(f) = items.iter().flatten().flatten().find(|f| !f.is_finite()) {
                return Err(refused(format!("{f} has no JSON form")));
            }
            list(items, Value::from)
        }
        Type::TEXT_ARRAY | Type::VARCHAR_ARRAY => list(get!(Option<Vec<Option<String>>>), Value::from),
        Type::UUID_ARRAY => list(get!(Option<Vec<Option<Uuid>>>), |u| Value::from(u.to_string())),
        Type::JSON_ARRAY | Type::JSONB_ARRAY => list(get!(Option<Vec<Option<Value>>>), |v| v),
        _ => {
            return Err(Error::invalid(
                format!("columns[{i}]"),
                IssueCode::InvalidType,
                format!(
                    "column \"{}\" of type {ty} is not converted; cast it in the SQL, e.g. {}::text",
                    row.columns()[i].name(),
                    row.columns()[i].name()
                ),
            ))
        }
    };
    Ok(v.unwrap_or(Value::Null))
}
