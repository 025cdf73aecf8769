//! The draft service: hosts the small model and drafts with lookahead decoding over gRPC.
//! Each phrase length has its own pool replica, kept current by the orchestrator's deltas
//! and fed by the draft's own lookahead window.

use decoding::{DecodingError, DraftRequest, LookaheadParams, Ngram};
use engine::LanguageModel;
use proto::convert::field_status as field;
use proto::draft::v1 as pb;
use proto::draft::v1::draft_service_server::{DraftService, DraftServiceServer};
use serving::DraftRuntime;
use serving::draft::DraftSessions;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

pub use serving::DraftConfig;

/// Most draft tokens one call may ask for.
pub const MAX_GAMMA: u32 = 64;

pub struct DraftGrpc<M: LanguageModel + 'static> {
    runtime: Arc<DraftRuntime<M>>,
}

impl<M: LanguageModel + 'static> DraftGrpc<M> {
    pub fn new(model: Arc<M>, config: DraftConfig) -> Self {
        Self {
            runtime: Arc::new(DraftRuntime::new(model, config)),
        }
    }

    /// The open sessions (for draining at shutdown).
    pub fn sessions(&self) -> &Arc<DraftSessions<M>> {
        self.runtime.sessions()
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
        let rt = &self.runtime;
        let i = rt.model().info();
        Ok(Response::new(pb::InfoResponse {
            model: Some(proto::common::v1::ModelInfo {
                model: i.name.clone(),
                vocab_size: i.vocab_size as u32,
                context_length: i.max_position as u32,
                // Chat is rendered with the target's template.
                chat_template: None,
            }),
            sessions: rt.sessions().len() as u32,
            max_sessions: rt.config().max_sessions as u32,
            pool_phrases: rt.pool_phrases(),
        }))
    }

    async fn open_session(
        &self,
        request: Request<pb::OpenSessionRequest>,
    ) -> Result<Response<pb::OpenSessionResponse>, Status> {
        let started = Instant::now();
        let tokens = request.into_inner().tokens;
        let id = self
            .runtime
            .open_session(&tokens)
            .map_err(|e| field(&e, "tokens"))?;
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
        let runtime = self.runtime.clone();
        let span = tracing::debug_span!("lookahead", gamma = req.gamma);
        let outcome =
            tokio::task::spawn_blocking(move || span.in_scope(|| runtime.draft_blocking(id, &req)))
                .await
                .map_err(|e| Status::internal(format!("draft task failed: {e}")))?
                .map_err(|e| match e {
                    DecodingError::UnknownSession(_) => field(&e, "session_id"),
                    e => field(&e, "new_committed"),
                })?;
        let forward = started.elapsed().as_secs_f64();
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
        let id = request.into_inner().session_id;
        let runtime = self.runtime.clone();
        tokio::task::spawn_blocking(move || runtime.close_session(id))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| field(&e, "session_id"))?;
        Ok(Response::new(pb::CloseSessionResponse {}))
    }
}

/// Serves the draft on `listener` (with gRPC health and reflection) until `shutdown`.
pub async fn serve<M: LanguageModel + 'static>(
    service: DraftGrpc<M>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    serving::server::serve(DraftServiceServer::new(service), listener, shutdown).await
}
