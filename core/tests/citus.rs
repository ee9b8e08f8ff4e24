//! The citus storage mode on a cluster that grows: a worker added and the shards rebalanced
//! (`citus_rebalance_start`) while writers append. Runs in the citus pass only.
//!
//! The test works in a database of its own on the pass's cluster (Citus metadata is per database,
//! so the rebalance moves only this store's shards) and starts one more node with
//! `scripts/db.sh start --citus-node`. The pass's workers are on the two ports after the
//! coordinator's, as `scripts/db.sh start --citus` places them.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::event;
use synap_events::{EventRepository, RepositoryConfig, StorageMode};
use uuid::Uuid;

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
}

fn url_at(port: u16, db: &str) -> String {
    format!("postgres://postgres@127.0.0.1:{port}/{db}")
}

/// One more node preloading Citus, stopped and removed when dropped.
struct ExtraNode {
    dir: std::path::PathBuf,
    port: u16,
}

impl ExtraNode {
    fn start() -> ExtraNode {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = std::env::temp_dir().join(format!("synap-citus-node-{}", std::process::id()));
        let node = ExtraNode { dir, port };
        let out = node.db_sh("start").output().expect("run scripts/db.sh");
        assert!(
            out.status.success(),
            "scripts/db.sh start --citus-node failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        node
    }

    fn db_sh(&self, command: &str) -> std::process::Command {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/db.sh");
        let mut c = std::process::Command::new("bash");
        c.arg(script)
            .arg(command)
            .arg("--citus-node")
            .env("SYNAP_PG_DIR", &self.dir)
            .env("SYNAP_PG_PORT", self.port.to_string())
            .env("SYNAP_PG_FAST", "1");
        c
    }
}

impl Drop for ExtraNode {
    fn drop(&mut self) {
        let _ = self.db_sh("stop").output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_added_and_rebalanced_under_live_appends_loses_and_repeats_nothing() {
    if !common::citus() {
        return; // A Citus cluster only.
    }
    let coordinator_url = common::database_url();
    let coordinator: u16 = coordinator_url
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next())
        .and_then(|p| p.parse().ok())
        .expect("the coordinator's port in DATABASE_URL");
    let db = format!("synap_rebalance_{}", std::process::id());
    let extra = ExtraNode::start();
    let nodes = [coordinator, coordinator + 1, coordinator + 2, extra.port];
    for port in nodes {
        let admin = connect(&url_at(port, "postgres")).await;
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .await
            .unwrap();
        admin.batch_execute(&format!("CREATE DATABASE {db}")).await.unwrap();
        let c = connect(&url_at(port, &db)).await;
        c.batch_execute("SET client_min_messages = warning; CREATE EXTENSION citus")
            .await
            .unwrap();
    }
    let url = url_at(coordinator, &db);
    let c = connect(&url).await;
    c.execute(
        "SELECT citus_set_coordinator_host('127.0.0.1', $1)",
        &[&(coordinator as i32)],
    )
    .await
    .unwrap();
    for port in [coordinator + 1, coordinator + 2] {
        c.execute("SELECT citus_add_node('127.0.0.1', $1)", &[&(port as i32)])
            .await
            .unwrap();
    }

    let mut config = RepositoryConfig::new(url.clone());
    config.storage_mode = StorageMode::Citus;
    config.pool_size = 8;
    let repo = EventRepository::new(config).unwrap();
    assert_eq!(repo.migrate().await.unwrap().storage_mode, "citus");

    // Writers, each on aggregates of its own: single appends and batches, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..3usize {
        let repo = repo.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let aggregates: Vec<Uuid> = (0..20).map(|_| Uuid::now_v7()).collect();
            let mut versions = vec![0i32; aggregates.len()];
            let mut acknowledged: Vec<Uuid> = Vec::new();
            let mut errors: Vec<(bool, String)> = Vec::new();
            let mut round = 0usize;
            let mut slowest = Duration::ZERO;
            while !stop.load(Ordering::SeqCst) {
                let a = (round * 7 + w) % aggregates.len();
                let call = Instant::now();
                let result = if round % 3 == 0 {
                    let b = (a + 1) % aggregates.len();
                    let batch = vec![
                        event(aggregates[a], versions[a] + 1),
                        event(aggregates[b], versions[b] + 1),
                    ];
                    repo.append_batch(batch).await.map(|records| {
                        versions[a] += 1;
                        versions[b] += 1;
                        records.iter().map(|r| r.id).collect::<Vec<_>>()
                    })
                } else {
                    repo.append(event(aggregates[a], versions[a] + 1)).await.map(|r| {
                        versions[a] += 1;
                        vec![r.id]
                    })
                };
                slowest = slowest.max(call.elapsed());
                match result {
                    Ok(ids) => acknowledged.extend(ids),
                    // Nothing was written: the same versions are tried again.
                    Err(e) => errors.push((e.is_retryable(), format!("{}: {e}", e.code()))),
                }
                round += 1;
            }
            (acknowledged, errors, slowest)
        }));
    }

    // Some history first, then the new worker and the rebalance while the writers go on.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.execute("SELECT citus_add_node('127.0.0.1', $1)", &[&(extra.port as i32)])
        .await
        .unwrap();
    let started = Instant::now();
    c.batch_execute("SELECT citus_rebalance_start(shard_transfer_mode => 'block_writes')")
        .await
        .unwrap();
    c.batch_execute("SELECT citus_rebalance_wait()").await.unwrap();
    let rebalance = started.elapsed();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::SeqCst);

    let mut acknowledged = Vec::new();
    let mut errors = Vec::new();
    let mut slowest = Duration::ZERO;
    for w in writers {
        let (ids, errs, slow) = w.await.unwrap();
        acknowledged.extend(ids);
        errors.extend(errs);
        slowest = slowest.max(slow);
    }
    let moved: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_dist_placement p JOIN pg_dist_node n USING (groupid) WHERE n.nodeport = $1",
            &[&(extra.port as i32)],
        )
        .await
        .unwrap()
        .get(0);
    eprintln!(
        "rebalance: {moved} shard placements moved to the new worker in {rebalance:?}; {} events acknowledged, \
         slowest call {slowest:?}, {} refused: {:?}",
        acknowledged.len(),
        errors.len(),
        errors.iter().take(5).collect::<Vec<_>>()
    );
    assert!(moved > 0, "the rebalance moved no shard to the new worker");
    // A call that failed wrote nothing (checked below) and said that a retry may succeed.
    for (retryable, e) in &errors {
        assert!(retryable, "{e}");
    }

    // Every acknowledged event is stored once, with every aggregate's versions 1..n.
    let stored: Vec<(Uuid, Uuid, i32)> = c
        .query("SELECT id, aggregate_id, version FROM events_v2", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let ids: HashSet<Uuid> = stored.iter().map(|s| s.0).collect();
    assert_eq!(ids.len(), stored.len(), "an event stored twice");
    assert_eq!(stored.len(), acknowledged.len(), "stored events = acknowledged ones");
    assert!(acknowledged.iter().all(|id| ids.contains(id)));
    let mut versions: HashMap<Uuid, Vec<i32>> = HashMap::new();
    for (_, aggregate, version) in &stored {
        versions.entry(*aggregate).or_default().push(*version);
    }
    for (aggregate, mut v) in versions {
        v.sort_unstable();
        assert!(v.iter().copied().eq(1..=v.len() as i32), "{aggregate}: {v:?}");
    }

    // The global feed hands out each of them once.
    // (The horizon is the whole server's: another database's open transaction can hold it back
    // for a moment.)
    let mut delivered = HashSet::new();
    let mut after = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while delivered.len() < ids.len() && Instant::now() < deadline {
        let page = repo.read_all(after.as_ref(), 500).await.unwrap();
        if page.events.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for e in &page.events {
            assert!(delivered.insert(e.id), "delivered {} twice", e.id);
        }
        after = Some(page.checkpoint);
    }
    assert_eq!(delivered, ids);

    repo.close();
    drop(c);
    for port in nodes {
        let admin = connect(&url_at(port, "postgres")).await;
        let _ = admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .await;
    }
}

