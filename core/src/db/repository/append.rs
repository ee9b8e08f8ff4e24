//! Single appends: the append statement (and its forms through a pooler and on Citus), the
//! optimistic-locking guard, the diagnosis of a guard that did not pass (conflict, idempotent
//! retry, another user's aggregate), and the record an append returns.
//!
//! Owns [`APPEND_SQL`] and the choice of statement. Calls the connections ([`crate::db::conn`]).

use super::*;

/// One round trip: the version guard on event_streams and the insert, in one statement. The
/// insert happens only when the guard row was created (version 1) or advanced from exactly
/// version - 1; concurrent appends of the same version serialize on the event_streams row and
/// all but one find the guard false.
pub(super) const APPEND_SQL: &str = concat!(
    r#"
WITH ev AS (
    SELECT $1::uuid AS id, coalesce($2::timestamptz, now()) AS ts, $3::uuid AS aggregate_id,
           $4::text AS aggregate_type, $5::text AS event_type, $6::text AS user_id, $7::jsonb AS data,
           $8::jsonb AS metadata, $9::integer AS version, $10::uuid AS causation_id,
           $11::uuid AS correlation_id, $12::text AS source, $13::integer AS schema_version
), created AS (
    INSERT INTO event_streams (aggregate_id, aggregate_type, user_id, version, first_timestamp, last_timestamp)
    SELECT aggregate_id, aggregate_type, user_id, version, ts, ts FROM ev WHERE version = 1
    ON CONFLICT (aggregate_id) DO NOTHING
    RETURNING aggregate_id
), advanced AS (
    UPDATE event_streams s
       SET version = ev.version,
           first_timestamp = least(s.first_timestamp, ev.ts),
           last_timestamp = greatest(s.last_timestamp, ev.ts)
      FROM ev
     WHERE s.aggregate_id = ev.aggregate_id
       AND ev.version > 1
       AND s.version = ev.version - 1
       AND s.aggregate_type = ev.aggregate_type
    RETURNING s.aggregate_id
), inserted AS (
    INSERT INTO events_v2 (id, "timestamp", aggregate_id, aggregate_type, event_type, user_id, data, metadata,
                           version, causation_id, correlation_id, source, schema_version)
    SELECT id, ts, aggregate_id, aggregate_type, event_type, user_id, data, metadata,
           version, causation_id, correlation_id, source, schema_version
      FROM ev
     WHERE EXISTS (SELECT 1 FROM created UNION ALL SELECT 1 FROM advanced)
       AND "#,
    feed_days_mark!(),
    r#"
    RETURNING "timestamp", position/*DUAL_RETURNING*/
), ids AS (
    INSERT INTO events_v2_ids (id, aggregate_id, version, user_id)
    SELECT id, aggregate_id, version, user_id FROM ev WHERE EXISTS (SELECT 1 FROM created UNION ALL SELECT 1 FROM advanced)
), dirty AS (
    INSERT INTO events_daily_dirty (day)
    SELECT ("timestamp" AT TIME ZONE 'UTC')::date FROM inserted
    ON CONFLICT (day) DO NOTHING
), "#,
    feed_days_ctes!(),
    r#"/*DUAL_WRITE*/
SELECT "timestamp", position FROM inserted
"#
);

/// The append of the citus mode (migration 0014): the same parameters and result as
/// [`APPEND_SQL`], each step routed to the aggregate's shard.
pub(super) const ROUTED_APPEND_SQL: &str = r#"SELECT "timestamp", "position" FROM synap_append_routed($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"#;

pub(super) const ROUTED_APPEND_SIGNATURE: &str =
    "synap_append_routed(uuid, timestamptz, uuid, text, text, text, jsonb, jsonb, integer, uuid, uuid, text, integer)";

pub(super) const PLANNED_APPEND_SQL: &str =
    r#"SELECT out_timestamp, out_position FROM synap_append($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"#;

pub(super) const PLANNED_APPEND_SIGNATURE: &str =
    "synap_append(uuid, timestamptz, uuid, text, text, text, jsonb, jsonb, integer, uuid, uuid, text, integer)";

impl EventRepository {
    /// Appends one event. `event.version` must be the aggregate's current version + 1 (1 creates
    /// the aggregate).
    ///
    /// Fails with [`Error::Validation`] for a bad event, [`Error::ConcurrencyConflict`] when the
    /// aggregate is at another version, and [`Error::AggregateTypeMismatch`] when it exists with
    /// another type; nothing is written then. When `event.id` is given and that event is already
    /// stored as this aggregate's event at this version, returns the stored event (a retried
    /// append is idempotent).
    pub async fn append(&self, event: NewEvent) -> Result<EventRecord> {
        event.validate(self.limits())?;
        self.append_valid(event).await
    }

