//! The draft runtime: a small model, its session table, the phrase pools it drafts
//! with, and the scheduler that runs concurrent calls' steps in shared forwards
//! ([`crate::draft_scheduler`]). The draft service serves it over gRPC (one pool replica per phrase length, kept
//! current by the orchestrator's deltas); the embedded `ouro serve` calls it in process,
//! sharing the orchestrator's pool.

pub use crate::draft_scheduler::DraftSessions;
use crate::draft_scheduler::{CATCH_UP_CHUNK, DraftScheduler};
use crate::sessions::{Clock, SessionLimits, SessionTable, start_evictor};
use dashmap::DashMap;
use decoding::local::info_of;
use decoding::{
    BackendInfo, DraftBackend, DraftOutcome, DraftRequest, DraftSession, LookaheadParams,
    PhrasePool, PoolConfig, Result, ServerTiming, SessionId,
};
use engine::LanguageModel;
use engine::vocab::Vocabulary;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct DraftConfig {
    pub max_sessions: usize,
    pub kv_budget_bytes: usize,
    pub session_ttl: Duration,
    /// What idle times are measured on (the system's clock; tests move their own).
    pub clock: Clock,
    /// Shape of each pool replica (its phrase length comes from the requests).
    pub pool: PoolConfig,
    /// The model's vocabulary strings, fingerprinted for callers by Info.
    pub vocabulary: Option<Arc<Vocabulary>>,
    /// Rows of unseen text a session catches up on per forward.
    pub catch_up_chunk: usize,
}

impl Default for DraftConfig {
    fn default() -> Self {
        Self {
            max_sessions: 64,
            kv_budget_bytes: 2 << 30,
            session_ttl: Duration::from_secs(300),
            clock: Clock::system(),
            pool: PoolConfig::default(),
            vocabulary: None,
            catch_up_chunk: CATCH_UP_CHUNK as usize,
        }
    }
}

/// Where drafting reads and feeds phrases.
enum Pools {
    /// The caller's own pool (in process: nothing to replicate).
    Shared(Arc<PhrasePool>),
    /// One replica per phrase length, fed by the caller's deltas.
    Replicas(DashMap<usize, Arc<PhrasePool>>),
}

pub struct DraftRuntime<M: LanguageModel + 'static> {
    model: Arc<M>,
    sessions: Arc<DraftSessions<M>>,
    pools: Pools,
    config: DraftConfig,
    scheduler: DraftScheduler<M>,
}

impl<M: LanguageModel + 'static> DraftRuntime<M> {
    /// A runtime with pool replicas of its own (the draft service).
    pub fn new(model: Arc<M>, config: DraftConfig) -> Self {
        Self::with_pools(model, config, Pools::Replicas(DashMap::new()))
    }

    /// A runtime that drafts with the caller's pool (in process).
    pub fn sharing(model: Arc<M>, pool: Arc<PhrasePool>, config: DraftConfig) -> Self {
        Self::with_pools(model, config, Pools::Shared(pool))
    }

    fn with_pools(model: Arc<M>, config: DraftConfig, pools: Pools) -> Self {
        let limits = SessionLimits {
            max_sessions: config.max_sessions,
            max_bytes: config.kv_budget_bytes,
            ttl: Some(config.session_ttl),
        };
        let sessions = Arc::new(SessionTable::with_clock(limits, config.clock.clone()));
        start_evictor(&sessions, "draft");
        let scheduler =
            DraftScheduler::start(model.clone(), sessions.clone(), config.catch_up_chunk);
        Self {
            model,
            sessions,
            pools,
            config,
            scheduler,
        }
    }

    pub fn model(&self) -> &Arc<M> {
        &self.model
    }

    pub fn sessions(&self) -> &Arc<DraftSessions<M>> {
        &self.sessions
    }

    pub fn config(&self) -> &DraftConfig {
        &self.config
    }

    /// Whether its worker runs (health says NOT_SERVING when not).
    pub fn alive(&self) -> bool {
        self.scheduler.alive()
    }

    /// Session count and KV memory into the metrics.
    pub fn publish(&self) {
        crate::server::publish_sessions("draft", &self.sessions);
    }

    /// The pool for phrases of `len` tokens.
    pub fn pool(&self, len: usize) -> Arc<PhrasePool> {
        match &self.pools {
            Pools::Shared(p) => p.clone(),
            Pools::Replicas(map) => map
                .entry(len)
                .or_insert_with(|| {
                    Arc::new(PhrasePool::new(PoolConfig {
                        phrase_len: len,
                        ..self.config.pool
                    }))
                })
                .clone(),
        }
    }

    /// Phrases in all pools.
    pub fn pool_phrases(&self) -> u64 {
        match &self.pools {
            Pools::Shared(p) => p.len() as u64,
            Pools::Replicas(map) => map.iter().map(|p| p.len() as u64).sum(),
        }
    }

    /// Opens a session; it only records the tokens, the prefill comes with the first draft.
    pub fn open_session(&self, tokens: &[u32]) -> Result<SessionId> {
        self.sessions.admit()?;
        let s = DraftSession::open(&*self.model, tokens)?;
        let id = self.sessions.insert(s);
        self.publish();
        Ok(id)
    }

    /// Drafts for a session with the pool its request's phrases belong to, on the
    /// scheduler's thread, in forwards shared with the other sessions' calls.
    pub async fn draft_call(
        &self,
        session: SessionId,
        request: DraftRequest,
    ) -> Result<(DraftOutcome, ServerTiming)> {
        let len = match (&request.lookahead, request.pool_delta.first()) {
            (Some(la), _) => la.phrase_len(),
            (None, Some(n)) => n.phrase.len(),
            (None, None) => LookaheadParams::default().phrase_len(),
        };
        let pool = self.pool(len);
        let slot = self.sessions.get(session)?;
        let r = self.scheduler.draft(session, slot, request, pool).await;
        self.publish();
        r
    }

    /// Closes a session; waits while a draft call holds it.
    pub fn close_session(&self, session: SessionId) -> Result<()> {
        let r = self.sessions.close(session);
        self.publish();
        r
    }
}

impl<M: LanguageModel + 'static> DraftBackend for DraftRuntime<M> {
    fn info(&self) -> BackendInfo {
        info_of(&*self.model)
    }

    fn wants_pool_delta(&self) -> bool {
        matches!(self.pools, Pools::Replicas(_))
    }

    async fn open(&self, committed: &[u32]) -> Result<SessionId> {
        self.open_session(committed)
    }

    async fn draft(
        &self,
        session: SessionId,
        request: DraftRequest,
    ) -> Result<(DraftOutcome, ServerTiming)> {
        self.draft_call(session, request).await
    }

    async fn close(&self, session: SessionId) -> Result<()> {
        self.close_session(session)
    }
}
