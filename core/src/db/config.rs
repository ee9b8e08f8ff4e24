use std::time::Duration;

use crate::error::{Error, Result};
use crate::validate::Limits;

/// How `events_v2` is stored; decided when the first migration runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StorageMode {
    /// Citus when the database has the extension and active workers; otherwise TimescaleDB when
    /// the extension can be created, native partitioning otherwise.
    #[default]
    Auto,
    /// A TimescaleDB hypertable with 1-day chunks; the migration fails without the extension.
    Timescaledb,
    /// Native declarative range partitioning by day.
    Native,
    /// Native partitioning, distributed by aggregate over a Citus cluster (docs/scale-out.md);
    /// the migration fails without the extension and at least one active worker.
    Citus,
}

impl StorageMode {
    /// The value of the `synap.storage_mode` setting.
    pub fn as_str(self) -> &'static str {
        match self {
            StorageMode::Auto => "auto",
            StorageMode::Timescaledb => "timescaledb",
            StorageMode::Native => "native",
            StorageMode::Citus => "citus",
        }
    }

    /// Parses `auto`, `timescaledb`, `native` or `citus`.
    ///
    /// Fails with [`Error::InvalidConfig`] for anything else.
    pub fn parse(s: &str) -> Result<StorageMode> {
        match s.to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(StorageMode::Auto),
            "timescaledb" => Ok(StorageMode::Timescaledb),
            "native" => Ok(StorageMode::Native),
            "citus" => Ok(StorageMode::Citus),
            other => Err(Error::InvalidConfig {
                message: format!("storage mode must be auto, timescaledb, native or citus, not \"{other}\""),
            }),
        }
    }
}

/// Settings of an [`crate::EventRepository`].
#[derive(Debug, Clone)]
pub struct RepositoryConfig {
    /// A libpq-style connection string or `postgres://` URL.
    pub database_url: String,
    /// Largest number of pooled connections. Default 10.
    pub pool_size: usize,
    /// How long opening a connection may take. Default 10 s.
    pub connect_timeout: Duration,
    /// How long a call waits for a free pooled connection before failing with `POOL_TIMEOUT`.
    /// Default 30 s.
    pub acquire_timeout: Duration,
    /// Server-side `statement_timeout` for every statement; `None` leaves the server's default.
    pub statement_timeout: Option<Duration>,
    /// Schema holding the tables (set as `search_path`); `None` uses the server's default.
    /// Lowercase letters, digits and `_` only.
    pub schema: Option<String>,
    /// Storage mode for the first migration.
    pub storage_mode: StorageMode,
    /// Validation limits.
    pub limits: Limits,
    /// During the switch-over from the legacy events table: also write every appended event
    /// into this table (`id, user_id, timestamp, type, data, source, correlation_id`) in the same
    /// statement, so old readers keep working. A lowercase identifier, optionally
    /// schema-qualified (`events`, `public.events`). `None` (the default) turns it off.
    pub dual_write_legacy_table: Option<String>,
    /// Snapshot policy: a replay that folds at least this many events past the newest usable
    /// snapshot stores a snapshot of its result, so the next replay folds only what came after.
    /// `None` (the default): snapshots are written only by `snapshot()` and retention.
    pub snapshot_every: Option<u32>,
}

impl RepositoryConfig {
    /// Defaults for the given connection string.
    pub fn new(database_url: impl Into<String>) -> RepositoryConfig {
        RepositoryConfig {
            database_url: database_url.into(),
            pool_size: 10,
            connect_timeout: Duration::from_secs(10),
            acquire_timeout: Duration::from_secs(30),
            statement_timeout: None,
            schema: None,
            storage_mode: StorageMode::Auto,
            limits: Limits::default(),
            dual_write_legacy_table: None,
            snapshot_every: None,
        }
    }

    /// Defaults, with the connection string from the `DATABASE_URL` environment variable.
    ///
    /// Fails with [`Error::InvalidConfig`] when the variable is unset or empty.
    pub fn from_env() -> Result<RepositoryConfig> {
        match std::env::var("DATABASE_URL") {
            Ok(url) if !url.trim().is_empty() => Ok(RepositoryConfig::new(url)),
            _ => Err(Error::InvalidConfig {
                message: "DATABASE_URL is not set: set it to a PostgreSQL connection string, e.g. postgres://user@host:5432/db".into(),
            }),
        }
    }

    pub(crate) fn check(&self) -> Result<()> {
        if self.pool_size == 0 || self.pool_size > 1000 {
            return Err(Error::InvalidConfig {
                message: format!("pool size must be between 1 and 1000, not {}", self.pool_size),
            });
        }
        if let Some(timeout) = self.statement_timeout {
            // PostgreSQL's statement_timeout is an int of milliseconds.
            if timeout.as_millis() > i32::MAX as u128 {
                return Err(Error::InvalidConfig {
                    message: format!(
                        "statement timeout must be at most 2147483647 ms (PostgreSQL's limit), not {} ms",
                        timeout.as_millis()
                    ),
                });
            }
        }
        if let Some(schema) = &self.schema {
            let ok = !schema.is_empty()
                && schema.len() <= 63
                && schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                && schema
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !ok {
                return Err(Error::InvalidConfig {
                    message: format!("schema must be lowercase letters, digits and _ (at most 63), not \"{schema}\""),
                });
            }
        }
        if let Some(table) = &self.dual_write_legacy_table {
            crate::db::sql::quote_table(table)?;
        }
        Ok(())
    }
}
