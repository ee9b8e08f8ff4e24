//! Verifying the switch-over: every legacy row has its event, counts per (user, type) and a
//! checksum over both sides agree, no row failed ([`VerifyReport`]). Read-only, in one snapshot.
//!
//! Owns: [`verify_on`] and its report. Calls: nothing of the copy; [`super::drop`] runs it under
//! its lock.

use serde::Serialize;
use tokio_postgres::GenericClient;

use super::*;

/// Legacy rows whose (user, type) counts differ between the two tables.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CountDifference {
    /// The user (`None` for legacy rows without one).
    pub user_id: Option<String>,
    /// The event type (`None` for legacy rows without one).
    pub event_type: Option<String>,
    /// Rows in the legacy table (failed rows excluded).
    pub legacy: i64,
    /// Their events in events_v2.
    pub events_v2: i64,
}

/// A legacy row whose event differs from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Mismatch {
    /// The legacy row.
    pub legacy_id: Uuid,
    /// Its event in events_v2.
    pub event_id: Uuid,
    /// What differs: `missing_event` (the event is gone from events_v2), `type`, `timestamp`,
    /// `data`, `user_id`, `correlation_id`.
    pub fields: Vec<String>,
}

/// What [`EventRepository::verify_legacy`] found. Lists hold at most [`MAX_LISTED`] entries;
/// the `*_count` fields count all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyReport {
    /// The legacy table.
    pub legacy_table: String,
    /// True when every legacy row has an identical event and no row failed.
    pub ok: bool,
    /// Rows in the legacy table.
    pub legacy_rows: i64,
    /// Legacy rows copied by the migration.
    pub migrated_rows: i64,
    /// Legacy rows written by dual-write (same id in both tables).
    pub dual_written_rows: i64,
    /// Legacy rows recorded as failed (that still exist), not accepted as lost.
    pub failed_count: i64,
    /// Legacy rows recorded as failed and accepted as lost (`drop_legacy_table` with
    /// `accept_lost`).
    pub accepted_lost_count: i64,
    /// Some of them, with why.
    pub failed: Vec<LegacyRowFailure>,
    /// Legacy rows neither migrated nor failed.
    pub missing_count: i64,
    /// Some of their ids.
    pub missing: Vec<Uuid>,
    /// Legacy rows whose event differs or is gone.
    pub mismatched_count: i64,
    /// Some of them.
    pub mismatched: Vec<Mismatch>,
    /// (user, type) pairs whose counts differ.
    pub count_differences_count: i64,
    /// Some of them.
    pub count_differences: Vec<CountDifference>,
    /// `count:sum` of a hash of (legacy id, type, timestamp, user, data) over the legacy rows
    /// (failed rows excluded).
    pub legacy_checksum: String,
    /// The same over their events in events_v2, keyed by the legacy id.
    pub events_checksum: String,
}

impl VerifyReport {
    /// One line saying what differs.
    pub fn summary(&self) -> String {
        if self.ok {
            return format!("{} legacy rows, all in events_v2", self.legacy_rows);
        }
        format!(
            "{} missing, {} mismatched, {} failed (accept them as lost with drop-legacy --accept-lost), \
             {} (user, type) count differences, checksums {}",
            self.missing_count,
            self.mismatched_count,
            self.failed_count,
            self.count_differences_count,
            if self.legacy_checksum == self.events_checksum {
                "equal"
            } else {
                "differ"
            }
        )
    }
}

