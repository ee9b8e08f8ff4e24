//! The copy's writers: each writes its lane's batches in one statement each (stream guards,
//! events, map rows), records failures and progress, and on TimescaleDB creates the run's chunks
//! ahead.
//!
//! Owns [`BATCH_SQL`] and the progress statements. Called by [`super::copy`].

use super::*;

/// One batch in one statement over arrays: the stream guards (created for new aggregates,
/// advanced from exactly first_version - 1 for known ones, as in the repository's batch
/// append), the events, the dirty days and the map rows. Nothing is inserted unless every guard
/// passed.
pub(super) const BATCH_SQL: &str = concat!(
    r#"
WITH src AS (
    SELECT u.* FROM unnest($1::uuid[], $2::uuid[], $3::timestamptz[], $4::uuid[], $5::text[], $6::text[], $7::text[],
                           $8::integer[], $9::uuid[], $10::text[], $17::jsonb[])
           WITH ORDINALITY AS u(legacy_id, event_id, ts, aggregate_id, aggregate_type, event_type, user_id,
                                version, correlation_id, legacy_source, data, ord)
), req AS (
    SELECT * FROM unnest($11::uuid[], $12::text[], $13::text[], $14::integer[], $15::integer[], $18::timestamptz[],
                         $19::timestamptz[])
           AS r(aggregate_id, aggregate_type, user_id, first_version, last_version, first_ts, last_ts)
), "#,
    stream_guard_ctes!("ON CONFLICT (aggregate_id) DO NOTHING"),
    r#", passed AS (
    SELECT (SELECT count(*) FROM created) + (SELECT count(*) FROM advanced) = cardinality($11::uuid[]) AS ok
), inserted AS (
    INSERT INTO events_v2 (id, "timestamp", aggregate_id, aggregate_type, event_type, user_id, data, metadata,
                           version, causation_id, correlation_id, source)
    SELECT event_id, ts, aggregate_id, aggregate_type, event_type, user_id, data,
           jsonb_build_object('legacyId', legacy_id, 'legacySource', legacy_source),
           version, NULL, correlation_id, 'migration'
      FROM src
     WHERE (SELECT ok FROM passed)
       AND "#,
    feed_days_mark!(),
    r#"
     ORDER BY ord
    RETURNING "timestamp"
), dirty AS (
    INSERT INTO events_daily_dirty (day)
    SELECT DISTINCT ("timestamp" AT TIME ZONE 'UTC')::date FROM inserted ORDER BY 1
    ON CONFLICT (day) DO NOTHING
), "#,
    feed_days_ctes!(),
    r#", ids AS (
    INSERT INTO events_v2_ids (id, aggregate_id, version, user_id)
    SELECT event_id, aggregate_id, version, user_id FROM src WHERE (SELECT ok FROM passed)
), mapped AS (
    INSERT INTO legacy_migration_map (legacy_table, legacy_id, event_id, aggregate_id, version, origin)
    SELECT $16, legacy_id, event_id, aggregate_id, version, 'migration' FROM src WHERE (SELECT ok FROM passed)
)
SELECT (SELECT ok FROM passed), (SELECT count(*) FROM inserted)
"#
);

pub(super) const RECORD_FAILURES_SQL: &str =
    "INSERT INTO legacy_migration_failures (legacy_table, legacy_id, reason_code, reason)
SELECT $1, * FROM unnest($2::uuid[], $3::text[], $4::text[])
ON CONFLICT (legacy_table, legacy_id) DO NOTHING";

/// A run's row, made (and its counts taken from the map and the failures, which are exact even
/// when a killed run did not record its last round) before its first batch.
pub(super) const START_RUN_SQL: &str = "INSERT INTO legacy_migration_runs (legacy_table, migrated, failed)
VALUES ($1, (SELECT count(*) FROM legacy_migration_map WHERE legacy_table = $1 AND origin = 'migration'),
        (SELECT count(*) FROM legacy_migration_failures WHERE legacy_table = $1))
ON CONFLICT (legacy_table) DO UPDATE
   SET migrated = EXCLUDED.migrated, failed = EXCLUDED.failed, updated_at = now(), finished_at = NULL";

pub(super) const RECORD_PROGRESS_SQL: &str =
    "INSERT INTO legacy_migration_runs (legacy_table, migrated, failed, last_timestamp, last_id)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (legacy_table) DO UPDATE
   SET migrated = legacy_migration_runs.migrated + EXCLUDED.migrated,
       failed = legacy_migration_runs.failed + EXCLUDED.failed,
       last_timestamp = coalesce(EXCLUDED.last_timestamp, legacy_migration_runs.last_timestamp),
       last_id = coalesce(EXCLUDED.last_id, legacy_migration_runs.last_id),
       updated_at = now(),
       finished_at = NULL";

