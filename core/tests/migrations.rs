//! The migration runner against a real PostgreSQL (DATABASE_URL).

mod common;

use synap_events::{EventRepository, MIGRATIONS};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_twice_applies_once() {
    let schema = common::fresh_schema("mig_twice").await;
    let repo = EventRepository::new(common::config(&schema)).unwrap();
    let first = repo.migrate().await.unwrap();
    assert_eq!(first.applied, MIGRATIONS.iter().map(|m| m.version).collect::<Vec<_>>());
    assert_eq!(first.storage_mode, common::storage_mode());
    let second = repo.migrate().await.unwrap();
    assert!(second.applied.is_empty());
    assert_eq!(second.already_applied, first.applied);
    let status = repo.migration_status().await.unwrap();
    assert!(status.iter().all(|s| s.applied_at.is_some() && s.checksum_ok));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_at_once_apply_each_file_once() {
    let schema = common::fresh_schema("mig_race").await;
    let a = EventRepository::new(common::config(&schema)).unwrap();
    let b = EventRepository::new(common::config(&schema)).unwrap();
    let (ra, rb) = tokio::join!(a.migrate(), b.migrate());
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    let mut applied = ra.applied.clone();
    applied.extend(&rb.applied);
    applied.sort();
    assert_eq!(applied, MIGRATIONS.iter().map(|m| m.version).collect::<Vec<_>>());
    let c = common::sql(&a).await;
    let n: i64 = c
        .query_one("SELECT count(*) FROM synap_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, MIGRATIONS.len() as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_applied_file_is_refused() {
    let repo = common::repo("mig_edit").await;
    let c = common::sql(&repo).await;
    c.execute("UPDATE synap_migrations SET checksum = 'edited' WHERE version = 1", &[])
        .await
        .unwrap();
    let err = repo.migrate().await.unwrap_err();
    assert_eq!(err.code(), "MIGRATION_CHECKSUM_MISMATCH");
    assert!(!repo.migration_status().await.unwrap()[0].checksum_ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timescaledb_mode_is_had_or_refused_with_a_code() {
    let schema = common::fresh_schema("mig_mode").await;
    let mut config = common::config(&schema);
    config.storage_mode = synap_events::StorageMode::Timescaledb;
    let repo = EventRepository::new(config).unwrap();
    if common::timescaledb() {
        assert_eq!(repo.migrate().await.unwrap().storage_mode, "timescaledb");
        return;
    }
    // This server does not preload TimescaleDB: asking for it explicitly must fail with a code
    // that says what to change, not fall back, and create nothing.
    let err = repo.migrate().await.unwrap_err();
    assert_eq!(err.code(), "STORAGE_MODE_UNAVAILABLE", "{err:?}");
    assert!(
        err.to_string().contains("shared_preload_libraries") || err.to_string().contains("not installed"),
        "{err}"
    );
    let c = common::sql(&repo).await;
    let exists: bool = c
        .query_one("SELECT to_regclass('events_v2') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!exists);
}

#[test]
fn embedded_list_matches_the_folder() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations");
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".sql"))
        .collect();
    files.sort();
    let embedded: Vec<String> = MIGRATIONS
        .iter()
        .map(|m| format!("{:04}_{}.sql", m.version, m.name))
        .collect();
    assert_eq!(files, embedded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_apply_with_psql_as_they_are() {
    let schema = common::fresh_schema("mig_psql").await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations");
    for m in MIGRATIONS {
        let file = dir.join(format!("{:04}_{}.sql", m.version, m.name));
        let out = std::process::Command::new("psql")
            .arg(common::database_url())
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
            .env("PGOPTIONS", format!("-c search_path={schema}"))
            .arg("-f")
            .arg(&file)
            .output()
            .expect("psql runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let repo = EventRepository::new(common::config(&schema)).unwrap();
    assert_eq!(repo.storage_mode().await.unwrap(), common::storage_mode());
    repo.append(common::event(uuid::Uuid::now_v7(), 1)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upkeep_and_analytics_refresh_run_concurrently() {
    let repo = common::repo("upkeep_race").await;
    let far = chrono::NaiveDate::from_ymd_opt(2032, 3, 1).unwrap();
    let (a, b) = tokio::join!(
        repo.ensure_partitions(far, far + chrono::Days::new(20)),
        repo.ensure_partitions(far, far + chrono::Days::new(20))
    );
    // Native: each day created once, by one of the two; TimescaleDB makes chunks on insert.
    let expected = if common::timescaledb() { 0 } else { 21 };
    assert_eq!(
        a.unwrap() + b.unwrap(),
        expected,
        "each day created once, by one of the two"
    );
    repo.append(common::event(uuid::Uuid::now_v7(), 1)).await.unwrap();
    let (a, b) = tokio::join!(repo.refresh_analytics(false), repo.refresh_analytics(false));
    assert_eq!(a.unwrap() + b.unwrap(), 1, "the dirty day recomputed once, no deadlock");
}

/// TimescaleDB's functions are called by the extension's schema, wherever it was created, and
/// stores in several schemas of one database each get their own hypertable. (On the native pass
/// the server does not preload TimescaleDB; the mode test above covers it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extension_created_in_another_schema_serves_stores_in_several_schemas() {
    if !common::timescaledb() {
        return;
    }
    let admin_url = common::database_url();
    let (admin, conn) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let db = format!("synap_ext_{}", std::process::id());
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await
        .unwrap();
    admin.batch_execute(&format!("CREATE DATABASE {db}")).await.unwrap();
    let url = format!("{}/{db}", admin_url.rsplit_once('/').unwrap().0);
    {
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        c.batch_execute("CREATE SCHEMA tsx; CREATE EXTENSION timescaledb WITH SCHEMA tsx")
            .await
            .unwrap();
    }
    let today = chrono::Utc::now();
    for schema in ["store_a", "store_b"] {
        let mut config = synap_events::RepositoryConfig::new(url.clone());
        config.schema = Some(schema.into());
        config.storage_mode = synap_events::StorageMode::Timescaledb;
        let repo = EventRepository::new(config).unwrap();
        {
            let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            c.batch_execute(&format!("CREATE SCHEMA {schema}")).await.unwrap();
        }
        assert_eq!(repo.migrate().await.unwrap().storage_mode, "timescaledb");
        // One aggregate ten days old, one of today.
        let old = uuid::Uuid::now_v7();
        let mut e = common::event(old, 1);
        e.timestamp = Some(today - chrono::Duration::days(10));
        repo.append(e).await.unwrap();
        repo.append(common::event(uuid::Uuid::now_v7(), 1)).await.unwrap();
        let stats = repo.stats().await.unwrap();
        assert_eq!(
            (stats.storage_mode.as_str(), stats.events, stats.partitions),
            ("timescaledb", 2, 2)
        );
        let options = synap_events::RetentionOptions {
            cutoff: today - chrono::Duration::days(5),
            dry_run: true,
            force: false,
        };
        let dry = repo.apply_retention(&options).await.unwrap();
        assert_eq!((dry.targets.len(), dry.rows), (1, 1), "{dry:?}");
        let done = repo
            .apply_retention(&synap_events::RetentionOptions {
                dry_run: false,
                ..options
            })
            .await
            .unwrap();
        assert_eq!((done.rows, done.streams_kept), (1, 1), "{done:?}");
        // The aggregate stays, as a snapshot of its state.
        assert_eq!(repo.get_aggregate_version(old).await.unwrap(), Some(1));
        let kept = repo.replay(old, &synap_events::FoldOptions::default()).await.unwrap();
        assert_eq!((kept.result.version, kept.snapshot_version), (1, Some(1)));
        assert_eq!(repo.stats().await.unwrap().events, 1);
        repo.close();
    }
    // Each schema has its own hypertable; the extension stayed where it was created.
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let hypertables: Vec<String> = c
        .query(
            "SELECT hypertable_schema || '.' || hypertable_name FROM timescaledb_information.hypertables ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(hypertables, ["store_a.events_v2", "store_b.events_v2"]);
    let ext_schema: String = c
        .query_one(
            "SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'timescaledb'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ext_schema, "tsx");
    drop(c);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}

/// Stores in several schemas of a database that has no TimescaleDB yet, migrated at once in
/// `auto` mode, all get this pass's storage mode: none loses a race to create the extension and
/// settles for native partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_migrated_at_once_in_a_new_database_all_get_the_same_mode() {
    if common::citus() {
        return; // A new database has no Citus metadata: it is not a Citus cluster.
    }
    let admin_url = common::database_url();
    let (admin, conn) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let db = format!("synap_race_{}", std::process::id());
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await
        .unwrap();
    admin.batch_execute(&format!("CREATE DATABASE {db}")).await.unwrap();
    let url = format!("{}/{db}", admin_url.rsplit_once('/').unwrap().0);
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let schemas: Vec<String> = (0..8).map(|i| format!("store_{i}")).collect();
    for schema in &schemas {
        c.batch_execute(&format!("CREATE SCHEMA {schema}")).await.unwrap();
    }
    let runs = schemas.iter().map(|schema| {
        let mut config = synap_events::RepositoryConfig::new(url.clone());
        config.schema = Some(schema.clone());
        config.storage_mode = synap_events::StorageMode::Auto;
        let repo = EventRepository::new(config).unwrap();
        async move {
            let mode = repo.migrate().await.unwrap().storage_mode;
            repo.close();
            mode
        }
    });
    let modes = futures_util::future::join_all(runs).await;
    assert!(modes.iter().all(|m| *m == common::storage_mode()), "{modes:?}");
    drop(c);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}
