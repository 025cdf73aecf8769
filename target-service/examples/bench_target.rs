//! Target service throughput over loopback gRPC: N sessions verify trees concurrently and
//! the scheduler batches them. Prints aggregate verified tree nodes per second for each N,
//! its ratio to one session, and the gRPC overhead per round (client-observed time minus
//! the server's own total), median and p99.
//!
//! cargo run --release -p target-service --example bench_target -- [model.gguf] [sessions] [rounds] [nodes]
//! defaults: the fetched 1.5B target, "1,4,8", 6 rounds, 8-node chains.

use candle_core::Device;
use engine::LoadOptions;
use proto::target::v1 as pb;
use proto::target::v1::target_service_client::TargetServiceClient;
use std::sync::Arc;
use std::time::Instant;
use target_service::{TargetConfig, TargetGrpc, serve};

fn percentile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * q).round() as usize]
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
    let counts: Vec<usize> = args
        .get(1)
        .map_or("1,4,8", String::as_str)
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let rounds: usize = args.get(2).map_or(Ok(6), |s| s.parse())?;
    let nodes: usize = args.get(3).map_or(Ok(8), |s| s.parse())?;
    eprintln!("loading {}", path.display());
    let model = Arc::new(engine::load_model(
        &path,
        &LoadOptions::default(),
        &Device::Cpu,
    )?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(serve(
        TargetGrpc::new(model, TargetConfig::default()),
        listener,
        std::future::pending(),
    ));
    let client = TargetServiceClient::connect(format!("http://{addr}")).await?;
    println!(
        "| sessions | rounds | wall s | verified nodes/s | vs 1 session | overhead median µs | overhead p99 µs |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut base = None;
    // The first count runs twice; its first run only warms up.
    let runs = counts.first().into_iter().chain(&counts).enumerate();
    for (run, &n) in runs {
        let mut tasks = Vec::new();
        // Clocks start once every session is open: prefill is not verify throughput.
        let opened = Arc::new(tokio::sync::Barrier::new(n + 1));
        for s in 0..n {
            let mut c = client.clone();
            let opened = opened.clone();
            tasks.push(tokio::spawn(async move {
                let prompt: Vec<u32> = (0..32)
                    .map(|i| 100 + ((i * 37 + s * 11) % 5000) as u32)
                    .collect();
                let id = c
                    .open_session(pb::OpenSessionRequest {
                        tokens: prompt.clone(),
                    })
                    .await?
                    .into_inner()
                    .session_id;
                opened.wait().await;
                let mut last = *prompt.last().unwrap_or(&0);
                let mut overhead = Vec::new();
                for r in 0..rounds {
                    let mut tokens = vec![last];
                    tokens.extend((1..nodes).map(|i| 200 + ((i * 13 + r * 7 + s) % 4000) as u32));
                    let parents: Vec<i32> = (-1..nodes as i32 - 1).collect();
                    let t0 = Instant::now();
                    let resp = c
                        .verify(pb::VerifyRequest {
                            session_id: id,
                            tokens,
                            parents,
                            sampling: None,
                            logprobs: None,
                        })
                        .await?
                        .into_inner();
                    let client_s = t0.elapsed().as_secs_f64();
                    let server_s = resp.timing.map_or(0.0, |t| t.total_s);
                    overhead.push((client_s - server_s) * 1e6);
                    last = resp.bonus;
                }
                c.close_session(pb::CloseSessionRequest { session_id: id })
                    .await?;
                anyhow::Ok(overhead)
            }));
        }
        opened.wait().await;
        let started = Instant::now();
        let mut overhead = Vec::new();
        for t in tasks {
            overhead.extend(t.await??);
        }
        let wall = started.elapsed().as_secs_f64();
        if run == 0 {
            continue;
        }
        let rate = (n * rounds * nodes) as f64 / wall;
        let ratio = rate / *base.get_or_insert(rate);
        println!(
            "| {n} | {rounds} | {wall:.2} | {rate:.1} | {ratio:.2}x | {:.0} | {:.0} |",
            percentile(&mut overhead, 0.5),
            percentile(&mut overhead, 0.99)
        );
    }
    Ok(())
}
