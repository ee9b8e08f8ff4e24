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
//! own), and no statement is cached. A named statement must also be closed before its
//! transaction ends, or it stays behind on that server connection, where a later client's
//! statement of the same name fails (`42P05`); but every row a query returns holds its statement
//! until the row is dropped, and rows are often read after the commit. So there, [`Tx`] runs each
//! query returning rows as an unnamed statement (`query_typed`: the parameter types come from a
//! named statement prepared and closed first, or there are no parameters), which nothing needs to
//! close. A scoped user's setting is `SET LOCAL` in both modes ([`set_user_sql`]).
//!
//! Owns: [`Conn`], [`Tx`], [`Session`] and [`in_session!`]. Calls nothing of the repository's.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use deadpool_postgres::Object;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Row, Statement};

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
/// Without Citus's setting: what a statement needs where Citus is known to be absent.
fn pooled_settings(schema: Option<&str>, statement_timeout_ms: Option<u128>) -> (String, String) {
    let mut sql = String::new();
    if let Some(schema) = schema {
        // A checked identifier (lowercase letters, digits, `_`): quoted, nothing to escape.
        sql.push_str(&format!("SET LOCAL search_path = \"{schema}\"; "));
    }
    if let Some(ms) = statement_timeout_ms {
        sql.push_str(&format!("SET LOCAL statement_timeout = {}; ", ms.max(1)));
    }
    let plain = sql.trim_end_matches("; ").to_owned();
    sql.push_str("SET LOCAL citus.enable_deadlock_prevention = off");
    (sql, plain)
}

/// What a repository keeps for its connections through a transaction-mode pooler: the settings
/// each transaction begins with, and what the server said of each statement text (its parameter
/// types, whether it returns rows), asked once with a named statement that is closed at once.
/// Then every later run is one unnamed statement (see the module's comment).
pub(crate) struct Pooled {
    settings: String,
    /// [`Pooled::settings`] without Citus's (`citus.enable_deadlock_prevention`), for a
    /// statement that is known to run where Citus is not: often nothing at all.
    plain: String,
    described: std::sync::Mutex<std::collections::HashMap<String, Arc<Described>>>,
}

/// A statement text as the server describes it.
pub(crate) struct Described {
    pub(crate) params: Vec<Type>,
    pub(crate) returns_rows: bool,
}

/// Statement texts remembered per repository (most are fixed; a few carry identifiers).
const DESCRIBED_MAX: usize = 1024;

impl Pooled {
    /// The settings of a repository in `schema` (`None`: the server's search path) with its
    /// statement timeout.
    pub(crate) fn new(schema: Option<&str>, statement_timeout_ms: Option<u128>) -> Pooled {
        let (settings, plain) = pooled_settings(schema, statement_timeout_ms);
        Pooled {
            settings,
            plain,
            described: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// The `SET LOCAL` statements each transaction begins with.
    pub(crate) fn settings(&self) -> &str {
        &self.settings
    }

    /// What the server said of `sql`, if it has been asked ([`Pooled::describe`]).
    fn described(&self, sql: &str) -> Option<Arc<Described>> {
        self.described
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(sql)
            .cloned()
    }

    /// `sql` as the server describes it: asked once per repository with a statement prepared
    /// and closed in `client`'s transaction (`cut` is its connection's [`Conn::cut`]; a
    /// projection's transaction closes its connection itself when cancelled).
    pub(crate) async fn describe<C: tokio_postgres::GenericClient>(
        &self,
        client: &C,
        cut: Option<&AtomicBool>,
        sql: &str,
    ) -> Result<Arc<Described>, tokio_postgres::Error> {
        if let Some(d) = self.described.lock().unwrap_or_else(|e| e.into_inner()).get(sql) {
            return Ok(d.clone());
        }
        // Cancelled while the statement is on its way, the call could not close it: its
        // connection is closed instead ([`Conn::cut`]).
        struct Armed<'a>(Option<&'a AtomicBool>);
        impl Drop for Armed<'_> {
            fn drop(&mut self) {
                if let Some(cut) = self.0 {
                    cut.store(true, Ordering::Release);
                }
            }
        }
        let mut armed = Armed(cut);
        let statement = client.prepare(sql).await;
        armed.0 = None;
        let statement = statement?;
        let described = Arc::new(Described {
            params: statement.params().to_vec(),
            returns_rows: !statement.columns().is_empty(),
        });
        drop(statement);
        let mut cache = self.described.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= DESCRIBED_MAX {
            cache.clear();
        }
        cache.insert(sql.to_owned(), described.clone());
        Ok(described)
    }

