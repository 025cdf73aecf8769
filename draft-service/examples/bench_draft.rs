//! Draft service: draft tokens per draft-model forward with lookahead on and off, on code
//! prompts, over loopback gRPC. Every call's draft is taken as accepted, so each
//! configuration drafts the model's own greedy continuation (checked to be the same for
//! all), and the figures say how many forwards lookahead saves and what they cost.
//!
//! cargo run --release -p draft-service --example bench_draft -- [prompts] [limit] [tokens]
//! defaults: the fetched HumanEval prompts, 4 prompts, 96 tokens; the fetched 0.5B draft.

use candle_core::Device;
use draft_service::{DraftConfig, DraftGrpc, serve};
use engine::LoadOptions;
use proto::common::v1::Lookahead;
use proto::draft::v1 as pb;
use proto::draft::v1::draft_service_client::DraftServiceClient;
use std::sync::Arc;
use std::time::Instant;

const GAMMA: u32 = 8;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = engine::models::models_dir();
    let prompts_path = args
        .first()
        .map_or_else(|| dir.join("humaneval.prompts"), std::path::PathBuf::from);
    let limit: usize = args.get(1).map_or(Ok(4), |s| s.parse())?;
    let tokens: usize = args.get(2).map_or(Ok(96), |s| s.parse())?;
    let model_path = dir.join("qwen2.5-coder-0.5b-instruct.gguf");
    let gguf = engine::gguf::GgufFile::open(&model_path, &Device::Cpu)?;
    let tokenizer = engine::tokenizer::from_gguf(&gguf)?;
    let prompts: Vec<Vec<u32>> = std::fs::read_to_string(&prompts_path)?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(limit)
        .map(|l| -> anyhow::Result<Vec<u32>> {
            let text: String = serde_json::from_str(l)?;
            Ok(engine::tokenizer::encode(&tokenizer, &text)?)
        })
        .collect::<Result<_, _>>()?;
    eprintln!("loading {}", model_path.display());
    let model = Arc::new(engine::load_model(
        &model_path,
        &LoadOptions::default(),
        &Device::Cpu,
    )?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(serve(
        DraftGrpc::new(model, DraftConfig::default()),
        listener,
        std::future::pending(),
    ));
    let mut client = DraftServiceClient::connect(format!("http://{addr}")).await?;
    let la = |window, level, guess| {
        Some(Lookahead {
            level,
            window,
            guess,
        })
    };
    let configs: Vec<(&str, Option<Lookahead>)> = vec![
        ("off (one token per forward)", None),
        ("W 1, N 3, G 1", la(1, 3, 1)),
        ("W 2, N 4, G 2", la(2, 4, 2)),
        ("W 4, N 4, G 4", la(4, 4, 4)),
        ("W 8, N 5, G 8", la(8, 5, 8)),
    ];
    // (tokens, forwards, seconds) per configuration, summed over prompts.
    let mut totals = vec![(0usize, 0u64, 0f64); configs.len()];
    for (p, prompt) in prompts.iter().enumerate() {
        let mut reference: Option<Vec<u32>> = None;
        for ((name, lookahead), total) in configs.iter().zip(&mut totals) {
            let id = client
                .open_session(pb::OpenSessionRequest {
                    tokens: prompt.clone(),
                })
                .await?
                .into_inner()
                .session_id;
            let (mut out, mut forwards, mut new_committed) = (Vec::new(), 0u64, Vec::new());
            let mut timed_tokens = 0usize;
            // The first call prefills the prompt: not drafting work, so not timed.
            let mut started = None;
            while out.len() < tokens {
                let r = client
                    .draft(pb::DraftRequest {
                        session_id: id,
                        new_committed: std::mem::take(&mut new_committed),
                        gamma: GAMMA,
                        lookahead: *lookahead,
                        pool_delta: Vec::new(),
                        eos: Vec::new(),
                        stop_below: 0.0,
                        start: None,
                    })
                    .await?
                    .into_inner();
                if started.is_none() {
                    started = Some(Instant::now());
                    out.extend(&r.tokens);
                    new_committed = r.tokens;
                    continue;
                }
                forwards += r.forwards as u64;
                timed_tokens += r.tokens.len();
                out.extend(&r.tokens);
                new_committed = r.tokens;
            }
            let seconds = started.map_or(0.0, |s| s.elapsed().as_secs_f64());
            client
                .close_session(pb::CloseSessionRequest { session_id: id })
                .await?;
            out.truncate(tokens);
            match &reference {
                None => reference = Some(out.clone()),
                Some(r) if *r != out => eprintln!("prompt {}: {name} drafted other tokens", p + 1),
                _ => {}
            }
            total.0 += timed_tokens;
            total.1 += forwards;
            total.2 += seconds;
            eprintln!(
                "prompt {}/{} {name}: {forwards} forwards, {seconds:.2} s",
                p + 1,
                prompts.len()
            );
        }
    }
    println!("| lookahead | draft tokens | forwards | tokens per forward | draft tok/s | vs off |");
    println!("|---|---|---|---|---|---|");
    let base = totals[0].0 as f64 / totals[0].2.max(1e-9);
    for ((name, _), (t, f, s)) in configs.iter().zip(&totals) {
        let rate = *t as f64 / s.max(1e-9);
        println!(
            "| {name} | {t} | {f} | {:.2} | {rate:.2} | {:.2}x |",
            *t as f64 / (*f).max(1) as f64,
            rate / base
        );
    }
    Ok(())
}
