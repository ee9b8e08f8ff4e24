//! Legacy `events` → events_v2: migration, resume, verify, drop and dual-write, against a real
//! PostgreSQL (DATABASE_URL).

mod common;

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{json, Value};
use synap_events::{
    AggregateType, EventRepository, LegacyMigrationOptions, LegacyMigrationProgress, NewEvent, OnInvalid, StreamOptions,
};
use uuid::Uuid;

const LEGACY_DDL: &str = "CREATE TABLE events (
    id uuid PRIMARY KEY, user_id text NOT NULL, \"timestamp\" timestamptz NOT NULL, type text NOT NULL,
    data jsonb NOT NULL, source text DEFAULT 'api', correlation_id uuid)";

fn at(day: u32, second: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 3, day, 10, 0, second).unwrap()
}

async fn insert_legacy(
    c: &tokio_postgres::Client,
    id: Uuid,
    user: &str,
    ts: DateTime<Utc>,
    event_type: &str,
    data: Value,
) {
    c.execute(
        "INSERT INTO events (id, user_id, \"timestamp\", type, data, source, correlation_id) \
         VALUES ($1, $2, $3, $4, $5, 'web', $6)",
        &[&id, &user, &ts, &event_type, &data, &Uuid::from_u128(7)],
    )
    .await
    .unwrap();
}

/// A report's failures as (legacy id, reason code), sorted.
fn failure_codes(report: &synap_events::LegacyMigrationReport) -> Vec<(Uuid, &str)> {
    let mut codes: Vec<(Uuid, &str)> = report
        .failures
        .iter()
        .map(|f| (f.legacy_id, f.reason_code.as_str()))
        .collect();
    codes.sort();
    codes
}

fn opts(batch_size: usize) -> LegacyMigrationOptions {
    LegacyMigrationOptions {
        batch_size,
        ..Default::default()
    }
}

