//! The verify scheduler: one worker thread owns the model's forwards. Verify calls from
//! different sessions that are waiting when the worker comes free run as one batched
//! forward (linear layers over all rows, attention per session), so batching costs a lone
//! request nothing; a short wait gathers the trees of other sessions expected back soon.
//! New sessions prefill in chunks that ride along in those forwards, so a long prompt
//! delays the open sessions' rounds by at most one chunk per forward.

use crate::sessions::{Budget, SessionTable, Slot, SlotRef, lock};
use crate::worker::WorkerHandle;
use decoding::{DecodingError, DraftTree, Result, SamplingParams, ServerTiming, SessionId};
use decoding::{TargetSession, VerifyOutcome};
use engine::{ForwardOutput, KvState, LanguageModel, OutputSpec, SeqInput, Visibility};
use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tracing::Span;

pub type TargetSessions<M> = SessionTable<TargetSession<<M as LanguageModel>::Cache>>;

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Most tree nodes (rows) in one batched forward; a larger single tree runs alone.
    pub max_batch_tokens: usize,
    /// How long a forward may wait for the trees of open sessions expected back soon
    /// ([`Returns`]); never more than a tenth of the last forward ([`MAX_WAIT_SHARE`]).
    pub batch_wait: Duration,
    /// Most prompt rows of new sessions' prefills in one forward.
    pub prefill_chunk: usize,
}

/// The most a forward waits for late trees, as a share of the last forward's time: a
/// tree that misses a forward waits a whole one, so a short wait pays where the sessions'
/// work between verifies is shorter than it, and costs at most this share where a
/// session is away (drafting, say).
pub const MAX_WAIT_SHARE: f64 = 0.1;

/// What a verify job gets back: the outcome, and its queue and forward time.
pub type VerifyReply = Result<(VerifyOutcome, ServerTiming)>;

enum Job<M: LanguageModel> {
    Open {
        tokens: Vec<u32>,
        span: Span,
        reply: oneshot::Sender<Result<SessionId>>,
    },
    Verify(VerifyJob<M>),
}

struct VerifyJob<M: LanguageModel> {
    id: SessionId,
    slot: SlotRef<TargetSession<M::Cache>>,
    tree: DraftTree,
    sampling: SamplingParams,
    logprobs: Option<usize>,
    enqueued: Instant,
    /// The call's span, parent (or link) of the forward that serves it.
    span: Span,
    reply: oneshot::Sender<VerifyReply>,
}

/// Handle to the worker; dropping it stops the worker after the queued jobs.
pub struct Scheduler<M: LanguageModel> {
    worker: WorkerHandle<Job<M>>,
}

impl<M: LanguageModel + 'static> Scheduler<M> {
    pub fn start(model: Arc<M>, sessions: Arc<TargetSessions<M>>, config: SchedulerConfig) -> Self {
        let worker = WorkerHandle::spawn("verify-scheduler", move |rx| {
            Worker::new(model, sessions, config).run(rx)
        });
        Self { worker }
    }

    /// Prefills a new session on the worker, chunk by chunk alongside the verifies.
    pub async fn open(&self, tokens: Vec<u32>) -> Result<SessionId> {
        let (reply, rx) = oneshot::channel();
        self.send(Job::Open {
            tokens,
            span: Span::current(),
            reply,
        })?;
        rx.await.map_err(|_| stopped())?
    }

    pub async fn verify(
        &self,
        id: SessionId,
        slot: SlotRef<TargetSession<M::Cache>>,
        tree: DraftTree,
        sampling: SamplingParams,
        logprobs: Option<usize>,
    ) -> VerifyReply {
        let (reply, rx) = oneshot::channel();
        self.send(Job::Verify(VerifyJob {
            id,
            slot,
            tree,
            sampling,
            logprobs,
            enqueued: Instant::now(),
            span: Span::current(),
            reply,
        }))?;
        rx.await.map_err(|_| stopped())?
    }

    /// Whether the worker runs: if not, every call fails and health must say so.
    pub fn alive(&self) -> bool {
        self.worker.alive()
    }

    fn send(&self, job: Job<M>) -> Result<()> {
        match self.worker.send(job) {
            true => Ok(()),
            false => Err(stopped()),
        }
    }
}

