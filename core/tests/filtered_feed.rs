//! Filtered reads of the global feed (`read_all_filtered`, filtered subscriptions) against a
//! real PostgreSQL: what they deliver is the feed filtered in memory, a page never scans more
//! than its bound of rows, and a reader of a rare type moves through history without stalling.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{repo, sql};
use proptest::prelude::*;
use synap_events::{
    AggregateType, Checkpoint, DeleteStreamOptions, EventRecord, EventRepository, FeedFilter, GroupOptions, NewEvent,
    Page, SubscribeOptions, SCAN_ROWS,
};
use uuid::Uuid;

const TYPES: [&str; 6] = [
    "entity.created",
    "entity.updated",
    "entity.title_changed",
    "entityx.created",
    "relation.added",
    "user.renamed",
];
const PREFIXES: [&str; 6] = ["entity.", "entity", "entity.title_", "relation", "us", "entity.t"];
const AGGREGATES: [AggregateType; 3] = [AggregateType::Entity, AggregateType::Relation, AggregateType::User];

fn with_scan_rows(plain: &EventRepository, rows: i64) -> EventRepository {
    let mut config = plain.config().clone();
    config.feed_scan_rows = rows;
    EventRepository::new(config).expect("repository")
}

/// Reads every page from the start until caught up at or past `until`, checking each page
/// against its bounds; returns the events.
async fn read_filtered(
    repo: &EventRepository,
    filter: &FeedFilter,
    limit: i64,
    until: Checkpoint,
    scanned: impl Fn(Checkpoint, Checkpoint) -> usize,
) -> Vec<EventRecord> {
    let rows = repo.config().feed_scan_rows as usize;
    let mut events = Vec::new();
    let mut at = Checkpoint::START;
    for _ in 0..100_000 {
        let page: Page = repo.read_all_filtered(Some(&at), limit, filter).await.unwrap();
        assert!(page.events.len() as i64 <= limit);
        assert!(page.checkpoint.place() >= at.place(), "a checkpoint never moves back");
        if !page.caught_up {
            assert!(
                page.checkpoint.place() > at.place(),
                "a page that is not caught up moves on"
            );
        }
        if !filter.is_empty() {
            let n = scanned(at, page.checkpoint);
            assert!(n <= rows, "a page scanned {n} rows, more than {rows}");
        }
        for e in &page.events {
            assert!(filter.matches(&e.event_type, e.aggregate_type.as_str()), "{e:?}");
        }
        events.extend(page.events);
        at = page.checkpoint;
        if page.caught_up && at.place() >= until.place() {
            return events;
        }
        if page.caught_up {
            // Transactions of tests running beside this one hold the horizon back a moment.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    panic!("never caught up");
}

/// The unfiltered feed from the start, once it holds every id of `ids`, and where it ended.
async fn whole_feed(repo: &EventRepository, ids: &[Uuid]) -> (Vec<EventRecord>, Checkpoint) {
    loop {
        let mut all = Vec::new();
        let mut at = Checkpoint::START;
        loop {
            let page = repo.read_all(Some(&at), 1000).await.unwrap();
            at = page.checkpoint;
            all.extend(page.events);
            if page.caught_up {
                break;
            }
        }
        if ids.iter().all(|id| all.iter().any(|e| e.id == *id)) {
            return (all, at);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Debug, Clone)]
struct Case {
    /// Each event: its type, its aggregate type, and whether it starts a new transaction.
    events: Vec<(usize, usize, bool)>,
    /// Hard-delete the stream of the event at this index (a `synap.stream_deleted` notice).
    delete: Option<usize>,
    types: Vec<usize>,
    prefixes: Vec<usize>,
    aggregates: Vec<usize>,
    limit: i64,
    scan_rows: i64,
}

fn case() -> impl Strategy<Value = Case> {
    let event = (0..TYPES.len(), 0..AGGREGATES.len(), any::<bool>());
    (
        prop::collection::vec(event, 1..40),
        prop::option::of(0..40usize),
        prop::collection::vec(0..TYPES.len(), 0..3),
        prop::collection::vec(0..PREFIXES.len(), 0..3),
        prop::collection::vec(0..AGGREGATES.len(), 0..3),
        1..8i64,
        1..30i64,
    )
        .prop_map(|(events, delete, types, prefixes, aggregates, limit, scan_rows)| Case {
            delete: delete.filter(|&d| d < events.len()),
            events,
            types,
            prefixes,
            aggregates,
            limit,
            scan_rows,
        })
}

// The property: for random writes (batches, single appends, a hard deletion's notice) and random
// filters, pages of random sizes under random scan bounds deliver exactly the unfiltered feed
// filtered in memory, in its order, each page scanning at most its bound.
#[test]
fn filtered_pages_are_the_feed_filtered_in_memory() {
    let (runtime, mut runner) = common::model_runner(24);
    let plain = runtime.block_on(repo("filtered_model"));
    let client = runtime.block_on(sql(&plain));
    runner
        .run(&case(), |case| {
            runtime.block_on(async {
                let mut ids = Vec::new();
                let mut batch: Vec<NewEvent> = Vec::new();
                let mut aggregates = Vec::new();
                for (i, &(t, a, new_tx)) in case.events.iter().enumerate() {
                    if new_tx && !batch.is_empty() {
                        ids.extend(
                            plain
                                .append_batch(std::mem::take(&mut batch))
                                .await
                                .unwrap()
                                .iter()
                                .map(|e| e.id),
                        );
                    }
                    let aggregate = Uuid::now_v7();
                    aggregates.push(aggregate);
                    let mut e = common::event(aggregate, 1);
                    e.event_type = TYPES[t].into();
                    e.aggregate_type = AGGREGATES[a];
                    e.data = serde_json::json!({ "i": i });
                    batch.push(e);
                }
                ids.extend(plain.append_batch(batch).await.unwrap().iter().map(|e| e.id));
                if let Some(d) = case.delete {
                    // Its rows go; the notice stays.
                    plain
                        .delete_stream(aggregates[d], &DeleteStreamOptions { hard: true })
                        .await
                        .unwrap();
                    ids.remove(d);
                }

                let filter = FeedFilter {
                    event_types: case.types.iter().map(|&t| TYPES[t].to_owned()).collect(),
                    event_type_prefixes: case.prefixes.iter().map(|&p| PREFIXES[p].to_owned()).collect(),
                    aggregate_types: case.aggregates.iter().map(|&a| AGGREGATES[a]).collect(),
                };
                let (all, end) = whole_feed(&plain, &ids).await;
                let by_id: std::collections::HashMap<Uuid, (u64, i64)> = client
                    .query("SELECT id, txid::text, position FROM events_v2", &[])
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| (r.get(0), (r.get::<_, String>(1).parse().unwrap(), r.get(2))))
                    .collect();
                let places: Vec<(u64, i64)> = all.iter().map(|e| by_id[&e.id]).collect();
                let expected: Vec<Uuid> = all
                    .iter()
                    .filter(|e| filter.matches(&e.event_type, e.aggregate_type.as_str()))
                    .map(|e| e.id)
                    .collect();
                if case.delete.is_some() {
                    assert!(
                        expected.iter().any(|id| all
                            .iter()
                            .any(|e| e.id == *id && e.event_type == "synap.stream_deleted")),
                        "the notice passes every filter"
                    );
                }
                let repo = with_scan_rows(&plain, case.scan_rows);
                let got = read_filtered(&repo, &filter, case.limit, end, |from, to| {
                    places
                        .iter()
                        .filter(|p| **p > from.place() && **p <= to.place())
                        .count()
                })
                .await;
                let got: Vec<Uuid> = got.iter().map(|e| e.id).collect();
                prop_assert_eq!(got, expected);
                Ok(())
            })
        })
        .unwrap();
}

/// An event's place in the feed: its transaction and position.
async fn feed_place(client: &tokio_postgres::Client, id: Uuid) -> (u64, i64) {
    let row = client
        .query_one("SELECT txid::text, position FROM events_v2 WHERE id = $1", &[&id])
        .await
        .unwrap();
    (row.get::<_, String>(0).parse().unwrap(), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_of_one_type_in_100000_catches_up_in_bounded_pages_then_follows() {
    let repo = repo("filtered_rare").await;
    let client = sql(&repo).await;
    let others = |n: i64| {
        format!(
            "INSERT INTO events_v2 (aggregate_id, aggregate_type, event_type, user_id, data, version)
             SELECT gen_random_uuid(), 'entity', 'entity.updated', 'user-1', jsonb_build_object('n', g), 1
               FROM generate_series(1, {n}) g"
        )
    };
    // Rows by plain SQL around one event of the rare type, 100,001 in all.
    client.batch_execute(&others(60_000)).await.unwrap();
    let mut rare = common::event(Uuid::now_v7(), 1);
    rare.event_type = "rare.happened".into();
    let first = repo.append(rare.clone()).await.unwrap();
    client.batch_execute(&others(40_000)).await.unwrap();

    let filter = FeedFilter {
        event_types: vec!["rare.happened".into()],
        ..Default::default()
    };
    // Every page is bounded: it scans at most SCAN_ROWS rows, counted here by SQL between its
    // checkpoints; catching up takes a page per SCAN_ROWS rows and a few more.
    let mut at = Checkpoint::START;
    let mut pages = 0;
    let mut moving = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut delivered = Vec::new();
    loop {
        let page = repo.read_all_filtered(Some(&at), 100, &filter).await.unwrap();
        pages += 1;
        let scanned: i64 = client
            .query_one(
                "SELECT count(*) FROM events_v2 WHERE (txid, position) > ($1::text::xid8, $2)
                   AND (txid, position) <= ($3::text::xid8, $4)",
                &[
                    &at.txid.to_string(),
                    &at.position,
                    &page.checkpoint.txid.to_string(),
                    &page.checkpoint.position,
                ],
            )
            .await
            .unwrap()
            .get(0);
        assert!(scanned <= SCAN_ROWS, "page {pages} scanned {scanned} rows");
        if !page.caught_up {
            // A page short of its limit that is not caught up ended on its budget.
            assert_eq!(scanned, SCAN_ROWS, "page {pages}");
            moving += 1;
        }
        delivered.extend(page.events.iter().map(|e| e.id));
        at = page.checkpoint;
        if page.caught_up && !delivered.is_empty() {
            break;
        }
        // Caught up short of the rare event: transactions of tests beside this one hold the
        // horizon back a moment.
        assert!(Instant::now() < deadline, "not caught up after {pages} pages");
        if page.caught_up {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(delivered, vec![first.id]);
    assert!(
        moving <= 100_001 / SCAN_ROWS,
        "{moving} pages moved through 100,001 rows"
    );

    // A named consumer catches up the same way, then follows: the next rare event comes after
    // 30,000 others, and its stored checkpoint is past everything it scanned.
    let mut sub = repo
        .subscribe(SubscribeOptions {
            consumer: Some("rare-reader".into()),
            batch_size: 10,
            poll_interval: Duration::from_millis(50),
            filter: filter.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let batch = sub.next_batch().await.unwrap();
    assert_eq!(batch.iter().map(|e| e.id).collect::<Vec<_>>(), vec![first.id]);
    client.batch_execute(&others(30_000)).await.unwrap();
    rare.aggregate_id = Uuid::now_v7();
    let second = repo.append(rare.clone()).await.unwrap();
    let batch = tokio::time::timeout(Duration::from_secs(60), sub.next_batch())
        .await
        .expect("the second rare event arrives")
        .unwrap();
    assert_eq!(batch.iter().map(|e| e.id).collect::<Vec<_>>(), vec![second.id]);
    sub.commit().await.unwrap();
    let stored = repo.consumer_checkpoint("rare-reader").await.unwrap().unwrap();
    assert!(stored.place() >= feed_place(&client, second.id).await);
}

#[tokio::test]
async fn bad_filters_are_refused_before_anything_is_read() {
    let repo = repo("filtered_bad").await;
    let cases = [
        (
            FeedFilter {
                event_types: vec!["Entity.Created".into()],
                ..Default::default()
            },
            "eventTypes[0]",
        ),
        (
            FeedFilter {
                event_type_prefixes: vec!["entity.%".into()],
                ..Default::default()
            },
            "eventTypePrefixes[0]",
        ),
    ];
    for (filter, field) in cases {
        let err = repo.read_all_filtered(None, 10, &filter).await.unwrap_err();
        assert_eq!(err.code(), "VALIDATION_FAILED");
        assert_eq!(err.details()["field"], serde_json::json!(field), "{err}");
        let err = repo
            .subscribe(SubscribeOptions {
                filter,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.details()["field"], serde_json::json!(field), "{err}");
    }
    for (options, field) in [
        (serde_json::json!({ "eventType": ["entity.created"] }), "eventType"),
        (serde_json::json!({ "eventTypes": [] }), "eventTypes"),
        (
            serde_json::json!({ "aggregateTypes": ["entities"] }),
            "aggregateTypes[0]",
        ),
        (
            serde_json::json!({ "eventTypePrefixes": "entity." }),
            "eventTypePrefixes",
        ),
    ] {
        let err = synap_events::read_all_options(&options).unwrap_err();
        assert_eq!(err.details()["field"], serde_json::json!(field), "{options}");
        let err = SubscribeOptions::from_json(&options).unwrap_err();
        assert_eq!(err.details()["field"], serde_json::json!(field), "{options}");
    }
}

fn group_options(group: &str, filter: &FeedFilter) -> GroupOptions {
    let mut o = GroupOptions::new(group);
    o.partitions = Some(4);
    o.batch_size = 7;
    o.poll_interval = Duration::from_millis(100);
    o.filter = filter.clone();
    o
}

// A filtered group: two members hand out each rare event once and nothing else, under a small
// scan budget; members joining with another filter (or none) are refused, the same filter in
// another order is not; and while nothing matches, the stored checkpoints move past the rows
// the members passed over, so a member taking a partition over does not scan them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_filtered_group_hands_out_what_passes_once_keeps_its_filter_and_moves_past_the_rest() {
    let plain = repo("filtered_group").await;
    let repo = with_scan_rows(&plain, 300);
    let client = sql(&repo).await;
    let others = |n: i64| {
        format!(
            "INSERT INTO events_v2 (aggregate_id, aggregate_type, event_type, user_id, data, version)
             SELECT gen_random_uuid(), 'entity', 'entity.updated', 'user-1', '{{}}', 1 FROM generate_series(1, {n}) g"
        )
    };
    let mut rare = Vec::new();
    for _ in 0..20 {
        client.batch_execute(&others(150)).await.unwrap();
        let mut e = common::event(Uuid::now_v7(), 1);
        e.event_type = "rare.happened".into();
        rare.push(repo.append(e).await.unwrap().id);
    }
    let filter = FeedFilter {
        event_types: vec!["rare.happened".into(), "rare.other".into()],
        ..Default::default()
    };

    let seen = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut members = Vec::new();
    for name in ["a", "b"] {
        let mut o = group_options("rare", &filter);
        o.member = Some(name.into());
        let mut m = repo.join_group(o).await.unwrap();
        let (seen, stop) = (seen.clone(), stop.clone());
        members.push(tokio::spawn(async move {
            m.consume(
                move |events: Vec<EventRecord>| {
                    let seen = seen.clone();
                    async move {
                        seen.lock()
                            .unwrap()
                            .extend(events.iter().map(|e| (e.id, e.event_type.clone())));
                        Ok(())
                    }
                },
                async move { stop.notified().await },
            )
            .await
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    while seen.lock().unwrap().len() < rare.len() {
        assert!(Instant::now() < deadline, "handed out {:?}", seen.lock().unwrap().len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The filter is the group's.
    let mut reordered = filter.clone();
    reordered.event_types.reverse();
    reordered.event_types.push("rare.happened".into());
    repo.join_group(group_options("rare", &reordered)).await.unwrap();
    for other in [
        FeedFilter::default(),
        FeedFilter {
            event_types: vec!["rare.happened".into()],
            ..Default::default()
        },
        FeedFilter {
            aggregate_types: vec![AggregateType::Entity],
            ..filter.clone()
        },
    ] {
        let err = repo.join_group(group_options("rare", &other)).await.unwrap_err();
        assert_eq!(err.code(), "GROUP_FILTER_MISMATCH", "{other:?}");
        assert_eq!(err.details()["stored"], filter.normalized().to_json());
    }

    // Rows that do not match: the stored checkpoints move past them.
    client.batch_execute(&others(2000)).await.unwrap();
    let last = client
        .query_one(
            "SELECT txid::text, position FROM events_v2 ORDER BY txid DESC, position DESC LIMIT 1",
            &[],
        )
        .await
        .unwrap();
    let last = (last.get::<_, String>(0).parse::<u64>().unwrap(), last.get::<_, i64>(1));
    loop {
        let behind: i64 = client
            .query_one(
                "SELECT count(*) FROM consumer_group_partitions
                  WHERE group_name = 'rare' AND (txid, position) < ($1::text::xid8, $2)",
                &[&last.0.to_string(), &last.1],
            )
            .await
            .unwrap()
            .get(0);
        if behind == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{behind} partitions' checkpoints behind the rows passed over"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.notify_waiters();
    for m in members {
        let _ = m.await;
    }
    let seen = seen.lock().unwrap().clone();
    let mut ids: Vec<Uuid> = seen.iter().map(|(id, _)| *id).collect();
    ids.sort();
    let mut want = rare.clone();
    want.sort();
    assert_eq!(ids, want, "each rare event once, and nothing else");
}
