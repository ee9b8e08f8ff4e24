//! Row-level security: a user-scoped handle, connected as an application role that neither owns
//! the tables nor bypasses RLS, reaches only its user's events and streams, by every method.

mod common;

use common::{app_role, drop_role, event, sql};
use serde_json::json;
use synap_events::{AggregateType, CountFilter, Error, EventRepository, NewEvent, StreamOptions, UserStreamOptions};
use uuid::Uuid;

fn owned_by(user: &str, aggregate: Uuid, version: i32, workflow: Uuid) -> NewEvent {
    let mut e = event(aggregate, version);
    e.user_id = user.into();
    e.correlation_id = Some(workflow);
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_handle_reaches_only_its_users_rows() {
    let owner = common::repo("rls").await;
    let (app, role) = app_role(&owner, "rls").await;
    let workflow = Uuid::now_v7();
    let a_agg = Uuid::now_v7();
    let b_agg = Uuid::now_v7();
    owner
        .append_batch(vec![
            owned_by("alice", a_agg, 1, workflow),
            owned_by("alice", a_agg, 2, workflow),
            owned_by("bob", b_agg, 1, workflow),
            owned_by("bob", b_agg, 2, workflow),
            owned_by("bob", b_agg, 3, workflow),
        ])
        .await
        .unwrap();

    let alice = app.for_user("alice").unwrap();
    assert_eq!(alice.scoped_user(), Some("alice"));

    // Reads: only alice's rows, by every method.
    assert_eq!(
        alice
            .get_aggregate_stream(a_agg, &StreamOptions::default())
            .await
            .unwrap()
            .len(),
        2
    );
    assert!(alice
        .get_aggregate_stream(b_agg, &StreamOptions::default())
        .await
        .unwrap()
        .is_empty());
    assert_eq!(alice.get_aggregate_version(b_agg).await.unwrap(), None);
    assert_eq!(alice.get_aggregate_version(a_agg).await.unwrap(), Some(2));
    let feed = alice
        .get_user_stream("bob", &UserStreamOptions::default())
        .await
        .unwrap();
    assert!(feed.is_empty());
    assert_eq!(
        alice
            .get_user_stream("alice", &UserStreamOptions::default())
            .await
            .unwrap()
            .len(),
        2
    );
    let wf = alice.get_correlated_events(workflow).await.unwrap();
    assert!(wf.iter().all(|e| e.user_id == "alice") && wf.len() == 2);
    assert_eq!(alice.count_events(&CountFilter::default()).await.unwrap(), 2);
    assert_eq!(
        alice
            .count_events(&CountFilter {
                user_id: Some("bob".into()),
                ..Default::default()
            })
            .await
            .unwrap(),
        0
    );
    let by_type = alice.get_events_by_type("entity.updated", 100).await.unwrap();
    assert!(by_type.iter().all(|e| e.user_id == "alice") && by_type.len() == 1);
    // The global feed shows only transactions below the cluster-wide horizon, which other tests'
    // open transactions can hold back for a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let page = loop {
        let page = alice.read_all(None, 100).await.unwrap();
        if page.events.len() >= 2 || std::time::Instant::now() > deadline {
            break page;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(page.events.len(), 2);
    assert!(page.events.iter().all(|e| e.user_id == "alice"));

    // Writes: not into bob's aggregate (at any version, refused as such), not as bob.
    let err = alice.append(owned_by("alice", b_agg, 4, workflow)).await.unwrap_err();
    assert_eq!(err.code(), "PERMISSION_DENIED", "{err:?}");
    let err = alice
        .append(owned_by("bob", Uuid::now_v7(), 1, workflow))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PermissionDenied { .. }), "{err:?}");
    let err = alice
        .append_batch(vec![
            owned_by("alice", Uuid::now_v7(), 1, workflow),
            owned_by("bob", Uuid::now_v7(), 1, workflow),
        ])
        .await
        .unwrap_err();
    assert_eq!(err.code(), "PERMISSION_DENIED", "{err:?}");
    let err = alice
        .append_batch(vec![owned_by("alice", b_agg, 4, workflow)])
        .await
        .unwrap_err();
    assert_eq!(err.code(), "PERMISSION_DENIED", "{err:?}");

    // Creating an aggregate that exists for another user: refused as such, not as a conflict
    // that a reload-and-retry loop could never resolve.
    let err = alice.append(owned_by("alice", b_agg, 1, workflow)).await.unwrap_err();
    assert_eq!(err.code(), "PERMISSION_DENIED", "{err:?}");
    let err = alice
        .append_batch(vec![
            owned_by("alice", Uuid::now_v7(), 1, workflow),
            owned_by("alice", b_agg, 1, workflow),
        ])
        .await
        .unwrap_err();
    assert_eq!(err.code(), "PERMISSION_DENIED", "{err:?}");
    // A scoped handle cannot be re-scoped, nor drive a store-wide named consumer.
    assert_eq!(alice.for_user("bob").unwrap_err().code(), "VALIDATION_FAILED");
    let err = alice
        .subscribe(synap_events::SubscribeOptions {
            consumer: Some("search".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), "PERMISSION_DENIED", "{err:?}");

    // Its own writes work.
    alice.append(owned_by("alice", a_agg, 3, workflow)).await.unwrap();

    // The application role without a user sees nothing; the owner sees everything.
    assert_eq!(app.count_events(&CountFilter::default()).await.unwrap(), 0);
    assert_eq!(owner.count_events(&CountFilter::default()).await.unwrap(), 6);
    assert_eq!(owner.get_aggregate_version(b_agg).await.unwrap(), Some(3));

    // Pooled connections do not keep the setting: an unscoped call on the same pool after
    // scoped ones still sees nothing.
    let bob = app.for_user("bob").unwrap();
    for _ in 0..5 {
        assert_eq!(bob.count_events(&CountFilter::default()).await.unwrap(), 3);
        assert_eq!(app.count_events(&CountFilter::default()).await.unwrap(), 0);
    }
    app.close();
    drop_role(&owner, &role).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn for_user_refuses_a_blank_user() {
    let owner = common::repo("rls_blank").await;
    assert_eq!(owner.for_user("  ").unwrap_err().code(), "VALIDATION_FAILED");
    let mut e = NewEvent::new(
        Uuid::now_v7(),
        AggregateType::Entity,
        "entity.created",
        "carol",
        json!({}),
        1,
    );
    e.user_id = "carol".into();
    owner.for_user("carol").unwrap().append(e).await.unwrap();
}

/// Every partition or chunk of events_v2, by name, as the owner sees them.
async fn children(owner: &EventRepository) -> Vec<String> {
    sql(owner)
        .await
        .query(
            "SELECT i.inhrelid::regclass::text FROM pg_inherits i WHERE i.inhparent = 'events_v2'::regclass",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_partition_or_chunk_opens_another_users_rows() {
    let owner = common::repo("rls_chunks").await;
    let schema = owner.config().schema.clone().unwrap();
    let day = |n: u64| {
        Some(
            (chrono::Utc::now().date_naive() - chrono::Days::new(n))
                .and_hms_opt(9, 0, 0)
                .unwrap()
                .and_utc(),
        )
    };
    let workflow = Uuid::now_v7();
    // Alice's events on three days, in partitions or chunks made before the role exists ...
    owner
        .ensure_partitions(
            chrono::Utc::now().date_naive() - chrono::Days::new(12),
            chrono::Utc::now().date_naive(),
        )
        .await
        .unwrap();
    let alice_agg = Uuid::now_v7();
    for (v, d) in [(1, 10), (2, 9), (3, 8)] {
        let mut e = owned_by("alice", alice_agg, v, workflow);
        e.timestamp = day(d);
        owner.append(e).await.unwrap();
    }
    let before = children(&owner).await.len();
    let (app, role) = app_role(&owner, "rls_chunks").await;
    // ... granted as the README says, and then as broadly as an administrator might.
    sql(&owner)
        .await
        .batch_execute(&format!(
            "GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA {schema} TO {role}"
        ))
        .await
        .unwrap();
    // Bob's events, written by the application role, on days that make new chunks (TimescaleDB)
    // or land in existing partitions (native), and on alice's days.
    let bob = app.for_user("bob").unwrap();
    let bob_agg = Uuid::now_v7();
    for (v, d) in [(1, 11), (2, 12), (3, 9)] {
        let mut e = owned_by("bob", bob_agg, v, workflow);
        e.timestamp = day(d);
        bob.append(e).await.unwrap();
    }
    let all = children(&owner).await;
    if common::timescaledb() {
        assert!(all.len() > before, "bob's days made chunks after the grant");
    }

    // The application role, as bob, names each partition or chunk directly.
    let c = common::connect(&app.config().database_url).await;
    c.batch_execute(&format!("SET search_path = {schema}")).await.unwrap();
    let mut readable = 0;
    for child in &all {
        for user in [Some("bob"), None] {
            c.batch_execute("BEGIN").await.unwrap();
            if let Some(user) = user {
                c.execute("SELECT set_config('app.current_user_id', $1, true)", &[&user])
                    .await
                    .unwrap();
            }
            match c.query(&format!("SELECT user_id FROM {child}"), &[]).await {
                Ok(rows) => {
                    readable += 1;
                    for r in rows {
                        let owner_of_row: String = r.get(0);
                        assert_eq!(Some(owner_of_row.as_str()), user, "{child} showed another user's row");
                    }
                }
                Err(e) => assert_eq!(Error::from(e).code(), "PERMISSION_DENIED", "{child}"),
            }
            c.batch_execute("ROLLBACK").await.unwrap();
        }
        // Writing alice's row straight into it (at a time inside it) is refused too.
        let inside: Option<chrono::DateTime<chrono::Utc>> = sql(&owner)
            .await
            .query_one(&format!("SELECT min(\"timestamp\") FROM {child}"), &[])
            .await
            .unwrap()
            .get(0);
        let Some(inside) = inside else { continue };
        c.batch_execute("BEGIN").await.unwrap();
        c.execute("SELECT set_config('app.current_user_id', 'bob', true)", &[])
            .await
            .unwrap();
        let write = c
            .execute(
                &format!(
                    "INSERT INTO {child} (\"timestamp\", aggregate_id, aggregate_type, event_type, user_id, data, version)
                     VALUES ($1, gen_random_uuid(), 'entity', 'entity.created', 'alice', '{{}}', 1)"
                ),
                &[&inside],
            )
            .await;
        c.batch_execute("ROLLBACK").await.unwrap();
        let err = write.expect_err(&format!("alice's row written into {child} as bob"));
        assert_eq!(Error::from(err).code(), "PERMISSION_DENIED", "{child}");
    }
    assert!(
        readable > 0,
        "the broad grant reached some partitions, and the policy held there"
    );
    assert_eq!(owner.count_events(&CountFilter::default()).await.unwrap(), 6);
    app.close();
    drop_role(&owner, &role).await;
}

/// The store's SECURITY DEFINER functions, each with what it does with the owner's rights and
/// why. A new one must be added here, after a look at what it lets a caller do.
fn definer_functions() -> Vec<(&'static str, &'static str)> {
    let mut list = vec![
        (
            "refresh_events_daily(boolean)",
            "recomputes events_daily from every user's rows (granted EXECUTE by the owner only)",
        ),
        (
            "synap_aggregate_exists(uuid)",
            "tells a scoped append whether an aggregate it cannot see exists (application roles)",
        ),
        (
            "synap_feed_days_secure()",
            "trigger: secures the chunk an application role's insert created",
        ),
        (
            "synap_feed_identity()",
            "reads the store's identity from synap_settings for checkpoints (application roles)",
        ),
        (
            "synap_feed_is_current()",
            "compares synap_settings with pg_control_system() (application roles)",
        ),
        (
            "synap_refuse_erased_users()",
            "trigger: reads synap_erasures, which no application role may read, to refuse appends of a user being erased",
        ),
        (
            "synap_secure_partitions()",
            "gives new partitions and chunks the user policy (owner only)",
        ),
        (
            "synap_stream_deleted(uuid)",
            "tells a failed append whether the stream it cannot see was deleted for good (application roles)",
        ),
    ];
    if common::citus() {
        list.push((
            "synap_feed_fence()",
            "asks the workers for prepared transactions (application roles)",
        ));
        list.sort();
    }
    list
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_definer_function_pins_its_search_path_and_is_not_public() {
    let owner = common::repo("definers").await;
    let schema = owner.config().schema.clone().unwrap();
    let (_app, role) = app_role(&owner, "definers").await;
    let rows = sql(&owner)
        .await
        .query(
            "SELECT p.oid::regprocedure::text, coalesce(p.proconfig, '{}'),
                    has_function_privilege('public', p.oid, 'EXECUTE'),
                    has_function_privilege($2, p.oid, 'EXECUTE')
               FROM pg_proc p
              WHERE p.pronamespace = $1::text::regnamespace AND p.prosecdef
              ORDER BY 1",
            &[&schema, &role],
        )
        .await
        .unwrap();
    let found: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let known = definer_functions();
    assert_eq!(
        found,
        known.iter().map(|(f, _)| f.to_string()).collect::<Vec<_>>(),
        "the store's SECURITY DEFINER functions"
    );
    let safe = format!("search_path=pg_catalog, {schema}, pg_temp");
    for r in &rows {
        let name: String = r.get(0);
        let config: Vec<String> = r.get(1);
        let paths: Vec<&String> = config.iter().filter(|c| c.starts_with("search_path=")).collect();
        assert_eq!(
            paths,
            [&safe],
            "{name}: its search_path is pinned, pg_catalog first and pg_temp last"
        );
        assert!(!r.get::<_, bool>(2), "{name}: PUBLIC may not execute it");
        let granted: bool = r.get(3);
        let for_applications = known
            .iter()
            .any(|(f, why)| *f == name && why.ends_with("(application roles)"));
        assert_eq!(granted, for_applications, "{name}: EXECUTE of the application role");
    }
    drop_role(&owner, &role).await;
}

/// The attack of PostgreSQL's "Writing SECURITY DEFINER Functions Safely": objects in the
/// caller's temporary schema named like the catalog's or the store's, which a definer function
/// without a pinned search_path would read instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definer_functions_ignore_the_callers_temporary_tables() {
    let owner = common::repo("definer_temp").await;
    let schema = owner.config().schema.clone().unwrap();
    let (app, role) = app_role(&owner, "definer_temp").await;
    let c = sql(&owner).await;
    c.batch_execute(&format!(
        "CREATE TABLE victim (user_id text);
         INSERT INTO victim VALUES ('x');
         GRANT SELECT ON victim TO {role};
         GRANT EXECUTE ON FUNCTION refresh_events_daily(boolean) TO {role};"
    ))
    .await
    .unwrap();
    owner.append(event(Uuid::now_v7(), 1)).await.unwrap();
    owner.refresh_analytics(true).await.unwrap();

    let a = common::connect(&app.config().database_url).await;
    a.batch_execute(&format!("SET search_path = {schema}")).await.unwrap();
    // A fake catalog that lists the victim as a child of events_v2 without row-level security,
    // and a fake settings table: at commit the deferred trigger would secure the victim.
    a.batch_execute(
        "BEGIN;
         CREATE TEMP TABLE synap_settings (key text, value text);
         INSERT INTO pg_temp.synap_settings VALUES ('storage_mode', 'timescaledb');
         CREATE TEMP TABLE pg_inherits (inhrelid oid, inhparent oid);
         INSERT INTO pg_temp.pg_inherits SELECT 'victim'::regclass, 'events_v2'::regclass;
         CREATE TEMP TABLE pg_class (oid oid, relrowsecurity boolean);
         INSERT INTO pg_temp.pg_class SELECT 'victim'::regclass, false;
         INSERT INTO events_v2_feed_days (bucket, day) VALUES (0, '2000-01-01');
         COMMIT;",
    )
    .await
    .unwrap();
    let secured: bool = c
        .query_one(
            "SELECT relrowsecurity FROM pg_class WHERE oid = 'victim'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!secured, "the owner altered a table the caller listed");

    // A temporary events_v2 of forged rows, then the refresh with the owner's rights.
    a.batch_execute(
        "CREATE TEMP TABLE events_v2 (\"timestamp\" timestamptz, user_id text, event_type text,
                                      aggregate_type text, aggregate_id uuid);
         INSERT INTO pg_temp.events_v2
         SELECT now(), 'forged', 'entity.created', 'entity', gen_random_uuid() FROM generate_series(1, 1000);
         SELECT refresh_events_daily(true);",
    )
    .await
    .unwrap();
    let (forged, total): (i64, i64) = {
        let r = c
            .query_one(
                "SELECT count(*) FILTER (WHERE user_id = 'forged'), coalesce(sum(event_count), 0)::bigint FROM events_daily",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((forged, total), (0, 1), "events_daily counts the store's events only");
    drop(a);
    app.close();
    c.batch_execute("DROP TABLE victim").await.unwrap();
    drop_role(&owner, &role).await;
}

/// Tables that hold no user's data and that the application role reads as a whole: the columns
/// each has (so that one that gains a user's data fails this list), and why it is readable.
const NO_USER_DATA: &[(&str, &[&str], &str)] = &[
    (
        "events_daily_dirty",
        &["day"],
        "UTC days awaiting an analytics refresh; appends add them with ON CONFLICT DO NOTHING",
    ),
    (
        "events_v2_feed_days",
        &["bucket", "day", "txid"],
        "the feed's day index; every append reads it before adding a row",
    ),
];

/// Every relation of the store (from the catalogs, so that a new table is covered without a
/// change here): the schema's tables, views and sequences, and every partition or chunk of
/// events_v2 wherever it lives. With the user column's presence.
async fn store_relations(owner: &EventRepository) -> Vec<(String, String, bool)> {
    let schema = owner.config().schema.clone().unwrap();
    sql(owner)
        .await
        .query(
            "SELECT c.oid::regclass::text, c.relkind::text,
                    EXISTS (SELECT 1 FROM pg_attribute a
                             WHERE a.attrelid = c.oid AND a.attname = 'user_id' AND NOT a.attisdropped)
               FROM pg_class c
              WHERE (c.relnamespace = $1::text::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S'))
                 OR c.oid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = 'events_v2'::regclass)
              ORDER BY 1",
            &[&schema],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_owned()).unwrap_or_default()
}

/// Rows of two users in every table of the store, written by every path the owner has: events
/// on several days (new partitions and chunks, some made by the application role's own
/// appends), snapshots, analytics, a named consumer, a consumer group with a parked event, and
/// the legacy migration's bookkeeping.
async fn rows_of_alice_and_bob(owner: &EventRepository, app: &EventRepository) -> (Uuid, Uuid) {
    let day = |n: u64| {
        Some(
            (chrono::Utc::now().date_naive() - chrono::Days::new(n))
                .and_hms_opt(9, 0, 0)
                .unwrap()
                .and_utc(),
        )
    };
    let workflow = Uuid::now_v7();
    let (a_agg, b_agg) = (Uuid::now_v7(), Uuid::now_v7());
    let mut batch = Vec::new();
    for (user, agg) in [("alice", a_agg), ("bob", b_agg)] {
        for (v, d) in [(1, 20), (2, 2)] {
            let mut e = owned_by(user, agg, v, workflow);
            e.timestamp = day(d);
            batch.push(e);
        }
    }
    owner.append_batch(batch).await.unwrap();
    for (user, agg) in [("alice", a_agg), ("bob", b_agg)] {
        let mut e = owned_by(user, agg, 3, workflow);
        e.timestamp = day(30);
        app.for_user(user).unwrap().append(e).await.unwrap();
        owner.snapshot(agg).await.unwrap();
    }
    owner.refresh_analytics(true).await.unwrap();
    let page = owner.read_all(None, 100).await.unwrap();
    owner
        .save_consumer_checkpoint("search", &page.checkpoint)
        .await
        .unwrap();
    sql(owner)
        .await
        .batch_execute(&format!(
            "INSERT INTO consumer_groups (name, partitions) VALUES ('g', 1);
             INSERT INTO consumer_group_partitions (group_name, partition, owner) VALUES ('g', 0, 'm1');
             INSERT INTO consumer_group_members (group_name, member, expires) VALUES ('g', 'm1', now());
             INSERT INTO consumer_group_parked (group_name, event_id, partition, aggregate_id, txid, position, state, error)
                  VALUES ('g', gen_random_uuid(), 0, '{b_agg}', '1', 1, 'failed', 'bob''s secret');
             INSERT INTO legacy_migration_runs (legacy_table) VALUES ('public.events');
             INSERT INTO legacy_migration_map (legacy_table, legacy_id, event_id, aggregate_id, version, origin)
                  VALUES ('public.events', gen_random_uuid(), gen_random_uuid(), '{b_agg}', 1, 'migration');
             INSERT INTO legacy_migration_failures (legacy_table, legacy_id, reason_code, reason)
                  VALUES ('public.events', gen_random_uuid(), 'X', 'bob''s row');"
        ))
        .await
        .unwrap();
    (a_agg, b_agg)
}

/// As the application role, every relation of the store: with no user set it reads and writes
/// no row; as alice it reads only alice's rows and writes none of bob's. Then the same after an
/// administrator's broad grant on every table of the schema: row-level security still holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_application_role_reaches_no_row_but_its_users() {
    let owner = common::repo("reach").await;
    let schema = owner.config().schema.clone().unwrap();
    let (app, role) = app_role(&owner, "reach").await;
    let (_a_agg, b_agg) = rows_of_alice_and_bob(&owner, &app).await;
    let relations = store_relations(&owner).await;
    let names: Vec<&str> = relations.iter().map(|(n, _, _)| n.as_str()).collect();
    for table in [
        "event_snapshots",
        "events_v2_ids",
        "consumer_group_parked",
        "event_consumers",
    ] {
        assert!(names.contains(&table), "{table} is among {names:?}");
    }
    if common::timescaledb() {
        assert!(
            names.iter().any(|n| n.contains("_hyper_")),
            "chunks are among {names:?}"
        );
    }

    // Every table of the store has row-level security: a new one must choose its policies.
    let c = sql(&owner).await;
    for (name, kind, _) in &relations {
        if kind == "r" || kind == "p" {
            let on: bool = c
                .query_one(
                    &format!("SELECT relrowsecurity FROM pg_class WHERE oid = '{name}'::regclass"),
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            assert!(on, "{name} has row-level security");
        }
    }

    let a = common::connect(&app.config().database_url).await;
    a.batch_execute(&format!("SET search_path = {schema}")).await.unwrap();
    for broad in [false, true] {
        if broad {
            c.batch_execute(&format!(
                "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role};
                 GRANT SELECT, USAGE, UPDATE ON ALL SEQUENCES IN SCHEMA {schema} TO {role};"
            ))
            .await
            .unwrap();
        }
        for (name, kind, has_user) in &relations {
            let exempt = NO_USER_DATA.iter().find(|(t, _, _)| t == name);
            if let Some((_, columns, _)) = exempt {
                let actual: Vec<String> = c
                    .query(
                        "SELECT attname::text FROM pg_attribute WHERE attrelid = $1::text::regclass
                            AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                        &[name],
                    )
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                assert_eq!(actual, *columns, "{name} holds no user's data");
            }
            for user in [None, Some("alice")] {
                a.batch_execute("BEGIN").await.unwrap();
                if let Some(user) = user {
                    a.execute("SELECT set_config('app.current_user_id', $1, true)", &[&user])
                        .await
                        .unwrap();
                }
                let read = if kind == "S" {
                    a.query(&format!("SELECT last_value FROM {name}"), &[]).await.map(|_| 0)
                } else if *has_user {
                    a.query(&format!("SELECT user_id FROM {name}"), &[]).await.map(|rows| {
                        for r in &rows {
                            assert_eq!(r.get::<_, Option<&str>>(0), user, "{name}: a row of another user");
                        }
                        rows.len()
                    })
                } else {
                    a.query(&format!("SELECT 1 FROM {name}"), &[])
                        .await
                        .map(|rows| rows.len())
                };
                match read {
                    Ok(n) => assert!(
                        n == 0 || exempt.is_some() || (*has_user && user.is_some()),
                        "{name} (broad grant: {broad}): {n} rows for {user:?}"
                    ),
                    Err(e) => assert_eq!(sqlstate(&e), "42501", "{name}: {e}"),
                }
                a.batch_execute("ROLLBACK").await.unwrap();
                if kind == "S" || kind == "v" {
                    continue;
                }
                // Removes no row, not even the user's own: events are never changed or removed
                // by the application role, whatever it is granted.
                a.batch_execute("BEGIN").await.unwrap();
                if let Some(user) = user {
                    a.execute("SELECT set_config('app.current_user_id', $1, true)", &[&user])
                        .await
                        .unwrap();
                }
                let deleted = a.execute(&format!("DELETE FROM {name}"), &[]).await;
                a.batch_execute("ROLLBACK").await.unwrap();
                match deleted {
                    Ok(n) => assert_eq!(n, 0, "DELETE FROM {name} as {user:?} (broad grant: {broad})"),
                    Err(e) => assert_eq!(sqlstate(&e), "42501", "DELETE FROM {name}: {e}"),
                }
            }
        }
        // No row of another user can be written into the tables the role may insert into.
        for user in [None, Some("alice")] {
            for insert in [
                format!(
                    "INSERT INTO events_v2 (aggregate_id, aggregate_type, event_type, user_id, data, version)
                     VALUES ('{b_agg}', 'entity', 'entity.updated', 'bob', '{{}}', 9)"
                ),
                "INSERT INTO event_streams (aggregate_id, aggregate_type, user_id, version, first_timestamp, last_timestamp)
                 VALUES (gen_random_uuid(), 'entity', 'bob', 1, now(), now())"
                    .to_owned(),
                "INSERT INTO events_v2_ids (id, aggregate_id, version, user_id) VALUES (gen_random_uuid(), gen_random_uuid(), 1, 'bob')"
                    .to_owned(),
                format!(
                    "INSERT INTO event_snapshots (aggregate_id, rules, version, user_id, state, deleted, last_timestamp, max_timestamp)
                     VALUES ('{b_agg}', 'r', 9, '{}', '{{}}', false, now(), now())",
                    user.unwrap_or("bob")
                ),
            ] {
                a.batch_execute("BEGIN").await.unwrap();
                if let Some(user) = user {
                    a.execute("SELECT set_config('app.current_user_id', $1, true)", &[&user])
                        .await
                        .unwrap();
                }
                let written = a.execute(&insert, &[]).await;
                a.batch_execute("ROLLBACK").await.unwrap();
                let e = written.expect_err(&format!("{insert} as {user:?} (broad grant: {broad})"));
                assert_eq!(sqlstate(&e), "42501", "{insert}: {e}");
            }
        }
    }
    drop(a);
    app.close();
    drop_role(&owner, &role).await;
}

/// Appends racing to create an aggregate (the owner's repository, and a user on her own
/// aggregate): a version that lost the race is a conflict, which callers reload and retry,
/// never PERMISSION_DENIED (another user's aggregate, which they do not). A creation that
/// commits between a failed guard and its diagnosis once looked like another user's aggregate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_appends_to_a_new_aggregate_are_conflicts_never_another_users() {
    let owner = common::repo("race_new").await;
    let (app, role) = app_role(&owner, "race_new").await;
    let alice = app.for_user("alice").unwrap();
    let workflow = Uuid::now_v7();
    let check = |r: Result<_, Error>, what: &str| {
        if let Err(e) = r {
            assert!(
                matches!(e.code(), "CONCURRENCY_CONFLICT" | "TRANSACTION_CONFLICT"),
                "{what}: {e:?}"
            );
        }
    };
    let (mut conflicts, mut rounds) = (0, 0);
    for handle in [&owner, &alice] {
        for _ in 0..25 {
            rounds += 1;
            let id = Uuid::now_v7();
            let mut tasks = Vec::new();
            for v in 1..=4 {
                let h = handle.clone();
                tasks.push(tokio::spawn(async move {
                    h.append(owned_by("alice", id, v, workflow)).await
                }));
            }
            for t in tasks {
                let r = t.await.unwrap();
                conflicts += usize::from(r.is_err());
                check(r.map(|_| ()), "append of versions 1 to 4 at once");
            }
            let id = Uuid::now_v7();
            let (h1, h2) = (handle.clone(), handle.clone());
            let one = tokio::spawn(async move { h1.append(owned_by("alice", id, 1, workflow)).await });
            let two = tokio::spawn(async move {
                h2.append_batch(vec![
                    owned_by("alice", id, 2, workflow),
                    owned_by("alice", id, 3, workflow),
                ])
                .await
            });
            check(one.await.unwrap().map(|_| ()), "append of version 1");
            check(two.await.unwrap().map(|_| ()), "batch of versions 2 and 3");
        }
    }
    assert!(
        conflicts > 0,
        "the appends raced ({conflicts} conflicts in {rounds} rounds)"
    );
    app.close();
    drop_role(&owner, &role).await;
}
