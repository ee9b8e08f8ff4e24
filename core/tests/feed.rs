//! Global ordered reads and subscriptions against a real PostgreSQL.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{event, repo, sql};
use synap_events::{Checkpoint, EventRepository, SubscribeOptions};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_committed_late_is_neither_skipped_nor_repeated() {
    let repo = repo("feed_late").await;
    let first = repo.append(event(Uuid::now_v7(), 1)).await.unwrap();

    // A transaction takes a position, then stays open while a later append commits.
    let held = sql(&repo).await;
    held.batch_execute("BEGIN").await.unwrap();
    let late_agg = Uuid::now_v7();
    let row = held
        .query_one(
            "INSERT INTO events_v2 (aggregate_id, aggregate_type, event_type, user_id, data, version)
             VALUES ($1, 'entity', 'entity.created', 'user-1', '{}', 1) RETURNING position",
            &[&late_agg],
        )
        .await
        .unwrap();
    let late_position: i64 = row.get(0);
    let after = repo.append(event(Uuid::now_v7(), 1)).await.unwrap();
    assert!(
        after.position > late_position,
        "the committed event has the later position"
    );

    // A naive `position > last` reader would now see `after` and move past the open one.
    // (Transactions of tests running beside this one can hold the horizon back for a moment,
    // hence the retries: the horizon is cluster-wide.)
    let page = loop {
        let page = repo.read_all(None, 100).await.unwrap();
        if page.events.iter().any(|e| e.id == first.id) {
            break page;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let seen: Vec<i64> = page.events.iter().map(|e| e.position).collect();
    assert_eq!(
        seen,
        vec![first.position],
        "nothing at or past the open transaction is handed out"
    );

    held.batch_execute("COMMIT").await.unwrap();
    let mut checkpoint = page.checkpoint;
    let mut seen_after = Vec::new();
    while seen_after.len() < 2 {
        let rest = repo.read_all(Some(&checkpoint), 100).await.unwrap();
        checkpoint = rest.checkpoint;
        seen_after.extend(rest.events.iter().map(|e| e.position));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen_after, vec![late_position, after.position]);
    let rest = repo.read_all(Some(&checkpoint), 100).await.unwrap();

    // Reading on from the end returns nothing new; nothing twice.
    let again = repo.read_all(Some(&rest.checkpoint), 100).await.unwrap();
    assert!(again.events.is_empty());
    assert!(again.checkpoint.place() >= rest.checkpoint.place());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_and_a_reader_agree_on_every_event() {
    let repo = repo("feed_concurrent").await;
    let mut writers = Vec::new();
    for _ in 0..8 {
        let repo = repo.clone();
        writers.push(tokio::spawn(async move {
            let a = Uuid::now_v7();
            for v in 1..=25 {
                repo.append(event(a, v)).await.unwrap();
            }
        }));
    }
    // Read while they write.
    let mut checkpoint = Checkpoint::START;
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of 200 events read",
            seen.len()
        );
        let page = repo.read_all(Some(&checkpoint), 7).await.unwrap();
        checkpoint = page.checkpoint;
        seen.extend(page.events.iter().map(|e| e.id));
        // Done once the writers are and everything they wrote has been read (other tests'
        // transactions can hold the cluster-wide horizon back for a moment).
        if seen.len() >= 200 && writers.iter().all(|w| w.is_finished()) {
            break;
        }
        if page.events.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    for w in writers {
        w.await.unwrap();
    }
    // Nothing more arrives after the last write.
    let after = repo.read_all(Some(&checkpoint), 1000).await.unwrap();
    seen.extend(after.events.iter().map(|e| e.id));
    let unique: HashSet<_> = seen.iter().collect();
    assert_eq!(seen.len(), 200, "every event once");
    assert_eq!(unique.len(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_consumer_resumes_after_being_killed_mid_stream() {
    let repo = repo("feed_consumer").await;
    let a = Uuid::now_v7();
    repo.append_batch((1..=35).map(|v| event(a, v)).collect())
        .await
        .unwrap();
    let options = || SubscribeOptions {
        consumer: Some("projection".into()),
        batch_size: 10,
        poll_interval: Duration::from_millis(50),
        ..Default::default()
    };

    let mut delivered = Vec::new();
    {
        let mut sub = repo.subscribe(options()).await.unwrap();
        delivered.extend(sub.next_batch().await.unwrap().iter().map(|e| e.version));
        delivered.extend(sub.next_batch().await.unwrap().iter().map(|e| e.version));
        // Killed here: the second batch was delivered but never acknowledged.
    }
    assert_eq!(delivered, (1..=20).collect::<Vec<_>>());

    let mut sub = repo.subscribe(options()).await.unwrap();
    let mut resumed = Vec::new();
    while resumed.last() != Some(&35) {
        resumed.extend(sub.next_batch().await.unwrap().iter().map(|e| e.version));
    }
    // At-least-once: the unacknowledged batch comes again, then the rest, in order.
    assert_eq!(resumed, (11..=35).collect::<Vec<_>>());
    sub.commit().await.unwrap();
    let stored = repo.consumer_checkpoint("projection").await.unwrap().unwrap();
    assert_eq!(stored, sub.checkpoint());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_subscriber_is_woken_by_notify() {
    let repo = repo("feed_notify").await;
    // Polling every hour: only the notification can wake it before the test's time limit.
    let mut sub = repo
        .subscribe(SubscribeOptions {
            poll_interval: Duration::from_secs(3600),
            ..Default::default()
        })
        .await
        .unwrap();
    // Three kinds of writer: a single append and a batch through another repository (another
    // pool, as another process would have; they notify after their commit), and a plain INSERT
    // from elsewhere (the trigger notifies).
    let other = EventRepository::new(repo.config().clone()).unwrap();
    let raw = sql(&repo).await;
    for writer in 0..3 {
        let (other, raw) = (other.clone(), sql(&repo).await);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            match writer {
                0 => drop(other.append(event(Uuid::now_v7(), 1)).await.unwrap()),
                1 => drop(
                    other
                        .append_batch(vec![event(Uuid::now_v7(), 1), event(Uuid::now_v7(), 1)])
                        .await
                        .unwrap(),
                ),
                _ => drop(
                    raw.execute(
                        "INSERT INTO events_v2 (id, aggregate_id, aggregate_type, event_type, user_id, data, version)
                         VALUES (gen_random_uuid(), gen_random_uuid(), 'entity', 'entity.created', 'u', '{}', 1)",
                        &[],
                    )
                    .await
                    .unwrap(),
                ),
            }
        });
        let batch = tokio::time::timeout(Duration::from_secs(30), sub.next_batch())
            .await
            .unwrap_or_else(|_| panic!("writer {writer}: not woken by NOTIFY"))
            .unwrap();
        assert_eq!(batch.len(), if writer == 1 { 2 } else { 1 }, "writer {writer}");
    }
    drop(raw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_feed_arguments_are_refused() {
    let repo = repo("feed_bad").await;
    assert_eq!(repo.read_all(None, 0).await.unwrap_err().code(), "VALIDATION_FAILED");
    assert_eq!(
        repo.consumer_checkpoint(" ").await.unwrap_err().code(),
        "VALIDATION_FAILED"
    );
    let err = repo
        .subscribe(SubscribeOptions {
            batch_size: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), "VALIDATION_FAILED");
}

/// Batches over several aggregates lock their streams one after another; a batch that already
/// has a transaction id when it waits for a stream that another transaction then advances would
/// put its event before its predecessor in `(txid, position)` order. The feed must give every
/// aggregate's events in version order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_aggregates_events_come_in_version_order_on_the_feed() {
    let repo = repo("feed_version_order").await;
    let aggregates: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
    let mut tasks = Vec::new();
    for worker in 0..4u64 {
        let repo = repo.clone();
        let aggregates = aggregates.clone();
        tasks.push(tokio::spawn(async move {
            let mut written = 0;
            for round in 0..150u64 {
                // Two of the aggregates, a different pair each round.
                let first = ((worker * 7 + round * 3) % 4) as usize;
                let second = (first + 1 + ((worker + round) % 3) as usize) % 4;
                let chosen = [aggregates[first], aggregates[second]];
                let mut batch = Vec::new();
                for a in &chosen {
                    let version = repo.get_aggregate_version(*a).await.unwrap().unwrap_or(0);
                    batch.push(event(*a, version + 1));
                }
                match repo.append_batch(batch).await {
                    Ok(_) => written += 1,
                    Err(e) if e.code() == "CONCURRENCY_CONFLICT" => {}
                    Err(e) => panic!("{e}"),
                }
            }
            written
        }));
    }
    let mut written = 0;
    for t in tasks {
        written += t.await.unwrap();
    }
    assert!(written > 0);

    let mut last: std::collections::HashMap<Uuid, i32> = std::collections::HashMap::new();
    let mut checkpoint = None;
    let mut out_of_order = Vec::new();
    let mut seen = 0;
    loop {
        let page = repo.read_all(checkpoint.as_ref(), 7).await.unwrap();
        checkpoint = Some(page.checkpoint);
        for e in &page.events {
            let previous = last.insert(e.aggregate_id, e.version).unwrap_or(0);
            if e.version != previous + 1 {
                out_of_order.push((e.aggregate_id, previous, e.version));
            }
            seen += 1;
        }
        if page.events.is_empty() {
            let total = repo.count_events(&Default::default()).await.unwrap();
            if seen as i64 >= total {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(
        out_of_order.is_empty(),
        "{} events out of version order: {:?}",
        out_of_order.len(),
        &out_of_order[..out_of_order.len().min(5)]
    );
}

/// An insert of no rows into events_v2 (an append whose version guard did not pass) leaves its
/// transaction without a transaction id: the notify trigger, which fires once per statement,
/// neither asks for one nor queues a notification, so that such a transaction commits nothing
/// and takes no notify lock. (The citus mode has no triggers on its distributed tables.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insert_of_no_rows_takes_no_transaction_id() {
    if common::citus() {
        return;
    }
    let repo = repo("feed_no_rows").await;
    repo.append(event(Uuid::now_v7(), 1)).await.unwrap();
    let client = sql(&repo).await;
    client.batch_execute("BEGIN").await.unwrap();
    let inserted = client
        .execute(
            "INSERT INTO events_v2 (aggregate_id, aggregate_type, event_type, user_id, data, version)
             SELECT aggregate_id, aggregate_type, event_type, user_id, data, version FROM events_v2 WHERE false",
            &[],
        )
        .await
        .unwrap();
    let assigned: Option<String> = client
        .query_one("SELECT pg_current_xact_id_if_assigned()::text", &[])
        .await
        .unwrap()
        .get(0);
    client.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!((inserted, assigned), (0, None));
}
