//! Replay where the data lives: an aggregate's stored events folded in Rust as they are read, from
//! the newest usable snapshot on, and the snapshots themselves.
//!
//! A replay reads one consistent snapshot of the database (a REPEATABLE READ, read-only
//! transaction): the stream row, the newest snapshot made by the same fold rules at or below the
//! target, then the events after it in pages of [`PAGE`] versions, each planned for its bounds
//! (only the partitions or chunks of the stream's time span), each folded before the next is
//! kept. Memory holds the state and one page, whatever the stream's length.
//!
//! The fold is [`crate::fold`]'s, the same that `foldEvents` runs in Node and in the browser.
//!
//! About 850 lines with its tests: replay and the snapshot writer (`snapshot`, the bulk
//! snapshots after retention) share the stream row, the snapshot statements and the fold rules'
//! fingerprint, and each is read beside the other.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Value};
use tokio_postgres::types::Type;
use uuid::Uuid;

use crate::db::json::StoredJson;
use crate::db::repository::{record_from_row, set_user_sql, EventRepository, STREAM_SQL};
use crate::error::{Error, Result};
use crate::fold::{Bookkeeping, FoldErrorKind, FoldOptions, FoldResult, RecordFolder, Snapshot};
use crate::model::EventRecord;
use crate::upcast::Upcasters;

/// Versions read per page (each page is the ordinary stream read, `STREAM_SQL`, over a version
/// window).
const PAGE: i32 = 5_000;

/// The newest snapshot of these rules at or below a version, usable as of a time (`$4`, NULL
/// for no time limit).
const SNAPSHOT_SQL: &str = "SELECT version, state, deleted, last_timestamp, max_timestamp, user_id
   FROM event_snapshots
  WHERE aggregate_id = $1 AND rules = $2 AND version <= $3
    AND ($4::timestamptz IS NULL OR max_timestamp <= $4)
  ORDER BY version DESC LIMIT 1";

/// Stores a snapshot made in an earlier transaction, only for the stream that was folded: the one
/// with that id created by the same transaction (`created_txid`, `$9`), at that version or
/// later. `FOR SHARE` waits for a retention run that holds `event_streams` (EXCLUSIVE) and then
/// sees its outcome: a stream it removed gets no snapshot, nor does a stream created again with
/// the same id since (another user's, perhaps), which would otherwise start every replay from
/// the removed one's state. `$8` is the snapshot's user: the one user of every event folded into
/// it, NULL when there were several (then only the owner reads it).
const STORE_SNAPSHOT_SQL: &str = "INSERT INTO event_snapshots
       (aggregate_id, rules, version, user_id, state, deleted, last_timestamp, max_timestamp)
SELECT $1, $2, $3, $8, $4, $5, $6, $7 FROM event_streams s
 WHERE s.aggregate_id = $1 AND s.version >= $3 AND s.created_txid::text IS NOT DISTINCT FROM $9
   FOR SHARE
ON CONFLICT DO NOTHING";

/// The name of a fold's rules, stored with each snapshot: a replay uses only snapshots made by
/// the same rules. The fold's own version comes first, so that a change to the fold's
/// semantics (a new `FOLD_RULES_VERSION`) leaves every older snapshot unused.
///
/// A long text (many `ignoreKeys`) is named by its SHA-256 instead (`fold1 sha256:<hex>`): the
/// name is part of the snapshots' primary key, whose index entries PostgreSQL limits to about
/// 2,700 bytes. Under upcasters, the SHA-256 of their canonical text follows (`... upcasters
/// sha256:<hex>`): a snapshot is used only under the definition it was made with, and a changed
/// definition leaves the older snapshots unused, not wrong.
pub fn fold_rules(bookkeeping: &Bookkeeping, upcasters: &Upcasters) -> String {
    let rules = bookkeeping_rules(bookkeeping);
    if upcasters.is_empty() {
        return rules;
    }
    format!("{rules} upcasters sha256:{}", sha256_hex(upcasters.canonical_text()))
}

