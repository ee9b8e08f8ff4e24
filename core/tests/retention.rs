//! Retention by dropping whole native daily partitions or TimescaleDB chunks, against a real
//! PostgreSQL (DATABASE_URL), in this pass's storage mode.

mod common;

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use serde_json::json;
use synap_events::{AggregateType, EventRepository, NewEvent, RetentionOptions, StreamOptions};
use uuid::Uuid;

fn at(month: u32, day: u32) -> DateTime<Utc> {
    let year = if month == 12 { 2023 } else { 2024 };
    Utc.with_ymd_and_hms(year, month, day, 12, 0, 0).unwrap()
}

async fn put(repo: &EventRepository, aggregate: Uuid, version: i32, ts: DateTime<Utc>) {
    let mut e = NewEvent::new(
        aggregate,
        AggregateType::Entity,
        "entity.updated",
        "u1",
        json!({}),
        version,
    );
    e.timestamp = Some(ts);
    repo.append(e).await.unwrap();
}

async fn partitions(c: &tokio_postgres::Client) -> Vec<String> {
    c.query(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
          WHERE i.inhparent = to_regclass('events_v2') ORDER BY 1",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drops_whole_daily_partitions_and_keeps_streams_consistent() {
    let repo = common::repo("retention").await;
    let c = common::sql(&repo).await;
    let ts = common::timescaledb();
    let jan = |d| NaiveDate::from_ymd_opt(2024, 1, d).unwrap();
    // Native: twenty daily partitions; TimescaleDB makes a chunk per day with events.
    assert_eq!(
        repo.ensure_partitions(jan(1), jan(20)).await.unwrap(),
        if ts { 0 } else { 20 }
    );

    let (x, y, z, w) = (
        Uuid::from_u128(1),
        Uuid::from_u128(2),
        Uuid::from_u128(3),
        Uuid::from_u128(4),
    );
    put(&repo, x, 1, at(1, 2)).await;
    put(&repo, x, 2, at(1, 3)).await;
    put(&repo, y, 1, at(1, 5)).await;
    put(&repo, y, 2, at(1, 15)).await;
    put(&repo, z, 1, at(1, 12)).await;
    // December has no partition: this one lands in events_v2_default.
    put(&repo, w, 1, at(12, 20)).await;
    repo.refresh_analytics(true).await.unwrap();
    let before = common::count_rows(&repo).await;
    assert_eq!(before, (6, 4));
    let parts_before = partitions(&c).await;

    // Mid-day cut-offs round down to midnight: Jan 10 00:00 UTC.
    let cutoff = Utc.with_ymd_and_hms(2024, 1, 10, 13, 0, 0).unwrap();
    let dry = repo
        .apply_retention(&RetentionOptions {
            cutoff,
            dry_run: true,
            force: false,
        })
        .await
        .unwrap();
    assert_eq!(dry.cutoff, Utc.with_ymd_and_hms(2024, 1, 10, 0, 0, 0).unwrap());
    assert_eq!(dry.storage_mode, common::storage_mode());
    assert_eq!(dry.cut_through_count, 1);
    assert_eq!(dry.cut_through_sample, vec![y]);
    assert_eq!(dry.rows, 4);
    assert_eq!(dry.streams_deleted, 2);
    if ts {
        // One chunk for each day before the cut-off that has events: Dec 20, Jan 2, 3 and 5.
        assert!(dry.targets.iter().all(|t| t.kind == "chunk"), "{:?}", dry.targets);
        let mut spans: Vec<_> = dry.targets.iter().map(|t| (t.from, t.rows)).collect();
        spans.sort();
        assert_eq!(
            spans,
            vec![
                (Some(at(12, 20)), 1),
                (Some(at(1, 2)), 1),
                (Some(at(1, 3)), 1),
                (Some(at(1, 5)), 1)
            ]
        );
    } else {
        let names: Vec<&str> = dry.targets.iter().map(|t| t.name.as_str()).collect();
        let mut expected = vec!["events_v2_default".to_owned()];
        expected.extend((1..=9).map(|d| format!("events_v2_p202401{d:02}")));
        assert_eq!(names, expected);
        assert_eq!(dry.targets[0].kind, "default_rows");
        assert_eq!((dry.targets[0].rows, dry.targets[0].from), (1, Some(at(12, 20))));
        assert_eq!(dry.targets[2].rows, 1, "Jan 2");
        assert_eq!(dry.targets[1].rows, 0, "Jan 1");
    }
    assert_eq!(common::count_rows(&repo).await, before, "a dry run changes nothing");
    assert_eq!(partitions(&c).await, parts_before);

    // Y has events on both sides: refused unless forced, and nothing changes.
    let err = repo
        .apply_retention(&RetentionOptions {
            cutoff,
            dry_run: false,
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), "RETENTION_REFUSED");
    assert!(err.to_string().contains("1 aggregate"), "{err}");
    assert_eq!(common::count_rows(&repo).await, before);
    assert_eq!(partitions(&c).await, parts_before);

    let done = repo
        .apply_retention(&RetentionOptions {
            cutoff,
            dry_run: false,
            force: true,
        })
        .await
        .unwrap();
    assert_eq!(done.rows, 4);
    assert_eq!((done.streams_deleted, done.streams_trimmed), (2, 1));
    assert_eq!(done.daily_rows_deleted, 4, "Dec 20, Jan 2, 3 and 5");
    assert_eq!(common::count_rows(&repo).await, (2, 2));
    let left = partitions(&c).await;
    if ts {
        assert_eq!(left.len(), parts_before.len() - 4, "four chunks dropped: {left:?}");
    } else {
        assert!(left.contains(&"events_v2_default".to_owned()));
        assert!(left.contains(&"events_v2_p20240110".to_owned()));
        assert!(
            !left
                .iter()
                .any(|p| p.as_str() < "events_v2_p20240110" && p.starts_with("events_v2_p")),
            "{left:?}"
        );
        let default_rows: i64 = c
            .query_one("SELECT count(*) FROM events_v2_default", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(default_rows, 0);
    }
    let older: i64 = c
        .query_one(
            "SELECT count(*) FROM events_v2 WHERE \"timestamp\" < '2024-01-10T00:00:00Z'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(older, 0);

    // Y keeps version 2, now its oldest event; X and W are gone.
    let (first, version): (DateTime<Utc>, i32) = {
        let r = c
            .query_one(
                "SELECT first_timestamp, version FROM event_streams WHERE aggregate_id = $1",
                &[&y],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((first, version), (at(1, 15), 2));
    let stream = repo.get_aggregate_stream(y, &StreamOptions::default()).await.unwrap();
    assert_eq!(stream.iter().map(|e| e.version).collect::<Vec<_>>(), vec![2]);
    assert_eq!(repo.get_aggregate_version(x).await.unwrap(), None);
    put(&repo, y, 3, at(1, 16)).await;

    let old_days: i64 = c
        .query_one(
            "SELECT (SELECT count(*) FROM events_daily WHERE day < '2024-01-10')
                  + (SELECT count(*) FROM events_daily_dirty WHERE day < '2024-01-10')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(old_days, 0);
    let kept: i64 = c
        .query_one("SELECT count(*) FROM events_daily WHERE day >= '2024-01-10'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 2, "Jan 12 and Jan 15 stay");

    // Nothing older is left: the same cut-off again finds nothing.
    let again = repo
        .apply_retention(&RetentionOptions {
            cutoff,
            dry_run: false,
            force: false,
        })
        .await
        .unwrap();
    assert_eq!((again.rows, again.targets.len(), again.cut_through_count), (0, 0, 0));
}
