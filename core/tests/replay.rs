//! Replay where the data lives, and snapshots: a replay must give exactly what the fold gives
//! over the whole stream (the model), from any snapshot, at any version or time.

mod common;

use chrono::{DateTime, Duration, TimeZone, Utc};
use common::{event, sql};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Value};
use synap_events::{
    fold_records, AggregateType, Bookkeeping, EventRecord, EventRepository, FoldOptions, NewEvent, Snapshot,
    StreamOptions,
};
use uuid::Uuid;

/// The model: the fold over the whole stored stream, read with the ordinary stream read.
async fn model(repo: &EventRepository, id: Uuid, options: &FoldOptions) -> synap_events::FoldResult {
    let events = repo.get_aggregate_stream(id, &StreamOptions::default()).await.unwrap();
    fold_records(&events, options).unwrap()
}

fn at(seconds: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + Duration::seconds(seconds)
}

/// One step of a stream: an event type and its data.
#[derive(Debug, Clone)]
enum Change {
    Created(Value),
    Updated(Value),
    Deleted,
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<i32>().prop_map(Value::from),
        "[a-c]{0,3}".prop_map(Value::from),
        prop::collection::vec(any::<u8>().prop_map(Value::from), 0..3).prop_map(Value::from),
        ("[a-c]", any::<bool>()).prop_map(|(k, b)| json!({ k: b })),
    ]
}

fn data() -> impl Strategy<Value = Value> {
    prop::collection::btree_map(
        prop_oneof![
            Just("title".to_owned()),
            Just("tags".to_owned()),
            Just("meta".to_owned()),
            Just("updatedFields".to_owned()),
            Just("previousTitle".to_owned()),
        ],
        value(),
        0..4,
    )
    .prop_map(|m| Value::Object(m.into_iter().collect()))
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        1 => data().prop_map(Change::Created),
        6 => data().prop_map(Change::Updated),
        1 => Just(Change::Deleted),
    ]
}

/// One case: a stream, where snapshots are taken, and which points in time and version to ask.
#[derive(Debug, Clone)]
struct Case {
    changes: Vec<Change>,
    /// Seconds between an event and the one before it (0 ties; the stream's times never go back).
    gaps: Vec<i64>,
    snapshots_after: Vec<usize>,
    to_versions: Vec<i32>,
    to_seconds: Vec<i64>,
}

fn case() -> impl Strategy<Value = Case> {
    (1usize..40).prop_flat_map(|n| {
        (
            prop::collection::vec(change(), n),
            prop::collection::vec(0i64..3, n),
            prop::collection::vec(0..n, 0..3),
            prop::collection::vec(0i32..(n as i32 + 2), 1..4),
            prop::collection::vec(-1i64..(2 * n as i64 + 2), 1..4),
        )
            .prop_map(|(changes, gaps, snapshots_after, to_versions, to_seconds)| Case {
                changes,
                gaps,
                snapshots_after,
                to_versions,
                to_seconds,
            })
    })
}

fn new_event(id: Uuid, version: i32, change: &Change, ts: DateTime<Utc>) -> NewEvent {
    let (event_type, data) = match change {
        Change::Created(d) => ("task.created", d.clone()),
        Change::Updated(d) => ("task.updated", d.clone()),
        Change::Deleted => ("task.deleted", json!({})),
    };
    let mut e = NewEvent::new(id, AggregateType::Entity, event_type, "user-1", data, version);
    e.timestamp = Some(ts);
    e
}

async fn run_case(repo: &EventRepository, case: Case) {
    let id = Uuid::now_v7();
    let mut seconds = 0;
    for (i, change) in case.changes.iter().enumerate() {
        seconds += case.gaps[i];
        repo.append(new_event(id, i as i32 + 1, change, at(seconds)))
            .await
            .unwrap();
        if case.snapshots_after.contains(&i) {
            repo.snapshot(id).await.unwrap();
        }
    }
    let mut asks = vec![FoldOptions::default()];
    asks.extend(case.to_versions.iter().map(|v| FoldOptions {
        to_version: Some(*v),
        ..Default::default()
    }));
    asks.extend(case.to_seconds.iter().map(|s| FoldOptions {
        to_timestamp: Some(at(*s)),
        ..Default::default()
    }));
    asks.push(FoldOptions {
        bookkeeping: Bookkeeping {
            ignore_keys: vec![],
            drop_previous_companions: false,
        },
        ..Default::default()
    });
    for options in asks {
        let replay = repo.replay(id, &options).await.unwrap();
        assert_eq!(replay.result, model(repo, id, &options).await, "{options:?}");
    }
}

