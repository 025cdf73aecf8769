//! What the serving tests share: a mock model behind a gate, and a way to start a future.

use engine::{ForwardOutput, LanguageModel, MockModel, ModelInfo, SeqInput};
use std::future::Future;
use std::sync::{Condvar, Mutex};
use std::task::Poll;
use std::time::Duration;

/// The mock model behind a gate the test can close: a forward that starts while the gate
/// is closed waits inside the model until it opens. Every forward's rows per sequence
/// are logged.
pub struct Gated {
    pub inner: MockModel,
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    closed: bool,
    log: Vec<Vec<usize>>,
}

impl Gated {
    pub fn new() -> Self {
        Self {
            inner: MockModel::new(500, 4096, 0.5, 3),
            state: Mutex::default(),
            changed: Condvar::new(),
        }
    }

    pub fn set_closed(&self, closed: bool) {
        self.state.lock().unwrap().closed = closed;
        self.changed.notify_all();
    }

    pub fn log(&self) -> Vec<Vec<usize>> {
        self.state.lock().unwrap().log.clone()
    }

    /// Blocks until `n` forwards have started.
    pub fn wait_for_forwards(&self, n: usize) {
        let guard = self.state.lock().unwrap();
        let (_guard, timeout) = self
            .changed
            .wait_timeout_while(guard, Duration::from_secs(30), |s| s.log.len() < n)
            .unwrap();
        assert!(!timeout.timed_out(), "forward {n} never started");
    }
}

impl LanguageModel for Gated {
    type Cache = <MockModel as LanguageModel>::Cache;

    fn info(&self) -> &ModelInfo {
        self.inner.info()
    }

    fn new_cache(&self) -> Self::Cache {
        self.inner.new_cache()
    }

    fn forward_batch(
        &self,
        batch: &mut [(&mut Self::Cache, SeqInput<'_>)],
    ) -> engine::Result<Vec<ForwardOutput>> {
        let mut state = self.state.lock().unwrap();
        state
            .log
            .push(batch.iter().map(|(_, i)| i.tokens.len()).collect());
        self.changed.notify_all();
        let _open = self.changed.wait_while(state, |s| s.closed).unwrap();
        self.inner.forward_batch(batch)
    }
}

/// Polls a future once, so that whatever it does before its first await has happened.
pub async fn poll_once<F: Future + Unpin>(f: &mut F) {
    std::future::poll_fn(|cx| {
        let _ = std::pin::Pin::new(&mut *f).poll(cx);
        Poll::Ready(())
    })
    .await;
}
