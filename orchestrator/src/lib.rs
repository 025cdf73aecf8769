//! The orchestrator: the public `Generate` API over the decoding loops, the in-process
//! (embedded) and remote (gRPC) backends, and the shared phrase pool.

pub mod api;
pub mod embedded;
pub mod pipeline;
pub mod remote;
pub mod text;

use proto::serving::reflection_service;
use proto::v1::ouroboros_server::OuroborosServer;
use std::future::Future;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

/// Serves the public API on `listener` (with gRPC health and reflection) until `shutdown`.
pub async fn serve(
    service: api::GenerateService,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<OuroborosServer<api::GenerateService>>()
        .await;
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection_service()?)
        .add_service(OuroborosServer::new(service))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}
