//! Chunked prefill in the verify scheduler: a new session's prompt goes in chunks that
//! ride along with the open sessions' trees, so a long prompt does not stall them, and
//! the chunked prefill leaves exactly the cache a one-shot prefill leaves.

mod common;

use common::{Gated, poll_once};
use decoding::{DraftTree, SamplingParams, TargetSession};
use engine::mock::Doomed;
use engine::{ForwardOutput, LanguageModel, MockModel, ModelInfo, SeqInput};
use serving::scheduler::{Scheduler, SchedulerConfig, VerifyReply};
use serving::sessions::SessionLimits;
use serving::sessions::SessionTable;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

type TargetSessions<M> = SessionTable<TargetSession<<M as LanguageModel>::Cache>>;

fn start<M: LanguageModel + 'static>(
    model: Arc<M>,
    prefill_chunk: usize,
) -> (Scheduler<M>, Arc<TargetSessions<M>>) {
    let sessions = Arc::new(SessionTable::new(SessionLimits::default()));
    let config = SchedulerConfig {
        max_batch_tokens: 512,
        batch_wait: Duration::ZERO,
        prefill_chunk,
    };
    (Scheduler::start(model, sessions.clone(), config), sessions)
}

fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + salt) % 500).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_prefill_does_not_stall_open_sessions() {
    let model = Arc::new(Gated::new());
    let (scheduler, sessions) = start(model.clone(), 8);
    let greedy = SamplingParams::greedy();

    let short = prompt(4, 1);
    let a = scheduler.open(short.clone()).await.unwrap();
    let mut a_local = TargetSession::open(&model.inner, &short).unwrap();
    let forwards_before = model.log().len();

    // B's 41-token prompt needs 40 rows of prefill: 5 chunks of 8. Hold the first.
    model.set_closed(true);
    let long = prompt(41, 2);
    let mut open_b = Box::pin(scheduler.open(long.clone()));
    poll_once(&mut open_b).await;
    let gated = model.clone();
    let n = forwards_before + 1;
    tokio::task::spawn_blocking(move || gated.wait_for_forwards(n))
        .await
        .unwrap();

    // A's tree arrives while B's first chunk is in the model.
    let tree = DraftTree::from_parts(vec![a_local.last, 7, 9], vec![-1, 0, 1]).unwrap();
    let slot = sessions.get(a).unwrap();
    let mut verify_a = Box::pin(scheduler.verify(a, slot, tree.clone(), greedy, None));
    poll_once(&mut verify_a).await;
    model.set_closed(false);

    let (got, _timing) = verify_a.await.unwrap();
    assert_eq!(
        got,
        a_local.verify(&model.inner, &tree, &greedy, None).unwrap()
    );
    let b = open_b.await.unwrap();

    let log = model.log()[forwards_before..].to_vec();
    // B's chunks, and A's 3-node tree in the forward right after the first chunk.
    assert_eq!(log[0], vec![8], "{log:?}");
    assert_eq!(log[1], vec![3, 8], "{log:?}");
    let prefill_rows: usize = log.iter().flatten().sum::<usize>() - 3;
    assert_eq!(prefill_rows, 40, "{log:?}");
    assert!(
        log.iter().all(|f| f.iter().sum::<usize>() <= 3 + 8),
        "{log:?}"
    );

    // The chunked prefill left the cache a one-shot prefill leaves: B verifies alike.
    let mut b_local = TargetSession::open(&model.inner, &long).unwrap();
    for round in 0..3u32 {
        let t = DraftTree::from_parts(vec![b_local.last, round, 11], vec![-1, 0, 0]).unwrap();
        let want = b_local.verify(&model.inner, &t, &greedy, None).unwrap();
        let slot = sessions.get(b).unwrap();
        let (got, _) = scheduler.verify(b, slot, t, greedy, None).await.unwrap();
        assert_eq!(got, want, "round {round}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_opens_share_forwards_and_count_against_the_limit() {
    let model = Arc::new(Gated::new());
    let sessions = Arc::new(SessionTable::new(SessionLimits {
        max_sessions: 2,
        ..SessionLimits::default()
    }));
    let config = SchedulerConfig {
        max_batch_tokens: 512,
        batch_wait: Duration::ZERO,
        prefill_chunk: 16,
    };
    let scheduler = Scheduler::start(model.clone(), sessions.clone(), config);

    // Three opens queue while the model is held: two are admitted (the first is already
    // in the model), the third is refused although neither of the others has finished.
    model.set_closed(true);
    let mut first = Box::pin(scheduler.open(prompt(30, 3)));
    poll_once(&mut first).await;
    let gated = model.clone();
    tokio::task::spawn_blocking(move || gated.wait_for_forwards(1))
        .await
        .unwrap();
    let mut second = Box::pin(scheduler.open(prompt(9, 4)));
    poll_once(&mut second).await;
    let mut third = Box::pin(scheduler.open(prompt(5, 5)));
    poll_once(&mut third).await;
    model.set_closed(false);

    let first = first.await.unwrap();
    let second = second.await.unwrap();
    let refused = third.await.unwrap_err();
    assert!(
        matches!(refused, decoding::DecodingError::Exhausted(_)),
        "{refused:?}"
    );
    assert_ne!(first, second);
    assert_eq!(sessions.len(), 2);
    // 29 rows of the first prompt in 16-row chunks; the second's 8 rows fill the
    // second forward's budget beside the first's last 13.
    assert_eq!(model.log(), vec![vec![16], vec![13, 3], vec![5]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_open_stops_prefilling() {
    let model = Arc::new(Gated::new());
    let (scheduler, sessions) = start(model.clone(), 8);
    model.set_closed(true);
    let mut gone = Box::pin(scheduler.open(prompt(100, 6)));
    poll_once(&mut gone).await;
    let gated = model.clone();
    tokio::task::spawn_blocking(move || gated.wait_for_forwards(1))
        .await
        .unwrap();
    // The caller gives up during the first chunk; another session opens.
    drop(gone);
    let mut kept = Box::pin(scheduler.open(prompt(5, 7)));
    poll_once(&mut kept).await;
    model.set_closed(false);
    let kept = kept.await.unwrap();
    assert!(sessions.get(kept).is_ok());
    assert_eq!(sessions.len(), 1);
    // Only the first chunk of the abandoned prompt ran.
    assert_eq!(model.log(), vec![vec![8], vec![4]]);
}

/// Runs one verify of session `id` whose forward the test holds in the model for `hold`,
/// so that the scheduler's last forward took at least that long.
async fn held_verify(
    model: &Arc<Gated>,
    scheduler: &Scheduler<Gated>,
    sessions: &TargetSessions<Gated>,
    id: u64,
    local: &mut TargetSession<<MockModel as LanguageModel>::Cache>,
    hold: Duration,
) {
    let greedy = SamplingParams::greedy();
    model.set_closed(true);
    let n = model.log().len() + 1;
    let tree = DraftTree::from_parts(vec![local.last], vec![-1]).unwrap();
    let slot = sessions.get(id).unwrap();
    let mut verify = Box::pin(scheduler.verify(id, slot, tree.clone(), greedy, None));
    poll_once(&mut verify).await;
    let gated = model.clone();
    tokio::task::spawn_blocking(move || gated.wait_for_forwards(n))
        .await
        .unwrap();
    tokio::time::sleep(hold).await;
    model.set_closed(false);
    let (got, _) = verify.await.unwrap();
    assert_eq!(
        got,
        local.verify(&model.inner, &tree, &greedy, None).unwrap()
    );
}

/// Two open sessions, A and B, after a forward the test held for two seconds; then A's
/// one-node tree, and B's `b_after` later (or none): how many forwards they took, and
/// how long A's verify took.
async fn a_late_tree(batch_wait: Duration, b_after: Option<Duration>) -> (usize, Duration) {
    let model = Arc::new(Gated::new());
    let sessions = Arc::new(SessionTable::new(SessionLimits::default()));
    let config = SchedulerConfig {
        max_batch_tokens: 512,
        batch_wait,
        prefill_chunk: 64,
    };
    let scheduler = Scheduler::start(model.clone(), sessions.clone(), config);
    let (pa, pb) = (prompt(6, 8), prompt(7, 9));
    let a = scheduler.open(pa.clone()).await.unwrap();
    let b = scheduler.open(pb.clone()).await.unwrap();
    let mut a_local = TargetSession::open(&model.inner, &pa).unwrap();
    let mut b_local = TargetSession::open(&model.inner, &pb).unwrap();
    held_verify(
        &model,
        &scheduler,
        &sessions,
        a,
        &mut a_local,
        Duration::from_secs(2),
    )
    .await;

    let greedy = SamplingParams::greedy();
    let before = model.log().len();
    let tree_a = DraftTree::from_parts(vec![a_local.last], vec![-1]).unwrap();
    let tree_b = DraftTree::from_parts(vec![b_local.last], vec![-1]).unwrap();
    let verify_a = async {
        let started = std::time::Instant::now();
        let slot = sessions.get(a).unwrap();
        let r = scheduler
            .verify(a, slot, tree_a.clone(), greedy, None)
            .await;
        (r, started.elapsed())
    };
    let verify_b = async {
        let after = b_after?;
        tokio::time::sleep(after).await;
        let slot = sessions.get(b).unwrap();
        Some(
            scheduler
                .verify(b, slot, tree_b.clone(), greedy, None)
                .await,
        )
    };
    let ((got_a, took), got_b) = tokio::join!(verify_a, verify_b);
    let want_a = a_local
        .verify(&model.inner, &tree_a, &greedy, None)
        .unwrap();
    assert_eq!(got_a.unwrap().0, want_a);
    if let Some(got_b) = got_b {
        let want_b = b_local
            .verify(&model.inner, &tree_b, &greedy, None)
            .unwrap();
        assert_eq!(got_b.unwrap().0, want_b);
    }
    (model.log().len() - before, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_waits_briefly_for_the_trees_of_open_sessions() {
    // Without a wait, A's tree goes alone and B's, 50 ms later, takes a forward of its own.
    let late = Some(Duration::from_millis(50));
    let (forwards, _) = a_late_tree(Duration::ZERO, late).await;
    assert_eq!(forwards, 2);
    // With one, B's tree joins A's forward.
    let wait = Duration::from_secs(30);
    let (forwards, _) = a_late_tree(wait, late).await;
    assert_eq!(forwards, 1);
    // When B sends no tree, A's goes after at most a tenth of the last forward (200 ms
    // here), not the 30 s asked.
    let (forwards, took) = a_late_tree(wait, None).await;
    assert_eq!(forwards, 1);
    assert!(took < Duration::from_secs(5), "{took:?}");
}

/// A token that makes the model panic when it is anywhere in a forward.
const MARK: u32 = 499;

/// What the marked mock model does with a forward that carries [`MARK`].
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    /// Panics inside the forward.
    Panic,
    /// Answers, but with no logits rows for that sequence (a model bug the outcome's
    /// reading trips over when log-probabilities are asked for).
    NoRows,
}

/// The gated mock model with a fault on forwards that carry [`MARK`]; it logs every
/// forward it is given, the faulty ones too.
struct Marked(Gated, Mutex<Vec<Vec<usize>>>, Fault);

impl Marked {
    fn new(fault: Fault) -> Self {
        Self(Gated::new(), Mutex::default(), fault)
    }
}

impl LanguageModel for Marked {
    type Cache = <MockModel as LanguageModel>::Cache;

    fn info(&self) -> &ModelInfo {
        self.0.info()
    }

    fn new_cache(&self) -> Self::Cache {
        self.0.new_cache()
    }

    fn forward_batch(
        &self,
        batch: &mut [(&mut Self::Cache, SeqInput<'_>)],
    ) -> engine::Result<Vec<ForwardOutput>> {
        let rows = batch.iter().map(|(_, i)| i.tokens.len()).collect();
        self.1.lock().unwrap_or_else(|e| e.into_inner()).push(rows);
        let marked: Vec<bool> = batch
            .iter()
            .map(|(_, i)| i.tokens.contains(&MARK))
            .collect();
        if self.2 == Fault::Panic && marked.contains(&true) {
            panic!("the marker token reached the model");
        }
        let mut outs = self.0.forward_batch(batch)?;
        for (out, marked) in outs.iter_mut().zip(marked) {
            if marked {
                out.logits = Some(Vec::new());
            }
        }
        Ok(outs)
    }
}

/// Two sessions on the marked model, A's tree carrying [`MARK`] and B's a good one,
/// verified in one forward (both queued while a long prefill holds the worker), greedy,
/// with `logprobs`; the calls and the prefill still to be awaited.
struct MarkedForward {
    model: Arc<Marked>,
    scheduler: Arc<Scheduler<Marked>>,
    sessions: Arc<TargetSessions<Marked>>,
    a: u64,
    b: u64,
    /// In-process sessions on the same prompts, for the expected outcomes.
    a_local: TargetSession<<Marked as LanguageModel>::Cache>,
    b_local: TargetSession<<Marked as LanguageModel>::Cache>,
    good: DraftTree,
    verify_a: Pending<VerifyReply>,
    verify_b: Pending<VerifyReply>,
    long: Pending<decoding::Result<u64>>,
}

/// A call begun (polled once, so its job is with the worker) and still to be awaited.
type Pending<T> = Pin<Box<dyn Future<Output = T> + Send>>;

async fn marked_beside_good(fault: Fault, logprobs: Option<usize>) -> MarkedForward {
    let model = Arc::new(Marked::new(fault));
    let (scheduler, sessions) = start(model.clone(), 8);
    let scheduler = Arc::new(scheduler);
    let greedy = SamplingParams::greedy();
    let inner = &model.0.inner;
    let (pa, pb) = (prompt(5, 3), prompt(6, 4));
    let a = scheduler.open(pa.clone()).await.unwrap();
    let b = scheduler.open(pb.clone()).await.unwrap();
    let a_local = TargetSession::open(inner, &pa).unwrap();
    let b_local = TargetSession::open(inner, &pb).unwrap();

    // Hold the worker in a long prefill, queue A's poisoned tree and B's good one, then
    // let them go into one forward.
    let before = model.0.log().len();
    model.0.set_closed(true);
    let s = scheduler.clone();
    let mut long: Pending<_> = Box::pin(async move { s.open(prompt(30, 5)).await });
    poll_once(&mut long).await;
    let gated = model.clone();
    tokio::task::spawn_blocking(move || gated.0.wait_for_forwards(before + 1))
        .await
        .unwrap();
    let bad = DraftTree::from_parts(vec![a_local.last, MARK, 7], vec![-1, 0, 1]).unwrap();
    let good = DraftTree::from_parts(vec![b_local.last, 8, 9], vec![-1, 0, 1]).unwrap();
    let verify = |id, tree| {
        let (s, slot) = (scheduler.clone(), sessions.get(id).unwrap());
        let call: Pending<_> =
            Box::pin(async move { s.verify(id, slot, tree, greedy, logprobs).await });
        call
    };
    let mut verify_a = verify(a, bad);
    let mut verify_b = verify(b, good.clone());
    poll_once(&mut verify_a).await;
    poll_once(&mut verify_b).await;
    model.0.set_closed(false);
    MarkedForward {
        model,
        scheduler,
        sessions,
        a,
        b,
        a_local,
        b_local,
        good,
        verify_a,
        verify_b,
        long,
    }
}

/// A panic in the model fails only the call that caused it: the trees batched with it are
/// served, the sessions keep their caches, and the worker goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_forward_fails_only_its_own_call() {
    let greedy = SamplingParams::greedy();
    let MarkedForward {
        model,
        scheduler,
        sessions,
        a,
        b,
        mut a_local,
        mut b_local,
        good,
        verify_a,
        verify_b,
        long: open_c,
    } = marked_beside_good(Fault::Panic, None).await;
    let inner = &model.0.inner;

    let err = verify_a.await.unwrap_err();
    assert!(err.to_string().contains("panicked"), "{err}");
    assert_eq!(
        proto::convert::status_of(&err).code(),
        tonic::Code::Internal
    );
    let (got_b, _) = verify_b.await.unwrap();
    assert_eq!(got_b, b_local.verify(inner, &good, &greedy, None).unwrap());
    open_c.await.unwrap();
    // They did share a forward (the one that panicked), then went alone.
    let given = model.1.lock().unwrap().clone();
    let shared = given.iter().position(|f| f.len() >= 2 && f[..2] == [3, 3]);
    assert!(shared.is_some(), "{given:?}");
    assert!(
        given[shared.unwrap() + 1..].starts_with(&[vec![3], vec![3]]),
        "{given:?}"
    );

    // A's cache is as it was: its next (good) tree verifies as on a session that never
    // saw the poisoned one, and the worker serves B as before.
    let next = DraftTree::from_parts(vec![a_local.last, 4, 2], vec![-1, 0, 0]).unwrap();
    let (got_a, _) = scheduler
        .verify(a, sessions.get(a).unwrap(), next.clone(), greedy, None)
        .await
        .unwrap();
    assert_eq!(got_a, a_local.verify(inner, &next, &greedy, None).unwrap());
    let again = DraftTree::from_parts(vec![b_local.last, 1], vec![-1, 0]).unwrap();
    let (got_b, _) = scheduler
        .verify(b, sessions.get(b).unwrap(), again.clone(), greedy, None)
        .await
        .unwrap();
    assert_eq!(got_b, b_local.verify(inner, &again, &greedy, None).unwrap());
}

/// A panic while a forward's outcome is read (after the model answered) fails that call
/// with INTERNAL and closes its session, whose cache it may have left half-updated (a
/// caller holding the tokens re-opens it exactly); the other session in the same forward
/// is served and the worker goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_reading_an_outcome_fails_its_call_and_closes_only_its_session() {
    let greedy = SamplingParams::greedy();
    let MarkedForward {
        model,
        scheduler,
        sessions,
        a,
        b,
        mut b_local,
        good,
        verify_a,
        verify_b,
        long,
        ..
    } = marked_beside_good(Fault::NoRows, Some(1)).await;
    let inner = &model.0.inner;

    let err = verify_a.await.unwrap_err();
    assert!(err.to_string().contains("outcome"), "{err}");
    assert_eq!(
        proto::convert::status_of(&err).code(),
        tonic::Code::Internal
    );
    assert!(sessions.get(a).is_err(), "the damaged session is closed");
    let (got_b, _) = verify_b.await.unwrap();
    assert_eq!(
        got_b,
        b_local.verify(inner, &good, &greedy, Some(1)).unwrap()
    );
    long.await.unwrap();
    assert!(scheduler.alive());
    let again = DraftTree::from_parts(vec![b_local.last, 1], vec![-1, 0]).unwrap();
    let (got_b, _) = scheduler
        .verify(b, sessions.get(b).unwrap(), again.clone(), greedy, None)
        .await
        .unwrap();
    assert_eq!(got_b, b_local.verify(inner, &again, &greedy, None).unwrap());
}

/// A worker that died says so: `alive` turns false (health follows it) and calls get
/// UNAVAILABLE instead of waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_worker_is_seen_and_its_calls_are_unavailable() {
    let model = Arc::new(Doomed::new(
        MockModel::new(500, 4096, 0.5, 3),
        "verify-scheduler",
    ));
    let (scheduler, sessions) = start(model.clone(), 8);
    let a = scheduler.open(prompt(5, 3)).await.unwrap();
    assert!(scheduler.alive());
    model.arm();
    let t = DraftTree::from_parts(vec![7, 8], vec![-1, 0]).unwrap();
    let greedy = SamplingParams::greedy();
    let err = scheduler
        .verify(a, sessions.get(a).unwrap(), t.clone(), greedy, None)
        .await
        .unwrap_err();
    assert_eq!(
        proto::convert::status_of(&err).code(),
        tonic::Code::Unavailable,
        "{err}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while scheduler.alive() {
        assert!(std::time::Instant::now() < deadline, "still alive");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let err = scheduler
        .verify(a, sessions.get(a).unwrap(), t, greedy, None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("stopped"), "{err}");
}
