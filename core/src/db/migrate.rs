//! The schema migration runner.
//!
//! Two kinds of files (docs/schema.md, "Migrations"):
//! - versioned, `migrations/NNNN_name.sql`: tables, columns, indexes, triggers and data. Applied
//!   in order, each once, in its own transaction, and recorded in `synap_migrations` with a
//!   SHA-256 checksum; an applied file that was edited is refused.
//! - repeatable, `migrations/repeatable/NN_concern.sql`: the current definition of every
//!   function, policy and grant, each stated once. After the versioned files, all of them are
//!   applied again, in one transaction and in name order, whenever one of them changed since the
//!   last run or a versioned file was applied; their checksums are recorded in
//!   `synap_repeatable_migrations`. Each statement in them is idempotent.
//!
//! Runs hold a transaction-level advisory lock, so two processes migrating at once apply each
//! file once.

use std::time::Instant;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use crate::db::config::StorageMode;
use crate::error::{Error, Result};

/// One migration file, embedded at build time.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// The number in its file name.
    pub version: i32,
    /// The rest of its file name, without `.sql`.
    pub name: &'static str,
    /// Its SQL.
    pub sql: &'static str,
    /// Checksums of earlier texts of this file that a database may have applied. Only an edit
    /// that changes nothing for a database where the file already ran may be listed here (a fix
    /// of a branch taken on first creation); such a database keeps its recorded checksum.
    pub earlier_checksums: &'static [&'static str],
}

/// Every migration, in order. A test checks this list against the `migrations/` folder.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "events_v2",
        sql: include_str!("../../../migrations/0001_events_v2.sql"),
        // Before: auto mode crashed on a server with TimescaleDB installed but not preloaded,
        // and create_hypertable was called unqualified. Both only ever ran on first creation.
        // Before that, and until the citus mode: neither changes anything once the file ran.
        earlier_checksums: &[
            "ff3ade190c2350c50402400362d58809e486d7772973356b7fc6a977cc047dc2",
            "d6f0894f7a4ebd05206ae5902de925715421ee5836cc9571ffadc2a689b13958",
        ],
    },
    Migration {
        version: 2,
        name: "legacy_migration",
        sql: include_str!("../../../migrations/0002_legacy_migration.sql"),
        earlier_checksums: &[],
    },
    Migration {
        version: 3,
        name: "isolation_and_global_order",
        sql: include_str!("../../../migrations/0003_isolation_and_global_order.sql"),
        earlier_checksums: &[],
    },
    Migration {
        version: 4,
        name: "concurrent_upkeep",
        sql: include_str!("../../../migrations/0004_concurrent_upkeep.sql"),
        earlier_checksums: &[],
    },
    Migration {
        version: 5,
        name: "feed_index",
        sql: include_str!("../../../migrations/0005_feed_index.sql"),
        earlier_checksums: &[],
    },
    Migration {
        version: 6,
        name: "partition_security",
        sql: include_str!("../../../migrations/0006_partition_security.sql"),
        earlier_checksums: &[],
    },
    Migration {
        version: 7,
        name: "analytics_refresh",
        sql: include_str!("../../../migrations/0007_analytics_refresh.sql"),
        earlier_checksums: &[],
    },
    Migration {
        version: 8,
        name: "correctness",
        sql: include_str!("../../../migrations/0008_correctness.sql"),
        earlier_checksums: &[],
    },
    Migration {
        version: 9,
        name: "snapshots",
        sql: include_str!("../../../migrations/0009_snapshots.sql"),
        earlier_checksums: &[],
    },
    Migration {
        version: 10,
        name: "notify_after_commit",
        sql: include_str!("../../../migrations/0010_notify_after_commit.sql"),
        earlier_checksums: &[],
    },
    Migration {
        version: 11,
        name: "consumer_groups",
        sql: include_str!("../../../migrations/0011_consumer_groups.sql"),
        earlier_checksums: &[],
    },
    Migration {
        version: 12,
        name: "stream_row_room",
        sql: include_str!("../../../migrations/0012_stream_row_room.sql"),
        earlier_checksums: &[],
    },
    Migration {
        version: 13,
        name: "citus",
        sql: include_str!("../../../migrations/0013_citus.sql"),
        earlier_checksums: &[],
    },
    Migration {
        version: 14,
        name: "citus_append",
        sql: include_str!("../../../migrations/0014_citus_append.sql"),
        earlier_checksums: &[],
    },
    Migration {
        version: 15,
        name: "isolation",
        sql: include_str!("../../../migrations/0015_isolation.sql"),
        earlier_checksums: &[],
    },
    Migration {
        version: 16,
        name: "erasure",
        sql: include_str!("../../../migrations/0016_erasure.sql"),
        earlier_checksums: &[],
    },
    Migration {
        version: 17,
        name: "schema_version",
        sql: include_str!("../../../migrations/0017_schema_version.sql"),
        earlier_checksums: &[],
    },
    Migration {
        version: 18,
        name: "group_filter",
        sql: include_str!("../../../migrations/0018_group_filter.sql"),
        earlier_checksums: &[],
    },
];

