//! Connections: what every call of the repository runs its statements on, directly connected or
//! through a transaction-mode connection pooler (PgBouncer, Neon's and Supabase's pooled URLs).
//!
//! Directly connected, a pooled connection is a session: the schema (`search_path`), the
//! statement timeout and Citus's setting are its startup parameters, and statements are prepared
//! once per connection (`prepare_cached`).
//!
//! Through a pooler in transaction mode, consecutive transactions of one connection may run on
//! different server connections, and a statement outside a transaction is a transaction of its
//! own: nothing of a session survives, and a named statement prepared in one transaction is
//! unknown in the next. So there, every statement runs in a transaction that begins with `SET
//! LOCAL` of those settings ([`Conn::transaction`]; an autocommit call is a transaction of its
//! own), and every named statement is prepared in its transaction and closed before its end (never
//! cached). A scoped user's setting is `SET LOCAL` in both modes ([`set_user_sql`]).
//!
//! Owns: [`Conn`], [`Session`] and [`in_session!`]. Calls nothing of the repository's.

use std::sync::Arc;

use deadpool_postgres::Object;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use crate::error::Result;

/// The statements that set the user for row-level security until the end of the current
/// transaction only, so that a pooled connection never carries it into another caller's query.
/// `SET LOCAL` rather than `set_config`: on Citus the policies of distributed tables run on the
/// workers, and Citus passes a transaction's `SET LOCAL` commands on to them when
/// `citus.propagate_set_commands` says so (set here for the transaction too; elsewhere a
/// placeholder that nothing reads). The user id is a validated string without NUL, written as an
/// escape string literal, so that its quotes and backslashes read back unchanged whatever
/// `standard_conforming_strings` says.
pub(crate) fn set_user_sql(user: &str) -> String {
    let mut literal = String::with_capacity(user.len() + 3);
    literal.push_str("E'");
    for c in user.chars() {
        if c == '\\' || c == '\'' {
            literal.push('\\');
        }
        literal.push(c);
    }
    literal.push('\'');
    format!("SET LOCAL citus.propagate_set_commands = 'local'; SET LOCAL app.current_user_id = {literal}")
}

/// The `SET LOCAL` statements a transaction through a transaction-mode pooler begins with: what a
/// direct connection has from its startup parameters.
pub(crate) fn pooled_settings(schema: Option<&str>, statement_timeout_ms: Option<u128>) -> String {
    let mut sql = String::new();
    if let Some(schema) = schema {
        // A checked identifier (lowercase letters, digits, `_`): quoted, nothing to escape.
        sql.push_str(&format!("SET LOCAL search_path = \"{schema}\"; "));
    }
    if let Some(ms) = statement_timeout_ms {
        sql.push_str(&format!("SET LOCAL statement_timeout = {}; ", ms.max(1)));
    }
    sql.push_str("SET LOCAL citus.enable_deadlock_prevention = off");
    sql
}

/// A connection of the pool (see the module's comment).
pub(crate) struct Conn {
    client: Object,
    /// Through a transaction-mode pooler: the `SET LOCAL` statements every transaction begins
    /// with ([`pooled_settings`]).
    pooled: Option<Arc<str>>,
}

impl Conn {
    pub(crate) fn new(client: Object, pooled: Option<Arc<str>>) -> Conn {
        Conn { client, pooled }
    }

    /// The connection and, through a pooler, the settings its transactions must begin with: for
    /// what drives its transactions itself (a projection's).
    pub(crate) fn into_parts(self) -> (Object, Option<Arc<str>>) {
        (self.client, self.pooled)
    }

    /// Whether the connection goes through a transaction-mode pooler.
    pub(crate) fn pooled(&self) -> bool {
        self.pooled.is_some()
    }

    /// The client itself, for what needs no session: a statement with no parameters sent as a
    /// simple query (`pg_notify`), or the whole protocol, directly connected.
    pub(crate) fn raw(&self) -> &deadpool_postgres::ClientWrapper {
        &self.client
    }

