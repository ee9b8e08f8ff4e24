//! The global feed's order where a young database hides problems: transaction ids that cross a
//! power of ten, many partitions or chunks, random interleavings of writers (some holding their
//! transaction open, some rolling back) with a paging reader, and consumers whose checkpoints the
//! old, text-sorted ordering stored.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::{advance_xid_to, current_xid, event, sql, PrivateCluster};
use proptest::prelude::*;
use synap_events::{Checkpoint, EventRepository, SubscribeOptions};
use uuid::Uuid;

/// Every event by paging with `limit`, until a page comes back empty.
async fn read_everything(repo: &EventRepository, limit: i64) -> Vec<(Uuid, Checkpoint)> {
    let mut out = Vec::new();
    let mut checkpoint = Checkpoint::START;
    loop {
        let page = repo.read_all(Some(&checkpoint), limit).await.unwrap();
        assert!(
            page.checkpoint.place() >= checkpoint.place(),
            "a checkpoint never moves back"
        );
        if page.events.is_empty() {
            return out;
        }
        assert!(page.events.len() as i64 <= limit);
        checkpoint = page.checkpoint;
        out.extend(page.events.iter().map(|e| (e.id, checkpoint)));
    }
}

/// Every event's (txid, position), in numeric order, straight from the table.
async fn stored_order(c: &tokio_postgres::Client) -> Vec<(Uuid, u64, i64)> {
    c.query(
        // Ordered by the column: `ORDER BY txid` would name the text output column.
        "SELECT id, txid::text AS txid_text, position FROM events_v2 e ORDER BY e.txid, e.position",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get::<_, String>(1).parse().unwrap(), r.get(2)))
    .collect()
}

