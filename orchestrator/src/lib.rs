//! The orchestrator: the public `Generate` API over the decoding loops, the in-process
//! (embedded) and remote (gRPC) backends, and the shared phrase pool.

pub mod api;
pub mod auth;
pub mod chat;
pub mod cli;
pub mod embedded;
pub mod http;
pub mod openai;
pub mod pipeline;
pub mod progress;
pub mod remote;
pub mod replicas;
pub mod testing;
pub mod text;
pub mod validation;
pub mod vocabulary;

use proto::v1::ouroboros_server::OuroborosServer;
use std::future::Future;
use tokio::net::TcpListener;

/// Serves the public API on `listener` (with gRPC health and reflection) until `shutdown`;
/// with API keys set on the service, calls without one get UNAUTHENTICATED.
pub async fn serve(
    service: api::GenerateService,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    serving::server::serve(OuroborosServer::new(service), listener, shutdown).await
}

/// As [`serve`], with health following `ready` (NOT_SERVING while no target answers),
/// which says `signal`: readiness when the target is remote (it may come back), life
/// when it runs in this process (its worker cannot).
pub async fn serve_ready(
    service: api::GenerateService,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    ready: tokio::sync::watch::Receiver<bool>,
    signal: serving::server::Signal,
    listening: serving::server::Listening,
) -> anyhow::Result<()> {
    let server = OuroborosServer::new(service);
    let follow = Some((ready, signal));
    serving::server::serve_ready(server, listener, shutdown, async {}, follow, listening).await
}
