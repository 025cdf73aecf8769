//! The draft scheduler: one worker thread owns the draft model's forwards. The draft calls
//! of different sessions that are in progress at the same time advance together, one step
//! each per batched forward (a plain step is one row, a lookahead step its window and
//! phrases, a catch-up a chunk of text the session's cache has not seen), so `n`
//! concurrent calls of `gamma` tokens take about `gamma` forwards of `n` sessions instead
//! of `n · gamma` forwards of one. A call that arrives joins at the next step; a lone call
//! runs as it would alone.

use crate::scheduler::forward_isolated;
use crate::sessions::{SessionTable, SlotRef, lock};
use crate::worker::WorkerHandle;
use decoding::{
    DecodingError, DraftCall, DraftOutcome, DraftRequest, DraftSession, DraftStep, PhrasePool,
    Result, ServerTiming, SessionId,
};
use engine::{LanguageModel, SeqInput};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::Instant;
use tokio::sync::oneshot;
use tracing::Span;

pub type DraftSessions<M> = SessionTable<DraftSession<<M as LanguageModel>::Cache>>;

/// What a draft call gets back: the outcome, and its queue and forward time (with, as
/// `batch_trees`, the most sessions one of its forwards carried).
pub type DraftReply = Result<(DraftOutcome, ServerTiming)>;

/// Rows of text a session catches up on per step, by default.
pub const CATCH_UP_CHUNK: u64 = 64;

struct DraftJob<M: LanguageModel> {
    id: SessionId,
    slot: SlotRef<DraftSession<M::Cache>>,
    request: DraftRequest,
    pool: Arc<PhrasePool>,
    enqueued: Instant,
    span: Span,
    reply: oneshot::Sender<DraftReply>,
}

/// A call under way, and what it has cost so far.
struct Active<M: LanguageModel> {
    job: DraftJob<M>,
    call: DraftCall,
    started: Instant,
    forward_s: f64,
    most_sessions: usize,
}

/// Handle to the worker; dropping it stops the worker after the calls under way.
pub struct DraftScheduler<M: LanguageModel> {
    worker: WorkerHandle<DraftJob<M>>,
}

impl<M: LanguageModel + 'static> DraftScheduler<M> {
    /// Whether the worker runs: if not, every call fails and health must say so.
    pub fn alive(&self) -> bool {
        self.worker.alive()
    }

    /// A worker that catches sessions up `chunk` rows per step.
    pub fn start(model: Arc<M>, sessions: Arc<DraftSessions<M>>, chunk: usize) -> Self {
        let worker = WorkerHandle::spawn("draft-scheduler", move |rx| {
            Worker {
                model,
                sessions,
                chunk: chunk.max(1),
                active: Vec::new(),
                waiting: VecDeque::new(),
            }
            .run(rx)
        });
        Self { worker }
    }

    /// Drafts for session `id` (whose slot is `slot`) with `pool`'s phrases.
    pub async fn draft(
        &self,
        id: SessionId,
        slot: SlotRef<DraftSession<M::Cache>>,
        request: DraftRequest,
        pool: Arc<PhrasePool>,
    ) -> DraftReply {
        let (reply, rx) = oneshot::channel();
        let job = DraftJob {
            id,
            slot,
            request,
            pool,
            enqueued: Instant::now(),
            span: Span::current(),
            reply,
        };
        if !self.worker.send(job) {
            return Err(stopped());
        }
        rx.await.map_err(|_| stopped())?
    }
}

fn stopped() -> DecodingError {
    DecodingError::Unavailable("the draft scheduler has stopped".into())
}

struct Worker<M: LanguageModel> {
    model: Arc<M>,
    sessions: Arc<DraftSessions<M>>,
    chunk: usize,
    active: Vec<Active<M>>,
    /// Calls for a session that has one under way already, in arrival order.
    waiting: VecDeque<DraftJob<M>>,
}

impl<M: LanguageModel> Worker<M> {
    fn run(mut self, rx: Receiver<DraftJob<M>>) {
        loop {
            if self.active.is_empty() {
                match rx.recv() {
                    Ok(job) => self.accept(job),
                    Err(_) => return,
                }
            }
            while let Ok(job) = rx.try_recv() {
                self.accept(job);
            }
            self.step();
        }
    }

    /// Starts a call, or queues it behind its session's call under way.
    fn accept(&mut self, job: DraftJob<M>) {
        if self.active.iter().any(|a| a.job.id == job.id) {
            self.waiting.push_back(job);
            return;
        }
        // A call whose caller gave up (cancelled, timed out) is dropped unstarted.
        if job.reply.is_closed() {
            return;
        }
        let started = {
            let mut guard = lock(&job.slot);
            let model = &*self.model;
            self.sessions.work_on(job.id, &mut guard, |s| {
                s.begin(model, &job.pool, &job.request)
            })
        };
        match started {
            Ok(call) => self.active.push(Active {
                job,
                call,
                started: Instant::now(),
                forward_s: 0.0,
                most_sessions: 0,
            }),
            Err(e) => {
                let _ = job.reply.send(Err(e));
            }
        }
    }

