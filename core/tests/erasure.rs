//! Erasing a user (`erase_user`, docs/erasure.md), against a real PostgreSQL (DATABASE_URL), in
//! this pass's storage mode: every table, the feed's notice, appends during the run, runs that
//! were cut short, and the bytes on disk.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{json, Value};
use synap_events::{
    AggregateType, Checkpoint, DeleteStreamOptions, EraseOptions, Error, LegacyMigrationOptions, NewEvent,
    EVENT_ERASED, STREAM_DELETED, TABLES_WITHOUT_USER_DATA, USER_DATA_TABLES, USER_ERASED,
};
use uuid::Uuid;

const LEGACY_DDL: &str = "CREATE TABLE events (
    id uuid PRIMARY KEY, user_id text NOT NULL, \"timestamp\" timestamptz NOT NULL, type text NOT NULL,
    data jsonb NOT NULL, source text DEFAULT 'api', correlation_id uuid)";

fn day(d: u32, hour: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, d, hour, 0, 0).unwrap()
}

fn new_event(aggregate: Uuid, version: i32, user: &str, data: Value, at: Option<DateTime<Utc>>) -> NewEvent {
    let mut e = NewEvent::new(
        aggregate,
        AggregateType::Entity,
        if version == 1 {
            "entity.created"
        } else {
            "entity.updated"
        },
        user,
        data,
        version,
    );
    e.timestamp = at;
    e
}

/// A random id (this crate's uuid has no generator of its own).
fn fresh() -> Uuid {
    use std::hash::{BuildHasher, RandomState};
    let (a, b) = (RandomState::new().hash_one(1u8), RandomState::new().hash_one(2u8));
    Uuid::from_u128((u128::from(a) << 64) | u128::from(b))
}

/// A string found nowhere else: a test's marker for one user's data.
fn marker(who: &str) -> String {
    format!("mark{who}{}", fresh().simple())
}