/// A client on the pass's coordinator, in `schema`, with the remote commands Citus issues for its
/// statements reported back as notices (`citus.log_remote_commands`): (command, server).
async fn logging_client(
    schema: &str,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
) {
    let (client, mut conn) = tokio_postgres::connect(&common::database_url(), tokio_postgres::NoTls)
        .await
        .expect("connect");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            match message {
                Ok(tokio_postgres::AsyncMessage::Notice(n)) => {
                    let _ = tx.send((n.message().to_owned(), n.detail().unwrap_or_default().to_owned()));
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    client
        .batch_execute(&format!(
            "SET search_path = {schema}; SET citus.log_remote_commands = on; SET client_min_messages = log"
        ))
        .await
        .unwrap();
    (client, rx)
}

#[tokio::test]
async fn a_single_append_writes_one_shard_on_one_worker_in_one_phase() {
    if !common::citus() {
        return; // A Citus cluster only.
    }
    let repo = common::repo("citus_routed").await;
    let schema = repo.config().schema.clone().unwrap();

    // The repository appends through the routed function: unlike the statement, it records no
    // feed day (the feed reads every partition on Citus).
    let a = Uuid::now_v7();
    for version in 1..=3 {
        repo.append(event(a, version)).await.unwrap();
    }
    let plain = common::sql(&repo).await;
    let days: i64 = plain
        .query_one("SELECT count(*) FROM events_v2_feed_days", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        days, 0,
        "the appends went through the statement, not synap_append_routed"
    );
    let stored = repo.get_aggregate_stream(a, &Default::default()).await.unwrap();
    assert_eq!(stored.iter().map(|e| e.version).collect::<Vec<_>>(), [1, 2, 3]);

    // What the function sends: each step to the one worker holding the aggregate's shard, and a
    // one-phase COMMIT there.
    let (client, mut notices) = logging_client(&schema).await;
    let b = Uuid::now_v7();
    for version in 1..=2 {
        let rows = client
            .query(
                "SELECT * FROM synap_append_routed(gen_random_uuid(), NULL, $1, 'entity', 'e', 'u', '{}', '{}', $2, \
                 NULL, NULL, 'api', 1)",
                &[&b, &version],
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), 1, "version {version} appended");
    }
    // A stale version: the guard refuses, nothing is inserted.
    let rows = client
        .query(
            "SELECT * FROM synap_append_routed(gen_random_uuid(), NULL, $1, 'entity', 'e', 'u', '{}', '{}', 2, \
             NULL, NULL, 'api', 1)",
            &[&b],
        )
        .await
        .unwrap();
    assert!(rows.is_empty(), "a stale version passed the guard");
    client.batch_execute("RESET client_min_messages").await.unwrap();
    drop(client);
    let mut issued = Vec::new();
    while let Some(notice) = notices.recv().await {
        issued.push(notice);
    }
    let remote: Vec<_> = issued.iter().filter(|(m, _)| m.starts_with("issuing ")).collect();
    let servers: HashSet<_> = remote
        .iter()
        .map(|(_, d)| d.split(" connectionId").next().unwrap())
        .collect();
    assert_eq!(servers.len(), 1, "one worker only: {remote:#?}");
    assert!(
        remote.iter().all(|(m, _)| !m.contains("PREPARE TRANSACTION")),
        "no two-phase commit: {remote:#?}"
    );
    let commits = remote.iter().filter(|(m, _)| m == "issuing COMMIT").count();
    assert_eq!(commits, 3, "one commit per call: {remote:#?}");
    let inserts = remote
        .iter()
        .filter(|(m, _)| m.starts_with(&format!("issuing INSERT INTO {schema}.events_v2_")))
        .count();
    assert_eq!(inserts, 2, "one event insert per passed guard: {remote:#?}");
    let count: i64 = plain
        .query_one("SELECT count(*) FROM events_v2 WHERE aggregate_id = $1", &[&b])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 2);
}