fn sha256_hex(text: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The rules' text for the bookkeeping rule alone: the text of snapshots stored before upcasters
/// existed, which must not change.
fn bookkeeping_rules(bookkeeping: &Bookkeeping) -> String {
    let mut keys = bookkeeping.ignore_keys.clone();
    keys.sort();
    keys.dedup();
    // Keys in this order: the text of stored snapshots' rules, which must not change.
    let rules =
        json!({ "dropPreviousCompanions": bookkeeping.drop_previous_companions, "ignoreKeys": keys }).to_string();
    if rules.len() <= RULES_TEXT_MAX {
        return format!("fold{FOLD_RULES_VERSION} {rules}");
    }
    format!("fold{FOLD_RULES_VERSION} sha256:{}", sha256_hex(&rules))
}

/// The longest rules text stored as it is.
const RULES_TEXT_MAX: usize = 512;

/// Bumped whenever the fold's rules change what state a stream folds to.
const FOLD_RULES_VERSION: u32 = 1;

/// What [`EventRepository::replay`] returns: the fold's result, and how it was reached.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Replay {
    /// The aggregate's state, version, deleted flag and last event's time, as `foldEvents`
    /// gives them.
    #[serde(flatten)]
    pub result: FoldResult,
    /// The version of the snapshot the fold started from; `None` when it started at version 0.
    pub snapshot_version: Option<i32>,
    /// How many events were folded after it.
    pub events_folded: u64,
    /// Whether this replay stored a snapshot of its result (the snapshot policy, or
    /// [`EventRepository::snapshot`]).
    pub snapshot_stored: bool,
}

/// What [`EventRepository::get_snapshot_and_tail`] returns: the newest snapshot and the events
/// after it, which `foldEvents(events, { from: snapshot })` turns into the current state.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotAndTail {
    /// The newest snapshot (default fold rules), `None` when there is none.
    pub snapshot: Option<Snapshot>,
    /// The events after it (after version 0 without one), in version order.
    pub events: Vec<EventRecord>,
}

/// Parses the options of `replay` from camelCase JSON: `toVersion`, `toTimestamp` and
/// `bookkeeping`, as for `foldEvents` (`null` for the defaults). `history` and `from` are
/// refused: a replay returns one state and picks its own starting point.
pub fn replay_options(value: &Value) -> Result<FoldOptions> {
    if let Value::Object(obj) = value {
        if let Some(key) = obj.keys().find(|k| matches!(k.as_str(), "history" | "from")) {
            return Err(Error::Fold {
                reason: FoldErrorKind::InvalidOptions,
                index: 0,
                message: format!("{key} is not an option of replay (it returns one state and starts from the newest usable snapshot)"),
            });
        }
        if obj.contains_key("upcasters") {
            return Err(Error::Fold {
                reason: FoldErrorKind::InvalidOptions,
                index: 0,
                message: "upcasters is not an option of replay: it folds under the repository's upcasters (its upcasters option), with whose snapshots it starts".into(),
            });
        }
    }
    crate::fold::parse_fold_options(value)
}

struct StreamRow {
    first: DateTime<Utc>,
    last: DateTime<Utc>,
    version: i32,
    retained_from: i32,
    /// The transaction that created the stream row (as text; `None` for rows from before
    /// migration 0015): tells this stream from a later one with the same id.
    created_txid: Option<String>,
}

struct StoredSnapshot {
    snapshot: Snapshot,
    max_timestamp: DateTime<Utc>,
    /// The one user of every event folded into it; `None` for several.
    user_id: Option<String>,
}

/// Whose events a fold has taken in: one user's, or several (a snapshot of it then has no user,
/// and only the owner reads it).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Folded {
    Nothing,
    OneUser(String),
    SeveralUsers,
}

impl Folded {
    fn from_base(base: Option<&StoredSnapshot>) -> Folded {
        match base {
            None => Folded::Nothing,
            Some(StoredSnapshot { user_id: Some(u), .. }) => Folded::OneUser(u.clone()),
            Some(_) => Folded::SeveralUsers,
        }
    }

    fn add(&mut self, user: &str) {
        match self {
            Folded::Nothing => *self = Folded::OneUser(user.to_owned()),
            Folded::OneUser(u) if u != user => *self = Folded::SeveralUsers,
            _ => {}
        }
    }

    /// The user a snapshot of this fold is stored under.
    fn snapshot_user(&self) -> Option<&str> {
        match self {
            Folded::OneUser(u) => Some(u),
            _ => None,
        }
    }
}

/// What a replay's snapshot is stored with: the latest timestamp among the events the result is
/// made of, whose events they were, and which stream they came from.
struct FoldedFrom {
    max_timestamp: Option<DateTime<Utc>>,
    users: Folded,
    created_txid: Option<String>,
}

