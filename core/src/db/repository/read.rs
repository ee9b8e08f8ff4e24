//! Reads: an aggregate's stream, a user's stream, correlated events, events by type, counts, and
//! the analytics refresh. Each statement is bounded by time where the storage is partitioned by
//! time, so that only the partitions or chunks that can hold rows are read.
//!
//! Owns the read statements. Calls the connections and [`record_from_row`].

use super::*;

/// The stream read, bounded by the stream's first and last timestamps so that only the chunks
/// or partitions in its time span are scanned.
pub(crate) const STREAM_SQL: &str = r#"
SELECT id, "timestamp", aggregate_id, aggregate_type, event_type, user_id, data, metadata,
       version, causation_id, correlation_id, source, position, schema_version
  FROM events_v2
 WHERE aggregate_id = $1
   AND "timestamp" >= $2 AND "timestamp" <= $3
   AND version > $4 AND version <= $5
   AND ($6::text[] IS NULL OR event_type = ANY ($6))
 ORDER BY version
"#;

/// `$2` is computed by the caller (now - days): a constant lets the planner prune partitions
/// before planning them, where `now() - interval` is only pruned after planning every one.
pub(super) const USER_STREAM_SQL: &str = r#"
SELECT id, "timestamp", aggregate_id, aggregate_type, event_type, user_id, data, metadata,
       version, causation_id, correlation_id, source, position, schema_version
  FROM events_v2
 WHERE user_id = $1
   AND "timestamp" >= $2
   AND ($3::text[] IS NULL OR event_type = ANY ($3))
   AND ($4::text[] IS NULL OR aggregate_type = ANY ($4))
 ORDER BY "timestamp" DESC, position DESC
 LIMIT $5
"#;

pub(super) const CORRELATED_SQL: &str = r#"
SELECT id, "timestamp", aggregate_id, aggregate_type, event_type, user_id, data, metadata,
       version, causation_id, correlation_id, source, position, schema_version
  FROM events_v2
 WHERE correlation_id = $1
 ORDER BY "timestamp", position
"#;

pub(super) const BY_TYPE_SQL: &str = r#"
SELECT id, "timestamp", aggregate_id, aggregate_type, event_type, user_id, data, metadata,
       version, causation_id, correlation_id, source, position, schema_version
  FROM events_v2
 WHERE event_type = $1
 ORDER BY "timestamp" DESC, position DESC
 LIMIT $2
"#;

pub(super) const COUNT_SQL: &str = r#"
SELECT count(*)
  FROM events_v2
 WHERE ($1::text IS NULL OR user_id = $1)
   AND ($2::text IS NULL OR event_type = $2)
   AND ($3::text IS NULL OR aggregate_type = $3)
   AND ($4::timestamptz IS NULL OR "timestamp" >= $4)
   AND ($5::timestamptz IS NULL OR "timestamp" < $5)
"#;

impl EventRepository {
    /// The aggregate's events in version order (an empty list for an unknown aggregate).
    ///
    /// Reads only the chunks or partitions between the stream's first and last event. Fails with
    /// [`Error::Validation`] for bad options, and with [`Error::HistoryRemoved`] when retention
    /// removed versions the read asks for (`from_version` below the retained snapshot's).
    pub async fn get_aggregate_stream(&self, aggregate_id: Uuid, options: &StreamOptions) -> Result<Vec<EventRecord>> {
        let after = options.from_version.unwrap_or(0);
        if after < 0 {
            return Err(Error::invalid(
                "fromVersion",
                IssueCode::OutOfRange,
                format!("fromVersion must be 0 or more, not {after}"),
            ));
        }
        let to = options.to_version.unwrap_or(i32::MAX);
        let types = matchable(options.event_types.as_deref());
        if to <= after || types.as_ref().is_some_and(Vec::is_empty) && options.event_types.is_some() {
            return Ok(Vec::new());
        }
        in_session!(self, |client| {
            let Some(span) = client
                .query_opt(
                    "SELECT first_timestamp, last_timestamp, version, retained_from FROM event_streams WHERE aggregate_id = $1",
                    &[&aggregate_id],
                )
                .await?
            else {
                return Ok(Vec::new());
            };
            let first: DateTime<Utc> = span.get(0);
            let last: DateTime<Utc> = span.get(1);
            // Retention removed the versions before retained_from (a snapshot keeps their state):
            // say so rather than return a stream with its start missing.
            let retained_from: i32 = span.get(3);
            if retained_from > 1 && after < retained_from - 1 {
                return Err(Error::HistoryRemoved {
                    aggregate_id,
                    retained_from,
                    snapshot_version: retained_from - 1,
                });
            }
            // The versions the stream row counts: an append that commits between the two reads
            // may extend the span, so without this bound a read could return 1..n and n + 2.
            let to = to.min(span.get::<_, i32>(2));
            let rows = client
                .query_typed(
                    STREAM_SQL,
                    &[
                        (&aggregate_id, Type::UUID),
                        (&first, Type::TIMESTAMPTZ),
                        (&last, Type::TIMESTAMPTZ),
                        (&after, Type::INT4),
                        (&to, Type::INT4),
                        (&types, Type::TEXT_ARRAY),
                    ],
                )
                .await?;
            rows.iter().map(|r| self.delivered(r)).collect::<Result<Vec<_>>>()
        })
    }

