//! Row-level security: a user-scoped handle, connected as an application role that neither owns
//! the tables nor bypasses RLS, reaches only its user's events and streams, by every method.

mod common;

use common::{event, sql};
use serde_json::json;
use synap_events::{
    AggregateType, CountFilter, Error, EventRepository, NewEvent, RepositoryConfig, StreamOptions, UserStreamOptions,
};
use uuid::Uuid;

/// A login role with the privileges an application needs, and a repository connected as it.
async fn app_role(owner: &EventRepository, tag: &str) -> (EventRepository, String) {
    let schema = owner.config().schema.clone().unwrap();
    let role = format!("synap_app_{tag}_{}", std::process::id());
    let c = sql(owner).await;
    c.batch_execute(&format!(
        "DROP ROLE IF EXISTS {role};
         CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS;
         SELECT synap_grant_application_role('{role}');"
    ))
    .await
    .unwrap();
    let url = common::database_url();
    let (scheme, rest) = url.split_once("://").unwrap();
    let host = rest.split_once('@').map(|(_, h)| h).unwrap_or(rest);
    let mut config = RepositoryConfig::new(format!("{scheme}://{role}@{host}"));
    config.schema = Some(schema);
    (EventRepository::new(config).unwrap(), role)
}

async fn drop_role(owner: &EventRepository, role: &str) {
    let c = sql(owner).await;
    c.batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await
        .unwrap();
}

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
    assert_eq!(err.code(), "VALIDATION_FAILED", "{err:?}");

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
    let url = app.config().database_url.clone();
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
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
