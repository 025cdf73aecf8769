//! The draft service: hosts the small model and drafts with lookahead decoding over gRPC.
//! Each phrase length has its own pool replica, kept current by the orchestrator's deltas
//! and fed by the draft's own lookahead window.

use engine::LanguageModel;
use proto::convert::status_of;
use proto::draft::v1 as pb;
use proto::draft::v1::draft_service_server::{DraftService, DraftServiceServer};
use proto::validate::DraftCall;
use serving::DraftRuntime;
use serving::draft::DraftSessions;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};
use tracing::Instrument;

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

fn timing(started: Instant, forward: f64) -> Option<proto::common::v1::ServerTiming> {
    Some(proto::common::v1::ServerTiming {
        queue_s: 0.0,
        forward_s: forward,
        total_s: started.elapsed().as_secs_f64(),
        batch_trees: 0,
        batch_rows: 0,
        open_sessions: 0,
        batch_prefill_rows: 0,
    })
}

#[tonic::async_trait]
impl<M: LanguageModel + 'static> DraftService for DraftGrpc<M> {
    async fn info(
        &self,
        request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let asked = request.into_inner().vocab_fingerprint_entries as usize;
        let rt = &self.runtime;
        let i = rt.model().info();
        Ok(Response::new(pb::InfoResponse {
            model: Some(proto::common::v1::ModelInfo {
                model: i.name.clone(),
                vocab_size: i.vocab_size as u32,
                context_length: i.max_position as u32,
                // Chat is rendered with the target's template.
                chat_template: None,
                vocabulary: rt
                    .config()
                    .vocabulary
                    .as_ref()
                    .map(|v| v.digest(asked).into()),
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
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(pb::OpenSessionResponse {
            session_id: id,
            timing: timing(started, 0.0),
        }))
    }

    async fn draft(
        &self,
        request: Request<pb::DraftRequest>,
    ) -> Result<Response<pb::DraftResponse>, Status> {
        let DraftCall { session, request } =
            DraftCall::try_from(request.into_inner()).map_err(|e| status_of(&e))?;
        let span = tracing::debug_span!("draft", gamma = request.length.tokens());
        let (outcome, timing) = self
            .runtime
            .draft_call(session, request)
            .instrument(span)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(pb::DraftResponse {
            tokens: outcome.tokens,
            harvested: outcome.harvested.iter().map(Into::into).collect(),
            forwards: outcome.forwards,
            phrase_hits: outcome.phrase_hits,
            timing: Some(timing.into()),
            confidence: outcome.confidence,
            rows: outcome.rows,
            caught_up: outcome.caught_up,
        }))
    }

    async fn close_session(
        &self,
        request: Request<pb::CloseSessionRequest>,
    ) -> Result<Response<pb::CloseSessionResponse>, Status> {
        let id = request.into_inner().session_id;
        let runtime = self.runtime.clone();
        serving::server::blocking(move || runtime.close_session(id)).await?;
        Ok(Response::new(pb::CloseSessionResponse {}))
    }
}

/// Serves the draft on `listener` (with gRPC health and reflection) until `shutdown`.
pub async fn serve<M: LanguageModel + 'static>(
    service: DraftGrpc<M>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    serve_draining(service, listener, shutdown, async {}, Default::default()).await
}

/// As [`serve`]; after `stop`, health says NOT_SERVING until `drain` ends the server, and
/// while the model's worker has stopped.
pub async fn serve_draining<M: LanguageModel + 'static>(
    service: DraftGrpc<M>,
    listener: TcpListener,
    stop: impl Future<Output = ()> + Send,
    drain: impl Future<Output = ()> + Send,
    listening: serving::server::Listening,
) -> anyhow::Result<()> {
    let runtime = service.runtime.clone();
    let server = DraftServiceServer::new(service);
    let alive = move || runtime.alive();
    serving::server::serve_model(server, alive, listener, stop, drain, listening).await
}
