//! What every gRPC server here shares: health and reflection (v1 and v1alpha) beside the service, session
//! metrics, SIGTERM and the graceful drain.

use crate::sessions::{SessionState, SessionTable};
pub use crate::tls::Listening;
use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;

/// A gRPC service a server can host: what tonic's router takes, named for health and
/// reflection.
pub trait GrpcService:
    Service<
        http::Request<Body>,
        Response = http::Response<Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + NamedService
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> GrpcService for S where
    S: Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + NamedService
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// Serves `service` on `listener`, with gRPC health (reporting it serving) and reflection
/// over our descriptor set, until `shutdown` completes.
pub async fn serve<S: GrpcService>(
    service: S,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    serve_draining(service, listener, shutdown, async {}).await
}

/// As [`serve`], with a drain between the stop signal and the end: once `stop` completes,
/// health says NOT_SERVING (so balancers and orchestrators send nothing new) while the
/// calls of open sessions go on until `drain` completes.
pub async fn serve_draining<S: GrpcService>(
    service: S,
    listener: TcpListener,
    stop: impl Future<Output = ()> + Send,
    drain: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    serve_ready(service, listener, stop, drain, None, Listening::default()).await
}

/// A signal for [`serve_ready`]: `check` asked every `every`, changes sent on. Its task
/// ends when the receiver is gone.
pub fn follow(
    check: impl Fn() -> bool + Send + 'static,
    every: Duration,
) -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(check());
    tokio::spawn(async move {
        while !tx.is_closed() {
            tokio::time::sleep(every).await;
            let now = check();
            tx.send_if_modified(|was| {
                let changed = *was != now;
                if changed {
                    tracing::warn!(ready = now, "readiness changed; health follows");
                }
                *was = now;
                changed
            });
        }
    });
    rx
}

/// A model service: [`serve_ready`] with health following `alive` (asked every second)
/// as a [`Signal::Life`], so a pod whose model worker stopped is restarted.
pub async fn serve_model<S: GrpcService>(
    service: S,
    alive: impl Fn() -> bool + Send + 'static,
    listener: TcpListener,
    stop: impl Future<Output = ()> + Send,
    drain: impl Future<Output = ()> + Send,
    listening: Listening,
) -> anyhow::Result<()> {
    let alive = Some((follow(alive, Duration::from_secs(1)), Signal::Life));
    serve_ready(service, listener, stop, drain, alive, listening).await
}

/// The health service name for liveness probes: SERVING unless the process cannot serve
/// again without a restart (a [`Signal::Life`] said so); the overall status ("") and the
/// API's name follow readiness and the drain.
pub const LIVENESS: &str = "liveness";

/// What a signal given to [`serve_ready`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Whether the server can serve now; when not, something outside it may come back (an
    /// orchestrator's target): not ready, but alive.
    Readiness,
    /// Whether the process can serve at all (its model worker runs); when not, nothing
    /// but a restart helps: neither ready nor alive.
    Life,
}

