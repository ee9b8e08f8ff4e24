//! Regression tests for defects found by review and by running the store (each names what it
//! once got wrong), against a real PostgreSQL in this pass's storage mode.

mod common;

use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use common::{event, sql};
use serde_json::{json, Value};
use synap_events::{
    Checkpoint, CountFilter, EventRepository, LegacyMigrationOptions, RepositoryConfig, RetentionOptions,
    StreamOptions, SubscribeOptions, UserStreamOptions,
};
use uuid::Uuid;

const LEGACY_DDL: &str = "CREATE TABLE events (
    id uuid PRIMARY KEY, user_id text, \"timestamp\" timestamptz, type text,
    data jsonb, source text DEFAULT 'api', correlation_id uuid)";

async fn migrate_all(repo: &EventRepository, table: &str) -> synap_events::LegacyMigrationReport {
    repo.migrate_legacy_events(
        &LegacyMigrationOptions {
            legacy_table: table.to_owned(),
            resume: true,
            ..Default::default()
        },
        &mut |_| {},
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_a_double_cannot_hold_are_refused_and_stored_ones_never_break_a_read() {
    let repo = common::repo("numbers").await;
    let c = sql(&repo).await;
    c.batch_execute(LEGACY_DDL).await.unwrap();
    // Legacy rows as jsonb holds them: exact decimals, however large.
    for (id, data) in [
        (1u128, r#"{"n": 1e400}"#),
        (2, r#"{"n": 12345678901234567890123}"#),
        (3, r#"{"n": 123456789.12345679, "m": 1.7976931348623157e308}"#),
    ] {
        c.execute(
            &format!(
                "INSERT INTO events (id, user_id, \"timestamp\", type, data) VALUES ($1, 'u', now(), 'entity.created', '{data}')"
            ),
            &[&Uuid::from_u128(id)],
        )
        .await
        .unwrap();
    }
    let report = migrate_all(&repo, "events").await;
    assert_eq!((report.migrated, report.failed), (1, 2));
    assert!(report.failures.iter().all(|f| f.reason_code == "INEXACT_NUMBER"));
    let migrated = repo.get_events_by_type("entity.created", 10).await.unwrap();
    assert_eq!(
        migrated[0].data,
        json!({"n": 123456789.12345679, "m": 1.7976931348623157e308})
    );

    // An append refuses them too, with the path.
    let mut e = event(Uuid::now_v7(), 1);
    e.data = json!({"ok": 1, "deep": [9007199254740993u64]});
    let err = repo.append(e).await.unwrap_err();
    assert_eq!(err.details()["field"], "data.deep[0]");
    assert_eq!(err.details()["reason"], "INEXACT_NUMBER");

    // A row stored by other means with a number beyond a double still reads, everywhere.
    let a = Uuid::now_v7();
    repo.append(event(a, 1)).await.unwrap();
    c.execute(
        "UPDATE events_v2 SET data = '{\"n\": 1e400, \"ok\": 2}', metadata = '{\"m\": -1e999}' WHERE aggregate_id = $1",
        &[&a],
    )
    .await
    .unwrap();
    let stream = repo.get_aggregate_stream(a, &StreamOptions::default()).await.unwrap();
    assert_eq!(stream[0].data, json!({"n": null, "ok": 2}));
    assert_eq!(stream[0].metadata, Some(json!({"m": null})));
    assert!(!repo
        .get_user_stream("user-1", &UserStreamOptions::default())
        .await
        .unwrap()
        .is_empty());
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut checkpoint = Checkpoint::START;
    let mut seen = false;
    while !seen {
        assert!(Instant::now() < deadline);
        let page = repo.read_all(Some(&checkpoint), 1000).await.unwrap();
        seen = page.events.iter().any(|e| e.aggregate_id == a);
        checkpoint = page.checkpoint;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_bounds_do_not_depend_on_the_session() {
    if common::timescaledb() {
        return; // Chunks are TimescaleDB's; this checks the native partitions this store makes.
    }
    let repo = common::repo("datestyle").await;
    let c = sql(&repo).await;
    let day = chrono::NaiveDate::from_ymd_opt(2031, 3, 1).unwrap();
    for (i, (style, zone)) in [
        ("SQL, DMY", "Asia/Kolkata"),
        ("Postgres, MDY", "Asia/Shanghai"),
        ("German", "America/St_Johns"),
        ("ISO, YMD", "Pacific/Chatham"),
    ]
    .iter()
    .enumerate()
    {
        let d = day + chrono::Days::new(i as u64);
        c.batch_execute(&format!("SET DateStyle = '{style}'; SET TimeZone = '{zone}'"))
            .await
            .unwrap();
        let created: i32 = c
            .query_one("SELECT synap_ensure_partitions($1, $1)", &[&d])
            .await
            .unwrap()
            .get(0);
        assert_eq!(created, 1);
        c.batch_execute("RESET DateStyle; SET TimeZone = 'UTC'").await.unwrap();
        let bounds: String = c
            .query_one(
                "SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_class c WHERE c.relname = $1",
                &[&format!("events_v2_p{}", d.format("%Y%m%d"))],
            )
            .await
            .unwrap()
            .get(0);
        let expected = format!(
            "FOR VALUES FROM ('{} 00:00:00+00') TO ('{} 00:00:00+00')",
            d.format("%Y-%m-%d"),
            (d + chrono::Days::new(1)).format("%Y-%m-%d")
        );
        assert_eq!(bounds, expected, "{style} / {zone}");
    }
    // Upkeep in an ISO session goes on past them without overlap.
    repo.ensure_partitions(day, day + chrono::Days::new(10)).await.unwrap();

    // Retention goes by a partition's real bounds: one made by the old function in a DMY
    // session in Kolkata (shifted by hours) is not dropped while part of it is after the cut-off.
    // One command per call: Citus forwards a DDL command's text to its workers, one at a time.
    c.batch_execute("CREATE TABLE events_v2_p20310320 (LIKE events_v2 INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
        .await
        .unwrap();
    c.batch_execute(
        "ALTER TABLE events_v2 ATTACH PARTITION events_v2_p20310320
             FOR VALUES FROM ('2031-03-19 18:30:00+00') TO ('2031-03-20 18:30:00+00')",
    )
    .await
    .unwrap();
    let mut late = event(Uuid::now_v7(), 1);
    late.timestamp = Some(Utc.with_ymd_and_hms(2031, 3, 20, 12, 0, 0).unwrap());
    repo.append(late).await.unwrap();
    let report = repo
        .apply_retention(&RetentionOptions {
            cutoff: Utc.with_ymd_and_hms(2031, 3, 20, 0, 0, 0).unwrap(),
            dry_run: false,
            force: true,
        })
        .await
        .unwrap();
    assert!(report.targets.iter().all(|t| t.name != "events_v2_p20310320"));
    assert_eq!(repo.count_events(&CountFilter::default()).await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_beside_live_appends_never_deadlocks() {
    let repo = common::repo("retention_live").await;
    let today = Utc::now().date_naive();
    repo.ensure_partitions(today - chrono::Days::new(40), today)
        .await
        .unwrap();
    let old = |n: i64| Some(Utc::now() - chrono::Duration::days(30 + n));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let repo = repo.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            let mut i = 0i64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let mut e = event(Uuid::now_v7(), 1);
                // Some into the days retention drops, some today.
                if (i + w) % 2 == 0 {
                    e.timestamp = old(i % 5);
                }
                if let Err(err) = repo.append(e).await {
                    errors.push(err.code());
                }
                i += 1;
            }
            errors
        }));
    }
    for _ in 0..5 {
        repo.apply_retention(&RetentionOptions {
            cutoff: Utc::now() - chrono::Duration::days(32),
            dry_run: false,
            force: true,
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for w in writers {
        let errors = w.await.unwrap();
        assert!(errors.is_empty(), "appends failed beside retention: {errors:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_read_never_has_a_gap_while_appends_widen_its_span() {
    let repo = common::repo("stream_gap").await;
    let today = Utc::now().date_naive();
    repo.ensure_partitions(today - chrono::Days::new(30), today + chrono::Days::new(30))
        .await
        .unwrap();
    let a = Uuid::now_v7();
    repo.append(event(a, 1)).await.unwrap();
    let writer = {
        let repo = repo.clone();
        tokio::spawn(async move {
            // Each event lies outside the span so far, alternately before and after it.
            for v in 2..=120 {
                let mut e = event(a, v);
                let days = i64::from(v) / 5 + 1;
                e.timestamp = Some(if v % 2 == 0 {
                    Utc::now() - chrono::Duration::days(days)
                } else {
                    Utc::now() + chrono::Duration::days(days)
                });
                repo.append(e).await.unwrap();
            }
        })
    };
    while !writer.is_finished() {
        let versions: Vec<i32> = repo
            .get_aggregate_stream(a, &StreamOptions::default())
            .await
            .unwrap()
            .iter()
            .map(|e| e.version)
            .collect();
        assert_eq!(versions, (1..=versions.len() as i32).collect::<Vec<_>>(), "a gap");
    }
    writer.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_analytics_refresh_never_counts_from_a_restricted_view() {
    let owner = common::repo("refresh_rls").await;
    let schema = owner.config().schema.clone().unwrap();
    let role = format!("synap_refresh_{}", std::process::id());
    let c = sql(&owner).await;
    c.batch_execute(&format!(
        "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS;
         SELECT synap_grant_application_role('{role}');"
    ))
    .await
    .unwrap();
    for user in ["alice", "bob"] {
        let mut e = event(Uuid::now_v7(), 1);
        e.user_id = user.into();
        owner.append(e).await.unwrap();
    }
    owner.refresh_analytics(true).await.unwrap();
    let total = || async {
        sql(&owner)
            .await
            .query_one("SELECT coalesce(sum(event_count), 0)::bigint FROM events_daily", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    assert_eq!(total().await, 2);
    let url = common::database_url();
    let (scheme, rest) = url.split_once("://").unwrap();
    let host = rest.split_once('@').map(|(_, h)| h).unwrap_or(rest);
    let mut config = RepositoryConfig::new(format!("{scheme}://{role}@{host}"));
    config.schema = Some(schema);
    let app = EventRepository::new(config).unwrap();
    let alice = app.for_user("alice").unwrap();
    let mut e = event(Uuid::now_v7(), 1);
    e.user_id = "alice".into();
    alice.append(e).await.unwrap();
    // With the README's grants: refused, and nothing consumed or emptied.
    for handle in [&app, &alice] {
        for full in [false, true] {
            assert_eq!(
                handle.refresh_analytics(full).await.unwrap_err().code(),
                "PERMISSION_DENIED"
            );
        }
    }
    assert_eq!(total().await, 2);
    // Granted EXECUTE, it runs with the owner's rights: whole numbers, whoever calls.
    c.batch_execute(&format!(
        "GRANT EXECUTE ON FUNCTION refresh_events_daily(boolean) TO {role}"
    ))
    .await
    .unwrap();
    app.refresh_analytics(false).await.unwrap();
    assert_eq!(total().await, 3);
    app.refresh_analytics(true).await.unwrap();
    assert_eq!(total().await, 3);
    // A user-scoped handle leaves upkeep to unscoped ones, granted or not.
    assert_eq!(
        alice.refresh_analytics(true).await.unwrap_err().code(),
        "PERMISSION_DENIED"
    );
    app.close();
    c.batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_and_drop_name_legacy_rows_without_a_user_or_type() {
    let repo = common::repo("legacy_nulls").await;
    let c = sql(&repo).await;
    c.batch_execute(LEGACY_DDL).await.unwrap();
    c.batch_execute(
        "INSERT INTO events (id, user_id, \"timestamp\", type, data) VALUES
           (gen_random_uuid(), NULL, now(), 'entity.created', '{}'),
           (gen_random_uuid(), 'u', now(), NULL, '{}'),
           (gen_random_uuid(), 'u', now(), 'entity.created', '{}')",
    )
    .await
    .unwrap();
    // Pending: verify lists them (it used to panic on the NULLs).
    let v = repo.verify_legacy("events").await.unwrap();
    assert!(!v.ok);
    assert_eq!(v.missing_count, 3);
    assert!(v.count_differences.iter().any(|d| d.user_id.is_none()));
    assert!(v.count_differences.iter().any(|d| d.event_type.is_none()));
    assert_eq!(
        repo.drop_legacy_table("events", true, false).await.unwrap_err().code(),
        "VERIFY_FAILED"
    );
    // Migrated: the two become failures, which block the drop until accepted as lost.
    let report = migrate_all(&repo, "events").await;
    assert_eq!((report.migrated, report.failed), (1, 2));
    let err = repo.drop_legacy_table("events", true, false).await.unwrap_err();
    assert_eq!(err.code(), "VERIFY_FAILED");
    assert!(err.to_string().contains("--accept-lost"), "{err}");
    let dropped = repo.drop_legacy_table("events", true, true).await.unwrap();
    assert!(dropped.dropped);
    assert_eq!(dropped.accepted_lost_count, 2);
    assert_eq!(dropped.verify.accepted_lost_count, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_legacy_table_under_two_spellings_is_migrated_once() {
    let repo = common::repo("legacy_names").await;
    let schema = repo.config().schema.clone().unwrap();
    let c = sql(&repo).await;
    c.batch_execute(LEGACY_DDL).await.unwrap();
    // The history (none here) migrated under the bare name: dual-write may begin ...
    migrate_all(&repo, "events").await;
    // ... under the schema-qualified name.
    let mut config = common::config(&schema);
    config.dual_write_legacy_table = Some(format!("{schema}.events"));
    let dual = EventRepository::new(config).unwrap();
    let a = Uuid::now_v7();
    dual.append(event(a, 1)).await.unwrap();
    // ... then the migration under the bare name copies nothing again.
    let report = migrate_all(&repo, "events").await;
    assert_eq!((report.pending_at_start, report.migrated), (0, 0));
    assert_eq!(repo.get_aggregate_version(a).await.unwrap(), Some(1));
    let v = repo.verify_legacy(&format!("{schema}.events")).await.unwrap();
    assert!(v.ok, "{v:?}");
    assert_eq!(v.dual_written_rows, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_checkpoint_never_moves_back() {
    let repo = common::repo("checkpoint_forward").await;
    let a = Uuid::now_v7();
    repo.append_batch((1..=6).map(|v| event(a, v)).collect()).await.unwrap();
    let options = || SubscribeOptions {
        consumer: Some("projection".into()),
        batch_size: 2,
        poll_interval: Duration::from_millis(20),
        ..Default::default()
    };
    // Two instances of one consumer: the one behind cannot store its older checkpoint.
    let mut ahead = repo.subscribe(options()).await.unwrap();
    let mut behind = repo.subscribe(options()).await.unwrap();
    behind.next_batch().await.unwrap();
    ahead.next_batch().await.unwrap();
    ahead.next_batch().await.unwrap();
    ahead.next_batch().await.unwrap();
    ahead.commit().await.unwrap();
    let err = behind.next_batch().await.unwrap_err();
    assert_eq!(err.code(), "CHECKPOINT_CONFLICT");
    assert!(repo.consumer_checkpoint("projection").await.unwrap().unwrap().place() >= ahead.checkpoint().place());
    let err = repo
        .save_consumer_checkpoint("projection", &Checkpoint::START)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "CHECKPOINT_CONFLICT");
    let _: Value = json!(err.details());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restore_into_another_cluster_the_feed_is_rebased_before_it_is_read() {
    let repo = common::repo("restore").await;
    let c = sql(&repo).await;
    let a = Uuid::now_v7();
    for v in 1..=10 {
        repo.append(event(a, v)).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let before = loop {
        let page = repo.read_all(None, 100).await.unwrap();
        if page.events.len() == 10 || Instant::now() > deadline {
            break page;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let order: Vec<Uuid> = before.events.iter().map(|e| e.id).collect();
    // A named consumer that read the first four, and a checkpoint a client kept itself.
    let half = repo.read_all(None, 4).await.unwrap();
    repo.save_consumer_checkpoint("projection", &half.checkpoint)
        .await
        .unwrap();
    let kept = half.checkpoint;

    // As a dump restored into another cluster leaves it: the rows carry that cluster's ids (far
    // ahead of this one's) and the store records it.
    c.batch_execute(
        "UPDATE events_v2 SET txid = (txid::text::bigint + 4000000000)::text::xid8;
         UPDATE event_consumers SET txid = (txid::text::bigint + 4000000000)::text::xid8;
         UPDATE synap_settings SET value = '1234' WHERE key = 'cluster_id'",
    )
    .await
    .unwrap();
    assert_eq!(
        repo.read_all(None, 10).await.unwrap_err().code(),
        "FEED_REBASE_REQUIRED"
    );
    let sub = repo.subscribe(SubscribeOptions {
        consumer: Some("projection".into()),
        ..Default::default()
    });
    let mut sub = sub.await.unwrap();
    assert_eq!(sub.next_batch().await.unwrap_err().code(), "FEED_REBASE_REQUIRED");

    let report = repo.rebase_feed().await.unwrap();
    assert!(report.needed);
    assert_eq!(report.events_renumbered, 10);
    assert!(!repo.rebase_feed().await.unwrap().needed, "once is enough");

    // The same order; new events come after the restored ones.
    let b = Uuid::now_v7();
    repo.append(event(b, 1)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        let page = repo.read_all(None, 100).await.unwrap();
        if page.events.len() == 11 || Instant::now() > deadline {
            break page;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let ids: Vec<Uuid> = after.events.iter().map(|e| e.id).collect();
    assert_eq!(&ids[..10], &order[..]);
    assert_eq!(after.events[10].aggregate_id, b);
    // The consumer goes on with exactly the rest.
    let mut sub = repo
        .subscribe(SubscribeOptions {
            consumer: Some("projection".into()),
            batch_size: 100,
            poll_interval: Duration::from_millis(20),
            ..Default::default()
        })
        .await
        .unwrap();
    let rest: Vec<Uuid> = sub.next_batch().await.unwrap().iter().map(|e| e.id).collect();
    assert_eq!(&rest[..6], &order[4..]);
    // The client's own checkpoint from before is refused, not misread.
    assert_eq!(
        repo.read_all(Some(&kept), 10).await.unwrap_err().code(),
        "CHECKPOINT_FROM_ANOTHER_STORE"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_switch_over_runbook_with_live_writes_keeps_versions_in_time_order() {
    let repo = common::repo("runbook").await;
    let schema = repo.config().schema.clone().unwrap();
    let c = sql(&repo).await;
    c.batch_execute(LEGACY_DDL).await.unwrap();
    let entities: Vec<Uuid> = (0..6).map(|_| Uuid::now_v7()).collect();
    // The old application: writes legacy rows for the entities until told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let old_app = {
        let stop = stop.clone();
        let entities = entities.clone();
        let legacy = sql(&repo).await;
        tokio::spawn(async move {
            // Its history: two years ago.
            for (i, e) in entities.iter().enumerate() {
                legacy
                    .execute(
                        "INSERT INTO events (id, user_id, \"timestamp\", type, data)
                         VALUES (gen_random_uuid(), 'u', now() - interval '2 years' + $2 * interval '1 hour',
                                 'entity.created', jsonb_build_object('entityId', $1::uuid))",
                        &[e, &(i as f64)],
                    )
                    .await
                    .unwrap();
            }
            let mut i = 0usize;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                legacy
                    .execute(
                        "INSERT INTO events (id, user_id, \"timestamp\", type, data)
                         VALUES (gen_random_uuid(), 'u', now(), 'entity.updated', jsonb_build_object('entityId', $1::uuid))",
                        &[&entities[i % entities.len()]],
                    )
                    .await
                    .unwrap();
                i += 1;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The new application, with dual-write on, before the history is migrated: refused.
    let mut config = common::config(&schema);
    config.dual_write_legacy_table = Some("events".into());
    let new_app = EventRepository::new(config).unwrap();
    let mut early = event(entities[0], 1);
    early.event_type = "entity.updated".into();
    assert_eq!(
        new_app.append(early).await.unwrap_err().code(),
        "LEGACY_HISTORY_PENDING"
    );

    // 1. Migrate the history while the old application writes on.
    let report = repo
        .migrate_legacy_events(&LegacyMigrationOptions::default(), &mut |_| {})
        .await
        .unwrap();
    assert!(report.migrated >= 6);
    // 2. The new application goes live beside the old one (the cut-over window).
    let writer = {
        let new_app = new_app.clone();
        let entities = entities.clone();
        tokio::spawn(async move {
            for round in 0..20 {
                let e = entities[round % entities.len()];
                // Reload and retry, as an application does on a conflict.
                loop {
                    let next = new_app.get_aggregate_version(e).await.unwrap().unwrap_or(0) + 1;
                    let mut ev = event(e, next);
                    ev.event_type = "entity.updated".into();
                    match new_app.append(ev).await {
                        Ok(_) => break,
                        Err(err) if err.code() == "CONCURRENCY_CONFLICT" => continue,
                        Err(err) => panic!("{err}"),
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    // Meanwhile the migration catches up with the old application's rows.
    while !writer.is_finished() {
        repo.migrate_legacy_events(
            &LegacyMigrationOptions {
                resume: true,
                ..Default::default()
            },
            &mut |_| {},
        )
        .await
        .unwrap();
    }
    writer.await.unwrap();
    // 3. The old application stops; a last run takes its last rows.
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    old_app.await.unwrap();
    let last = migrate_all(&repo, "events").await;

    // Versions follow time within every aggregate, across the whole switch-over.
    let disorder: i64 = c
        .query_one(
            "SELECT count(*) FROM (
                 SELECT \"timestamp\" < lag(\"timestamp\") OVER (PARTITION BY aggregate_id ORDER BY version) AS back
                   FROM events_v2) x
              WHERE back",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(disorder, 0, "versions out of time order");
    // Every legacy row is accounted for: an event, or a row refused as out of order and named.
    let unaccounted: i64 = c
        .query_one(
            "SELECT count(*) FROM events l
              WHERE NOT EXISTS (SELECT 1 FROM legacy_migration_map m WHERE m.legacy_id = l.id)
                AND NOT EXISTS (SELECT 1 FROM legacy_migration_failures f
                                 WHERE f.legacy_id = l.id AND f.reason_code = 'OUT_OF_ORDER')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(unaccounted, 0);
    assert_eq!(last.remaining, 0);
    let verify = repo.verify_legacy("events").await.unwrap();
    assert_eq!(verify.missing_count, 0);
    assert_eq!(verify.mismatched_count, 0);
}

/// `{"a":{"a":...1...}}` nested `levels` deep, as JSON text.
fn deep_json(levels: usize) -> String {
    format!("{}1{}", "{\"a\":".repeat(levels), "}".repeat(levels))
}

/// One rule for what the store accepts, at every entrance: data nested deeper than a reader
/// parses is refused by appends (Rust and Node), batches and the legacy migration. A row written
/// by other means (plain SQL) never stops a read or the feed: it reads as a record flagged
/// unreadable, in its place, and a fold refuses it with a code that names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_unreadable_row_costs_one_event_not_the_feed() {
    let repo = common::repo("unreadable").await;
    let c = sql(&repo).await;
    let too_deep: Value = serde_json::from_str::<Value>(&deep_json(100)).unwrap();
    let mut deeper = too_deep.clone();
    for _ in 0..40 {
        deeper = json!({ "a": deeper });
    }
    for (data, metadata) in [(deeper.clone(), None), (json!({}), Some(deeper.clone()))] {
        let mut e = event(Uuid::now_v7(), 1);
        e.data = data;
        e.metadata = metadata;
        let err = repo.append(e.clone()).await.unwrap_err();
        assert_eq!(
            (err.code(), err.details()["reason"].as_str()),
            ("VALIDATION_FAILED", Some("TOO_DEEP")),
            "{err}"
        );
        let err = repo.append_batch(vec![e]).await.unwrap_err();
        assert_eq!(err.details()["reason"].as_str(), Some("TOO_DEEP"), "{err}");
    }
    c.batch_execute(LEGACY_DDL).await.unwrap();
    c.execute(
        &format!("INSERT INTO events (id, user_id, \"timestamp\", type, data) VALUES (gen_random_uuid(), 'u', now(), 'entity.created', '{}')", deep_json(200)),
        &[],
    )
    .await
    .unwrap();
    let report = migrate_all(&repo, "events").await;
    assert_eq!((report.migrated, report.failed), (0, 1));
    assert_eq!(report.failures[0].reason_code, "TOO_DEEP");
    assert_eq!(common::count_rows(&repo).await, (0, 0), "nothing stored");

    // Plain SQL writes what the store refuses, between two good events.
    let good = Uuid::now_v7();
    repo.append(event(good, 1)).await.unwrap();
    let bad = Uuid::now_v7();
    c.execute(
        &format!(
            "WITH s AS (INSERT INTO event_streams (aggregate_id, aggregate_type, user_id, version, first_timestamp, last_timestamp)
                        VALUES ($1, 'entity', 'user-1', 1, now(), now()))
             INSERT INTO events_v2 (aggregate_id, aggregate_type, event_type, user_id, data, metadata, version)
             VALUES ($1, 'entity', 'entity.created', 'user-1', '{}', '{}', 1)",
            deep_json(200),
            deep_json(150)
        ),
        &[&bad],
    )
    .await
    .unwrap();
    repo.append(event(good, 2)).await.unwrap();

    let flagged = |records: &[synap_events::EventRecord]| {
        records
            .iter()
            .filter(|r| r.unreadable.is_some())
            .map(|r| (r.aggregate_id, r.version, r.unreadable.clone().unwrap()))
            .collect::<Vec<_>>()
    };
    // The feed: every event, the bad one flagged in its place (the horizon is cluster-wide:
    // another test's open transaction may hold it back for a moment).
    let deadline = Instant::now() + Duration::from_secs(60);
    let page = loop {
        let page = repo.read_all(None, 100).await.unwrap();
        if page.events.len() >= 3 || Instant::now() > deadline {
            break page;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(page.events.len(), 3);
    let on_feed = flagged(&page.events);
    assert_eq!(on_feed.len(), 1, "{on_feed:?}");
    let (aggregate, version, why) = &on_feed[0];
    assert_eq!((*aggregate, *version, why.column.as_str()), (bad, 1, "data"));
    assert!(why.raw.starts_with("{\"a\": {\"a\":"), "{}", &why.raw[..40]);
    assert_eq!(page.events[1].data, json!({}));
    // Every other read.
    let stream = repo.get_aggregate_stream(bad, &StreamOptions::default()).await.unwrap();
    assert_eq!(flagged(&stream).len(), 1);
    let user = repo
        .get_user_stream("user-1", &UserStreamOptions::default())
        .await
        .unwrap();
    assert_eq!((user.len(), flagged(&user).len()), (3, 1));
    let by_type = repo.get_events_by_type("entity.created", 10).await.unwrap();
    assert_eq!(flagged(&by_type).len(), 1);
    let tail = repo.get_snapshot_and_tail(bad).await.unwrap();
    assert_eq!(flagged(&tail.events).len(), 1);
    // A subscriber goes past it.
    let mut sub = repo
        .subscribe(SubscribeOptions {
            consumer: Some("past_the_bad_row".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        seen.extend(sub.next_batch().await.unwrap());
    }
    assert_eq!(flagged(&seen).len(), 1);
    // The fold refuses it with a code that names the event; the other aggregate replays.
    let err = repo.replay(bad, &Default::default()).await.unwrap_err();
    assert_eq!(err.code(), "INVALID_EVENT", "{err}");
    assert!(err.to_string().contains(&page.events[1].id.to_string()), "{err}");
    assert_eq!(repo.replay(good, &Default::default()).await.unwrap().result.version, 2);
}