impl EventRepository {
    /// The state of one aggregate, folded in Rust from its stored events as they are read: from
    /// the newest snapshot made by the same fold rules at or below the target (and, with
    /// `to_timestamp`, made only of events up to that time), then the events after it. Same
    /// rules and result as [`crate::fold::fold_records`] over the whole stream; an unknown
    /// aggregate folds to `null` at version 0. `options.history` and `options.from` must be
    /// unset.
    ///
    /// With [`crate::RepositoryConfig::snapshot_every`] set, a replay that folded at least that
    /// many events stores a snapshot of its result.
    ///
    /// Fails with [`Error::HistoryRemoved`] when retention removed versions the replay needs
    /// (a target before the oldest kept snapshot), and with [`Error::Fold`] if the stored
    /// stream breaks a fold rule.
    pub async fn replay(&self, aggregate_id: Uuid, options: &FoldOptions) -> Result<Replay> {
        if options.history || options.from.is_some() {
            return Err(Error::Fold {
                reason: FoldErrorKind::InvalidOptions,
                index: 0,
                message: "replay takes neither history nor from".into(),
            });
        }
        let (replay, from) = self.replay_in_snapshot(aggregate_id, options).await?;
        let policy = self.config().snapshot_every.map(u64::from);
        // Snapshots are the owner's to write: a user-scoped handle reads them only.
        if self.scoped_user().is_none() && policy.is_some_and(|n| n > 0 && replay.events_folded >= n) {
            let stored = self
                .store_snapshot(
                    aggregate_id,
                    &fold_rules(&options.bookkeeping, &self.config().upcasters),
                    &replay,
                    &from,
                )
                .await?;
            return Ok(Replay {
                snapshot_stored: stored,
                ..replay
            });
        }
        Ok(replay)
    }

    /// Replays the aggregate to its current version with the default fold rules and stores a
    /// snapshot of the result (unless one is stored at that version already), so that later
    /// replays fold only what comes after. Returns the replay; `snapshot_stored` says whether a
    /// new snapshot was written. An unknown aggregate stores nothing.
    ///
    /// Fails with [`Error::PermissionDenied`] on a user-scoped handle: snapshots are written by
    /// the owner only.
    pub async fn snapshot(&self, aggregate_id: Uuid) -> Result<Replay> {
        self.refuse_scoped("snapshot")?;
        let options = FoldOptions::default();
        let (replay, from) = self.replay_in_snapshot(aggregate_id, &options).await?;
        let stored = self
            .store_snapshot(
                aggregate_id,
                &fold_rules(&options.bookkeeping, &self.config().upcasters),
                &replay,
                &from,
            )
            .await?;
        Ok(Replay {
            snapshot_stored: stored,
            ..replay
        })
    }

    /// The newest snapshot of the aggregate (default fold rules) and the events after it, read
    /// in one database snapshot: what a browser needs to finish the fold itself
    /// (`foldEvents(events, { from: snapshot })`).
    pub async fn get_snapshot_and_tail(&self, aggregate_id: Uuid) -> Result<SnapshotAndTail> {
        let upcasters = self.config().upcasters.clone();
        let rules = fold_rules(&Bookkeeping::default(), &upcasters);
        let scope = self.scoped_user().map(str::to_owned);
        self.in_read_snapshot(|tx| {
            Box::pin(async move {
                let Some(stream) = stream_row(tx, aggregate_id).await? else {
                    return Ok(SnapshotAndTail {
                        snapshot: None,
                        events: Vec::new(),
                    });
                };
                let stored = newest_snapshot(tx, aggregate_id, &rules, stream.version, None).await?;
                check_retained(aggregate_id, &stream, stored.as_ref(), stream.version)?;
                let after = stored.as_ref().map_or(0, |s| s.snapshot.version);
                let mut events = Vec::new();
                let mut from = after;
                while from < stream.version {
                    let to = from.saturating_add(PAGE).min(stream.version);
                    for row in page(tx, aggregate_id, &stream, from, to).await? {
                        let mut record = record_from_row(&row)?;
                        upcasters.upcast_record(&mut record);
                        events.push(record);
                    }
                    from = to;
                }
                // Under row-level security a stream with another user's events reads with gaps.
                let seen = i64::try_from(events.len()).unwrap_or(i64::MAX);
                if scope.is_some() && seen != i64::from(stream.version) - i64::from(after) {
                    return Err(hidden_events(aggregate_id, scope.as_deref()));
                }
                Ok(SnapshotAndTail {
                    snapshot: stored.map(|s| s.snapshot),
                    events,
                })
            })
        })
        .await
    }

