//! Pieces every server here mounts: gRPC reflection over our descriptor set, and the
//! background task that evicts idle sessions.

use std::time::Duration;
use tonic_reflection::server::v1::{ServerReflection, ServerReflectionServer};

pub fn reflection_service()
-> Result<ServerReflectionServer<impl ServerReflection>, tonic_reflection::server::Error> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
        .build_v1()
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
