//! Retention by dropping whole native daily partitions or TimescaleDB chunks, against a real
//! PostgreSQL (DATABASE_URL), in this pass's storage mode.

mod common;

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use serde_json::json;
use synap_events::{
    AggregateType, Bookkeeping, EventRepository, FoldOptions, NewEvent, RetentionOptions, StreamOptions,
};
use uuid::Uuid;

fn at(month: u32, day: u32) -> DateTime<Utc> {
    let year = if month == 12 { 2023 } else { 2024 };
    Utc.with_ymd_and_hms(year, month, day, 12, 0, 0).unwrap()
}

async fn put(repo: &EventRepository, aggregate: Uuid, version: i32, ts: DateTime<Utc>) {
    put_typed(repo, aggregate, version, ts, "entity.updated").await;
}

async fn put_typed(repo: &EventRepository, aggregate: Uuid, version: i32, ts: DateTime<Utc>, event_type: &str) {
    let mut e = NewEvent::new(
        aggregate,
        AggregateType::Entity,
        event_type,
        "u1",
        json!({ format!("v{version}"): version, "last": version }),
        version,
    );
    e.timestamp = Some(ts);
    repo.append(e).await.unwrap();
}

async fn state(repo: &EventRepository, aggregate: Uuid) -> synap_events::FoldResult {
    repo.replay(aggregate, &FoldOptions::default()).await.unwrap().result
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
async fn drops_whole_partitions_and_keeps_every_live_aggregate_whole() {
    let repo = common::repo("retention").await;
    let c = common::sql(&repo).await;
    let ts = common::timescaledb();
    let jan = |d| NaiveDate::from_ymd_opt(2024, 1, d).unwrap();
    // Native: twenty daily partitions; TimescaleDB makes a chunk per day with events.
    assert_eq!(
        repo.ensure_partitions(jan(1), jan(20)).await.unwrap(),
        if ts { 0 } else { 20 }
    );

    let (x, y, z, w, d, g) = (
        Uuid::from_u128(1),
        Uuid::from_u128(2),
        Uuid::from_u128(3),
        Uuid::from_u128(4),
        Uuid::from_u128(5),
        Uuid::from_u128(6),
    );
    // X: live, every event before the cut-off. Y: events on both sides. Z: after it.
    put(&repo, x, 1, at(1, 2)).await;
    put(&repo, x, 2, at(1, 3)).await;
    put(&repo, y, 1, at(1, 5)).await;
    put(&repo, y, 2, at(1, 15)).await;
    put(&repo, z, 1, at(1, 12)).await;
    // W: live, in December, which has no partition: it lands in events_v2_default.
    put(&repo, w, 1, at(12, 20)).await;
    // D: deleted before the cut-off.
    put_typed(&repo, d, 1, at(1, 4), "entity.created").await;
    put_typed(&repo, d, 2, at(1, 6), "entity.deleted").await;
    // G: a broken stream (its version 1 is gone), which no snapshot can stand for.
    put(&repo, g, 1, at(1, 7)).await;
    put(&repo, g, 2, at(1, 8)).await;
    c.execute("DELETE FROM events_v2 WHERE aggregate_id = $1 AND version = 1", &[&g])
        .await
        .unwrap();
    repo.refresh_analytics(true).await.unwrap();
    let before = common::count_rows(&repo).await;
    assert_eq!(before, (9, 6));
    let parts_before = partitions(&c).await;
    let states: Vec<_> = {
        let mut v = Vec::new();
        for a in [x, y, z, w] {
            v.push(state(&repo, a).await);
        }
        v
    };

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
    assert_eq!((dry.cut_through_count, dry.cut_through_sample.clone()), (1, vec![y]));
    assert_eq!(dry.rows, 7);
    assert_eq!(
        (dry.snapshots_stored, dry.streams_kept),
        (3, 2),
        "X, Y and W; X and W whole"
    );
    assert_eq!((dry.unfoldable_count, dry.unfoldable_sample.clone()), (1, vec![g]));
    assert_eq!(dry.streams_deleted, 1, "D");
    if ts {
        assert!(dry.targets.iter().all(|t| t.kind == "chunk"), "{:?}", dry.targets);
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
    let snapshots: i64 = c
        .query_one("SELECT count(*) FROM event_snapshots", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(snapshots, 0, "a dry run stores no snapshot");

    // G's history cannot be kept: refused unless forced, and nothing changes.
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
    let snapshots: i64 = c
        .query_one("SELECT count(*) FROM event_snapshots", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(snapshots, 0, "a refused run stores no snapshot");

    let done = repo
        .apply_retention(&RetentionOptions {
            cutoff,
            dry_run: false,
            force: true,
        })
        .await
        .unwrap();
    assert_eq!(done.rows, 7);
    assert_eq!((done.snapshots_stored, done.streams_kept), (3, 2));
    assert_eq!(
        (done.streams_deleted, done.streams_trimmed),
        (2, 1),
        "D and G go; Y is trimmed"
    );
    assert_eq!(done.daily_rows_deleted, 7, "Dec 20, Jan 2, 3, 4, 5, 6 and 8");
    assert_eq!(
        common::count_rows(&repo).await,
        (2, 4),
        "Y v2 and Z; X, Y, Z and W stay"
    );
    let left = partitions(&c).await;
    if !ts {
        assert!(left.contains(&"events_v2_default".to_owned()));
        assert!(left.contains(&"events_v2_p20240110".to_owned()));
        assert!(
            !left
                .iter()
                .any(|p| p.as_str() < "events_v2_p20240110" && p.starts_with("events_v2_p")),
            "{left:?}"
        );
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

    // Every live aggregate replays to exactly the state it had; D and G are gone.
    for (a, expected) in [x, y, z, w].into_iter().zip(&states) {
        assert_eq!(&state(&repo, a).await, expected, "{a}");
    }
    assert_eq!(repo.get_aggregate_version(d).await.unwrap(), None);
    assert_eq!(repo.get_aggregate_version(g).await.unwrap(), None);
    assert_eq!(repo.get_aggregate_version(x).await.unwrap(), Some(2));
    // Reads of removed versions say so; reads after the snapshot work.
    let err = repo
        .get_aggregate_stream(y, &StreamOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), "HISTORY_REMOVED");
    assert_eq!(err.details()["retainedFrom"], 2);
    let stream = repo
        .get_aggregate_stream(
            y,
            &StreamOptions {
                from_version: Some(1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(stream.iter().map(|e| e.version).collect::<Vec<_>>(), vec![2]);
    let x_rest = repo
        .get_aggregate_stream(
            x,
            &StreamOptions {
                from_version: Some(2),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(x_rest.is_empty());
    // A replay that needs removed versions (another fold's rules, or before the snapshot) says so.
    let other_rules = FoldOptions {
        bookkeeping: Bookkeeping {
            ignore_keys: vec![],
            drop_previous_companions: false,
        },
        ..Default::default()
    };
    assert_eq!(
        repo.replay(y, &other_rules).await.unwrap_err().code(),
        "HISTORY_REMOVED"
    );
    let at_one = repo
        .replay(
            y,
            &FoldOptions {
                to_version: Some(1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((at_one.result.version, at_one.snapshot_version), (1, Some(1)));
    // The browser's path: the snapshot and the events after it.
    let st = repo.get_snapshot_and_tail(y).await.unwrap();
    assert_eq!(st.snapshot.as_ref().map(|s| s.version), Some(1));
    assert_eq!(st.events.iter().map(|e| e.version).collect::<Vec<_>>(), vec![2]);

    // Appends go on after the snapshot, and a later retention builds on it.
    put(&repo, y, 3, at(1, 16)).await;
    put(&repo, x, 3, at(1, 11)).await;
    let x_before = state(&repo, x).await;
    assert_eq!(x_before.version, 3);
    let later = repo
        .apply_retention(&RetentionOptions {
            cutoff: Utc.with_ymd_and_hms(2024, 1, 14, 0, 0, 0).unwrap(),
            dry_run: false,
            force: false,
        })
        .await
        .unwrap();
    assert_eq!(
        (later.rows, later.snapshots_stored, later.streams_kept),
        (2, 2, 2),
        "X v3 and Z"
    );
    assert_eq!(state(&repo, x).await, x_before);
    assert_eq!(state(&repo, z).await, states[2]);
    assert_eq!(common::count_rows(&repo).await, (2, 4), "Y v2 and v3");

    let old_days: i64 = c
        .query_one(
            "SELECT (SELECT count(*) FROM events_daily WHERE day < '2024-01-14')
                  + (SELECT count(*) FROM events_daily_dirty WHERE day < '2024-01-14')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(old_days, 0);

    // Nothing older is left: the same cut-off again finds nothing.
    let again = repo
        .apply_retention(&RetentionOptions {
            cutoff: Utc.with_ymd_and_hms(2024, 1, 14, 0, 0, 0).unwrap(),
            dry_run: false,
            force: false,
        })
        .await
        .unwrap();
    assert_eq!((again.rows, again.targets.len(), again.snapshots_stored), (0, 0, 0));
}

/// Snapshots stored before retention by `snapshot()` (at exactly the last version before the
/// cut-off) are reused, and the removed history is still said; a forced drop past a broken
/// stream says it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_stored_before_retention_still_mark_the_removed_history() {
    let repo = common::repo("retention_pre").await;
    let c = common::sql(&repo).await;
    let jan = |d| NaiveDate::from_ymd_opt(2024, 1, d).unwrap();
    repo.ensure_partitions(jan(1), jan(20)).await.unwrap();
    let (a, b, g) = (Uuid::from_u128(11), Uuid::from_u128(12), Uuid::from_u128(13));
    // A: versions 1-3 before the cut-off, a snapshot at 3, version 4 after it.
    put(&repo, a, 1, at(1, 2)).await;
    put(&repo, a, 2, at(1, 3)).await;
    put(&repo, a, 3, at(1, 4)).await;
    assert!(repo.snapshot(a).await.unwrap().snapshot_stored);
    put(&repo, a, 4, at(1, 15)).await;
    // B: every event before the cut-off, a snapshot at its last version.
    put(&repo, b, 1, at(1, 2)).await;
    put(&repo, b, 2, at(1, 3)).await;
    assert!(repo.snapshot(b).await.unwrap().snapshot_stored);
    // G: broken (its version 1 deleted), events on both sides of the cut-off.
    put(&repo, g, 1, at(1, 5)).await;
    put(&repo, g, 2, at(1, 6)).await;
    put(&repo, g, 3, at(1, 16)).await;
    c.execute("DELETE FROM events_v2 WHERE aggregate_id = $1 AND version = 1", &[&g])
        .await
        .unwrap();
    let (a_before, b_before) = (state(&repo, a).await, state(&repo, b).await);
    let to = |v| FoldOptions {
        to_version: Some(v),
        ..Default::default()
    };
    let a_at_3 = repo.replay(a, &to(3)).await.unwrap().result;

    let done = repo
        .apply_retention(&RetentionOptions {
            cutoff: Utc.with_ymd_and_hms(2024, 1, 10, 0, 0, 0).unwrap(),
            dry_run: false,
            force: true,
        })
        .await
        .unwrap();
    assert_eq!(done.snapshots_stored, 0, "A's and B's were stored already");
    assert_eq!((done.unfoldable_count, done.unfoldable_sample.clone()), (1, vec![g]));
    assert_eq!(state(&repo, a).await, a_before);
    assert_eq!(state(&repo, b).await, b_before);

    // The start of each stream is gone: said, not a partial or empty list.
    for (id, retained_from) in [(a, 4), (b, 3), (g, 3)] {
        let err = repo
            .get_aggregate_stream(id, &StreamOptions::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), "HISTORY_REMOVED", "{id}: {err}");
        assert_eq!(err.details()["retainedFrom"], retained_from, "{id}");
        assert_eq!(err.details()["snapshotVersion"], retained_from - 1, "{id}");
    }
    let rest = repo
        .get_aggregate_stream(
            a,
            &StreamOptions {
                from_version: Some(3),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(rest.iter().map(|e| e.version).collect::<Vec<_>>(), vec![4]);
    // The snapshot at a target answers a replay to it; below it, the history is gone.
    let at_3 = repo.replay(a, &to(3)).await.unwrap();
    assert_eq!(
        (at_3.result, at_3.snapshot_version, at_3.events_folded),
        (a_at_3, Some(3), 0)
    );
    assert_eq!(repo.replay(a, &to(2)).await.unwrap_err().code(), "HISTORY_REMOVED");
    // G has no snapshot: its replay says its history was removed, rather than a version gap.
    assert_eq!(
        repo.replay(g, &FoldOptions::default()).await.unwrap_err().code(),
        "HISTORY_REMOVED"
    );
}

/// One aggregate of the retention model: its events' days (day 0 is Jan 1, 2024), whether its
/// last event deletes it, and the version after which `snapshot()` is called, if any.
#[derive(Debug, Clone)]
struct Stream {
    days: Vec<u32>,
    deleted: bool,
    snapshot_after: Option<usize>,
}

fn stream() -> impl proptest::strategy::Strategy<Value = Stream> {
    use proptest::prelude::*;
    (
        prop::collection::vec(0..7u32, 1..7),
        any::<bool>(),
        prop::option::of(0..7usize),
    )
        .prop_map(|(days, deleted, snapshot_after)| Stream {
            snapshot_after: snapshot_after.filter(|s| *s < days.len()),
            days,
            deleted,
        })
}

/// Model-based: random aggregates whose events fall on random days (not in version order),
/// random snapshots, a random cut-off. After retention, against the model (the fold of each whole
/// stream before the run): every replay is unchanged, except a deleted aggregate whose events
/// were all before the cut-off, which is gone; a stream read that reaches before the first kept
/// version fails with HISTORY_REMOVED, and one from it on returns exactly the kept events.
#[test]
fn retention_against_a_model_keeps_every_replay() {
    let (runtime, mut runner) = common::model_runner(12);
    let day = |d: u32| Utc.with_ymd_and_hms(2024, 1, 1 + d, 12, 0, 0).unwrap();
    runner
        .run(
            &(proptest::collection::vec(stream(), 1..6), 1..7u32),
            |(streams, cut)| {
                runtime.block_on(async {
                    let repo = common::repo("retention_model").await;
                    let jan = |d| NaiveDate::from_ymd_opt(2024, 1, d).unwrap();
                    repo.ensure_partitions(jan(1), jan(8)).await.unwrap();
                    let mut before = Vec::new();
                    for (n, s) in streams.iter().enumerate() {
                        let id = Uuid::from_u128(n as u128 + 1);
                        for (i, d) in s.days.iter().enumerate() {
                            let v = i as i32 + 1;
                            let kind = if v == 1 {
                                "entity.created"
                            } else if s.deleted && i + 1 == s.days.len() {
                                "entity.deleted"
                            } else {
                                "entity.updated"
                            };
                            put_typed(&repo, id, v, day(*d), kind).await;
                            if s.snapshot_after == Some(i) {
                                repo.snapshot(id).await.unwrap();
                            }
                        }
                        before.push((id, state(&repo, id).await));
                    }
                    let cutoff = Utc.with_ymd_and_hms(2024, 1, 1 + cut, 0, 0, 0).unwrap();
                    repo.apply_retention(&RetentionOptions {
                        cutoff,
                        dry_run: false,
                        force: false,
                    })
                    .await
                    .unwrap();
                    for (s, (id, model)) in streams.iter().zip(&before) {
                        let old: Vec<bool> = s.days.iter().map(|d| day(*d) < cutoff).collect();
                        // The last version before the cut-off, if any.
                        let d = old.iter().rposition(|o| *o).map(|i| i as i32 + 1);
                        // A one-event stream is only created (its first event creates it).
                        let deleted = s.deleted && s.days.len() > 1;
                        if old.iter().all(|o| *o) && deleted {
                            assert_eq!(repo.get_aggregate_version(*id).await.unwrap(), None, "{s:?}");
                            continue;
                        }
                        assert_eq!(&state(&repo, *id).await, model, "{s:?} cut {cut}");
                        let whole = repo.get_aggregate_stream(*id, &StreamOptions::default()).await;
                        let n = s.days.len() as i32;
                        match d {
                            None => assert_eq!(whole.unwrap().len() as i32, n, "{s:?}"),
                            Some(d) => {
                                let err = whole.unwrap_err();
                                assert_eq!(err.code(), "HISTORY_REMOVED", "{s:?} cut {cut}");
                                assert_eq!(err.details()["retainedFrom"], d + 1, "{s:?}");
                                let rest = repo
                                    .get_aggregate_stream(
                                        *id,
                                        &StreamOptions {
                                            from_version: Some(d),
                                            ..Default::default()
                                        },
                                    )
                                    .await
                                    .unwrap();
                                let versions: Vec<i32> = rest.iter().map(|e| e.version).collect();
                                assert_eq!(versions, ((d + 1)..=n).collect::<Vec<_>>(), "{s:?}");
                            }
                        }
                    }
                });
                Ok(())
            },
        )
        .unwrap();
}
