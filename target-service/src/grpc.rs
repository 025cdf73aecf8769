//! `ouroboros.target.v1.TargetService` over the scheduler, with health and reflection.

use crate::scheduler::{Scheduler, SchedulerConfig, Sessions};
use engine::LanguageModel;
use engine::chat_template::ChatTemplateSource;
use proto::convert::{field_status as field, sampling_from_pb};
use proto::serving::{close_session, publish_sessions, serve_sessions};
use proto::target::v1 as pb;
use proto::target::v1::target_service_server::{TargetService, TargetServiceServer};
use spec::local::check_vocab;
use spec::{DraftTree, SessionLimits, SessionTable, SpecError};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

#[derive(Debug, Clone)]
pub struct TargetConfig {
    pub tp_size: usize,
    pub max_sessions: usize,
    pub max_tree_nodes: usize,
    pub max_batch_tokens: usize,
    pub kv_budget_bytes: usize,
    pub session_ttl: Duration,
    pub batch_wait: Duration,
    /// Most rows of new sessions' prompts prefilled in one forward.
    pub prefill_chunk: usize,
    /// The model's chat template, reported by Info for the orchestrator to render with.
    pub chat_template: Option<ChatTemplateSource>,
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
            batch_wait: Duration::ZERO,
            prefill_chunk: 64,
            chat_template: None,
        }
    }
}

pub struct TargetGrpc<M: LanguageModel + 'static> {
    model: Arc<M>,
    sessions: Arc<Sessions<M>>,
    scheduler: Scheduler<M>,
    config: TargetConfig,
}

impl<M: LanguageModel + 'static> TargetGrpc<M> {
    pub fn new(model: Arc<M>, config: TargetConfig) -> Self {
        let sessions = Arc::new(SessionTable::new(SessionLimits {
            max_sessions: config.max_sessions,
            max_bytes: config.kv_budget_bytes,
            ttl: Some(config.session_ttl),
        }));
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

    /// Session count and KV memory into the metrics.
    fn publish(&self) {
        publish_sessions("target", &self.sessions);
    }

    pub fn sessions(&self) -> &Arc<Sessions<M>> {
        &self.sessions
    }

    fn vocab(&self) -> usize {
        self.model.info().vocab_size
    }
}

fn timing(started: Instant, forward: f64, queue: f64) -> Option<proto::common::v1::ServerTiming> {
    Some(proto::common::v1::ServerTiming {
        queue_s: queue,
        forward_s: forward,
        total_s: started.elapsed().as_secs_f64(),
    })
}

#[tonic::async_trait]
impl<M: LanguageModel + 'static> TargetService for TargetGrpc<M> {
    async fn info(
        &self,
        _: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let i = self.model.info();
        let c = &self.config;
        Ok(Response::new(pb::InfoResponse {
            model: Some(proto::common::v1::ModelInfo {
                model: i.name.clone(),
                vocab_size: i.vocab_size as u32,
                context_length: i.max_position as u32,
                chat_template: c.chat_template.as_ref().map(Into::into),
            }),
            tp_size: c.tp_size as u32,
            sessions: self.sessions.len() as u32,
            max_sessions: c.max_sessions as u32,
            kv_bytes: self.sessions.bytes() as u64,
            kv_budget_bytes: c.kv_budget_bytes as u64,
            max_tree_nodes: c.max_tree_nodes as u32,
            max_batch_tokens: c.max_batch_tokens as u32,
        }))
    }

    async fn open_session(
        &self,
        request: Request<pb::OpenSessionRequest>,
    ) -> Result<Response<pb::OpenSessionResponse>, Status> {
        let started = Instant::now();
        let tokens = request.into_inner().tokens;
        check_vocab(&tokens, self.vocab()).map_err(|e| field(&e, "tokens"))?;
        let max = self.model.info().max_position;
        if tokens.len() >= max {
            return Err(Status::out_of_range(format!(
                "tokens: {} committed tokens leave no room in a context of {max}",
                tokens.len()
            )));
        }
        let id = self
            .scheduler
            .open(tokens)
            .await
            .map_err(|e| field(&e, "tokens"))?;
        let forward = started.elapsed().as_secs_f64();
        self.publish();
        Ok(Response::new(pb::OpenSessionResponse {
            session_id: id,
            timing: timing(started, forward, 0.0),
        }))
    }

    async fn verify(
        &self,
        request: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        let started = Instant::now();
        let r = request.into_inner();
        if r.tokens.len() > self.config.max_tree_nodes {
            return Err(Status::invalid_argument(format!(
                "tokens: {} tree nodes, at most {} allowed",
                r.tokens.len(),
                self.config.max_tree_nodes
            )));
        }
        check_vocab(&r.tokens, self.vocab()).map_err(|e| field(&e, "tokens"))?;
        let sampling = sampling_from_pb(r.sampling.as_ref());
        sampling.validate().map_err(|e| field(&e, "sampling"))?;
        let tree = DraftTree::from_parts(r.tokens, r.parents).map_err(|e| field(&e, "parents"))?;
        let slot = self
            .sessions
            .get(r.session_id)
            .map_err(|e| field(&e, "session_id"))?;
        let (outcome, t) = self
            .scheduler
            .verify(r.session_id, slot, tree, sampling)
            .await
            .map_err(|e| match e {
                SpecError::UnknownSession(_) => field(&e, "session_id"),
                e => field(&e, "tokens"),
            })?;
        self.publish();
        Ok(Response::new(pb::VerifyResponse {
            path: outcome.path.iter().map(|&n| n as u32).collect(),
            accepted: outcome.accepted,
            bonus: outcome.bonus,
            outputs: outcome.outputs,
            timing: timing(started, t.forward, t.queue),
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

/// Serves the target on `listener` (with gRPC health and reflection) until `shutdown`
/// completes; evicts idle sessions in the background.
pub async fn serve<M: LanguageModel + 'static>(
    service: TargetGrpc<M>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let (sessions, ttl) = (service.sessions.clone(), service.config.session_ttl);
    serve_sessions(
        TargetServiceServer::new(service),
        listener,
        shutdown,
        sessions,
        ttl,
        "target",
    )
    .await
}