    /// One step of every call under way, in one forward; calls that are done reply.
    fn step(&mut self) {
        let max_pos = self.model.info().max_position;
        let slots: Vec<_> = self.active.iter().map(|a| a.job.slot.clone()).collect();
        let mut guards: Vec<_> = slots.iter().map(|s| lock(s)).collect();
        // Plan each call's next step; calls with none left (or whose caller left) end.
        let mut steps: Vec<Option<DraftStep>> = Vec::with_capacity(self.active.len());
        let mut ended: Vec<Option<Result<DraftOutcome>>> = Vec::with_capacity(self.active.len());
        let mut budget = self.sessions.budget(0);
        for (a, g) in self.active.iter_mut().zip(guards.iter_mut()) {
            if a.job.reply.is_closed() {
                steps.push(None);
                ended.push(Some(Err(DecodingError::Unavailable(
                    "the caller left".into(),
                ))));
                continue;
            }
            let chunk = self.chunk;
            let planned = self
                .sessions
                .work_on(a.job.id, g, |s| {
                    s.plan(max_pos, chunk, &a.job.pool, &a.call)
                })
                .and_then(|step| match step {
                    Some(step) => {
                        budget.grow(&g.state.cache, step.rows(), "its draft")?;
                        Ok(Some(step))
                    }
                    None => Ok(None),
                });
            match planned {
                Ok(Some(step)) => {
                    steps.push(Some(step));
                    ended.push(None);
                }
                Ok(None) => {
                    steps.push(None);
                    ended.push(Some(Ok(g.state.outcome(&mut a.call))));
                }
                Err(e) => {
                    steps.push(None);
                    ended.push(Some(Err(e)));
                }
            }
        }
        let sessions = steps.iter().flatten().count();
        if sessions > 0 {
            // A child of the first call it serves, as the verify scheduler's forwards are.
            let first = self.active.iter().zip(&steps).find(|(_, s)| s.is_some());
            let parent = first
                .map(|(a, _)| a.job.span.clone())
                .unwrap_or_else(Span::none);
            let span = tracing::debug_span!(
                parent: &parent,
                "draft forward",
                sessions,
                rows = steps.iter().flatten().map(DraftStep::rows).sum::<usize>(),
            );
            let t0 = Instant::now();
            let mut batch: Vec<(&mut M::Cache, SeqInput<'_>)> = guards
                .iter_mut()
                .zip(&steps)
                .filter_map(|(g, s)| s.as_ref().map(|s| (&mut g.state.cache, s.input())))
                .collect();
            let outs = span.in_scope(|| forward_isolated(&*self.model, &mut batch));
            drop(batch);
            let forward_s = t0.elapsed().as_secs_f64();
            let mut outs = outs.into_iter();
            for (((a, g), step), end) in self
                .active
                .iter_mut()
                .zip(guards.iter_mut())
                .zip(&steps)
                .zip(ended.iter_mut())
            {
                let Some(step) = step else { continue };
                a.forward_s += forward_s;
                a.most_sessions = a.most_sessions.max(sessions);
                let finished = outs.next().unwrap_or_else(|| {
                    Err(DecodingError::Backend(
                        "a forward output went missing".into(),
                    ))
                });
                let r = finished.and_then(|out| {
                    self.sessions.work_on(a.job.id, g, |s| {
                        s.finish(&a.job.pool, &mut a.call, step, &out)
                    })
                });
                if let Err(e) = r {
                    *end = Some(Err(e));
                }
            }
        }
        drop(guards);
        // Reply to the calls that ended, in order; their sessions' waiting calls start.
        let mut freed = Vec::new();
        let mut i = 0;
        for end in ended {
            let Some(result) = end else {
                i += 1;
                continue;
            };
            let a = self.active.remove(i);
            let timing = ServerTiming {
                queue: a
                    .started
                    .saturating_duration_since(a.job.enqueued)
                    .as_secs_f64(),
                forward: a.forward_s,
                total: a.job.enqueued.elapsed().as_secs_f64(),
                batch_trees: a.most_sessions as u32,
                batch_rows: 0,
                open_sessions: 0,
                batch_prefill_rows: 0,
            };
            tracing::trace!(parent: &a.job.span, sessions = a.most_sessions, "draft call done");
            let _ = a.job.reply.send(result.map(|o| (o, timing)));
            freed.push(a.job.id);
        }
        for id in freed {
            if let Some(k) = self.waiting.iter().position(|j| j.id == id) {
                let job = self
                    .waiting
                    .remove(k)
                    .expect("the position is in the queue");
                self.accept(job);
            }
        }
    }
}
