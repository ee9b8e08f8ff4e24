//! Named consumers: their stored checkpoints, the list of them, the repair or acceptance of a
//! checkpoint stored by the old feed order, and the feed's rebase after a restore.
//!
//! Owns `event_consumers`' statements. Calls the feed's [`plan`] for the horizon.

use super::*;

/// A named consumer, as [`EventRepository::consumers`] lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerStatus {
    /// Its name.
    pub name: String,
    /// Its stored checkpoint.
    #[serde(serialize_with = "checkpoint_json")]
    pub checkpoint: Checkpoint,
    /// When it was stored.
    pub updated_at: DateTime<Utc>,
    /// Stored by the old feed ordering, not yet repaired or accepted.
    pub needs_repair: bool,
}

/// What [`EventRepository::repair_consumer`] did, or would do in a dry run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerRepair {
    /// The consumer.
    pub consumer: String,
    /// Whether its checkpoint was stored by the old ordering.
    pub needed_repair: bool,
    /// Its checkpoint before.
    #[serde(serialize_with = "checkpoint_json")]
    pub before: Checkpoint,
    /// Its checkpoint after (the start, when its events are delivered again).
    #[serde(serialize_with = "checkpoint_json")]
    pub after: Checkpoint,
    /// Events at or before the old checkpoint that it will be given again.
    pub events_delivered_again: i64,
    /// Whether nothing was changed.
    pub dry_run: bool,
}

/// What [`EventRepository::rebase_feed`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FeedRebase {
    /// Whether the stored ids were another cluster's.
    pub needed: bool,
    /// Events whose `txid` was renumbered.
    pub events_renumbered: i64,
    /// Transaction ids consumed first, so that the renumbered ones lie in this cluster's past.
    pub transaction_ids_consumed: u64,
}

/// A checkpoint as JSON: `{ "txid": "<64-bit number>", "position": n, "store": "<64-bit number>" }`
/// (the 64-bit numbers as text: JavaScript numbers cannot hold them).
pub(super) fn checkpoint_json<S: serde::Serializer>(c: &Checkpoint, s: S) -> std::result::Result<S::Ok, S::Error> {
    use serde::ser::SerializeStruct;
    let mut st = s.serialize_struct("Checkpoint", 3)?;
    st.serialize_field("txid", &c.txid.to_string())?;
    st.serialize_field("position", &c.position)?;
    st.serialize_field("store", &c.store.to_string())?;
    st.end()
}

impl EventRepository {
    /// The stored checkpoint of a named consumer, if it has one.
    ///
    /// Fails with [`Error::ConsumerNeedsRepair`] when the checkpoint was stored by the old feed
    /// ordering and the consumer was neither repaired nor accepted since
    /// ([`EventRepository::repair_consumer`]).
    pub async fn consumer_checkpoint(&self, consumer: &str) -> Result<Option<Checkpoint>> {
        self.refuse_scoped("consumer_checkpoint")?;
        check_consumer(consumer)?;
        in_session!(self, |client| {
            let row = client
                .query_opt(
                    "SELECT txid::text, position, needs_repair, synap_feed_identity() FROM event_consumers WHERE name = $1",
                    &[&consumer],
                )
                .await?;
            match row {
                Some(r) if r.get::<_, bool>(2) => Err(Error::ConsumerNeedsRepair {
                    consumer: consumer.to_owned(),
                }),
                Some(r) => Ok(Some(parse_checkpoint(r.get(0), r.get(1), r.get(3))?)),
                None => Ok(None),
            }
        })
    }

    /// Stores a named consumer's checkpoint. A checkpoint only moves forward.
    ///
    /// Fails with [`Error::CheckpointConflict`] when the stored checkpoint is already past this
    /// one (another instance of the consumer has read further); nothing is stored then.
    pub async fn save_consumer_checkpoint(&self, consumer: &str, checkpoint: &Checkpoint) -> Result<()> {
        self.refuse_scoped("save_consumer_checkpoint")?;
        check_consumer(consumer)?;
        in_session!(self, |client| {
            let saved = client
                .query_opt(
                    "INSERT INTO event_consumers (name, txid, position) \
                     SELECT $1, $2::text::xid8, $3 WHERE $4 IN (0, synap_feed_identity()) \
                     ON CONFLICT (name) DO UPDATE SET txid = EXCLUDED.txid, position = EXCLUDED.position, \
                            updated_at = now() \
                      WHERE (event_consumers.txid, event_consumers.position) <= (EXCLUDED.txid, EXCLUDED.position) \
                        AND NOT event_consumers.needs_repair \
                     RETURNING true",
                    &[
                        &consumer,
                        &checkpoint.txid.to_string(),
                        &checkpoint.position,
                        &checkpoint.store,
                    ],
                )
                .await?;
            if saved.is_some() {
                return Ok(());
            }
            let identity: i64 = client.query_one("SELECT synap_feed_identity()", &[]).await?.get(0);
            if checkpoint.store != 0 && checkpoint.store != identity {
                return Err(Error::CheckpointFromAnotherStore);
            }
            let stored = client
                .query_one(
                    "SELECT txid::text, position, needs_repair FROM event_consumers WHERE name = $1",
                    &[&consumer],
                )
                .await?;
            if stored.get::<_, bool>(2) {
                return Err(Error::ConsumerNeedsRepair {
                    consumer: consumer.to_owned(),
                });
            }
            Err(Error::CheckpointConflict {
                consumer: consumer.to_owned(),
                stored: format!("{}:{}", stored.get::<_, String>(0), stored.get::<_, i64>(1)),
                given: format!("{}:{}", checkpoint.txid, checkpoint.position),
            })
        })
    }

