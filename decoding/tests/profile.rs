//! Measuring a cost profile through the backends: every size is timed, and a context too
//! short for the measurement is refused.

use decoding::{
    BackendInfo, DraftTree, LocalDraft, LocalTarget, PhrasePool, PoolConfig, ProfileOptions,
    Result, SamplingParams, ServerTiming, SessionId, TargetBackend, VerifyOutcome, auto::measure,
};
use engine::MockModel;
use futures::executor::block_on;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A target that records the size of every tree it verifies and takes 2 ms plus 0.5 ms
/// per node to do it, so what the profile measured can be checked against what it did.
struct Slow {
    inner: LocalTarget<MockModel>,
    sizes: Mutex<Vec<usize>>,
}

impl TargetBackend for Slow {
    fn info(&self) -> BackendInfo {
        self.inner.info()
    }
    async fn open(&self, committed: &[u32]) -> Result<SessionId> {
        self.inner.open(committed).await
    }
    async fn verify(
        &self,
        session: SessionId,
        tree: &DraftTree,
        sampling: &SamplingParams,
        logprobs: Option<usize>,
    ) -> Result<(VerifyOutcome, ServerTiming)> {
        self.sizes.lock().unwrap().push(tree.len());
        std::thread::sleep(Duration::from_micros(2000 + 500 * tree.len() as u64));
        self.inner.verify(session, tree, sampling, logprobs).await
    }
    async fn close(&self, session: SessionId) -> Result<()> {
        self.inner.close(session).await
    }
}

/// The profile comes from the backend's own calls: every size it reports was verified
/// (once untimed, then `reps` times), and its costs carry the backend's time.
#[test]
fn the_profile_holds_what_the_backend_took() {
    let model = Arc::new(MockModel::new(40, 2048, 0.7, 1));
    let target = Slow {
        inner: LocalTarget::new(model),
        sizes: Mutex::new(Vec::new()),
    };
    let opts = ProfileOptions {
        verify_sizes: vec![1, 4, 16],
        draft_tokens: vec![],
        reps: 2,
        prompt_len: 16,
        ..ProfileOptions::default()
    };
    let p = block_on(measure::<_, LocalDraft<MockModel>>(&target, None, &opts)).unwrap();
    let sizes = target.sizes.lock().unwrap().clone();
    for &(n, _) in p.verify_points() {
        let times = sizes.iter().filter(|&&s| s == n).count();
        assert!(
            times > opts.reps,
            "size {n} verified {times} times: {sizes:?}"
        );
        // At least the time the backend slept for it.
        let slept = (2000.0 + 500.0 * n as f64) * 1e-6;
        assert!(
            p.verify_cost(n) >= slept,
            "size {n}: {} s",
            p.verify_cost(n)
        );
        assert!(
            p.verify_cost(n) < slept + 0.5,
            "size {n}: {} s",
            p.verify_cost(n)
        );
    }
    // 16 nodes cost 7.5 ms more than one in the backend: the profile shows most of it.
    assert!(
        p.verify_cost(16) - p.verify_cost(1) > 0.005,
        "{}",
        p.describe()
    );
}

#[test]
fn a_profile_is_measured_through_the_backends() {
    let model = Arc::new(MockModel::new(40, 2048, 0.7, 1));
    let target = LocalTarget::new(model.clone());
    let draft = LocalDraft::new(model, Arc::new(PhrasePool::new(PoolConfig::default())));
    let opts = ProfileOptions {
        verify_sizes: vec![1, 4, 16],
        draft_tokens: vec![1, 4],
        reps: 2,
        prompt_len: 16,
        ..ProfileOptions::default()
    };
    let p = block_on(measure(&target, Some(&draft), &opts)).unwrap();
    // Sizes too dear to matter may be dropped after the first timed round (timing
    // decides that), but what is kept is a prefix of at least two.
    let sizes: Vec<usize> = p.verify_points().iter().map(|v| v.0).collect();
    assert!(sizes.len() >= 2, "{sizes:?}");
    assert_eq!(sizes[..], opts.verify_sizes[..sizes.len()]);
    assert!(p.verify_cost(1) > 0.0 && p.verify_cost(16) >= p.verify_cost(4));
    let d = p.draft().expect("a draft was profiled");
    assert!(d.per_token > 0.0 && d.per_call >= 0.0);
    assert!(p.describe().contains("per token"));
    // Progress goes forward and ends with everything done.
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let watched = ProfileOptions {
        progress: engine::progress::ProgressHook::new(move |done, total| {
            log.lock().unwrap().push((done, total))
        }),
        ..opts.clone()
    };
    block_on(measure(&target, Some(&draft), &watched)).unwrap();
    let seen = seen.lock().unwrap();
    assert!(seen.len() > 3, "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "{seen:?}");
    assert!(seen.iter().all(|&(d, t)| d <= t), "{seen:?}");
    let (done, total) = *seen.last().unwrap();
    assert_eq!(done, total);
    let alone = block_on(measure::<_, LocalDraft<MockModel>>(&target, None, &opts)).unwrap();
    assert!(alone.draft().is_none());

    // A context too short for the measurement is refused up front.
    let short = LocalTarget::new(Arc::new(MockModel::new(40, 32, 0.7, 1)));
    let e = block_on(measure::<_, LocalDraft<MockModel>>(&short, None, &opts)).unwrap_err();
    assert!(e.to_string().contains("too short"), "{e}");
}
