//! The copy's run: the migration lock and the writers' lock, opening the writers, and the reader
//! loop that reads the legacy table in (timestamp, id) order and hands each row to its writer.
//!
//! Owns the locks. Calls [`super::rows`] and [`super::writers`].

use super::*;

/// The migration lock of one legacy table, keyed by its schema-qualified name.
pub(super) const LOCK_SQL: &str = "SELECT pg_try_advisory_lock(hashtext('synap.legacy_migration'), hashtext($1))";
pub(super) const UNLOCK_SQL: &str = "SELECT pg_advisory_unlock(hashtext('synap.legacy_migration'), hashtext($1))";
pub(super) const MIGRATION_LOCK_CLASS: &str = "synap.legacy_migration";

/// Held in share mode by each writer connection of a run for its whole session; a new run takes
/// it exclusively (and lets go at once) to know that every writer of an earlier run is gone.
pub(super) const WRITERS_TRY_SQL: &str =
    "SELECT pg_try_advisory_lock(hashtext('synap.legacy_migration_writers'), hashtext($1))";
pub(super) const WRITERS_UNLOCK_SQL: &str =
    "SELECT pg_advisory_unlock(hashtext('synap.legacy_migration_writers'), hashtext($1))";
pub(super) const WRITER_SHARED_SQL: &str =
    "SELECT pg_advisory_lock_shared(hashtext('synap.legacy_migration_writers'), hashtext($1))";
pub(super) const WRITERS_LOCK_CLASS: &str = "synap.legacy_migration_writers";

impl EventRepository {
    /// Adds the run's other writers to `writers` (which holds the one with the migration lock),
    /// and enlists every writer and the reader (see [`enlist`]).
    pub(super) async fn open_writers(
        &self,
        writers: &mut Vec<deadpool_postgres::ClientWrapper>,
        reader: &tokio_postgres::Client,
        table: &str,
        options: &LegacyMigrationOptions,
    ) -> Result<()> {
        let lanes = match options.on_invalid {
            OnInvalid::Fail => 1,
            OnInvalid::Skip => options.writers,
        };
        while writers.len() < lanes {
            writers.push(deadpool_postgres::Object::take(self.object().await?));
        }
        // The reader records the run's progress: a later run must wait for it as for a writer.
        for client in writers.iter().map(|w| &**w).chain([reader]) {
            enlist(client, table).await?;
        }
        Ok(())
    }

    /// Takes the session lock of `table`'s migration on `writer`, then waits until every writer
    /// connection of an earlier run has ended (they hold the writers' lock in share mode), so
    /// that no transaction of theirs can commit after this run has read what is pending. When
    /// another backend holds either lock, waits up to `busy_timeout` for it to end; a run of
    /// this program on this host that was killed (its process is gone) has its backends
    /// terminated at once instead.
    ///
    /// Fails with [`Error::LegacyMigrationBusy`], naming the holder, when a lock stays taken.
    pub(super) async fn take_migration_lock(
        &self,
        writer: &tokio_postgres::Client,
        table: &str,
        busy_timeout: Duration,
    ) -> Result<()> {
        // Who we are, so that a later run can tell that this one is gone.
        writer
            .execute(
                "SELECT set_config('application_name', $1, false)",
                &[&migration_client_name()],
            )
            .await?;
        let started = Instant::now();
        self.wait_for_lock(writer, LOCK_SQL, MIGRATION_LOCK_CLASS, table, started, busy_timeout)
            .await?;
        self.wait_for_lock(
            writer,
            WRITERS_TRY_SQL,
            WRITERS_LOCK_CLASS,
            table,
            started,
            busy_timeout,
        )
        .await?;
        writer.execute(WRITERS_UNLOCK_SQL, &[&table]).await?;
        Ok(())
    }

