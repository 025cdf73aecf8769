//! One object that runs a request on whatever backends this orchestrator has: the target,
//! optionally a draft, optionally a lookahead host (the target model in a draft role, for
//! the target-only lookahead baseline), and the pools shared across requests.

use crate::remote::{REQUEST_DEADLINE, request_deadline};
use decoding::{
    AutoConfig, AutoTuner, BackendInfo, CostProfile, DecodeParams, DecodingError, DraftBackend,
    Generation, PhrasePool, ProfileOptions, Shared, Strategy, TargetBackend, TrieCache, generate,
};
use futures::future::BoxFuture;
use std::sync::{Arc, OnceLock};
use tracing::Instrument;

/// A token sink that a request task owns.
pub type BoxedSink = Box<decoding::TokenSink<'static>>;

pub trait Runner: Send + Sync + 'static {
    fn target_info(&self) -> BackendInfo;
    /// The draft's model, where there is one.
    fn draft_info(&self) -> Option<BackendInfo> {
        None
    }
    /// The cost profile `auto` plans with, once measured.
    fn cost_profile(&self) -> Option<CostProfile> {
        None
    }
    // The defaults describe a runner with a target only: no draft, no lookahead host, no
    // caches, nothing to profile.
    fn has_draft(&self) -> bool {
        false
    }
    fn has_lookahead(&self) -> bool {
        false
    }
    /// Phrases in the shared pool and nodes in the shared trie.
    fn cache_sizes(&self) -> (usize, usize) {
        (0, 0)
    }
    /// Whether the `auto` strategy has its cost profile.
    fn has_auto(&self) -> bool {
        false
    }
    /// Forgets what earlier requests taught: the phrase pools and the output trie.
    fn clear_caches(&self) {}
    /// Times the backends (what `auto` decides from) and keeps the profile, for `auto`
    /// tuned by `config`.
    fn measure_costs(
        &self,
        _opts: ProfileOptions,
        _config: AutoConfig,
    ) -> BoxFuture<'static, decoding::Result<CostProfile>> {
        Box::pin(async { Err(DecodingError::invalid("this runner has nothing to profile")) })
    }
    /// Whether the target answers now (the server's health follows it).
    fn reachable(&self) -> BoxFuture<'static, bool> {
        Box::pin(async { true })
    }
    /// Runs one request to the end; `sink` sees committed tokens as they come.
    fn run(
        &self,
        prompt: Vec<u32>,
        params: DecodeParams,
        sink: BoxedSink,
    ) -> BoxFuture<'static, decoding::Result<Generation>>;
}

pub struct Pipeline<T, D, L> {
    pub target: Arc<T>,
    pub draft: Option<Arc<D>>,
    pub lookahead: Option<Arc<L>>,
    /// Shared by every Ouroboros and speculative request (warm start).
    pub pool: Arc<PhrasePool>,
    /// The lookahead baseline's own pool, so the baselines do not warm each other.
    pub lookahead_pool: Arc<PhrasePool>,
    /// Output continuations shared by every trie and Ouroboros request (warm start).
    pub trie: Arc<TrieCache>,
    /// The `auto` strategy's cost profile and acceptance counts, once measured.
    pub tuner: Arc<OnceLock<AutoTuner>>,
    /// In-process backends compute inside their futures, so requests run on the blocking
    /// pool instead of the async workers.
    pub blocking: bool,
}

impl<T, D, L> Clone for Pipeline<T, D, L> {
    fn clone(&self) -> Self {
        Self {
            target: self.target.clone(),
            draft: self.draft.clone(),
            lookahead: self.lookahead.clone(),
            pool: self.pool.clone(),
            lookahead_pool: self.lookahead_pool.clone(),
            trie: self.trie.clone(),
            tuner: self.tuner.clone(),
            blocking: self.blocking,
        }
    }
}