    /// [`EventRepository::append`] for an event given as JSON in the TypeScript API's shape
    /// (camelCase keys): parsed and checked once, by [`validate::parse_event`].
    ///
    /// Fails like [`EventRepository::append`], with the first problem [`validate::parse_event`]
    /// reports.
    pub async fn append_json(&self, event: Value) -> Result<EventRecord> {
        let event = validate::parse_event_owned(event, self.limits()).map_err(Error::from_issue_list)?;
        self.append_valid(event).await
    }

    /// With dual-write on: fails with [`Error::LegacyHistoryPending`] until the legacy table's
    /// history has been migrated once. An append before would become an aggregate's first
    /// version, and its older legacy history would then be numbered after it.
    pub(super) async fn check_dual_write(&self) -> Result<()> {
        let Some(table) = &self.config.dual_write_legacy_table else {
            return Ok(());
        };
        if self.dual_write_ready.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        let quoted = crate::db::sql::quote_table(table)?;
        let mut client = self.client().await?;
        let migrated: bool = client
            .query_one(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM legacy_migration_runs
                                     WHERE legacy_table = synap_legacy_table_key('{quoted}'::regclass)
                                       AND history_migrated_at IS NOT NULL)"
                ),
                &[],
            )
            .await?
            .get(0);
        if !migrated {
            return Err(Error::LegacyHistoryPending { table: table.clone() });
        }
        self.dual_write_ready.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    pub(super) async fn append_valid(&self, event: NewEvent) -> Result<EventRecord> {
        self.check_dual_write().await?;
        let id = event.id.unwrap_or_else(Uuid::now_v7);
        let stored = match self.append_at_once(&event, id).await? {
            Some(row) => record_from_new(event, id, row.get(0), row.get(1)),
            None => in_session!(self, |client| { self.append_in(&client, event, id).await })?,
        };
        self.wake_subscribers();
        Ok(stored)
    }

    /// The usual append in one round trip ([`Conn::at_once`]): its statement in a transaction of
    /// its own, written together with `BEGIN`, the settings (through a pooler) or the scoped
    /// user, and `COMMIT`. The stored row's timestamp and position, or `None` where the guard
    /// did not pass (a version conflict, an existing id, another user's aggregate) or the
    /// repository does not know its append statement yet: then [`EventRepository::append_in`]
    /// runs, tries again and says why, in a transaction of the usual kind.
    pub(super) async fn append_at_once(&self, event: &NewEvent, id: Uuid) -> Result<Option<Row>> {
        let Some(sql) = self.known_append_statement() else {
            return Ok(None);
        };
        let params: [&(dyn ToSql + Sync); 13] = [
            &id,
            &event.timestamp,
            &event.aggregate_id,
            &event.aggregate_type.as_str(),
            &event.event_type,
            &event.user_id,
            &event.data,
            &event.metadata,
            &event.version,
            &event.causation_id,
            &event.correlation_id,
            &event.source.as_str(),
            &event.schema_version,
        ];
        let user = self.scope.as_deref().map(set_user_sql).unwrap_or_default();
        // `synap_append` is the route only where `synap_append_routed` is absent: not on Citus.
        let citus = match sql == PLANNED_APPEND_SQL {
            true => Citus::Absent,
            false => Citus::Maybe,
        };
        match self.client().await?.at_once(&user, citus, sql, &params).await {
            Ok(found) => Ok(found.and_then(|(mut rows, _)| rows.pop())),
            Err(e) if is_duplicate_id(&e) => Err(Error::DuplicateEventId { id, field: "id".into() }),
            Err(e) => Err(e.into()),
        }
    }

    /// The statement single appends run, once the repository knows it: `synap_append_routed`
    /// in the citus mode (created by the repeatable migrations there only), `synap_append`
    /// through a transaction-mode pooler ([`ROUTE_PLANNED`]), [`APPEND_SQL`] otherwise. With
    /// dual-write on, the statement in every mode: it also writes the legacy table.
    pub(super) fn known_append_statement(&self) -> Option<&str> {
        if self.config.dual_write_legacy_table.is_some() {
            return Some(&self.append_sql);
        }
        match self.routed_append.load(std::sync::atomic::Ordering::Relaxed) {
            ROUTE_STATEMENT => Some(&self.append_sql),
            ROUTE_FUNCTION => Some(ROUTED_APPEND_SQL),
            ROUTE_PLANNED => Some(PLANNED_APPEND_SQL),
            _ => None,
        }
    }

    /// [`EventRepository::known_append_statement`], asking the database the first time.
    pub(super) async fn append_statement(&self, client: &Session<'_, '_>) -> Result<&str> {
        if let Some(sql) = self.known_append_statement() {
            return Ok(sql);
        }
        let row = client
            .query_one(
                &format!(
                    "SELECT to_regprocedure('{ROUTED_APPEND_SIGNATURE}') IS NOT NULL, \
                            to_regprocedure('{PLANNED_APPEND_SIGNATURE}') IS NOT NULL"
                ),
                &[],
            )
            .await?;
        let route = match (row.get(0), row.get(1)) {
            (true, _) => ROUTE_FUNCTION,
            (false, true) if self.pooled.is_some() => ROUTE_PLANNED,
            _ => ROUTE_STATEMENT,
        };
        self.routed_append.store(route, std::sync::atomic::Ordering::Relaxed);
        Ok(self.known_append_statement().expect("the route was just stored"))
    }

    pub(super) async fn append_in(&self, client: &Session<'_, '_>, event: NewEvent, id: Uuid) -> Result<EventRecord> {
        let stmt = client.prepare_cached(self.append_statement(client).await?).await?;
        // Racing writers can move the aggregate to exactly version - 1 between the failed guard
        // and the diagnosis below; then the append is simply tried again.
        for _ in 0..3 {
            let params: [&(dyn ToSql + Sync); 13] = [
                &id,
                &event.timestamp,
                &event.aggregate_id,
                &event.aggregate_type.as_str(),
                &event.event_type,
                &event.user_id,
                &event.data,
                &event.metadata,
                &event.version,
                &event.causation_id,
                &event.correlation_id,
                &event.source.as_str(),
                &event.schema_version,
            ];
            match client.query(&stmt, &params).await.map(|mut rows| rows.pop()) {
                Ok(Some(row)) => return Ok(record_from_new(event, id, row.get(0), row.get(1))),
                Ok(None) => {}
                Err(e) if is_duplicate_id(&e) => return Err(Error::DuplicateEventId { id, field: "id".into() }),
                Err(e) => return Err(e.into()),
            }
            let stream = client
                .query_opt(
                    "SELECT version, aggregate_type, first_timestamp, last_timestamp FROM event_streams WHERE aggregate_id = $1",
                    &[&event.aggregate_id],
                )
                .await?;
            let Some(stream) = stream else {
                // No stream is visible: there is none, or row-level security hides another
                // user's, or one was created by a writer that committed after the read above.
                match unseen_aggregate(client, event.aggregate_id).await? {
                    Unseen::Hidden => return Err(hidden_aggregate(event.aggregate_id)),
                    Unseen::Deleted => {
                        return Err(Error::StreamDeleted {
                            aggregate_id: event.aggregate_id,
                        })
                    }
                    Unseen::JustCreated => continue,
                    // A version 1 whose guard found a stream that is gone again: try again.
                    Unseen::Absent if event.version == 1 => continue,
                    Unseen::Absent => return Err(conflict(&event, 0)),
                }
            };
            let actual: i32 = stream.get(0);
            let stored_type: String = stream.get(1);
            if let Some(given_id) = event.id {
                if actual >= event.version {
                    let rows = client
                        .query(
                            &format!(
                                "SELECT {EVENT_COLUMNS} FROM events_v2 WHERE aggregate_id = $1 AND version = $2 \
                                 AND \"timestamp\" >= $3 AND \"timestamp\" <= $4"
                            ),
                            &[
                                &event.aggregate_id,
                                &event.version,
                                &stream.get::<_, DateTime<Utc>>(2),
                                &stream.get::<_, DateTime<Utc>>(3),
                            ],
                        )
                        .await?;
                    if let Some(row) = rows.iter().find(|r| r.get::<_, Uuid>(0) == given_id) {
                        return record_from_row(row);
                    }
                }
            }
            if stored_type != event.aggregate_type.as_str() {
                return Err(Error::AggregateTypeMismatch {
                    aggregate_id: event.aggregate_id,
                    stored: stored_type,
                    given: event.aggregate_type.as_str().to_owned(),
                });
            }
            if actual != event.version - 1 {
                return Err(conflict(&event, actual));
            }
        }
        Err(Error::TransactionConflict {
            message: format!("aggregate {} kept moving while appending; retry", event.aggregate_id),
        })
    }
}