/// The feed's fence when a two-phase commit is still pending on a worker: the coordinator has
/// committed (its transaction id is below the horizon, and Citus's record of the prepared
/// transaction is in `pg_dist_transaction`) but the worker still holds the event's row prepared,
/// invisible. Set up by hand: the record on the coordinator, the row prepared on the shard's
/// worker, committed there a moment after the read starts. The read must wait for it; reading
/// past it would skip the event for good.
#[tokio::test]
async fn the_feed_waits_for_a_prepared_transaction_the_coordinator_has_committed() {
    if !common::citus() {
        return; // A Citus cluster only.
    }
    let repo = common::repo("citus_fence").await;
    let schema = repo.config().schema.clone().unwrap();
    let before = repo.append(event(Uuid::now_v7(), 1)).await.unwrap();

    let coordinator = common::sql(&repo).await;
    let aggregate = Uuid::now_v7();
    let row = coordinator
        .query_one(
            "SELECT s.shardid, n.groupid, n.nodeport, nextval('events_v2_position_seq')
               FROM pg_dist_placement s JOIN pg_dist_node n ON n.groupid = s.groupid
              WHERE s.shardid = get_shard_id_for_distribution_column('events_v2', $1::uuid)",
            &[&aggregate],
        )
        .await
        .unwrap();
    let (shard, group, port, position): (i64, i32, i32, i64) = (row.get(0), row.get(1), row.get(2), row.get(3));
    let gid = format!("citus_0_{}_1_1", std::process::id());
    // The coordinator's transaction, committed: its id goes on the event, and the record of the
    // worker's prepared transaction (as Citus writes it when it prepares).
    coordinator.batch_execute("BEGIN").await.unwrap();
    let txid: String = coordinator
        .query_one(
            "INSERT INTO pg_dist_transaction (groupid, gid, outer_xid) VALUES ($1, $2, pg_current_xact_id())
             RETURNING outer_xid::text",
            &[&group, &gid],
        )
        .await
        .unwrap()
        .get(0);
    coordinator.batch_execute("COMMIT").await.unwrap();

    let worker = connect(&format!("postgres://postgres@127.0.0.1:{port}/postgres")).await;
    let id = Uuid::now_v7();
    worker
        .batch_execute(&format!(
            "BEGIN;
             INSERT INTO {schema}.events_v2_{shard}
                    (id, \"timestamp\", aggregate_id, aggregate_type, event_type, user_id, data, metadata,
                     version, source, txid, position)
             VALUES ('{id}', now(), '{aggregate}', 'entity', 'entity.created', 'user-1', '{{}}', '{{}}',
                     1, 'api', '{txid}', {position});
             PREPARE TRANSACTION '{gid}'"
        ))
        .await
        .unwrap();
    let commit = tokio::spawn({
        let gid = gid.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            worker.batch_execute(&format!("COMMIT PREPARED '{gid}'")).await
        }
    });

    // Pages of one event until the feed has passed the coordinator's transaction. The horizon
    // also waits for other transactions on the cluster (the other tests' among them), so an
    // empty page before that says nothing.
    let txid: u64 = txid.parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    let mut checkpoint: Option<synap_events::Checkpoint> = None;
    while checkpoint.is_none_or(|c| c.txid <= txid) {
        assert!(Instant::now() < deadline, "the feed's horizon never passed {txid}");
        let page = repo.read_all(checkpoint.as_ref(), 1).await.unwrap();
        if page.events.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        seen.extend(page.events.iter().map(|e| e.id));
        checkpoint = Some(page.checkpoint);
    }
    // Whoever commits it (this test, or Citus's recovery, which finds the record), it is committed.
    let _ = commit.await.unwrap();
    assert_eq!(seen, [before.id, id], "the prepared event was skipped");
}
