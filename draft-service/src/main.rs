//! `draft-service`: serves the draft model over gRPC.

use anyhow::{Context, Result};
use clap::Parser;
use decoding::PoolConfig;
use draft_service::{DraftConfig, DraftGrpc, serve_draining};
use engine::LoadOptions;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "draft-service",
    version,
    about = "Ouroboros draft model service"
)]
struct Args {
    /// Draft model: a GGUF file or a Hugging Face folder.
    #[arg(long, env = "OURO_DRAFT_MODEL")]
    model: PathBuf,
    #[arg(long, env = "OURO_DRAFT_LISTEN", default_value = "0.0.0.0:50053")]
    listen: String,
    /// Where the model runs: cpu, cuda or cuda:N (needs a binary built with --features
    /// cuda).
    #[arg(long, env = "OURO_DRAFT_DEVICE", default_value = "cpu")]
    device: String,
    #[arg(long, env = "OURO_DRAFT_MAX_SESSIONS", default_value_t = 64)]
    max_sessions: usize,
    /// KV memory budget in MiB: new sessions are refused while it is full, and so is
    /// a call that would grow a session's cache past it.
    #[arg(long, env = "OURO_DRAFT_KV_BUDGET_MB", default_value_t = 2048)]
    kv_budget_mb: usize,
    /// Sessions idle this long are evicted.
    #[arg(long, env = "OURO_DRAFT_SESSION_TTL_S", default_value_t = 300)]
    session_ttl_s: u64,
    /// Pool replica: most phrases kept per key and in all.
    #[arg(long, env = "OURO_DRAFT_POOL_PER_KEY", default_value_t = PoolConfig::default().per_key)]
    pool_per_key: usize,
    #[arg(long, env = "OURO_DRAFT_POOL_MAX_PHRASES", default_value_t = PoolConfig::default().max_phrases)]
    pool_max_phrases: usize,
    /// Rows of text a session has not seen (its prompt, on its first call) that one
    /// batched forward catches up on; the other sessions' steps go on beside it.
    #[arg(long, env = "OURO_DRAFT_CATCH_UP_CHUNK", default_value_t = serving::draft_scheduler::CATCH_UP_CHUNK, value_parser = clap::value_parser!(u64).range(1..))]
    catch_up_chunk: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 0.0.0.0:9090).
    #[arg(long, env = "OURO_DRAFT_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// On SIGTERM, refuse new sessions and wait up to this long for open ones to end.
    #[arg(long, env = "OURO_DRAFT_DRAIN_TIMEOUT_S", default_value_t = 60)]
    drain_timeout_s: u64,
    #[command(flatten)]
    tls: serving::tls::TlsArgs,
    /// Score only the first N vocabulary entries and the tokens each session's text has
    /// held (a cheaper output head; the target still checks every draft token). Leave unset on a service that hosts the target
    /// for `--lookahead-endpoint`, whose tokens nobody checks.
    #[arg(long, env = "OURO_DRAFT_HEAD_VOCAB", value_parser = clap::value_parser!(u64).range(1..))]
    head_vocab: Option<u64>,
    /// Re-encode the matrices in these blocks at load (`q4k`, `q6k`, `q8_0`); like
    /// `--head-vocab`, only for a draft whose tokens the target checks.
    #[arg(long, env = "OURO_DRAFT_REQUANTIZE")]
    requantize: Option<String>,
}

fn main() -> Result<()> {
    serving::server::service_main("ouroboros-draft", Args::parse, run_service)
}

async fn run_service(a: Args) -> Result<()> {
    let config = DraftConfig {
        max_sessions: a.max_sessions,
        kv_budget_bytes: a.kv_budget_mb << 20,
        session_ttl: Duration::from_secs(a.session_ttl_s),
        pool: PoolConfig {
            per_key: a.pool_per_key,
            max_phrases: a.pool_max_phrases,
            ..PoolConfig::default()
        },
        vocabulary: None,
        catch_up_chunk: a.catch_up_chunk as usize,
        ..DraftConfig::default()
    };
    if let Some(addr) = &a.metrics_listen {
        telemetry::start_metrics(addr).await?;
    }
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("binding {}", a.listen))?;
    tracing::info!(model = %a.model.display(), "loading draft model");
    let device = engine::device::devices(&a.device, 1)?.remove(0);
    let opts = LoadOptions {
        head_vocab: a.head_vocab.map(|n| n as usize),
        requantize: a
            .requantize
            .as_deref()
            .map(engine::block_type)
            .transpose()?,
        ..LoadOptions::default()
    };
    let m = engine::load_model(&a.model, &opts, &device)
        .with_context(|| format!("loading {}", a.model.display()))?;
    let config = DraftConfig {
        vocabulary: engine::vocab::Vocabulary::of_model(&a.model)?.map(Arc::new),
        ..config
    };
    let listening = a.tls.listening()?;
    tracing::info!(listen = %a.listen, tls = listening.tls.is_some(), "draft service ready");
    let grpc = DraftGrpc::new(Arc::new(m), config);
    let sessions = grpc.sessions().clone();
    let drain = async move {
        serving::server::drain_sessions(&sessions, Duration::from_secs(a.drain_timeout_s)).await;
    };
    serve_draining(
        grpc,
        listener,
        serving::server::terminated(),
        drain,
        listening,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_flag_has_its_own_environment_variable() {
        assert_eq!(
            serving::args::env_gaps(&Args::command()),
            Vec::<String>::new()
        );
    }
}
