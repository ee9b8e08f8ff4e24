//! The legacy rows as the copy reads them: the table's expected columns, a row's aggregate and
//! writer lane, and the check that turns a row into an event or a recorded failure.
//!
//! Owns [`LegacyRow`], [`check_row`] and the filters of rows still to copy. Calls nothing of the
//! database but the column check ([`check_legacy_table`]).

use super::*;

/// One legacy row as read by the migration (everything but `data`, which stays on the server).
pub(super) struct LegacyRow {
    pub(super) id: Uuid,
    /// `None` when NULL or out of range (see `timestamp_out_of_range`).
    pub(super) timestamp: Option<DateTime<Utc>>,
    /// The row's timestamp is `infinity`, `-infinity` or past the latest time the store holds
    /// ([`readable_timestamp`]).
    pub(super) timestamp_out_of_range: bool,
    pub(super) user_id: Option<String>,
    pub(super) event_type: Option<String>,
    pub(super) entity_id: Option<String>,
    pub(super) data: Option<RawJsonb>,
    pub(super) source: Option<String>,
    pub(super) correlation_id: Option<Uuid>,
}

/// The aggregate of a row: `data.entityId` when that is a UUID, else the row's own id.
pub(super) fn aggregate_of(row: &LegacyRow) -> Uuid {
    row.entity_id
        .as_deref()
        .and_then(|s| Uuid::try_parse(s).ok())
        .unwrap_or(row.id)
}