    /// The replay itself, in one read-only REPEATABLE READ transaction; also returns what a
    /// snapshot of its result is stored with.
    ///
    /// On a user-scoped handle, fails with [`Error::PermissionDenied`] when row-level security
    /// hides some of the events (another user's events in this user's stream).
    async fn replay_in_snapshot(&self, aggregate_id: Uuid, options: &FoldOptions) -> Result<(Replay, FoldedFrom)> {
        let upcasters = self.config().upcasters.clone();
        let rules = fold_rules(&options.bookkeeping, &upcasters);
        let options = options.clone();
        let scope = self.scoped_user().map(str::to_owned);
        self.in_read_snapshot(|tx| {
            Box::pin(async move {
                let Some(stream) = stream_row(tx, aggregate_id).await? else {
                    return Ok((
                        Replay {
                            result: RecordFolder::new(&options).finish(),
                            snapshot_version: None,
                            events_folded: 0,
                            snapshot_stored: false,
                        },
                        FoldedFrom {
                            max_timestamp: None,
                            users: Folded::Nothing,
                            created_txid: None,
                        },
                    ));
                };
                let target = options.to_version.unwrap_or(i32::MAX).min(stream.version);
                let stored = newest_snapshot(tx, aggregate_id, &rules, target, options.to_timestamp).await?;
                check_retained(aggregate_id, &stream, stored.as_ref(), target)?;
                let mut max_timestamp = stored.as_ref().map(|s| s.max_timestamp);
                let mut users = Folded::from_base(stored.as_ref());
                let snapshot_version = stored.as_ref().map(|s| s.snapshot.version);
                let fold_options = FoldOptions {
                    from: stored.map(|s| s.snapshot),
                    ..options.clone()
                };
                let mut folder = RecordFolder::new(&fold_options);
                let mut folded = 0u64;
                let mut from = snapshot_version.unwrap_or(0);
                let mut stopped = false;
                'pages: while from < target {
                    let to = from.saturating_add(PAGE).min(target);
                    for row in page(tx, aggregate_id, &stream, from, to).await? {
                        let mut record = record_from_row(&row)?;
                        upcasters.upcast_record(&mut record);
                        let pushed = match folder.push(&record) {
                            Err(Error::Fold {
                                reason: FoldErrorKind::VersionGap,
                                ..
                            }) if scope.is_some() => return Err(hidden_events(aggregate_id, scope.as_deref())),
                            other => other?,
                        };
                        if !pushed {
                            stopped = true;
                            break 'pages;
                        }
                        folded += 1;
                        users.add(&record.user_id);
                        max_timestamp = max_timestamp.max(Some(record.timestamp));
                    }
                    from = to;
                }
                // A missing version inside the stream is a fold error at the event after it;
                // missing last versions would leave the state short of the stream row's version.
                if !stopped && folder.version() < target {
                    if scope.is_some() {
                        return Err(hidden_events(aggregate_id, scope.as_deref()));
                    }
                    return Err(Error::Internal {
                        message: format!(
                            "aggregate {aggregate_id}: the stream is at version {target} but its events end at version {}",
                            folder.version()
                        ),
                    });
                }
                Ok((
                    Replay {
                        result: folder.finish(),
                        snapshot_version,
                        events_folded: folded,
                        snapshot_stored: false,
                    },
                    FoldedFrom {
                        max_timestamp,
                        users,
                        created_txid: stream.created_txid.clone(),
                    },
                ))
            })
        })
        .await
    }

    /// Stores `replay`'s result as a snapshot (ON CONFLICT DO NOTHING); true when a row was
    /// written. Nothing is stored for version 0.
    async fn store_snapshot(
        &self,
        aggregate_id: Uuid,
        rules: &str,
        replay: &Replay,
        from: &FoldedFrom,
    ) -> Result<bool> {
        let (Some(last), Some(max)) = (replay.result.last_timestamp, from.max_timestamp) else {
            return Ok(false);
        };
        if replay.result.version == 0 {
            return Ok(false);
        }
        let state = tokio_postgres::types::Json(&replay.result.state);
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let written = tx
            .execute(
                STORE_SNAPSHOT_SQL,
                &[
                    &aggregate_id,
                    &rules,
                    &replay.result.version,
                    &state,
                    &replay.result.deleted,
                    &last,
                    &max,
                    &from.users.snapshot_user(),
                    &from.created_txid,
                ],
            )
            .await?;
        tx.commit().await?;
        Ok(written == 1)
    }

    /// Runs `body` in a read-only REPEATABLE READ transaction (with the user set, for a scoped
    /// repository).
    async fn in_read_snapshot<T, F>(&self, body: F) -> Result<T>
    where
        F: for<'t> FnOnce(
            &'t crate::db::conn::Tx<'_>,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T>> + Send + 't>>,
    {
        let mut client = self.client().await?;
        let tx = client
            .transaction_with(tokio_postgres::IsolationLevel::RepeatableRead, true)
            .await?;
        if let Some(user) = &self.scope {
            tx.batch_execute(&set_user_sql(user)).await?;
        }
        let out = body(&tx).await?;
        tx.commit().await?;
        Ok(out)
    }
}

