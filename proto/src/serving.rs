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
    let mut server = tonic::transport::Server::builder();
    if telemetry::traces::exporting() {
        // A span per call, continuing the caller's trace (no span work when not exporting).
        server = server.trace_fn(telemetry::traces::grpc_server_span);
    }
    server
        .add_service(health)
        .add_service(reflection)
        .add_service(service)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

/// Serves a session-keeping service (draft or target, named by `what`) like [`serve`],
/// evicting sessions idle for longer than `ttl` in the background.
pub async fn serve_sessions<Svc, S>(
    service: Svc,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    sessions: Arc<SessionTable<S>>,
    ttl: Duration,
    what: &'static str,
) -> anyhow::Result<()>
where
    Svc: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    Svc::Future: Send + 'static,
    S: SessionState + Send + 'static,
{
    let evictor = spawn_evictor(ttl, what, sessions);
    let r = serve(service, listener, shutdown).await;
    evictor.abort();
    r
}

/// Evicts idle sessions every quarter of `ttl`, keeping the session metrics current.
fn spawn_evictor<S: SessionState + Send + 'static>(
    ttl: Duration,
    what: &'static str,
    sessions: Arc<SessionTable<S>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval((ttl / 4).max(Duration::from_millis(10)));
        loop {
            tick.tick().await;
            let n = sessions.evict_idle();
            if n > 0 {
                tracing::info!(evicted = n, "idle {what} sessions evicted");
                publish_sessions(what, &sessions);
            }
        }
    })
}

/// Session count and KV memory of a draft or target service into the metrics.
pub fn publish_sessions<S: SessionState>(what: &str, sessions: &SessionTable<S>) {
    telemetry::publish_sessions(what, sessions.len(), sessions.bytes());
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

/// Completes on Ctrl-C or SIGTERM (what Kubernetes sends before it kills a pod).
pub async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM ({e}); stopping on Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Graceful drain: refuses new sessions, then waits until the open ones are closed (or
/// evicted) or `limit` passes, so requests in flight finish before the server stops.
pub async fn drain_sessions<S: SessionState>(sessions: &SessionTable<S>, limit: Duration) {
    sessions.drain();
    let open = sessions.len();
    if open > 0 {
        tracing::info!(open, "draining: waiting for open sessions to finish");
    }
    let deadline = tokio::time::Instant::now() + limit;
    while !sessions.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !sessions.is_empty() {
        tracing::warn!(
            open = sessions.len(),
            "drain limit reached; stopping with sessions open"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spec::SessionLimits;

    struct Dummy;
    impl SessionState for Dummy {
        fn memory_bytes(&self) -> usize {
            1
        }
    }

    #[tokio::test]
    async fn draining_refuses_new_sessions_and_waits_for_open_ones() {
        let table = Arc::new(SessionTable::new(SessionLimits::default()));
        let id = table.insert(Dummy);
        let closer = {
            let table = table.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(250)).await;
                table.close(id).unwrap();
            })
        };
        let started = std::time::Instant::now();
        let t = table.clone();
        let drain = tokio::spawn(async move { drain_sessions(&t, Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let refused = table.admit().unwrap_err();
        assert_eq!(
            crate::convert::status_of(&refused).code(),
            tonic::Code::Unavailable
        );
        drain.await.unwrap();
        closer.await.unwrap();
        let waited = started.elapsed();
        assert!(table.is_empty());
        assert!(
            waited >= Duration::from_millis(200),
            "returned after {waited:?}"
        );
        assert!(waited < Duration::from_secs(5), "returned after {waited:?}");

        // With a session that never closes, the limit ends the wait.
        let stuck = SessionTable::new(SessionLimits::default());
        stuck.insert(Dummy);
        let started = std::time::Instant::now();
        drain_sessions(&stuck, Duration::from_millis(300)).await;
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(stuck.len(), 1);
    }
}
