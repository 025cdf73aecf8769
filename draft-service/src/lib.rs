//! The draft service: hosts the small model and drafts with lookahead decoding over gRPC.
//! Each phrase length has its own pool replica, kept current by the orchestrator's deltas
//! and fed by the draft's own lookahead window.

use dashmap::DashMap;
use engine::LanguageModel;
use proto::convert::field_status as field;
use proto::draft::v1 as pb;
use proto::draft::v1::draft_service_server::{DraftService, DraftServiceServer};
use proto::serving::{close_session, publish_sessions, serve_sessions};
use spec::{
    DraftRequest, DraftSession, LookaheadParams, Ngram, PhrasePool, PoolConfig, SessionLimits,
    SessionTable, SpecError,
};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

/// Most draft tokens one call may ask for.
pub const MAX_GAMMA: u32 = 64;

#[derive(Debug, Clone, Copy)]
pub struct DraftConfig {
    pub max_sessions: usize,
    pub kv_budget_bytes: usize,
    pub session_ttl: Duration,
    /// Shape of each pool replica (its phrase length comes from the requests).
    pub pool: PoolConfig,
}

impl Default for DraftConfig {
    fn default() -> Self {
        Self {
            max_sessions: 64,
            kv_budget_bytes: 2 << 30,
            session_ttl: Duration::from_secs(300),
            pool: PoolConfig::default(),
        }
    }
}

type Sessions<M> = SessionTable<DraftSession<<M as LanguageModel>::Cache>>;

pub struct DraftGrpc<M: LanguageModel + 'static> {
    model: Arc<M>,
    sessions: Arc<Sessions<M>>,
    pools: DashMap<usize, Arc<PhrasePool>>,
    config: DraftConfig,
}

impl<M: LanguageModel + 'static> DraftGrpc<M> {
    pub fn new(model: Arc<M>, config: DraftConfig) -> Self {
        let sessions = SessionTable::new(SessionLimits {
            max_sessions: config.max_sessions,
            max_bytes: config.kv_budget_bytes,
            ttl: Some(config.session_ttl),
        });
        Self {
            model,
            sessions: Arc::new(sessions),
            pools: DashMap::new(),
            config,
        }
    }

    /// Session count and KV memory into the metrics.
    fn publish(&self) {
        publish_sessions("draft", &self.sessions);
    }

    /// The open sessions (for draining at shutdown).
    pub fn sessions(&self) -> &Arc<Sessions<M>> {
        &self.sessions
    }

    /// The replica for phrases of `len` tokens.
    pub fn pool(&self, len: usize) -> Arc<PhrasePool> {
        self.pools
            .entry(len)
            .or_insert_with(|| {
                Arc::new(PhrasePool::new(PoolConfig {
                    phrase_len: len,
                    ..self.config.pool
                }))
            })
            .clone()
    }

    fn pool_phrases(&self) -> u64 {
        self.pools.iter().map(|p| p.len() as u64).sum()
    }
}

fn request_of(r: pb::DraftRequest) -> Result<DraftRequest, Status> {
    if !(1..=MAX_GAMMA).contains(&r.gamma) {
        return Err(Status::invalid_argument(format!(
            "gamma: must be in 1..={MAX_GAMMA}, got {}",
            r.gamma
        )));
    }
    if !(0.0..1.0).contains(&r.stop_below) {
        return Err(Status::invalid_argument(format!(
            "stop_below: must be in [0, 1), got {}",
            r.stop_below
        )));
    }
    let lookahead = r.lookahead.as_ref().map(LookaheadParams::from);
    if let Some(la) = &lookahead {
        la.validate().map_err(|e| field(&e, "lookahead"))?;
    }
    Ok(DraftRequest {
        new_committed: r.new_committed,
        gamma: r.gamma as usize,
        lookahead,
        pool_delta: r.pool_delta.into_iter().map(Ngram::from).collect(),
        eos: r.eos,
        stop_below: r.stop_below,
    })
}

