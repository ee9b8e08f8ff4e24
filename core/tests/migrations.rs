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
    assert_eq!(first.repeatable_applied.len(), synap_events::REPEATABLE.len());
    let second = repo.migrate().await.unwrap();
    assert!(second.applied.is_empty());
    assert!(
        second.repeatable_applied.is_empty(),
        "nothing changed: {:?}",
        second.repeatable_applied
    );
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
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations/repeatable");
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    let embedded: Vec<String> = synap_events::REPEATABLE
        .iter()
        .map(|r| format!("{}.sql", r.name))
        .collect();
    assert_eq!(
        files, embedded,
        "migrations/repeatable/ and REPEATABLE, in the order they apply"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_apply_with_psql_as_they_are() {
    let schema = common::fresh_schema("mig_psql").await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations");
    let files = MIGRATIONS
        .iter()
        .map(|m| dir.join(format!("{:04}_{}.sql", m.version, m.name)))
        .chain(
            synap_events::REPEATABLE
                .iter()
                .map(|r| dir.join("repeatable").join(format!("{}.sql", r.name))),
        );
    for file in files {
        let out = std::process::Command::new("psql")
            .arg(common::database_url())
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-v"])
            .arg(format!("store_schema={schema}"))
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

/// The store's schema read from the catalogs, as a set of lines: every table, partition,
/// sequence and view with its row-level security, options and grants; every column (type, default,
/// NOT NULL, position); constraints, indexes, triggers and policies; every function's definition,
/// settings and grants; the schema's grants; and TimescaleDB's and Citus's metadata of its tables.
/// The schema's name is replaced, and the daily partitions' names and bounds made one (a store
/// migrated a day later has other days, not other objects). (`pg_dump --schema-only` would say as
/// much, but it reads the catalog of every schema of the database, which takes seconds each time
/// once the suite's tests have made hundreds.)
async fn catalog(schema: &str) -> std::collections::BTreeSet<String> {
    let (c, conn) = tokio_postgres::connect(&common::database_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut queries = vec![
        "SELECT format('relation %s %s rls=%s force=%s options=%s acl=%s', c.relname, c.relkind, c.relrowsecurity,
                       c.relforcerowsecurity, c.reloptions, c.relacl)
           FROM pg_class c WHERE c.relnamespace = $1::text::regnamespace AND c.relkind NOT IN ('i', 'I')",
        "SELECT format('column %s.%s #%s %s notnull=%s default=%s', c.relname, a.attname, a.attnum,
                       format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid))
           FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
           LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
          WHERE c.relnamespace = $1::text::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
            AND c.relkind NOT IN ('i', 'I')",
        "SELECT format('partition %s of %s %s', c.relname, p.relname, pg_get_expr(c.relpartbound, c.oid))
           FROM pg_class c JOIN pg_inherits i ON i.inhrelid = c.oid JOIN pg_class p ON p.oid = i.inhparent
          WHERE c.relnamespace = $1::text::regnamespace",
        "SELECT format('constraint %s %s %s valid=%s', c.relname, k.conname, pg_get_constraintdef(k.oid), k.convalidated)
           FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid WHERE c.relnamespace = $1::text::regnamespace",
        "SELECT format('index %s', pg_get_indexdef(i.indexrelid))
           FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid WHERE c.relnamespace = $1::text::regnamespace",
        "SELECT format('trigger %s', pg_get_triggerdef(t.oid))
           FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
          WHERE c.relnamespace = $1::text::regnamespace AND NOT t.tgisinternal",
        "SELECT format('policy %s %s %s %s using=%s check=%s', tablename, policyname, cmd, roles, qual, with_check)
           FROM pg_policies WHERE schemaname = $1",
        "SELECT format('function %s acl=%s', pg_get_functiondef(p.oid), p.proacl)
           FROM pg_proc p WHERE p.pronamespace = $1::text::regnamespace",
        "SELECT format('schema acl=%s', nspacl) FROM pg_namespace WHERE nspname = $1",
    ];
    let extension = |name: &str| format!("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = '{name}')");
    if c.query_one(&extension("timescaledb"), &[]).await.unwrap().get(0) {
        queries.push(
            "SELECT format('hypertable %s on %s every %s', hypertable_name, column_name, time_interval)
               FROM timescaledb_information.dimensions WHERE hypertable_schema = $1",
        );
    }
    if c.query_one(&extension("citus"), &[]).await.unwrap().get(0) {
        queries.push(
            "SELECT format('distributed %s by %s method %s', logicalrelid::regclass, column_to_column_name(logicalrelid, partkey),
                           partmethod)
               FROM pg_dist_partition WHERE (SELECT relnamespace FROM pg_class WHERE oid = logicalrelid) = $1::text::regnamespace",
        );
    }
    let mut lines = std::collections::BTreeSet::new();
    for q in queries {
        for row in c.query(q, &[&schema]).await.unwrap_or_else(|e| panic!("{q}: {e}")) {
            lines.insert(regex_lite(&row.get::<_, String>(0)).replace(schema, "STORE"));
        }
    }
    lines
}

