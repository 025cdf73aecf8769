//! Reference in-process backends: the model's forwards run inside the caller's future, one
//! session at a time, with no batching, limits or expiry. The algorithm tests and one-off
//! tools use them; servers (the embedded `ouro serve` included) use the `serving` crate's
//! runtimes, which batch, admit and expire sessions.

use crate::backend::{
    BackendInfo, DraftBackend, DraftOutcome, DraftRequest, ServerTiming, SessionId, TargetBackend,
    VerifyOutcome,
};
use crate::draft::DraftSession;
use crate::error::{DecodingError, Result};
use crate::pool::PhrasePool;
use crate::sampling::SamplingParams;
use crate::tree::DraftTree;
use crate::verify::TargetSession;
use engine::LanguageModel;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

pub fn info_of<M: LanguageModel>(model: &M) -> BackendInfo {
    let i = model.info();
    BackendInfo {
        model: i.name.clone(),
        vocab_size: i.vocab_size,
        max_position: i.max_position,
        vocab: None,
    }
}

/// Runs an in-process call; all of its time is forward time (no queue, no network).
pub fn timed<R>(f: impl FnOnce() -> Result<R>) -> Result<(R, ServerTiming)> {
    let start = Instant::now();
    let out = f()?;
    let t = start.elapsed().as_secs_f64();
    Ok((
        out,
        ServerTiming {
            queue: 0.0,
            forward: t,
            total: t,
            batch_trees: 0,
            batch_rows: 0,
            open_sessions: 0,
            batch_prefill_rows: 0,
        },
    ))
}

/// SessionMap by id, each behind its own lock.
struct SessionMap<S> {
    map: Mutex<HashMap<SessionId, Arc<Mutex<S>>>>,
    next: AtomicU64,
}

impl<S> SessionMap<S> {
    fn new() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        }
    }

    fn map(&self) -> MutexGuard<'_, HashMap<SessionId, Arc<Mutex<S>>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn insert(&self, s: S) -> SessionId {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.map().insert(id, Arc::new(Mutex::new(s)));
        id
    }

    fn with<R>(&self, id: SessionId, f: impl FnOnce(&mut S) -> Result<R>) -> Result<R> {
        let slot = self
            .map()
            .get(&id)
            .cloned()
            .ok_or(DecodingError::UnknownSession(id))?;
        let mut s = slot.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s)
    }

    fn close(&self, id: SessionId) -> Result<()> {
        self.map()
            .remove(&id)
            .map(|_| ())
            .ok_or(DecodingError::UnknownSession(id))
    }
}

/// A target model in this process (reference backend: unbatched).
pub struct LocalTarget<M: LanguageModel> {
    model: Arc<M>,
    sessions: SessionMap<TargetSession<M::Cache>>,
}

impl<M: LanguageModel> LocalTarget<M> {
    pub fn new(model: Arc<M>) -> Self {
        Self {
            model,
            sessions: SessionMap::new(),
        }
    }

    pub fn model(&self) -> &Arc<M> {
        &self.model
    }
}

impl<M: LanguageModel> TargetBackend for LocalTarget<M> {
    fn info(&self) -> BackendInfo {
        info_of(&*self.model)
    }

    async fn open(&self, committed: &[u32]) -> Result<SessionId> {
        let s = TargetSession::open(&*self.model, committed)?;
        Ok(self.sessions.insert(s))
    }

    async fn verify(
        &self,
        session: SessionId,
        tree: &DraftTree,
        sampling: &SamplingParams,
        logprobs: Option<usize>,
    ) -> Result<(VerifyOutcome, ServerTiming)> {
        sampling.validate()?;
        crate::logprobs::check(logprobs)?;
        timed(|| {
            self.sessions.with(session, |s| {
                s.verify(&*self.model, tree, sampling, logprobs)
            })
        })
    }

    async fn close(&self, session: SessionId) -> Result<()> {
        self.sessions.close(session)
    }
}

/// A draft model in this process, sharing the caller's pool (reference backend).
pub struct LocalDraft<M: LanguageModel> {
    model: Arc<M>,
    pool: Arc<PhrasePool>,
    sessions: SessionMap<DraftSession<M::Cache>>,
}

impl<M: LanguageModel> LocalDraft<M> {
    pub fn new(model: Arc<M>, pool: Arc<PhrasePool>) -> Self {
        Self {
            model,
            pool,
            sessions: SessionMap::new(),
        }
    }
}

impl<M: LanguageModel> DraftBackend for LocalDraft<M> {
    fn info(&self) -> BackendInfo {
        info_of(&*self.model)
    }

    fn wants_pool_delta(&self) -> bool {
        false
    }

    async fn open(&self, committed: &[u32]) -> Result<SessionId> {
        let s = DraftSession::open(&*self.model, committed)?;
        Ok(self.sessions.insert(s))
    }

    async fn draft(
        &self,
        session: SessionId,
        request: DraftRequest,
    ) -> Result<(DraftOutcome, ServerTiming)> {
        timed(|| {
            self.sessions
                .with(session, |s| s.draft(&*self.model, &self.pool, &request))
        })
    }

    async fn close(&self, session: SessionId) -> Result<()> {
        self.sessions.close(session)
    }
}