async fn stream_row(tx: &crate::db::conn::Tx<'_>, aggregate_id: Uuid) -> Result<Option<StreamRow>> {
    let row = tx
        .query_opt(
            "SELECT first_timestamp, last_timestamp, version, retained_from, created_txid::text
               FROM event_streams WHERE aggregate_id = $1",
            &[&aggregate_id],
        )
        .await?;
    Ok(row.map(|r| StreamRow {
        first: r.get(0),
        last: r.get(1),
        version: r.get(2),
        retained_from: r.get(3),
        created_txid: r.get(4),
    }))
}

/// A time limit as PostgreSQL compares it with stored times, which have microseconds: rounded
/// down to a microsecond (the driver would round times before 2000 toward zero, i.e. up, and a
/// snapshot 1 µs past the limit would pass), and raised to PostgreSQL's earliest time (no stored
/// time is earlier; an earlier one would fail the query, where the fold gives version 0).
fn as_stored(t: DateTime<Utc>) -> DateTime<Utc> {
    use chrono::{Duration, Timelike};
    /// 4713-01-01 BC 00:00 UTC, PostgreSQL's earliest timestamptz.
    const EARLIEST_SECS: i64 = -210_866_803_200;
    let floored = t - Duration::nanoseconds(i64::from(t.nanosecond() % 1_000));
    match DateTime::from_timestamp(EARLIEST_SECS, 0) {
        Some(earliest) => floored.max(earliest),
        None => floored,
    }
}

async fn newest_snapshot(
    tx: &crate::db::conn::Tx<'_>,
    aggregate_id: Uuid,
    rules: &str,
    target: i32,
    as_of: Option<DateTime<Utc>>,
) -> Result<Option<StoredSnapshot>> {
    let as_of = as_of.map(as_stored);
    let row = tx
        .query_opt(SNAPSHOT_SQL, &[&aggregate_id, &rules, &target, &as_of])
        .await?;
    row.map(|r| {
        let state: Option<StoredJson> = r.try_get(1).map_err(|e| Error::Internal {
            message: format!("stored snapshot is unreadable: {e}"),
        })?;
        Ok(StoredSnapshot {
            snapshot: Snapshot {
                state: state.map_or(Value::Null, |s| s.0),
                version: r.get(0),
                deleted: r.get(2),
                last_timestamp: Some(r.get(3)),
            },
            max_timestamp: r.get(4),
            user_id: r.get(5),
        })
    })
    .transpose()
}

/// A user-scoped replay of a stream that holds events row-level security hides (another user's
/// events in this user's stream): the user cannot have its state.
fn hidden_events(aggregate_id: Uuid, user: Option<&str>) -> Error {
    Error::PermissionDenied {
        message: format!(
            "aggregate {aggregate_id} holds events of another user, which user \"{}\" cannot read",
            user.unwrap_or_default()
        ),
    }
}

/// `HISTORY_REMOVED` when retention removed versions a fold from `stored` (or from version 0)
/// to `target` would need. A snapshot at the target itself needs none.
fn check_retained(aggregate_id: Uuid, stream: &StreamRow, stored: Option<&StoredSnapshot>, target: i32) -> Result<()> {
    let start = stored.map_or(0, |s| s.snapshot.version);
    if stream.retained_from > 1 && start < stream.retained_from - 1 && start < target {
        return Err(Error::HistoryRemoved {
            aggregate_id,
            retained_from: stream.retained_from,
            snapshot_version: stream.retained_from - 1,
        });
    }
    Ok(())
}

async fn page(
    tx: &crate::db::conn::Tx<'_>,
    aggregate_id: Uuid,
    stream: &StreamRow,
    after: i32,
    to: i32,
) -> Result<Vec<tokio_postgres::Row>> {
    Ok(tx
        .query_typed(
            STREAM_SQL,
            &[
                (&aggregate_id, Type::UUID),
                (&stream.first, Type::TIMESTAMPTZ),
                (&stream.last, Type::TIMESTAMPTZ),
                (&after, Type::INT4),
                (&to, Type::INT4),
                (&None::<Vec<String>>, Type::TEXT_ARRAY),
            ],
        )
        .await?)
}

/// What [`keep_before_cutoff`] found and did.
#[derive(Debug, Default)]
pub(crate) struct Kept {
    /// Snapshots written (or, in a dry run, that would be).
    pub snapshots: i64,
    /// Live aggregates whose every event is before the cut-off: kept as a snapshot.
    pub whole_streams_kept: i64,
    /// Deleted aggregates whose every event is before the cut-off: they go entirely.
    pub deleted_streams: Vec<Uuid>,
    /// Aggregates whose stored events do not fold (a broken stream): no snapshot can stand for
    /// them, and with the events gone their history would be lost.
    pub unfoldable: Vec<Uuid>,
}

