//! `ouroboros.target.v1.TargetService` over the serving crate's target runtime (the same
//! one the embedded server runs), with health and reflection.

use decoding::ServerTiming;
use engine::LanguageModel;
use proto::convert::status_of;
use proto::target::v1 as pb;
use proto::target::v1::target_service_server::{TargetService, TargetServiceServer};
use proto::validate::VerifyCall;
use serving::scheduler::TargetSessions;
use serving::{TargetConfig, TargetRuntime};
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

pub struct TargetGrpc<M: LanguageModel + 'static> {
    runtime: Arc<TargetRuntime<M>>,
}

impl<M: LanguageModel + 'static> TargetGrpc<M> {
    pub fn new(model: Arc<M>, config: TargetConfig) -> Self {
        Self::over(Arc::new(TargetRuntime::new(model, config)))
    }

    /// Serves a runtime that may also be used in process.
    pub fn over(runtime: Arc<TargetRuntime<M>>) -> Self {
        Self { runtime }
    }

    pub fn sessions(&self) -> &Arc<TargetSessions<M>> {
        self.runtime.sessions()
    }
}

fn timing(started: Instant, t: ServerTiming) -> Option<proto::common::v1::ServerTiming> {
    Some(proto::common::v1::ServerTiming {
        total_s: started.elapsed().as_secs_f64(),
        ..t.into()
    })
}

#[tonic::async_trait]
impl<M: LanguageModel + 'static> TargetService for TargetGrpc<M> {
    async fn info(
        &self,
        request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let asked = request.into_inner().vocab_fingerprint_entries as usize;
        let rt = &self.runtime;
        let i = rt.model().info();
        let c = rt.config();
        Ok(Response::new(pb::InfoResponse {
            model: Some(proto::common::v1::ModelInfo {
                model: i.name.clone(),
                vocab_size: i.vocab_size as u32,
                context_length: i.max_position as u32,
                chat_template: c.chat_template.as_ref().map(Into::into),
                vocabulary: c.vocabulary.as_ref().map(|v| v.digest(asked).into()),
            }),
            tp_size: c.tp_size as u32,
            sessions: rt.sessions().len() as u32,
            max_sessions: c.max_sessions as u32,
            kv_bytes: rt.sessions().bytes() as u64,
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
        let id = self
            .runtime
            .open_session(tokens)
            .await
            .map_err(|e| status_of(&e))?;
        let forward = started.elapsed().as_secs_f64();
        Ok(Response::new(pb::OpenSessionResponse {
            session_id: id,
            timing: timing(
                started,
                ServerTiming {
                    forward,
                    ..ServerTiming::default()
                },
            ),
        }))
    }

    async fn verify(
        &self,
        request: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        let started = Instant::now();
        let r = request.into_inner();
        let call = VerifyCall::try_from(r).map_err(|e| status_of(&e))?;
        let (outcome, t) = self
            .runtime
            .verify_tree(call.session, call.tree, call.sampling, call.logprobs)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(pb::VerifyResponse {
            path: outcome.path.iter().map(|&n| n as u32).collect(),
            accepted: outcome.accepted,
            bonus: outcome.bonus,
            outputs: outcome.outputs,
            timing: timing(started, t),
            logprobs: outcome.logprobs.iter().map(Into::into).collect(),
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

/// Serves the target on `listener` (with gRPC health and reflection) until `shutdown`
/// completes; evicts idle sessions in the background.
pub async fn serve<M: LanguageModel + 'static>(
    service: TargetGrpc<M>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    serve_draining(service, listener, shutdown, async {}, Default::default()).await
}

/// As [`serve`]; after `stop`, health says NOT_SERVING until `drain` ends the server.
/// Health also says NOT_SERVING if the model's worker stops (checked every second), so
/// that Kubernetes restarts a pod that can no longer serve.
pub async fn serve_draining<M: LanguageModel + 'static>(
    service: TargetGrpc<M>,
    listener: TcpListener,
    stop: impl Future<Output = ()> + Send,
    drain: impl Future<Output = ()> + Send,
    listening: serving::server::Listening,
) -> anyhow::Result<()> {
    let runtime = service.runtime.clone();
    let server = TargetServiceServer::new(service);
    let alive = move || runtime.alive();
    serving::server::serve_model(server, alive, listener, stop, drain, listening).await
}