/// Every row of every table of the store (partitions and chunks through their parents), as text,
/// that contains `needle`: (table, count).
async fn rows_containing(c: &tokio_postgres::Client, needle: &str) -> Vec<(String, i64)> {
    let tables: Vec<String> = c
        .query(
            "SELECT c.relname::text FROM pg_class c
              WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'p')
                AND NOT c.relispartition ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut found = Vec::new();
    for t in tables {
        let n: i64 = c
            .query_one(
                &format!("SELECT count(*) FROM {t} x WHERE to_jsonb(x)::text LIKE '%' || $1 || '%'"),
                &[&needle],
            )
            .await
            .unwrap()
            .get(0);
        if n > 0 {
            found.push((t, n));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_table_of_the_store_is_placed_and_every_user_column_is_erased() {
    let repo = common::repo("erase_tables").await;
    let c = common::sql(&repo).await;
    let tables: BTreeSet<String> = c
        .query(
            "SELECT c.relname::text FROM pg_class c
              WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'p')
                AND NOT c.relispartition",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let with_data: BTreeSet<String> = USER_DATA_TABLES.iter().map(|(t, _)| t.to_string()).collect();
    let without: BTreeSet<String> = TABLES_WITHOUT_USER_DATA.iter().map(|(t, _)| t.to_string()).collect();
    assert!(with_data.is_disjoint(&without));
    let placed: BTreeSet<String> = with_data.union(&without).cloned().collect();
    assert_eq!(
        tables, placed,
        "each table of the store is in erasure.rs's USER_DATA_TABLES or TABLES_WITHOUT_USER_DATA"
    );
    // A table with a user_id column is one an erasure clears.
    let with_user_column: BTreeSet<String> = c
        .query(
            "SELECT DISTINCT c.relname::text FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
              WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'p')
                AND NOT c.relispartition AND a.attname = 'user_id' AND NOT a.attisdropped",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        with_user_column.is_subset(&with_data),
        "tables with a user_id column not erased: {:?}",
        with_user_column.difference(&with_data).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_is_erased_from_every_table_and_the_feed_says_so_once() {
    let repo = common::repo("erase_all").await;
    let c = common::sql(&repo).await;
    let (ma, mb) = (marker("a"), marker("b"));
    let (a1, a2, b1) = (fresh(), fresh(), fresh());

    // The legacy table, migrated with one row of each user and one of A's that fails.
    c.batch_execute(LEGACY_DDL).await.unwrap();
    for (user, m, t) in [
        ("alice", &ma, "task.created"),
        ("bob", &mb, "task.created"),
        ("alice", &ma, "Not A Type"),
    ] {
        c.execute(
            "INSERT INTO events (id, user_id, \"timestamp\", type, data) VALUES (gen_random_uuid(), $1, $2, $3, $4)",
            &[&user, &day(2, 9), &t, &json!({ "entityId": fresh(), "note": m })],
        )
        .await
        .unwrap();
    }
    // The legacy migration holds session locks: directly connected, also in the pooler pass.
    let direct = {
        let mut config = repo.config().clone();
        config.database_url = common::direct(&config.database_url);
        config.pooler = synap_events::Pooler::None;
        synap_events::EventRepository::new(config).unwrap()
    };
    direct
        .migrate_legacy_events(&LegacyMigrationOptions::default(), &mut |_| {})
        .await
        .unwrap();

    // A's two streams over three days; B's stream; B's event in A's stream and A's in B's
    // (an unscoped handle may write them).
    repo.append(new_event(a1, 1, "alice", json!({ "t": ma }), Some(day(3, 10))))
        .await
        .unwrap();
    repo.append(new_event(a1, 2, "alice", json!({ "t": ma }), Some(day(4, 10))))
        .await
        .unwrap();
    repo.append(new_event(a2, 1, "alice", json!({ "t": ma }), Some(day(5, 10))))
        .await
        .unwrap();
    repo.append(new_event(b1, 1, "bob", json!({ "t": mb }), Some(day(3, 11))))
        .await
        .unwrap();
    repo.append(new_event(a1, 3, "bob", json!({ "by": "bob" }), Some(day(5, 11))))
        .await
        .unwrap();
    let a_in_b = repo
        .append(new_event(b1, 2, "alice", json!({ "t": ma, "x": 1 }), Some(day(5, 12))))
        .await
        .unwrap();
    repo.append(new_event(b1, 3, "bob", json!({ "t": mb, "y": 2 }), Some(day(5, 13))))
        .await
        .unwrap();
    repo.snapshot(a1).await.unwrap();
    repo.snapshot(b1).await.unwrap();
    repo.refresh_analytics(true).await.unwrap();
    // A parked event of A's, written as a group's member would.
    c.execute("INSERT INTO consumer_groups (name, partitions) VALUES ('g', 4)", &[])
        .await
        .unwrap();
    c.execute(
        "INSERT INTO consumer_group_parked (group_name, event_id, partition, aggregate_id, txid, position, state, error)
         SELECT 'g', id, 0, aggregate_id, txid, position, 'failed', 'handler failed on ' || $2
           FROM events_v2 WHERE aggregate_id = $1 AND version = 1",
        &[&a2, &ma],
    )
    .await
    .unwrap();
    // A consumer that has read part of the feed: through A's first event. (A page is empty
    // while another test's open transaction holds the feed's horizon back.)
    let mut after = Checkpoint::START;
    loop {
        let page = repo.read_all(Some(&after), 1).await.unwrap();
        after = page.checkpoint;
        match page.events.first() {
            Some(e) if e.aggregate_id == a1 => break,
            Some(_) => {}
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(!rows_containing(&c, &ma).await.is_empty());

    // A dry run counts and changes nothing.
    let before: i64 = c.query_one("SELECT count(*) FROM events_v2", &[]).await.unwrap().get(0);
    let dry = repo
        .erase_user(
            "alice",
            &EraseOptions {
                dry_run: true,
                ..EraseOptions::default()
            },
        )
        .await
        .unwrap();
    let after_dry: i64 = c.query_one("SELECT count(*) FROM events_v2", &[]).await.unwrap().get(0);
    assert_eq!(before, after_dry);
    assert!(dry.notice.is_none() && dry.rewritten.is_empty());

    let report = repo.erase_user("alice", &EraseOptions::default()).await.unwrap();
    assert_eq!(report.tables, dry.tables, "the dry run counted what went");
    // A's four events in events_v2 (a1 v1, v2, a2 v1, the migrated legacy row) and B's event in a1.
    assert_eq!(report.rows("events"), 2, "{report:?}");
    assert_eq!(report.streams, 3, "{report:?}");
    assert_eq!(report.other_users_events, 1);
    assert!(report.rows("legacy_migration_failures") == 1 && report.rows("legacy_migration_map") >= 1);
    assert_eq!(report.rows("consumer_group_parked"), 1);
    assert!(report.rows("events_daily") >= 1 && report.rows("event_snapshots") >= 2);
    let redacted = report.tables.iter().find(|t| t.action == "redacted").unwrap();
    assert_eq!(redacted.rows, 1);
    let notice = report.notice.clone().expect("a notice");
    assert!(!report.rewritten.is_empty());

    // Nothing of A's data anywhere; B's still there.
    assert_eq!(rows_containing(&c, &ma).await, vec![]);
    assert!(!rows_containing(&c, &mb).await.is_empty());
    // Only the notice names A: its event, stream and id rows.
    let named: Vec<(String, i64)> = {
        let mut v = Vec::new();
        for (t, _) in USER_DATA_TABLES.iter().filter(|(t, _)| !t.starts_with("legacy")) {
            let has: bool = c
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass($1) AND attname = 'user_id')",
                    &[t],
                )
                .await
                .unwrap()
                .get(0);
            if has {
                let n: i64 = c
                    .query_one(&format!("SELECT count(*) FROM {t} WHERE user_id = 'alice'"), &[])
                    .await
                    .unwrap()
                    .get(0);
                v.push((t.to_string(), n));
            }
        }
        v
    };
    for (t, n) in named {
        let expected = if ["events_v2", "event_streams", "events_v2_ids"].contains(&t.as_str()) {
            1
        } else {
            0
        };
        assert_eq!(n, expected, "rows of alice in {t}");
    }
    let legacy_left: i64 = c
        .query_one("SELECT count(*) FROM events WHERE user_id = 'alice'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(legacy_left, 0);

    // B's stream keeps consecutive versions: A's event there stands redacted.
    let b_stream = repo.get_aggregate_stream(b1, &Default::default()).await.unwrap();
    assert_eq!(b_stream.iter().map(|e| e.version).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(b_stream[1].id, a_in_b.id);
    assert_eq!(
        (b_stream[1].event_type.as_str(), b_stream[1].user_id.as_str()),
        (EVENT_ERASED, "bob")
    );
    assert_eq!(b_stream[1].data, json!({}));
    repo.replay(b1, &Default::default()).await.unwrap();
    assert!(repo
        .get_aggregate_stream(a1, &Default::default())
        .await
        .unwrap()
        .is_empty());

    // The consumer past A's first event reads on: no event of A's, then the notice.
    let mut rest = Vec::new();
    while !rest.iter().any(|e: &synap_events::EventRecord| e.id == notice.id) {
        let page = repo.read_all(Some(&after), 2).await.unwrap();
        if page.events.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        rest.extend(page.events);
        after = page.checkpoint;
    }
    assert!(rest.iter().all(|e| e.user_id != "alice" || e.event_type == USER_ERASED));
    let notices: Vec<_> = rest.iter().filter(|e| e.event_type == USER_ERASED).collect();
    assert_eq!(notices.len(), 1);
    assert_eq!(notices[0].id, notice.id);
    assert_eq!(notices[0].data, json!({ "userId": "alice" }));
    assert_eq!(notices[0].aggregate_type, AggregateType::System);

    // Again: nothing is left, no second notice.
    let again = repo.erase_user("alice", &EraseOptions::default()).await.unwrap();
    assert!(!again.found_anything() && again.notice.is_none(), "{again:?}");
    let n: i64 = c
        .query_one("SELECT count(*) FROM events_v2 WHERE event_type = $1", &[&USER_ERASED])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_during_an_erasure_are_erased_or_refused() {
    let owner = common::repo("erase_race").await;
    let (app, role) = common::app_role(&owner, "erase_race").await;
    let alice = app.for_user("alice").unwrap();
    let bob = app.for_user("bob").unwrap();
    let a = fresh();
    alice.append(new_event(a, 1, "alice", json!({}), None)).await.unwrap();

    // A transaction of the application's that appended for A and has not committed.
    let open = common::connect(&common::role_url(&role)).await;
    let schema = owner.config().schema.clone().unwrap();
    // (The citus mode's append function, as the repository calls it there.)
    let function = if common::citus() {
        "synap_append_routed"
    } else {
        "synap_append"
    };
    open.batch_execute(&format!(
        "SET search_path = {schema}; BEGIN; SET LOCAL citus.propagate_set_commands = 'local'; SET LOCAL app.current_user_id = 'alice';"
    ))
    .await
    .unwrap();
    let appended = open
        .query(
            &format!(
                "SELECT * FROM {function}(gen_random_uuid(), NULL, $1, 'entity', 'entity.updated', 'alice', '{{}}', NULL, 2, NULL, NULL, 'api', 1)"
            ),
            &[&a],
        )
        .await
        .unwrap();
    assert_eq!(appended.len(), 1, "the open transaction's append passed its guard");

    let eraser = owner.clone();
    let erasure = tokio::spawn(async move { eraser.erase_user("alice", &EraseOptions::default()).await });
    let c = common::sql(&owner).await;
    // Once the erasure has begun, a new append of A's is refused; B appends as usual.
    loop {
        let n: i64 = c
            .query_one("SELECT count(*) FROM synap_erasures", &[])
            .await
            .unwrap()
            .get(0);
        if n == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let refused = alice
        .append(new_event(fresh(), 1, "alice", json!({}), None))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), "USER_BEING_ERASED", "{refused:?}");
    let refused = alice
        .append_batch(vec![new_event(fresh(), 1, "alice", json!({}), None)])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), "USER_BEING_ERASED", "{refused:?}");
    bob.append(new_event(fresh(), 1, "bob", json!({}), None)).await.unwrap();
    assert!(!erasure.is_finished(), "the erasure waits for the open transaction");
    // The open append commits: its event is erased with the rest.
    open.batch_execute("COMMIT").await.unwrap();
    let report = erasure.await.unwrap().unwrap();
    assert_eq!(report.rows("events_v2"), 2, "{report:?}");
    assert!(report.waited_ms > 0);
    let left: i64 = c
        .query_one(
            "SELECT count(*) FROM events_v2 WHERE user_id = 'alice' AND event_type <> $1",
            &[&USER_ERASED],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    // After the erasure, the id is a new user's.
    alice
        .append(new_event(fresh(), 1, "alice", json!({}), None))
        .await
        .unwrap();
    drop(open);
    common::drop_role(&owner, &role).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_cut_short_is_completed_by_the_next_run() {
    let repo = common::repo("erase_killed").await;
    let c = common::sql(&repo).await;
    let a = fresh();
    repo.append(new_event(a, 1, "alice", json!({ "x": 1 }), None))
        .await
        .unwrap();

    // Killed after step 1: the row stays and refuses A's appends; nothing is erased.
    c.execute("INSERT INTO synap_erasures (user_id) VALUES ('alice')", &[])
        .await
        .unwrap();
    let err = repo
        .append(new_event(a, 2, "alice", json!({}), None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "USER_BEING_ERASED");
    // An older transaction that does not end: the run gives up, and erases nothing.
    let open = common::connect(&common::database_url()).await;
    open.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let err = repo
        .erase_user(
            "alice",
            &EraseOptions {
                wait_timeout: Duration::from_millis(200),
                ..EraseOptions::default()
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::ErasureBlocked { transactions, .. } if transactions >= 1),
        "{err:?}"
    );
    assert_eq!(
        repo.get_aggregate_stream(a, &Default::default()).await.unwrap().len(),
        1
    );
    open.batch_execute("COMMIT").await.unwrap();

    // Killed after step 3: a relation left on the queue is rewritten by the next erasure, of
    // whichever user.
    c.execute(
        "INSERT INTO synap_erasure_rewrites (relation) SELECT format('%I.event_snapshots', current_schema())",
        &[],
    )
    .await
    .unwrap();
    let report = repo.erase_user("alice", &EraseOptions::default()).await.unwrap();
    assert_eq!(report.rows("events_v2"), 1);
    assert!(
        report.rewritten.iter().any(|r| r.ends_with(".event_snapshots")),
        "{report:?}"
    );
    let left: i64 = c
        .query_one(
            "SELECT (SELECT count(*) FROM synap_erasures) + (SELECT count(*) FROM synap_erasure_rewrites)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_calls_are_refused_and_write_nothing() {
    let repo = common::repo("erase_bad").await;
    let forged = NewEvent::new(
        fresh(),
        AggregateType::System,
        USER_ERASED,
        "alice",
        json!({ "userId": "alice" }),
        1,
    );
    let err = repo.append(forged.clone()).await.unwrap_err();
    assert_eq!(
        (err.code(), err.details()["reason"].as_str()),
        ("VALIDATION_FAILED", Some("INVALID_EVENT_TYPE"))
    );
    let err = repo.append_batch(vec![forged]).await.unwrap_err();
    assert_eq!(err.code(), "VALIDATION_FAILED");
    for user in ["", "   ", "a\0b"] {
        let err = repo.erase_user(user, &EraseOptions::default()).await.unwrap_err();
        assert_eq!(err.code(), "VALIDATION_FAILED", "{user:?}");
    }
    let err = repo
        .for_user("alice")
        .unwrap()
        .erase_user("alice", &EraseOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), "PERMISSION_DENIED");
    for bad in [
        json!({ "dryrun": true }),
        json!({ "dryRun": "yes" }),
        json!({ "waitTimeoutMs": 0 }),
        json!(3),
    ] {
        assert_eq!(
            EraseOptions::from_json(&bad).unwrap_err().code(),
            "VALIDATION_FAILED",
            "{bad}"
        );
    }
    assert!(EraseOptions::from_json(&Value::Null).is_ok());
    assert_eq!(common::count_rows(&repo).await, (0, 0));
}

/// The relation files of the store (tables, partitions, chunks, their TOAST tables and every
/// index), read from the data directory after a checkpoint: whether `needle` is in them.
async fn on_disk(c: &tokio_postgres::Client, needle: &str) -> Vec<String> {
    c.batch_execute("CHECKPOINT").await.unwrap();
    let dir: String = c.query_one("SHOW data_directory", &[]).await.unwrap().get(0);
    let files: Vec<String> = c
        .query(
            "WITH RECURSIVE rels(oid) AS (
                 SELECT c.oid FROM pg_class c WHERE c.relnamespace = current_schema()::regnamespace
                 UNION SELECT i.inhrelid FROM pg_inherits i JOIN rels r ON i.inhparent = r.oid),
             heaps AS (SELECT oid FROM rels UNION SELECT reltoastrelid FROM pg_class WHERE oid IN (SELECT oid FROM rels) AND reltoastrelid <> 0),
             every AS (SELECT oid FROM heaps UNION SELECT indexrelid FROM pg_index WHERE indrelid IN (SELECT oid FROM heaps))
             SELECT pg_relation_filepath(oid) FROM every WHERE pg_relation_filepath(oid) IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut found = Vec::new();
    for f in files {
        for segment in 0.. {
            let path = if segment == 0 {
                format!("{dir}/{f}")
            } else {
                format!("{dir}/{f}.{segment}")
            };
            let Ok(bytes) = std::fs::read(&path) else { break };
            if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                found.push(path);
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_erased_bytes_are_gone_from_the_relation_files() {
    if common::citus() {
        // The shards' files are the workers'; this test reads one server's data directory.
        eprintln!("skipped on Citus: the events live in the workers' data directories");
        return;
    }
    let repo = common::repo("erase_disk").await;
    let c = common::connect(&common::direct(&common::database_url())).await;
    let schema = repo.config().schema.clone().unwrap();
    c.batch_execute(&format!("SET search_path = {schema}")).await.unwrap();
    let sql = common::sql(&repo).await;
    let (ma, mb) = (marker("a"), marker("b"));
    // Small rows, and rows large enough for TOAST (hex that does not compress well).
    let big = |m: &str| {
        format!(
            "{m}{}",
            (0..120).map(|_| fresh().simple().to_string()).collect::<String>()
        )
    };
    // B first: a page that VACUUM compacts moves the live rows over the space of the rows that
    // went before them, so the erased rows are written last, where nothing covers them.
    for (user, m) in [("bob", &mb), ("alice", &ma)] {
        let s = fresh();
        repo.append(new_event(s, 1, user, json!({ "t": m }), Some(day(6, 10))))
            .await
            .unwrap();
        repo.append(new_event(s, 2, user, json!({ "t": big(m) }), Some(day(7, 10))))
            .await
            .unwrap();
        repo.append(new_event(s, 3, user, json!({ "t": m }), None))
            .await
            .unwrap();
        repo.snapshot(s).await.unwrap();
    }
    sql.batch_execute(LEGACY_DDL).await.unwrap();
    for (user, m) in [("bob", &mb), ("alice", &ma)] {
        sql.execute(
            "INSERT INTO events (id, user_id, \"timestamp\", type, data) VALUES (gen_random_uuid(), $1, now(), 'task.created', $2)",
            &[&user, &json!({ "entityId": fresh(), "note": m })],
        )
        .await
        .unwrap();
    }
    sql.execute("INSERT INTO consumer_groups (name, partitions) VALUES ('g', 1)", &[])
        .await
        .unwrap();
    sql.execute(
        "INSERT INTO consumer_group_parked (group_name, event_id, partition, aggregate_id, txid, position, state, error)
         SELECT 'g', id, 0, aggregate_id, txid, position, 'failed', 'failed on ' || $1
           FROM events_v2 WHERE user_id = 'alice' AND version = 1",
        &[&ma],
    )
    .await
    .unwrap();
    repo.refresh_analytics(true).await.unwrap();
    sql.batch_execute("ANALYZE").await.unwrap();
    assert!(
        !on_disk(&c, &ma).await.is_empty(),
        "the scan finds A's marker before the erasure"
    );

    repo.erase_user("alice", &EraseOptions::default()).await.unwrap();
    sql.batch_execute("VACUUM").await.unwrap();
    assert_eq!(
        on_disk(&c, &ma).await,
        Vec::<String>::new(),
        "A's marker on disk after the erasure"
    );
    assert!(!on_disk(&c, &mb).await.is_empty(), "B's marker is still on disk");
    // The planner's statistics of the store no longer hold it either.
    let in_stats: i64 = sql
        .query_one(
            "SELECT count(*) FROM pg_stats WHERE schemaname = current_schema()
                AND (coalesce(most_common_vals::text, '') || coalesce(histogram_bounds::text, '')) LIKE '%' || $1 || '%'",
            &[&ma],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(in_stats, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soft_deleted_stream_folds_as_deleted_and_takes_appends() {
    let owner = common::repo("delete_soft").await;
    let (app, role) = common::app_role(&owner, "delete_soft").await;
    let alice = app.for_user("alice").unwrap();
    let s = fresh();
    alice
        .append(new_event(s, 1, "alice", json!({ "a": 1 }), None))
        .await
        .unwrap();
    alice
        .append(new_event(s, 2, "alice", json!({ "b": 2 }), None))
        .await
        .unwrap();

    let done = alice.delete_stream(s, &DeleteStreamOptions::default()).await.unwrap();
    assert!(done.found && !done.hard && done.notice.is_none());
    let event = done.event.unwrap();
    assert_eq!(
        (event.event_type.as_str(), event.version, event.user_id.as_str()),
        ("entity.deleted", 3, "alice")
    );
    let replay = owner.replay(s, &Default::default()).await.unwrap();
    assert!(replay.result.deleted);
    assert_eq!(replay.result.state, json!({ "a": 1, "b": 2 }));
    // Appends go on; a .created event revives it, as in the fold.
    alice
        .append(new_event(s, 4, "alice", json!({ "c": 3 }), None))
        .await
        .unwrap();
    assert!(owner.replay(s, &Default::default()).await.unwrap().result.deleted);
    // Another user's stream is not there for a scoped handle.
    let bob = app.for_user("bob").unwrap();
    assert!(
        !bob.delete_stream(s, &DeleteStreamOptions::default())
            .await
            .unwrap()
            .found
    );
    assert_eq!(
        owner.get_aggregate_stream(s, &Default::default()).await.unwrap().len(),
        4
    );
    common::drop_role(&owner, &role).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_deleted_stream_leaves_a_tombstone_and_a_notice() {
    let owner = common::repo("delete_hard").await;
    let (app, role) = common::app_role(&owner, "delete_hard").await;
    let alice = app.for_user("alice").unwrap();
    let c = common::sql(&owner).await;
    let (s, other) = (fresh(), fresh());
    for v in 1..=3 {
        alice
            .append(new_event(s, v, "alice", json!({ "v": v }), None))
            .await
            .unwrap();
    }
    alice
        .append(new_event(other, 1, "alice", json!({}), None))
        .await
        .unwrap();
    owner.snapshot(s).await.unwrap();
    let hard = DeleteStreamOptions { hard: true };

    let err = alice.delete_stream(s, &hard).await.unwrap_err();
    assert_eq!(err.code(), "PERMISSION_DENIED");
    let done = owner.delete_stream(s, &hard).await.unwrap();
    assert!(done.found && done.hard && done.events == 3, "{done:?}");
    let notice = done.notice.unwrap();
    for table in ["events_v2", "events_v2_ids", "event_streams", "event_snapshots"] {
        let n: i64 = c
            .query_one(&format!("SELECT count(*) FROM {table} WHERE aggregate_id = $1"), &[&s])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "{table}");
    }
    assert_eq!(
        owner
            .get_aggregate_stream(other, &Default::default())
            .await
            .unwrap()
            .len(),
        1
    );

    // Every way of appending to the id again is STREAM_DELETED, as the owner and as the
    // application's role, and writes nothing.
    for repo in [&owner, &alice] {
        for version in [1, 4] {
            let err = repo
                .append(new_event(s, version, "alice", json!({}), None))
                .await
                .unwrap_err();
            assert_eq!(err.code(), "STREAM_DELETED", "version {version}: {err:?}");
            assert_eq!(err.details()["aggregateId"], json!(s.to_string()));
            let err = repo
                .append_batch(vec![new_event(s, version, "alice", json!({}), None)])
                .await
                .unwrap_err();
            assert_eq!(err.code(), "STREAM_DELETED", "batch, version {version}: {err:?}");
        }
    }
    let n: i64 = c
        .query_one("SELECT count(*) FROM events_v2 WHERE aggregate_id = $1", &[&s])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);

    // The feed says so, with the stream's owner.
    let mut after = Checkpoint::START;
    let mut seen = Vec::new();
    while !seen.iter().any(|e: &synap_events::EventRecord| e.id == notice.id) {
        let page = owner.read_all(Some(&after), 100).await.unwrap();
        if page.events.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        seen.extend(page.events);
        after = page.checkpoint;
    }
    let n = seen.iter().find(|e| e.id == notice.id).unwrap();
    assert_eq!(
        (n.event_type.as_str(), n.user_id.as_str(), &n.data),
        (STREAM_DELETED, "alice", &json!({ "aggregateId": s.to_string() }))
    );
    assert!(!seen.iter().any(|e| e.aggregate_id == s));

    // Again: nothing there.
    assert!(!owner.delete_stream(s, &hard).await.unwrap().found);
    // Erasing the owner takes the tombstone and the notice with it.
    let report = owner.erase_user("alice", &EraseOptions::default()).await.unwrap();
    assert_eq!(report.rows("event_stream_tombstones"), 1);
    let left: i64 = c
        .query_one(
            "SELECT count(*) FROM events_v2 WHERE user_id = 'alice' AND event_type <> $1",
            &[&USER_ERASED],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    common::drop_role(&owner, &role).await;
}

/// A projection of a consumer group: each event's user, and on a notice, the user forgotten.
async fn derive(
    events: Vec<synap_events::EventRecord>,
    tx: synap_events::ProjectionTx,
    member: &'static str,
) -> Result<(), synap_events::HandlerError> {
    for e in events {
        if e.event_type == USER_ERASED {
            let user = e.data["userId"].as_str().unwrap_or_default().to_owned();
            tx.client()
                .execute("DELETE FROM derived WHERE user_id = $1", &[&user])
                .await?;
            tx.client()
                .execute(
                    "INSERT INTO notices (member, event_id) VALUES ($1, $2)",
                    &[&member, &e.id],
                )
                .await?;
        } else {
            tx.client()
                .execute(
                    "INSERT INTO derived (user_id, event_id, member) VALUES ($1, $2, $3)",
                    &[&e.user_id, &e.id, &member],
                )
                .await?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_member_of_a_group_gets_the_notice_once_and_forgets_the_user() {
    let repo = common::repo("erase_group").await;
    let c = common::sql(&repo).await;
    c.batch_execute(
        "CREATE TABLE derived (user_id text, event_id uuid, member text);
         CREATE TABLE notices (member text, event_id uuid)",
    )
    .await
    .unwrap();
    let options = || {
        let mut o = synap_events::GroupOptions::new("erasure");
        o.partitions = Some(8);
        o.lease = Duration::from_millis(600);
        o.poll_interval = Duration::from_millis(50);
        o
    };
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut members = Vec::new();
    for name in ["m1", "m2"] {
        let mut m = repo.join_group(options()).await.unwrap();
        let stop = stop.clone();
        members.push(tokio::spawn(async move {
            m.project(move |events, tx| derive(events, tx, name), async move {
                stop.notified().await
            })
            .await
        }));
    }
    // Both hold four partitions.
    loop {
        let status = repo.groups().await.unwrap();
        let owners: BTreeSet<String> = status[0].partitions.iter().filter_map(|p| p.owner.clone()).collect();
        let held = status[0].partitions.iter().filter(|p| p.owner.is_some()).count();
        if owners.len() == 2 && held == 8 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Forty streams spread over the eight partitions.
    let mut written = 0i64;
    for i in 0..40 {
        let user = if i % 2 == 0 { "alice" } else { "bob" };
        repo.append(new_event(fresh(), 1, user, json!({ "i": i }), None))
            .await
            .unwrap();
        written += 1;
    }
    let count = |sql: &'static str| {
        let c = &c;
        async move { c.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    while count("SELECT count(*) FROM derived").await < written {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let members_with_alice = count("SELECT count(DISTINCT member) FROM derived WHERE user_id = 'alice'").await;
    assert_eq!(members_with_alice, 2, "both members derived from alice's events");

    let report = repo.erase_user("alice", &EraseOptions::default()).await.unwrap();
    let notice = report.notice.unwrap();
    let start = std::time::Instant::now();
    while count("SELECT count(DISTINCT member) FROM notices").await < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "a member never got the notice: {:?}",
            c.query("SELECT member FROM notices", &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Time for a second delivery to show, had there been one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.notify_waiters();
    for m in members {
        m.await.unwrap().unwrap();
    }
    let per_member: Vec<(String, i64)> = c
        .query(
            "SELECT member, count(*) FROM notices WHERE event_id = $1 GROUP BY 1 ORDER BY 1",
            &[&notice.id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(per_member, vec![("m1".to_owned(), 1), ("m2".to_owned(), 1)]);
    assert_eq!(count("SELECT count(*) FROM derived WHERE user_id = 'alice'").await, 0);
    assert_eq!(count("SELECT count(*) FROM derived WHERE user_id = 'bob'").await, 20);
}

/// One step of [`erasure_against_a_model`].
#[derive(Debug, Clone)]
enum Op {
    /// `user` appends to stream `stream` (creating it, or at its next version).
    Append { user: usize, stream: usize },
    /// `user` is erased.
    Erase { user: usize },
    /// Stream `stream` is deleted for good.
    HardDelete { stream: usize },
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        6 => (0..3usize, 0..5usize).prop_map(|(user, stream)| Op::Append { user, stream }),
        2 => (0..3usize).prop_map(|user| Op::Erase { user }),
        1 => (0..5usize).prop_map(|stream| Op::HardDelete { stream }),
    ]
}

/// A stored event as the model sees it: (version, user, type, data).
type Seen = (i32, String, String, Value);

#[derive(Default, Clone)]
struct ModelStream {
    owner: String,
    events: Vec<Seen>,
    tombstone: bool,
}

#[test]
fn erasure_against_a_model() {
    let (runtime, mut runner) = common::model_runner(8);
    let users = ["ann", "ben", "cy"];
    runner
        .run(&proptest::collection::vec(op(), 1..16), |ops| {
            runtime.block_on(async {
                let repo = common::repo("erase_model").await;
                let c = common::sql(&repo).await;
                let mut model: Vec<Option<ModelStream>> = vec![None; 5];
                let mut notices: Vec<(String, String)> = Vec::new();
                for (n, op) in ops.iter().enumerate() {
                    match op {
                        Op::Append { user, stream } => {
                            let user = users[*user];
                            let id = Uuid::from_u128(*stream as u128 + 1);
                            let data = json!({ "n": n, "by": user });
                            let slot = &mut model[*stream];
                            let version = slot.as_ref().map_or(1, |s| s.events.len() as i32 + 1);
                            let got = repo.append(new_event(id, version, user, data.clone(), None)).await;
                            match slot {
                                Some(s) if s.tombstone => {
                                    assert_eq!(got.unwrap_err().code(), "STREAM_DELETED", "{op:?}");
                                }
                                _ => {
                                    let e = got.unwrap();
                                    let s = slot.get_or_insert_with(|| ModelStream {
                                        owner: user.to_owned(),
                                        ..ModelStream::default()
                                    });
                                    s.events.push((e.version, user.to_owned(), e.event_type, data));
                                }
                            }
                        }
                        Op::Erase { user } => {
                            let user = users[*user];
                            let report = repo.erase_user(user, &EraseOptions::default()).await.unwrap();
                            let mut found = false;
                            for slot in model.iter_mut() {
                                let Some(s) = slot else { continue };
                                if s.owner == user {
                                    // The stream goes, tombstone and all: its id is free again.
                                    found = true;
                                    *slot = None;
                                    continue;
                                }
                                for e in s.events.iter_mut().filter(|e| e.1 == user) {
                                    found = true;
                                    *e = (e.0, s.owner.clone(), EVENT_ERASED.to_owned(), json!({}));
                                }
                            }
                            // Stream-deletion notices of the user go with their data.
                            let had_notices = notices.iter().any(|(u, t)| u == user && t == STREAM_DELETED);
                            notices.retain(|(u, t)| !(u == user && t == STREAM_DELETED));
                            assert_eq!(report.notice.is_some(), found || had_notices, "{op:?}: {report:?}");
                            if report.notice.is_some() {
                                notices.push((user.to_owned(), USER_ERASED.to_owned()));
                            }
                        }
                        Op::HardDelete { stream } => {
                            let id = Uuid::from_u128(*stream as u128 + 1);
                            let done = repo
                                .delete_stream(id, &DeleteStreamOptions { hard: true })
                                .await
                                .unwrap();
                            match &mut model[*stream] {
                                Some(s) if !s.tombstone => {
                                    assert!(done.found, "{op:?}");
                                    notices.push((s.owner.clone(), STREAM_DELETED.to_owned()));
                                    s.events.clear();
                                    s.tombstone = true;
                                }
                                _ => assert!(!done.found, "{op:?}"),
                            }
                        }
                    }
                }
                // Every stream reads back as the model has it.
                for (i, slot) in model.iter().enumerate() {
                    let id = Uuid::from_u128(i as u128 + 1);
                    let stored: Vec<Seen> = repo
                        .get_aggregate_stream(id, &Default::default())
                        .await
                        .unwrap()
                        .into_iter()
                        .map(|e| (e.version, e.user_id, e.event_type, e.data))
                        .collect();
                    let expected = slot.as_ref().map(|s| s.events.clone()).unwrap_or_default();
                    assert_eq!(stored, expected, "stream {i} after {ops:?}");
                }
                // No other event is stored but the notices the model expects.
                let mut stored_notices: Vec<(String, String)> = c
                    .query(
                        "SELECT user_id, event_type FROM events_v2 WHERE aggregate_type = 'system' ORDER BY 1, 2",
                        &[],
                    )
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| (r.get(0), r.get(1)))
                    .collect();
                stored_notices.sort();
                notices.sort();
                assert_eq!(stored_notices, notices, "after {ops:?}");
                let total: i64 = c.query_one("SELECT count(*) FROM events_v2", &[]).await.unwrap().get(0);
                let modelled: usize = model.iter().flatten().map(|s| s.events.len()).sum::<usize>() + notices.len();
                assert_eq!(total as usize, modelled, "after {ops:?}");
            });
            Ok(())
        })
        .unwrap();
}