fn timing(started: Instant, forward: f64) -> Option<proto::common::v1::ServerTiming> {
    Some(proto::common::v1::ServerTiming {
        queue_s: 0.0,
        forward_s: forward,
        total_s: started.elapsed().as_secs_f64(),
    })
}

#[tonic::async_trait]
impl<M: LanguageModel + 'static> DraftService for DraftGrpc<M> {
    async fn info(
        &self,
        _: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let i = self.model.info();
        Ok(Response::new(pb::InfoResponse {
            model: Some(proto::common::v1::ModelInfo {
                model: i.name.clone(),
                vocab_size: i.vocab_size as u32,
                context_length: i.max_position as u32,
                // Chat is rendered with the target's template.
                chat_template: None,
            }),
            sessions: self.sessions.len() as u32,
            max_sessions: self.config.max_sessions as u32,
            pool_phrases: self.pool_phrases(),
        }))
    }

    async fn open_session(
        &self,
        request: Request<pb::OpenSessionRequest>,
    ) -> Result<Response<pb::OpenSessionResponse>, Status> {
        let started = Instant::now();
        let tokens = request.into_inner().tokens;
        self.sessions.admit().map_err(|e| field(&e, "tokens"))?;
        // Opening only records the tokens; the prefill happens with the first draft.
        let s = DraftSession::open(&*self.model, &tokens).map_err(|e| field(&e, "tokens"))?;
        let id = self.sessions.insert(s);
        self.publish();
        Ok(Response::new(pb::OpenSessionResponse {
            session_id: id,
            timing: timing(started, 0.0),
        }))
    }

    async fn draft(
        &self,
        request: Request<pb::DraftRequest>,
    ) -> Result<Response<pb::DraftResponse>, Status> {
        let started = Instant::now();
        let r = request.into_inner();
        let id = r.session_id;
        let req = request_of(r)?;
        let len = match (&req.lookahead, req.pool_delta.first()) {
            (Some(la), _) => la.phrase_len(),
            (None, Some(n)) => n.phrase.len(),
            (None, None) => LookaheadParams::default().phrase_len(),
        };
        let pool = self.pool(len);
        let (model, sessions) = (self.model.clone(), self.sessions.clone());
        let span = tracing::debug_span!("lookahead", gamma = req.gamma);
        let outcome = tokio::task::spawn_blocking(move || {
            span.in_scope(|| sessions.with(id, |s| s.draft(&*model, &pool, &req)))
        })
        .await
        .map_err(|e| Status::internal(format!("draft task failed: {e}")))?
        .map_err(|e| match e {
            SpecError::UnknownSession(_) => field(&e, "session_id"),
            e => field(&e, "new_committed"),
        })?;
        let forward = started.elapsed().as_secs_f64();
        self.publish();
        Ok(Response::new(pb::DraftResponse {
            tokens: outcome.tokens,
            harvested: outcome.harvested.iter().map(Into::into).collect(),
            forwards: outcome.forwards,
            phrase_hits: outcome.phrase_hits,
            timing: timing(started, forward),
            confidence: outcome.confidence,
        }))
    }

    async fn close_session(
        &self,
        request: Request<pb::CloseSessionRequest>,
    ) -> Result<Response<pb::CloseSessionResponse>, Status> {
        close_session(self.sessions.clone(), request.into_inner().session_id).await?;
        self.publish();
        Ok(Response::new(pb::CloseSessionResponse {}))
    }
}

/// Serves the draft on `listener` (with gRPC health and reflection) until `shutdown`.
pub async fn serve<M: LanguageModel + 'static>(
    service: DraftGrpc<M>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let (sessions, ttl) = (service.sessions.clone(), service.config.session_ttl);
    serve_sessions(
        DraftServiceServer::new(service),
        listener,
        shutdown,
        sessions,
        ttl,
        "draft",
    )
    .await
}