/// 160 events written one transaction at a time (single appends and small batches) while the
/// server's transaction ids go from 9,999,9xx to 10,000,0xx.
async fn write_across_ten_million(repo: &EventRepository) -> Vec<(Uuid, u64, i64)> {
    let c = sql(repo).await;
    advance_xid_to(&c, 10_000_000 - 90).await;
    let aggregates: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
    let mut versions = [0i32; 4];
    let mut written = 0;
    let mut i = 0;
    while written < 160 {
        let a = i % 4;
        if i % 5 == 4 {
            let batch = (1..=3).map(|k| event(aggregates[a], versions[a] + k)).collect();
            repo.append_batch(batch).await.unwrap();
            versions[a] += 3;
            written += 3;
        } else {
            versions[a] += 1;
            repo.append(event(aggregates[a], versions[a])).await.unwrap();
            written += 1;
        }
        i += 1;
    }
    let stored = stored_order(&c).await;
    let (low, high) = (stored.first().unwrap().1, stored.last().unwrap().1);
    assert!(
        low < 10_000_000 && high >= 10_000_000,
        "the events' transaction ids cross 10^7 ({low}..{high})"
    );
    stored
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_of_every_size_agree_across_a_power_of_ten() {
    let cluster = PrivateCluster::start("feed_pow10", Some(9_999_000));
    let repo = cluster.repo("pow10").await;
    let stored = write_across_ten_million(&repo).await;
    let expected: Vec<Uuid> = stored.iter().map(|(id, _, _)| *id).collect();

    // One read of everything, in numeric (txid, position) order.
    let all = repo.read_all(None, 10_000).await.unwrap();
    assert_eq!(all.events.iter().map(|e| e.id).collect::<Vec<_>>(), expected);
    // Not a full page: the checkpoint moves on to the horizon, past the last event.
    let last = stored.last().unwrap();
    assert!(all.checkpoint.place() > (last.1, last.2));
    assert_eq!(all.checkpoint.position, 0);

    // Pages of every size from 1 to 50 give the same sequence, and each page's checkpoint is
    // its last event's place.
    let places: HashMap<Uuid, Checkpoint> = stored
        .iter()
        .map(|(id, txid, position)| (*id, Checkpoint::at(*txid, *position)))
        .collect();
    for limit in 1..=50 {
        let paged = read_everything(&repo, limit).await;
        let ids: Vec<Uuid> = paged.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, expected, "pages of {limit}");
        for (id, checkpoint) in &paged {
            assert!(
                places[id].place() <= checkpoint.place(),
                "pages of {limit}: checkpoint before its event"
            );
        }
    }

    // A named consumer in batches of 7 gets each event once, in order, and stores the last.
    let mut sub = repo
        .subscribe(SubscribeOptions {
            consumer: Some("pow10".into()),
            batch_size: 7,
            poll_interval: Duration::from_millis(50),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut delivered = Vec::new();
    while delivered.len() < expected.len() {
        delivered.extend(sub.next_batch().await.unwrap().iter().map(|e| e.id));
    }
    sub.commit().await.unwrap();
    assert_eq!(delivered, expected);
    let stored_checkpoint = repo.consumer_checkpoint("pow10").await.unwrap().unwrap();
    assert!(stored_checkpoint.place() >= places[expected.last().unwrap()].place());
}

/// The reader of the old release: pages sorted by the text of the transaction id. The horizon
/// in a CTE: Citus evaluates that on the coordinator, but pushes a condition on
/// `pg_current_snapshot()` down to the workers, whose transaction counters are their own.
async fn old_ordering_page(c: &tokio_postgres::Client, after: (String, i64), limit: i64) -> Vec<(Uuid, String, i64)> {
    c.query(
        "WITH h AS (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS horizon)
         SELECT id, txid::text, position FROM events_v2, h
          WHERE (txid, position) > ($1::text::xid8, $2) AND txid < h.horizon
          ORDER BY txid::text, position LIMIT $3",
        &[&after.0, &after.1, &limit],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_the_old_ordering_made_skip_events_gets_them_after_repair() {
    let cluster = PrivateCluster::start("feed_repair", Some(9_999_000));
    let repo = cluster.repo("repair").await;
    let stored = write_across_ten_million(&repo).await;
    let c = sql(&repo).await;

    // Replay what a consumer of the old release did, in pages of 7.
    let mut after = ("0".to_owned(), 0i64);
    let mut seen = HashSet::new();
    loop {
        let page = old_ordering_page(&c, after.clone(), 7).await;
        let Some(last) = page.last() else { break };
        after = (last.1.clone(), last.2);
        seen.extend(page.iter().map(|(id, _, _)| *id));
    }
    let missed: Vec<Uuid> = stored
        .iter()
        .map(|(id, _, _)| *id)
        .filter(|id| !seen.contains(id))
        .collect();
    assert!(!missed.is_empty(), "the old ordering skipped events here");

    // Its checkpoint as the old release stored it; migration 0005 flags such rows.
    c.execute(
        "INSERT INTO event_consumers (name, txid, position, needs_repair) VALUES ('old', $1::text::xid8, $2, true)",
        &[&after.0, &after.1],
    )
    .await
    .unwrap();
    let err = repo
        .subscribe(SubscribeOptions {
            consumer: Some("old".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), "CONSUMER_NEEDS_REPAIR");

    let dry = repo.repair_consumer("old", false, true).await.unwrap();
    assert!(dry.needed_repair && dry.dry_run);
    assert_eq!(dry.after, Checkpoint::START);
    assert_eq!(dry.events_delivered_again, stored.len() as i64);
    assert!(
        repo.consumers().await.unwrap()[0].needs_repair,
        "a dry run changes nothing"
    );

    let repaired = repo.repair_consumer("old", false, false).await.unwrap();
    assert_eq!(repaired.after, Checkpoint::START);
    let mut sub = repo
        .subscribe(SubscribeOptions {
            consumer: Some("old".into()),
            batch_size: 7,
            poll_interval: Duration::from_millis(50),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut again = HashSet::new();
    while again.len() < stored.len() {
        again.extend(sub.next_batch().await.unwrap().iter().map(|e| e.id));
    }
    for id in &missed {
        assert!(again.contains(id), "missed event {id} delivered after the repair");
    }
    sub.commit().await.unwrap();
    // Repaired once: a second repair leaves it alone.
    let second = repo.repair_consumer("old", false, false).await.unwrap();
    assert!(!second.needed_repair);
    assert_eq!(second.before, second.after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_is_an_ordered_index_scan_of_few_partitions() {
    if common::citus() {
        return; // On Citus the feed reads every partition (docs/scale-out.md).
    }
    let repo = common::repo("feed_plan").await;
    let today = chrono::Utc::now().date_naive();
    repo.ensure_partitions(today - chrono::Days::new(60), today)
        .await
        .unwrap();
    // Sixty days of history, 300 events a day, written at once (one transaction id bucket) ...
    let history: Vec<_> = (0..18_000u64)
        .map(|i| {
            let mut e = event(Uuid::now_v7(), 1);
            let day = today - chrono::Days::new(60 - i / 300);
            e.timestamp = Some(day.and_hms_opt(12, 0, 0).unwrap().and_utc());
            e
        })
        .collect();
    repo.append_batch(history).await.unwrap();
    // ... then, in a later bucket of transaction ids, 3,000 events today.
    let c = sql(&repo).await;
    let now = current_xid(&c).await;
    advance_xid_to(&c, now + 70_000).await;
    repo.append_batch((0..3_000).map(|_| event(Uuid::now_v7(), 1)).collect())
        .await
        .unwrap();
    // Statistics, as autovacuum keeps them on a live store: with none, the planner guesses.
    c.batch_execute("ANALYZE events_v2").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut read = Vec::new();
    let mut checkpoint = Checkpoint::START;
    while read.len() < 21_000 {
        assert!(Instant::now() < deadline, "the horizon never passed the test's writes");
        let page = repo.read_all(Some(&checkpoint), 1000).await.unwrap();
        read.extend(page.events.iter().map(|e| e.id));
        checkpoint = page.checkpoint;
    }
    // The place of today's first event.
    let first_today = c
        .query_one(
            "SELECT txid::text AS t, position FROM events_v2 WHERE id = $1",
            &[&read[18_000]],
        )
        .await
        .unwrap();
    let today_checkpoint = Checkpoint::at(first_today.get::<_, String>(0).parse().unwrap(), first_today.get(1));

    let assert_ordered_index_scans = |plan: &str, at_most: usize| {
        let scans = plan.lines().filter(|l| l.contains("Index Scan")).count();
        assert!(
            scans >= 1 && scans <= at_most,
            "{scans} index scans, at most {at_most}:\n{plan}"
        );
        for line in plan.lines() {
            let node = line.trim_start().trim_start_matches("->").trim_start();
            for refused in ["Sort (", "Incremental Sort (", "Seq Scan "] {
                assert!(!node.starts_with(refused), "{line}\n{plan}");
            }
        }
    };
    // From the start: the history's 60 days, merged in index order without a sort.
    assert_ordered_index_scans(&repo.explain_read_all(None, 1000).await.unwrap(), 62);
    // From today's first event on: today's partition or chunk only.
    assert_ordered_index_scans(&repo.explain_read_all(Some(&today_checkpoint), 1000).await.unwrap(), 2);
}

/// One step of a random interleaving.
#[derive(Debug, Clone)]
enum Step {
    /// Writer `w` appends its aggregate's next event, on day `d` (0: today, 1 and 2: weeks back).
    Append(usize, usize),
    /// Writer `w` appends `n` events of its aggregate in one batch, on day `d`.
    Batch(usize, i32, usize),
    /// Held transaction `t` inserts an event with plain SQL, on day `d` (beginning the
    /// transaction when idle): it stays open.
    InsertHeld(usize, usize),
    /// Held transaction `t` commits.
    Commit(usize),
    /// Held transaction `t` rolls back.
    Rollback(usize),
    /// The reader reads a page of this size.
    Read(i64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..3usize, 0..3usize).prop_map(|(w, d)| Step::Append(w, d)),
        1 => (0..3usize, 2..6i32, 0..3usize).prop_map(|(w, n, d)| Step::Batch(w, n, d)),
        2 => (0..3usize, 0..3usize).prop_map(|(t, d)| Step::InsertHeld(t, d)),
        1 => (0..3usize).prop_map(Step::Commit),
        1 => (0..3usize).prop_map(Step::Rollback),
        3 => (1..12i64).prop_map(Step::Read),
    ]
}

struct Reader {
    checkpoint: Checkpoint,
    delivered: Vec<Uuid>,
}

impl Reader {
    /// Reads a page and checks it against what has committed: only committed events, none
    /// twice, and nothing committed at or before the new checkpoint left undelivered.
    async fn read(
        &mut self,
        repo: &EventRepository,
        c: &tokio_postgres::Client,
        limit: i64,
        committed: &HashSet<Uuid>,
    ) {
        let page = repo.read_all(Some(&self.checkpoint), limit).await.unwrap();
        for e in &page.events {
            assert!(committed.contains(&e.id), "delivered {} before it committed", e.id);
            assert!(!self.delivered.contains(&e.id), "delivered {} twice", e.id);
            self.delivered.push(e.id);
        }
        self.checkpoint = page.checkpoint;
        let delivered: HashSet<Uuid> = self.delivered.iter().copied().collect();
        for (id, txid, position) in stored_order(c).await {
            let place = Checkpoint::at(txid, position);
            if place.place() <= self.checkpoint.place() && committed.contains(&id) {
                assert!(
                    delivered.contains(&id),
                    "skipped {id} at {place:?}, reader at {:?}",
                    self.checkpoint
                );
            }
        }
    }
}

async fn run_interleaving(steps: Vec<Step>) {
    let repo = common::repo("feed_prop").await;
    let c = sql(&repo).await;
    // Events on three days (today, and two that the feed index records by transaction), whose
    // partitions or chunks exist before the steps: on TimescaleDB, a transaction that creates a
    // chunk makes every other chunk creator wait until it ends, which a held transaction (and
    // this sequential test) would turn into a hang.
    let today = chrono::Utc::now().date_naive();
    let days = [0u64, 10, 40].map(|back| {
        (today - chrono::Days::new(back))
            .and_hms_opt(12, 0, 0)
            .unwrap()
            .and_utc()
    });
    repo.ensure_partitions(today - chrono::Days::new(40), today)
        .await
        .unwrap();
    let stamped = |mut e: synap_events::NewEvent, d: usize| {
        e.timestamp = Some(days[d]);
        e
    };
    let mut committed = HashSet::new();
    for d in 0..3 {
        committed.insert(repo.append(stamped(event(Uuid::now_v7(), 1), d)).await.unwrap().id);
    }
    let aggregates: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    let mut versions = [0i32; 3];
    let mut held: Vec<Option<(tokio_postgres::Client, Vec<Uuid>)>> = vec![None, None, None];
    let mut rolled_back = HashSet::new();
    let mut reader = Reader {
        checkpoint: Checkpoint::START,
        delivered: Vec::new(),
    };
    for step in steps {
        match step {
            Step::Append(w, d) => {
                versions[w] += 1;
                let e = stamped(event(aggregates[w], versions[w]), d);
                committed.insert(repo.append(e).await.unwrap().id);
            }
            Step::Batch(w, n, d) => {
                let batch = (1..=n)
                    .map(|k| stamped(event(aggregates[w], versions[w] + k), d))
                    .collect();
                versions[w] += n;
                committed.extend(repo.append_batch(batch).await.unwrap().iter().map(|e| e.id));
            }
            Step::InsertHeld(t, d) => {
                if held[t].is_none() {
                    let client = sql(&repo).await;
                    client.batch_execute("BEGIN").await.unwrap();
                    held[t] = Some((client, Vec::new()));
                }
                let (client, ids) = held[t].as_mut().unwrap();
                let id: Uuid = client
                    .query_one(
                        "INSERT INTO events_v2 (\"timestamp\", aggregate_id, aggregate_type, event_type, user_id, data, version)
                         VALUES ($1, gen_random_uuid(), 'entity', 'entity.created', 'user-1', '{}', 1) RETURNING id",
                        &[&days[d]],
                    )
                    .await
                    .unwrap()
                    .get(0);
                ids.push(id);
            }
            Step::Commit(t) => {
                if let Some((client, ids)) = held[t].take() {
                    client.batch_execute("COMMIT").await.unwrap();
                    committed.extend(ids);
                }
            }
            Step::Rollback(t) => {
                if let Some((client, ids)) = held[t].take() {
                    client.batch_execute("ROLLBACK").await.unwrap();
                    rolled_back.extend(ids);
                }
            }
            Step::Read(limit) => reader.read(&repo, &c, limit, &committed).await,
        }
    }
    for slot in held.iter_mut() {
        if let Some((client, ids)) = slot.take() {
            client.batch_execute("COMMIT").await.unwrap();
            committed.extend(ids);
        }
    }
    // Drain; the cluster-wide horizon can lag behind other tests' transactions for a moment.
    let deadline = Instant::now() + Duration::from_secs(60);
    while reader.delivered.len() < committed.len() {
        assert!(
            Instant::now() < deadline,
            "{} of {} committed events read",
            reader.delivered.len(),
            committed.len()
        );
        reader.read(&repo, &c, 5, &committed).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let order: Vec<Uuid> = stored_order(&c).await.into_iter().map(|(id, _, _)| id).collect();
    assert_eq!(
        reader.delivered, order,
        "every committed event once, in (txid, position) order"
    );
    assert!(reader.delivered.iter().all(|id| !rolled_back.contains(id)));
}

#[test]
fn random_interleavings_of_writers_and_a_paging_reader() {
    let (runtime, mut runner) = common::model_runner(12);
    runner
        .run(&proptest::collection::vec(step(), 10..40), |steps| {
            runtime.block_on(run_interleaving(steps));
            Ok(())
        })
        .unwrap();
}