#[test]
fn a_replay_equals_the_fold_of_the_whole_stream_from_any_snapshot() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let repo = runtime.block_on(common::repo("replay_model"));
    let mut runner = TestRunner::new(Config {
        cases: 24,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&case(), |case| {
            runtime.block_on(run_case(&repo, case));
            Ok(())
        })
        .unwrap();
}

/// A stream longer than a page (5,000 versions) is read in pages and folded as it comes; a
/// snapshot in the middle of a page and one on a page's edge give the same state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_several_pages_replays_exactly() {
    let repo = common::repo("replay_pages").await;
    let id = Uuid::now_v7();
    let events: Vec<NewEvent> = (1..=12_345)
        .map(|v| {
            let mut e = event(id, v);
            e.data = json!({ "n": v, format!("k{}", v % 7): v, "tags": [v % 3] });
            e.timestamp = Some(at(i64::from(v)));
            e
        })
        .collect();
    repo.append_batch(events).await.unwrap();
    let full = repo.replay(id, &FoldOptions::default()).await.unwrap();
    assert_eq!(full.result, model(&repo, id, &FoldOptions::default()).await);
    assert_eq!((full.snapshot_version, full.events_folded), (None, 12_345));
    for to in [1, 4_999, 5_000, 5_001, 10_000, 12_344] {
        let options = FoldOptions {
            to_version: Some(to),
            ..Default::default()
        };
        assert_eq!(
            repo.replay(id, &options).await.unwrap().result,
            model(&repo, id, &options).await
        );
    }
    // A snapshot at the latest version: the next replay folds nothing and gives the same state.
    let snap = repo.snapshot(id).await.unwrap();
    assert!(snap.snapshot_stored);
    let again = repo.replay(id, &FoldOptions::default()).await.unwrap();
    assert_eq!(again.result, full.result);
    assert_eq!((again.snapshot_version, again.events_folded), (Some(12_345), 0));
}

/// Snapshots are used only by replays with the same fold rules, only at or below the target
/// version, and, as of a time, only when every event folded into them is at or before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_used_only_where_it_holds() {
    let repo = common::repo("replay_rules").await;
    let id = Uuid::now_v7();
    for v in 1..=10 {
        let mut e = event(id, v);
        e.data = json!({ "n": v, "updatedFields": ["n"] });
        e.timestamp = Some(at(i64::from(v) * 10));
        repo.append(e).await.unwrap();
    }
    repo.snapshot(id).await.unwrap(); // at version 10, made of events up to t=100
    for v in 11..=15 {
        let mut e = event(id, v);
        e.data = json!({ "n": v });
        e.timestamp = Some(at(i64::from(v) * 10));
        repo.append(e).await.unwrap();
    }
    let latest = repo.replay(id, &FoldOptions::default()).await.unwrap();
    assert_eq!((latest.snapshot_version, latest.events_folded), (Some(10), 5));
    // Other rules: the snapshot was made without updatedFields; these keep it.
    let keep = FoldOptions {
        bookkeeping: Bookkeeping {
            ignore_keys: vec![],
            drop_previous_companions: true,
        },
        ..Default::default()
    };
    let other = repo.replay(id, &keep).await.unwrap();
    assert_eq!((other.snapshot_version, other.events_folded), (None, 15));
    assert_eq!(other.result, model(&repo, id, &keep).await);
    // Below the snapshot's version: from the start.
    let early = FoldOptions {
        to_version: Some(7),
        ..Default::default()
    };
    let r = repo.replay(id, &early).await.unwrap();
    assert_eq!((r.snapshot_version, r.result.version), (None, 7));
    // As of t=95: the snapshot holds an event from t=100, so it is not used.
    let before = FoldOptions {
        to_timestamp: Some(at(95)),
        ..Default::default()
    };
    let r = repo.replay(id, &before).await.unwrap();
    assert_eq!((r.snapshot_version, r.result.version), (None, 9));
    assert_eq!(r.result, model(&repo, id, &before).await);
    // As of t=120: it is.
    let after = FoldOptions {
        to_timestamp: Some(at(120)),
        ..Default::default()
    };
    let r = repo.replay(id, &after).await.unwrap();
    assert_eq!((r.snapshot_version, r.result.version), (Some(10), 12));
    assert_eq!(r.result, model(&repo, id, &after).await);
    // As of a time before PostgreSQL's earliest: nothing yet, as the fold says, not a failure.
    let ancient = FoldOptions {
        to_timestamp: Some(Utc.with_ymd_and_hms(-100_000, 1, 1, 0, 0, 0).unwrap()),
        ..Default::default()
    };
    let r = repo.replay(id, &ancient).await.unwrap();
    assert_eq!((r.result.version, r.snapshot_version), (0, None));
    assert_eq!(r.result, model(&repo, id, &ancient).await);
    // Unknown aggregate: null at version 0, nothing stored.
    let none = repo.snapshot(Uuid::now_v7()).await.unwrap();
    assert_eq!(
        (none.result.state.clone(), none.result.version, none.snapshot_stored),
        (Value::Null, 0, false)
    );
}