/// Comparison of the legacy table and events_v2; runs on `client`, so a caller can hold locks.
pub(super) async fn verify_on<C: GenericClient>(client: &C, name: &str) -> Result<VerifyReport> {
    let legacy = quote_table(name)?;
    check_legacy_table(client, name).await?;
    let key = table_key(client, name).await?;
    let table = key.as_str();
    // Whole-table hash joins and aggregates: give them memory rather than spill files. No nested
    // loops: right after a migration the map and the new chunks have no statistics yet, and a
    // nested loop over events_v2 (no index on id alone) ran over nine minutes for 1,000,000 rows
    // on TimescaleDB, where the hash joins take seconds.
    client
        .batch_execute("SET LOCAL work_mem = '256MB'; SET LOCAL enable_nestloop = off")
        .await?;
    let limit = MAX_LISTED as i64;
    let totals = client
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM {legacy}),
                        (SELECT count(*) FROM legacy_migration_failures f JOIN {legacy} l ON l.id = f.legacy_id
                          WHERE f.legacy_table = $1 AND f.accepted_at IS NOT NULL),
                        (SELECT count(*) FROM legacy_migration_map m JOIN {legacy} l ON l.id = m.legacy_id
                          WHERE m.legacy_table = $1 AND m.origin = 'migration'),
                        (SELECT count(*) FROM legacy_migration_map m JOIN {legacy} l ON l.id = m.legacy_id
                          WHERE m.legacy_table = $1 AND m.origin = 'dual_write')"
            ),
            &[&table],
        )
        .await?;
    let failed_rows = client
        .query(
            &format!(
                "SELECT f.legacy_id, f.reason_code, f.reason, count(*) OVER ()
                   FROM legacy_migration_failures f JOIN {legacy} l ON l.id = f.legacy_id
                  WHERE f.legacy_table = $1 AND f.accepted_at IS NULL ORDER BY f.legacy_id LIMIT $2"
            ),
            &[&table, &limit],
        )
        .await?;
    let missing_rows = client
        .query(
            &format!("SELECT l.id, count(*) OVER () FROM {legacy} l WHERE {PENDING_FILTER} ORDER BY l.id LIMIT $2"),
            &[&table, &limit],
        )
        .await?;
    let mismatch_rows = client
        .query(
            &format!(
                "SELECT m.legacy_id, m.event_id, e.id IS NULL,
                        e.event_type IS DISTINCT FROM l.type, e.\"timestamp\" IS DISTINCT FROM l.\"timestamp\",
                        e.data IS DISTINCT FROM l.data, e.user_id IS DISTINCT FROM l.user_id,
                        e.correlation_id IS DISTINCT FROM l.correlation_id, count(*) OVER ()
                   FROM {legacy} l
                   JOIN legacy_migration_map m ON m.legacy_table = $1 AND m.legacy_id = l.id
                   LEFT JOIN events_v2 e ON e.id = m.event_id
                  WHERE e.id IS NULL OR e.event_type IS DISTINCT FROM l.type
                     OR e.\"timestamp\" IS DISTINCT FROM l.\"timestamp\" OR e.data IS DISTINCT FROM l.data
                     OR e.user_id IS DISTINCT FROM l.user_id OR e.correlation_id IS DISTINCT FROM l.correlation_id
                  ORDER BY m.legacy_id LIMIT $2"
            ),
            &[&table, &limit],
        )
        .await?;
    let count_rows = client
        .query(
            &format!(
                "WITH lc AS (
                     SELECT l.user_id::text AS user_id, l.type::text AS event_type, count(*) AS n FROM {legacy} l
                      WHERE NOT EXISTS (SELECT 1 FROM legacy_migration_failures f
                                         WHERE f.legacy_table = $1 AND f.legacy_id = l.id)
                      GROUP BY 1, 2
                 ), ec AS (
                     SELECT e.user_id, e.event_type, count(*) AS n
                       FROM legacy_migration_map m JOIN events_v2 e ON e.id = m.event_id
                      WHERE m.legacy_table = $1 GROUP BY 1, 2
                 )
                 SELECT coalesce(lc.user_id, ec.user_id), coalesce(lc.event_type, ec.event_type),
                        coalesce(lc.n, 0), coalesce(ec.n, 0), count(*) OVER ()
                   FROM lc FULL JOIN ec ON lc.user_id = ec.user_id AND lc.event_type = ec.event_type
                  WHERE coalesce(lc.n, 0) <> coalesce(ec.n, 0)
                  ORDER BY 1, 2 LIMIT $2"
            ),
            &[&table, &limit],
        )
        .await?;
    let row_hash = |alias: &str, id: &str, ty: &str| {
        format!(
            "hashtextextended({id}::text || '|' || {alias}.{ty} || '|' || \
             to_char({alias}.\"timestamp\" AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US') || '|' || \
             {alias}.user_id || '|' || {alias}.data::text, 0)::numeric"
        )
    };
    let checksums = client
        .query_one(
            &format!(
                "SELECT (SELECT count(*) || ':' || coalesce(sum({lh}), 0) FROM {legacy} l
                          WHERE NOT EXISTS (SELECT 1 FROM legacy_migration_failures f
                                             WHERE f.legacy_table = $1 AND f.legacy_id = l.id)),
                        (SELECT count(*) || ':' || coalesce(sum({eh}), 0)
                           FROM legacy_migration_map m JOIN events_v2 e ON e.id = m.event_id
                          WHERE m.legacy_table = $1)",
                lh = row_hash("l", "l.id", "type"),
                eh = row_hash("e", "m.legacy_id", "event_type"),
            ),
            &[&table],
        )
        .await?;
    let count_of = |rows: &[tokio_postgres::Row], col: usize| rows.first().map_or(0, |r| r.get::<_, i64>(col));
    let mut report = VerifyReport {
        legacy_table: table.to_owned(),
        ok: false,
        legacy_rows: totals.get(0),
        accepted_lost_count: totals.get(1),
        migrated_rows: totals.get(2),
        dual_written_rows: totals.get(3),
        failed_count: count_of(&failed_rows, 3),
        failed: failed_rows
            .iter()
            .map(|r| LegacyRowFailure {
                legacy_id: r.get(0),
                reason_code: r.get(1),
                reason: r.get(2),
            })
            .collect(),
        missing_count: count_of(&missing_rows, 1),
        missing: missing_rows.iter().map(|r| r.get(0)).collect(),
        mismatched_count: count_of(&mismatch_rows, 8),
        mismatched: mismatch_rows
            .iter()
            .map(|r| {
                let names = [
                    "missing_event",
                    "type",
                    "timestamp",
                    "data",
                    "user_id",
                    "correlation_id",
                ];
                let fields = names
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| r.get::<_, Option<bool>>(i + 2).unwrap_or(false))
                    .map(|(_, n)| (*n).to_owned())
                    .collect();
                Mismatch {
                    legacy_id: r.get(0),
                    event_id: r.get(1),
                    fields,
                }
            })
            .collect(),
        count_differences_count: count_of(&count_rows, 4),
        count_differences: count_rows
            .iter()
            .map(|r| CountDifference {
                user_id: r.get(0),
                event_type: r.get(1),
                legacy: r.get(2),
                events_v2: r.get(3),
            })
            .collect(),
        legacy_checksum: checksums.get(0),
        events_checksum: checksums.get(1),
    };
    report.ok = report.failed_count == 0
        && report.missing_count == 0
        && report.mismatched_count == 0
        && report.count_differences_count == 0
        && report.legacy_checksum == report.events_checksum;
    Ok(report)
}
