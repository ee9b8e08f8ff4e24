//! Schema versions and upcasters (docs/upcasting.md) against a real PostgreSQL (DATABASE_URL), in
//! this pass's storage mode: what an append takes reads back, every read path delivers the
//! latest shape, snapshots are used only under the definition they were made with, and (a
//! property test) the server's replay, the browser's fold of `get_snapshot_and_tail`, and the
//! fold of events written directly in the latest shape all agree.

mod common;

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::{json, Map, Value};
use synap_events::{
    fold_records, AggregateType, Error, EventRecord, EventRepository, FoldOptions, GroupOptions, NewEvent,
    SubscribeOptions, Upcasters, UserStreamOptions,
};
use uuid::Uuid;

/// `task.updated` v1 `{ title }` → v2 `{ name }` → v3 (status `todo` → `open`); `todo.done`
/// v1 becomes `task.completed`.
fn definition() -> Value {
    json!([
        { "eventType": "task.updated", "fromVersion": 1,
          "operations": [{ "op": "rename", "from": "data.title", "to": "data.name" }] },
        { "eventType": "task.updated", "fromVersion": 2,
          "operations": [{ "op": "map", "path": "data.status", "values": { "todo": "open" } }] },
        { "eventType": "todo.done", "fromVersion": 1,
          "operations": [{ "op": "renameType", "to": "task.completed" }] },
    ])
}

/// A repository on `plain`'s schema that applies `definition`.
fn with_upcasters(plain: &EventRepository, definition: &Value) -> EventRepository {
    let mut config = plain.config().clone();
    config.upcasters = Arc::new(Upcasters::parse(definition).expect("a valid definition"));
    EventRepository::new(config).expect("repository")
}

fn event(aggregate: Uuid, version: i32, event_type: &str, data: Value, schema_version: i32) -> NewEvent {
    let mut e = NewEvent::new(
        aggregate,
        AggregateType::Entity,
        event_type,
        "upcast-user",
        data,
        version,
    );
    e.schema_version = schema_version;
    e
}

