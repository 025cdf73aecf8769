//! A model worker thread fed through a channel, as both schedulers run one: dropping the
//! handle closes the channel, and the worker ends its loop after the jobs it has.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

pub(crate) struct WorkerHandle<J> {
    /// `None` once dropping began: closing the channel ends the worker's loop.
    jobs: Option<Sender<J>>,
    worker: Option<JoinHandle<()>>,
}

impl<J: Send + 'static> WorkerHandle<J> {
    /// Starts the thread `name` running `run` on the receiving end.
    pub(crate) fn spawn(name: &str, run: impl FnOnce(Receiver<J>) + Send + 'static) -> Self {
        let (tx, rx) = channel();
        let worker = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || run(rx))
            .unwrap_or_else(|e| panic!("spawning the {name} thread: {e}"));
        Self {
            jobs: Some(tx),
            worker: Some(worker),
        }
    }

    /// Whether the worker thread still runs (it ends when dropped, or when something
    /// outside the model's isolated forwards panicked).
    pub(crate) fn alive(&self) -> bool {
        self.worker.as_ref().is_some_and(|w| !w.is_finished())
    }

    /// Hands `job` to the worker; `false` when it has stopped.
    pub(crate) fn send(&self, job: J) -> bool {
        self.jobs.as_ref().is_some_and(|j| j.send(job).is_ok())
    }
}

impl<J> Drop for WorkerHandle<J> {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}
