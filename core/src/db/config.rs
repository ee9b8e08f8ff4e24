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

/// How the repository's connections reach PostgreSQL (docs/api.md, "Connection poolers").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pooler {
    /// Decided from the connection string: `pooler=transaction` or `pooler=none` in its query
    /// (taken out before connecting), or `pgbouncer=true` (Prisma's flag); a host name with
    /// `-pooler.` in it (Neon's pooled endpoints) or port 6543 (Supabase's transaction pooler)
    /// means a transaction-mode pooler. Otherwise a direct connection.
    #[default]
    Auto,
    /// A direct connection (or a pooler in session mode): the schema, the statement timeout and
    /// the other settings are the connections' startup parameters, and statements are prepared
    /// once per connection.
    None,
    /// A pooler in transaction mode (PgBouncer, Neon's and Supabase's pooled URLs): consecutive
    /// transactions of one connection may run on different server connections, so nothing of a
    /// session is used. Every call runs in transactions that begin with `SET LOCAL` of the
    /// settings; no named statement outlives its transaction; `subscribe` polls (or listens on
    /// [`RepositoryConfig::listen_url`]); the legacy migration refuses to run (it needs session
    /// locks: give it a direct URL).
    Transaction,
}

impl Pooler {
    /// Parses `auto`, `none` or `transaction`.
    ///
    /// Fails with [`Error::InvalidConfig`] for anything else.
    pub fn parse(s: &str) -> Result<Pooler> {
        match s.to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(Pooler::Auto),
            "none" | "session" => Ok(Pooler::None),
            "transaction" => Ok(Pooler::Transaction),
            other => Err(Error::InvalidConfig {
                message: format!("pooler must be auto, none or transaction, not \"{other}\""),
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
    /// Whether the connection string goes through a transaction-mode pooler. Default
    /// [`Pooler::Auto`].
    pub pooler: Pooler,
    /// A direct (unpooled) connection string for `subscribe`'s LISTEN when the connections go
    /// through a transaction-mode pooler, which cannot hold a LISTEN (Neon's "unpooled" URL).
    /// Without it, subscribers there find new events by polling (`pollIntervalMs`).
    pub listen_url: Option<String>,
    /// Upcasters applied to every event this repository reads (docs/upcasting.md, and
    /// [`crate::upcast`]): streams, user, type and correlation reads, `read_all`, subscriptions,
    /// consumer groups, replay and `get_snapshot_and_tail`. Snapshots are made and used under
    /// this definition only. Default none.
    pub upcasters: std::sync::Arc<crate::upcast::Upcasters>,
    /// Rows a filtered page of the feed scans at most, matching or not (`read_all_filtered`,
    /// filtered subscriptions): the bound on one page's work. Default [`crate::SCAN_ROWS`].
    pub feed_scan_rows: i64,
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
            pooler: Pooler::Auto,
            listen_url: None,
            upcasters: Default::default(),
            feed_scan_rows: crate::db::feed::SCAN_ROWS,
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

/// The connection string without the repository's own `pooler=` and `pgbouncer=` parameters
/// (which PostgreSQL does not know), and what they say. A `key=value` string is returned as it is.
pub(crate) fn split_pooler(url: &str) -> Result<(String, Option<Pooler>)> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), None));
    };
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Ok((url.to_owned(), None));
    }
    let mut pooler = None;
    let mut kept = Vec::new();
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("pooler", value)) => pooler = Some(Pooler::parse(value)?),
            Some(("pgbouncer", "true")) => pooler = Some(Pooler::Transaction),
            Some(("pgbouncer", _)) => {}
            _ if pair.is_empty() => {}
            _ => kept.push(pair),
        }
    }
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, pooler))
}

/// Whether a parsed connection string names a known transaction-mode pooler: Neon's pooled
/// endpoints (`-pooler.` in the host name) or Supabase's transaction pooler (port 6543).
pub(crate) fn looks_pooled(config: &tokio_postgres::Config) -> bool {
    let neon = config.get_hosts().iter().any(|h| match h {
        tokio_postgres::config::Host::Tcp(name) => name.contains("-pooler."),
        #[cfg(unix)]
        tokio_postgres::config::Host::Unix(_) => false,
    });
    neon || config.get_ports().contains(&6543)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pooler_is_read_from_the_url_and_taken_out_of_it() {
        let split = |u: &str| split_pooler(u).unwrap();
        assert_eq!(split("postgres://h/db"), ("postgres://h/db".into(), None));
        assert_eq!(
            split("postgres://u@h:6432/db?pooler=transaction&sslmode=disable"),
            (
                "postgres://u@h:6432/db?sslmode=disable".into(),
                Some(Pooler::Transaction)
            )
        );
        assert_eq!(
            split("postgres://h/db?pgbouncer=true"),
            ("postgres://h/db".into(), Some(Pooler::Transaction))
        );
        assert_eq!(
            split("postgres://h/db?pooler=none"),
            ("postgres://h/db".into(), Some(Pooler::None))
        );
        assert_eq!(
            split_pooler("postgres://h/db?pooler=maybe").unwrap_err().code(),
            "INVALID_CONFIG"
        );
        assert_eq!(split("host=h dbname=d"), ("host=h dbname=d".into(), None));
        let parsed = |u: &str| u.parse::<tokio_postgres::Config>().unwrap();
        assert!(looks_pooled(&parsed(
            "postgres://u@ep-cool-name-123456-pooler.us-east-2.aws.neon.tech/db"
        )));
        assert!(looks_pooled(&parsed(
            "postgres://u@aws-0-eu.pooler.supabase.com:6543/postgres"
        )));
        assert!(!looks_pooled(&parsed(
            "postgres://u@ep-cool-name-123456.us-east-2.aws.neon.tech/db"
        )));
        assert!(!looks_pooled(&parsed("postgres://u@127.0.0.1:5432/db")));
    }
}
