//! Batch appends: all events or none, in one statement over arrays whatever the batch's size,
//! and the diagnosis of a batch whose guard did not pass.
//!
//! Owns [`APPEND_BATCH_SQL`]. Calls the connections and [`super::append`]'s errors.

use super::*;

/// A whole batch in one statement over arrays (no bind-parameter limit). $1..$12 are the events'
/// columns, $13..$20 one entry per aggregate, sorted by aggregate id (so that every batch locks
/// the guard rows it shares with another in the same order): its type, user, first and last
/// version in the batch, its earliest and latest given timestamps, and whether any of its events
/// takes the database's `now()`; $21 is the events' schema versions. Inserts happen only if every
/// aggregate's guard passed; the caller rolls back otherwise.
pub(super) const APPEND_BATCH_SQL: &str = concat!(
    r#"
WITH ev AS (
    SELECT u.ord, u.id, coalesce(u.ts, now()) AS ts, u.aggregate_id, u.aggregate_type, u.event_type, u.user_id,
           u.data, u.metadata, u.version, u.causation_id, u.correlation_id, u.source, u.schema_version
      FROM unnest($1::uuid[], $2::timestamptz[], $3::uuid[], $4::text[], $5::text[], $6::text[], $7::jsonb[],
                  $8::jsonb[], $9::integer[], $10::uuid[], $11::uuid[], $12::text[], $21::integer[])
           WITH ORDINALITY AS u(id, ts, aggregate_id, aggregate_type, event_type, user_id, data, metadata,
                                version, causation_id, correlation_id, source, schema_version, ord)
), req AS (
    SELECT r.aggregate_id, r.aggregate_type, r.user_id, r.first_version, r.last_version,
           least(r.first_ts, CASE WHEN r.takes_now THEN now() END) AS first_ts,
           greatest(r.last_ts, CASE WHEN r.takes_now THEN now() END) AS last_ts
      FROM unnest($13::uuid[], $14::text[], $15::text[], $16::integer[], $17::integer[],
                  $18::timestamptz[], $19::timestamptz[], $20::boolean[])
           AS r(aggregate_id, aggregate_type, user_id, first_version, last_version, first_ts, last_ts, takes_now)
), "#,
    stream_guard_ctes!(""),
    r#", passed AS (
    SELECT (SELECT count(*) FROM created) + (SELECT count(*) FROM advanced) = cardinality($13::uuid[]) AS ok
), inserted AS (
    INSERT INTO events_v2 (id, "timestamp", aggregate_id, aggregate_type, event_type, user_id, data, metadata,
                           version, causation_id, correlation_id, source, schema_version)
    SELECT id, ts, aggregate_id, aggregate_type, event_type, user_id, data, metadata,
           version, causation_id, correlation_id, source, schema_version
      FROM ev
     WHERE (SELECT ok FROM passed)
       AND "#,
    feed_days_mark!(),
    r#"
     ORDER BY ord
    RETURNING id, "timestamp", position/*DUAL_RETURNING*/
), ids AS (
    INSERT INTO events_v2_ids (id, aggregate_id, version, user_id)
    SELECT id, aggregate_id, version, user_id FROM ev WHERE (SELECT ok FROM passed)
), dirty AS (
    INSERT INTO events_daily_dirty (day)
    SELECT DISTINCT ("timestamp" AT TIME ZONE 'UTC')::date FROM inserted ORDER BY 1
    ON CONFLICT (day) DO NOTHING
), "#,
    feed_days_ctes!(),
    r#"/*DUAL_WRITE*/
SELECT id, "timestamp", position FROM inserted
"#
);

/// The time span of one aggregate's events in a batch: the earliest and latest given timestamps,
/// and whether an event without one takes the database's `now()`.
pub(super) struct TimeSpan {
    earliest: Option<DateTime<Utc>>,
    latest: Option<DateTime<Utc>>,
    takes_now: bool,
}