/// As [`serve_draining`], with health following `follow` too (SERVING while it says true)
/// until the stop, and TLS (with a plaintext health port) as `listening` says.
pub async fn serve_ready<S: GrpcService>(
    service: S,
    listener: TcpListener,
    stop: impl Future<Output = ()> + Send,
    drain: impl Future<Output = ()> + Send,
    follow: Option<(tokio::sync::watch::Receiver<bool>, Signal)>,
    listening: Listening,
) -> anyhow::Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<S>().await;
    // For liveness probes: the process answers, whatever its backends (a pod whose target
    // is away is not ready, but restarting it would not bring the target back).
    reporter
        .set_service_status(LIVENESS, tonic_health::ServingStatus::Serving)
        .await;
    let follower = follow.map(|(mut ready, signal)| {
        let reporter = reporter.clone();
        tokio::spawn(async move {
            loop {
                let up = *ready.borrow_and_update();
                let status = match up {
                    true => tonic_health::ServingStatus::Serving,
                    false => tonic_health::ServingStatus::NotServing,
                };
                reporter.set_service_status(S::NAME, status).await;
                reporter.set_service_status("", status).await;
                if signal == Signal::Life {
                    reporter.set_service_status(LIVENESS, status).await;
                }
                if ready.changed().await.is_err() {
                    return;
                }
            }
        })
    });
    let shutdown = async move {
        stop.await;
        // Gone before the drain's status is set, so it cannot set SERVING after it.
        if let Some(f) = follower {
            f.abort();
            let _ = f.await;
        }
        reporter.set_not_serving::<S>().await;
        reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        tracing::info!("stopping: health says NOT_SERVING while open sessions drain");
        drain.await;
    };
    // Reflection in both versions: grpcurl and grpcui speak v1, older tools (and Postman)
    // only v1alpha.
    // Each server lists its own service only (the public server does not advertise the
    // internal protocols).
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .with_service_name(S::NAME)
    };
    let (reflection_v1, reflection_v1alpha) =
        (reflection().build_v1()?, reflection().build_v1alpha()?);
    // Health alone in plaintext, for probes that cannot speak TLS; it ends with the server.
    let plain_health = match &listening.health_listen {
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("binding the health port {addr}: {e}"))?;
            let server = tonic::transport::Server::builder()
                .add_service(health.clone())
                .serve_with_incoming(TcpListenerStream::new(l));
            Some(tokio::spawn(server))
        }
        None => None,
    };
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = listening.tls {
        server = server.tls_config(tls)?;
    }
    if telemetry::traces::exporting() {
        // A span per call, continuing the caller's trace (no span work when not exporting).
        server = server.trace_fn(telemetry::traces::grpc_server_span);
    }
    let served = server
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    if let Some(h) = plain_health {
        h.abort();
    }
    Ok(served?)
}

/// Session count and KV memory of a draft or target service into the metrics.
pub fn publish_sessions<S: SessionState>(what: &str, sessions: &SessionTable<S>) {
    telemetry::publish_sessions(what, sessions.len(), sessions.bytes());
}

/// Runs `work` on the blocking pool (it may wait on a session's lock or run the model) and
/// answers with its error's status.
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> decoding::Result<T> + Send + 'static,
) -> Result<T, tonic::Status> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| tonic::Status::internal(format!("task failed: {e}")))?
        .map_err(|e| proto::convert::status_of(&e))
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

/// The `main` of a model service: sizes the CPU worker pools to the CPUs the process may
/// use before any thread starts, then parses the arguments with `parse` and runs `serve`
/// on a tokio runtime with telemetry (traces under `name`) set up and shut down around it.
pub fn service_main<A, F>(
    name: &'static str,
    parse: impl FnOnce() -> A,
    serve: impl FnOnce(A) -> F,
) -> anyhow::Result<()>
where
    F: Future<Output = anyhow::Result<()>>,
{
    let pools = engine::device::size_cpu_pools();
    let args = parse();
    tokio::runtime::Runtime::new()?.block_on(async {
        let telemetry = telemetry::init(name);
        if let Some(n) = pools {
            tracing::info!(
                threads = n,
                "CPU worker pools sized to the CPUs this process may use"
            );
        }
        let served = serve(args).await;
        telemetry.shutdown().await;
        served
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sessions::SessionLimits;
    use std::sync::Arc;

    struct Dummy;
    impl SessionState for Dummy {
        fn memory_bytes(&self) -> usize {
            1
        }
    }

    /// On tokio's paused clock: time moves only when every task waits, so the steps below
    /// happen in the order written however loaded the machine is.
    #[tokio::test(start_paused = true)]
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
        let started = tokio::time::Instant::now();
        let t = table.clone();
        let drain = tokio::spawn(async move { drain_sessions(&t, Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let refused = table.admit().unwrap_err();
        assert_eq!(
            proto::convert::status_of(&refused).code(),
            tonic::Code::Unavailable
        );
        drain.await.unwrap();
        closer.await.unwrap();
        let waited = started.elapsed();
        assert!(table.is_empty());
        // The close at 250 ms, seen at the drain's next 100 ms look.
        assert_eq!(
            waited,
            Duration::from_millis(300),
            "returned after {waited:?}"
        );

        // With a session that never closes, the limit ends the wait.
        let stuck = SessionTable::new(SessionLimits::default());
        stuck.insert(Dummy);
        let started = tokio::time::Instant::now();
        drain_sessions(&stuck, Duration::from_millis(300)).await;
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        assert_eq!(stuck.len(), 1);
    }
}
