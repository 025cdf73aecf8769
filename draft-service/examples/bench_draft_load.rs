//! Draft throughput of the draft runtime (what the draft service serves, batched by its
//! scheduler) with N sessions drafting at once. Each session opens on its own prompt and
//! catches up on it in an untimed first call; then every session runs `calls` draft calls
//! of `gamma` tokens back to back, committing what it drafted, and the level's aggregate
//! is all drafted tokens over the wall time. Prints a table, each level against one.
//!
//! cargo run --release -p draft-service --example bench_draft_load -- [model.gguf] [levels] [calls] [gamma]
//! defaults: the fetched 0.5B draft, levels "1,2,4,8", 6 calls, gamma 8.

use decoding::{DraftBackend, DraftLength, DraftRequest};
use engine::LoadOptions;
use serving::{DraftConfig, DraftRuntime};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Barrier;

fn request(new_committed: Vec<u32>, gamma: usize) -> DraftRequest {
    DraftRequest {
        new_committed,
        start: None,
        length: DraftLength::AtLeast(gamma),
        lookahead: None,
        pool_delta: Vec::new(),
        eos: Vec::new(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args
        .first()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| engine::models::models_dir().join("qwen2.5-coder-0.5b-instruct.gguf"));
    let levels: Vec<usize> = args
        .get(1)
        .map_or("1,2,4,8", String::as_str)
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let calls: usize = args.get(2).map_or(Ok(6), |s| s.parse())?;
    let gamma: usize = args.get(3).map_or(Ok(8), |s| s.parse())?;
    eprintln!("loading {}", path.display());
    let device = engine::device::devices("cpu", 1)?.remove(0);
    let model = Arc::new(engine::load_model(&path, &LoadOptions::default(), &device)?);
    println!("| sessions | draft calls | tokens | wall s | aggregate draft tok/s | vs one |");
    println!("|---|---|---|---|---|---|");
    let mut first = None;
    // The first level runs twice; its first run only warms up.
    for (run, &n) in levels.first().into_iter().chain(&levels).enumerate() {
        let rt = Arc::new(DraftRuntime::new(model.clone(), DraftConfig::default()));
        let barrier = Arc::new(Barrier::new(n + 1));
        let mut tasks = Vec::new();
        for s in 0..n {
            let (rt, barrier) = (rt.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                let prompt: Vec<u32> = (0..64)
                    .map(|i| 200 + ((i + 11 * s as u32) * 37) % 5000)
                    .collect();
                let id = rt.open(&prompt).await?;
                let (mut o, _) = rt.draft(id, request(Vec::new(), gamma)).await?;
                barrier.wait().await;
                let mut tokens = 0;
                for _ in 0..calls {
                    let drafted = std::mem::take(&mut o.tokens);
                    (o, _) = rt.draft(id, request(drafted, gamma)).await?;
                    tokens += o.tokens.len();
                }
                rt.close(id).await?;
                Ok::<_, decoding::DecodingError>(tokens)
            }));
        }
        barrier.wait().await;
        let t0 = Instant::now();
        let mut tokens = 0;
        for t in tasks {
            tokens += t.await??;
        }
        let wall = t0.elapsed().as_secs_f64();
        if run == 0 {
            continue;
        }
        let rate = tokens as f64 / wall;
        let one = *first.get_or_insert(rate);
        println!(
            "| {n} | {} | {tokens} | {wall:.2} | {rate:.1} | {:.2}x |",
            n * calls,
            rate / one
        );
    }
    Ok(())
}