/// The writer (of `lanes`) of a row's aggregate, the one [`check_row`] gives it when the row
/// is valid: all rows of an aggregate go through one writer, in order.
pub(super) fn writer_of(row: &LegacyRow, lanes: usize) -> usize {
    if lanes == 1 {
        return 0;
    }
    // A fixed mix of all 128 bits: ids with structure in some bits still spread.
    let n = aggregate_of(row).as_u128();
    let mixed = ((n >> 64) as u64 ^ n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((mixed >> 32) % lanes as u64) as usize
}

/// A row that passed the static checks.
pub(super) struct Candidate {
    pub(super) aggregate_id: Uuid,
    pub(super) aggregate_type: AggregateType,
}

pub(super) const LEGACY_COLUMNS: [(&str, &[&str]); 7] = [
    ("id", &["uuid"]),
    ("user_id", &["text", "character varying"]),
    ("timestamp", &["timestamp with time zone"]),
    ("type", &["text", "character varying"]),
    ("data", &["jsonb"]),
    ("source", &["text", "character varying"]),
    ("correlation_id", &["uuid"]),
];

/// Fails with [`Error::LegacyTableNotFound`] or, for missing or mistyped columns,
/// [`Error::InvalidConfig`].
pub(super) async fn check_legacy_table<C: GenericClient>(client: &C, name: &str) -> Result<()> {
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
        .await?
        .get(0);
    if !exists {
        return Err(Error::LegacyTableNotFound { table: name.to_owned() });
    }
    // The type without its modifier (`varchar(255)` and `timestamptz(3)` are what they modify;
    // `uuid[]` is not `uuid`).
    let rows = client
        .query(
            "SELECT attname::text, format_type(atttypid, NULL) FROM pg_attribute \
             WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
            &[&name],
        )
        .await?;
    let columns: HashMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    for (column, types) in LEGACY_COLUMNS {
        match columns.get(column) {
            None => {
                return Err(Error::InvalidConfig {
                    message: format!("legacy table \"{name}\" has no column {column}"),
                })
            }
            Some(t) if !types.contains(&t.as_str()) => {
                return Err(Error::InvalidConfig {
                    message: format!("legacy table \"{name}\": column {column} is {t}, expected {}", types[0]),
                })
            }
            Some(_) => {}
        }
    }
    // Each row is known by its id (the map's and the failures' key): a table whose constraints
    // let ids be missing or repeated is checked row by row.
    let legacy = quote_table(name)?;
    let guarded = client
        .query_one(
            "SELECT a.attnotnull,
                    EXISTS (SELECT 1 FROM pg_index i
                             WHERE i.indrelid = a.attrelid AND i.indisunique AND i.indpred IS NULL
                               AND i.indkey::int2[] = ARRAY[a.attnum])
               FROM pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attname = 'id'",
            &[&name],
        )
        .await?;
    let (not_null, unique): (bool, bool) = (guarded.get(0), guarded.get(1));
    if !not_null {
        let missing: i64 = client
            .query_one(&format!("SELECT count(*) FROM {legacy} WHERE id IS NULL"), &[])
            .await?
            .get(0);
        if missing > 0 {
            return Err(Error::InvalidConfig {
                message: format!(
                    "legacy table \"{name}\": {missing} row(s) have no id; the migration knows each row by its \
                     id, so give them one or delete them"
                ),
            });
        }
    }
    if !unique {
        let repeated: Vec<Uuid> = client
            .query(
                &format!(
                    "SELECT id FROM {legacy} WHERE id IS NOT NULL GROUP BY id HAVING count(*) > 1 ORDER BY id LIMIT 3"
                ),
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !repeated.is_empty() {
            let ids: Vec<String> = repeated.iter().map(Uuid::to_string).collect();
            return Err(Error::InvalidConfig {
                message: format!(
                    "legacy table \"{name}\": ids are repeated ({}); the migration knows each row by its id, so \
                     make them unique",
                    ids.join(", ")
                ),
            });
        }
    }
    Ok(())
}

/// A row older than its aggregate's newest event: appending it would number it after events that
/// happened later.
pub(super) fn out_of_order(row: &LegacyRow, aggregate: Uuid, newest: DateTime<Utc>) -> LegacyRowFailure {
    failure(
        row,
        "OUT_OF_ORDER",
        format!(
            "aggregate {aggregate} already has an event at {} after this row's time {}: appended, it would \
             put versions out of time order",
            newest.to_rfc3339(),
            row.timestamp.map_or("-".into(), |t| t.to_rfc3339())
        ),
    )
}

pub(super) fn failure(row: &LegacyRow, code: &str, reason: impl Into<String>) -> LegacyRowFailure {
    LegacyRowFailure {
        legacy_id: row.id,
        reason_code: code.to_owned(),
        reason: reason.into(),
    }
}

/// The checks that need nothing but the row itself.
pub(super) fn check_row(row: &LegacyRow, limits: &Limits) -> std::result::Result<Candidate, LegacyRowFailure> {
    let issue = |i: validate::Issue| failure(row, i.code.as_str(), i.message);
    if row.timestamp_out_of_range {
        return Err(failure(
            row,
            "INVALID_TIMESTAMP",
            "timestamp is infinite or past 262142-12-31T23:59:59.999998Z, so it could not be read back",
        ));
    }
    if row.timestamp.is_none() {
        return Err(failure(row, "REQUIRED", "timestamp is null"));
    }
    let Some(event_type) = &row.event_type else {
        return Err(failure(row, "REQUIRED", "type is null"));
    };
    validate::check_event_type(event_type, limits).map_err(issue)?;
    let Some(user_id) = &row.user_id else {
        return Err(failure(row, "REQUIRED", "user_id is null"));
    };
    validate::check_user_id(user_id, limits).map_err(issue)?;
    let Some(data) = &row.data else {
        return Err(failure(row, "REQUIRED", "data is null"));
    };
    match data.kind() {
        "object" => {}
        kind => {
            return Err(failure(
                row,
                "INVALID_DATA",
                format!("data must be a JSON object, not {kind}"),
            ))
        }
    }
    if crate::numbers::text_depth(&data.0) > validate::MAX_JSON_DEPTH {
        return Err(failure(
            row,
            "TOO_DEEP",
            format!(
                "data nests arrays and objects deeper than {} levels, which no reader could parse back",
                validate::MAX_JSON_DEPTH
            ),
        ));
    }
    if !crate::numbers::all_number_tokens(&data.0, crate::numbers::number_text_is_carried) {
        return Err(failure(
            row,
            "INEXACT_NUMBER",
            "data holds a number that a JavaScript number cannot hold exactly (beyond 2^53 or a double's \
             range, or more digits than a double keeps), so it would read back changed",
        ));
    }
    let bytes = data.0.len();
    if bytes > limits.max_data_bytes {
        return Err(failure(
            row,
            "TOO_LARGE",
            format!("data is {bytes} bytes as JSON; the limit is {}", limits.max_data_bytes),
        ));
    }
    if row.source.as_deref().is_some_and(|s| s.contains('\0')) {
        return Err(failure(row, "NUL_CHARACTER", "source contains U+0000"));
    }
    let aggregate_id = aggregate_of(row);
    Ok(Candidate {
        aggregate_id,
        aggregate_type: infer_aggregate_type(event_type),
    })
}

pub(super) const PENDING_FILTER: &str =
    "NOT EXISTS (SELECT 1 FROM legacy_migration_map m WHERE m.legacy_table = $1 AND m.legacy_id = l.id)
   AND NOT EXISTS (SELECT 1 FROM legacy_migration_failures f WHERE f.legacy_table = $1 AND f.legacy_id = l.id)";

/// SQL that is true when `{alias}."timestamp"` is neither NULL, `infinity` nor `-infinity`, and
/// before the store's end of time (`validate::end_of_time`; the earliest timestamp PostgreSQL
/// stores is readable).
pub(super) fn readable_timestamp(alias: &str) -> String {
    use chrono::{Datelike, Timelike};
    let end = crate::validate::end_of_time();
    format!(
        "isfinite({alias}.\"timestamp\") AND {alias}.\"timestamp\" < '{}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}+00'",
        end.year(),
        end.month(),
        end.day(),
        end.hour(),
        end.minute(),
        end.second(),
        end.timestamp_subsec_micros()
    )
}