/// TimescaleDB creates a chunk inside the inserting transaction and keeps the hypertable's
/// chunk-creation lock until that transaction ends, so writers that each create chunks take
/// turns (two writers over a year of legacy rows: 33.5 s against 24 s). A run creates the chunks
/// of its days first, a few dozen days per short transaction, by inserting a placeholder row per
/// day and deleting it before the commit: no event, feed entry or wake-up is left behind, and the
/// chunks are secured in the same transaction.
/// (TimescaleDB's `create_chunk()` is not in its Apache-licensed build.)
pub(super) const CHUNK_PLACEHOLDERS_SQL: &str = concat!(
    r#"INSERT INTO events_v2 (id, "timestamp", aggregate_id, aggregate_type, event_type, user_id, version, source)
SELECT gen_random_uuid(), d::timestamp AT TIME ZONE 'UTC', '00000000-0000-0000-0000-000000000000', 'system',
       'synap.chunk_placeholder', $2, 1, 'system'
  FROM unnest($1::date[]) d
 WHERE "#,
    feed_days_mark!(),
    r#"
RETURNING id, "timestamp""#
);
pub(super) const DELETE_CHUNK_PLACEHOLDERS_SQL: &str =
    r#"DELETE FROM events_v2 WHERE user_id = $3 AND "timestamp" = ANY ($2) AND id = ANY ($1)"#;
pub(super) const CHUNK_PLACEHOLDER_USER: &str = "synap:chunk-placeholder";

/// See [`CHUNK_PLACEHOLDERS_SQL`]. Best effort: where it fails (a role that row-level security
/// keeps from writing the placeholder, or without EXECUTE on `synap_secure_partitions`), or where
/// the database has a publication, the batches create the chunks as they go.
pub(super) async fn create_chunks_ahead(client: &mut tokio_postgres::Client, days: &[chrono::NaiveDate]) {
    let timescaledb = client
        .query_opt(
            // Not where a publication exists: logical decoding would send the placeholders' inserts
            // (and deletes) to subscribers and change-data-capture readers.
            "SELECT 1 FROM synap_settings WHERE key = 'storage_mode' AND value = 'timescaledb'
                AND NOT EXISTS (SELECT 1 FROM pg_publication)",
            &[],
        )
        .await;
    if !matches!(timescaledb, Ok(Some(_))) {
        return;
    }
    for group in days.chunks(4) {
        let created = async {
            let tx = client.transaction().await?;
            let rows = tx
                .query(CHUNK_PLACEHOLDERS_SQL, &[&group, &CHUNK_PLACEHOLDER_USER])
                .await?;
            let ids: Vec<Uuid> = rows.iter().map(|r| r.get(0)).collect();
            let times: Vec<DateTime<Utc>> = rows.iter().map(|r| r.get(1)).collect();
            tx.execute(DELETE_CHUNK_PLACEHOLDERS_SQL, &[&ids, &times, &CHUNK_PLACEHOLDER_USER])
                .await?;
            // The new chunks get the events' row-level security now, as a batch's chunks do
            // when it commits (synap_feed_days_secure): left to a writer's commit, securing them
            // would wait for the other writers' batches in them.
            tx.execute("SELECT synap_secure_partitions()", &[]).await?;
            tx.commit().await
        };
        if created.await.is_err() {
            return;
        }
    }
}

/// What one batch wrote.
pub(super) struct BatchOutcome {
    pub(super) migrated: u64,
    pub(super) failures: Vec<LegacyRowFailure>,
    pub(super) stopped: bool,
    /// The (timestamp, id) of the batch's last processed row.
    pub(super) last: Option<(Option<DateTime<Utc>>, Uuid)>,
}

impl EventRepository {
    /// A writer's share of a round, in batches of at most `batch_size` rows one after another
    /// (a round whose rows belong to few aggregates gives one writer more than a batch).
    pub(super) async fn write_share(
        &self,
        writer: &mut tokio_postgres::Client,
        stmt: &tokio_postgres::Statement,
        table: &str,
        share: &[LegacyRow],
        options: &LegacyMigrationOptions,
    ) -> Result<Vec<BatchOutcome>> {
        let mut outcomes = Vec::new();
        for rows in share.chunks(options.batch_size) {
            let outcome = self.write_batch_retrying(writer, stmt, table, rows, options).await?;
            let stopped = outcome.stopped;
            outcomes.push(outcome);
            if stopped {
                break;
            }
        }
        Ok(outcomes)
    }