    /// Runs `sql` as an unnamed statement in `client`'s transaction: its rows, and how many rows
    /// it returned or changed.
    pub(crate) async fn run<C: tokio_postgres::GenericClient>(
        &self,
        client: &C,
        cut: Option<&AtomicBool>,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<(Vec<Row>, u64), tokio_postgres::Error> {
        let described = if params.is_empty() {
            None
        } else {
            Some(self.describe(client, cut, sql).await?)
        };
        let types = described.as_ref().map_or(&[][..], |d| &d.params[..]);
        if types.len() != params.len() {
            // Refused by the driver, with its message (nothing runs).
            let rows = client.query(sql, params).await?;
            let n = rows.len() as u64;
            return Ok((rows, n));
        }
        let typed: Vec<(&(dyn ToSql + Sync), Type)> = params.iter().copied().zip(types.iter().cloned()).collect();
        collect(client.query_typed_raw(sql, typed).await?).await
    }
}

/// `sql` on `client` (a transaction's, or a connection inside a transaction it began itself):
/// through a pooler ([`Pooled::run`]), as an unnamed statement; otherwise, prepared by the driver.
pub(crate) async fn query_on<C: tokio_postgres::GenericClient>(
    client: &C,
    pooled: Option<(&Pooled, Option<&AtomicBool>)>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>, tokio_postgres::Error> {
    match pooled {
        Some((p, cut)) => Ok(p.run(client, cut, sql, params).await?.0),
        None => client.query(sql, params).await,
    }
}

/// Whether a statement of [`Conn::at_once`] may run on Citus, whose setting the settings carry.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Citus {
    Maybe,
    /// The caller knows the store is not on Citus (it found no function of the citus mode's).
    Absent,
}

/// The rows of a statement's stream, and how many rows it returned or changed.
async fn collect(stream: tokio_postgres::RowStream) -> Result<(Vec<Row>, u64), tokio_postgres::Error> {
    use futures_util::TryStreamExt;
    futures_util::pin_mut!(stream);
    let mut rows = Vec::new();
    while let Some(row) = stream.try_next().await? {
        rows.push(row);
    }
    let n = stream.rows_affected().unwrap_or(rows.len() as u64);
    Ok((rows, n))
}

/// `begin` (statements without parameters, the first of them `BEGIN`), `statement` and `COMMIT`
/// written together ([`Conn::at_once`]). The driver writes each request when its future is first
/// polled, and `join3` polls them in order, so they leave in this order without waiting for each
/// other's answers; the server answers each in turn. The first error wins: after one, the server refuses what follows
/// in the transaction and takes the `COMMIT` for a rollback.
async fn pipelined(
    client: &tokio_postgres::Client,
    begin: &str,
    statement: impl std::future::Future<Output = Result<(Vec<Row>, u64), tokio_postgres::Error>>,
) -> Result<(Vec<Row>, u64), tokio_postgres::Error> {
    let (began, ran, committed) =
        futures_util::future::join3(client.batch_execute(begin), statement, client.batch_execute("COMMIT")).await;
    began?;
    let out = ran?;
    committed?;
    Ok(out)
}

/// A connection of the pool (see the module's comment).
pub(crate) struct Conn {
    /// Present until [`Conn::into_parts`] or the drop.
    client: Option<Object>,
    /// Through a transaction-mode pooler: the `SET LOCAL` statements every transaction begins
    /// with, and what statements take ([`Pooled`]).
    pooled: Option<Arc<Pooled>>,
    /// Set when a call was cancelled while a named statement was on its way ([`Pooled::describe`]):
    /// the connection is then closed rather than put back, and the pooler closes the server
    /// connection it was in a transaction on, statement and all.
    cut: Arc<AtomicBool>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.cut.load(Ordering::Acquire) {
            if let Some(client) = self.client.take() {
                drop(Object::take(client));
            }
        }
    }
}

