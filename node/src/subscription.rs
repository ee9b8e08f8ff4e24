//! The async iterator that `subscribe` returns.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use napi::bindgen_prelude::*;
use napi_derive::napi;
use synap_events as core;

use crate::records::EventRecord;
use crate::{coded_reason, panic_message};

struct SubscriptionState {
    repo: core::EventRepository,
    options: Option<core::SubscribeOptions>,
    subscription: Option<core::Subscription>,
    buffer: std::collections::VecDeque<core::EventRecord>,
}

/// The async iterator returned by `subscribe`. Breaking out of the loop closes it.
#[napi(async_iterator)]
pub struct EventSubscription {
    state: Arc<tokio::sync::Mutex<SubscriptionState>>,
    /// Set and signalled by `return()`: a `next()` waiting for new events gives up at once.
    stop: Arc<tokio::sync::Notify>,
    stopped: Arc<std::sync::atomic::AtomicBool>,
}

#[napi]
impl AsyncGenerator for EventSubscription {
    type Yield = EventRecord;
    type Next = ();
    type Return = ();

    fn next(&mut self, _value: Option<()>) -> impl Future<Output = Result<Option<EventRecord>>> + Send + 'static {
        let state = self.state.clone();
        let stop = self.stop.clone();
        let stopped = self.stopped.clone();
        async move {
            let step = AssertUnwindSafe(async move {
                let mut state = state.lock().await;
                if stopped.load(std::sync::atomic::Ordering::SeqCst) {
                    return Ok(None);
                }
                if state.subscription.is_none() {
                    let Some(options) = state.options.take() else {
                        return Ok(None); // closed
                    };
                    let subscription = state.repo.subscribe(options).await?;
                    state.subscription = Some(subscription);
                }
                while state.buffer.is_empty() {
                    let Some(subscription) = state.subscription.as_mut() else {
                        return Ok(None);
                    };
                    let outcome = {
                        let batch = std::pin::pin!(subscription.next_batch());
                        let stopping = std::pin::pin!(stop.notified());
                        match futures_util::future::select(batch, stopping).await {
                            futures_util::future::Either::Left((batch, _)) => Some(batch),
                            futures_util::future::Either::Right(_) => None,
                        }
                    };
                    match outcome {
                        Some(batch) => state.buffer.extend(batch?),
                        None => {
                            state.subscription = None;
                            return Ok(None);
                        }
                    }
                }
                Ok(state.buffer.pop_front())
            })
            .catch_unwind()
            .await;
            match step {
                Ok(Ok(event)) => Ok(event.map(Into::into)),
                Ok(Err(e)) => Err(coded_reason(e)),
                Err(panic) => Err(coded_reason(core::Error::Internal {
                    message: panic_message(&panic),
                })),
            }
        }
    }

    fn complete(&mut self, _value: Option<()>) -> impl Future<Output = Result<Option<EventRecord>>> + Send + 'static {
        let state = self.state.clone();
        // Wake a `next()` that waits for events (a stored permit covers one about to wait).
        self.stopped.store(true, std::sync::atomic::Ordering::SeqCst);
        self.stop.notify_one();
        async move {
            let mut state = state.lock().await;
            state.subscription = None;
            state.options = None;
            state.buffer.clear();
            Ok(None)
        }
    }
}

impl EventSubscription {
    pub(crate) fn new(repo: core::EventRepository, options: core::SubscribeOptions) -> EventSubscription {
        EventSubscription {
            stop: Arc::new(tokio::sync::Notify::new()),
            stopped: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            state: Arc::new(tokio::sync::Mutex::new(SubscriptionState {
                repo,
                options: Some(options),
                subscription: None,
                buffer: std::collections::VecDeque::new(),
            })),
        }
    }
}