    /// [`EventRepository::write_batch`], again (up to five times) when it fails in a way that a
    /// new try can mend (a concurrent append moved one of the batch's aggregates, a
    /// serialization failure).
    pub(super) async fn write_batch_retrying(
        &self,
        writer: &mut tokio_postgres::Client,
        stmt: &tokio_postgres::Statement,
        table: &str,
        rows: &[LegacyRow],
        options: &LegacyMigrationOptions,
    ) -> Result<BatchOutcome> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.write_batch(writer, stmt, table, rows, options.on_invalid).await {
                Err(e) if attempt < 5 && e.is_retryable() && !matches!(e, Error::ConnectionFailed { .. }) => continue,
                other => break other,
            }
        }
    }

    /// One batch in one transaction: lock the known streams, check and number the rows, insert
    /// events, guards, dirty days and map rows, record failures and progress.
    pub(super) async fn write_batch(
        &self,
        writer: &mut tokio_postgres::Client,
        stmt: &tokio_postgres::Statement,
        table: &str,
        rows: &[LegacyRow],
        on_invalid: OnInvalid,
    ) -> Result<BatchOutcome> {
        let limits = self.config().limits;
        let checked: Vec<_> = rows.iter().map(|r| check_row(r, &limits)).collect();
        let mut agg_ids: Vec<Uuid> = checked
            .iter()
            .filter_map(|c| c.as_ref().ok().map(|c| c.aggregate_id))
            .collect();
        agg_ids.sort_unstable();
        agg_ids.dedup();

        let tx = writer.transaction().await?;
        // event_streams is the source of truth for versions: lock the known streams of this
        // batch (in a fixed order) so no append moves them before this batch commits, and so
        // that a live append and a batch never take two streams in opposite orders.
        let known = tx
            .query(
                "SELECT aggregate_id, version, aggregate_type, last_timestamp FROM synap_lock_streams($1)",
                &[&agg_ids],
            )
            .await?;
        let mut streams: HashMap<Uuid, (i32, String)> =
            known.iter().map(|r| (r.get(0), (r.get(1), r.get(2)))).collect();
        // The newest event of each aggregate: a row older than it cannot be appended without
        // putting versions out of time order.
        let mut newest: HashMap<Uuid, DateTime<Utc>> = known.iter().map(|r| (r.get(0), r.get(3))).collect();

        let n = rows.len();
        let mut legacy_ids = Vec::with_capacity(n);
        let mut event_ids = Vec::with_capacity(n);
        let mut timestamps = Vec::with_capacity(n);
        let mut aggregate_ids = Vec::with_capacity(n);
        let mut aggregate_types = Vec::with_capacity(n);
        let mut event_types = Vec::with_capacity(n);
        let mut user_ids = Vec::with_capacity(n);
        let mut versions = Vec::with_capacity(n);
        let mut correlation_ids = Vec::with_capacity(n);
        let mut legacy_sources = Vec::with_capacity(n);
        let mut datas = Vec::with_capacity(n);
        // Per aggregate of the batch: index into the agg_* arrays.
        let mut agg_index: HashMap<Uuid, usize> = HashMap::new();
        let mut batch_aggs = Vec::new();
        let mut batch_types = Vec::new();
        let mut batch_users = Vec::new();
        let mut batch_first = Vec::new();
        let mut batch_last = Vec::new();
        let mut batch_first_ts = Vec::new();
        let mut batch_last_ts = Vec::new();
        let mut failures = Vec::new();
        let mut stopped = false;
        let mut last_processed: Option<&LegacyRow> = None;
        for (row, checked) in rows.iter().zip(checked) {
            // An event that belongs to an aggregate by the aggregate rule is part of its history,
            // whatever its type's first segment says: it takes the aggregate's type.
            let candidate = checked.map(|mut c| {
                if let Some(stored) = streams
                    .get(&c.aggregate_id)
                    .and_then(|(_, t)| t.parse::<AggregateType>().ok())
                {
                    c.aggregate_type = stored;
                }
                c
            });
            let candidate = candidate.and_then(|c| match newest.get(&c.aggregate_id) {
                Some(&last) if row.timestamp.is_some_and(|t| t < last) => Err(out_of_order(row, c.aggregate_id, last)),
                _ => Ok(c),
            });
            let c = match candidate {
                Ok(c) => c,
                Err(f) => {
                    failures.push(f);
                    if on_invalid == OnInvalid::Fail {
                        stopped = true;
                        break;
                    }
                    last_processed = Some(row);
                    continue;
                }
            };
            last_processed = Some(row);
            let entry = streams
                .entry(c.aggregate_id)
                .or_insert_with(|| (0, c.aggregate_type.as_str().to_owned()));
            entry.0 += 1;
            let version = entry.0;
            let ts = row.timestamp.expect("checked by check_row");
            newest.insert(c.aggregate_id, ts);
            match agg_index.get(&c.aggregate_id) {
                Some(&i) => {
                    batch_last[i] = version;
                    batch_first_ts[i] = ts.min(batch_first_ts[i]);
                    batch_last_ts[i] = ts.max(batch_last_ts[i]);
                }
                None => {
                    agg_index.insert(c.aggregate_id, batch_aggs.len());
                    batch_aggs.push(c.aggregate_id);
                    batch_types.push(c.aggregate_type.as_str());
                    batch_users.push(row.user_id.as_deref().unwrap_or_default());
                    batch_first.push(version);
                    batch_last.push(version);
                    batch_first_ts.push(ts);
                    batch_last_ts.push(ts);
                }
            }
            legacy_ids.push(row.id);
            event_ids.push(Uuid::now_v7());
            timestamps.push(row.timestamp);
            aggregate_ids.push(c.aggregate_id);
            aggregate_types.push(c.aggregate_type.as_str());
            event_types.push(row.event_type.as_deref());
            user_ids.push(row.user_id.as_deref());
            versions.push(version);
            correlation_ids.push(row.correlation_id);
            legacy_sources.push(row.source.as_deref());
            datas.push(row.data.as_ref());
        }

        let migrated = legacy_ids.len() as u64;
        if migrated > 0 {
            let params: [&(dyn ToSql + Sync); 19] = [
                &legacy_ids,
                &event_ids,
                &timestamps,
                &aggregate_ids,
                &aggregate_types,
                &event_types,
                &user_ids,
                &versions,
                &correlation_ids,
                &legacy_sources,
                &batch_aggs,
                &batch_types,
                &batch_users,
                &batch_first,
                &batch_last,
                &table,
                &datas,
                &batch_first_ts,
                &batch_last_ts,
            ];
            let row = tx.query_one(stmt, &params).await?;
            let ok: bool = row.get(0);
            if !ok {
                tx.rollback().await?;
                // A concurrent append created one of the batch's new aggregates, or a legacy
                // row vanished: the caller retries with fresh stream versions.
                return Err(Error::TransactionConflict {
                    message: "an aggregate of the migration batch moved or a legacy row vanished; retry".into(),
                });
            }
        }
        // In fail mode the stopped-on row is not recorded, so a resume meets it again in order.
        let recorded: &[LegacyRowFailure] = if stopped {
            &failures[..failures.len() - 1]
        } else {
            &failures
        };
        if !recorded.is_empty() {
            let ids: Vec<Uuid> = recorded.iter().map(|f| f.legacy_id).collect();
            let codes: Vec<&str> = recorded.iter().map(|f| f.reason_code.as_str()).collect();
            let reasons: Vec<&str> = recorded.iter().map(|f| f.reason.as_str()).collect();
            tx.execute(RECORD_FAILURES_SQL, &[&table, &ids, &codes, &reasons])
                .await?;
        }
        tx.commit().await?;
        if migrated > 0 {
            self.wake_subscribers();
        }
        Ok(BatchOutcome {
            migrated,
            failures,
            stopped,
            last: last_processed.map(|r| (r.timestamp, r.id)),
        })
    }

    /// The checks of [`EventRepository::write_batch`] without writing.
    pub(super) async fn dry_run_batch(
        &self,
        client: &tokio_postgres::Client,
        rows: &[LegacyRow],
        on_invalid: OnInvalid,
        known: &mut HashMap<Uuid, DateTime<Utc>>,
    ) -> Result<BatchOutcome> {
        let limits = self.config().limits;
        let checked: Vec<_> = rows.iter().map(|r| check_row(r, &limits)).collect();
        let ids: Vec<Uuid> = checked
            .iter()
            .filter_map(|c| c.as_ref().ok().map(|c| c.aggregate_id))
            .filter(|id| !known.contains_key(id))
            .collect();
        let stored = client
            .query(
                "SELECT aggregate_id, last_timestamp FROM event_streams WHERE aggregate_id = ANY ($1)",
                &[&ids],
            )
            .await?;
        known.extend(
            stored
                .iter()
                .map(|r| (r.get::<_, Uuid>(0), r.get::<_, DateTime<Utc>>(1))),
        );
        let mut outcome = BatchOutcome {
            migrated: 0,
            failures: Vec::new(),
            stopped: false,
            last: None,
        };
        for (row, checked) in rows.iter().zip(checked) {
            // As in a real run: a row older than its aggregate's newest event is refused.
            let result = checked.and_then(|c| match (known.get(&c.aggregate_id), row.timestamp) {
                (Some(&last), Some(t)) if t < last => Err(out_of_order(row, c.aggregate_id, last)),
                (_, Some(t)) => {
                    known.insert(c.aggregate_id, t);
                    Ok(())
                }
                (_, None) => Ok(()),
            });
            match result {
                Ok(()) => outcome.migrated += 1,
                Err(f) => {
                    outcome.failures.push(f);
                    if on_invalid == OnInvalid::Fail {
                        outcome.stopped = true;
                        break;
                    }
                }
            }
        }
        Ok(outcome)
    }
}