/// A repeatable migration file: the current definitions of one concern's functions, policies
/// and grants, re-applied whenever it changes.
#[derive(Debug, Clone, Copy)]
pub struct Repeatable {
    /// Its file name in `migrations/repeatable/`, without `.sql`; files apply in name order.
    pub name: &'static str,
    /// Its SQL.
    pub sql: &'static str,
}

/// Every repeatable file, in the order they apply. A test checks this list against the
/// `migrations/repeatable/` folder.
pub const REPEATABLE: &[Repeatable] = &[
    Repeatable {
        name: "10_partitions",
        sql: include_str!("../../../migrations/repeatable/10_partitions.sql"),
    },
    Repeatable {
        name: "20_streams",
        sql: include_str!("../../../migrations/repeatable/20_streams.sql"),
    },
    Repeatable {
        name: "30_feed",
        sql: include_str!("../../../migrations/repeatable/30_feed.sql"),
    },
    Repeatable {
        name: "40_analytics",
        sql: include_str!("../../../migrations/repeatable/40_analytics.sql"),
    },
    Repeatable {
        name: "50_legacy",
        sql: include_str!("../../../migrations/repeatable/50_legacy.sql"),
    },
    Repeatable {
        name: "60_groups",
        sql: include_str!("../../../migrations/repeatable/60_groups.sql"),
    },
    Repeatable {
        name: "70_erasure",
        sql: include_str!("../../../migrations/repeatable/70_erasure.sql"),
    },
    Repeatable {
        name: "90_security",
        sql: include_str!("../../../migrations/repeatable/90_security.sql"),
    },
];

impl Repeatable {
    /// SHA-256 of the SQL, hex.
    pub fn checksum(&self) -> String {
        sha256_hex(self.sql)
    }
}

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What a migration run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// Versions applied by this run.
    pub applied: Vec<i32>,
    /// Versions that were already applied.
    pub already_applied: Vec<i32>,
    /// Repeatable files applied by this run (all of them, in order, or none).
    pub repeatable_applied: Vec<String>,
    /// The storage mode of `events_v2` (`timescaledb` or `native`).
    pub storage_mode: String,
}

/// A migration and whether it has run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationStatus {
    /// The number in its file name.
    pub version: i32,
    /// Its name.
    pub name: String,
    /// When it ran, if it has.
    pub applied_at: Option<DateTime<Utc>>,
    /// False when the applied file has since been edited.
    pub checksum_ok: bool,
}

impl Migration {
    /// SHA-256 of the SQL, hex.
    pub fn checksum(&self) -> String {
        sha256_hex(self.sql)
    }

    /// Whether a database that recorded `checksum` for this file applied this file.
    pub fn accepts(&self, checksum: &str) -> bool {
        checksum == self.checksum() || self.earlier_checksums.contains(&checksum)
    }
}

const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS synap_migrations (
    version     integer     PRIMARY KEY,
    name        text        NOT NULL,
    checksum    text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    duration_ms bigint      NOT NULL
)";

const CREATE_REPEATABLE_TABLE: &str = "CREATE TABLE IF NOT EXISTS synap_repeatable_migrations (
    name        text        PRIMARY KEY,
    checksum    text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    duration_ms bigint      NOT NULL
);
ALTER TABLE synap_repeatable_migrations ENABLE ROW LEVEL SECURITY";

