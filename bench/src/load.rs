//! `ouro-load`: concurrent `GenerateStream` requests against a running server (the
//! embedded `ouro serve` or a deployment's orchestrator). The same prompts run at each
//! concurrency level, one level after another; a level's aggregate throughput is every
//! token streamed over the level's wall time, and each level is set against the first.

use anyhow::{Context, Result, bail};
use clap::Args;
use orchestrator::cli::StrategyArg;
use proto::v1 as pb;
use proto::v1::ouroboros_client::OuroborosClient;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

#[derive(Args)]
pub struct LoadArgs {
    /// The server's public API.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub endpoint: String,
    /// Prompt file: one JSON string per line. Default: the built-in code prompts.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Requests per level (prompts taken in order, repeated if the file has fewer).
    #[arg(long, default_value_t = 8)]
    pub requests: usize,
    /// Concurrency levels, run in this order: at level C, C streams are open at once
    /// until the level's requests are done.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 8])]
    pub concurrency: Vec<usize>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: u32,
    #[arg(long, value_enum, default_value_t = StrategyArg::Auto)]
    pub strategy: StrategyArg,
    /// Send each prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Deadline of one request, in seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
    /// Write load.md and load.json here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// One request's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub tokens: usize,
    pub ttft_s: f64,
    pub total_s: f64,
}

/// One concurrency level's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Level {
    pub concurrency: usize,
    pub requests: usize,
    pub tokens: usize,
    pub wall_s: f64,
    /// Tokens of all requests over the level's wall time.
    pub aggregate_tok_s: f64,
    /// This level's aggregate over the first level's.
    pub vs_first: f64,
    pub mean_ttft_s: f64,
    /// A request's own tokens over its own time, averaged.
    pub mean_request_tok_s: f64,
}

pub fn run(a: LoadArgs) -> Result<()> {
    if a.requests == 0 || a.concurrency.is_empty() || a.concurrency.contains(&0) {
        bail!("--requests and every --concurrency level must be at least 1");
    }
    let prompts = match &a.prompts {
        Some(p) => crate::prompts::read(p)?,
        None => crate::strategies::BUILTIN_PROMPTS
            .iter()
            .map(|s| s.to_string())
            .collect(),
    };
    if prompts.is_empty() {
        bail!("no prompts");
    }
    let prompts: Vec<String> = prompts.iter().cycle().take(a.requests).cloned().collect();
    let rt = tokio::runtime::Runtime::new()?;
    let levels = rt.block_on(run_levels(&a, &prompts))?;
    let table = table(&levels);
    print!("{table}");
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir)?;
        let cmd: Vec<String> = std::env::args().collect();
        let md = format!(
            "# Concurrent load\n\n`{}`\n\nMachine: {}\n\n{table}",
            cmd.join(" "),
            crate::report::machine()
        );
        std::fs::write(dir.join("load.md"), md)?;
        std::fs::write(
            dir.join("load.json"),
            serde_json::to_string_pretty(&levels)?,
        )?;
    }
    Ok(())
}

async fn run_levels(a: &LoadArgs, prompts: &[String]) -> Result<Vec<Level>> {
    let channel = Endpoint::from_shared(a.endpoint.clone())?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(a.timeout_s))
        .connect()
        .await
        .with_context(|| format!("connecting to {}", a.endpoint))?;
    let client = OuroborosClient::new(channel);
    // One short request first, so no level pays for the server's first-call set-up.
    one(client.clone(), request(a, &prompts[0], 4)).await?;
    let reqs: Arc<Vec<pb::GenerateRequest>> = Arc::new(
        prompts
            .iter()
            .map(|p| request(a, p, a.max_new_tokens))
            .collect(),
    );
    let mut levels: Vec<Level> = Vec::new();
    for &c in &a.concurrency {
        eprintln!("concurrency {c}: {} requests ...", prompts.len());
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let workers: Vec<_> = (0..c.min(prompts.len()))
            .map(|_| {
                let (client, next, reqs) = (client.clone(), next.clone(), reqs.clone());
                tokio::spawn(async move {
                    let mut samples = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(r) = reqs.get(i) else {
                            return Ok::<_, anyhow::Error>(samples);
                        };
                        samples.push(one(client.clone(), r.clone()).await?);
                    }
                })
            })
            .collect();
        let mut samples = Vec::new();
        for w in workers {
            samples.extend(w.await??);
        }
        let wall_s = started.elapsed().as_secs_f64();
        let tokens: usize = samples.iter().map(|s| s.tokens).sum();
        let n = samples.len() as f64;
        let aggregate = tokens as f64 / wall_s;
        let first = levels.first().map_or(aggregate, |l| l.aggregate_tok_s);
        levels.push(Level {
            concurrency: c,
            requests: samples.len(),
            tokens,
            wall_s,
            aggregate_tok_s: aggregate,
            vs_first: aggregate / first,
            mean_ttft_s: samples.iter().map(|s| s.ttft_s).sum::<f64>() / n,
            mean_request_tok_s: samples
                .iter()
                .map(|s| s.tokens as f64 / s.total_s)
                .sum::<f64>()
                / n,
        });
    }
    Ok(levels)
}

fn request(a: &LoadArgs, prompt: &str, max_new_tokens: u32) -> pb::GenerateRequest {
    let input = if a.chat {
        pb::generate_request::Input::Chat(pb::ChatMessages {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: prompt.into(),
            }],
        })
    } else {
        pb::generate_request::Input::Prompt(prompt.into())
    };
    pb::GenerateRequest {
        input: Some(input),
        max_new_tokens: Some(max_new_tokens),
        strategy: pb::Strategy::from(a.strategy) as i32,
        ..Default::default()
    }
}

/// Streams one request to its end.
async fn one(mut client: OuroborosClient<Channel>, r: pb::GenerateRequest) -> Result<Sample> {
    let started = Instant::now();
    let mut stream = client.generate_stream(r).await?.into_inner();
    let (mut tokens, mut ttft) = (0, None);
    while let Some(m) = stream.message().await? {
        if !m.token_ids.is_empty() && ttft.is_none() {
            ttft = Some(started.elapsed().as_secs_f64());
        }
        tokens += m.token_ids.len();
    }
    let total_s = started.elapsed().as_secs_f64();
    Ok(Sample {
        tokens,
        ttft_s: ttft.unwrap_or(total_s),
        total_s,
    })
}

pub fn table(levels: &[Level]) -> String {
    let mut t = String::from(
        "| concurrency | requests | tokens | wall s | aggregate tok/s | vs first | mean TTFT s | mean tok/s per request |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for l in levels {
        t.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.2} | {:.2}x | {:.2} | {:.2} |\n",
            l.concurrency,
            l.requests,
            l.tokens,
            l.wall_s,
            l.aggregate_tok_s,
            l.vs_first,
            l.mean_ttft_s,
            l.mean_request_tok_s
        ));
    }
    t
}