impl Conn {
    pub(crate) fn new(client: Object, pooled: Option<Arc<Pooled>>) -> Conn {
        Conn {
            client: Some(client),
            pooled,
            cut: Arc::new(AtomicBool::new(false)),
        }
    }

    fn object(&self) -> &Object {
        self.client.as_ref().expect("a connection until it is dropped")
    }

    fn object_mut(&mut self) -> &mut Object {
        self.client.as_mut().expect("a connection until it is dropped")
    }

    /// The connection and, through a pooler, the settings its transactions must begin with: for
    /// what drives its transactions itself (a projection's, which closes the connection itself
    /// when cancelled).
    pub(crate) fn into_parts(mut self) -> (Object, Option<Arc<Pooled>>) {
        let client = self.client.take().expect("a connection until it is dropped");
        (client, self.pooled.take())
    }

    /// Whether the connection goes through a transaction-mode pooler.
    pub(crate) fn pooled(&self) -> bool {
        self.pooled.is_some()
    }

    /// The client itself, for what needs no session: a statement with no parameters sent as a
    /// simple query (`pg_notify`), or the whole protocol, directly connected.
    pub(crate) fn raw(&self) -> &deadpool_postgres::ClientWrapper {
        self.object()
    }

    /// Begins a transaction; through a pooler, with the settings.
    pub(crate) async fn transaction(&mut self) -> Result<Tx<'_>> {
        self.begin("").await
    }

    /// Begins a transaction and runs `sql` (statements without parameters, or nothing) first:
    /// through a pooler, after the settings, in the same round trip.
    pub(crate) async fn begin(&mut self, sql: &str) -> Result<Tx<'_>> {
        let (pooled, cut) = (self.pooled.clone(), self.cut.clone());
        let tx = self.object_mut().transaction().await?;
        match (&pooled, sql.is_empty()) {
            (None, true) => {}
            (None, false) => tx.batch_execute(sql).await?,
            (Some(p), true) => tx.batch_execute(p.settings()).await?,
            (Some(p), false) => tx.batch_execute(&format!("{}; {sql}", p.settings())).await?,
        }
        Ok(Tx { tx, pooled, cut })
    }

    /// Begins a transaction at an isolation level, read-only or not; through a pooler, with the
    /// settings.
    pub(crate) async fn transaction_with(
        &mut self,
        isolation: tokio_postgres::IsolationLevel,
        read_only: bool,
    ) -> Result<Tx<'_>> {
        let (pooled, cut) = (self.pooled.clone(), self.cut.clone());
        let tx = self
            .object_mut()
            .build_transaction()
            .isolation_level(isolation)
            .read_only(read_only)
            .start()
            .await?;
        if let Some(p) = &pooled {
            tx.batch_execute(p.settings()).await?;
        }
        Ok(Tx { tx, pooled, cut })
    }

    /// `sql` in a transaction of its own that begins with `prefix` (statements without
    /// parameters: a scoped user's [`set_user_sql`], or nothing), in one round trip: `BEGIN` with
    /// the settings and `prefix` as one simple query, the statement, and `COMMIT` are written
    /// together, and the server answers them in order (a pipeline). A transaction of the usual
    /// kind waits for each: four round trips through a pooler or for a scoped user. Directly
    /// connected with no `prefix`, the statement alone (autocommit), prepared once per
    /// connection. Its rows, and how many rows it returned or changed.
    ///
    /// `None` when it cannot: through a pooler, a statement text whose parameter types have not
    /// been asked yet ([`Pooled::describe`] needs a transaction of the usual kind); the caller
    /// then runs it that way. Once written, the three are on their way together: an error of the
    /// statement makes the `COMMIT` a rollback, and a call dropped after the write leaves the
    /// server to finish the transaction, committed or not, so the connection is never left
    /// inside one.
    pub(crate) async fn at_once(
        &mut self,
        prefix: &str,
        citus: Citus,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<(Vec<Row>, u64)>, tokio_postgres::Error> {
        let client: &deadpool_postgres::ClientWrapper = self.object();
        match &self.pooled {
            Some(p) => {
                let described = match params.is_empty() {
                    true => None,
                    false => match p.described(sql) {
                        Some(d) if d.params.len() == params.len() => Some(d),
                        _ => return Ok(None),
                    },
                };
                let types = described.as_ref().map_or(&[][..], |d| &d.params[..]);
                let settings = match citus {
                    Citus::Maybe => p.settings(),
                    Citus::Absent => &p.plain,
                };
                let begin = match (settings.is_empty(), prefix.is_empty()) {
                    (true, true) => String::new(),
                    (false, true) => format!("BEGIN; {settings}"),
                    (true, false) => format!("BEGIN; {prefix}"),
                    (false, false) => format!("BEGIN; {settings}; {prefix}"),
                };
                let typed: Vec<(&(dyn ToSql + Sync), Type)> =
                    params.iter().copied().zip(types.iter().cloned()).collect();
                let statement = async { collect(client.query_typed_raw(sql, typed).await?).await };
                match begin.is_empty() {
                    // Nothing to set: the statement alone is a transaction of its own.
                    true => statement.await.map(Some),
                    false => pipelined(client, &begin, statement).await.map(Some),
                }
            }
            None => {
                let statement = client.prepare_cached(sql).await?;
                let run = async { collect(client.query_raw(&statement, params.iter().copied()).await?).await };
                match prefix.is_empty() {
                    true => run.await.map(Some),
                    false => pipelined(client, &format!("BEGIN; {prefix}"), run).await.map(Some),
                }
            }
        }
    }

    /// One statement on its own (a transaction of its own through a pooler).
    pub(crate) async fn query(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        if self.pooled.is_none() {
            return Ok(self.object().query(sql, params).await?);
        }
        if let Some((rows, _)) = self.at_once("", Citus::Maybe, sql, params).await? {
            return Ok(rows);
        }
        let tx = self.transaction().await?;
        let rows = tx.query(sql, params).await?;
        tx.commit().await?;
        Ok(rows)
    }

    /// [`Conn::query`] of exactly one row.
    pub(crate) async fn query_one(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row> {
        one(self.query(sql, params).await?, Stmt::Text(sql))
    }

    /// [`Conn::query`] of at most one row.
    pub(crate) async fn query_opt(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>> {
        at_most_one(self.query(sql, params).await?, Stmt::Text(sql))
    }

    /// [`Conn::query`] of a statement that returns no rows: how many it changed.
    pub(crate) async fn execute(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        if self.pooled.is_none() {
            return Ok(self.object().execute(sql, params).await?);
        }
        if let Some((_, n)) = self.at_once("", Citus::Maybe, sql, params).await? {
            return Ok(n);
        }
        let tx = self.transaction().await?;
        let n = tx.execute(sql, params).await?;
        tx.commit().await?;
        Ok(n)
    }

    /// Statements without parameters, as one simple query (in one transaction through a pooler).
    pub(crate) async fn batch_execute(&mut self, sql: &str) -> Result<()> {
        match &self.pooled {
            None => Ok(self.object().batch_execute(sql).await?),
            Some(p) => {
                let p = p.clone();
                let tx = self.object_mut().transaction().await?;
                tx.batch_execute(&format!("{}; {sql}", p.settings())).await?;
                tx.commit().await?;
                Ok(())
            }
        }
    }
}

/// A statement to run: SQL text, or one prepared by [`Session::prepare_cached`] or [`Tx::prepare`].
#[derive(Clone, Copy)]
pub(crate) enum Stmt<'s> {
    Text(&'s str),
    Named(&'s Statement),
}

impl<'s> From<&'s str> for Stmt<'s> {
    fn from(sql: &'s str) -> Stmt<'s> {
        Stmt::Text(sql)
    }
}

impl<'s> From<&'s String> for Stmt<'s> {
    fn from(sql: &'s String) -> Stmt<'s> {
        Stmt::Text(sql)
    }
}

impl<'s> From<&'s Statement> for Stmt<'s> {
    fn from(statement: &'s Statement) -> Stmt<'s> {
        Stmt::Named(statement)
    }
}

/// What [`Session::prepare_cached`] gives: a statement prepared once per connection, directly
/// connected; through a pooler, the text, run as an unnamed statement each time.
pub(crate) enum Prepared<'s> {
    Named(Statement),
    Text(&'s str),
}

impl<'s> From<&'s Prepared<'_>> for Stmt<'s> {
    fn from(prepared: &'s Prepared<'_>) -> Stmt<'s> {
        match prepared {
            Prepared::Named(statement) => Stmt::Named(statement),
            Prepared::Text(sql) => Stmt::Text(sql),
        }
    }
}

impl std::fmt::Display for Stmt<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stmt::Text(sql) => f.write_str(sql),
            Stmt::Named(_) => f.write_str("a prepared statement"),
        }
    }
}