    /// Renumbers the stored transaction ids of the global feed after this store was restored
    /// from a dump (or copied by logical replication) into another cluster, whose transaction
    /// ids are unrelated: the stored ids become this cluster's past, in the same order, and named
    /// consumers' checkpoints move with them. Checkpoints taken before are refused afterwards
    /// ([`Error::CheckpointFromAnotherStore`]). A no-op (`needed: false`) when the store is on
    /// the cluster it records. Rewrites `txid` in every row of `events_v2`, holding back writes
    /// while it runs.
    pub async fn rebase_feed(&self) -> Result<FeedRebase> {
        self.refuse_scoped("rebase_feed")?;
        let mut client = self.client().await?;
        let row = client
            .query_one(
                "SELECT synap_feed_is_current(), (SELECT count(DISTINCT txid) FROM events_v2),
                        pg_current_xact_id()::text::bigint",
                &[],
            )
            .await?;
        if row.get::<_, bool>(0) {
            return Ok(FeedRebase {
                needed: false,
                events_renumbered: 0,
                transaction_ids_consumed: 0,
            });
        }
        let (distinct, next): (i64, i64) = (row.get(1), row.get(2));
        // The renumbered ids (1..=distinct) must lie below every id this cluster hands out from
        // now on: consume ids (one per written subtransaction) until they do.
        let consume = (distinct + 100 - next).max(0);
        if consume > 0 {
            client
                .batch_execute(&format!(
                    "CREATE TEMP TABLE IF NOT EXISTS synap_consumed_ids (x int) ON COMMIT DROP;
                     DO $$ BEGIN FOR i IN 1..{consume} LOOP
                         BEGIN INSERT INTO synap_consumed_ids VALUES (1); RAISE EXCEPTION 'consumed';
                         EXCEPTION WHEN OTHERS THEN NULL; END;
                     END LOOP; END $$;"
                ))
                .await?;
        }
        let mut client = client;
        let tx = client.transaction().await?;
        tx.batch_execute("SET LOCAL statement_timeout = 0").await?;
        let renumbered: i64 = tx.query_one("SELECT synap_rebase_feed()", &[]).await?.get(0);
        tx.commit().await?;
        Ok(FeedRebase {
            needed: true,
            events_renumbered: renumbered,
            transaction_ids_consumed: consume as u64,
        })
    }

    /// Every named consumer with its checkpoint, by name.
    pub async fn consumers(&self) -> Result<Vec<ConsumerStatus>> {
        self.refuse_scoped("consumers")?;
        let mut client = self.client().await?;
        let rows = client
            .query(
                "SELECT name, txid::text, position, updated_at, needs_repair, synap_feed_identity() \
                   FROM event_consumers ORDER BY name",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(ConsumerStatus {
                    name: r.get(0),
                    checkpoint: parse_checkpoint(r.get(1), r.get(2), r.get(5))?,
                    updated_at: r.get(3),
                    needs_repair: r.get(4),
                })
            })
            .collect()
    }

    /// Repairs a named consumer whose checkpoint was stored by the old feed ordering, which
    /// sorted pages by the text of the transaction id and so passed over events whenever ids
    /// crossed a power of ten. Every event such a reader could have passed over has a
    /// transaction id with fewer digits than the stored checkpoint's; when any such event exists
    /// the checkpoint goes back to the start, so the consumer gets every event again (delivery
    /// is at-least-once: a projection skips the ones it has by event id). `accept` keeps the
    /// checkpoint instead, for a consumer known to be whole. Either way the consumer may read on.
    /// A consumer that does not need repair is left alone.
    ///
    /// Fails with [`Error::Validation`] for a bad name, and with [`Error::PermissionDenied`] on a
    /// user-scoped handle.
    pub async fn repair_consumer(&self, consumer: &str, accept: bool, dry_run: bool) -> Result<ConsumerRepair> {
        self.refuse_scoped("repair_consumer")?;
        check_consumer(consumer)?;
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let Some(row) = tx
            .query_opt(
                "SELECT txid::text, position, needs_repair, synap_feed_identity() FROM event_consumers \
                  WHERE name = $1 FOR UPDATE",
                &[&consumer],
            )
            .await?
        else {
            return Err(Error::invalid(
                "consumer",
                IssueCode::OutOfRange,
                format!("no consumer named \"{consumer}\""),
            ));
        };
        let before = parse_checkpoint(row.get(0), row.get(1), row.get(3))?;
        let needed: bool = row.get(2);
        let mut report = ConsumerRepair {
            consumer: consumer.to_owned(),
            needed_repair: needed,
            before,
            after: before,
            events_delivered_again: 0,
            dry_run,
        };
        if needed && !accept {
            // A skipped event's id has fewer digits than the checkpoint that passed it.
            let digits = before.txid.to_string().len() as u32;
            let below = 10u64.pow(digits - 1).to_string();
            let suspects: i64 = tx
                .query_one("SELECT count(*) FROM events_v2 WHERE txid < $1::text::xid8", &[&below])
                .await?
                .get(0);
            if suspects > 0 {
                report.after = Checkpoint::START;
                report.events_delivered_again = tx
                    .query_one(
                        "SELECT count(*) FROM events_v2 WHERE (txid, position) <= ($1::text::xid8, $2)",
                        &[&before.txid.to_string(), &before.position],
                    )
                    .await?
                    .get(0);
            }
        }
        if dry_run {
            tx.rollback().await?;
            return Ok(report);
        }
        tx.execute(
            "UPDATE event_consumers SET txid = $2::text::xid8, position = $3, needs_repair = false, updated_at = now() \
              WHERE name = $1",
            &[&consumer, &report.after.txid.to_string(), &report.after.position],
        )
        .await?;
        tx.commit().await?;
        Ok(report)
    }
}
