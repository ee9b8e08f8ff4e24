//! Consumer-group delivery against DATABASE_URL, in a fresh schema:
//! `DATABASE_URL=... [EVENTS=1000000] cargo bench --bench groups`.
//!
//! Loads EVENTS events (ten versions per aggregate, in 100 transactions of one day each over a
//! year) with SQL, then times a group draining them with `consume` (no-op handler) for one and
//! two members and batch sizes 100 and 1000 (reading ahead 1,000, the default maxInFlight), and `project` (a transaction per batch) for one
//! member; then `consume` with a handler that waits 5 ms per batch of 100 (a call to another
//! service, say) for one, two and four members, over the first 200,000 events; then the latency
//! from an append's return to the handler, with NOTIFY, for 200 single appends 20 ms apart to a
//! caught-up member.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use synap_events::{AggregateType, EventRepository, GroupOptions, NewEvent, RepositoryConfig};
use uuid::Uuid;

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` and `cargo bench -- --list`: nothing to list
    }
    let events: i64 = std::env::var("EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(events));
}

async fn run(events: i64) {
    let url = std::env::var("DATABASE_URL").expect("DATABASE_URL: run scripts/db.sh start");
    let schema = format!("bench_groups_{}", std::process::id());
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}; SET search_path = {schema}"
        ))
        .await
        .unwrap();
    let mut config = RepositoryConfig::new(url.clone());
    config.schema = Some(schema.clone());
    config.pool_size = 8;
    let repo = EventRepository::new(config).unwrap();
    let mode = repo.migrate().await.unwrap().storage_mode;
    let fsync: String = client.query_one("SHOW fsync", &[]).await.unwrap().get(0);
    let load = Instant::now();
    // Native storage: the year's daily partitions first, as the repository's own writes make
    // them (a no-op on TimescaleDB, whose chunks come with the rows).
    let today = chrono::Utc::now().date_naive();
    repo.ensure_partitions(today - chrono::Days::new(366), today + chrono::Days::new(1))
        .await
        .unwrap();
    // Ten versions per aggregate, written as a live store writes them: 100 statements (each its
    // own transaction) of one day each, 3.65 days apart over a year, every aggregate's versions in
    // order (statement k holds version k / 10 + 1 of a tenth of the aggregates).
    let aggregates = (events / 10).max(1);
    client
        .batch_execute(&format!(
            "CREATE TEMP TABLE aggs AS SELECT gen_random_uuid() AS id, g FROM generate_series(0, {aggregates} - 1) g"
        ))
        .await
        .unwrap();
    for k in 0..100i32 {
        client
            .execute(
                "INSERT INTO events_v2 (aggregate_id, aggregate_type, event_type, user_id, data, version, \"timestamp\")
                 SELECT id, 'entity', 'entity.updated', 'bench-user', jsonb_build_object('title', 'v' || ($1 / 10 + 1)),
                        $1 / 10 + 1, now() - make_interval(days => 365 - ($1 * 365 / 100)) + make_interval(secs => g % 3600)
                   FROM aggs WHERE g % 10 = $1 % 10 ORDER BY g",
                &[&k],
            )
            .await
            .unwrap();
    }
    client.batch_execute("ANALYZE events_v2").await.unwrap();
    let total: i64 = client
        .query_one("SELECT count(*) FROM events_v2", &[])
        .await
        .unwrap()
        .get(0);
    println!(
        "{total} events over {aggregates} aggregates loaded in {:.1} s; {mode}, fsync {fsync}",
        load.elapsed().as_secs_f64()
    );

    for (members, batch, project) in [
        (1, 100, false),
        (1, 1000, false),
        (2, 1000, false),
        (1, 100, true),
        (1, 1000, true),
    ] {
        let group = format!("drain_{members}_{batch}_{project}");
        let (counted, seconds) = drain(&repo, &client, &group, members, batch, project, total as u64, None).await;
        println!(
            "{:<8} {} member(s), batch {:>4}: {counted} events in {seconds:.2} s = {:.0} events/s",
            if project { "project" } else { "consume" },
            members,
            batch,
            counted as f64 / seconds
        );
    }
    // Where handlers, not reads, are the cost, members add up.
    let waited = (total as u64).min(200_000);
    for members in [1, 2, 4] {
        let group = format!("waiting_{members}");
        let wait = Duration::from_millis(5);
        let (counted, seconds) = drain(&repo, &client, &group, members, 100, false, waited, Some(wait)).await;
        println!(
            "consume  {members} member(s), batch  100, handler waits 5 ms: {counted} events in {seconds:.2} s = {:.0} events/s",
            counted as f64 / seconds
        );
    }
    latency(&repo).await;
    client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

/// Starts `members` members of a new group and times until they have handled `total` events;
/// a `consume` handler waits `wait` per batch when given. With several members, the clock starts
/// once each holds its share of the partitions (members that join at once first take what is
/// free, and the extras are given back at the next renewal, a third of the lease later; these
/// members have a lease of 1 s): the events counted are those handled from then on. Returns (events counted, seconds).
#[allow(clippy::too_many_arguments)]
async fn drain(
    repo: &EventRepository,
    client: &tokio_postgres::Client,
    group: &str,
    members: usize,
    batch: i64,
    project: bool,
    total: u64,
    wait: Option<Duration>,
) -> (u64, f64) {
    let handled = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(tokio::sync::Notify::new());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..members {
        let mut o = GroupOptions::new(group);
        o.batch_size = batch;
        if members > 1 {
            // Spread within a third of a second: with the default lease (10 s) the first member
            // keeps every partition for 3.3 s, most of a million events at these rates.
            o.lease = Duration::from_secs(1);
        }
        let (repo, handled, stop) = (repo.clone(), handled.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut m = repo.join_group(o).await.unwrap();
            let until = async move { stop.notified().await };
            if project {
                m.project(
                    move |events, _tx| {
                        handled.fetch_add(events.len() as u64, Ordering::Relaxed);
                        async { Ok(()) }
                    },
                    until,
                )
                .await
                .unwrap();
            } else {
                m.consume(
                    move |events| {
                        let handled = handled.clone();
                        async move {
                            if let Some(wait) = wait {
                                tokio::time::sleep(wait).await;
                            }
                            handled.fetch_add(events.len() as u64, Ordering::Relaxed);
                            Ok(())
                        }
                    },
                    until,
                )
                .await
                .unwrap();
            }
        }));
    }
    let (mut start, mut base) = (start, 0);
    if members > 1 {
        loop {
            let spread: bool = client
                .query_one(
                    "SELECT count(DISTINCT owner) = $2 AND count(*) FILTER (WHERE owner IS NULL) = 0 AND max(n) - min(n) <= 1 \
                       FROM (SELECT owner, count(*) AS n FROM consumer_group_partitions \
                              WHERE group_name = $1 GROUP BY owner) o",
                    &[&group, &(members as i64)],
                )
                .await
                .unwrap()
                .get(0);
            if spread {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        start = Instant::now();
        base = handled.load(Ordering::Relaxed);
    }
    while handled.load(Ordering::Relaxed) < total {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seconds = start.elapsed().as_secs_f64();
    let counted = handled.load(Ordering::Relaxed).min(total) - base;
    stop.notify_waiters();
    for t in tasks {
        t.await.unwrap();
    }
    (counted, seconds)
}

/// 200 single appends 20 ms apart to a member that is caught up: from each append's return to
/// its event reaching the handler.
async fn latency(repo: &EventRepository) {
    let group = "latency";
    let seen: Arc<Mutex<std::collections::HashMap<Uuid, Instant>>> = Arc::default();
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut o = GroupOptions::new(group);
    o.batch_size = 1000;
    let (r, s, st) = (repo.clone(), seen.clone(), stop.clone());
    let task = tokio::spawn(async move {
        let mut m = r.join_group(o).await.unwrap();
        m.consume(
            move |events| {
                let now = Instant::now();
                let mut s = s.lock().unwrap();
                for e in events {
                    s.insert(e.id, now);
                }
                async { Ok(()) }
            },
            async move { st.notified().await },
        )
        .await
        .unwrap();
    });
    // Caught up when a marker event has been handled.
    let created = || {
        NewEvent::new(
            Uuid::now_v7(),
            AggregateType::Entity,
            "entity.created",
            "u",
            json!({}),
            1,
        )
    };
    let marker = repo.append(created()).await.unwrap();
    while !seen.lock().unwrap().contains_key(&marker.id) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut lat = Vec::new();
    for _ in 0..200 {
        let e = repo.append(created()).await.unwrap();
        let appended = Instant::now();
        loop {
            if let Some(at) = seen.lock().unwrap().get(&e.id) {
                lat.push(at.saturating_duration_since(appended).as_secs_f64() * 1000.0);
                break;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lat.sort_by(f64::total_cmp);
    println!(
        "latency append -> handler (200 appends, 20 ms apart): median {:.1} ms, p95 {:.1} ms, max {:.1} ms",
        lat[lat.len() / 2],
        lat[lat.len() * 95 / 100],
        lat[lat.len() - 1]
    );
    stop.notify_waiters();
    task.await.unwrap();
}