async fn migrate(repo: &EventRepository, options: &LegacyMigrationOptions) -> synap_events::LegacyMigrationReport {
    let mut seen = Vec::new();
    let report = repo
        .migrate_legacy_events(options, &mut |p: &LegacyMigrationProgress| seen.push(*p))
        .await
        .unwrap();
    assert_eq!(seen.first().map(|p| p.processed), Some(0), "progress starts at 0");
    assert_eq!(seen.last().unwrap().processed, report.processed);
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrates_in_order_continues_versions_and_reports_bad_rows() {
    let repo = common::repo("legacy_mig").await;
    let c = common::sql(&repo).await;
    c.batch_execute(LEGACY_DDL).await.unwrap();

    // Aggregate A already has two events in events_v2.
    let a = Uuid::from_u128(0xA);
    for v in 1..=2 {
        let mut e = NewEvent::new(a, AggregateType::Entity, "entity.updated", "u1", json!({"v": v}), v);
        e.timestamp = Some(at(1, v as u32));
        repo.append(e).await.unwrap();
    }
    // A's legacy rows, inserted out of timestamp order, two with the same timestamp (ties by id).
    let (a3, a4, a5, a6) = (
        Uuid::from_u128(0x300),
        Uuid::from_u128(0x101),
        Uuid::from_u128(0x102),
        Uuid::from_u128(0x400),
    );
    insert_legacy(&c, a6, "u1", at(5, 0), "entity.updated", json!({"entityId": a, "n": 6})).await;
    insert_legacy(&c, a5, "u1", at(4, 0), "entity.updated", json!({"entityId": a, "n": 5})).await;
    insert_legacy(&c, a3, "u1", at(2, 0), "entity.updated", json!({"entityId": a, "n": 3})).await;
    insert_legacy(&c, a4, "u1", at(4, 0), "entity.updated", json!({"entityId": a, "n": 4})).await;
    // B: a new aggregate shared by two rows; C: no entityId, so its own id is the aggregate.
    let b = Uuid::from_u128(0xB);
    insert_legacy(
        &c,
        Uuid::from_u128(0x501),
        "u2",
        at(3, 1),
        "relation.linked",
        json!({"entityId": b.to_string()}),
    )
    .await;
    insert_legacy(
        &c,
        Uuid::from_u128(0x500),
        "u2",
        at(3, 0),
        "relation.created",
        json!({"entityId": b}),
    )
    .await;
    let own = Uuid::from_u128(0x600);
    insert_legacy(&c, own, "u3", at(3, 5), "task.done", json!({"entityId": "not-a-uuid"})).await;
    // Bad rows.
    let bad_data = Uuid::from_u128(0x701);
    let bad_type = Uuid::from_u128(0x702);
    let bad_user = Uuid::from_u128(0x703);
    let inexact = Uuid::from_u128(0x705);
    insert_legacy(&c, bad_data, "u1", at(2, 30), "entity.updated", json!([1, 2])).await;
    insert_legacy(&c, bad_type, "u1", at(2, 31), "Entity Updated", json!({})).await;
    insert_legacy(&c, bad_user, "   ", at(2, 32), "entity.updated", json!({})).await;
    // 2^53 + 1: a JavaScript number would read it as 2^53.
    insert_legacy(
        &c,
        inexact,
        "u1",
        at(2, 34),
        "entity.updated",
        json!({"n": 9007199254740993u64}),
    )
    .await;
    // Not bad: a relation event whose entityId is entity A belongs to A's history, as an entity.
    let shared = Uuid::from_u128(0x704);
    insert_legacy(&c, shared, "u1", at(2, 33), "relation.created", json!({"entityId": a})).await;

    // A dry run counts and writes nothing.
    let dry = migrate(
        &repo,
        &LegacyMigrationOptions {
            dry_run: true,
            ..opts(3)
        },
    )
    .await;
    assert_eq!((dry.pending_at_start, dry.migrated, dry.failed), (12, 8, 4));
    assert_eq!(common::count_rows(&repo).await, (2, 1));

    // Batches of 2 by one writer (so the count of batches is known): A's rows land in
    // different batches and must continue from event_streams.
    let report = migrate(&repo, &LegacyMigrationOptions { writers: 1, ..opts(2) }).await;
    assert_eq!(report.pending_at_start, 12);
    assert_eq!((report.processed, report.migrated, report.failed), (12, 8, 4));
    assert_eq!(report.batches, 6);
    assert!((report.success_rate - 800.0 / 12.0).abs() < 1e-9);
    let codes = failure_codes(&report);
    assert_eq!(
        codes,
        vec![
            (bad_data, "INVALID_DATA"),
            (bad_type, "INVALID_EVENT_TYPE"),
            (bad_user, "INVALID_USER_ID"),
            (inexact, "INEXACT_NUMBER"),
        ]
    );

    let stream = repo.get_aggregate_stream(a, &StreamOptions::default()).await.unwrap();
    let versions: Vec<i32> = stream.iter().map(|e| e.version).collect();
    assert_eq!(versions, vec![1, 2, 3, 4, 5, 6, 7]);
    let legacy_ids: Vec<Value> = stream[2..]
        .iter()
        .map(|e| e.metadata.as_ref().unwrap()["legacyId"].clone())
        .collect();
    assert_eq!(
        legacy_ids,
        vec![json!(a3), json!(shared), json!(a4), json!(a5), json!(a6)]
    );
    assert_eq!(stream[3].event_type, "relation.created");
    assert_eq!(stream[3].aggregate_type, AggregateType::Entity);
    let e3 = &stream[2];
    assert_eq!(e3.timestamp, at(2, 0));
    assert_eq!(e3.user_id, "u1");
    assert_eq!(e3.source.as_str(), "migration");
    assert_eq!(e3.correlation_id, Some(Uuid::from_u128(7)));
    assert_eq!(e3.data, json!({"entityId": a, "n": 3}));
    assert_eq!(e3.metadata.as_ref().unwrap()["legacySource"], json!("web"));
    assert_eq!(repo.get_aggregate_version(a).await.unwrap(), Some(7));

    let b_stream = repo.get_aggregate_stream(b, &StreamOptions::default()).await.unwrap();
    assert_eq!(
        b_stream
            .iter()
            .map(|e| (e.version, e.event_type.as_str()))
            .collect::<Vec<_>>(),
        vec![(1, "relation.created"), (2, "relation.linked")]
    );
    assert_eq!(b_stream[0].aggregate_type, AggregateType::Relation);
    let own_stream = repo.get_aggregate_stream(own, &StreamOptions::default()).await.unwrap();
    assert_eq!(own_stream.len(), 1);
    assert_eq!(own_stream[0].aggregate_type, AggregateType::Entity);

    // Historical days got their own partitions instead of the default one.
    if !common::timescaledb() {
        let in_default: i64 = c
            .query_one("SELECT count(*) FROM events_v2_default WHERE source = 'migration'", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(in_default, 0);
    }

    // Dirty days are marked as the repository does, so the incremental refresh sees them.
    let days = repo.refresh_analytics(false).await.unwrap();
    assert_eq!(days, 5, "Mar 1-5");

    // A second run without resume refuses; with resume it copies nothing again.
    let err = repo.migrate_legacy_events(&opts(2), &mut |_| {}).await.unwrap_err();
    assert_eq!(err.code(), "LEGACY_MIGRATION_STARTED");
    let again = migrate(
        &repo,
        &LegacyMigrationOptions {
            resume: true,
            ..opts(2)
        },
    )
    .await;
    assert_eq!((again.pending_at_start, again.migrated, again.failed), (0, 0, 0));
    assert_eq!((again.previously_migrated, again.previously_failed), (8, 4));
    assert_eq!(common::count_rows(&repo).await.0, 10);

    // Verify names the failed rows; once they are deleted from the legacy table it passes.
    let v = repo.verify_legacy("events").await.unwrap();
    assert!(!v.ok);
    assert_eq!(v.failed_count, 4);
    assert_eq!((v.missing_count, v.mismatched_count), (0, 0));
    assert_eq!(v.count_differences_count, 0);
    c.execute(
        "DELETE FROM events WHERE id = ANY ($1)",
        &[&vec![bad_data, bad_type, bad_user, inexact]],
    )
    .await
    .unwrap();
    let v = repo.verify_legacy("events").await.unwrap();
    assert!(v.ok, "{v:#?}");
    assert_eq!((v.legacy_rows, v.migrated_rows), (8, 8));
    assert_eq!(v.legacy_checksum, v.events_checksum);

    // A changed event and a legacy row that never went over are both named.
    c.execute(
        "UPDATE events_v2 SET data = '{\"n\": 99}' WHERE metadata->>'legacyId' = $1",
        &[&a5.to_string()],
    )
    .await
    .unwrap();
    let late = Uuid::from_u128(0x999);
    insert_legacy(&c, late, "u9", at(6, 0), "entity.created", json!({})).await;
    let v = repo.verify_legacy("events").await.unwrap();
    assert!(!v.ok);
    assert_eq!(v.missing, vec![late]);
    assert_eq!(v.mismatched.len(), 1);
    assert_eq!(v.mismatched[0].legacy_id, a5);
    assert_eq!(v.mismatched[0].fields, vec!["data".to_owned()]);
    assert_ne!(v.legacy_checksum, v.events_checksum);
    let diffs: Vec<(&str, &str, i64, i64)> = v
        .count_differences
        .iter()
        .map(|d| {
            (
                d.user_id.as_deref().unwrap(),
                d.event_type.as_deref().unwrap(),
                d.legacy,
                d.events_v2,
            )
        })
        .collect();
    assert_eq!(diffs, vec![("u9", "entity.created", 1, 0)]);

    // Dropping needs the confirmation and a clean verify.
    assert_eq!(
        repo.drop_legacy_table("events", false, false).await.unwrap_err().code(),
        "CONFIRMATION_REQUIRED"
    );
    assert_eq!(
        repo.drop_legacy_table("events", true, false).await.unwrap_err().code(),
        "VERIFY_FAILED"
    );
    c.execute(
        "UPDATE events_v2 SET data = '{\"entityId\": \"00000000-0000-0000-0000-00000000000a\", \"n\": 5}' \
         WHERE metadata->>'legacyId' = $1",
        &[&a5.to_string()],
    )
    .await
    .unwrap();
    migrate(
        &repo,
        &LegacyMigrationOptions {
            resume: true,
            ..opts(2)
        },
    )
    .await;
    let dropped = repo.drop_legacy_table("events", true, false).await.unwrap();
    assert!(dropped.dropped && dropped.verify.ok);
    let gone: bool = c
        .query_one("SELECT to_regclass('events') IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(gone);
    assert_eq!(
        repo.verify_legacy("events").await.unwrap_err().code(),
        "LEGACY_TABLE_NOT_FOUND"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_invalid_fail_stops_before_the_bad_row_and_resume_goes_on_in_order() {
    let repo = common::repo("legacy_fail").await;
    let c = common::sql(&repo).await;
    c.batch_execute(&LEGACY_DDL.replace("CREATE TABLE events", "CREATE TABLE old_events"))
        .await
        .unwrap();
    let agg = Uuid::from_u128(0xCC);
    for i in 0..6u32 {
        let ty = if i == 3 { "BROKEN" } else { "entity.updated" };
        c.execute(
            "INSERT INTO old_events (id, user_id, \"timestamp\", type, data) VALUES ($1, 'u', $2, $3, $4)",
            &[
                &Uuid::from_u128(100 + u128::from(i)),
                &at(1, i),
                &ty,
                &json!({"entityId": agg, "i": i}),
            ],
        )
        .await
        .unwrap();
    }
    let options = LegacyMigrationOptions {
        legacy_table: "old_events".into(),
        on_invalid: OnInvalid::Fail,
        ..opts(2)
    };
    let report = migrate(&repo, &options).await;
    assert!(report.stopped_on_invalid);
    assert_eq!((report.migrated, report.failed, report.remaining), (3, 1, 3));
    assert_eq!(report.failures[0].legacy_id, Uuid::from_u128(103));
    assert_eq!(repo.get_aggregate_version(agg).await.unwrap(), Some(3));

    c.execute(
        "UPDATE old_events SET type = 'entity.fixed' WHERE id = $1",
        &[&Uuid::from_u128(103)],
    )
    .await
    .unwrap();
    let resumed = migrate(
        &repo,
        &LegacyMigrationOptions {
            resume: true,
            ..options.clone()
        },
    )
    .await;
    assert_eq!((resumed.migrated, resumed.failed, resumed.remaining), (3, 0, 0));
    let stream = repo.get_aggregate_stream(agg, &StreamOptions::default()).await.unwrap();
    let order: Vec<(i32, i64)> = stream
        .iter()
        .map(|e| (e.version, e.data["i"].as_i64().unwrap()))
        .collect();
    assert_eq!(order, (1..=6).map(|v| (v, i64::from(v) - 1)).collect::<Vec<_>>());
    assert!(repo.verify_legacy("old_events").await.unwrap().ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_table_names_and_missing_tables_are_refused() {
    let repo = common::repo("legacy_names").await;
    let err = repo
        .migrate_legacy_events(
            &LegacyMigrationOptions {
                legacy_table: "events; DROP TABLE events_v2".into(),
                ..Default::default()
            },
            &mut |_| {},
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), "INVALID_CONFIG");
    let err = repo
        .migrate_legacy_events(&LegacyMigrationOptions::default(), &mut |_| {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), "LEGACY_TABLE_NOT_FOUND");

    let mut config = common::config(repo.config().schema.as_deref().unwrap());
    config.dual_write_legacy_table = Some("events\"; DROP TABLE x; --".into());
    assert_eq!(EventRepository::new(config).unwrap_err().code(), "INVALID_CONFIG");
}

/// Tables with looser constraints than the design's: what the migration cannot key or read back
/// is refused up front (ids) or failed row by row (timestamps), never a crash; column types are
/// matched exactly, with or without a modifier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loose_legacy_tables_are_refused_or_failed_row_by_row() {
    let repo = common::repo("legacy_loose").await;
    let c = common::sql(&repo).await;
    let loose = "CREATE TABLE events (
        id uuid, user_id text, \"timestamp\" timestamptz(3), type varchar(64), data jsonb, source text,
        correlation_id uuid)";
    c.batch_execute(loose).await.unwrap();
    let row = |id: &str, ts: &str| {
        format!("INSERT INTO events VALUES ({id}, 'u', '{ts}', 'entity.updated', '{{}}', 'web', NULL)")
    };
    // No id: nothing to key the row by.
    let (err, verify) = refusal(&repo, &c, row("NULL", "2024-03-01 10:00:00+00")).await;
    assert_eq!((err.code(), verify.code()), ("INVALID_CONFIG", "INVALID_CONFIG"));
    assert!(err.to_string().contains("1 row(s) have no id"), "{err}");
    // A repeated id, in one round or in two.
    let twice = Uuid::from_u128(0xD0);
    let sql = [
        row(&format!("'{twice}'"), "2024-03-01 10:00:00+00"),
        row(&format!("'{twice}'"), "2024-03-02 10:00:00+00"),
    ]
    .join(";");
    let (err, _) = refusal(&repo, &c, sql).await;
    assert_eq!(err.code(), "INVALID_CONFIG");
    assert!(err.to_string().contains(&twice.to_string()), "{err}");
    let written: i64 = c.query_one("SELECT count(*) FROM events_v2", &[]).await.unwrap().get(0);
    assert_eq!(written, 0, "nothing written");

    // Timestamps that could not be read back are failures of their rows; the others migrate.
    c.batch_execute("TRUNCATE events").await.unwrap();
    let ids: Vec<Uuid> = (1..=6).map(|i| Uuid::from_u128(0xE0 + i)).collect();
    for (id, ts) in ids.iter().zip([
        "infinity",
        "-infinity",
        "262142-12-31 23:59:59.999999+00",
        "2024-03-01 10:00:00+00",
        "262142-12-31 23:59:59.999+00",
        "262143-01-01 00:00:00+00",
    ]) {
        c.batch_execute(&row(&format!("'{id}'"), ts)).await.unwrap();
    }
    for dry_run in [true, false] {
        let report = migrate(&repo, &LegacyMigrationOptions { dry_run, ..opts(2) }).await;
        assert_eq!((report.migrated, report.failed), (2, 4), "dry run {dry_run}");
        let failed = failure_codes(&report);
        let expected: Vec<(Uuid, &str)> = [0, 1, 2, 5].iter().map(|&i| (ids[i], "INVALID_TIMESTAMP")).collect();
        assert_eq!(failed, expected);
    }
    let last = repo
        .get_aggregate_stream(ids[4], &StreamOptions::default())
        .await
        .unwrap();
    assert_eq!(
        last[0].timestamp.to_rfc3339(),
        "+262142-12-31T23:59:59.999+00:00",
        "the last readable instant reads back"
    );
    let v = repo.verify_legacy("events").await.unwrap();
    assert_eq!((v.migrated_rows, v.failed_count), (2, 4));
    // The feed reads the last day up to the end of time. It hands an event out only once the
    // server's horizon has passed its transaction, and another test's open transaction holds the
    // horizon back (on Citus a schema migration runs for seconds).
    let txid: String = c
        .query_one("SELECT txid::text FROM events_v2 WHERE id = $1", &[&last[0].id])
        .await
        .unwrap()
        .get(0);
    let waited = std::time::Instant::now();
    loop {
        let past: bool = c
            .query_one(
                "SELECT pg_snapshot_xmin(pg_current_snapshot()) > $1::text::xid8",
                &[&txid],
            )
            .await
            .unwrap()
            .get(0);
        if past {
            break;
        }
        assert!(
            waited.elapsed() < std::time::Duration::from_secs(300),
            "the horizon stayed at or below {txid}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Read from the start until it comes (on Citus a read also waits for the workers to settle
    // a two-phase commit; a page can end early meanwhile), for at most 30 s more.
    let mut fed = Vec::new();
    let read_from = std::time::Instant::now();
    while !fed.contains(&last[0].id) && read_from.elapsed() < std::time::Duration::from_secs(30) {
        fed.clear();
        let mut after = None;
        loop {
            let page = repo.read_all(after.as_ref(), 100).await.unwrap();
            if page.events.is_empty() {
                break;
            }
            fed.extend(page.events.iter().map(|e| e.id));
            after = Some(page.checkpoint);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        fed.contains(&last[0].id),
        "the feed has the last readable instant: {fed:?}"
    );

    // An array is not its element type.
    c.batch_execute("DROP TABLE events; CREATE TABLE events (id uuid PRIMARY KEY, user_id text, \"timestamp\" timestamptz, type text, data jsonb, source text, correlation_id uuid[])").await.unwrap();
    let err = repo.migrate_legacy_events(&opts(10), &mut |_| {}).await.unwrap_err();
    assert_eq!(err.code(), "INVALID_CONFIG");
    assert!(err.to_string().contains("correlation_id is uuid[]"), "{err}");
}

/// The errors of a migration and of `verify` over a legacy table holding just `rows`.
async fn refusal(
    repo: &EventRepository,
    c: &tokio_postgres::Client,
    rows: String,
) -> (synap_events::Error, synap_events::Error) {
    c.batch_execute(&format!("TRUNCATE events; {rows}")).await.unwrap();
    let err = repo.migrate_legacy_events(&opts(10), &mut |_| {}).await.unwrap_err();
    (err, repo.verify_legacy("events").await.unwrap_err())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_write_writes_both_tables_atomically() {
    let base = common::repo("legacy_dual").await;
    let c = common::sql(&base).await;
    // The CHECK lets the legacy insert fail after the event insert in the same statement.
    c.batch_execute(&LEGACY_DDL.replace(
        "correlation_id uuid)",
        "correlation_id uuid, CHECK (type <> 'entity.rejected'))",
    ))
    .await
    .unwrap();
    let mut config = base.config().clone();
    config.dual_write_legacy_table = Some("events".into());
    let repo = EventRepository::new(config).unwrap();
    // Dual-write waits for the legacy history to be migrated once.
    let early = NewEvent::new(
        Uuid::now_v7(),
        AggregateType::Entity,
        "entity.created",
        "u1",
        json!({}),
        1,
    );
    assert_eq!(repo.append(early).await.unwrap_err().code(), "LEGACY_HISTORY_PENDING");
    assert_eq!(common::count_rows(&base).await, (0, 0));
    migrate(&base, &opts(10)).await;

    let a = Uuid::now_v7();
    let mut first = NewEvent::new(a, AggregateType::Entity, "entity.created", "u1", json!({"t": 1}), 1);
    first.correlation_id = Some(Uuid::from_u128(5));
    let stored = repo.append(first).await.unwrap();
    let batch = repo
        .append_batch(vec![
            NewEvent::new(a, AggregateType::Entity, "entity.updated", "u1", json!({"t": 2}), 2),
            NewEvent::new(a, AggregateType::Entity, "entity.updated", "u1", json!({"t": 3}), 3),
        ])
        .await
        .unwrap();
    let row = c
        .query_one(
            "SELECT user_id, \"timestamp\", type, data, source, correlation_id FROM events WHERE id = $1",
            &[&stored.id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "u1");
    assert_eq!(row.get::<_, DateTime<Utc>>(1), stored.timestamp);
    assert_eq!(row.get::<_, String>(2), "entity.created");
    assert_eq!(row.get::<_, Value>(3), json!({"t": 1}));
    assert_eq!(row.get::<_, String>(4), "api");
    assert_eq!(row.get::<_, Option<Uuid>>(5), Some(Uuid::from_u128(5)));
    for e in &batch {
        let n: i64 = c
            .query_one("SELECT count(*) FROM events WHERE id = $1", &[&e.id])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1);
    }
    let v = repo.verify_legacy("events").await.unwrap();
    assert!(v.ok, "{v:#?}");
    assert_eq!(v.dual_written_rows, 3);
    // The migration passes over dual-written rows.
    let report = repo
        .migrate_legacy_events(
            &LegacyMigrationOptions {
                resume: true,
                ..Default::default()
            },
            &mut |_| {},
        )
        .await
        .unwrap();
    assert_eq!(report.pending_at_start, 0);

    // The legacy insert fails: neither table, nor the stream, nor the map gets anything.
    let before = common::count_rows(&repo).await;
    let bad = NewEvent::new(a, AggregateType::Entity, "entity.rejected", "u1", json!({}), 4);
    assert_eq!(repo.append(bad.clone()).await.unwrap_err().code(), "DATABASE_ERROR");
    let other = NewEvent::new(
        Uuid::now_v7(),
        AggregateType::Entity,
        "entity.created",
        "u1",
        json!({}),
        1,
    );
    assert_eq!(
        repo.append_batch(vec![other, bad]).await.unwrap_err().code(),
        "DATABASE_ERROR"
    );
    assert_eq!(common::count_rows(&repo).await, before);
    let legacy: i64 = c.query_one("SELECT count(*) FROM events", &[]).await.unwrap().get(0);
    let mapped: i64 = c
        .query_one("SELECT count(*) FROM legacy_migration_map", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!((legacy, mapped), (3, 3));
    assert_eq!(repo.get_aggregate_version(a).await.unwrap(), Some(3));
    // A repository without dual-write leaves the legacy table alone.
    base.append(NewEvent::new(
        a,
        AggregateType::Entity,
        "entity.updated",
        "u1",
        json!({}),
        4,
    ))
    .await
    .unwrap();
    let legacy: i64 = c.query_one("SELECT count(*) FROM events", &[]).await.unwrap().get(0);
    assert_eq!(legacy, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_concurrent_migration_is_refused() {
    let repo = common::repo("legacy_busy").await;
    let c = common::sql(&repo).await;
    c.batch_execute(LEGACY_DDL).await.unwrap();
    c.batch_execute(
        "INSERT INTO events (id, user_id, \"timestamp\", type, data)
         SELECT gen_random_uuid(), 'u', now() - make_interval(secs => g), 'entity.created', '{}'
           FROM generate_series(1, 40) g",
    )
    .await
    .unwrap();
    let slow = LegacyMigrationOptions {
        // 20 batches of 200 ms: longer than the 0.5 s the second run waits for the lock.
        batch_delay: Some(std::time::Duration::from_millis(200)),
        ..opts(2)
    };
    let first = {
        let repo = repo.clone();
        tokio::spawn(async move { repo.migrate_legacy_events(&slow, &mut |_| {}).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    let err = repo
        .migrate_legacy_events(
            &LegacyMigrationOptions {
                resume: true,
                busy_timeout: std::time::Duration::from_millis(500),
                ..opts(5)
            },
            &mut |_| {},
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), "LEGACY_MIGRATION_BUSY");
    // It says what is true: which backend, whose, since when; the holder is alive (this process).
    let message = err.to_string();
    assert!(
        message.contains("backend ") && message.contains(&format!("pid={}", std::process::id())),
        "{message}"
    );
    let report = first.await.unwrap().unwrap();
    assert_eq!(report.migrated, 40);
}

/// One generated legacy row: its aggregate (an index into a few ids, or none: its own id), day,
/// second, and whether its type is bad.
#[derive(Debug, Clone)]
struct ModelRow {
    aggregate: Option<u8>,
    day: u32,
    second: u32,
    bad: bool,
}

/// The migration against a model, over random legacy tables, batch sizes and numbers of writers:
/// every valid row becomes exactly one event, each aggregate's versions go 1..n in (timestamp,
/// legacy id) order, bad rows are recorded, and the global feed read in small pages holds each
/// event once and nothing else (on TimescaleDB, no trace of the chunks made ahead).
#[test]
fn migration_against_a_model_with_several_writers() {
    use proptest::prelude::*;
    let (runtime, mut runner) = common::model_runner(10);
    let row = (
        prop::option::weighted(0.8, 0..5u8),
        1..7u32,
        0..3u32,
        prop::bool::weighted(0.1),
    )
        .prop_map(|(aggregate, day, second, bad)| ModelRow {
            aggregate,
            day,
            second,
            bad,
        });
    runner
        .run(
            &(prop::collection::vec(row, 1..60), 1..8usize, 1..5usize),
            |(rows, batch_size, writers)| {
                runtime.block_on(async {
                    let repo = common::repo("legacy_model").await;
                    let c = common::sql(&repo).await;
                    c.batch_execute(LEGACY_DDL).await.unwrap();
                    // (timestamp, legacy id, aggregate) of each valid row.
                    let mut valid = Vec::new();
                    for (i, r) in rows.iter().enumerate() {
                        let id = Uuid::from_u128(0x1000 + i as u128);
                        let data = match r.aggregate {
                            Some(a) => json!({"entityId": Uuid::from_u128(0xA0 + a as u128), "i": i}),
                            None => json!({"i": i}),
                        };
                        let kind = if r.bad { "Bad Type" } else { "entity.updated" };
                        insert_legacy(&c, id, "u1", at(r.day, r.second), kind, data).await;
                        if !r.bad {
                            let aggregate = r.aggregate.map_or(id, |a| Uuid::from_u128(0xA0 + a as u128));
                            valid.push((at(r.day, r.second), id, aggregate));
                        }
                    }
                    let report = migrate(
                        &repo,
                        &LegacyMigrationOptions {
                            writers,
                            ..opts(batch_size)
                        },
                    )
                    .await;
                    let bad = rows.iter().filter(|r| r.bad).count() as u64;
                    assert_eq!((report.migrated, report.failed), (valid.len() as u64, bad));
                    assert_eq!(report.remaining, 0);

                    // The model: per aggregate, versions in (timestamp, legacy id) order.
                    valid.sort();
                    let mut next: std::collections::HashMap<Uuid, i32> = Default::default();
                    let mut model: Vec<(Uuid, Uuid, i32)> = valid
                        .iter()
                        .map(|(_, id, aggregate)| {
                            let v = next.entry(*aggregate).or_insert(0);
                            *v += 1;
                            (*id, *aggregate, *v)
                        })
                        .collect();
                    model.sort();
                    let mut stored: Vec<(Uuid, Uuid, i32)> = c
                        .query(
                            "SELECT (metadata->>'legacyId')::uuid, aggregate_id, version FROM events_v2",
                            &[],
                        )
                        .await
                        .unwrap()
                        .iter()
                        .map(|r| (r.get(0), r.get(1), r.get(2)))
                        .collect();
                    stored.sort();
                    assert_eq!(stored, model, "batch {batch_size}, writers {writers}");
                    for (aggregate, n) in &next {
                        assert_eq!(repo.get_aggregate_version(*aggregate).await.unwrap(), Some(*n));
                    }

                    // The feed, in pages of 3: every event once, nothing else. (A page stops
                    // below the oldest transaction still open on the server, which another test
                    // may hold for a while: read on until every event came, then once more.)
                    let mut seen = Vec::new();
                    let mut checkpoint = None;
                    let started = std::time::Instant::now();
                    loop {
                        let page = repo.read_all(checkpoint.as_ref(), 3).await.unwrap();
                        seen.extend(
                            page.events
                                .iter()
                                .map(|e| e.metadata.as_ref().unwrap()["legacyId"].clone()),
                        );
                        checkpoint = Some(page.checkpoint);
                        if page.events.is_empty() {
                            if seen.len() >= model.len() {
                                break;
                            }
                            assert!(started.elapsed().as_secs() < 60, "the feed stalled at {seen:?}");
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        }
                    }
                    let mut expected: Vec<Value> = model.iter().map(|(id, _, _)| json!(id.to_string())).collect();
                    expected.sort_by_key(|v| v.to_string());
                    seen.sort_by_key(|v| v.to_string());
                    assert_eq!(seen, expected);
                    let placeholders: i64 = c
                        .query_one("SELECT count(*) FROM events_v2 WHERE user_id LIKE 'synap:%'", &[])
                        .await
                        .unwrap()
                        .get(0);
                    assert_eq!(placeholders, 0);
                    let verify = repo.verify_legacy("events").await.unwrap();
                    assert_eq!(verify.missing_count + verify.mismatched_count, 0);
                    Ok(())
                })
            },
        )
        .unwrap();
}

/// A round whose rows all belong to one aggregate goes to one writer, which still writes
/// batches of at most the batch size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_writers_share_is_written_in_batches_of_the_batch_size() {
    let repo = common::repo("legacy_share").await;
    let c = common::sql(&repo).await;
    c.batch_execute(LEGACY_DDL).await.unwrap();
    let a = Uuid::from_u128(0xA);
    for i in 0..10u32 {
        let data = json!({"entityId": a, "i": i});
        insert_legacy(
            &c,
            Uuid::from_u128(0x100 + i as u128),
            "u1",
            at(1, i),
            "entity.updated",
            data,
        )
        .await;
    }
    let report = migrate(&repo, &LegacyMigrationOptions { writers: 2, ..opts(3) }).await;
    // Rounds of 6 rows (3 per writer), all for one writer: 3 + 3, then 3 + 1.
    assert_eq!((report.migrated, report.batches), (10, 4));
    assert_eq!(repo.get_aggregate_version(a).await.unwrap(), Some(10));
}

/// A run with a limit makes the partitions (or chunks) of the days it writes, not of every
/// pending day.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_run_makes_only_its_days() {
    let repo = common::repo("legacy_limit_days").await;
    let c = common::sql(&repo).await;
    c.batch_execute(LEGACY_DDL).await.unwrap();
    for day in [1u32, 1, 26, 27] {
        let id = Uuid::now_v7();
        insert_legacy(&c, id, "u1", at(day, 0), "entity.updated", json!({})).await;
    }
    let report = migrate(
        &repo,
        &LegacyMigrationOptions {
            limit: Some(2),
            ..opts(5)
        },
    )
    .await;
    assert_eq!((report.migrated, report.remaining), (2, 2));
    let days_made = |day: &'static str| {
        let c = &c;
        async move {
            let sql = if common::timescaledb() {
                format!(
                    "SELECT count(*) FROM timescaledb_information.chunks
                      WHERE hypertable_schema = current_schema() AND hypertable_name = 'events_v2'
                        AND range_start <= '{day} 12:00+00' AND range_end > '{day} 12:00+00'"
                )
            } else {
                format!(
                    "SELECT count(*) FROM pg_class WHERE relnamespace = current_schema()::regnamespace
                        AND relname = 'events_v2_p{}'",
                    day.replace('-', "")
                )
            };
            c.query_one(sql.as_str(), &[]).await.unwrap().get::<_, i64>(0)
        }
    };
    assert_eq!(days_made("2024-03-01").await, 1);
    assert_eq!(days_made("2024-03-26").await, 0, "a day this run does not write");
    let rest = migrate(
        &repo,
        &LegacyMigrationOptions {
            resume: true,
            ..opts(5)
        },
    )
    .await;
    assert_eq!(rest.migrated, 2);
    assert_eq!(days_made("2024-03-26").await, 1);
}

/// The run's reader keeps no snapshot open between batches (a snapshot held for the whole run kept
/// PostgreSQL from pruning the old versions of the stream rows the run updates): it reads through
/// a cursor that outlived the transaction that opened it. It holds the writers' lock, as the
/// writers do: it records the run's progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reader_holds_no_snapshot_between_batches() {
    let repo = common::repo("legacy_no_snapshot").await;
    let c = common::sql(&repo).await;
    c.batch_execute(LEGACY_DDL).await.unwrap();
    for i in 0..40u32 {
        let data = json!({"entityId": Uuid::from_u128(0xB + (i % 4) as u128), "i": i});
        insert_legacy(&c, Uuid::now_v7(), "u1", at(1, i), "entity.updated", data).await;
    }
    let options = LegacyMigrationOptions {
        batch_delay: Some(std::time::Duration::from_millis(40)),
        writers: 1,
        ..opts(2)
    };
    let run = tokio::spawn({
        let repo = repo.clone();
        async move { migrate(&repo, &options).await }
    });
    let mut seen = Vec::new();
    while !run.is_finished() {
        for row in c
            .query(
                "SELECT state, backend_xmin IS NULL,
                        EXISTS (SELECT 1 FROM pg_locks l
                                 WHERE l.pid = a.pid AND l.locktype = 'advisory' AND l.mode = 'ShareLock')
                   FROM pg_stat_activity a
                  WHERE query LIKE 'FETCH FORWARD % FROM synap_legacy_rows' AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
        {
            seen.push((row.get::<_, Option<String>>(0), row.get::<_, bool>(1)));
            // It records the run's progress, so a later run waits for it as for a writer.
            assert!(row.get::<_, bool>(2), "the reader does not hold the writers' lock");
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(run.await.unwrap().migrated, 40);
    assert!(
        seen.iter().any(|(state, _)| state.as_deref() == Some("idle")),
        "{seen:?}"
    );
    for (state, no_xmin) in &seen {
        assert_ne!(state.as_deref(), Some("idle in transaction"), "{seen:?}");
        if state.as_deref() == Some("idle") {
            assert!(no_xmin, "an idle reader with a snapshot: {seen:?}");
        }
    }
}