/// What a repeatable file writes for the store's schema (as psql's variables look), replaced with
/// the schema's quoted name before the file runs.
const STORE_SCHEMA: &str = ":\"store_schema\"";

const NO_TIMEOUT: &str = "SET LOCAL statement_timeout = 0";

/// Key of the advisory lock: one per schema.
const LOCK: &str = "SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.synap_migrations'))";

/// Key of the advisory lock taken while the first migration may create TimescaleDB: one per
/// database.
const EXTENSION_LOCK: &str = "SELECT pg_advisory_xact_lock(hashtext('synap.timescaledb_extension'))";

pub(crate) async fn run(client: &mut crate::db::conn::Conn, mode: StorageMode) -> Result<MigrationReport> {
    {
        let tx = client.transaction().await?;
        // A configured statement timeout is for the application's queries, not schema changes
        // nor the wait for another process's migration (a wait under the locks below counts).
        tx.batch_execute(NO_TIMEOUT).await?;
        tx.batch_execute(LOCK).await?;
        tx.batch_execute(CREATE_TABLE).await?;
        tx.commit().await?;
    }
    let mut report = MigrationReport {
        applied: Vec::new(),
        already_applied: Vec::new(),
        repeatable_applied: Vec::new(),
        storage_mode: String::new(),
    };
    for migration in MIGRATIONS {
        let tx = client.transaction().await?;
        tx.batch_execute(NO_TIMEOUT).await?;
        tx.batch_execute(LOCK).await?;
        let row = tx
            .query_opt(
                "SELECT checksum FROM synap_migrations WHERE version = $1",
                &[&migration.version],
            )
            .await?;
        let checksum = migration.checksum();
        if let Some(row) = row {
            let applied: String = row.get(0);
            if !migration.accepts(&applied) {
                return Err(Error::MigrationChecksumMismatch {
                    version: migration.version,
                    name: migration.name.to_owned(),
                    applied,
                    current: checksum,
                });
            }
            report.already_applied.push(migration.version);
            continue;
        }
        if migration.version == 1 && mode != StorageMode::Native {
            // One database, one extension: stores in several schemas migrated at once must not
            // race to create it (the loser's CREATE EXTENSION fails, and `auto` would settle
            // for native partitions).
            tx.batch_execute(EXTENSION_LOCK).await?;
        }
        if migration.version == 1 && mode == StorageMode::Timescaledb {
            check_timescaledb(tx.client()).await?;
        }
        if migration.version == 1 && mode == StorageMode::Citus {
            check_citus(tx.client()).await?;
        }
        let started = Instant::now();
        tx.execute("SELECT set_config('synap.storage_mode', $1, true)", &[&mode.as_str()])
            .await?;
        tx.batch_execute(migration.sql)
            .await
            .map_err(|e| Error::MigrationFailed {
                version: migration.version,
                name: migration.name.to_owned(),
                message: e
                    .as_db_error()
                    .map(|d| d.message().to_owned())
                    .unwrap_or_else(|| e.to_string()),
            })?;
        let duration_ms = started.elapsed().as_millis() as i64;
        tx.execute(
            "INSERT INTO synap_migrations (version, name, checksum, duration_ms) VALUES ($1, $2, $3, $4)",
            &[&migration.version, &migration.name, &checksum, &duration_ms],
        )
        .await?;
        tx.commit().await?;
        report.applied.push(migration.version);
    }
    report.repeatable_applied = apply_repeatable(client, !report.applied.is_empty()).await?;
    report.storage_mode = client
        .query_one("SELECT value FROM synap_settings WHERE key = 'storage_mode'", &[])
        .await?
        .get(0);
    Ok(report)
}

