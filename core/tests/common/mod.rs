//! Each test gets its own schema in the database named by DATABASE_URL
//! (`scripts/db.sh start` prints one).

#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::json;
use synap_events::{AggregateType, EventRepository, NewEvent, RepositoryConfig, StorageMode};
use uuid::Uuid;

/// A runtime for the database calls of a model-based test and a proptest runner of `cases`
/// cases that keeps no failure files.
pub fn model_runner(cases: u32) -> (tokio::runtime::Runtime, proptest::test_runner::TestRunner) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases,
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    });
    (runtime, runner)
}

pub fn database_url() -> String {
    std::env::var("DATABASE_URL").expect("DATABASE_URL must point at a PostgreSQL server: run `eval $(scripts/db.sh start >/dev/null; scripts/db.sh env)`")
}

/// Whether this pass reaches the server through a transaction-mode pooler (scripts/test.sh's
/// pooler pass): DATABASE_URL is then the pooler's, for repositories, and SYNAP_TEST_DIRECT_URL the
/// server's, for a test's own statements.
pub fn pooled() -> bool {
    std::env::var("SYNAP_TEST_DIRECT_URL").is_ok_and(|u| !u.is_empty())
}

/// `url` (DATABASE_URL or a role's URL made from it) on the server directly: the server's URL
/// with `url`'s user. Any other URL (a private cluster's) is returned as it is.
pub fn direct(url: &str) -> String {
    let Ok(server) = std::env::var("SYNAP_TEST_DIRECT_URL") else {
        return url.to_owned();
    };
    let host_of = |u: &str| {
        let rest = u.split_once("://").map_or(u, |(_, r)| r);
        let rest = rest.split_once('@').map_or(rest, |(_, r)| r);
        rest.split(['/', '?']).next().unwrap_or("").to_owned()
    };
    if host_of(url) != host_of(&database_url()) {
        // Not the pooler's (a private cluster's): already direct.
        return url.to_owned();
    }
    let user_of = |u: &str| {
        let rest = u.split_once("://").map_or(u, |(_, r)| r);
        rest.split_once('@').map(|(user, _)| user.to_owned())
    };
    match (user_of(url), server.split_once("://")) {
        (Some(user), Some((scheme, rest))) => {
            let host = rest.split_once('@').map_or(rest, |(_, h)| h);
            format!("{scheme}://{user}@{host}")
        }
        _ => server,
    }
}

/// A plain client for a test's own statements (session settings, locks, LISTEN): on the server
/// directly, whatever `url` goes through.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&direct(url), tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
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
    let client = connect(&database_url()).await;
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
    // Through a pooler, subscribers LISTEN on the server directly.
    config.listen_url = std::env::var("SYNAP_TEST_DIRECT_URL").ok();
    config
}

/// The storage mode this pass runs on: `native` or `timescaledb` (scripts/test.sh sets
/// SYNAP_TEST_STORAGE_MODE for each of its passes; `native` when unset).
pub fn storage_mode() -> String {
    std::env::var("SYNAP_TEST_STORAGE_MODE").unwrap_or_else(|_| "native".into())
}

/// Whether this pass runs on a Citus cluster. Tests that start a private cluster of their own
/// (one server) or make a database of their own (which has no Citus metadata) do not run there.
pub fn citus() -> bool {
    storage_mode() == "citus"
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

/// A plain client on the repository's server whose search_path is the repository's schema.
pub async fn sql(repo: &EventRepository) -> tokio_postgres::Client {
    let client = connect(&repo.config().database_url).await;
    let schema = repo.config().schema.clone().unwrap();
    client
        .batch_execute(&format!("SET search_path = {schema}"))
        .await
        .unwrap();
    client
}

/// A login role of this cluster that neither owns the tables nor bypasses row-level security,
/// granted what an application needs as the README says, and a repository in `owner`'s schema
/// connected as it. Drop it with [`drop_role`].
pub async fn app_role(owner: &EventRepository, tag: &str) -> (EventRepository, String) {
    let schema = owner.config().schema.clone().unwrap();
    let role = format!("synap_app_{tag}_{}", std::process::id());
    sql(owner)
        .await
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS {role};
             CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS;
             SELECT synap_grant_application_role('{role}');"
        ))
        .await
        .unwrap();
    let mut config = owner.config().clone();
    config.database_url = role_url(&role);
    config.schema = Some(schema);
    (EventRepository::new(config).unwrap(), role)
}