impl TimeSpan {
    pub(super) fn of(timestamp: Option<DateTime<Utc>>) -> Self {
        TimeSpan {
            earliest: timestamp,
            latest: timestamp,
            takes_now: timestamp.is_none(),
        }
    }

    pub(super) fn add(&mut self, timestamp: Option<DateTime<Utc>>) {
        match timestamp {
            Some(t) => {
                self.earliest = Some(self.earliest.map_or(t, |e| e.min(t)));
                self.latest = Some(self.latest.map_or(t, |l| l.max(t)));
            }
            None => self.takes_now = true,
        }
    }
}

impl EventRepository {
    /// Appends events atomically: all of them or none. Several events of one aggregate must have
    /// consecutive versions in batch order, the first being the aggregate's current version + 1.
    /// Any size works (arrays, not one parameter per value).
    ///
    /// Fails like [`EventRepository::append`] (field paths are prefixed with `events[i]`);
    /// nothing is written then.
    pub async fn append_batch(&self, events: Vec<NewEvent>) -> Result<Vec<EventRecord>> {
        validate::validate_batch(&events, self.limits())?;
        self.append_batch_valid(events).await
    }

    /// [`EventRepository::append_batch`] for a JSON array of events in the TypeScript API's
    /// shape: each event parsed and checked once, by [`validate::parse_batch`].
    ///
    /// Fails like [`EventRepository::append_batch`].
    pub async fn append_batch_json(&self, events: Value) -> Result<Vec<EventRecord>> {
        let events = validate::parse_batch_owned(events, self.limits())?;
        validate::validate_batch_shape(&events)?;
        self.append_batch_valid(events).await
    }

