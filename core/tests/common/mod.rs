//! Each test gets its own schema in the database named by DATABASE_URL
//! (`scripts/db.sh start` prints one).

#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::json;
use synap_events::{AggregateType, EventRepository, NewEvent, RepositoryConfig, StorageMode};
use uuid::Uuid;

pub fn database_url() -> String {
    std::env::var("DATABASE_URL").expect("DATABASE_URL must point at a PostgreSQL server: run `eval $(scripts/db.sh start >/dev/null; scripts/db.sh env)`")
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh, empty schema (not migrated).
pub async fn fresh_schema(tag: &str) -> String {
    let schema = format!(
        "t_{}_{}_{}",
        tag,
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    );
    let (client, conn) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
        ))
        .await
        .expect("create schema");
    schema
}

pub fn config(schema: &str) -> RepositoryConfig {
    let mut config = RepositoryConfig::new(database_url());
    config.schema = Some(schema.to_owned());
    config.storage_mode = StorageMode::Auto;
    config.pool_size = 16;
    config
}

/// The storage mode this pass runs on: `native` or `timescaledb` (scripts/test.sh sets
/// SYNAP_TEST_STORAGE_MODE for each of its passes; `native` when unset).
pub fn storage_mode() -> String {
    std::env::var("SYNAP_TEST_STORAGE_MODE").unwrap_or_else(|_| "native".into())
}

/// Whether this pass runs on TimescaleDB hypertables.
pub fn timescaledb() -> bool {
    storage_mode() == "timescaledb"
}

/// A migrated repository in its own schema, in this pass's storage mode (checked, so that a
/// TimescaleDB pass can never quietly run on native partitions).
pub async fn repo(tag: &str) -> EventRepository {
    let schema = fresh_schema(tag).await;
    let repo = EventRepository::new(config(&schema)).expect("repository");
    let report = repo.migrate().await.expect("migrate");
    assert_eq!(
        report.storage_mode,
        storage_mode(),
        "the storage mode of this test pass"
    );
    repo
}

/// A plain client whose search_path is the repository's schema.
pub async fn sql(repo: &EventRepository) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let schema = repo.config().schema.clone().unwrap();
    client
        .batch_execute(&format!("SET search_path = {schema}"))
        .await
        .unwrap();
    client
}

pub async fn count_rows(repo: &EventRepository) -> (i64, i64) {
    let c = sql(repo).await;
    let events: i64 = c.query_one("SELECT count(*) FROM events_v2", &[]).await.unwrap().get(0);
    let streams: i64 = c
        .query_one("SELECT count(*) FROM event_streams", &[])
        .await
        .unwrap()
        .get(0);
    (events, streams)
}

pub fn event(aggregate_id: Uuid, version: i32) -> NewEvent {
    NewEvent::new(
        aggregate_id,
        AggregateType::Entity,
        if version == 1 {
            "entity.created"
        } else {
            "entity.updated"
        },
        "user-1",
        json!({ "n": version }),
        version,
    )
}