const AFFECTED_SQL: &str = r#"
SELECT c.aggregate_id, c.d, s.last_timestamp >= $1 AS cut_through,
       sn.version, sn.state, sn.deleted, sn.last_timestamp, sn.max_timestamp, sn.user_id
  FROM (SELECT aggregate_id, max(version) AS d FROM events_v2 WHERE "timestamp" < $1 GROUP BY aggregate_id) c
  JOIN event_streams s USING (aggregate_id)
  LEFT JOIN LATERAL (SELECT version, state, deleted, last_timestamp, max_timestamp, user_id FROM event_snapshots
                      WHERE aggregate_id = c.aggregate_id AND rules = $2 AND version <= c.d
                      ORDER BY version DESC LIMIT 1) sn ON true
"#;

/// Events before the cut-off, and those of cut-through aggregates at or below their last
/// version before it (a later timestamp at a lower version), by aggregate and version.
const FOLD_BEFORE_CUTOFF_SQL: &str = r#"
SELECT id, "timestamp", aggregate_id, aggregate_type, event_type, user_id, data, metadata,
       version, causation_id, correlation_id, source, position, schema_version
  FROM events_v2 WHERE "timestamp" < $1
UNION ALL
SELECT e.id, e."timestamp", e.aggregate_id, e.aggregate_type, e.event_type, e.user_id, e.data, e.metadata,
       e.version, e.causation_id, e.correlation_id, e.source, e.position, e.schema_version
  FROM unnest($2::uuid[], $3::integer[]) AS ct(aggregate_id, d)
  JOIN events_v2 e ON e.aggregate_id = ct.aggregate_id AND e.version <= ct.d
 WHERE e."timestamp" >= $1
 ORDER BY 3, 9
"#;

/// Each snapshot's user is the one user of the events folded into it, NULL for several (see
/// [`STORE_SNAPSHOT_SQL`]).
const STORE_SNAPSHOTS_SQL: &str = "INSERT INTO event_snapshots
       (aggregate_id, rules, version, user_id, state, deleted, last_timestamp, max_timestamp)
SELECT u.aggregate_id, $1, u.version, u.user_id, u.state, u.deleted, u.last_timestamp, u.max_timestamp
  FROM unnest($2::uuid[], $3::integer[], $4::json[], $5::boolean[], $6::timestamptz[], $7::timestamptz[],
              $8::text[])
       AS u(aggregate_id, version, state, deleted, last_timestamp, max_timestamp, user_id)
  JOIN event_streams s ON s.aggregate_id = u.aggregate_id
ON CONFLICT DO NOTHING";

struct Affected {
    d: i32,
    cut_through: bool,
    base: Option<StoredSnapshot>,
}

/// Before retention drops the events older than `cutoff`: folds every aggregate that has any
/// into a snapshot at its last version before the cut-off (default fold rules, from its newest
/// snapshot below that), so that its state survives the drop. With `write`, stores the
/// snapshots and moves each stream's `retained_from` past them; deleted aggregates whose every
/// event goes are listed instead (they go entirely). Runs in the retention's transaction,
/// which holds back appends.
pub(crate) async fn keep_before_cutoff(
    tx: &crate::db::conn::Tx<'_>,
    cutoff: DateTime<Utc>,
    write: bool,
    upcasters: &Upcasters,
) -> Result<Kept> {
    let rules = fold_rules(&Bookkeeping::default(), upcasters);
    let mut affected = std::collections::HashMap::new();
    for r in tx.query(AFFECTED_SQL, &[&cutoff, &rules]).await? {
        let base = match r.get::<_, Option<i32>>(3) {
            None => None,
            Some(version) => {
                let state: StoredJson = r.try_get(4).map_err(|e| Error::Internal {
                    message: format!("stored snapshot is unreadable: {e}"),
                })?;
                Some(StoredSnapshot {
                    snapshot: Snapshot {
                        state: state.0,
                        version,
                        deleted: r.get(5),
                        last_timestamp: Some(r.get(6)),
                    },
                    max_timestamp: r.get(7),
                    user_id: r.get(8),
                })
            }
        };
        affected.insert(
            r.get::<_, Uuid>(0),
            Affected {
                d: r.get(1),
                cut_through: r.get(2),
                base,
            },
        );
    }
    let (ct_ids, ct_d): (Vec<Uuid>, Vec<i32>) = affected
        .iter()
        .filter(|(_, a)| a.cut_through)
        .map(|(id, a)| (*id, a.d))
        .unzip();

    let mut kept = Kept::default();
    let mut batch = SnapshotBatch::default();
    let stmt = tx.prepare(FOLD_BEFORE_CUTOFF_SQL).await?;
    let portal = tx.bind(&stmt, &[&cutoff, &ct_ids, &ct_d]).await?;
    let mut current: Option<(Uuid, Option<FoldedSoFar>)> = None;
    loop {
        let rows = tx.query_portal(&portal, 10_000).await?;
        if rows.is_empty() {
            break;
        }
        for row in &rows {
            let mut record = record_from_row(row)?;
            upcasters.upcast_record(&mut record);
            if current.as_ref().map(|(id, _)| *id) != Some(record.aggregate_id) {
                if let Some((id, folded)) = current.take() {
                    finish_aggregate(id, folded, &affected, &mut kept, &mut batch);
                }
                let base = affected.get(&record.aggregate_id).and_then(|a| a.base.as_ref());
                current = Some((record.aggregate_id, Some(FoldedSnapshot::start(base))));
            }
            let Some((id, Some(folded))) = current.as_mut() else {
                continue; // this aggregate already failed to fold
            };
            let Some(a) = affected.get(id) else {
                continue;
            };
            if record.version <= folded.version || record.version > a.d {
                continue;
            }
            if folded.push(&record).is_err() {
                current = Some((*id, None));
            }
        }
        if batch.len() >= 1_000 && write {
            batch.store(tx, &rules).await?;
        }
    }
    if let Some((id, folded)) = current.take() {
        finish_aggregate(id, folded, &affected, &mut kept, &mut batch);
    }
    kept.snapshots = kept.snapshots.max(0);
    if write {
        batch.store(tx, &rules).await?;
    }
    Ok(kept)
}

