//! EventRepository against a real PostgreSQL (DATABASE_URL).

mod common;

use chrono::{Duration, TimeZone, Utc};
use common::{count_rows, event, repo, sql, storage_mode};
use serde_json::{json, Value};
use synap_events::{
    AggregateType, CountFilter, Error, EventRepository, EventSource, IssueCode, NewEvent, StreamOptions,
    UserStreamOptions,
};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn design_sample_append_then_read() {
    let repo = repo("sample").await;
    let aggregate = Uuid::parse_str("00000000-0000-0000-0000-000000000001").unwrap();
    let mut e = NewEvent::new(
        aggregate,
        AggregateType::Entity,
        "test.event",
        "test-user",
        json!({"message": "Hello TimescaleDB!"}),
        1,
    );
    e.source = EventSource::Api;
    let stored = repo.append(e).await.unwrap();
    assert_eq!(stored.version, 1);
    assert!(stored.position > 0);

    let stream = repo
        .get_aggregate_stream(aggregate, &StreamOptions::default())
        .await
        .unwrap();
    assert_eq!(stream, vec![stored.clone()]);
    let user = repo
        .get_user_stream(
            "test-user",
            &UserStreamOptions {
                days: 1,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(user.len(), 1);
    assert_eq!(user[0].id, stored.id);
    assert_eq!(repo.get_aggregate_version(aggregate).await.unwrap(), Some(1));
    assert_eq!(repo.get_aggregate_version(Uuid::from_u128(99)).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optimistic_locking_rejects_stale_and_future_versions() {
    let repo = repo("locking").await;
    let a = Uuid::now_v7();
    repo.append(event(a, 1)).await.unwrap();
    repo.append(event(a, 2)).await.unwrap();
    for (version, actual) in [(1, 2), (2, 2), (5, 2)] {
        match repo.append(event(a, version)).await.unwrap_err() {
            Error::ConcurrencyConflict {
                aggregate_id,
                expected_version,
                actual_version,
            } => {
                assert_eq!(aggregate_id, a);
                assert_eq!(expected_version, version - 1);
                assert_eq!(actual_version, actual);
            }
            other => panic!("expected a conflict, got {other:?}"),
        }
    }
    // Version 2 of an unknown aggregate.
    let err = repo.append(event(Uuid::now_v7(), 2)).await.unwrap_err();
    assert_eq!(err.code(), "CONCURRENCY_CONFLICT");
    assert!(
        err.to_string()
            .starts_with("Concurrency conflict detected: expected version 1, got 0"),
        "{err}"
    );
    assert_eq!(count_rows(&repo).await, (2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_racing_appends_of_one_version_make_one_event() {
    let repo = repo("race").await;
    let a = Uuid::now_v7();
    let mut tasks = Vec::new();
    for i in 0..32 {
        let repo = repo.clone();
        tasks.push(tokio::spawn(async move {
            let mut e = event(a, 1);
            e.data = json!({ "writer": i });
            repo.append(e).await
        }));
    }
    let mut ok = 0;
    let mut conflicts = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(Error::ConcurrencyConflict { .. }) => conflicts += 1,
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((ok, conflicts), (1, 31));

    // Then 32 writers each append 5 events with reload-and-retry: versions stay contiguous.
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let repo = repo.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0;
            while done < 5 {
                let current = repo.get_aggregate_version(a).await.unwrap().unwrap();
                match repo.append(event(a, current + 1)).await {
                    Ok(_) => done += 1,
                    Err(Error::ConcurrencyConflict { .. }) => {}
                    Err(other) => panic!("unexpected {other:?}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stream = repo.get_aggregate_stream(a, &StreamOptions::default()).await.unwrap();
    let versions: Vec<i32> = stream.iter().map(|e| e.version).collect();
    assert_eq!(versions, (1..=161).collect::<Vec<_>>());
    let c = sql(&repo).await;
    let dupes: i64 = c
        .query_one(
            "SELECT count(*) FROM (SELECT version FROM events_v2 GROUP BY version HAVING count(*) > 1) d",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(dupes, 0);
    assert_eq!(repo.get_aggregate_version(a).await.unwrap(), Some(161));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_append_with_the_same_id_is_idempotent() {
    let repo = repo("idem").await;
    let a = Uuid::now_v7();
    let mut e = event(a, 1);
    e.id = Some(Uuid::now_v7());
    let first = repo.append(e.clone()).await.unwrap();
    let again = repo.append(e.clone()).await.unwrap();
    assert_eq!(first, again);
    // Same version with another id is a conflict.
    let mut other = e.clone();
    other.id = Some(Uuid::now_v7());
    assert_eq!(repo.append(other).await.unwrap_err().code(), "CONCURRENCY_CONFLICT");
    assert_eq!(count_rows(&repo).await, (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregate_type_is_fixed_by_the_first_event() {
    let repo = repo("aggtype").await;
    let a = Uuid::now_v7();
    repo.append(event(a, 1)).await.unwrap();
    let mut e = event(a, 2);
    e.aggregate_type = AggregateType::Relation;
    let err = repo.append(e).await.unwrap_err();
    assert_eq!(err.code(), "AGGREGATE_TYPE_MISMATCH");
    assert_eq!(count_rows(&repo).await, (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_all_or_nothing() {
    let repo = repo("batch").await;
    let a = Uuid::now_v7();
    let b = Uuid::now_v7();
    let stored = repo
        .append_batch(vec![event(a, 1), event(b, 1), event(a, 2), event(a, 3), event(b, 2)])
        .await
        .unwrap();
    assert_eq!(
        stored.iter().map(|e| e.version).collect::<Vec<_>>(),
        vec![1, 1, 2, 3, 2]
    );
    assert!(stored.windows(2).all(|w| w[0].position < w[1].position));
    assert_eq!(repo.get_aggregate_version(a).await.unwrap(), Some(3));

    // One invalid event: nothing written.
    let mut bad = event(b, 4);
    bad.event_type = "Not Valid".into();
    let err = repo.append_batch(vec![event(a, 4), bad]).await.unwrap_err();
    match err {
        Error::Validation { field, reason, .. } => {
            assert_eq!(field, "events[1].eventType");
            assert_eq!(reason, IssueCode::InvalidEventType);
        }
        other => panic!("{other:?}"),
    }
    // One stale aggregate: nothing written, the conflict names it.
    let c = Uuid::now_v7();
    let err = repo
        .append_batch(vec![event(c, 1), event(a, 4), event(b, 2)])
        .await
        .unwrap_err();
    match err {
        Error::ConcurrencyConflict {
            aggregate_id,
            expected_version,
            actual_version,
        } => assert_eq!((aggregate_id, expected_version, actual_version), (b, 1, 2)),
        other => panic!("{other:?}"),
    }
    assert_eq!(count_rows(&repo).await, (5, 2));
    assert_eq!(repo.get_aggregate_version(a).await.unwrap(), Some(3));
    assert_eq!(repo.get_aggregate_version(c).await.unwrap(), None);
    // Creating an aggregate that exists (its guard row is a plain INSERT in a batch): the same
    // conflict, and the new aggregate beside it is not created either.
    let err = repo.append_batch(vec![event(c, 1), event(a, 1)]).await.unwrap_err();
    match err {
        Error::ConcurrencyConflict {
            aggregate_id,
            expected_version,
            actual_version,
        } => assert_eq!((aggregate_id, expected_version, actual_version), (a, 0, 3)),
        other => panic!("{other:?}"),
    }
    assert_eq!(count_rows(&repo).await, (5, 2));
    assert_eq!(repo.get_aggregate_version(c).await.unwrap(), None);
    // Versions of one aggregate must be consecutive inside the batch.
    let err = repo.append_batch(vec![event(c, 1), event(c, 3)]).await.unwrap_err();
    assert_eq!(err.code(), "VALIDATION_FAILED");
    assert_eq!(repo.append_batch(vec![]).await.unwrap_err().code(), "VALIDATION_FAILED");
}

/// A batch keeps each stream's first and last event times, with given times, the server's time,
/// and both in one aggregate, for aggregates given in any order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_keep_each_streams_time_span() {
    use chrono::TimeZone;
    let repo = repo("batch_span").await;
    let at = |d: u32| chrono::Utc.with_ymd_and_hms(2025, 3, d, 12, 0, 0).unwrap();
    let timed = |id: Uuid, v: i32, t: Option<chrono::DateTime<chrono::Utc>>| {
        let mut e = event(id, v);
        e.timestamp = t;
        e
    };
    // Ids out of order (the batch takes the streams in id order).
    let (given, server, mixed) = (
        Uuid::from_u128(3 << 100),
        Uuid::from_u128(1 << 100),
        Uuid::from_u128(2 << 100),
    );
    repo.append_batch(vec![
        timed(given, 1, Some(at(9))),
        timed(mixed, 1, Some(at(2))),
        timed(server, 1, None),
        timed(given, 2, Some(at(4))),
        timed(mixed, 2, None),
        timed(given, 3, Some(at(6))),
    ])
    .await
    .unwrap();
    repo.append_batch(vec![timed(given, 4, Some(at(1))), timed(mixed, 3, Some(at(3)))])
        .await
        .unwrap();
    let c = common::sql(&repo).await;
    let rows = c
        .query(
            "SELECT s.aggregate_id, s.first_timestamp = min(e.\"timestamp\"), s.last_timestamp = max(e.\"timestamp\"),
                    s.version = count(*)
               FROM event_streams s JOIN events_v2 e USING (aggregate_id)
              GROUP BY s.aggregate_id, s.first_timestamp, s.last_timestamp, s.version",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
    for r in rows {
        let id: Uuid = r.get(0);
        assert!(
            r.get::<_, bool>(1) && r.get::<_, bool>(2) && r.get::<_, bool>(3),
            "{id}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_event_batch() {
    let repo = repo("bigbatch").await;
    let aggregates: Vec<Uuid> = (0..1000).map(|_| Uuid::now_v7()).collect();
    let mut events = Vec::with_capacity(100_000);
    for v in 1..=100 {
        for a in &aggregates {
            events.push(event(*a, v));
        }
    }
    let stored = repo.append_batch(events).await.unwrap();
    assert_eq!(stored.len(), 100_000);
    assert_eq!(count_rows(&repo).await, (100_000, 1000));
    assert_eq!(repo.get_aggregate_version(aggregates[17]).await.unwrap(), Some(100));
    let stream = repo
        .get_aggregate_stream(aggregates[17], &StreamOptions::default())
        .await
        .unwrap();
    assert_eq!(stream.len(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_round_trips_exactly() {
    let repo = repo("roundtrip").await;
    let big = "x".repeat(100 * 1024);
    let data = json!({
        "title": "emoji 🚀✅ café ñ 漢字",
        "quotes": "it's \"quoted\" \\ back\\slash",
        "newlines": "a\nb\r\nc\t",
        "nested": {"deep": {"array": [1, 2.5, -3, true, null, {"k": "v"}], "empty": {}}},
        "max_safe": 9007199254740991i64,
        "big": big,
    });
    let a = Uuid::now_v7();
    let mut e = event(a, 1);
    e.data = data.clone();
    e.metadata = Some(json!({"ip": "127.0.0.1", "ua": "tést"}));
    e.correlation_id = Some(Uuid::now_v7());
    e.causation_id = Some(Uuid::now_v7());
    let stored = repo.append(e).await.unwrap();
    let read = repo.get_aggregate_stream(a, &StreamOptions::default()).await.unwrap();
    assert_eq!(read[0].data, data);
    assert_eq!(read[0], stored);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_their_code_and_write_nothing() {
    let repo = repo("badinput").await;
    let a = Uuid::now_v7();
    let base = || event(a, 1);
    let mut huge = base();
    huge.data = json!({ "s": "x".repeat(1024 * 1024 + 1) });
    let cases: Vec<(&str, NewEvent, IssueCode)> = vec![
        (
            "empty event type",
            NewEvent {
                event_type: "".into(),
                ..base()
            },
            IssueCode::InvalidEventType,
        ),
        (
            "one segment",
            NewEvent {
                event_type: "created".into(),
                ..base()
            },
            IssueCode::InvalidEventType,
        ),
        (
            "uppercase",
            NewEvent {
                event_type: "Entity.Created".into(),
                ..base()
            },
            IssueCode::InvalidEventType,
        ),
        (
            "space",
            NewEvent {
                event_type: "entity .created".into(),
                ..base()
            },
            IssueCode::InvalidEventType,
        ),
        (
            "double dot",
            NewEvent {
                event_type: "entity..created".into(),
                ..base()
            },
            IssueCode::InvalidEventType,
        ),
        (
            "trailing dot",
            NewEvent {
                event_type: "entity.".into(),
                ..base()
            },
            IssueCode::InvalidEventType,
        ),
        (
            "digit first",
            NewEvent {
                event_type: "entity.1created".into(),
                ..base()
            },
            IssueCode::InvalidEventType,
        ),
        (
            "dash",
            NewEvent {
                event_type: "entity.title-changed".into(),
                ..base()
            },
            IssueCode::InvalidEventType,
        ),
        (
            "too long type",
            NewEvent {
                event_type: format!("entity.{}", "a".repeat(130)),
                ..base()
            },
            IssueCode::InvalidEventType,
        ),
        (
            "sql in type",
            NewEvent {
                event_type: "entity.x'; drop table events_v2; --".into(),
                ..base()
            },
            IssueCode::InvalidEventType,
        ),
        (
            "empty user",
            NewEvent {
                user_id: "".into(),
                ..base()
            },
            IssueCode::InvalidUserId,
        ),
        (
            "blank user",
            NewEvent {
                user_id: "   ".into(),
                ..base()
            },
            IssueCode::InvalidUserId,
        ),
        (
            "long user",
            NewEvent {
                user_id: "u".repeat(256),
                ..base()
            },
            IssueCode::InvalidUserId,
        ),
        (
            "nul user",
            NewEvent {
                user_id: "a\0b".into(),
                ..base()
            },
            IssueCode::NulCharacter,
        ),
        (
            "data array",
            NewEvent {
                data: json!([1, 2]),
                ..base()
            },
            IssueCode::InvalidData,
        ),
        (
            "data string",
            NewEvent {
                data: json!("x"),
                ..base()
            },
            IssueCode::InvalidData,
        ),
        (
            "data null",
            NewEvent {
                data: Value::Null,
                ..base()
            },
            IssueCode::InvalidData,
        ),
        (
            "data number",
            NewEvent {
                data: json!(5),
                ..base()
            },
            IssueCode::InvalidData,
        ),
        (
            "nul in data value",
            NewEvent {
                data: json!({"a": "x\u{0}"}),
                ..base()
            },
            IssueCode::NulCharacter,
        ),
        (
            "nul in data key",
            NewEvent {
                data: json!({"a\u{0}": 1}),
                ..base()
            },
            IssueCode::NulCharacter,
        ),
        (
            "nul deep",
            NewEvent {
                data: json!({"a": [{"b": "\u{0}"}]}),
                ..base()
            },
            IssueCode::NulCharacter,
        ),
        (
            "metadata array",
            NewEvent {
                metadata: Some(json!([])),
                ..base()
            },
            IssueCode::InvalidMetadata,
        ),
        (
            "metadata string",
            NewEvent {
                metadata: Some(json!("m")),
                ..base()
            },
            IssueCode::InvalidMetadata,
        ),
        (
            "nul in metadata",
            NewEvent {
                metadata: Some(json!({"m": "\u{0}"})),
                ..base()
            },
            IssueCode::NulCharacter,
        ),
        (
            "version zero",
            NewEvent { version: 0, ..base() },
            IssueCode::InvalidVersion,
        ),
        (
            "version negative",
            NewEvent { version: -1, ..base() },
            IssueCode::InvalidVersion,
        ),
        (
            "version min",
            NewEvent {
                version: i32::MIN,
                ..base()
            },
            IssueCode::InvalidVersion,
        ),
        ("data too large", huge, IssueCode::TooLarge),
        (
            "two problems, first named",
            NewEvent {
                event_type: "x".into(),
                user_id: "".into(),
                ..base()
            },
            IssueCode::InvalidEventType,
        ),
        (
            "emoji type",
            NewEvent {
                event_type: "entity.🚀".into(),
                ..base()
            },
            IssueCode::InvalidEventType,
        ),
    ];
    assert!(cases.len() >= 30);
    for (name, e, code) in cases {
        match repo.append(e.clone()).await {
            Err(Error::Validation { reason, .. }) => assert_eq!(reason, code, "{name}"),
            other => panic!("{name}: expected {code}, got {other:?}"),
        }
        match repo.append_batch(vec![event(Uuid::now_v7(), 1), e]).await {
            Err(Error::Validation { reason, field, .. }) => {
                assert_eq!(reason, code, "{name} in a batch");
                assert!(field.starts_with("events[1]"), "{name}: {field}");
            }
            other => panic!("{name} in a batch: expected {code}, got {other:?}"),
        }
    }
    // Read arguments.
    let bad_reads: Vec<(&str, Error)> = vec![
        (
            "days 0",
            repo.get_user_stream(
                "u",
                &UserStreamOptions {
                    days: 0,
                    ..Default::default()
                },
            )
            .await
            .unwrap_err(),
        ),
        (
            "days huge",
            repo.get_user_stream(
                "u",
                &UserStreamOptions {
                    days: 100_000,
                    ..Default::default()
                },
            )
            .await
            .unwrap_err(),
        ),
        (
            "limit 0",
            repo.get_user_stream(
                "u",
                &UserStreamOptions {
                    limit: 0,
                    ..Default::default()
                },
            )
            .await
            .unwrap_err(),
        ),
        (
            "limit huge",
            repo.get_events_by_type("entity.created", 1_000_000).await.unwrap_err(),
        ),
        (
            "fromVersion -1",
            repo.get_aggregate_stream(
                a,
                &StreamOptions {
                    from_version: Some(-1),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err(),
        ),
    ];
    for (name, err) in bad_reads {
        assert_eq!(err.code(), "VALIDATION_FAILED", "{name}: {err}");
    }
    // Filters are parameters, as in the design: what no event has matches nothing.
    assert!(repo.get_events_by_type("DROP TABLE", 10).await.unwrap().is_empty());
    let empty_span = CountFilter {
        from_date: Some(Utc::now()),
        to_date: Some(Utc::now() - Duration::days(1)),
        ..Default::default()
    };
    assert_eq!(repo.count_events(&empty_span).await.unwrap(), 0);
    assert!(repo
        .get_user_stream("", &UserStreamOptions::default())
        .await
        .unwrap()
        .is_empty());
    assert!(repo
        .get_user_stream(
            "u",
            &UserStreamOptions {
                event_types: Some(vec!["x".into(), "Bad Type\0".into()]),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .is_empty());
    assert!(repo
        .get_aggregate_stream(
            a,
            &StreamOptions {
                from_version: Some(5),
                to_version: Some(2),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .is_empty());
    assert_eq!(count_rows(&repo).await, (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_filter_and_order() {
    let repo = repo("reads").await;
    let now = Utc::now();
    let a = Uuid::now_v7();
    let r = Uuid::now_v7();
    let workflow = Uuid::now_v7();
    let mut evs = Vec::new();
    for v in 1..=5 {
        let mut e = event(a, v);
        e.timestamp = Some(now - Duration::days(10) + Duration::days(i64::from(v) * 2));
        if v % 2 == 0 {
            e.correlation_id = Some(workflow);
        }
        evs.push(e);
    }
    let mut rel = NewEvent::new(r, AggregateType::Relation, "relation.created", "user-1", json!({}), 1);
    rel.timestamp = Some(now - Duration::hours(1));
    rel.correlation_id = Some(workflow);
    evs.push(rel);
    let mut other_user = event(Uuid::now_v7(), 1);
    other_user.user_id = "user-2".into();
    evs.push(other_user);
    repo.append_batch(evs).await.unwrap();

    // fromVersion is exclusive, as in the design: a caller holding the state at version 2 asks
    // for what follows it.
    let s = repo
        .get_aggregate_stream(
            a,
            &StreamOptions {
                from_version: Some(2),
                to_version: Some(4),
                event_types: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(s.iter().map(|e| e.version).collect::<Vec<_>>(), vec![3, 4]);
    let s = repo
        .get_aggregate_stream(
            a,
            &StreamOptions {
                event_types: Some(vec!["entity.created".into()]),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(s.len(), 1);

    // Within 7 days: versions 2..5 of `a` (at -6, -4, -2 and 0 days) and the relation.
    let u = repo
        .get_user_stream("user-1", &UserStreamOptions::default())
        .await
        .unwrap();
    assert_eq!(u.len(), 5);
    assert!(u.windows(2).all(|w| w[0].timestamp >= w[1].timestamp), "newest first");
    let u = repo
        .get_user_stream(
            "user-1",
            &UserStreamOptions {
                days: 30,
                limit: 2,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(u.len(), 2);
    let u = repo
        .get_user_stream(
            "user-1",
            &UserStreamOptions {
                days: 30,
                aggregate_types: Some(vec!["relation".into()]),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(u.len(), 1);
    let u = repo
        .get_user_stream(
            "user-1",
            &UserStreamOptions {
                days: 30,
                event_types: Some(vec!["entity.created".into()]),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(u.len(), 1);

    let wf = repo.get_correlated_events(workflow).await.unwrap();
    assert_eq!(wf.len(), 3);
    assert!(wf.windows(2).all(|w| w[0].timestamp <= w[1].timestamp), "oldest first");

    let by_type = repo.get_events_by_type("entity.updated", 100).await.unwrap();
    assert_eq!(by_type.len(), 4);
    assert_eq!(repo.get_events_by_type("entity.updated", 2).await.unwrap().len(), 2);

    assert_eq!(repo.count_events(&CountFilter::default()).await.unwrap(), 7);
    assert_eq!(
        repo.count_events(&CountFilter {
            user_id: Some("user-1".into()),
            ..Default::default()
        })
        .await
        .unwrap(),
        6
    );
    assert_eq!(
        repo.count_events(&CountFilter {
            user_id: Some("user-1".into()),
            event_type: Some("entity.created".into()),
            ..Default::default()
        })
        .await
        .unwrap(),
        1
    );
    assert_eq!(
        repo.count_events(&CountFilter {
            aggregate_type: Some("relation".into()),
            ..Default::default()
        })
        .await
        .unwrap(),
        1
    );
    assert_eq!(
        repo.count_events(&CountFilter {
            from_date: Some(now - Duration::days(5)),
            to_date: Some(now + Duration::days(1)),
            ..Default::default()
        })
        .await
        .unwrap(),
        5
    );
}

/// The partitions or chunks a plan reads (scans that ran), by line.
fn scanned(plan: &str) -> Vec<&str> {
    plan.lines()
        .filter(|l| l.contains("Scan using") || l.contains("Seq Scan on") || l.contains("Bitmap Heap Scan on"))
        .filter(|l| !l.contains("never executed"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_reads_touch_only_the_partitions_in_their_span() {
    let repo = repo("pruning").await;
    let start = Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap();
    repo.ensure_partitions(start.date_naive(), (start + Duration::days(59)).date_naive())
        .await
        .unwrap();
    // Background: one event a day for 60 days on other aggregates (60 partitions or chunks).
    let mut bg = Vec::new();
    for d in 0..60 {
        let mut e = event(Uuid::now_v7(), 1);
        e.timestamp = Some(start + Duration::days(d));
        bg.push(e);
    }
    repo.append_batch(bg).await.unwrap();
    // The stream: days 30, 31, 32.
    let a = Uuid::now_v7();
    for v in 1..=3 {
        let mut e = event(a, v);
        e.timestamp = Some(start + Duration::days(29 + i64::from(v)));
        repo.append(e).await.unwrap();
    }
    let plan = repo.explain_aggregate_stream(a).await.unwrap();
    let scanned = scanned(&plan);
    assert!(!scanned.is_empty(), "{plan}");
    assert!(
        scanned.len() <= 3,
        "a 3-day stream scanned {} partitions or chunks:\n{plan}",
        scanned.len()
    );
    assert!(!plan.contains("events_v2_default"), "{plan}");
    assert_eq!(
        repo.get_aggregate_stream(a, &StreamOptions::default())
            .await
            .unwrap()
            .len(),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_stream_touches_only_the_days_it_asks_for() {
    let repo = repo("user_pruning").await;
    let today = Utc::now().date_naive();
    repo.ensure_partitions(today - chrono::Days::new(60), today)
        .await
        .unwrap();
    // The user's events over 60 days, one a day, each an hour more than a whole number of days
    // before now: seven of them fall in a 7-day window at any hour of the day (a fixed hour of
    // the day put eight there before that hour).
    let now = Utc::now();
    let mut history = Vec::new();
    for d in 0..60i64 {
        let mut e = event(Uuid::now_v7(), 1);
        e.timestamp = Some(now - chrono::Duration::days(d) - chrono::Duration::hours(1));
        history.push(e);
    }
    repo.append_batch(history).await.unwrap();
    let options = UserStreamOptions {
        days: 7,
        ..Default::default()
    };
    let plan = repo.explain_user_stream("user-1", &options).await.unwrap();
    let scanned = scanned(&plan);
    assert!(!scanned.is_empty(), "{plan}");
    // No partition or chunk of a day wholly before the window is planned or read (the empty
    // native partitions created ahead of today may be).
    let c = sql(&repo).await;
    // On Citus a row's tableoid is its shard's, on a worker: the partitions are found by name
    // there, and each is read through its shards (the partition's name, `_` and a number).
    let older_sql = if storage_mode() == "citus" {
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
          WHERE i.inhparent = 'events_v2'::regclass AND c.relname ~ '^events_v2_p[0-9]{8}$'
            AND to_date(substr(c.relname, 12), 'YYYYMMDD') + 1 <= date_trunc('day', now() - interval '7 days', 'UTC')::date"
    } else {
        "SELECT c.relname::text FROM events_v2 e JOIN pg_class c ON c.oid = e.tableoid
          GROUP BY 1
         HAVING max(e.\"timestamp\") < date_trunc('day', now() - interval '7 days', 'UTC')"
    };
    let older: Vec<String> = c
        .query(older_sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(older.len() >= 50, "{older:?}");
    let shard_of = |line: &str, name: &str| {
        line.split(&format!(" on {name}_")).nth(1).is_some_and(|rest| {
            rest.split(' ')
                .next()
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
    };
    for line in &scanned {
        assert!(
            !older
                .iter()
                .any(|name| line.contains(&format!(" on {name} ")) || shard_of(line, name)),
            "a 7-day user stream read an older partition or chunk: {line}\n{plan}"
        );
    }
    let events = repo.get_user_stream("user-1", &options).await.unwrap();
    assert_eq!(events.len(), 7, "an hour and 0 to 6 days before now");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_outside_the_partitions_land_in_default_and_move_later() {
    let repo = repo("default").await;
    if repo.storage_mode().await.unwrap() != "native" {
        return;
    }
    let far = Utc.with_ymd_and_hms(2031, 6, 15, 8, 0, 0).unwrap();
    let a = Uuid::now_v7();
    let mut e = event(a, 1);
    e.timestamp = Some(far);
    repo.append(e).await.unwrap();
    let c = sql(&repo).await;
    let in_default: i64 = c
        .query_one("SELECT count(*) FROM events_v2_default", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(in_default, 1);
    assert_eq!(
        repo.ensure_partitions(far.date_naive(), far.date_naive())
            .await
            .unwrap(),
        1
    );
    let in_default: i64 = c
        .query_one("SELECT count(*) FROM events_v2_default", &[])
        .await
        .unwrap()
        .get(0);
    let in_part: i64 = c
        .query_one("SELECT count(*) FROM events_v2_p20310615", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!((in_default, in_part), (0, 1));
    assert_eq!(
        repo.get_aggregate_stream(a, &StreamOptions::default())
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_refresh_recomputes_only_dirty_days() {
    let repo = repo("analytics").await;
    let day1 = Utc.with_ymd_and_hms(2026, 3, 1, 10, 0, 0).unwrap();
    let day2 = day1 + Duration::days(1);
    let a = Uuid::now_v7();
    let mut evs = vec![event(a, 1), event(a, 2), event(Uuid::now_v7(), 1)];
    evs[0].timestamp = Some(day1);
    evs[1].timestamp = Some(day1);
    evs[2].timestamp = Some(day2);
    repo.append_batch(evs).await.unwrap();
    assert_eq!(repo.refresh_analytics(false).await.unwrap(), 2);
    assert_eq!(
        repo.refresh_analytics(false).await.unwrap(),
        0,
        "nothing new since the last refresh"
    );
    let c = sql(&repo).await;
    let rows = c
        .query(
            "SELECT day::text, event_type, event_count, unique_aggregates FROM events_daily ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, String, i64, i64)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
    assert_eq!(
        got,
        vec![
            ("2026-03-01".into(), "entity.created".into(), 1, 1),
            ("2026-03-01".into(), "entity.updated".into(), 1, 1),
            ("2026-03-02".into(), "entity.created".into(), 1, 1),
        ]
    );
    let mut e = event(a, 3);
    e.timestamp = Some(day2);
    repo.append(e).await.unwrap();
    assert_eq!(repo.refresh_analytics(false).await.unwrap(), 1);
    let n: i64 = c
        .query_one(
            "SELECT sum(event_count)::bigint FROM events_daily WHERE day = '2026-03-02'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    assert!(repo.refresh_analytics(true).await.unwrap() >= 2);
}

/// Scans (sequential and index) of each partition or chunk of events_v2 so far, as this
/// session's statistics show them.
async fn scans_per_child(c: &tokio_postgres::Client) -> std::collections::HashMap<String, i64> {
    c.batch_execute("SELECT pg_stat_force_next_flush(); SET stats_fetch_consistency = none")
        .await
        .unwrap();
    c.query(
        "SELECT s.relid::regclass::text, coalesce(s.seq_scan, 0) + coalesce(s.idx_scan, 0)
           FROM pg_stat_user_tables s JOIN pg_inherits i ON i.inhrelid = s.relid
          WHERE i.inhparent = 'events_v2'::regclass",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_refresh_reads_only_its_dirty_days() {
    let repo = repo("analytics_prune").await;
    if storage_mode() == "citus" {
        // The scans happen on the workers' shards, whose statistics the coordinator does not
        // see; the refresh's results are checked in analytics_refresh_recomputes_only_dirty_days.
        return;
    }
    let start = Utc.with_ymd_and_hms(2026, 2, 1, 12, 0, 0).unwrap();
    repo.ensure_partitions(start.date_naive(), (start + Duration::days(59)).date_naive())
        .await
        .unwrap();
    let history: Vec<_> = (0..60)
        .map(|d| {
            let mut e = event(Uuid::now_v7(), 1);
            e.timestamp = Some(start + Duration::days(d));
            e
        })
        .collect();
    repo.append_batch(history).await.unwrap();
    assert_eq!(repo.refresh_analytics(true).await.unwrap(), 60);
    // One event on one day: one dirty day.
    let mut e = event(Uuid::now_v7(), 1);
    e.timestamp = Some(start + Duration::days(30));
    repo.append(e).await.unwrap();

    // The refresh runs in this session, so that its scans are counted here.
    let c = sql(&repo).await;
    let before = scans_per_child(&c).await;
    assert!(before.len() >= 60, "60 partitions or chunks: {}", before.len());
    let refreshed: i32 = c
        .query_one("SELECT refresh_events_daily(false)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(refreshed, 1);
    let after = scans_per_child(&c).await;
    let read: Vec<&String> = after
        .iter()
        .filter(|(child, n)| before.get(*child).copied().unwrap_or(0) < **n)
        .map(|(child, _)| child)
        .collect();
    assert_eq!(
        read.len(),
        1,
        "one dirty day read {} partitions or chunks: {read:?}",
        read.len()
    );
    let n: i64 = c
        .query_one(
            "SELECT event_count FROM events_daily WHERE day = $1",
            &[&(start + Duration::days(30)).date_naive()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helper_functions_match_the_design() {
    let repo = repo("helpers").await;
    let a = Uuid::now_v7();
    repo.append_batch(vec![event(a, 1), event(a, 2), event(a, 3)])
        .await
        .unwrap();
    let c = sql(&repo).await;
    let v: i32 = c
        .query_one("SELECT get_aggregate_version($1)", &[&a])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 3);
    let v: i32 = c
        .query_one("SELECT get_aggregate_version($1)", &[&Uuid::now_v7()])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 0);
    let n: i64 = c
        .query_one("SELECT count(*) FROM get_aggregate_stream($1)", &[&a])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3);
    let n: i64 = c
        .query_one("SELECT count(*) FROM get_aggregate_stream($1, 1)", &[&a])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    let n: i64 = c
        .query_one("SELECT count(*) FROM get_user_event_stream('user-1')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3);
    let n: i64 = c
        .query_one("SELECT count(*) FROM get_user_event_stream('user-1', 7, 2)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_fails_with_a_code_not_a_hang() {
    let mut config = synap_events::RepositoryConfig::new("postgres://postgres@127.0.0.1:1/postgres");
    config.connect_timeout = std::time::Duration::from_secs(2);
    config.acquire_timeout = std::time::Duration::from_secs(2);
    let repo = EventRepository::new(config).unwrap();
    let err = repo.get_aggregate_version(Uuid::now_v7()).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert!(matches!(err.code(), "CONNECTION_FAILED" | "POOL_TIMEOUT"), "{err:?}");
    let bad = EventRepository::new(synap_events::RepositoryConfig::new("not a url ::"));
    assert_eq!(bad.unwrap_err().code(), "INVALID_CONFIG");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_schema_says_to_migrate() {
    let schema = common::fresh_schema("nomigrate").await;
    let repo = EventRepository::new(common::config(&schema)).unwrap();
    let err = repo.append(event(Uuid::now_v7(), 1)).await.unwrap_err();
    assert_eq!(err.code(), "SCHEMA_NOT_READY", "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_repository_refuses_calls() {
    let repo = repo("closed").await;
    repo.close();
    let err = repo.get_aggregate_version(Uuid::now_v7()).await.unwrap_err();
    assert_eq!(err.code(), "CONNECTION_FAILED");
}