/// `events_v2_pYYYYMMDD` and `'YYYY-MM-DD 00:00:00+00'` made `events_v2_pDAY` and `'DAY'`.
fn regex_lite(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        let digits = |s: &str, n: usize| s.len() >= n && s.as_bytes()[..n].iter().all(u8::is_ascii_digit);
        if let Some(after) = rest.strip_prefix("events_v2_p") {
            if digits(after, 8) {
                out.push_str("events_v2_pDAY");
                i += "events_v2_p".len() + 8;
                continue;
            }
        }
        if rest.len() >= 25 && rest.starts_with('\'') {
            let d = &rest[1..];
            if digits(d, 4)
                && d.as_bytes()[4] == b'-'
                && digits(&d[5..], 2)
                && d.as_bytes()[7] == b'-'
                && digits(&d[8..], 2)
            {
                if let Some(end) = d.find('\'') {
                    if end <= 24 && d[10..end].starts_with(' ') {
                        out.push_str("'DAY'");
                        i += end + 2;
                        continue;
                    }
                }
            }
        }
        let c = rest.chars().next().unwrap();
        out.push(c);
        i += c.len_utf8();
    }
    out
}

/// Applies the first `n` versioned files to a new schema as the releases before the repeatable
/// files did: each in its own transaction, recorded in synap_migrations.
async fn migrate_as_release(schema: &str, n: usize) {
    let (client, conn) = tokio_postgres::connect(&common::database_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!("SET search_path = {schema}"))
        .await
        .unwrap();
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS synap_migrations (
                version     integer     PRIMARY KEY,
                name        text        NOT NULL,
                checksum    text        NOT NULL,
                applied_at  timestamptz NOT NULL DEFAULT now(),
                duration_ms bigint      NOT NULL
            )",
        )
        .await
        .unwrap();
    for m in &MIGRATIONS[..n] {
        client.batch_execute("BEGIN").await.unwrap();
        client
            .execute("SELECT set_config('synap.storage_mode', 'auto', true)", &[])
            .await
            .unwrap();
        client
            .batch_execute(m.sql)
            .await
            .unwrap_or_else(|e| panic!("{} of release {n}: {e:?}", m.name));
        client
            .execute(
                "INSERT INTO synap_migrations (version, name, checksum, duration_ms) VALUES ($1, $2, $3, 0)",
                &[&m.version, &m.name, &m.checksum()],
            )
            .await
            .unwrap();
        client.batch_execute("COMMIT").await.unwrap();
    }
}

/// A store migrated by any past release (versioned files 1 to n, an application role granted
/// as its README said) and then by this one ends with the catalog of a store made by this one:
/// the same tables, functions, policies, triggers and grants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_upgrade_ends_at_the_catalog_of_a_new_store() {
    let role = format!("synap_upgrade_{}", std::process::id());
    let (admin, conn) = tokio_postgres::connect(&common::database_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    admin
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS"
        ))
        .await
        .unwrap();
    let grant = |schema: String| {
        let role = role.clone();
        async move {
            let (c, conn) = tokio_postgres::connect(&common::database_url(), tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            c.batch_execute(&format!(
                "SET search_path = {schema}; SELECT synap_grant_application_role('{role}')"
            ))
            .await
            .unwrap();
        }
    };
    let fresh = common::fresh_schema("up_new").await;
    let report = EventRepository::new(common::config(&fresh))
        .unwrap()
        .migrate()
        .await
        .unwrap();
    assert_eq!(report.repeatable_applied.len(), synap_events::REPEATABLE.len());
    grant(fresh.clone()).await;
    let expected = catalog(&fresh).await;
    assert!(
        expected
            .iter()
            .any(|o| o.contains("STORE.synap_grant_application_role(p_role name)") && o.contains("acl=")),
        "{expected:#?}"
    );

    // The release that added synap_grant_application_role (0006).
    let grants_from = 6;
    // The citus mode came with 0013: a store of an earlier release was never a citus store.
    let first_release = if common::citus() { 13 } else { 1 };
    for n in std::iter::once(0).chain(first_release..MIGRATIONS.len()) {
        let schema = common::fresh_schema(&format!("up_{n}")).await;
        migrate_as_release(&schema, n).await;
        if n >= grants_from {
            grant(schema.clone()).await;
        }
        let repo = EventRepository::new(common::config(&schema)).unwrap();
        let report = repo.migrate().await.unwrap();
        assert_eq!(report.applied.len(), MIGRATIONS.len() - n);
        if n < grants_from {
            grant(schema.clone()).await;
        }
        let upgraded = catalog(&schema).await;
        let missing: Vec<_> = expected.difference(&upgraded).collect();
        let extra: Vec<_> = upgraded.difference(&expected).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "after release {n}: missing {missing:#?}\nextra {extra:#?}"
        );
        // A repeatable file changed since (here: its recorded checksum): all of them again,
        // and the catalog as it was.
        common::sql(&repo)
            .await
            .batch_execute("UPDATE synap_repeatable_migrations SET checksum = 'an older text' WHERE name = '30_feed'")
            .await
            .unwrap();
        assert_eq!(
            repo.migrate().await.unwrap().repeatable_applied.len(),
            synap_events::REPEATABLE.len()
        );
        assert_eq!(
            catalog(&schema).await,
            upgraded,
            "after re-applying the repeatable files"
        );
        repo.close();
    }
    admin
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await
        .unwrap();
}