/// The one row a query must return.
fn one(mut rows: Vec<Row>, statement: Stmt<'_>) -> Result<Row> {
    match rows.len() {
        1 => Ok(rows.remove(0)),
        n => Err(crate::error::Error::Internal {
            message: format!("expected one row, got {n}: {statement}"),
        }),
    }
}

/// The row a query returns, if any.
fn at_most_one(mut rows: Vec<Row>, statement: Stmt<'_>) -> Result<Option<Row>> {
    match rows.len() {
        0 => Ok(None),
        1 => Ok(Some(rows.remove(0))),
        n => Err(crate::error::Error::Internal {
            message: format!("expected at most one row, got {n}: {statement}"),
        }),
    }
}

/// A transaction of a [`Conn`]. Through a pooler, a query returning rows runs as an unnamed
/// statement (see the module's comment); a statement of [`Tx::prepare`] is the caller's to drop
/// before the transaction ends, with every row it returned.
pub(crate) struct Tx<'a> {
    tx: deadpool_postgres::Transaction<'a>,
    pooled: Option<Arc<Pooled>>,
    /// Its connection's [`Conn::cut`].
    cut: Arc<AtomicBool>,
}

impl Tx<'_> {
    /// The driver's transaction, for code written for any client: its statements are named, so
    /// it must drop every row they return before the transaction ends (see [`Tx::pooled`]).
    pub(crate) fn client(&self) -> &tokio_postgres::Transaction<'_> {
        &self.tx
    }

    /// Through a pooler, what runs statements of [`Tx::client`] unnamed ([`Pooled::run`]), and
    /// the connection's [`Conn::cut`].
    pub(crate) fn pooled(&self) -> Option<(&Pooled, &AtomicBool)> {
        self.pooled.as_deref().map(|p| (p, &*self.cut))
    }

    pub(crate) async fn query<'s>(
        &self,
        statement: impl Into<Stmt<'s>>,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        match (statement.into(), &self.pooled) {
            (Stmt::Named(statement), _) => self.tx.query(statement, params).await,
            (Stmt::Text(sql), None) => self.tx.query(sql, params).await,
            (Stmt::Text(sql), Some(p)) => Ok(p.run(self.client(), Some(&self.cut), sql, params).await?.0),
        }
    }

    pub(crate) async fn query_one<'s>(
        &self,
        statement: impl Into<Stmt<'s>>,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row> {
        let statement = statement.into();
        one(self.query(statement, params).await?, statement)
    }

    pub(crate) async fn query_opt<'s>(
        &self,
        statement: impl Into<Stmt<'s>>,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>> {
        let statement = statement.into();
        at_most_one(self.query(statement, params).await?, statement)
    }

    /// A statement's count of changed rows.
    pub(crate) async fn execute<'s>(
        &self,
        statement: impl Into<Stmt<'s>>,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, tokio_postgres::Error> {
        match (statement.into(), &self.pooled) {
            (Stmt::Named(statement), _) => self.tx.execute(statement, params).await,
            (Stmt::Text(sql), None) => self.tx.execute(sql, params).await,
            (Stmt::Text(sql), Some(p)) => Ok(p.run(self.client(), Some(&self.cut), sql, params).await?.1),
        }
    }

    pub(crate) async fn query_typed(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        self.tx.query_typed(sql, params).await
    }

    pub(crate) async fn batch_execute(&self, sql: &str) -> Result<(), tokio_postgres::Error> {
        self.tx.batch_execute(sql).await
    }

    /// A named statement: drop it, and every row it returned, before the transaction ends.
    pub(crate) async fn prepare(&self, sql: &str) -> Result<Statement, tokio_postgres::Error> {
        self.tx.prepare(sql).await
    }

    pub(crate) async fn bind(
        &self,
        statement: &Statement,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<tokio_postgres::Portal, tokio_postgres::Error> {
        self.tx.bind(statement, params).await
    }

    pub(crate) async fn query_portal(
        &self,
        portal: &tokio_postgres::Portal,
        max_rows: i32,
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        self.tx.query_portal(portal, max_rows).await
    }

    pub(crate) async fn commit(self) -> Result<(), tokio_postgres::Error> {
        // Debug builds (the tests) check through a pooler that no named statement is left on the
        // server connection for the next client.
        #[cfg(debug_assertions)]
        if self.pooled.is_some() {
            let left = self
                .tx
                .query_typed("SELECT name || ': ' || statement FROM pg_prepared_statements", &[])
                .await?;
            let left: Vec<String> = left.iter().map(|r| r.get(0)).collect();
            assert!(left.is_empty(), "named statements left at commit: {left:?}");
        }
        self.tx.commit().await
    }

    pub(crate) async fn rollback(self) -> Result<(), tokio_postgres::Error> {
        self.tx.rollback().await
    }
}