type FoldedSoFar = FoldedSnapshot;

/// One aggregate's fold while retention reads its events.
struct FoldedSnapshot {
    options: FoldOptions,
    state: Value,
    version: i32,
    deleted: bool,
    last_timestamp: Option<DateTime<Utc>>,
    max_timestamp: Option<DateTime<Utc>>,
    users: Folded,
}

impl FoldedSnapshot {
    fn start(base: Option<&StoredSnapshot>) -> FoldedSnapshot {
        FoldedSnapshot {
            options: FoldOptions::default(),
            state: base.map_or(Value::Null, |b| b.snapshot.state.clone()),
            version: base.map_or(0, |b| b.snapshot.version),
            deleted: base.is_some_and(|b| b.snapshot.deleted),
            last_timestamp: base.and_then(|b| b.snapshot.last_timestamp),
            max_timestamp: base.map(|b| b.max_timestamp),
            users: Folded::from_base(base),
        }
    }

    /// Folds one more event (the fold's rules, from the state so far).
    fn push(&mut self, record: &EventRecord) -> Result<()> {
        let options = FoldOptions {
            from: Some(Snapshot {
                state: std::mem::take(&mut self.state),
                version: self.version,
                deleted: self.deleted,
                last_timestamp: self.last_timestamp,
            }),
            ..self.options.clone()
        };
        let result = crate::fold::fold_records(std::slice::from_ref(record), &options)?;
        self.state = result.state;
        self.version = result.version;
        self.deleted = result.deleted;
        self.last_timestamp = result.last_timestamp;
        self.max_timestamp = self.max_timestamp.max(Some(record.timestamp));
        self.users.add(&record.user_id);
        Ok(())
    }
}

fn finish_aggregate(
    id: Uuid,
    folded: Option<FoldedSnapshot>,
    affected: &std::collections::HashMap<Uuid, Affected>,
    kept: &mut Kept,
    batch: &mut SnapshotBatch,
) {
    let Some(a) = affected.get(&id) else {
        return;
    };
    let Some(folded) = folded.filter(|f| f.version == a.d) else {
        // A fold error, or versions missing below the cut-off's last one. Forced, the events
        // before the cut-off go without a snapshot: reads of them must still say so. (Not
        // forced, the caller rolls back.)
        kept.unfoldable.push(id);
        if a.cut_through {
            batch.retain(id, a.d);
        }
        return;
    };
    if folded.deleted && !a.cut_through {
        kept.deleted_streams.push(id);
        return;
    }
    if !a.cut_through {
        kept.whole_streams_kept += 1;
    }
    if a.base.as_ref().is_some_and(|b| b.snapshot.version == a.d) {
        // Already stored (by `snapshot()` or the policy): the events still go.
        batch.retain(id, a.d);
        return;
    }
    kept.snapshots += 1;
    batch.push(id, folded);
}