/// Whether the statement failed on the id registry's key: an id that is already stored.
pub(super) fn is_duplicate_id(e: &tokio_postgres::Error) -> bool {
    violates(e, "events_v2_ids_pkey")
}

/// Whether the aggregate exists, whoever it belongs to (`synap_aggregate_exists` runs with the
/// owner's rights and answers nothing more).
/// What an aggregate is whose stream row a statement of this session did not see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unseen {
    /// There is none.
    Absent,
    /// Row-level security hides it: another user's.
    Hidden,
    /// A writer created it and committed after the statement that missed it.
    JustCreated,
    /// There is none: it was deleted for good (`delete_stream` with `hard`).
    Deleted,
}

/// Tells the three [`Unseen`] cases apart. `synap_aggregate_exists` answers with the owner's
/// rights; a row it finds is committed, so it is visible to this session's next statement unless
/// row-level security hides it. A stream created by a concurrent writer is thus never taken for
/// another user's (which would be `PERMISSION_DENIED`, where the caller should see a conflict).
pub(super) async fn unseen_aggregate(client: &Session<'_, '_>, aggregate_id: Uuid) -> Result<Unseen> {
    let row = client
        .query_one(
            "SELECT synap_aggregate_exists($1), synap_stream_deleted($1)",
            &[&aggregate_id],
        )
        .await?;
    if !row.get::<_, bool>(0) {
        return Ok(if row.get(1) { Unseen::Deleted } else { Unseen::Absent });
    }
    let visible = client
        .query_opt("SELECT 1 FROM event_streams WHERE aggregate_id = $1", &[&aggregate_id])
        .await?
        .is_some();
    Ok(if visible { Unseen::JustCreated } else { Unseen::Hidden })
}

