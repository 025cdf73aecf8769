//! What every server here shares: gRPC health and reflection beside the service, the
//! background task that evicts idle sessions, and closing a session off the async threads.

use crate::convert::field_status;
use spec::SessionId;
use spec::sessions::{SessionState, SessionTable};
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;

/// Serves `service` on `listener`, with gRPC health (reporting it serving) and reflection
/// over our descriptor set, until `shutdown` completes.
pub async fn serve<S>(
    service: S,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<S>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(service)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

/// Calls `evict` (which returns how many sessions it evicted) every quarter of `ttl`.
pub fn spawn_evictor(
    ttl: Duration,
    what: &'static str,
    evict: impl Fn() -> usize + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval((ttl / 4).max(Duration::from_millis(10)));
        loop {
            tick.tick().await;
            let n = evict();
            if n > 0 {
                tracing::info!(evicted = n, "idle {what} sessions evicted");
            }
        }
    })
}

/// Closes a session on the blocking pool: closing waits for a call that holds it.
pub async fn close_session<S: SessionState + Send + 'static>(
    sessions: Arc<SessionTable<S>>,
    id: SessionId,
) -> Result<(), Status> {
    tokio::task::spawn_blocking(move || sessions.close(id))
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| field_status(&e, "session_id"))
}