    /// The query plan of [`EventRepository::get_aggregate_stream`] for this aggregate, as
    /// PostgreSQL's text EXPLAIN (to check which chunks or partitions a read touches).
    pub async fn explain_aggregate_stream(&self, aggregate_id: Uuid) -> Result<String> {
        let mut client = self.client().await?;
        let Some(span) = client
            .query_opt(
                "SELECT first_timestamp, last_timestamp FROM event_streams WHERE aggregate_id = $1",
                &[&aggregate_id],
            )
            .await?
        else {
            return Ok(String::new());
        };
        let first: DateTime<Utc> = span.get(0);
        let last: DateTime<Utc> = span.get(1);
        let none: Option<Vec<String>> = None;
        let rows = client
            .query(
                &format!("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) {STREAM_SQL}"),
                &[&aggregate_id, &first, &last, &0i32, &i32::MAX, &none],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
            .join("\n"))
    }

    /// The aggregate's current version, or `None` when it has no events.
    pub async fn get_aggregate_version(&self, aggregate_id: Uuid) -> Result<Option<i32>> {
        in_session!(self, |client| {
            Ok(client
                .query_opt(
                    "SELECT version FROM event_streams WHERE aggregate_id = $1",
                    &[&aggregate_id],
                )
                .await?
                .map(|r| r.get(0)))
        })
    }

    /// A user's recent events, newest first.
    ///
    /// Fails with [`Error::Validation`] for a bad user id or options.
    pub async fn get_user_stream(&self, user_id: &str, options: &UserStreamOptions) -> Result<Vec<EventRecord>> {
        let limits = self.limits();
        let days = validate::check_days("days", options.days, limits)?;
        let since = Utc::now() - chrono::Duration::days(days);
        let limit = validate::check_limit("limit", options.limit, limits)?;
        let types = matchable(options.event_types.as_deref());
        if !can_match(user_id) || types.as_ref().is_some_and(Vec::is_empty) && options.event_types.is_some() {
            return Ok(Vec::new());
        }
        let aggregate_types = matchable(options.aggregate_types.as_deref());
        in_session!(self, |client| {
            let rows = client
                .query_typed(
                    USER_STREAM_SQL,
                    &[
                        (&user_id, Type::TEXT),
                        (&since, Type::TIMESTAMPTZ),
                        (&types, Type::TEXT_ARRAY),
                        (&aggregate_types, Type::TEXT_ARRAY),
                        (&limit, Type::INT8),
                    ],
                )
                .await?;
            rows.iter().map(|r| self.delivered(r)).collect::<Result<Vec<_>>>()
        })
    }

    /// The query plan of [`EventRepository::get_user_stream`], as PostgreSQL's text EXPLAIN
    /// (ANALYZE), to check that the read touches only the chunks or partitions of its days.
    ///
    /// Fails like [`EventRepository::get_user_stream`].
    pub async fn explain_user_stream(&self, user_id: &str, options: &UserStreamOptions) -> Result<String> {
        let limits = self.limits();
        let days = validate::check_days("days", options.days, limits)?;
        let since = Utc::now() - chrono::Duration::days(days);
        let limit = validate::check_limit("limit", options.limit, limits)?;
        let aggregate_types = matchable(options.aggregate_types.as_deref());
        let mut client = self.client().await?;
        let rows = client
            .query(
                &format!("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) {USER_STREAM_SQL}"),
                &[&user_id, &since, &options.event_types, &aggregate_types, &limit],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
            .join("\n"))
    }

    /// Every event of a workflow, oldest first.
    pub async fn get_correlated_events(&self, correlation_id: Uuid) -> Result<Vec<EventRecord>> {
        in_session!(self, |client| {
            let stmt = client.prepare_cached(CORRELATED_SQL).await?;
            let rows = client.query(&stmt, &[&correlation_id]).await?;
            rows.iter().map(|r| self.delivered(r)).collect::<Result<Vec<_>>>()
        })
    }

    /// The latest events of one type, newest first.
    ///
    /// Fails with [`Error::Validation`] for a bad type or limit.
    pub async fn get_events_by_type(&self, event_type: &str, limit: i64) -> Result<Vec<EventRecord>> {
        let limit = validate::check_limit("limit", limit, self.limits())?;
        if !can_match(event_type) {
            return Ok(Vec::new());
        }
        in_session!(self, |client| {
            let stmt = client.prepare_cached(BY_TYPE_SQL).await?;
            let rows = client.query(&stmt, &[&event_type, &limit]).await?;
            rows.iter().map(|r| self.delivered(r)).collect::<Result<Vec<_>>>()
        })
    }

    /// How many events match every given filter (0 when a filter matches nothing, such as a
    /// `to_date` before the `from_date`).
    pub async fn count_events(&self, filter: &CountFilter) -> Result<i64> {
        let filters = [&filter.user_id, &filter.event_type];
        if filters.iter().any(|f| f.as_deref().is_some_and(|f| !can_match(f))) {
            return Ok(0);
        }
        let aggregate_type = filter.aggregate_type.as_deref();
        in_session!(self, |client| {
            let stmt = client.prepare_cached(COUNT_SQL).await?;
            Ok(client
                .query_one(
                    &stmt,
                    &[
                        &filter.user_id,
                        &filter.event_type,
                        &aggregate_type,
                        &filter.from_date,
                        &filter.to_date,
                    ],
                )
                .await?
                .get(0))
        })
    }

    /// Recomputes `events_daily` for the days that received events since the last refresh
    /// (every day when `full`). Returns how many days were recomputed. Appends wait while it runs.
    pub async fn refresh_analytics(&self, full: bool) -> Result<i32> {
        self.refuse_scoped("refresh_analytics")?;
        let mut client = self.client().await?;
        Ok(client
            .query_one("SELECT refresh_events_daily($1)", &[&full])
            .await?
            .get(0))
    }
}

/// The event types of a filter that can match a stored type (none holds U+0000).
pub(super) fn matchable(types: Option<&[String]>) -> Option<Vec<&str>> {
    types.map(|types| types.iter().map(String::as_str).filter(|t| can_match(t)).collect())
}