/// Snapshots waiting to be stored, as the arrays of one INSERT.
#[derive(Default)]
struct SnapshotBatch {
    ids: Vec<Uuid>,
    versions: Vec<i32>,
    states: Vec<tokio_postgres::types::Json<Value>>,
    deleted: Vec<bool>,
    last: Vec<DateTime<Utc>>,
    max: Vec<DateTime<Utc>>,
    users: Vec<Option<String>>,
    /// Every aggregate whose events up to a version go, with that version: its stream's
    /// `retained_from` moves past it (a superset of `ids`).
    retain_ids: Vec<Uuid>,
    retain_versions: Vec<i32>,
}

impl SnapshotBatch {
    fn len(&self) -> usize {
        self.retain_ids.len()
    }

    fn retain(&mut self, id: Uuid, version: i32) {
        self.retain_ids.push(id);
        self.retain_versions.push(version);
    }

    fn push(&mut self, id: Uuid, folded: FoldedSnapshot) {
        let (Some(last), Some(max)) = (folded.last_timestamp, folded.max_timestamp) else {
            return;
        };
        self.ids.push(id);
        self.versions.push(folded.version);
        self.states.push(tokio_postgres::types::Json(folded.state));
        self.deleted.push(folded.deleted);
        self.last.push(last);
        self.max.push(max);
        self.users.push(folded.users.snapshot_user().map(str::to_owned));
        self.retain(id, folded.version);
    }

    /// Stores the snapshots, moves their streams' `retained_from` past them, and empties the
    /// batch.
    async fn store(&mut self, tx: &crate::db::conn::Tx<'_>, rules: &str) -> Result<()> {
        if self.retain_ids.is_empty() {
            return Ok(());
        }
        if !self.ids.is_empty() {
            tx.execute(
                STORE_SNAPSHOTS_SQL,
                &[
                    &rules,
                    &self.ids,
                    &self.versions,
                    &self.states,
                    &self.deleted,
                    &self.last,
                    &self.max,
                    &self.users,
                ],
            )
            .await?;
        }
        tx.execute(
            "UPDATE event_streams s SET retained_from = u.version + 1
               FROM unnest($1::uuid[], $2::integer[]) AS u(aggregate_id, version)
              WHERE s.aggregate_id = u.aggregate_id AND s.retained_from < u.version + 1",
            &[&self.retain_ids, &self.retain_versions],
        )
        .await?;
        *self = SnapshotBatch::default();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::as_stored;
    use chrono::{DateTime, TimeZone, Utc};

    /// Stored snapshots are found by this text: a change to it leaves every one of them unused.
    #[test]
    fn the_rules_text_of_stored_snapshots_is_stable() {
        assert_eq!(
            super::fold_rules(&crate::fold::Bookkeeping::default(), &crate::upcast::Upcasters::none()),
            r#"fold1 {"dropPreviousCompanions":true,"ignoreKeys":["updatedFields"]}"#
        );
        // Many ignored keys: a name short enough for the snapshots' index, the same for the
        // same keys in any order, another for other keys.
        let many = |n: usize, skip: usize| crate::fold::Bookkeeping {
            ignore_keys: (0..n)
                .filter(|i| *i != skip)
                .rev()
                .map(|i| format!("key_number_{i}"))
                .collect(),
            ..Default::default()
        };
        let long = super::fold_rules(&many(400, usize::MAX), &crate::upcast::Upcasters::none());
        assert!(
            long.starts_with("fold1 sha256:") && long.len() == "fold1 sha256:".len() + 64,
            "{long}"
        );
        assert_eq!(
            long,
            super::fold_rules(&many(400, usize::MAX), &crate::upcast::Upcasters::none())
        );
        assert_ne!(
            long,
            super::fold_rules(&many(400, 7), &crate::upcast::Upcasters::none())
        );
    }

    #[test]
    fn time_limits_round_down_to_a_microsecond_and_up_to_postgres_earliest() {
        let before_2000 = Utc.with_ymd_and_hms(1999, 6, 1, 0, 0, 0).unwrap() + chrono::Duration::nanoseconds(500);
        assert_eq!(
            as_stored(before_2000),
            Utc.with_ymd_and_hms(1999, 6, 1, 0, 0, 0).unwrap()
        );
        let after = Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::nanoseconds(1_999);
        assert_eq!(as_stored(after).timestamp_subsec_nanos(), 1_000);
        let ancient = Utc.with_ymd_and_hms(-100_000, 1, 1, 0, 0, 0).unwrap();
        assert_eq!(
            as_stored(ancient),
            DateTime::from_timestamp(-210_866_803_200, 0).unwrap()
        );
        assert_eq!(as_stored(after - chrono::Duration::nanoseconds(999)), as_stored(after));
    }
}