/// With `snapshot_every`, replays store snapshots as they go; a snapshot and the events after
/// it, folded by the caller, give what the replay gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshot_policy_and_snapshot_with_tail() {
    let base = common::repo("replay_policy").await;
    let mut config = base.config().clone();
    config.snapshot_every = Some(100);
    let repo = EventRepository::new(config).unwrap();
    let id = Uuid::now_v7();
    let batch = |from: i32, to: i32| -> Vec<NewEvent> {
        (from..=to)
            .map(|v| {
                let mut e = event(id, v);
                e.data = json!({ format!("f{}", v % 13): v });
                e
            })
            .collect()
    };
    repo.append_batch(batch(1, 250)).await.unwrap();
    let first = repo.replay(id, &FoldOptions::default()).await.unwrap();
    assert!(first.snapshot_stored);
    repo.append_batch(batch(251, 299)).await.unwrap();
    let second = repo.replay(id, &FoldOptions::default()).await.unwrap();
    assert_eq!(
        (second.snapshot_version, second.events_folded, second.snapshot_stored),
        (Some(250), 49, false)
    );
    assert_eq!(second.result, model(&repo, id, &FoldOptions::default()).await);

    let st = repo.get_snapshot_and_tail(id).await.unwrap();
    let snapshot: Snapshot = st.snapshot.clone().unwrap();
    assert_eq!(snapshot.version, 250);
    assert_eq!(st.events.first().map(|e| e.version), Some(251));
    let finished = fold_records(
        &st.events,
        &FoldOptions {
            from: Some(snapshot),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(finished, second.result);

    // Without a snapshot, the tail is the whole stream.
    let other = Uuid::now_v7();
    repo.append(event(other, 1)).await.unwrap();
    let st = repo.get_snapshot_and_tail(other).await.unwrap();
    assert!(st.snapshot.is_none());
    assert_eq!(
        st.events.iter().map(|e: &EventRecord| e.version).collect::<Vec<_>>(),
        [1]
    );
}

/// Snapshots are isolated like events: the owner stores them, under the one user whose events
/// they fold; a scoped handle uses its user's, never stores one, and never sees another user's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_are_isolated_by_user() {
    let owner = common::repo("replay_rls").await;
    let (app, role) = common::app_role(&owner, "replay_rls").await;
    let mut config = app.config().clone();
    config.snapshot_every = Some(1);
    let app = EventRepository::new(config).unwrap();
    let alice = app.for_user("alice").unwrap();
    let bob = app.for_user("bob").unwrap();
    let id = Uuid::now_v7();
    let mut e = NewEvent::new(
        id,
        AggregateType::Entity,
        "task.created",
        "alice",
        json!({"secret": 1}),
        1,
    );
    e.timestamp = Some(at(1));
    alice.append(e).await.unwrap();
    let r = alice.replay(id, &FoldOptions::default()).await.unwrap();
    assert!(!r.snapshot_stored, "a scoped handle never stores a snapshot");
    assert_eq!(alice.snapshot(id).await.unwrap_err().code(), "PERMISSION_DENIED");
    assert!(owner.snapshot(id).await.unwrap().snapshot_stored);
    assert_eq!(
        alice
            .replay(id, &FoldOptions::default())
            .await
            .unwrap()
            .snapshot_version,
        Some(1),
        "alice uses the owner's snapshot of her events"
    );
    // Bob sees neither the stream nor the snapshot.
    let b = bob.replay(id, &FoldOptions::default()).await.unwrap();
    assert_eq!(
        (b.result.state, b.result.version, b.snapshot_version),
        (Value::Null, 0, None)
    );
    assert!(bob.get_snapshot_and_tail(id).await.unwrap().snapshot.is_none());
    let visible = |user: &'static str| {
        let url = app.config().database_url.clone();
        let schema = owner.config().schema.clone().unwrap();
        async move {
            // As the repository sets the user: in the transaction, passed on to Citus's workers,
            // where the policies of distributed tables run.
            let client = common::connect(&url).await;
            client
                .batch_execute(&format!(
                    "BEGIN; SET LOCAL citus.propagate_set_commands = 'local'; SET LOCAL app.current_user_id = '{user}'"
                ))
                .await
                .unwrap();
            let n = client
                .query_one(&format!("SELECT count(*) FROM {schema}.event_snapshots"), &[])
                .await
                .unwrap()
                .get::<_, i64>(0);
            client.batch_execute("COMMIT").await.unwrap();
            n
        }
    };
    assert_eq!((visible("alice").await, visible("bob").await), (1, 0));

    // Bob's event in alice's stream (written by the owner): alice cannot read it, so she gets
    // no state of the stream, and the snapshot that folds it has no user: the owner's only.
    let mut e = NewEvent::new(
        id,
        AggregateType::Entity,
        "task.updated",
        "bob",
        json!({"bobs": "private"}),
        2,
    );
    e.timestamp = Some(at(2));
    owner.append(e).await.unwrap();
    assert!(owner.snapshot(id).await.unwrap().snapshot_stored);
    for err in [
        alice.replay(id, &FoldOptions::default()).await.unwrap_err(),
        alice.get_snapshot_and_tail(id).await.unwrap_err(),
    ] {
        assert_eq!(err.code(), "PERMISSION_DENIED", "{err}");
    }
    assert_eq!((visible("alice").await, visible("bob").await), (1, 0));
    let users: Vec<Option<String>> = sql(&owner)
        .await
        .query("SELECT user_id FROM event_snapshots ORDER BY version", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(users, [Some("alice".to_owned()), None]);
    let full = owner.replay(id, &FoldOptions::default()).await.unwrap();
    assert_eq!(
        (full.snapshot_version, full.result.state),
        (Some(2), json!({"secret": 1, "bobs": "private"}))
    );
    app.close();
    common::drop_role(&owner, &role).await;
}

