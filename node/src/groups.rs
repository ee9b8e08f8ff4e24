//! Consumer groups: `consume` and `project` run a JavaScript handler on batches of the group's
//! events; the retries, parking, leases and checkpoints are the core's.

use std::sync::{Arc, Mutex};

use napi::bindgen_prelude::*;
use napi::threadsafe_function::ThreadsafeFunction;
use napi_derive::napi;
use synap_events as core;

use crate::records::EventRecord;
use crate::{js_to_json, refuse_hidden_value, spawn, to_js_error, Checked, Json};

type HandlerArgs = FnArgs<(Vec<EventRecord>, Option<ProjectionTransaction>)>;
/// The handler as the package entry wraps it: always returns a promise of nothing.
pub(crate) type HandlerFn = ThreadsafeFunction<HandlerArgs, Promise<()>, HandlerArgs, Status, false>;

/// How a run ended: `None` while it runs, then `Ok` or the coded error.
type Outcome = tokio::sync::watch::Receiver<Option<core::Result<()>>>;
/// What `start` gives `GroupRun::new`: the stop signal, the outcome, the member's name.
type Started = (Arc<tokio::sync::Notify>, Outcome, String);

/// The core's handler, calling JavaScript.
struct JsHandler(Arc<HandlerFn>);

/// A handler's rejection, as the core parks it.
#[derive(Debug)]
struct Rejected(String);

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Rejected {}

impl core::Handler for JsHandler {
    fn handle(&mut self, events: Vec<core::EventRecord>, tx: Option<core::ProjectionTx>) -> core::HandlerFuture {
        let f = self.0.clone();
        Box::pin(async move {
            let records: Vec<EventRecord> = events.into_iter().map(Into::into).collect();
            let slot = Arc::new(Mutex::new(tx));
            let js_tx = slot
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some()
                .then(|| ProjectionTransaction { tx: slot.clone() });
            let outcome = async {
                let promise = f.call_async_catch(FnArgs::from((records, js_tx))).await?;
                promise.await
            }
            .await;
            // The batch is over: the transaction is the core's again (a later `tx.query` from
            // JavaScript is refused instead of running outside the batch).
            slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            outcome.map_err(|e| Box::new(Rejected(e.reason.clone())) as core::HandlerError)
        })
    }
}

/// The transaction a projection's handler writes in, with the group's checkpoint; usable until
/// the handler's promise settles.
#[napi]
pub struct ProjectionTransaction {
    tx: Arc<Mutex<Option<core::ProjectionTx>>>,
}

#[napi]
impl ProjectionTransaction {
    /// Runs a statement in the batch's transaction, as node-postgres's `client.query(sql,
    /// params)`: resolves to `{ rows, rowCount }`. Parameters and columns: boolean, numbers,
    /// text, uuid, json/jsonb, timestamps as ISO strings, date; bigint columns come back as
    /// strings; cast other types in the SQL. A failing statement rejects and aborts the
    /// transaction: reject the handler too, and the batch is retried.
    #[napi(
        catch_unwind,
        ts_args_type = "sql: string, params?: unknown[]",
        ts_return_type = "Promise<{ rows: Array<Record<string, unknown>>; rowCount: number }>"
    )]
    pub fn query<'env>(&self, env: &'env Env, sql: String, params: Option<Unknown>) -> Result<PromiseRaw<'env, Json>> {
        let params = match params {
            Some(p) => {
                if let Err(e) = refuse_lossy_params(&p)? {
                    return Err(to_js_error(env, e));
                }
                js_to_json(env, p, Checked::Keys(&[])).map_err(|e| to_js_error(env, e))?
            }
            None => serde_json::Value::Array(Vec::new()),
        };
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
        // The statement joins the batch now, before the handler's promise can settle.
        let query = match (tx, params) {
            (Some(tx), serde_json::Value::Array(params)) => Ok(tx.query_json(sql, params)),
            (None, _) => Err(core::Error::Validation {
                field: "tx".into(),
                reason: core::IssueCode::OutOfRange,
                message: "the batch's transaction is over: use tx only until the handler's promise settles".into(),
            }),
            (Some(_), _) => Err(core::Error::invalid_input("params must be an array")),
        };
        spawn(env, async move { query?.await })
    }
}

/// A running `consume` or `project`: `stop()` finishes the batch in hand, leaves the group and
/// resolves; `done()` resolves when the run has stopped, or rejects with the database error
/// that ended it.
#[napi]
pub struct GroupRun {
    stop: Arc<tokio::sync::Notify>,
    outcome: Outcome,
    member: String,
}

#[napi]
impl GroupRun {
    /// This member's name in the group.
    #[napi(getter)]
    pub fn member(&self) -> String {
        self.member.clone()
    }

    /// Stops after the batch in hand and leaves the group; resolves once it has.
    #[napi(catch_unwind)]
    pub fn stop<'env>(&self, env: &'env Env) -> Result<PromiseRaw<'env, ()>> {
        self.stop.notify_one();
        self.done(env)
    }

    /// Resolves when the run has stopped; rejects with the error that ended it.
    #[napi(catch_unwind)]
    pub fn done<'env>(&self, env: &'env Env) -> Result<PromiseRaw<'env, ()>> {
        let mut outcome = self.outcome.clone();
        spawn(env, async move {
            match outcome.wait_for(Option::is_some).await {
                Ok(r) => r.clone().unwrap_or(Ok(())),
                Err(_) => Ok(()),
            }
        })
    }
}

/// Joins the group and starts the run on the runtime.
pub(crate) async fn start(
    repo: core::EventRepository,
    options: core::GroupOptions,
    handler: HandlerFn,
    transactional: bool,
) -> core::Result<Started> {
    let mut member = repo.join_group(options).await?;
    let name = member.name().to_owned();
    let stop = Arc::new(tokio::sync::Notify::new());
    let (send, receive) = tokio::sync::watch::channel(None);
    let stopping = stop.clone();
    napi::bindgen_prelude::spawn(async move {
        let handler = JsHandler(Arc::new(handler));
        let run =
            std::panic::AssertUnwindSafe(member.run(handler, transactional, async move { stopping.notified().await }));
        let result = match futures_util::FutureExt::catch_unwind(run).await {
            Ok(outcome) => outcome,
            Err(panic) => Err(core::Error::Internal {
                message: crate::panic_message(&panic),
            }),
        };
        let _ = send.send(Some(result));
    });
    Ok((stop, receive, name))
}

impl GroupRun {
    pub(crate) fn new(parts: Started) -> GroupRun {
        GroupRun {
            stop: parts.0,
            outcome: parts.1,
            member: parts.2,
        }
    }
}

/// `VALIDATION_FAILED` for a parameter, or an element of an array parameter, that is a NaN or
/// infinite number or an invalid `Date`: `JSON.stringify` would send it as null.
fn refuse_lossy_params(params: &Unknown) -> Result<core::Result<()>> {
    if !params.is_array()? {
        return Ok(Ok(()));
    }
    let items: Object = unsafe { params.cast()? };
    for i in 0..items.get_array_length()? {
        let item: Unknown = items.get_element(i)?;
        if let Err(e) = refuse_hidden_value(&item, format!("params[{i}]"))? {
            return Ok(Err(e));
        }
        if item.is_array()? {
            let inner: Object = unsafe { item.cast()? };
            for j in 0..inner.get_array_length()? {
                let element: Unknown = inner.get_element(j)?;
                if let Err(e) = refuse_hidden_value(&element, format!("params[{i}][{j}]"))? {
                    return Ok(Err(e));
                }
            }
        }
    }
    Ok(Ok(()))
}