/// Applies every repeatable file, in order and in one transaction, when one of them changed
/// since the last run or `versioned_applied` (a versioned file ran, which may have replaced what
/// they define); returns the names applied.
async fn apply_repeatable(client: &mut crate::db::conn::Conn, versioned_applied: bool) -> Result<Vec<String>> {
    let tx = client.transaction().await?;
    tx.batch_execute(NO_TIMEOUT).await?;
    tx.batch_execute(LOCK).await?;
    tx.batch_execute(CREATE_REPEATABLE_TABLE).await?;
    // On Citus: DDL on distributed tables over one connection per worker, as the versioned files
    // do (a placeholder that nothing reads elsewhere).
    tx.batch_execute("SET LOCAL citus.multi_shard_modify_mode = 'sequential'")
        .await?;
    let recorded: std::collections::HashMap<String, String> = tx
        .query("SELECT name, checksum FROM synap_repeatable_migrations", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let current = REPEATABLE
        .iter()
        .all(|r| recorded.get(r.name).is_some_and(|c| *c == r.checksum()));
    if current && !versioned_applied {
        return Ok(Vec::new());
    }
    // Definer functions name the store's schema in their search_path (90_security.sql).
    let schema: String = tx.query_one("SELECT quote_ident(current_schema())", &[]).await?.get(0);
    let mut applied = Vec::with_capacity(REPEATABLE.len());
    for file in REPEATABLE {
        let started = Instant::now();
        let sql = file.sql.replace(STORE_SCHEMA, &schema);
        tx.batch_execute(&sql).await.map_err(|e| Error::MigrationFailed {
            version: 0,
            name: format!("repeatable/{}", file.name),
            message: e
                .as_db_error()
                .map(|d| d.message().to_owned())
                .unwrap_or_else(|| e.to_string()),
        })?;
        let duration_ms = started.elapsed().as_millis() as i64;
        tx.execute(
            "INSERT INTO synap_repeatable_migrations (name, checksum, duration_ms) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE
                SET checksum = EXCLUDED.checksum, applied_at = now(), duration_ms = EXCLUDED.duration_ms",
            &[&file.name, &file.checksum(), &duration_ms],
        )
        .await?;
        applied.push(file.name.to_owned());
    }
    tx.commit().await?;
    Ok(applied)
}

/// Fails with [`Error::StorageModeUnavailable`] unless the database has TimescaleDB or can
/// create it (installed and preloaded): CREATE EXTENSION without the preload ends the session.
async fn check_timescaledb(client: &impl tokio_postgres::GenericClient) -> Result<()> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'),
                    EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'),
                    'timescaledb' = ANY (string_to_array(
                        replace(replace(current_setting('shared_preload_libraries'), ' ', ''), '\"', ''), ','))",
            &[],
        )
        .await?;
    let (created, installed, preloaded): (bool, bool, bool) = (row.get(0), row.get(1), row.get(2));
    let message = if created || (installed && preloaded) {
        return Ok(());
    } else if !installed {
        "the timescaledb extension is not installed on this server"
    } else {
        "timescaledb is installed but not in shared_preload_libraries; add it there and restart the server"
    };
    Err(Error::StorageModeUnavailable {
        requested: "timescaledb".into(),
        message: message.into(),
    })
}

/// Fails with [`Error::StorageModeUnavailable`] unless the database has the citus extension and
/// at least one active worker.
async fn check_citus(client: &impl tokio_postgres::GenericClient) -> Result<()> {
    let created: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')",
            &[],
        )
        .await?
        .get(0);
    let message = if !created {
        "the citus extension is not created in this database"
    } else {
        let workers: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_dist_node WHERE isactive AND noderole = 'primary' AND groupid <> 0",
                &[],
            )
            .await?
            .get(0);
        if workers > 0 {
            return Ok(());
        }
        "the Citus cluster has no active worker: add one with citus_add_node()"
    };
    Err(Error::StorageModeUnavailable {
        requested: "citus".into(),
        message: message.into(),
    })
}

pub(crate) async fn status(client: &mut crate::db::conn::Conn) -> Result<Vec<MigrationStatus>> {
    let exists: bool = client
        .query_one("SELECT to_regclass('synap_migrations') IS NOT NULL", &[])
        .await?
        .get(0);
    let rows = if exists {
        client
            .query("SELECT version, checksum, applied_at FROM synap_migrations", &[])
            .await?
    } else {
        Vec::new()
    };
    Ok(MIGRATIONS
        .iter()
        .map(|m| {
            let row = rows.iter().find(|r| r.get::<_, i32>(0) == m.version);
            MigrationStatus {
                version: m.version,
                name: m.name.to_owned(),
                applied_at: row.map(|r| r.get(2)),
                checksum_ok: row.is_none_or(|r| m.accepts(&r.get::<_, String>(1))),
            }
        })
        .collect())
}