/// DATABASE_URL with `role` as its user.
pub fn role_url(role: &str) -> String {
    let url = database_url();
    let (scheme, rest) = url.split_once("://").unwrap();
    let host = rest.split_once('@').map(|(_, h)| h).unwrap_or(rest);
    format!("{scheme}://{role}@{host}")
}

/// Drops a role made by [`app_role`], with its privileges.
pub async fn drop_role(owner: &EventRepository, role: &str) {
    sql(owner)
        .await
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await
        .unwrap();
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

/// The first of `n` consecutive free ports on the loopback (a Citus cluster's coordinator and
/// its two workers take three).
fn free_ports(n: u16) -> u16 {
    loop {
        let first = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        if first.checked_add(n).is_some()
            && (1..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", first + i)).is_ok())
        {
            return first;
        }
    }
}

/// A PostgreSQL cluster of one test's own, started by scripts/db.sh in a temporary directory
/// with this pass's storage mode, and stopped and removed when dropped. On a Citus pass it is a
/// coordinator and two workers, all started at `next_xid`.
pub struct PrivateCluster {
    dir: std::path::PathBuf,
    port: u16,
    /// Its connection string.
    pub url: String,
}

impl PrivateCluster {
    /// Starts a new cluster whose transaction counter starts at `next_xid` (when given), the way
    /// an old database's is.
    ///
    /// Panics when scripts/db.sh cannot start it (no PostgreSQL server binaries here).
    pub fn start(tag: &str, next_xid: Option<u64>) -> PrivateCluster {
        let port = free_ports(if citus() { 3 } else { 1 });
        let dir = std::env::temp_dir().join(format!(
            "synap-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let mut cluster = PrivateCluster {
            dir,
            port,
            url: String::new(),
        };
        let mut command = cluster.db_sh("start");
        if let Some(xid) = next_xid {
            command.env("SYNAP_PG_NEXT_XID", xid.to_string());
        }
        let out = command.output().expect("run scripts/db.sh");
        assert!(
            out.status.success(),
            "scripts/db.sh start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.url = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        cluster
    }

    fn db_sh(&self, command: &str) -> std::process::Command {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/db.sh");
        let mut c = std::process::Command::new("bash");
        c.arg(script).arg(command);
        if timescaledb() {
            c.arg("--timescaledb");
        }
        if citus() {
            c.arg("--citus");
        }
        c.env("SYNAP_PG_DIR", &self.dir)
            .env("SYNAP_PG_PORT", self.port.to_string())
            .env("SYNAP_PG_FAST", "1");
        c
    }

    /// A migrated repository in a new schema of this cluster.
    pub async fn repo(&self, tag: &str) -> EventRepository {
        let schema = format!("t_{tag}");
        let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .expect("create schema");
        let mut config = RepositoryConfig::new(self.url.clone());
        config.schema = Some(schema);
        config.pool_size = 8;
        let repo = EventRepository::new(config).expect("repository");
        assert_eq!(repo.migrate().await.expect("migrate").storage_mode, storage_mode());
        repo
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = self.db_sh("stop").output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The current transaction id of the connection's server.
pub async fn current_xid(client: &tokio_postgres::Client) -> u64 {
    let text: String = client
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await
        .unwrap()
        .get(0);
    text.parse().unwrap()
}

/// Consumes transaction ids until the server's counter is at about `target` (each subtransaction
/// that writes takes one), as a busy database's counter moves between a test's steps.
pub async fn advance_xid_to(client: &tokio_postgres::Client, target: u64) {
    let now = current_xid(client).await;
    assert!(now < target, "the transaction counter is at {now}, past {target}");
    let n = (target - now).saturating_sub(3).max(1);
    client
        .batch_execute(&format!(
            "CREATE TEMP TABLE IF NOT EXISTS synap_burn (x int);
             DO $$ BEGIN FOR i IN 1..{n} LOOP
                 BEGIN INSERT INTO synap_burn VALUES (1); RAISE EXCEPTION 'burn'; EXCEPTION WHEN OTHERS THEN NULL; END;
             END LOOP; END $$;"
        ))
        .await
        .unwrap();
}
