//! The `synap-events` binary against a real PostgreSQL (DATABASE_URL): exit codes, `--json`,
//! and a migration killed mid-run and resumed.

use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_synap-events");

fn database_url() -> String {
    std::env::var("DATABASE_URL").expect("DATABASE_URL must point at a PostgreSQL server (scripts/db.sh start)")
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh schema and a client whose search_path is it.
async fn fresh(tag: &str) -> (String, tokio_postgres::Client) {
    let schema = format!(
        "t_cli_{tag}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    );
    let (client, conn) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}; SET search_path = {schema}"
        ))
        .await
        .unwrap();
    (schema, client)
}

fn cli(schema: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env("DATABASE_URL", database_url())
        .arg("--schema")
        .arg(schema)
        .args(args);
    cmd
}

fn run(schema: &str, args: &[&str]) -> Output {
    cli(schema, args).output().expect("run synap-events")
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited normally")
}

/// The one JSON document printed on stdout.
fn json(out: &Output) -> Value {
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    assert_eq!(text.trim().lines().count(), 1, "one document: {text}");
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

const LEGACY_DDL: &str = "CREATE TABLE events (
    id uuid PRIMARY KEY, user_id text NOT NULL, \"timestamp\" timestamptz NOT NULL, type text NOT NULL,
    data jsonb NOT NULL, source text DEFAULT 'api', correlation_id uuid)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_and_json_reports() {
    let (schema, c) = fresh("codes").await;
    let s = schema.as_str();

    let out = run(s, &["--json", "migrate"]);
    assert_eq!(code(&out), 0);
    let every: Vec<i32> = synap_events::MIGRATIONS.iter().map(|m| m.version).collect();
    assert_eq!(json(&out)["applied"], serde_json::json!(every));
    // The storage mode of this test pass (scripts/test.sh runs native and TimescaleDB).
    let mode = std::env::var("SYNAP_TEST_STORAGE_MODE").unwrap_or_else(|_| "native".into());
    assert_eq!(json(&out)["storageMode"], mode.as_str());

    // Bad arguments: clap's usage error.
    assert_eq!(code(&run(s, &["retention"])), 2);
    assert_eq!(code(&run(s, &["migrate-events", "--batch-size", "many"])), 2);
    // Bad values: the core's error code, in text on stderr or as JSON on stdout.
    let out = run(s, &["retention", "--older-than", "5x"]);
    assert_eq!(code(&out), 1);
    assert!(String::from_utf8_lossy(&out.stderr).contains("error [INVALID_CONFIG]"));
    let out = run(s, &["--json", "migrate-events"]);
    assert_eq!(code(&out), 1);
    assert_eq!(json(&out)["error"]["code"], "LEGACY_TABLE_NOT_FOUND");
    let out = run(s, &["--json", "migrate-events", "--on-invalid", "maybe"]);
    assert_eq!(json(&out)["error"]["code"], "INVALID_CONFIG");
    let out = Command::new(BIN)
        .env_remove("DATABASE_URL")
        .args(["stats"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 1);
    assert!(String::from_utf8_lossy(&out.stderr).contains("[INVALID_CONFIG]"));

    c.batch_execute(LEGACY_DDL).await.unwrap();
    c.batch_execute(
        "INSERT INTO events (id, user_id, \"timestamp\", type, data)
         SELECT gen_random_uuid(), 'u' || (g % 3), timestamptz '2024-05-01' + make_interval(mins => g),
                CASE WHEN g IN (7, 8) THEN 'Not A Type' ELSE 'entity.updated' END, jsonb_build_object('g', g)
           FROM generate_series(1, 50) g",
    )
    .await
    .unwrap();

    let out = run(s, &["--json", "migrate-events", "--dry-run"]);
    assert_eq!(code(&out), 3, "a dry run that finds bad rows says so");
    let dry = json(&out);
    assert_eq!(
        (dry["dryRun"].as_bool(), dry["migrated"].as_u64()),
        (Some(true), Some(48))
    );

    let out = run(s, &["--json", "migrate-events", "--batch-size", "10", "--writers", "1"]);
    assert_eq!(code(&out), 3, "failed rows give exit 3");
    let report = json(&out);
    assert_eq!(report["migrated"], 48);
    assert_eq!(report["failed"], 2);
    assert_eq!(report["batches"], 5);
    assert_eq!(report["failures"][0]["reasonCode"], "INVALID_EVENT_TYPE");
    assert_eq!(report["successRate"].as_f64(), Some(96.0));

    let out = run(s, &["migrate-events", "--resume"]);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("migrated 0, skipped 50"), "{text}");

    let out = run(s, &["--json", "verify"]);
    assert_eq!(code(&out), 3);
    assert_eq!(json(&out)["ok"], false);
    assert_eq!(json(&out)["failedCount"], 2);

    let out = run(s, &["--json", "drop-legacy", "--confirm"]);
    assert_eq!(code(&out), 1);
    assert_eq!(json(&out)["error"]["code"], "VERIFY_FAILED");

    c.batch_execute("DELETE FROM events WHERE type = 'Not A Type'")
        .await
        .unwrap();
    assert_eq!(code(&run(s, &["verify"])), 0);
    let out = run(s, &["drop-legacy"]);
    assert_eq!(code(&out), 1);
    assert!(String::from_utf8_lossy(&out.stderr).contains("[CONFIRMATION_REQUIRED]"));
    let out = run(s, &["--json", "drop-legacy", "--confirm"]);
    assert_eq!(code(&out), 0);
    assert_eq!(json(&out)["dropped"], true);

    let out = run(s, &["--json", "stats"]);
    assert_eq!(code(&out), 0);
    assert_eq!(json(&out)["events"], 48);
    assert_eq!(json(&out)["legacyMigrations"][0]["migrated"], 48);
    let out = run(s, &["--json", "refresh-analytics"]);
    assert_eq!(json(&out)["daysRefreshed"], 1);

    // Erasure of a user with nothing stored: a report of zeros, no notice.
    let out = run(s, &["--json", "erase-user", "nobody", "--dry-run"]);
    assert_eq!(code(&out), 0);
    assert_eq!(json(&out)["dryRun"], true);
    assert_eq!(json(&out)["tables"][0]["rows"], 0);
    let out = run(s, &["--json", "erase-user", "nobody"]);
    assert_eq!(code(&out), 0);
    assert_eq!(json(&out)["notice"], Value::Null);
    let out = run(s, &["erase-user", ""]);
    assert_eq!(code(&out), 1);
    assert!(String::from_utf8_lossy(&out.stderr).contains("[VALIDATION_FAILED]"));

    // Retention: everything is from May 2024, so a one-day age drops that partition.
    let out = run(s, &["--json", "retention", "--older-than", "1d", "--dry-run"]);
    assert_eq!(code(&out), 0);
    let dry = json(&out);
    assert_eq!(dry["rows"], 48);
    let target = dry["targets"][0]["name"].as_str().unwrap().to_owned();
    if mode == "timescaledb" {
        assert_eq!(dry["targets"][0]["kind"], "chunk");
        assert!(target.contains("_hyper_"), "{target}");
    } else {
        assert_eq!(target, "events_v2_p20240501");
    }
    let out = run(s, &["--json", "retention", "--older-than", "1d"]);
    assert_eq!(code(&out), 0);
    // Each of the 48 aggregates is live: it stays, as a snapshot of its state.
    assert_eq!(json(&out)["streamsDeleted"], 0);
    assert_eq!(json(&out)["streamsKept"], 48);
    assert_eq!(json(&out)["snapshotsStored"], 48);
    let out = run(s, &["--json", "stats"]);
    assert_eq!(json(&out)["events"], 0);
}