impl<T, D, L> Pipeline<T, D, L>
where
    T: TargetBackend,
    D: DraftBackend,
    L: DraftBackend,
{
    /// Runs one request on the calling task: the lookahead baseline on its host and pool,
    /// every other strategy on the draft and the shared pool.
    pub async fn generate(
        &self,
        prompt: &[u32],
        params: &DecodeParams,
        sink: &mut decoding::TokenSink<'_>,
    ) -> decoding::Result<Generation> {
        let tuner = self.tuner.get();
        if params.strategy == Strategy::Lookahead {
            let host = self.lookahead.as_deref();
            let shared = Shared {
                pool: &self.lookahead_pool,
                trie: &self.trie,
                tuner,
            };
            generate(&*self.target, host, shared, prompt, params, sink).await
        } else {
            let draft = self.draft.as_deref();
            let shared = Shared {
                pool: &self.pool,
                trie: &self.trie,
                tuner,
            };
            generate(&*self.target, draft, shared, prompt, params, sink).await
        }
    }

    /// Measures the cost profile through this pipeline's own backends (on the calling
    /// task) and keeps it, with `auto` tuned by `config`, unless one is kept already.
    pub async fn measure_costs_here(
        &self,
        opts: &ProfileOptions,
        config: AutoConfig,
    ) -> decoding::Result<CostProfile> {
        if let Some(t) = self.tuner.get() {
            return Ok(t.profile().clone());
        }
        let profile = decoding::auto::measure(&*self.target, self.draft.as_deref(), opts).await?;
        let _ = self
            .tuner
            .set(AutoTuner::with_config(profile.clone(), config));
        Ok(profile)
    }

    /// Runs `work` on this pipeline where its backends want it: the blocking pool for
    /// in-process models, an async task otherwise.
    fn spawn<R: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = decoding::Result<R>> + Send + 'static,
    ) -> BoxFuture<'static, decoding::Result<R>> {
        let blocking = self.blocking;
        // The request's span goes with it onto the task that runs it.
        let work = work.in_current_span();
        Box::pin(async move {
            let joined = if blocking {
                tokio::task::spawn_blocking(move || futures::executor::block_on(work)).await
            } else {
                tokio::spawn(work).await
            };
            joined.map_err(|e| DecodingError::Backend(format!("request task failed: {e}")))?
        })
    }
}

impl<T, D, L> Runner for Pipeline<T, D, L>
where
    T: TargetBackend + 'static,
    D: DraftBackend + 'static,
    L: DraftBackend + 'static,
{
    fn target_info(&self) -> BackendInfo {
        self.target.info()
    }

    fn reachable(&self) -> BoxFuture<'static, bool> {
        let target = self.target.clone();
        Box::pin(async move { target.reachable().await })
    }

    fn draft_info(&self) -> Option<BackendInfo> {
        self.draft.as_ref().map(|d| d.info())
    }

    fn cost_profile(&self) -> Option<CostProfile> {
        self.tuner.get().map(|t| t.profile().clone())
    }

    fn has_draft(&self) -> bool {
        self.draft.is_some()
    }

    fn cache_sizes(&self) -> (usize, usize) {
        (self.pool.len(), self.trie.len())
    }

    fn has_lookahead(&self) -> bool {
        self.lookahead.is_some()
    }

    fn has_auto(&self) -> bool {
        self.tuner.get().is_some()
    }

    fn clear_caches(&self) {
        self.pool.clear();
        self.lookahead_pool.clear();
        self.trie.clear();
    }

    fn measure_costs(
        &self,
        opts: ProfileOptions,
        config: AutoConfig,
    ) -> BoxFuture<'static, decoding::Result<CostProfile>> {
        let pipeline = self.clone();
        self.spawn(async move { pipeline.measure_costs_here(&opts, config).await })
    }

    fn run(
        &self,
        prompt: Vec<u32>,
        params: DecodeParams,
        mut sink: BoxedSink,
    ) -> BoxFuture<'static, decoding::Result<Generation>> {
        let pipeline = self.clone();
        // The request's deadline bounds its internal calls on the task that runs it.
        let work = async move { pipeline.generate(&prompt, &params, &mut *sink).await };
        self.spawn(REQUEST_DEADLINE.scope(request_deadline(), work))
    }
}