    /// Runs `try_sql` (a `pg_try_advisory_lock` of class `class` and key `table`) until it takes
    /// the lock.
    pub(super) async fn wait_for_lock(
        &self,
        writer: &tokio_postgres::Client,
        try_sql: &str,
        class: &str,
        table: &str,
        started: Instant,
        busy_timeout: Duration,
    ) -> Result<()> {
        loop {
            if writer.query_one(try_sql, &[&table]).await?.get::<_, bool>(0) {
                return Ok(());
            }
            let holder = writer
                .query_opt(
                    "SELECT a.pid, coalesce(a.application_name, ''), a.backend_start, a.state, a.query_start,
                            coalesce(a.client_addr::text, 'local')
                       FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                      WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                        AND l.classid = (hashtext($2)::bigint & 4294967295)::text::oid
                        AND l.objid = (hashtext($1)::bigint & 4294967295)::text::oid
                        AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                        AND l.pid <> pg_backend_pid()
                      LIMIT 1",
                    &[&table, &class],
                )
                .await?;
            let Some(holder) = holder else {
                continue; // released between the two queries
            };
            let pid: i32 = holder.get(0);
            let name: String = holder.get(1);
            if orphaned_here(&name) {
                // Every backend of the dead run: each may be inside a batch's transaction.
                writer
                    .execute(
                        "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity
                          WHERE application_name = $1 AND pid <> pg_backend_pid()",
                        &[&name],
                    )
                    .await?;
                continue;
            }
            if started.elapsed() >= busy_timeout {
                let since: Option<DateTime<Utc>> = holder.get(4);
                return Err(Error::LegacyMigrationBusy {
                    table: table.to_owned(),
                    holder: format!(
                        "backend {pid} ({}, client {}, connected {}) holds the migration lock, {} since {}; \
                         waited {} s",
                        if name.is_empty() { "no application name" } else { &name },
                        holder.get::<_, String>(5),
                        holder.get::<_, DateTime<Utc>>(2).to_rfc3339(),
                        holder
                            .get::<_, Option<String>>(3)
                            .unwrap_or_else(|| "state unknown".into()),
                        since.map_or("-".into(), |t| t.to_rfc3339()),
                        started.elapsed().as_secs()
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// One run with the locks held: `reader` reads the legacy rows through one snapshot while
    /// `writers` write the batches, each the rows of its share of the aggregates.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn run_migration(
        &self,
        reader: &mut tokio_postgres::Client,
        writers: &mut [deadpool_postgres::ClientWrapper],
        legacy: &str,
        table: &str,
        options: &LegacyMigrationOptions,
        progress: &mut (dyn FnMut(&LegacyMigrationProgress) + Send),
        started: Instant,
    ) -> Result<LegacyMigrationReport> {
        let counts = writers[0]
            .query_one(
                "SELECT (SELECT count(*) FROM legacy_migration_map WHERE legacy_table = $1),
                        (SELECT count(*) FROM legacy_migration_failures WHERE legacy_table = $1)",
                &[&table],
            )
            .await?;
        let previously_migrated = counts.get::<_, i64>(0) as u64;
        let previously_failed = counts.get::<_, i64>(1) as u64;

        // One snapshot and one sort for the whole run, kept by a cursor that outlives the
        // snapshot's transaction: the server materializes the sorted rows at its commit, and the
        // run then reads them batch by batch holding no snapshot. (A snapshot held for the whole
        // run kept every stream row version the run made from being pruned, so that each update of
        // a stream row wrote a new index entry.) The commit sorts and copies every pending row
        // (data included) at once, in work_mem and then temporary files, as one statement: a
        // `statement_timeout` or `temp_file_limit` of the role applies to it.
        reader
            .batch_execute(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;
                 SET LOCAL work_mem = '256MB'",
            )
            .await?;
        let pending: i64 = reader
            .query_one(
                &format!("SELECT count(*) FROM {legacy} l WHERE {PENDING_FILTER}"),
                &[&table],
            )
            .await?
            .get(0);
        let pending = pending as u64;
        let total = options.limit.map_or(pending, |l| l.min(pending));
        reader
            .execute(
                &format!(
                    "DECLARE synap_legacy_rows NO SCROLL CURSOR WITH HOLD FOR
                     SELECT l.id, CASE WHEN {readable} THEN l.\"timestamp\" END, l.user_id::text, l.type::text,
                            l.data->>'entityId', l.data, l.source::text, l.correlation_id,
                            l.\"timestamp\" IS NOT NULL AND NOT ({readable})
                       FROM {legacy} l
                      WHERE {PENDING_FILTER}
                      ORDER BY l.\"timestamp\", l.id
                      LIMIT {total}",
                    readable = readable_timestamp("l")
                ),
                &[&table],
            )
            .await?;
        reader.batch_execute("COMMIT").await?;
        let reader = &*reader;
        let fetch = |n: i32| async move {
            reader
                .query_typed(&format!("FETCH FORWARD {n} FROM synap_legacy_rows"), &[])
                .await
        };

        // Each round reads a batch for every writer and writes them at once.
        let lanes = writers.len().max(1);
        let round = (options.batch_size * lanes) as u64;
        let batch = |fetched: u64| (total - fetched).min(round) as i32;
        // The first round is read while the writer prepares the days.
        let first = async {
            if total > 0 {
                fetch(batch(0)).await
            } else {
                Ok(Vec::new())
            }
        };
        let prepare = async {
            let mut days = Vec::new();
            if !options.dry_run && total > 0 {
                // The days of the rows this run will write: with a limit, only the first rows'.
                let days_sql = if total < pending {
                    format!(
                        "SELECT DISTINCT (r.\"timestamp\" AT TIME ZONE 'UTC')::date FROM (
                             SELECT l.\"timestamp\" FROM {legacy} l WHERE {PENDING_FILTER}
                              ORDER BY l.\"timestamp\", l.id LIMIT {total}) r
                          WHERE {readable} ORDER BY 1",
                        readable = readable_timestamp("r")
                    )
                } else {
                    format!(
                        "SELECT DISTINCT (l.\"timestamp\" AT TIME ZONE 'UTC')::date
                           FROM {legacy} l WHERE {PENDING_FILTER} AND {readable} ORDER BY 1",
                        readable = readable_timestamp("l")
                    )
                };
                days = writers[0]
                    .query(&days_sql, &[&table])
                    .await?
                    .iter()
                    .map(|r| r.get::<_, chrono::NaiveDate>(0))
                    .collect();
                // Historical days get their native daily partitions before any row goes in,
                // rather than piling up in the default partition (a no-op on TimescaleDB).
                writers[0]
                    .execute(
                        "SELECT synap_ensure_partitions(d, d) FROM unnest($1::date[]) d",
                        &[&days],
                    )
                    .await?;
            }
            Ok::<_, Error>(days)
        };
        let (first, prepared) = futures_util::future::join(first, prepare).await;
        let days = prepared?;
        let mut next = first?;
        // TimescaleDB chunks are created by a connection of their own, ahead of the writers.
        let mut chunk_client = match days.is_empty() {
            true => None,
            false => self.object().await.ok(),
        };
        let chunks = async {
            if let Some(client) = chunk_client.as_mut() {
                create_chunks_ahead(client, &days).await;
            }
        };
        let mut batch_stmts = Vec::new();
        if !options.dry_run {
            for writer in writers.iter() {
                batch_stmts.push(writer.prepare(BATCH_SQL).await?);
            }
        }
        let mut report = LegacyMigrationReport {
            legacy_table: table.to_owned(),
            dry_run: options.dry_run,
            pending_at_start: pending,
            previously_migrated,
            previously_failed,
            processed: 0,
            migrated: 0,
            failed: 0,
            batches: 0,
            failures: Vec::new(),
            stopped_on_invalid: false,
            remaining: pending,
            elapsed_ms: 0,
            events_per_second: 0.0,
            success_rate: 100.0,
        };
        // Dry runs write no streams, so they remember each aggregate's newest event themselves.
        let mut dry_newest: HashMap<Uuid, DateTime<Utc>> = HashMap::new();
        progress(&LegacyMigrationProgress {
            total,
            processed: 0,
            migrated: 0,
            failed: 0,
        });
        let to_rows = |rows: Vec<tokio_postgres::Row>| -> Vec<LegacyRow> {
            rows.iter()
                .map(|r| LegacyRow {
                    id: r.get(0),
                    timestamp: r.get(1),
                    user_id: r.get(2),
                    event_type: r.get(3),
                    entity_id: r.get(4),
                    data: r.get(5),
                    source: r.get(6),
                    correlation_id: r.get(7),
                    timestamp_out_of_range: r.get(8),
                })
                .collect()
        };
        // Each writer takes its share of a round as soon as it has written its share of the
        // round before, so a writer that finishes first does not wait for the others (each
        // writer's channel holds one share, so no writer gets more than two rounds ahead of the
        // slowest). The rounds are settled (counted, recorded, reported) in order, once every
        // writer has written its share.
        let (share_txs, share_rxs): (Vec<_>, Vec<_>) = (0..lanes)
            .map(|_| tokio::sync::mpsc::channel::<(u64, Vec<LegacyRow>)>(1))
            .unzip();
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Result<Vec<BatchOutcome>>)>();
        let mut dry_known = Some(&mut dry_newest);
        let writes = writers
            .iter_mut()
            .zip(share_rxs)
            .enumerate()
            .map(|(lane, (writer, mut shares))| {
                let done = done_tx.clone();
                let stmt = batch_stmts.get(lane);
                // Dry runs have one writer: only it uses the map of known aggregates.
                let mut newest = if lane == 0 { dry_known.take() } else { None };
                async move {
                    while let Some((round, share)) = shares.recv().await {
                        if done.is_closed() {
                            break; // the run ended (a failed read or write): write nothing more
                        }
                        let written = match (stmt, share.is_empty()) {
                            (_, true) => Ok(Vec::new()),
                            (Some(stmt), false) => self.write_share(writer, stmt, table, &share, options).await,
                            (None, false) => match newest.as_deref_mut() {
                                Some(known) => self
                                    .dry_run_batch(writer, &share, options.on_invalid, known)
                                    .await
                                    .map(|outcome| vec![outcome]),
                                None => Err(Error::Internal {
                                    message: "a dry run with more than one writer".into(),
                                }),
                            },
                        };
                        let last = written.as_ref().map_or(true, |o| o.iter().any(|b| b.stopped));
                        if done.send((round, written)).is_err() || last {
                            break;
                        }
                        if let (Some(delay), false) = (options.batch_delay, share.is_empty()) {
                            tokio::time::sleep(delay).await;
                        }
                    }
                }
            })
            .collect::<Vec<_>>();
        drop(done_tx);
        let writing = futures_util::future::join_all(writes);

        let mut exhausted = false;
        let dispatch = async {
            // Moved in: the writers see the end of the rounds when the dispatch ends.
            let share_txs = share_txs;
            let mut fetched = 0u64;
            let mut round = 0u64;
            while fetched < total {
                if next.is_empty() {
                    exhausted = true;
                    break;
                }
                let rows = to_rows(std::mem::take(&mut next));
                fetched += rows.len() as u64;
                let mut shares: Vec<Vec<LegacyRow>> = (0..lanes).map(|_| Vec::new()).collect();
                for row in rows {
                    shares[writer_of(&row, lanes)].push(row);
                }
                for (tx, share) in share_txs.iter().zip(shares) {
                    if tx.send((round, share)).await.is_err() {
                        return Ok(()); // the writer stopped: the run ends with what is settled
                    }
                }
                round += 1;
                // The next round is read while this one is written.
                let want = batch(fetched);
                if want > 0 {
                    next = fetch(want).await?;
                }
            }
            Ok::<(), Error>(())
        };

        let settle = async {
            let mut arrived: HashMap<u64, (usize, Vec<BatchOutcome>)> = HashMap::new();
            let mut round = 0u64;
            while report.processed < total {
                let Some((share_round, written)) = done_rx.recv().await else {
                    break; // every writer is done
                };
                let entry = arrived.entry(share_round).or_default();
                entry.0 += 1;
                entry.1.extend(written?);
                if arrived.get(&round).map(|e| e.0) != Some(lanes) {
                    continue;
                }
                let (_, outcomes) = arrived.remove(&round).unwrap_or_default();
                round += 1;
                let mut stopped = false;
                // The round's counts and last row, recorded once the round committed: a row
                // that every writer updated inside its batch would make the writers wait for
                // each other.
                let mut recorded = (0i64, 0i64);
                let mut last = None;
                for outcome in &outcomes {
                    recorded.0 += outcome.migrated as i64;
                    recorded.1 += (outcome.failures.len() - usize::from(outcome.stopped)) as i64;
                    // In the read's order: by timestamp (nulls last), then id.
                    let key = |l: &Option<(Option<DateTime<Utc>>, Uuid)>| l.map(|(t, id)| (t.is_none(), t, id));
                    if key(&outcome.last) > key(&last) {
                        last = outcome.last;
                    }
                }
                if !options.dry_run {
                    let (last_ts, last_id) = (last.and_then(|l| l.0), last.map(|l| l.1));
                    reader
                        .execute(
                            RECORD_PROGRESS_SQL,
                            &[&table, &recorded.0, &recorded.1, &last_ts, &last_id],
                        )
                        .await?;
                }
                for outcome in outcomes {
                    let processed = if outcome.stopped {
                        // The stopped-on row and everything after it stay pending (one writer).
                        stopped = true;
                        outcome.migrated + outcome.failures.len() as u64 - 1
                    } else {
                        outcome.migrated + outcome.failures.len() as u64
                    };
                    report.processed += processed;
                    report.migrated += outcome.migrated;
                    report.failed += outcome.failures.len() as u64;
                    report.batches += u64::from(!options.dry_run);
                    let room = MAX_LISTED.saturating_sub(report.failures.len());
                    report.failures.extend(outcome.failures.into_iter().take(room));
                }
                progress(&LegacyMigrationProgress {
                    total,
                    processed: report.processed,
                    migrated: report.migrated,
                    failed: report.failed,
                });
                if stopped {
                    report.stopped_on_invalid = true;
                    break;
                }
            }
            // Whatever happens next, no writer may take another round.
            drop(done_rx);
            Ok::<(), Error>(())
        };
        // A failed read or write ends the run: no writer takes another share, the shares being
        // written are finished (each batch commits or rolls back whole; a resume skips what
        // committed), and the error is returned.
        let run = futures_util::future::try_join(dispatch, settle);
        let run = async {
            let (ran, _) = futures_util::future::join(run, writing).await;
            ran
        };
        let ((), written) = futures_util::future::join(chunks, run).await;
        written?;
        // The connection's end closes it too: a failure here must not fail a finished run.
        let _ = reader.batch_execute("CLOSE synap_legacy_rows").await;
        if !options.dry_run && !report.stopped_on_invalid && (exhausted || report.processed == pending) {
            writers[0]
                .execute(
                    "INSERT INTO legacy_migration_runs (legacy_table, finished_at, history_migrated_at)
                     VALUES ($1, now(), now())
                     ON CONFLICT (legacy_table) DO UPDATE
                        SET finished_at = now(), updated_at = now(),
                            history_migrated_at = coalesce(legacy_migration_runs.history_migrated_at, now()),
                            migrated = (SELECT count(*) FROM legacy_migration_map
                                         WHERE legacy_table = $1 AND origin = 'migration'),
                            failed = (SELECT count(*) FROM legacy_migration_failures WHERE legacy_table = $1)",
                    &[&table],
                )
                .await?;
        }
        report.remaining = pending - report.processed;
        let elapsed = started.elapsed();
        report.elapsed_ms = elapsed.as_millis() as u64;
        report.events_per_second = report.processed as f64 / elapsed.as_secs_f64().max(1e-9);
        let done = report.migrated + report.failed;
        report.success_rate = if done == 0 {
            100.0
        } else {
            report.migrated as f64 * 100.0 / done as f64
        };
        Ok(report)
    }
}
