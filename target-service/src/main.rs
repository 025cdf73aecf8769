//! `target-service`: serves the target model over gRPC.

use anyhow::{Context, Result};
use clap::Parser;
use engine::LoadOptions;
use engine::tp::TpModel;
use serving::args::TargetLimitsArgs;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use target_service::{TargetConfig, TargetGrpc, serve_draining};

#[derive(Parser)]
#[command(
    name = "target-service",
    version,
    about = "Ouroboros target model service"
)]
struct Args {
    /// Target model: a GGUF file or a Hugging Face folder.
    #[arg(long, env = "OURO_TARGET_MODEL")]
    model: PathBuf,
    /// Tensor-parallel ranks (threads on this host).
    #[arg(long, env = "OURO_TARGET_TP", default_value_t = 1)]
    tp: usize,
    /// Where the model runs: cpu, cuda or cuda:N (rank r of --tp on GPU N + r; needs a
    /// binary built with --features cuda).
    #[arg(long, env = "OURO_TARGET_DEVICE", default_value = "cpu")]
    device: String,
    #[arg(long, env = "OURO_TARGET_LISTEN", default_value = "0.0.0.0:50052")]
    listen: String,
    #[command(flatten)]
    limits: TargetLimitsArgs,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 0.0.0.0:9090).
    #[arg(long, env = "OURO_TARGET_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// On SIGTERM, refuse new sessions and wait up to this long for open ones to end.
    #[arg(long, env = "OURO_TARGET_DRAIN_TIMEOUT_S", default_value_t = 60)]
    drain_timeout_s: u64,
    #[command(flatten)]
    tls: serving::tls::TlsArgs,
    /// Dequantize GGUF weights to dense f16 at load (the unquantized deployment).
    #[arg(long, env = "OURO_TARGET_F16")]
    f16: bool,
}

fn main() -> Result<()> {
    serving::server::service_main("ouroboros-target", Args::parse, run_service)
}

async fn run_service(a: Args) -> Result<()> {
    let config = TargetConfig {
        tp_size: a.tp,
        // A missing model is reported by the load below.
        chat_template: match a.model.exists() {
            true => engine::chat_template::of_model(&a.model)
                .with_context(|| format!("reading the chat template of {}", a.model.display()))?,
            false => None,
        },
        vocabulary: match a.model.exists() {
            true => engine::vocab::Vocabulary::of_model(&a.model)
                .with_context(|| format!("reading the vocabulary of {}", a.model.display()))?
                .map(Arc::new),
            false => None,
        },
        ..a.limits.config()
    };
    if let Some(addr) = &a.metrics_listen {
        telemetry::start_metrics(addr).await?;
    }
    let listening = a.tls.listening()?;
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("binding {}", a.listen))?;
    tracing::info!(model = %a.model.display(), tp = a.tp, device = %a.device, "loading target model");
    let drain_limit = Duration::from_secs(a.drain_timeout_s);
    let opts = LoadOptions {
        dequantize_f16: a.f16,
        ..LoadOptions::default()
    };
    let devices = engine::device::devices(&a.device, a.tp)?;
    if a.tp > 1 {
        let m = TpModel::load_on(&a.model, &opts, &devices)
            .with_context(|| format!("loading {}", a.model.display()))?;
        let grpc = TargetGrpc::new(Arc::new(m), config);
        run(grpc, listener, listening, &a.listen, drain_limit).await
    } else {
        let m = engine::load_model(&a.model, &opts, &devices[0])
            .with_context(|| format!("loading {}", a.model.display()))?;
        let grpc = TargetGrpc::new(Arc::new(m), config);
        run(grpc, listener, listening, &a.listen, drain_limit).await
    }
}

/// Serves until SIGTERM, then drains the open sessions before stopping.
async fn run<M: engine::LanguageModel + 'static>(
    grpc: TargetGrpc<M>,
    listener: tokio::net::TcpListener,
    listening: serving::server::Listening,
    listen: &str,
    drain_limit: Duration,
) -> Result<()> {
    tracing::info!(
        listen,
        tls = listening.tls.is_some(),
        "target service ready"
    );
    let sessions = grpc.sessions().clone();
    let drain = async move {
        serving::server::drain_sessions(&sessions, drain_limit).await;
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