    pub(super) async fn append_batch_valid(&self, events: Vec<NewEvent>) -> Result<Vec<EventRecord>> {
        self.check_dual_write().await?;
        let n = events.len();
        let mut ids = Vec::with_capacity(n);
        let mut timestamps = Vec::with_capacity(n);
        let mut aggregate_ids = Vec::with_capacity(n);
        let mut aggregate_types = Vec::with_capacity(n);
        let mut event_types = Vec::with_capacity(n);
        let mut user_ids = Vec::with_capacity(n);
        let mut datas = Vec::with_capacity(n);
        let mut metadatas = Vec::with_capacity(n);
        let mut versions = Vec::with_capacity(n);
        let mut causation_ids = Vec::with_capacity(n);
        let mut correlation_ids = Vec::with_capacity(n);
        let mut sources = Vec::with_capacity(n);
        let mut schema_versions = Vec::with_capacity(n);
        // One entry per aggregate, in order of first appearance.
        let mut agg_index: HashMap<Uuid, usize> = HashMap::new();
        let mut agg_ids = Vec::new();
        let mut agg_types: Vec<&str> = Vec::new();
        let mut agg_users = Vec::new();
        let mut agg_first = Vec::new();
        let mut agg_last = Vec::new();
        let mut agg_spans: Vec<TimeSpan> = Vec::new();
        for event in &events {
            ids.push(event.id.unwrap_or_else(Uuid::now_v7));
            timestamps.push(event.timestamp);
            aggregate_ids.push(event.aggregate_id);
            aggregate_types.push(event.aggregate_type.as_str());
            event_types.push(event.event_type.as_str());
            user_ids.push(event.user_id.as_str());
            datas.push(&event.data);
            metadatas.push(event.metadata.as_ref());
            versions.push(event.version);
            causation_ids.push(event.causation_id);
            correlation_ids.push(event.correlation_id);
            sources.push(event.source.as_str());
            schema_versions.push(event.schema_version);
            match agg_index.get(&event.aggregate_id) {
                Some(&i) => {
                    if agg_types[i] != event.aggregate_type.as_str() {
                        return Err(Error::AggregateTypeMismatch {
                            aggregate_id: event.aggregate_id,
                            stored: agg_types[i].to_owned(),
                            given: event.aggregate_type.as_str().to_owned(),
                        });
                    }
                    agg_last[i] = event.version;
                    agg_spans[i].add(event.timestamp);
                }
                None => {
                    agg_index.insert(event.aggregate_id, agg_ids.len());
                    agg_ids.push(event.aggregate_id);
                    agg_types.push(event.aggregate_type.as_str());
                    agg_users.push(event.user_id.as_str());
                    agg_first.push(event.version);
                    agg_last.push(event.version);
                    agg_spans.push(TimeSpan::of(event.timestamp));
                }
            }
        }
        // The statement's entries per aggregate, sorted by aggregate id.
        let mut order: Vec<usize> = (0..agg_ids.len()).collect();
        order.sort_unstable_by_key(|&i| agg_ids[i]);
        let sorted_ids: Vec<Uuid> = order.iter().map(|&i| agg_ids[i]).collect();
        let sorted_types: Vec<&str> = order.iter().map(|&i| agg_types[i]).collect();
        let sorted_users: Vec<&str> = order.iter().map(|&i| agg_users[i]).collect();
        let sorted_first: Vec<i32> = order.iter().map(|&i| agg_first[i]).collect();
        let sorted_last: Vec<i32> = order.iter().map(|&i| agg_last[i]).collect();
        let sorted_earliest: Vec<_> = order.iter().map(|&i| agg_spans[i].earliest).collect();
        let sorted_latest: Vec<_> = order.iter().map(|&i| agg_spans[i].latest).collect();
        let sorted_takes_now: Vec<bool> = order.iter().map(|&i| agg_spans[i].takes_now).collect();

        let mut client = self.client().await?;
        let user_sql = self.scope.as_deref().map(set_user_sql).unwrap_or_default();
        let params: [&(dyn ToSql + Sync); 21] = [
            &ids,
            &timestamps,
            &aggregate_ids,
            &aggregate_types,
            &event_types,
            &user_ids,
            &datas,
            &metadatas,
            &versions,
            &causation_ids,
            &correlation_ids,
            &sources,
            &sorted_ids,
            &sorted_types,
            &sorted_users,
            &sorted_first,
            &sorted_last,
            &sorted_earliest,
            &sorted_latest,
            &sorted_takes_now,
            &schema_versions,
        ];
        // On Citus, batches that share aggregates can deadlock across workers (on one server they
        // lock the streams in aggregate order and never do): the transaction is rolled back, so
        // the batch is tried again, a few times. So is a batch whose guard failed only because a
        // concurrent append created or moved one of its aggregates in between.
        let mut deadlocks = 0;
        let mut raced = 0;
        let mut rows = loop {
            let tx = client.begin(&user_sql).await?;
            // The id of a unique violation on the id registry: row-level security may hide the
            // stored event that holds it (another user's) from the diagnosis below.
            let mut duplicate = None;
            let inserted = match Session::Tx(&tx).prepare_cached(&self.append_batch_sql).await {
                Ok(stmt) => tx.query(&stmt, &params).await,
                Err(e) => Err(e),
            };
            match inserted {
                Ok(rows) if rows.len() == n => {
                    tx.commit().await?;
                    break rows;
                }
                Ok(_) => {}
                Err(e) if is_duplicate_id(&e) => {
                    duplicate = Some(duplicate_id_of(&e, &ids));
                }
                Err(e) if is_existing_stream(&e) => {}
                Err(e) if deadlocks < 3 && is_deadlock(&e) => {
                    deadlocks += 1;
                    tx.rollback().await?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            // The guard may have moved some stream rows before failing: undo.
            tx.rollback().await?;
            // Look at the committed state (in a transaction of its own, which carries a scoped
            // user).
            let tx = client.begin(&user_sql).await?;
            let session = Session::Tx(&tx);
            let outcome = match stored_batch(&session, &events, &ids).await {
                Ok(Some(stored)) => Ok(Some(stored)),
                Ok(None) => match duplicate {
                    Some((index, id)) => Err(Error::DuplicateEventId {
                        id,
                        field: format!("events[{index}].id"),
                    }),
                    None => match self
                        .diagnose_batch(&session, &events, &agg_ids, &agg_first, &agg_types)
                        .await
                    {
                        Some(error) => Err(error),
                        None => Ok(None),
                    },
                },
                Err(e) => Err(e),
            };
            tx.rollback().await?;
            match outcome {
                Ok(Some(stored)) => return Ok(stored),
                Ok(None) if raced < 3 => raced += 1,
                Ok(None) => return Err(moved_concurrently()),
                Err(e) => return Err(e),
            }
        };
        self.wake_subscribers();

        // Positions are drawn in batch order, so sorting by position restores it.
        rows.sort_by_key(|r| r.get::<_, i64>(2));
        drop(datas);
        drop(metadatas);
        let mut out = Vec::with_capacity(n);
        for ((event, row), id) in events.into_iter().zip(&rows).zip(&ids) {
            if row.get::<_, Uuid>(0) != *id {
                return Err(Error::Internal {
                    message: "batch insert returned rows out of order".into(),
                });
            }
            out.push(record_from_new(event, *id, row.get(1), row.get(2)));
        }
        Ok(out)
    }

    /// Names the first aggregate of a failed batch whose guard did not pass (in batch order), or
    /// `None` when the committed state lets every guard pass: a concurrent append moved or
    /// created an aggregate of the batch after its statement read it.
    pub(super) async fn diagnose_batch(
        &self,
        client: &Session<'_, '_>,
        events: &[NewEvent],
        agg_ids: &[Uuid],
        agg_first: &[i32],
        agg_types: &[&str],
    ) -> Option<Error> {
        let rows = match client
            .query(
                "SELECT aggregate_id, version, aggregate_type FROM event_streams WHERE aggregate_id = ANY ($1)",
                &[&agg_ids],
            )
            .await
        {
            Ok(rows) => rows,
            Err(e) => return Some(e.into()),
        };
        let current: HashMap<Uuid, (i32, String)> = rows.iter().map(|r| (r.get(0), (r.get(1), r.get(2)))).collect();
        for (i, agg) in agg_ids.iter().enumerate() {
            if !current.contains_key(agg) {
                match unseen_aggregate(client, *agg).await {
                    Ok(Unseen::Hidden) => return Some(hidden_aggregate(*agg)),
                    Ok(Unseen::Deleted) => return Some(Error::StreamDeleted { aggregate_id: *agg }),
                    Ok(Unseen::JustCreated) => return None,
                    // A new aggregate that does not exist yet: not what failed the batch.
                    Ok(Unseen::Absent) if agg_first[i] == 1 => continue,
                    Ok(Unseen::Absent) => {}
                    Err(e) => return Some(e),
                }
            }
            let (actual, stored_type) = current.get(agg).cloned().unwrap_or((0, agg_types[i].to_owned()));
            if stored_type != agg_types[i] {
                return Some(Error::AggregateTypeMismatch {
                    aggregate_id: *agg,
                    stored: stored_type,
                    given: agg_types[i].to_owned(),
                });
            }
            if actual != agg_first[i] - 1 {
                let event = events
                    .iter()
                    .find(|e| e.aggregate_id == *agg)
                    .expect("aggregate comes from the batch");
                return Some(conflict(event, actual));
            }
        }
        None
    }
}

/// A batch that failed, seen through the id registry: `Some(records)` when every event is
/// already stored with its id at its aggregate and version (a retry after a lost reply), `None`
/// when none is.
///
/// Fails with [`Error::DuplicateEventId`] when an id is stored as another event, and
/// [`Error::BatchPartlyStored`] when some events are stored and others not.
pub(super) async fn stored_batch(
    client: &Session<'_, '_>,
    events: &[NewEvent],
    ids: &[Uuid],
) -> Result<Option<Vec<EventRecord>>> {
    let registered: HashMap<Uuid, (Uuid, i32)> = client
        .query(
            "SELECT id, aggregate_id, version FROM events_v2_ids WHERE id = ANY ($1)",
            &[&ids],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let mut stored = Vec::new();
    for (i, (event, id)) in events.iter().zip(ids).enumerate() {
        match registered.get(id) {
            Some(&(aggregate, version)) if aggregate == event.aggregate_id && version == event.version => {
                stored.push(i)
            }
            Some(_) => {
                return Err(Error::DuplicateEventId {
                    id: *id,
                    field: format!("events[{i}].id"),
                })
            }
            None => {}
        }
    }
    if stored.is_empty() {
        return Ok(None);
    }
    if stored.len() < events.len() {
        return Err(Error::BatchPartlyStored { stored });
    }
    // Every event is stored: read them back, bounded by their streams' time spans.
    let aggregates: Vec<Uuid> = events.iter().map(|e| e.aggregate_id).collect();
    let versions: Vec<i32> = events.iter().map(|e| e.version).collect();
    let span = client
        .query_one(
            "SELECT min(first_timestamp), max(last_timestamp) FROM event_streams WHERE aggregate_id = ANY ($1)",
            &[&aggregates],
        )
        .await?;
    let (Some(first), Some(last)) = (
        span.get::<_, Option<DateTime<Utc>>>(0),
        span.get::<_, Option<DateTime<Utc>>>(1),
    ) else {
        return Err(Error::Internal {
            message: "a stored batch's streams are not visible".into(),
        });
    };
    let rows = client
        .query_typed(
            &format!(
                "SELECT {EVENT_COLUMNS} FROM events_v2 e \
                  WHERE e.\"timestamp\" >= $3 AND e.\"timestamp\" <= $4 \
                    AND (e.aggregate_id, e.version) IN (SELECT a, v FROM unnest($1::uuid[], $2::int4[]) AS k(a, v))"
            ),
            &[
                (&aggregates, Type::UUID_ARRAY),
                (&versions, Type::INT4_ARRAY),
                (&first, Type::TIMESTAMPTZ),
                (&last, Type::TIMESTAMPTZ),
            ],
        )
        .await?;
    let mut by_key: HashMap<(Uuid, i32), EventRecord> = HashMap::new();
    for row in &rows {
        let record = record_from_row(row)?;
        by_key.insert((record.aggregate_id, record.version), record);
    }
    events
        .iter()
        .map(|e| {
            by_key
                .remove(&(e.aggregate_id, e.version))
                .ok_or_else(|| Error::Internal {
                    message: format!("stored event {} v{} was not found", e.aggregate_id, e.version),
                })
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// The batch index and id named by a unique violation on the id registry ("Key (id)=(...)
/// already exists."); the batch's first id when the server's detail does not say.
pub(super) fn duplicate_id_of(e: &tokio_postgres::Error, ids: &[Uuid]) -> (usize, Uuid) {
    let named = e
        .as_db_error()
        .and_then(|db| db.detail())
        .and_then(|d| d.strip_prefix("Key (id)=("))
        .and_then(|d| d.split_once(')'))
        .and_then(|(id, _)| Uuid::parse_str(id).ok());
    named
        .and_then(|id| ids.iter().position(|i| *i == id).map(|i| (i, id)))
        .unwrap_or((0, ids[0]))
}

/// A deadlock, on one server or across a Citus cluster's workers (Citus reports its distributed
/// deadlocks with the same SQLSTATE).
pub(super) fn is_deadlock(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED)
}

/// A batch's version 1 for an aggregate that exists (see `stream_guard_ctes`).
pub(super) fn is_existing_stream(e: &tokio_postgres::Error) -> bool {
    violates(e, "event_streams_pkey")
}