    /// Begins a transaction; through a pooler, with the settings.
    pub(crate) async fn transaction(&mut self) -> Result<deadpool_postgres::Transaction<'_>> {
        self.begin("").await
    }

    /// Begins a transaction and runs `sql` (statements without parameters, or nothing) first:
    /// through a pooler, after the settings, in the same round trip.
    pub(crate) async fn begin(&mut self, sql: &str) -> Result<deadpool_postgres::Transaction<'_>> {
        let tx = self.client.transaction().await?;
        match (&self.pooled, sql.is_empty()) {
            (None, true) => {}
            (None, false) => tx.batch_execute(sql).await?,
            (Some(settings), true) => tx.batch_execute(settings).await?,
            (Some(settings), false) => tx.batch_execute(&format!("{settings}; {sql}")).await?,
        }
        Ok(tx)
    }

    /// Begins a transaction at an isolation level, read-only or not; through a pooler, with the
    /// settings.
    pub(crate) async fn transaction_with(
        &mut self,
        isolation: tokio_postgres::IsolationLevel,
        read_only: bool,
    ) -> Result<deadpool_postgres::Transaction<'_>> {
        let tx = self
            .client
            .build_transaction()
            .isolation_level(isolation)
            .read_only(read_only)
            .start()
            .await?;
        if let Some(settings) = &self.pooled {
            tx.batch_execute(settings).await?;
        }
        Ok(tx)
    }

    /// One statement on its own (a transaction of its own through a pooler).
    pub(crate) async fn query(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        if self.pooled.is_none() {
            return Ok(self.client.query(sql, params).await?);
        }
        let tx = self.transaction().await?;
        let rows = tx.query(sql, params).await?;
        tx.commit().await?;
        Ok(rows)
    }

    /// [`Conn::query`] of exactly one row.
    pub(crate) async fn query_one(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row> {
        let mut rows = self.query(sql, params).await?;
        match rows.len() {
            1 => Ok(rows.remove(0)),
            n => Err(crate::error::Error::Internal {
                message: format!("expected one row, got {n}: {sql}"),
            }),
        }
    }

    /// [`Conn::query`] of at most one row.
    pub(crate) async fn query_opt(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>> {
        let mut rows = self.query(sql, params).await?;
        match rows.len() {
            0 => Ok(None),
            1 => Ok(Some(rows.remove(0))),
            n => Err(crate::error::Error::Internal {
                message: format!("expected at most one row, got {n}: {sql}"),
            }),
        }
    }

    /// [`Conn::query`] of a statement that returns no rows: how many it changed.
    pub(crate) async fn execute(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        if self.pooled.is_none() {
            return Ok(self.client.execute(sql, params).await?);
        }
        let tx = self.transaction().await?;
        let n = tx.execute(sql, params).await?;
        tx.commit().await?;
        Ok(n)
    }

    /// Statements without parameters, as one simple query (in one transaction through a pooler).
    pub(crate) async fn batch_execute(&mut self, sql: &str) -> Result<()> {
        match &self.pooled {
            None => Ok(self.client.batch_execute(sql).await?),
            Some(settings) => {
                let tx = self.client.transaction().await?;
                tx.batch_execute(&format!("{settings}; {sql}")).await?;
                tx.commit().await?;
                Ok(())
            }
        }
    }
}

/// A connection or a transaction on one: the same queries run on either. Through a pooler it is
/// always a transaction ([`in_session!`]).
pub(crate) enum Session<'a, 'b> {
    Client(&'a deadpool_postgres::ClientWrapper),
    /// A transaction, and whether it runs through a transaction-mode pooler (then no statement
    /// is cached: each is prepared in the transaction and closed with its `Statement`).
    Tx(&'a deadpool_postgres::Transaction<'b>, bool),
}

impl Session<'_, '_> {
    /// A prepared statement: cached by the connection, directly connected; prepared anew in this
    /// transaction through a pooler (drop it before the transaction ends).
    pub(crate) async fn prepare_cached(&self, sql: &str) -> Result<tokio_postgres::Statement, tokio_postgres::Error> {
        match self {
            Session::Client(c) => c.prepare_cached(sql).await,
            Session::Tx(t, false) => t.prepare_cached(sql).await,
            Session::Tx(t, true) => t.prepare(sql).await,
        }
    }

    pub(crate) async fn query<T>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, tokio_postgres::Error>
    where
        T: ?Sized + tokio_postgres::ToStatement,
    {
        match self {
            Session::Client(c) => c.query(statement, params).await,
            Session::Tx(t, _) => t.query(statement, params).await,
        }
    }

    /// A query as an unnamed statement with its parameter types given: one round trip, and
    /// PostgreSQL plans it for the values at hand every time (partitions and chunks pruned while
    /// planning), where a prepared statement may switch to a generic plan.
    pub(crate) async fn query_typed(
        &self,
        statement: &str,
        params: &[(&(dyn ToSql + Sync), tokio_postgres::types::Type)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        match self {
            Session::Client(c) => c.query_typed(statement, params).await,
            Session::Tx(t, _) => t.query_typed(statement, params).await,
        }
    }

    pub(crate) async fn query_opt<T>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, tokio_postgres::Error>
    where
        T: ?Sized + tokio_postgres::ToStatement,
    {
        match self {
            Session::Client(c) => c.query_opt(statement, params).await,
            Session::Tx(t, _) => t.query_opt(statement, params).await,
        }
    }

    pub(crate) async fn query_one<T>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, tokio_postgres::Error>
    where
        T: ?Sized + tokio_postgres::ToStatement,
    {
        match self {
            Session::Client(c) => c.query_one(statement, params).await,
            Session::Tx(t, _) => t.query_one(statement, params).await,
        }
    }
}

/// Runs `$body` with `$s` bound to a [`Session`]: the connection itself, directly connected and
/// unscoped; otherwise a transaction that has set what it needs (the scoped user's
/// `app.current_user_id`; through a pooler, the settings), committed when `$body` succeeds and
/// rolled back when it fails. `$body` evaluates to a `Result`.
macro_rules! in_session {
    ($repo:expr, |$s:ident| $body:block) => {{
        let mut client = $repo.client().await?;
        let pooled = client.pooled();
        match $repo.scope.clone() {
            None if !pooled => {
                let $s = $crate::db::conn::Session::Client(client.raw());
                async { $body }.await
            }
            scope => {
                let user = scope.map(|u| $crate::db::conn::set_user_sql(&u)).unwrap_or_default();
                let tx = client.begin(&user).await?;
                let $s = $crate::db::conn::Session::Tx(&tx, pooled);
                let out: Result<_> = async { $body }.await;
                if out.is_ok() {
                    tx.commit().await?;
                }
                out
            }
        }
    }};
}
pub(crate) use in_session;
