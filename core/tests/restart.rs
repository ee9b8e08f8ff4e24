//! PostgreSQL restarted while 16 writers append: afterwards every acknowledged append is stored
//! exactly once, every failure carried a retryable code, and the pool recovers by itself.
//!
//! Restarts the private cluster through scripts/db.sh, so it runs only when the suite started
//! that cluster itself (scripts/test.sh sets SYNAP_PG_CONTROL=1).

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{event, sql};
use synap_events::EventRepository;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_appends_survive_a_restart_exactly_once() {
    if std::env::var("SYNAP_PG_CONTROL").as_deref() != Ok("1") {
        eprintln!("not run: SYNAP_PG_CONTROL=1 is set only when scripts/test.sh owns the cluster");
        return;
    }
    let schema = common::fresh_schema("restart").await;
    let mut config = common::config(&schema);
    config.connect_timeout = Duration::from_secs(2);
    config.acquire_timeout = Duration::from_secs(5);
    let repo = EventRepository::new(config).unwrap();
    repo.migrate().await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(8);
    let mut writers = Vec::new();
    for _ in 0..16 {
        let repo = repo.clone();
        writers.push(tokio::spawn(async move {
            let aggregate = Uuid::now_v7();
            let mut acknowledged = Vec::new();
            let mut failures = Vec::new();
            let mut next = 1;
            while Instant::now() < deadline {
                match repo.append(event(aggregate, next)).await {
                    Ok(stored) => {
                        acknowledged.push(stored.version);
                        next += 1;
                    }
                    Err(e) => {
                        failures.push((e.code(), e.is_retryable()));
                        // The append may have committed before the connection died: reload.
                        loop {
                            match repo.get_aggregate_version(aggregate).await {
                                Ok(v) => {
                                    next = v.unwrap_or(0) + 1;
                                    break;
                                }
                                Err(_) if Instant::now() < deadline + Duration::from_secs(30) => {
                                    tokio::time::sleep(Duration::from_millis(100)).await
                                }
                                Err(e) => panic!("the database did not come back: {e}"),
                            }
                        }
                    }
                }
            }
            (aggregate, acknowledged, failures)
        }));
    }

    tokio::time::sleep(Duration::from_secs(2)).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/db.sh");
    // The cluster of this pass: native, TimescaleDB or Citus (the coordinator and both workers).
    let flag: &[&str] = if common::timescaledb() {
        &["--timescaledb"]
    } else if common::citus() {
        &["--citus"]
    } else {
        &[]
    };
    let restart = tokio::task::spawn_blocking(move || {
        let stop = std::process::Command::new(script)
            .arg("stop")
            .args(flag)
            .status()
            .unwrap();
        let start = std::process::Command::new(script)
            .arg("start")
            .args(flag)
            .output()
            .unwrap();
        (stop.success(), start.status.success())
    })
    .await
    .unwrap();
    assert_eq!(restart, (true, true), "the cluster restarted");

    let mut results = Vec::new();
    for w in writers {
        results.push(w.await.unwrap());
    }
    let failures: Vec<_> = results.iter().flat_map(|r| r.2.clone()).collect();
    assert!(!failures.is_empty(), "the restart interrupted some appends");
    assert!(
        failures.iter().all(|(_, retryable)| *retryable),
        "every failure is retryable: {failures:?}"
    );

    let c = sql(&repo).await;
    for (aggregate, acknowledged, _) in &results {
        let rows = c
            .query(
                "SELECT version, count(*) FROM events_v2 WHERE aggregate_id = $1 GROUP BY version",
                &[aggregate],
            )
            .await
            .unwrap();
        let stored: HashMap<i32, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        assert!(stored.values().all(|n| *n == 1), "no version twice");
        for v in acknowledged {
            assert_eq!(stored.get(v), Some(&1), "acknowledged version {v} is stored once");
        }
        let max = stored.keys().max().copied().unwrap_or(0);
        assert_eq!(stored.len() as i32, max, "versions 1..={max} with no gap");
        assert_eq!(repo.get_aggregate_version(*aggregate).await.unwrap(), Some(max));
    }
    // The same pool keeps working.
    repo.append(event(Uuid::now_v7(), 1)).await.unwrap();
}