/// A batch whose guard failed although the committed state, read after it, lets it pass: a
/// concurrent append moved or created one of its aggregates in between. The batch is tried again.
pub(super) fn moved_concurrently() -> Error {
    Error::TransactionConflict {
        message: "a concurrent append moved an aggregate of the batch; retry".into(),
    }
}

pub(super) fn hidden_aggregate(aggregate_id: Uuid) -> Error {
    Error::PermissionDenied {
        message: format!("aggregate {aggregate_id} exists but belongs to another user"),
    }
}

pub(super) fn conflict(event: &NewEvent, actual: i32) -> Error {
    Error::ConcurrencyConflict {
        aggregate_id: event.aggregate_id,
        expected_version: event.version - 1,
        actual_version: actual,
    }
}

pub(super) fn record_from_new(mut event: NewEvent, id: Uuid, timestamp: DateTime<Utc>, position: i64) -> EventRecord {
    crate::db::json::in_jsonb_order(&mut event.data);
    if let Some(metadata) = event.metadata.as_mut() {
        crate::db::json::in_jsonb_order(metadata);
    }
    EventRecord {
        id,
        timestamp,
        aggregate_id: event.aggregate_id,
        aggregate_type: event.aggregate_type,
        event_type: event.event_type,
        user_id: event.user_id,
        data: event.data,
        metadata: event.metadata,
        version: event.version,
        causation_id: event.causation_id,
        correlation_id: event.correlation_id,
        source: event.source,
        position,
        unreadable: None,
        schema_version: event.schema_version,
        upcast_from: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `synap_append` (migrations/repeatable/20_streams.sql) runs [`APPEND_SQL`] word for word:
    /// through a pooler and directly connected, an append is the same statement.
    #[test]
    fn the_pooled_append_function_runs_the_append_statement() {
        let file = include_str!("../../../../migrations/repeatable/20_streams.sql");
        let start = file
            .find("CREATE OR REPLACE FUNCTION synap_append(")
            .expect("synap_append is defined");
        let body = &file[start..];
        let body = &body[body.find("RETURN QUERY").expect("a RETURN QUERY") + "RETURN QUERY".len()..];
        let body = &body[..body.find(";\nEND").expect("the statement ends the function")];
        let words = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        assert_eq!(words(body), words(&with_dual_write(APPEND_SQL, None).unwrap()));
        assert!(PLANNED_APPEND_SIGNATURE.starts_with("synap_append("));
    }
}