fn stopped() -> DecodingError {
    DecodingError::Unavailable("the verify scheduler has stopped".into())
}

struct Worker<M: LanguageModel> {
    model: Arc<M>,
    sessions: Arc<TargetSessions<M>>,
    config: SchedulerConfig,
    queue: VecDeque<VerifyJob<M>>,
    /// Admitted sessions still prefilling, first come first served.
    prefills: VecDeque<Prefill<M>>,
    /// How long the last forward took.
    last_forward: Duration,
    returns: Returns,
}

/// When each session's last verify was answered, and how long it took the session to
/// send its next tree the time before: which missing trees a forward can expect within
/// its wait. A session that answers at once (a plain step, a round built from the pool) is
/// back in a moment, so the forward waits for it; one that drafts between verifies is
/// away longer than the wait allows, so the forward goes without it at once. Without
/// the wait, on cores the sessions share with the forward, one session a moment late
/// takes the next forward alone, and the sessions stay split into two alternating
/// forwards (each twice as often, each costing a forward's weight reads).
#[derive(Default)]
struct Returns {
    sessions: HashMap<SessionId, Away>,
}

#[derive(Default)]
struct Away {
    /// When its last verify was answered; `None` while its next tree is queued.
    answered: Option<Instant>,
    /// How long it took to send a tree after the previous answer.
    last: Option<Duration>,
}

impl Returns {
    fn arrived(&mut self, id: SessionId, at: Instant) {
        let away = self.sessions.entry(id).or_default();
        if let Some(answered) = away.answered.take() {
            away.last = Some(at.saturating_duration_since(answered));
        }
    }

    fn answered(&mut self, id: SessionId, at: Instant) {
        self.sessions.entry(id).or_default().answered = Some(at);
    }

    /// Forgets the sessions no longer `open`.
    fn keep_only(&mut self, open: &[SessionId]) {
        self.sessions.retain(|id, _| open.contains(id));
    }

    /// Until when a forward starting `now` waits, at most until `limit`: for every open
    /// session whose tree is not `queued` and is expected back by `limit`, until a little
    /// after it is expected (half as long again as it was away last time, and a
    /// millisecond). A session never answered yet is expected any moment (until `limit`);
    /// one overdue past that allowance is doing something else (its client reading, a
    /// draft call) and is not waited for. `None`: nobody to wait for.
    fn wait_until(
        &self,
        open: &[SessionId],
        queued: &HashSet<SessionId>,
        now: Instant,
        limit: Instant,
    ) -> Option<Instant> {
        let mut until = None;
        for id in open.iter().filter(|id| !queued.contains(id)) {
            let expected = match self.sessions.get(id) {
                Some(Away {
                    answered: Some(at),
                    last: Some(away),
                }) => {
                    let back = *at + *away;
                    let allowance = back + *away / 2 + Duration::from_millis(1);
                    if back > limit || allowance < now {
                        continue;
                    }
                    allowance.min(limit)
                }
                // Never answered (just opened), or no time away measured yet: due any
                // moment.
                _ => limit,
            };
            until = until.max(Some(expected));
        }
        until
    }
}

/// A session being prefilled; it enters the session table when its prompt is in the cache.
struct Prefill<M: LanguageModel> {
    session: TargetSession<M::Cache>,
    /// Every committed token; all but the last get a KV entry.
    tokens: Vec<u32>,
    /// The "prefill" span, open until the session is ready.
    span: Span,
    reply: oneshot::Sender<Result<SessionId>>,
}

impl<M: LanguageModel> Prefill<M> {
    fn remaining(&self) -> &[u32] {
        &self.tokens[self.session.cache.len()..self.tokens.len() - 1]
    }
}

impl<M: LanguageModel> Worker<M> {
    fn new(model: Arc<M>, sessions: Arc<TargetSessions<M>>, config: SchedulerConfig) -> Self {
        Self {
            model,
            sessions,
            config,
            queue: VecDeque::new(),
            prefills: VecDeque::new(),
            last_forward: Duration::ZERO,
            returns: Returns::default(),
        }
    }

