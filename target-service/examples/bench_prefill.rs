//! What a new session's long prompt costs the sessions already decoding: one session
//! verifies small trees back to back over loopback gRPC while a second opens with a long
//! prompt. For each prefill chunk size, prints the open's latency and the decoding
//! session's round latency (median and worst) while that prefill ran.
//!
//! cargo run --release -p target-service --example bench_prefill -- [model.gguf] [prompt tokens] [chunks]
//! defaults: the fetched 1.5B target, 512 tokens, chunks "32,128,100000" (the last: the
//! whole prompt in one forward, as before chunking).

use candle_core::Device;
use engine::LoadOptions;
use proto::target::v1 as pb;
use proto::target::v1::target_service_client::TargetServiceClient;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use target_service::{TargetConfig, TargetGrpc, serve};
use tonic::transport::Channel;

type Client = TargetServiceClient<Channel>;

async fn open(c: &mut Client, tokens: Vec<u32>) -> anyhow::Result<u64> {
    Ok(c.open_session(pb::OpenSessionRequest { tokens })
        .await?
        .into_inner()
        .session_id)
}

/// Rounds of 4-node chains until `stop`; each round's latency and whether it overlapped
/// the prefill (`during` was set when it started or ended).
async fn decode(
    mut c: Client,
    id: u64,
    mut last: u32,
    during: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Vec<f64>> {
    let mut overlapped = Vec::new();
    let mut r = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let mut tokens = vec![last];
        tokens.extend((1..4).map(|i| 300 + (i * 17 + r * 5) % 3000));
        let before = during.load(Ordering::Relaxed);
        let t0 = Instant::now();
        let resp = c
            .verify(pb::VerifyRequest {
                session_id: id,
                tokens,
                parents: vec![-1, 0, 1, 2],
                sampling: None,
                logprobs: None,
            })
            .await?
            .into_inner();
        if before || during.load(Ordering::Relaxed) {
            overlapped.push(t0.elapsed().as_secs_f64());
        }
        last = resp.bonus;
        r += 1;
    }
    c.close_session(pb::CloseSessionRequest { session_id: id })
        .await?;
    Ok(overlapped)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args
        .first()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            engine::models::models_dir().join("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")
        });
    let prompt_len: u32 = args.get(1).map_or(Ok(512), |s| s.parse())?;
    let chunks: Vec<usize> = args
        .get(2)
        .map_or("32,128,100000", String::as_str)
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    eprintln!("loading {}", path.display());
    let model = Arc::new(engine::load_model(
        &path,
        &LoadOptions::default(),
        &Device::Cpu,
    )?);
    println!(
        "| prefill chunk | open s | decode rounds during it | round median ms | round worst ms |"
    );
    println!("|---|---|---|---|---|");
    // The first chunk size runs twice; its first run only warms up.
    for (run, &chunk) in chunks.first().into_iter().chain(&chunks).enumerate() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let config = TargetConfig {
            prefill_chunk: chunk,
            max_batch_tokens: 1 << 20,
            ..TargetConfig::default()
        };
        let server = tokio::spawn(serve(
            TargetGrpc::new(model.clone(), config),
            listener,
            std::future::pending(),
        ));
        let mut c = TargetServiceClient::connect(format!("http://{addr}")).await?;
        let first: Vec<u32> = (0..16).map(|i| 100 + i * 29).collect();
        let id = open(&mut c, first.clone()).await?;
        let during = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let decoder = tokio::spawn(decode(
            c.clone(),
            id,
            first[first.len() - 1],
            during.clone(),
            stop.clone(),
        ));
        // Let the decoder settle into its rounds, then open the long prompt.
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let long: Vec<u32> = (0..prompt_len).map(|i| 200 + (i * 37) % 5000).collect();
        during.store(true, Ordering::Relaxed);
        let t0 = Instant::now();
        let other = open(&mut c, long).await?;
        let open_s = t0.elapsed().as_secs_f64();
        during.store(false, Ordering::Relaxed);
        stop.store(true, Ordering::Relaxed);
        let mut rounds = decoder.await??;
        c.close_session(pb::CloseSessionRequest { session_id: other })
            .await?;
        server.abort();
        if run == 0 {
            continue;
        }
        rounds.sort_by(f64::total_cmp);
        let median = rounds.get(rounds.len() / 2).copied().unwrap_or(f64::NAN);
        let worst = rounds.last().copied().unwrap_or(f64::NAN);
        println!(
            "| {chunk} | {open_s:.2} | {} | {:.0} | {:.0} |",
            rounds.len(),
            median * 1e3,
            worst * 1e3
        );
    }
    Ok(())
}