/// `synap-events ... | head -1`: a reader that closes the pipe early must not make the program
/// panic (exit 101); it ends with the exit code of its work.
#[test]
fn a_closed_output_pipe_is_not_a_crash() {
    for (args, stream) in [(&["--json", "stats"][..], "stdout"), (&["stats"][..], "stderr")] {
        // A socket whose other end is closed: every write fails with EPIPE, as a closed pipe's.
        let (reader, writer) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(reader);
        let writer = std::os::fd::OwnedFd::from(writer);
        let mut cmd = Command::new(BIN);
        cmd.env_remove("DATABASE_URL").args(args);
        let out = if stream == "stdout" {
            cmd.stdout(writer).stderr(Stdio::piped()).output()
        } else {
            cmd.stderr(writer).stdout(Stdio::piped()).output()
        }
        .unwrap();
        assert_eq!(code(&out), 1, "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"), "{args:?}");
    }
}

/// A resumed run, in batches of 100, that waits at most a second for another run's lock.
fn resume_at_once(schema: &str) -> std::process::Child {
    cli(
        schema,
        &[
            "--json",
            "migrate-events",
            "--resume",
            "--batch-size",
            "100",
            "--busy-timeout",
            "1",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap()
}

async fn scalar(c: &tokio_postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_migration_resumes_without_duplicates_or_gaps() {
    let (schema, c) = fresh("kill").await;
    let s = schema.as_str();
    assert_eq!(code(&run(s, &["migrate"])), 0);
    c.batch_execute(LEGACY_DDL).await.unwrap();
    // 3000 rows over 120 aggregates, inserted in random timestamp order, some timestamps shared.
    c.batch_execute(
        "INSERT INTO events (id, user_id, \"timestamp\", type, data)
         SELECT gen_random_uuid(), 'u' || (g % 7),
                timestamptz '2024-06-01' + make_interval(mins => (g * 7919) % 2000),
                'entity.updated', jsonb_build_object('entityId', md5((g % 120)::text)::uuid, 'g', g)
           FROM generate_series(1, 3000) g ORDER BY random()",
    )
    .await
    .unwrap();
    let migrated = "SELECT count(*) FROM legacy_migration_map";

    // Kill it twice, each time after some batches have committed (three writers, then one).
    for (stop_after, writers) in [(400, "3"), (1500, "1")] {
        let mut child = cli(
            s,
            &[
                "migrate-events",
                "--resume",
                "--batch-size",
                "50",
                "--writers",
                writers,
                "--batch-delay-ms",
                "15",
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
        let started = Instant::now();
        while scalar(&c, migrated).await < stop_after {
            assert!(started.elapsed() < Duration::from_secs(60), "no progress");
            assert!(
                child.try_wait().unwrap().is_none(),
                "finished before it could be killed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert!(!status.success());
        // Both counts in one snapshot: a batch whose COMMIT the killed process had already sent
        // may still commit after the kill, between two separate counts.
        let row = c
            .query_one(
                "SELECT (SELECT count(*) FROM legacy_migration_map), (SELECT count(*) FROM events_v2)",
                &[],
            )
            .await
            .unwrap();
        let (n, events): (i64, i64) = (row.get(0), row.get(1));
        assert!(n < 3000, "killed mid-run, {n}");
        assert_eq!(events, n, "events and map commit together");
    }

    // Without --resume a started migration is refused.
    let out = run(s, &["--json", "migrate-events"]);
    assert_eq!(code(&out), 1);
    assert_eq!(json(&out)["error"]["code"], "LEGACY_MIGRATION_STARTED");

    let out = run(s, &["--json", "migrate-events", "--resume", "--batch-size", "50"]);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stdout));
    let report = json(&out);
    assert_eq!(
        report["migrated"].as_u64().unwrap() + report["previouslyMigrated"].as_u64().unwrap(),
        3000
    );
    assert_eq!(report["remaining"], 0);

    // Every legacy id exactly once.
    assert_eq!(scalar(&c, "SELECT count(*) FROM events_v2").await, 3000);
    assert_eq!(
        scalar(&c, "SELECT count(DISTINCT metadata->>'legacyId') FROM events_v2").await,
        3000
    );
    assert_eq!(
        // The migrated ids first (materialized): Citus joins no distributed table with a local one.
        scalar(
            &c,
            "WITH e AS MATERIALIZED (SELECT metadata->>'legacyId' AS legacy_id FROM events_v2)
             SELECT count(*) FROM events l WHERE NOT EXISTS (SELECT 1 FROM e WHERE e.legacy_id = l.id::text)"
        )
        .await,
        0
    );
    // Versions 1..n per aggregate, in (timestamp, legacy id) order, matching event_streams.
    assert_eq!(
        scalar(
            &c,
            "SELECT count(*) FROM (
                 SELECT version, row_number() OVER (PARTITION BY aggregate_id
                                                    ORDER BY \"timestamp\", (metadata->>'legacyId')::uuid) AS rn
                   FROM events_v2) x
              WHERE version <> rn"
        )
        .await,
        0
    );
    assert_eq!(
        scalar(
            &c,
            "SELECT count(*) FROM event_streams s
              WHERE s.version <> (SELECT count(*) FROM events_v2 e WHERE e.aggregate_id = s.aggregate_id)"
        )
        .await,
        0
    );
    assert_eq!(scalar(&c, "SELECT count(*) FROM event_streams").await, 120);
    let out = run(s, &["--json", "verify"]);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stdout));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_after_a_kill_goes_ahead_while_the_dead_runs_backend_still_works() {
    let (schema, c) = fresh("orphan").await;
    let s = schema.as_str();
    assert_eq!(code(&run(s, &["migrate"])), 0);
    c.batch_execute(LEGACY_DDL).await.unwrap();
    c.batch_execute(
        "INSERT INTO events (id, user_id, \"timestamp\", type, data)
         SELECT gen_random_uuid(), 'u', timestamptz '2024-06-01' + make_interval(secs => g), 'entity.updated', '{}'
           FROM generate_series(1, 500) g",
    )
    .await
    .unwrap();
    // The run's first batch will wait on the server for this lock: its backend is busy when the
    // process is killed, and keeps the migration lock until the statement ends.
    let (blocker, conn) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    blocker
        .batch_execute(&format!(
            "SET search_path = {s}; BEGIN; LOCK TABLE event_streams IN SHARE MODE"
        ))
        .await
        .unwrap();
    let mut child = cli(s, &["migrate-events", "--batch-size", "100"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // This run's backends only: other tests run migrations at the same time.
    let waiting = format!(
        "SELECT count(*) FROM pg_stat_activity
          WHERE application_name LIKE 'synap-events migrate-events pid={}%' AND wait_event_type = 'Lock'",
        child.id()
    );
    let waiting = waiting.as_str();
    let started = Instant::now();
    while scalar(&c, waiting).await == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the first batch never waited"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // Its writers (two by default, one for each share of the aggregates) are still there.
    assert!(
        scalar(&c, waiting).await >= 1,
        "the killed run's backends are still there"
    );

    // Re-run at once, willing to wait 1 s for the lock while the orphan would hold it for 3: it
    // is recognised (its process is gone) and ended, and the run goes ahead as soon as the
    // blocker lets go.
    let rerun = resume_at_once(s);
    tokio::time::sleep(Duration::from_millis(3000)).await;
    blocker.batch_execute("COMMIT").await.unwrap();
    let out = rerun.wait_with_output().unwrap();
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(scalar(&c, "SELECT count(*) FROM events_v2").await, 500);
    assert_eq!(scalar(&c, "SELECT count(*) FROM legacy_migration_map").await, 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_ends_a_dead_runs_other_writers_before_it_reads() {
    let (schema, c) = fresh("orphan_writer").await;
    let s = schema.as_str();
    assert_eq!(code(&run(s, &["migrate"])), 0);
    c.batch_execute(LEGACY_DDL).await.unwrap();
    // Each row its own aggregate: both writers get rows.
    c.batch_execute(
        "INSERT INTO events (id, user_id, \"timestamp\", type, data)
         SELECT gen_random_uuid(), 'u', timestamptz '2024-06-01' + make_interval(secs => g), 'entity.updated', '{}'
           FROM generate_series(1, 4000) g",
    )
    .await
    .unwrap();
    let mut child = cli(
        s,
        &[
            "migrate-events",
            "--batch-size",
            "20",
            "--writers",
            "2",
            "--batch-delay-ms",
            "100",
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let started = Instant::now();
    while scalar(&c, "SELECT count(*) FROM legacy_migration_map").await == 0 {
        assert!(started.elapsed() < Duration::from_secs(30), "no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Both writers must be inside their next batches, waiting for this lock. A writer whose batch
    // took the map before the lock was asked for commits and then waits for the round (the
    // other writer), not for the lock: then let go and ask again, between rounds.
    let (blocker, conn) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    blocker.batch_execute(&format!("SET search_path = {s}")).await.unwrap();
    let name = format!("synap-events migrate-events pid={}%", child.id());
    let waiting = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE '{name}' AND wait_event_type = 'Lock'"
    );
    let started = Instant::now();
    loop {
        blocker
            .batch_execute("BEGIN; LOCK TABLE legacy_migration_map IN SHARE MODE")
            .await
            .unwrap();
        let asked = Instant::now();
        while scalar(&c, &waiting).await < 2 && asked.elapsed() < Duration::from_secs(2) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if scalar(&c, &waiting).await >= 2 {
            break;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let activity = c
                .query(
                    "SELECT application_name || ' ' || state || ' ' || coalesce(wait_event_type || ':' || wait_event, '')
                            || ' ' || left(query, 60)
                       FROM pg_stat_activity WHERE application_name LIKE 'synap-events%'",
                    &[],
                )
                .await
                .unwrap();
            let activity: Vec<String> = activity.iter().map(|r| r.get(0)).collect();
            panic!("the writers never waited: {activity:#?}");
        }
        blocker.batch_execute("COMMIT").await.unwrap();
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before both writers waited"
        );
    }
    // The writer that holds the migration lock dies first (its lock goes with it); then the
    // process. The other writer's backend is left inside its batch.
    let holder = format!(
        "SELECT pg_terminate_backend(a.pid, 5000) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
          WHERE l.locktype = 'advisory' AND l.granted AND a.application_name LIKE '{name}'
            AND l.classid = (hashtext('synap.legacy_migration')::bigint & 4294967295)::text::oid"
    );
    c.execute(holder.as_str(), &[]).await.unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let alive = format!("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE '{name}'");
    // Its reader, idle between rounds, ends with the process (the server notices at once, but
    // after the process is gone): only the writer inside its batch stays.
    let in_batch = format!("{alive} AND state <> 'idle'");
    assert_eq!(
        scalar(&c, &in_batch).await,
        1,
        "one writer of the dead run is still there"
    );

    // A rerun takes the free migration lock, finds the dead run's writer and ends it before it
    // reads anything; then it waits for the blocker like any batch.
    let rerun = resume_at_once(s);
    let started = Instant::now();
    while scalar(&c, &alive).await > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the dead run's writer was not ended"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    blocker.batch_execute("COMMIT").await.unwrap();
    let out = rerun.wait_with_output().unwrap();
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(scalar(&c, "SELECT count(*) FROM events_v2").await, 4000);
    assert_eq!(scalar(&c, "SELECT count(*) FROM legacy_migration_map").await, 4000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_lists_groups_and_retries_and_skips_parked_events() {
    let (schema, _c) = fresh("groups").await;
    let s = schema.as_str();
    assert_eq!(code(&run(s, &["migrate"])), 0);
    let mut config = synap_events::RepositoryConfig::new(database_url());
    config.schema = Some(schema.clone());
    let repo = synap_events::EventRepository::new(config).unwrap();
    let (a, b) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    for v in 1..=2 {
        for agg in [a, b] {
            let e = synap_events::NewEvent::new(
                agg,
                synap_events::AggregateType::Entity,
                if v == 1 { "task.created" } else { "task.updated" },
                "u1",
                serde_json::json!({ "v": v }),
                v,
            );
            repo.append(e).await.unwrap();
        }
    }
    // A member whose handler fails on every event of `a`: its first event is parked, its second
    // waits behind it, `b` flows.
    let mut options = synap_events::GroupOptions::new("billing");
    options.partitions = Some(4);
    options.max_attempts = 1;
    options.poll_interval = std::time::Duration::from_millis(50);
    let mut member = repo.join_group(options).await.unwrap();
    let stop = std::sync::Arc::new(tokio::sync::Notify::new());
    let stopping = stop.clone();
    let running = tokio::spawn(async move {
        member
            .consume(
                move |events: Vec<synap_events::EventRecord>| {
                    let bad = events.iter().any(|e| e.aggregate_id == a);
                    async move {
                        if bad {
                            Err("no invoice for a".into())
                        } else {
                            Ok(())
                        }
                    }
                },
                async move { stopping.notified().await },
            )
            .await
    });
    let start = std::time::Instant::now();
    let parked = loop {
        let parked = repo.parked("billing").await.unwrap();
        if parked.len() == 2 {
            break parked;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(30), "{parked:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };

    // The list shows the group with its member and a parked event: exit code 3 (problems).
    let out = run(s, &["--json", "consumers"]);
    assert_eq!(code(&out), 3);
    let doc = json(&out);
    let group = &doc["groups"][0];
    assert_eq!(group["group"], "billing");
    assert_eq!(group["members"].as_array().unwrap().len(), 1);
    assert_eq!(group["partitions"].as_array().unwrap().len(), 4);
    assert_eq!(
        (group["parked"].clone(), group["waiting"].clone()),
        (1.into(), 1.into())
    );
    let text = String::from_utf8(run(s, &["consumers", "list"]).stdout).unwrap();
    assert!(text.contains("group billing  1 member(s), 4 partitions"), "{text}");

    let out = run(s, &["--json", "consumers", "parked", "billing"]);
    assert_eq!(code(&out), 3);
    let listed = json(&out)["parked"].clone();
    assert_eq!(listed[0]["state"], "failed");
    assert_eq!(listed[0]["error"], "no invoice for a");
    assert_eq!(listed[1]["state"], "waiting");

    // Bad input: a typed error and exit code 1.
    let out = run(s, &["--json", "consumers", "retry", "billing", "nope"]);
    assert_eq!(code(&out), 1);
    assert_eq!(json(&out)["error"]["code"], "VALIDATION_FAILED");
    let out = run(
        s,
        &["--json", "consumers", "skip", "nobody", &parked[0].event_id.to_string()],
    );
    assert_eq!(json(&out)["error"]["code"], "VALIDATION_FAILED");

    // Skipping the failed event releases the one behind it (which fails again and is parked).
    let failed = parked
        .iter()
        .find(|p| p.state == "failed")
        .unwrap()
        .event_id
        .to_string();
    let out = run(s, &["--json", "consumers", "skip", "billing", &failed]);
    assert_eq!(code(&out), 0);
    assert_eq!(json(&out)["skipped"], true);
    let start = std::time::Instant::now();
    loop {
        let now = repo.parked("billing").await.unwrap();
        if now.len() == 1 && now[0].state == "failed" && now[0].event_id != parked[0].event_id {
            break;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(30), "{now:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    stop.notify_one();
    running.await.unwrap().unwrap();
    let out = run(s, &["--json", "consumers", "retry", "billing", &failed]);
    assert_eq!(code(&out), 1, "a skipped event is no longer parked");
}

/// `synap-events stats >&-`: with standard output closed the report would vanish; the command
/// says so and fails. `>/dev/null` is a choice of the caller's and succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_standard_output_fails_and_dev_null_does_not() {
    // Under libfaketime (scripts/clock-test.sh, LD_PRELOAD) the library opens a descriptor of its
    // own as the process starts, and with standard output closed it gets descriptor 1: the CLI's
    // output then goes there (it exited 0 under the script). No clock is involved here.
    if std::env::var_os("FAKETIME").is_some() {
        eprintln!("not run under libfaketime: it takes the closed descriptor 1 for itself");
        return;
    }
    let (schema, _c) = fresh("closed_stdout").await;
    assert_eq!(code(&run(&schema, &["migrate"])), 0);
    let shell = |redirect: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(format!("exec \"$0\" --schema {schema} --json stats {redirect}"))
            .arg(BIN)
            .env("DATABASE_URL", database_url())
            .output()
            .unwrap()
    };
    let out = shell(">&-");
    assert_eq!(code(&out), 1);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("standard output is closed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(code(&shell(">/dev/null")), 0);
}