    fn run(mut self, rx: Receiver<Job<M>>) {
        loop {
            if self.queue.is_empty() && self.prefills.is_empty() {
                match rx.recv() {
                    Ok(job) => self.accept(job),
                    Err(_) => return,
                }
            }
            while let Ok(job) = rx.try_recv() {
                self.accept(job);
            }
            // A waiting prefill is work enough for the next forward.
            if self.prefills.is_empty() {
                self.gather(&rx);
            }
            let batch = self.next_batch();
            let chunks = self.next_chunks();
            if !batch.is_empty() || !chunks.is_empty() {
                self.run_batch(batch, chunks);
            }
        }
    }

    /// Opens are admitted and queue for their prefill; verifies queue for batching.
    fn accept(&mut self, job: Job<M>) {
        match job {
            Job::Open {
                tokens,
                span,
                reply,
            } => {
                let admitted = self
                    .sessions
                    .admit_beside(self.prefills.len())
                    .and_then(|_| TargetSession::unfilled(&*self.model, &tokens));
                match admitted {
                    Ok(session) => {
                        let span =
                            tracing::debug_span!(parent: &span, "prefill", tokens = tokens.len());
                        let p = Prefill {
                            session,
                            tokens,
                            span,
                            reply,
                        };
                        if p.remaining().is_empty() {
                            self.ready(p);
                        } else {
                            self.prefills.push_back(p);
                        }
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Job::Verify(v) => {
                // When it was sent, not when the worker took it from the channel (after a
                // forward it arrived during): the session's own time away.
                self.returns.arrived(v.id, v.enqueued);
                self.queue.push_back(v);
            }
        }
    }

    /// A prefilled session enters the table and its caller learns its id (unless the
    /// caller has gone: then nobody could use or close it).
    fn ready(&self, p: Prefill<M>) {
        if p.reply.is_closed() {
            return;
        }
        let id = self.sessions.insert(p.session);
        let _ = p.reply.send(Ok(id));
    }

    /// The prefills that ride in the next forward, with how many rows each, up to
    /// `prefill_chunk` rows in all (oldest first, so each finishes as soon as it can).
    fn next_chunks(&mut self) -> Vec<(Prefill<M>, usize)> {
        let mut budget = self.config.prefill_chunk.max(1);
        let mut chunks = Vec::new();
        while budget > 0 {
            let Some(p) = self.prefills.pop_front() else {
                break;
            };
            // An open whose caller gave up (cancelled, timed out) is dropped, not finished.
            if p.reply.is_closed() {
                continue;
            }
            let rows = p.remaining().len().min(budget);
            budget -= rows;
            chunks.push((p, rows));
        }
        chunks
    }

    /// Waits up to `batch_wait` (at most [`MAX_WAIT_SHARE`] of the last forward) for the
    /// trees of open sessions expected back within that time ([`Returns`]).
    fn gather(&mut self, rx: &Receiver<Job<M>>) {
        let wait = self
            .config
            .batch_wait
            .min(self.last_forward.mul_f64(MAX_WAIT_SHARE));
        if wait.is_zero() {
            return;
        }
        let now = Instant::now();
        let open = self.sessions.ids();
        self.returns.keep_only(&open);
        loop {
            if self.rows() >= self.config.max_batch_tokens {
                return;
            }
            let queued: HashSet<SessionId> = self.queue.iter().map(|j| j.id).collect();
            let Some(until) = self.returns.wait_until(&open, &queued, now, now + wait) else {
                return;
            };
            let left = until.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(job) => self.accept(job),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    fn rows(&self) -> usize {
        self.queue.iter().map(|j| j.tree.len()).sum()
    }

    /// Jobs in arrival order up to the row budget, one per session (a second tree for the
    /// same session must see the first one's result).
    fn next_batch(&mut self) -> Vec<VerifyJob<M>> {
        let mut batch = Vec::new();
        let mut rest = VecDeque::new();
        let mut seen = HashSet::new();
        let mut rows = 0;
        while let Some(job) = self.queue.pop_front() {
            let fits = batch.is_empty() || rows + job.tree.len() <= self.config.max_batch_tokens;
            if fits && seen.insert(job.id) {
                rows += job.tree.len();
                batch.push(job);
            } else {
                rest.push_back(job);
            }
        }
        self.queue = rest;
        let m = telemetry::metrics();
        m.queue_depth.set(self.queue.len() as i64);
        m.batch_trees.observe(batch.len() as f64);
        batch
    }

    fn run_batch(&mut self, jobs: Vec<VerifyJob<M>>, chunks: Vec<(Prefill<M>, usize)>) {
        let started = Instant::now();
        let max_pos = self.model.info().max_position;
        let slots: Vec<_> = jobs.iter().map(|j| j.slot.clone()).collect();
        let mut ready = Vec::new();
        let mut guards = Vec::new();
        // The KV budget holds while sessions grow: what prefilling sessions hold counts
        // too, and a part whose growth would overrun it is refused.
        let prefilling: usize = (self.prefills.iter())
            .chain(chunks.iter().map(|(p, _)| p))
            .map(|p| p.session.memory_bytes())
            .sum();
        let mut budget = self.sessions.budget(prefilling);
        let mut chunks = admit_chunks(&mut budget, chunks);
        for (job, slot) in jobs.into_iter().zip(&slots) {
            let guard = lock(slot);
            let prepared = self
                .sessions
                .check_open(job.id, &guard)
                .and_then(|_| guard.state.verify_input(&job.tree, max_pos))
                .and_then(|p| {
                    let cache = &guard.state.cache;
                    budget.grow(cache, job.tree.len(), "its tree")?;
                    Ok(p)
                });
            match prepared {
                Ok((positions, visibility)) => {
                    let base = guard.state.cache.len();
                    ready.push(Ready {
                        job,
                        positions,
                        visibility,
                        base,
                    });
                    guards.push(guard);
                }
                Err(e) => {
                    let _ = job.reply.send(Err(e));
                }
            }
        }
        if ready.is_empty() && chunks.is_empty() {
            return;
        }
        // One span per batched forward: a child of the first call it serves (a verify
        // before a prefill), linked to the others (each call's trace shows the forwards
        // it waited for).
        let mut served = ready
            .iter()
            .map(|r| &r.job.span)
            .chain(chunks.iter().map(|(p, _)| &p.span));
        let first = served.next().expect("the batch is not empty");
        let span = tracing::debug_span!(
            parent: first,
            "forward",
            trees = ready.len(),
            rows = ready.iter().map(|r| r.job.tree.len()).sum::<usize>(),
            prefill_rows = chunks.iter().map(|(_, n)| n).sum::<usize>(),
        );
        for other in served {
            telemetry::traces::link(&span, other);
        }
        let (outs, prefilled) =
            span.in_scope(|| forward(&*self.model, &mut guards, &ready, &mut chunks));
        self.last_forward = started.elapsed();
        let forward_s = self.last_forward.as_secs_f64();
        let trees = ready.len();
        let tree_rows: usize = ready.iter().map(|r| r.job.tree.len()).sum();
        let open_sessions = self.sessions.len() + self.prefills.len();
        let prefill_rows: usize = chunks.iter().map(|(_, n)| n).sum();
        // Unfinished prefills go back to the front, in their order.
        for ((p, _), result) in chunks.into_iter().zip(prefilled).rev() {
            match result {
                Err(e) => {
                    let _ = p.reply.send(Err(e));
                }
                Ok(()) if p.remaining().is_empty() => self.ready(p),
                Ok(()) => self.prefills.push_front(p),
            }
        }
        for (r, (out, guard)) in ready
            .into_iter()
            .zip(outs.into_iter().zip(guards.iter_mut()))
        {
            let job = r.job;
            let mut damaged = false;
            let result = out.and_then(|out| {
                self.sessions.work_on(job.id, guard, |s| {
                    let finish = || {
                        s.verify_finish(
                            &job.tree,
                            &r.positions,
                            r.base,
                            &out,
                            &job.sampling,
                            job.logprobs,
                        )
                    };
                    catch_unwind(AssertUnwindSafe(finish)).unwrap_or_else(|p| {
                        damaged = true;
                        Err(panicked("reading the forward's outcome", p))
                    })
                })
            });
            // A panic half-way may have left the cache half-updated: the session is closed
            // (a caller that knows its tokens opens it again, exactly).
            if damaged {
                self.sessions.close_locked(job.id, guard);
            }
            let timing = ServerTiming {
                queue: started
                    .saturating_duration_since(job.enqueued)
                    .as_secs_f64(),
                forward: forward_s,
                total: job.enqueued.elapsed().as_secs_f64(),
                batch_trees: trees as u32,
                batch_rows: tree_rows as u32,
                open_sessions: open_sessions as u32,
                batch_prefill_rows: prefill_rows as u32,
            };
            let _ = job.reply.send(result.map(|o| (o, timing)));
            self.returns.answered(job.id, Instant::now());
        }
    }
}

/// The prefill chunks whose growth `budget` admits; the others' opens are refused.
fn admit_chunks<M: LanguageModel>(
    budget: &mut Budget,
    chunks: Vec<(Prefill<M>, usize)>,
) -> Vec<(Prefill<M>, usize)> {
    let mut fit = Vec::with_capacity(chunks.len());
    for (p, rows) in chunks {
        match budget.grow(&p.session.cache, rows, "its prompt") {
            Ok(()) => fit.push((p, rows)),
            Err(e) => {
                let _ = p.reply.send(Err(e));
            }
        }
    }
    fit
}

/// One batched forward over the trees and the prefill chunks: the trees' outputs, and
/// whether each chunk went into its cache. If the batch fails, each part runs alone, so
/// one bad part cannot fail the others.
fn forward<M: LanguageModel>(
    model: &M,
    guards: &mut [MutexGuard<'_, Slot<TargetSession<M::Cache>>>],
    ready: &[Ready<M>],
    chunks: &mut [(Prefill<M>, usize)],
) -> (Vec<Result<ForwardOutput>>, Vec<Result<()>>) {
    let positions: Vec<Vec<u32>> = chunks
        .iter()
        .map(|(p, rows)| {
            let start = p.session.cache.len() as u32;
            (start..start + *rows as u32).collect()
        })
        .collect();
    let mut batch: Vec<_> = guards
        .iter_mut()
        .zip(ready)
        .map(|(g, r)| (&mut g.state.cache, r.input()))
        .chain(chunks.iter_mut().zip(&positions).map(|((p, rows), pos)| {
            let start = p.session.cache.len();
            let input = SeqInput::chain(&p.tokens[start..start + *rows], pos, OutputSpec::none());
            (&mut p.session.cache, input)
        }))
        .collect();
    let trees = ready.len();
    let mut results = forward_isolated(model, &mut batch).into_iter();
    let outs = results.by_ref().take(trees).collect();
    let prefilled = results.map(|r| r.map(|_| ())).collect();
    (outs, prefilled)
}

/// One batched forward whose parts fail alone: if the batch fails, each part runs by
/// itself, so one bad part cannot fail the others. A panic inside the model (a bug, a
/// kernel fault) fails the parts it hit with INTERNAL and leaves the calling worker, and
/// every other session, running; a part that failed leaves its cache at the length the
/// forward found it.
pub(crate) fn forward_isolated<M: LanguageModel>(
    model: &M,
    batch: &mut [(&mut M::Cache, SeqInput<'_>)],
) -> Vec<Result<ForwardOutput>> {
    let lens: Vec<usize> = batch.iter().map(|(c, _)| c.len()).collect();
    let whole = catch_unwind(AssertUnwindSafe(|| model.forward_batch(batch)));
    match whole {
        Ok(Ok(outs)) => outs.into_iter().map(Ok).collect(),
        Ok(Err(e)) if batch.len() == 1 => vec![Err(e.into())],
        Err(p) if batch.len() == 1 => {
            let _ = batch[0].0.truncate(lens[0]);
            vec![Err(panicked("the model's forward", p))]
        }
        // A panic may have left rows past a cache's length: cut back first.
        Ok(Err(_)) | Err(_) => batch
            .iter_mut()
            .zip(lens)
            .map(|((cache, input), len)| {
                let _ = cache.truncate(len);
                let one = catch_unwind(AssertUnwindSafe(|| model.forward(cache, input.clone())));
                match one {
                    Ok(r) => Ok(r?),
                    Err(p) => {
                        let _ = cache.truncate(len);
                        Err(panicked("the model's forward", p))
                    }
                }
            })
            .collect(),
    }
}

/// The error of `what` that panicked, with the panic's message.
fn panicked(what: &str, payload: Box<dyn std::any::Any + Send>) -> DecodingError {
    let msg = engine::error::panic_message(&*payload);
    tracing::error!("{what} panicked: {msg}");
    DecodingError::Backend(format!("{what} panicked: {msg}"))
}

/// A verify job whose tree passed the session's checks.
struct Ready<M: LanguageModel> {
    job: VerifyJob<M>,
    positions: Vec<u32>,
    visibility: Visibility,
    base: usize,
}

impl<M: LanguageModel> Ready<M> {
    fn input(&self) -> SeqInput<'_> {
        SeqInput {
            tokens: &self.job.tree.tokens,
            positions: &self.positions,
            visibility: &self.visibility,
            outputs: OutputSpec {
                logits: decoding::verify::needs_logits(&self.job.sampling, self.job.logprobs),
                ..OutputSpec::all()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Sessions 1..=3 answered at `t0`, each after a first round away for `away[i]`.
    fn returns(t0: Instant, away: [u64; 3]) -> Returns {
        let mut r = Returns::default();
        for (id, a) in (1..).zip(away) {
            r.answered(id, t0 - ms(100));
            r.arrived(id, t0 - ms(100) + ms(a));
            r.answered(id, t0);
        }
        r
    }

    #[test]
    fn a_forward_waits_for_the_sessions_expected_back_within_its_limit() {
        let t0 = Instant::now();
        let now = t0 + ms(1);
        let limit = now + ms(7);
        let none = HashSet::new();
        // Back 2 ms after their answers last time: waited for until 2 + 1 + 1 ms after
        // (the latest of them), well before the limit.
        let r = returns(t0, [2, 2, 1]);
        assert_eq!(
            r.wait_until(&[1, 2, 3], &none, now, limit),
            Some(t0 + ms(4))
        );
        // One that drafted for 50 ms last time is not waited for: the others are.
        let r = returns(t0, [50, 2, 2]);
        assert_eq!(
            r.wait_until(&[1, 2, 3], &none, now, limit),
            Some(t0 + ms(4))
        );
        assert_eq!(r.wait_until(&[1], &none, now, limit), None);
        // Queued trees need no wait; a session never answered is due any moment.
        let queued = HashSet::from([2, 3]);
        assert_eq!(r.wait_until(&[1, 2, 3], &queued, now, limit), None);
        assert_eq!(
            r.wait_until(&[1, 2, 3, 9], &queued, now, limit),
            Some(limit)
        );
        // An allowance is never past the limit.
        let r = returns(t0, [6, 6, 6]);
        assert_eq!(r.wait_until(&[1, 2, 3], &none, now, limit), Some(limit));
    }

    #[test]
    fn an_overdue_or_closed_session_is_not_waited_for() {
        let t0 = Instant::now();
        let mut r = returns(t0, [2, 2, 2]);
        // 20 ms after the answers, sessions back in 2 ms last time are doing something
        // else (their clients reading, say).
        let later = t0 + ms(20);
        assert_eq!(
            r.wait_until(&[1, 2, 3], &HashSet::new(), later, later + ms(7)),
            None
        );
        // Closed sessions are forgotten.
        r.keep_only(&[2]);
        assert_eq!(
            r.wait_until(&[2], &HashSet::new(), t0, t0 + ms(7)),
            Some(t0 + ms(4))
        );
        assert_eq!(r.sessions.len(), 1);
        // A session's tree in the queue ends its absence: the next one is measured anew.
        r.arrived(2, t0 + ms(3));
        assert_eq!(r.sessions[&2].last, Some(ms(3)));
        assert_eq!(r.sessions[&2].answered, None);
    }
}