/// A connection or a transaction on one: the same queries run on either. Through a pooler it is
/// always a transaction ([`in_session!`]).
pub(crate) enum Session<'a, 'b> {
    Client(&'a deadpool_postgres::ClientWrapper),
    Tx(&'a Tx<'b>),
}

impl Session<'_, '_> {
    /// A prepared statement: cached by the connection, directly connected; through a pooler, the
    /// text (see [`Tx`]).
    pub(crate) async fn prepare_cached<'s>(&self, sql: &'s str) -> Result<Prepared<'s>, tokio_postgres::Error> {
        match self {
            Session::Client(c) => Ok(Prepared::Named(c.prepare_cached(sql).await?)),
            Session::Tx(t) if t.pooled.is_none() => Ok(Prepared::Named(t.tx.prepare_cached(sql).await?)),
            Session::Tx(_) => Ok(Prepared::Text(sql)),
        }
    }

    pub(crate) async fn query<'s>(
        &self,
        statement: impl Into<Stmt<'s>>,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        match (self, statement.into()) {
            (Session::Client(c), Stmt::Named(statement)) => c.query(statement, params).await,
            (Session::Client(c), Stmt::Text(sql)) => c.query(sql, params).await,
            (Session::Tx(t), statement) => t.query(statement, params).await,
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
            Session::Tx(t) => t.query_typed(statement, params).await,
        }
    }

    pub(crate) async fn query_opt<'s>(
        &self,
        statement: impl Into<Stmt<'s>>,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>> {
        let statement = statement.into();
        at_most_one(self.query(statement, params).await?, statement)
    }

    pub(crate) async fn query_one<'s>(
        &self,
        statement: impl Into<Stmt<'s>>,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row> {
        let statement = statement.into();
        one(self.query(statement, params).await?, statement)
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
                let $s = $crate::db::conn::Session::Tx(&tx);
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