/// A snapshot is stored only for the stream it folded. Alice's deleted aggregate is folded; while
/// the snapshot waits to be stored, the aggregate is removed and the id is created again, by
/// carol, up to the same version: the snapshot must not be stored for carol's stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_never_stored_for_a_later_stream_with_the_same_id() {
    let owner = common::repo("replay_reborn").await;
    let mut config = owner.config().clone();
    config.snapshot_every = Some(1);
    let policy = EventRepository::new(config).unwrap();
    let id = Uuid::now_v7();
    for (v, t, data) in [
        (1, "task.created", json!({"alice": "secret"})),
        (2, "task.deleted", json!({})),
    ] {
        let mut e = NewEvent::new(id, AggregateType::Entity, t, "alice", data, v);
        e.timestamp = Some(at(v.into()));
        owner.append(e).await.unwrap();
    }
    // The snapshot's insert waits behind this lock once the fold is done.
    let mut l = common::connect(&owner.config().database_url).await;
    l.batch_execute(&format!("SET search_path = {}", owner.config().schema.clone().unwrap()))
        .await
        .unwrap();
    let tx = l.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE event_snapshots IN EXCLUSIVE MODE")
        .await
        .unwrap();
    let replay = tokio::spawn(async move { policy.replay(id, &FoldOptions::default()).await });
    let watcher = sql(&owner).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let waiting: bool = watcher
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE NOT granted AND relation = 'event_snapshots'::regclass)",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the replay never reached its snapshot's insert"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // What retention does to a deleted aggregate, then carol's stream with the same id.
    tx.execute("DELETE FROM events_v2 WHERE aggregate_id = $1", &[&id])
        .await
        .unwrap();
    tx.execute("DELETE FROM event_streams WHERE aggregate_id = $1", &[&id])
        .await
        .unwrap();
    tx.execute(
        "INSERT INTO event_streams (aggregate_id, aggregate_type, user_id, version, first_timestamp, last_timestamp)
         VALUES ($1, 'entity', 'carol', 2, now(), now())",
        &[&id],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let replayed = replay.await.unwrap().unwrap();
    assert_eq!(replayed.result.version, 2);
    assert!(!replayed.snapshot_stored, "alice's state was stored for carol's stream");
    let stored: i64 = watcher
        .query_one("SELECT count(*) FROM event_snapshots WHERE aggregate_id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 0);
}
