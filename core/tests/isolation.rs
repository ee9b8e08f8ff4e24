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
         GRANT USAGE ON SCHEMA {schema} TO {role};
         GRANT SELECT, INSERT ON events_v2 TO {role};
         GRANT SELECT, INSERT, UPDATE ON event_streams TO {role};
         GRANT SELECT, INSERT ON events_daily_dirty TO {role};
         GRANT SELECT, INSERT ON events_v2_feed_days TO {role};
         GRANT SELECT, INSERT, UPDATE ON event_consumers TO {role};
         GRANT USAGE ON SEQUENCE events_v2_position_seq TO {role};"
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
    let page = alice.read_all(None, 100).await.unwrap();
    assert_eq!(page.events.len(), 2);

    // Writes: not into bob's aggregate, not as bob.
    let err = alice.append(owned_by("alice", b_agg, 4, workflow)).await.unwrap_err();
    assert_eq!(err.code(), "CONCURRENCY_CONFLICT", "{err:?}");
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
    assert_eq!(err.code(), "CONCURRENCY_CONFLICT", "{err:?}");

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
