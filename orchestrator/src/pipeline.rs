//! One object that runs a request on whatever backends this orchestrator has: the target,
//! optionally a draft, optionally a lookahead host (the target model in a draft role, for
//! the target-only lookahead baseline), and the pools shared across requests.

use futures::future::BoxFuture;
use spec::{
    BackendInfo, DecodeParams, DraftBackend, Flow, Generation, PhrasePool, SpecError, Strategy,
    TargetBackend, generate,
};
use std::sync::Arc;

pub type TokenSink = Box<dyn FnMut(&[u32]) -> Flow + Send>;

pub trait Runner: Send + Sync + 'static {
    fn target_info(&self) -> BackendInfo;
    fn has_draft(&self) -> bool;
    fn has_lookahead(&self) -> bool;
    /// Runs one request to the end; `sink` sees committed tokens as they come.
    fn run(
        &self,
        prompt: Vec<u32>,
        params: DecodeParams,
        sink: TokenSink,
    ) -> BoxFuture<'static, spec::Result<Generation>>;
}

pub struct Pipeline<T, D, L> {
    pub target: Arc<T>,
    pub draft: Option<Arc<D>>,
    pub lookahead: Option<Arc<L>>,
    /// Shared by every Ouroboros and speculative request (warm start).
    pub pool: Arc<PhrasePool>,
    /// The lookahead baseline's own pool, so the baselines do not warm each other.
    pub lookahead_pool: Arc<PhrasePool>,
    /// In-process backends compute inside their futures, so requests run on the blocking
    /// pool instead of the async workers.
    pub blocking: bool,
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

    fn has_draft(&self) -> bool {
        self.draft.is_some()
    }

    fn has_lookahead(&self) -> bool {
        self.lookahead.is_some()
    }

    fn run(
        &self,
        prompt: Vec<u32>,
        params: DecodeParams,
        mut sink: TokenSink,
    ) -> BoxFuture<'static, spec::Result<Generation>> {
        let target = self.target.clone();
        let draft = self.draft.clone();
        let lookahead = self.lookahead.clone();
        let (pool, lookahead_pool) = (self.pool.clone(), self.lookahead_pool.clone());
        let work = async move {
            if params.strategy == Strategy::Lookahead {
                generate(
                    &*target,
                    lookahead.as_deref(),
                    &lookahead_pool,
                    &prompt,
                    &params,
                    &mut *sink,
                )
                .await
            } else {
                generate(
                    &*target,
                    draft.as_deref(),
                    &pool,
                    &prompt,
                    &params,
                    &mut *sink,
                )
                .await
            }
        };
        let blocking = self.blocking;
        Box::pin(async move {
            let joined = if blocking {
                tokio::task::spawn_blocking(move || futures::executor::block_on(work)).await
            } else {
                tokio::spawn(work).await
            };
            joined.map_err(|e| SpecError::Backend(format!("request task failed: {e}")))?
        })
    }
}
