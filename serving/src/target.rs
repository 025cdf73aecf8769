//! The target runtime: a model, its session table and the batching verify scheduler. The
//! target service serves it over gRPC; the embedded `ouro serve` calls it in process, so
//! both batch concurrent sessions' trees into shared forwards, admit sessions against the
//! same limits and expire idle ones.

use crate::scheduler::{Scheduler, SchedulerConfig, TargetSessions};
use crate::sessions::{Clock, SessionLimits, SessionTable, start_evictor};
use decoding::local::info_of;
use decoding::validate::{FieldError, check_vocab};
use decoding::{
    BackendInfo, DecodingError, DraftTree, Result, SamplingParams, ServerTiming, SessionId,
    TargetBackend, VerifyOutcome,
};
use engine::LanguageModel;
use engine::chat_template::ChatTemplateSource;
use engine::vocab::Vocabulary;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct TargetConfig {
    pub tp_size: usize,
    pub max_sessions: usize,
    pub max_tree_nodes: usize,
    pub max_batch_tokens: usize,
    pub kv_budget_bytes: usize,
    pub session_ttl: Duration,
    /// What idle times are measured on (the system's clock; tests move their own).
    pub clock: Clock,
    pub batch_wait: Duration,
    /// Most rows of new sessions' prompts prefilled in one forward.
    pub prefill_chunk: usize,
    /// The model's chat template, reported by Info for the orchestrator to render with.
    pub chat_template: Option<ChatTemplateSource>,
    /// The model's vocabulary strings, fingerprinted for callers by Info.
    pub vocabulary: Option<Arc<Vocabulary>>,
}

impl Default for TargetConfig {
    fn default() -> Self {
        Self {
            tp_size: 1,
            max_sessions: 64,
            max_tree_nodes: 128,
            max_batch_tokens: 512,
            kv_budget_bytes: 4 << 30,
            session_ttl: Duration::from_secs(300),
            clock: Clock::system(),
            batch_wait: Duration::from_millis(10),
            prefill_chunk: 64,
            chat_template: None,
            vocabulary: None,
        }
    }
}

pub struct TargetRuntime<M: LanguageModel + 'static> {
    model: Arc<M>,
    sessions: Arc<TargetSessions<M>>,
    scheduler: Scheduler<M>,
    config: TargetConfig,
}

impl<M: LanguageModel + 'static> TargetRuntime<M> {
    /// Starts the scheduler's worker and the idle-session evictor.
    pub fn new(model: Arc<M>, config: TargetConfig) -> Self {
        let limits = SessionLimits {
            max_sessions: config.max_sessions,
            max_bytes: config.kv_budget_bytes,
            ttl: Some(config.session_ttl),
        };
        let sessions = Arc::new(SessionTable::with_clock(limits, config.clock.clone()));
        start_evictor(&sessions, "target");
        let scheduler = Scheduler::start(
            model.clone(),
            sessions.clone(),
            SchedulerConfig {
                max_batch_tokens: config.max_batch_tokens,
                batch_wait: config.batch_wait,
                prefill_chunk: config.prefill_chunk,
            },
        );
        Self {
            model,
            sessions,
            scheduler,
            config,
        }
    }

    pub fn model(&self) -> &Arc<M> {
        &self.model
    }

    pub fn sessions(&self) -> &Arc<TargetSessions<M>> {
        &self.sessions
    }

    pub fn config(&self) -> &TargetConfig {
        &self.config
    }

    /// Whether its worker runs (health says NOT_SERVING when not).
    pub fn alive(&self) -> bool {
        self.scheduler.alive()
    }

    /// Session count and KV memory into the metrics.
    pub fn publish(&self) {
        crate::server::publish_sessions("target", &self.sessions);
    }

    /// Opens a session on `tokens` (prefilled in chunks beside other sessions' trees).
    pub async fn open_session(&self, tokens: Vec<u32>) -> Result<SessionId> {
        let info = self.model.info();
        check_vocab(&tokens, info.vocab_size, "tokens")?;
        if tokens.len() >= info.max_position {
            return Err(DecodingError::ContextOverflow(format!(
                "tokens: {} committed tokens leave no room in a context of {}",
                tokens.len(),
                info.max_position
            )));
        }
        let id = self.scheduler.open(tokens).await?;
        self.publish();
        Ok(id)
    }

    /// Verifies `tree` in the next batched forward. The sampling parameters come checked
    /// (by the wire conversion, or with the request's decoding parameters in process); the
    /// tree is held to what only this runtime knows: its size limit and the vocabulary.
    pub async fn verify_tree(
        &self,
        session: SessionId,
        tree: DraftTree,
        sampling: SamplingParams,
        logprobs: Option<usize>,
    ) -> Result<(VerifyOutcome, ServerTiming)> {
        decoding::logprobs::check(logprobs)?;
        if tree.len() > self.config.max_tree_nodes {
            return Err(FieldError::new(
                "tokens",
                format!("at most {} tree nodes", self.config.max_tree_nodes),
                tree.len(),
            )
            .into());
        }
        check_vocab(&tree.tokens, self.model.info().vocab_size, "tokens")?;
        let slot = self.sessions.get(session)?;
        let r = self
            .scheduler
            .verify(session, slot, tree, sampling, logprobs)
            .await;
        self.publish();
        r
    }

    /// Closes a session; waits while a forward holds it (call off the async workers).
    pub fn close_session(&self, session: SessionId) -> Result<()> {
        let r = self.sessions.close(session);
        self.publish();
        r
    }
}

impl<M: LanguageModel + 'static> TargetBackend for TargetRuntime<M> {
    fn max_tree_nodes(&self) -> Option<usize> {
        Some(self.config.max_tree_nodes)
    }

    fn info(&self) -> BackendInfo {
        info_of(&*self.model)
    }

    /// Whether its worker runs.
    async fn reachable(&self) -> bool {
        self.alive()
    }

    async fn open(&self, committed: &[u32]) -> Result<SessionId> {
        self.open_session(committed.to_vec()).await
    }

    async fn verify(
        &self,
        session: SessionId,
        tree: &DraftTree,
        sampling: &SamplingParams,
        logprobs: Option<usize>,
    ) -> Result<(VerifyOutcome, ServerTiming)> {
        self.verify_tree(session, tree.clone(), *sampling, logprobs)
            .await
    }

    async fn close(&self, session: SessionId) -> Result<()> {
        self.close_session(session)
    }
}