/// (event type, schema version, stored schema version, data) of each record.
fn shapes(records: &[EventRecord]) -> Vec<(String, i32, i32, Value)> {
    let mut out: Vec<_> = records
        .iter()
        .map(|r| {
            (
                r.event_type.clone(),
                r.schema_version,
                r.stored_schema_version(),
                r.data.clone(),
            )
        })
        .collect();
    out.sort_by_key(|s| (s.0.clone(), s.2));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_read_path_delivers_the_latest_shape() {
    let plain = common::repo("upcast_reads").await;
    let id = Uuid::now_v7();
    let correlation = Uuid::now_v7();
    let mut events = vec![
        event(id, 1, "task.created", json!({ "name": "a" }), 1),
        event(id, 2, "task.updated", json!({ "title": "b", "status": "todo" }), 1),
        event(id, 3, "task.updated", json!({ "name": "c", "status": "todo" }), 2),
        event(id, 4, "todo.done", json!({}), 1),
    ];
    for e in &mut events {
        e.correlation_id = Some(correlation);
    }
    let appended = plain.append_batch(events).await.unwrap();
    assert_eq!(
        appended.iter().map(|r| r.schema_version).collect::<Vec<_>>(),
        [1, 1, 2, 1],
        "an append returns the schema versions it took"
    );

    let expected = vec![
        ("task.completed".to_owned(), 1, 1, json!({})),
        ("task.created".to_owned(), 1, 1, json!({ "name": "a" })),
        (
            "task.updated".to_owned(),
            3,
            1,
            json!({ "name": "b", "status": "open" }),
        ),
        (
            "task.updated".to_owned(),
            3,
            2,
            json!({ "name": "c", "status": "open" }),
        ),
    ];
    let repo = with_upcasters(&plain, &definition());

    // Without upcasters every read gives the stored shape.
    let stored = plain.get_aggregate_stream(id, &Default::default()).await.unwrap();
    assert_eq!(
        stored
            .iter()
            .map(|r| (r.schema_version, r.upcast_from.is_none()))
            .collect::<Vec<_>>(),
        [(1, true), (1, true), (2, true), (1, true)]
    );
    assert_eq!(stored[1].data, json!({ "title": "b", "status": "todo" }));

    let stream = repo.get_aggregate_stream(id, &Default::default()).await.unwrap();
    assert_eq!(shapes(&stream), expected, "aggregate stream");
    let renamed = stream.iter().find(|r| r.event_type == "task.completed").unwrap();
    assert_eq!(renamed.stored_event_type(), "todo.done");
    let user = repo
        .get_user_stream("upcast-user", &UserStreamOptions::default())
        .await
        .unwrap();
    assert_eq!(shapes(&user), expected, "user stream");
    assert_eq!(
        shapes(&repo.get_correlated_events(correlation).await.unwrap()),
        expected,
        "correlation"
    );
    let by_type = repo.get_events_by_type("task.updated", 10).await.unwrap();
    assert_eq!(shapes(&by_type), expected[2..].to_vec(), "by type");
    // The feed shows a transaction's events once every older transaction has ended (other
    // tests run beside this one): read pages of two until all four came.
    let mut feed: Vec<EventRecord> = Vec::new();
    let mut after = None;
    while feed.len() < 4 {
        let page = repo.read_all(after.as_ref(), 2).await.unwrap();
        if page.events.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        feed.extend(page.events);
        after = Some(page.checkpoint);
    }
    assert_eq!(shapes(&feed), expected, "read_all in pages of two");

    let mut subscription = repo
        .subscribe(SubscribeOptions {
            poll_interval: Duration::from_millis(50),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 4 {
        seen.extend(subscription.next_batch().await.unwrap());
    }
    assert_eq!(shapes(&seen), expected, "subscribe");

    let mut options = GroupOptions::new("upcast-group");
    options.poll_interval = Duration::from_millis(50);
    let mut member = repo.join_group(options).await.unwrap();
    let got = Arc::new(std::sync::Mutex::new(Vec::new()));
    let done = Arc::new(tokio::sync::Notify::new());
    let (sink, signal) = (got.clone(), done.clone());
    member
        .consume(
            move |events: Vec<EventRecord>| {
                let (sink, signal) = (sink.clone(), signal.clone());
                async move {
                    let mut all = sink.lock().unwrap();
                    all.extend(events);
                    if all.len() >= 4 {
                        signal.notify_one();
                    }
                    Ok(())
                }
            },
            async move { done.notified().await },
        )
        .await
        .unwrap();
    assert_eq!(shapes(&got.lock().unwrap()), expected, "consumer group");
    member.leave().await.unwrap();

    // Replay folds the upcast events: the state has `name` and `open`, never `title`.
    let replay = repo.replay(id, &FoldOptions::default()).await.unwrap();
    assert_eq!(replay.result.state, json!({ "name": "c", "status": "open" }));
    let tail = repo.get_snapshot_and_tail(id).await.unwrap();
    assert_eq!(shapes(&tail.events), expected, "snapshot and tail");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_are_used_only_under_their_definition() {
    let plain = common::repo("upcast_snapshots").await;
    let id = Uuid::now_v7();
    plain
        .append_batch(vec![
            event(id, 1, "task.created", json!({}), 1),
            event(id, 2, "task.updated", json!({ "title": "old" }), 1),
        ])
        .await
        .unwrap();
    // A snapshot made without upcasters holds `title`.
    let before = plain.snapshot(id).await.unwrap();
    assert_eq!(before.result.state, json!({ "title": "old" }));

    // Under the definition it is not used: the replay folds from version 0 and renames.
    let repo = with_upcasters(&plain, &definition());
    let replay = repo.replay(id, &FoldOptions::default()).await.unwrap();
    assert_eq!(replay.snapshot_version, None);
    assert_eq!(replay.result.state, json!({ "name": "old" }));
    assert!(repo.get_snapshot_and_tail(id).await.unwrap().snapshot.is_none());

    // Its own snapshot is, and the plain repository still uses the first one.
    repo.snapshot(id).await.unwrap();
    let again = repo.replay(id, &FoldOptions::default()).await.unwrap();
    assert_eq!((again.snapshot_version, again.events_folded), (Some(2), 0));
    assert_eq!(again.result.state, json!({ "name": "old" }));
    let tail = repo.get_snapshot_and_tail(id).await.unwrap();
    assert_eq!(tail.snapshot.unwrap().state, json!({ "name": "old" }));
    assert_eq!(
        plain.replay(id, &FoldOptions::default()).await.unwrap().result.state,
        json!({ "title": "old" })
    );

    // A changed definition (one more step) leaves both unused, not wrong.
    let mut longer = definition();
    longer
        .as_array_mut()
        .unwrap()
        .push(json!({ "eventType": "task.updated", "fromVersion": 3,
        "operations": [{ "op": "rename", "from": "data.name", "to": "data.label" }] }));
    let changed = with_upcasters(&plain, &longer);
    let replay = changed.replay(id, &FoldOptions::default()).await.unwrap();
    assert_eq!(replay.snapshot_version, None);
    assert_eq!(replay.result.state, json!({ "label": "old" }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_versions_are_checked_and_default_to_one() {
    let repo = common::repo("upcast_values").await;
    let id = Uuid::now_v7();
    for bad in [json!(0), json!(-1), json!(1.5), json!("2"), json!(2147483648i64)] {
        let err = repo
            .append_json(json!({ "aggregateId": id.to_string(), "aggregateType": "entity",
                "eventType": "entity.created", "userId": "u", "data": {}, "version": 1, "schemaVersion": bad }))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::Validation { field, .. } if field == "schemaVersion"),
            "{bad}: {err:?}"
        );
    }
    assert_eq!(
        repo.get_aggregate_version(id).await.unwrap(),
        None,
        "a refused append wrote nothing"
    );
    let max = repo
        .append_json(json!({ "aggregateId": id.to_string(), "aggregateType": "entity",
            "eventType": "entity.created", "userId": "u", "data": {}, "version": 1, "schemaVersion": 2147483647 }))
        .await
        .unwrap();
    assert_eq!(max.schema_version, i32::MAX);
    let read = repo.get_aggregate_stream(id, &Default::default()).await.unwrap();
    assert_eq!(read[0].schema_version, i32::MAX);

    // A row written by plain SQL without the column is version 1; the server refuses 0.
    let client = common::sql(&repo).await;
    let other = Uuid::now_v7();
    client
        .execute(
            "INSERT INTO events_v2 (id, \"timestamp\", aggregate_id, aggregate_type, event_type, user_id, data, version)
             VALUES (gen_random_uuid(), now(), $1, 'entity', 'entity.created', 'u', '{}', 1)",
            &[&other],
        )
        .await
        .unwrap();
    let by_type = repo.get_events_by_type("entity.created", 10).await.unwrap();
    let row = by_type.iter().find(|e| e.aggregate_id == other).unwrap();
    assert_eq!(row.schema_version, 1);
    let refused = client
        .execute(
            "INSERT INTO events_v2 (id, \"timestamp\", aggregate_id, aggregate_type, event_type, user_id, data, version, schema_version)
             VALUES (gen_random_uuid(), now(), $1, 'entity', 'entity.created', 'u', '{}', 1, 0)",
            &[&Uuid::now_v7()],
        )
        .await;
    assert!(refused.is_err(), "schema_version 0 was stored");
}

#[test]
fn a_refused_definition_names_its_step() {
    let err = Upcasters::parse(&json!([
        { "eventType": "a.b", "fromVersion": 1, "operations": [] },
        { "eventType": "a.b", "fromVersion": 3, "operations": [] },
    ]))
    .unwrap_err();
    assert_eq!(err.code(), "INVALID_UPCASTERS");
    assert_eq!(err.details()["step"], json!("a.b@3"));
    assert_eq!(err.details()["reason"], json!("gap"));
}

// ---------------------------------------------------------------------------------------------
// The property: for random streams and random chains of renames, written in old shapes,
// replay == fold(snapshot and tail) == fold of the same events written in the latest shape.
// ---------------------------------------------------------------------------------------------

const KEYS: [&str; 4] = ["k0", "k1", "k2", "k3"];

/// A chain: for each step, a rename of one key to a fresh name (`k0` → `k0_v2`, ...), or a
/// default for a key.
#[derive(Debug, Clone)]
enum Op {
    Rename(usize),
    Default(usize, i64),
}

#[derive(Debug, Clone)]
struct Case {
    chain: Vec<Op>,
    /// Each event: the stored schema version (1..=latest) and the values of the keys, in the
    /// latest shape (absent keys are None).
    events: Vec<(i32, Vec<Option<i64>>)>,
    snapshot_at: Option<usize>,
}

fn case() -> impl Strategy<Value = Case> {
    let op = prop_oneof![
        (0..4usize).prop_map(Op::Rename),
        (0..4usize, 0..100i64).prop_map(|(k, v)| Op::Default(k, v))
    ];
    (prop::collection::vec(op, 1..4), 1..25usize).prop_flat_map(|(chain, n)| {
        let latest = chain.len() as i32 + 1;
        let event = (1..=latest, prop::collection::vec(prop::option::of(0..50i64), 4));
        (Just(chain), prop::collection::vec(event, n), prop::option::of(0..n)).prop_map(
            |(chain, events, snapshot_at)| Case {
                chain,
                events,
                snapshot_at,
            },
        )
    })
}

/// The definition of a chain, and each key's name at each version (index 0 is version 1).
fn chain_definition(chain: &[Op]) -> (Value, Vec<Vec<String>>) {
    let mut names: Vec<Vec<String>> = vec![KEYS.iter().map(|k| k.to_string()).collect()];
    let mut steps = Vec::new();
    for (i, op) in chain.iter().enumerate() {
        let from = i as i32 + 1;
        let mut next = names[i].clone();
        let operation = match op {
            Op::Rename(k) => {
                next[*k] = format!("{}_v{}", KEYS[*k], from + 1);
                json!({ "op": "rename", "from": format!("data.{}", names[i][*k]), "to": format!("data.{}", next[*k]) })
            }
            Op::Default(k, v) => json!({ "op": "default", "path": format!("data.{}", names[i][*k]), "value": v }),
        };
        steps.push(json!({ "eventType": "item.changed", "fromVersion": from, "operations": [operation] }));
        names.push(next);
    }
    (Value::Array(steps), names)
}

/// An event's data in the shape of `version`, from its values in the latest shape: what an old
/// writer wrote. A key a later `default` fills is left out by the writer of a version before it
/// only when the event has no value for it (then the default is what the latest writer writes).
fn data_at(chain: &[Op], names: &[Vec<String>], version: i32, values: &[Option<i64>]) -> (Value, Value) {
    let mut old = Map::new();
    let mut latest = Map::new();
    let latest_names = names.last().unwrap();
    for (k, value) in values.iter().enumerate() {
        // The value the latest shape holds: the event's own, or a default applied on the way.
        let defaulted = chain
            .iter()
            .enumerate()
            .skip(version as usize - 1)
            .find_map(|(_, op)| match op {
                Op::Default(dk, v) if *dk == k => Some(*v),
                _ => None,
            });
        match (value, defaulted) {
            (Some(v), _) => {
                old.insert(names[version as usize - 1][k].clone(), json!(v));
                latest.insert(latest_names[k].clone(), json!(v));
            }
            (None, Some(d)) => {
                latest.insert(latest_names[k].clone(), json!(d));
            }
            (None, None) => {}
        }
    }
    (Value::Object(old), Value::Object(latest))
}

#[test]
fn replay_snapshot_and_tail_and_the_latest_shape_agree() {
    let (runtime, mut runner) = common::model_runner(24);
    let plain = runtime.block_on(common::repo("upcast_model"));
    runner
        .run(&case(), |case| {
            runtime.block_on(async {
                let (definition, names) = chain_definition(&case.chain);
                let repo = with_upcasters(&plain, &definition);
                let (old_id, new_id) = (Uuid::now_v7(), Uuid::now_v7());
                let latest = case.chain.len() as i32 + 1;
                let mut old_events = Vec::new();
                let mut new_events = Vec::new();
                for (i, (version, values)) in case.events.iter().enumerate() {
                    let (old, new) = data_at(&case.chain, &names, *version, values);
                    let v = i as i32 + 1;
                    old_events.push(event(old_id, v, "item.changed", old, *version));
                    new_events.push(event(new_id, v, "item.changed", new, latest));
                }
                // A snapshot part way (under the definition), then the rest of the stream.
                let split = case.snapshot_at.map_or(old_events.len(), |at| at + 1);
                let rest = old_events.split_off(split);
                plain.append_batch(old_events).await.unwrap();
                if case.snapshot_at.is_some() {
                    repo.snapshot(old_id).await.unwrap();
                }
                if !rest.is_empty() {
                    plain.append_batch(rest).await.unwrap();
                }
                plain.append_batch(new_events).await.unwrap();
                let replay = repo.replay(old_id, &FoldOptions::default()).await.unwrap();
                let tail = repo.get_snapshot_and_tail(old_id).await.unwrap();
                let options = FoldOptions {
                    from: tail.snapshot.clone(),
                    ..Default::default()
                };
                let browser = fold_records(&tail.events, &options).unwrap();
                let direct = plain.replay(new_id, &FoldOptions::default()).await.unwrap();
                prop_assert_eq!(&replay.result.state, &browser.state, "replay and the fold of the tail");
                prop_assert_eq!(
                    &replay.result.state,
                    &direct.result.state,
                    "upcast and written in the latest shape"
                );
                // The fold of the stored events under the definition, as a browser given them as
                // stored would run it.
                let stored = plain.get_aggregate_stream(old_id, &Default::default()).await.unwrap();
                let options = FoldOptions {
                    upcasters: (*repo.config().upcasters).clone(),
                    ..Default::default()
                };
                let folded = fold_records(&stored, &options).unwrap();
                prop_assert_eq!(&folded.state, &direct.result.state, "fold_records under upcasters");
                Ok(())
            })
        })
        .unwrap();
}
