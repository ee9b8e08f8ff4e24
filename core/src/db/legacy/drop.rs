//! The guarded drop of the legacy table: verified under a lock that stops the copy and
//! dual-writers, then dropped, with the failed rows the caller accepts as lost.
//!
//! Owns: [`DropLegacyReport`], [`EventRepository::verify_legacy`] and
//! [`EventRepository::drop_legacy_table`]. Calls: [`super::verify::verify_on`] and the copy's
//! locks.

use serde::Serialize;

use super::verify::{verify_on, VerifyReport};
use super::*;

/// What [`EventRepository::drop_legacy_table`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DropLegacyReport {
    /// The verify run under the lock, just before the drop.
    pub verify: VerifyReport,
    /// The failed rows this call accepted as lost (at most [`MAX_LISTED`]).
    pub accepted_lost: Vec<LegacyRowFailure>,
    /// How many it accepted.
    pub accepted_lost_count: i64,
    /// Whether the table was dropped.
    pub dropped: bool,
}

impl EventRepository {
    /// Compares the legacy table with events_v2: every legacy row must have an event (through
    /// `legacy_migration_map`) with the same type, timestamp, user, data and correlation id;
    /// counts per (user, type) and a checksum over both sides must agree; no row may have
    /// failed. Read-only, in one snapshot.
    ///
    /// Fails with [`Error::LegacyTableNotFound`] or [`Error::InvalidConfig`] for a bad table.
    pub async fn verify_legacy(&self, legacy_table: &str) -> Result<VerifyReport> {
        self.refuse_scoped("verify_legacy")?;
        self.refuse_pooled("verify_legacy")?;
        quote_table(legacy_table)?;
        let mut client = self.object().await?;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let report = verify_on(&*tx, legacy_table).await?;
        tx.rollback().await?;
        Ok(report)
    }

    /// Drops the legacy table after verifying, in one transaction that blocks writes to it, that
    /// events_v2 holds all of it. A legacy row that could not be migrated blocks the drop until
    /// it is accepted as lost: `accept_lost` accepts every such row (they are listed in the
    /// report and keep their record in `legacy_migration_failures`). Turn dual-write off first:
    /// appends that still write to the table fail once it is gone. The map and failure tables
    /// are kept, for the record.
    ///
    /// Fails with [`Error::ConfirmationRequired`] unless `confirm`, with [`Error::VerifyFailed`]
    /// when verify finds any difference or an unaccepted failed row (nothing is dropped or
    /// accepted then), and like [`EventRepository::verify_legacy`].
    pub async fn drop_legacy_table(
        &self,
        legacy_table: &str,
        confirm: bool,
        accept_lost: bool,
    ) -> Result<DropLegacyReport> {
        self.refuse_scoped("drop_legacy_table")?;
        self.refuse_pooled("drop_legacy_table")?;
        let legacy = quote_table(legacy_table)?;
        if !confirm {
            return Err(Error::ConfirmationRequired {
                action: format!("dropping the legacy table \"{legacy_table}\""),
            });
        }
        let mut client = self.object().await?;
        let tx = client.transaction().await?;
        let key = table_key(&*tx, legacy_table).await?;
        // Readers go on; writers wait, so nothing lands between the verify and the drop.
        tx.batch_execute(&format!("LOCK TABLE {legacy} IN EXCLUSIVE MODE"))
            .await?;
        let mut accepted = Vec::new();
        if accept_lost {
            accepted = tx
                .query(
                    &format!(
                        "UPDATE legacy_migration_failures f SET accepted_at = now()
                           FROM {legacy} l
                          WHERE f.legacy_table = $1 AND f.legacy_id = l.id AND f.accepted_at IS NULL
                         RETURNING f.legacy_id, f.reason_code, f.reason"
                    ),
                    &[&key],
                )
                .await?;
        }
        let verify = verify_on(&*tx, legacy_table).await?;
        if !verify.ok {
            tx.rollback().await?;
            return Err(Error::VerifyFailed {
                table: legacy_table.to_owned(),
                summary: verify.summary(),
            });
        }
        tx.batch_execute(&format!("DROP TABLE {legacy}")).await?;
        tx.commit().await?;
        Ok(DropLegacyReport {
            verify,
            accepted_lost_count: accepted.len() as i64,
            accepted_lost: accepted
                .iter()
                .take(MAX_LISTED)
                .map(|r| LegacyRowFailure {
                    legacy_id: r.get(0),
                    reason_code: r.get(1),
                    reason: r.get(2),
                })
                .collect(),
            dropped: true,
        })
    }
}
