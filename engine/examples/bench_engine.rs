//! Engine benchmark on a real GGUF model (default: the 1.5B Qwen target):
//! 1. one-token decode tokens/s, engine vs candle-transformers' quantized_qwen2, same run;
//! 2. cost of a k-token verify forward relative to a 1-token forward (k = 1, 2, 4, 8, 16);
//! 3. tensor-parallel decode, TP=1 vs TP=2.
//!
//!   cargo run --release -p engine --example bench_engine -- [MODEL.gguf] [--tokens N]

use candle_core::quantized::gguf_file::Content;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_qwen2;
use engine::tp::TpModel;
use engine::{KvState, LanguageModel, LoadOptions, OutputSpec, SeqInput, Visibility};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Milliseconds per decode step over `steps` greedy tokens after a 32-token prompt.
fn decode_ms<M: LanguageModel>(m: &M, steps: usize) -> f64 {
    let prompt: Vec<u32> = (0..32).map(|i| 1000 + i * 13).collect();
    let pos: Vec<u32> = (0..32).collect();
    let mut cache = m.new_cache();
    let mut t = m
        .forward(
            &mut cache,
            SeqInput::chain(&prompt, &pos, OutputSpec::last(32)),
        )
        .expect("prefill")
        .argmax[0];
    let mut times = Vec::new();
    for i in 0..steps {
        let start = Instant::now();
        t = m
            .forward(
                &mut cache,
                SeqInput::chain(&[t], &[32 + i as u32], OutputSpec::all()),
            )
            .expect("decode")
            .argmax[0];
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    median(times)
}

fn candle_decode_ms(path: &std::path::Path, steps: usize) -> f64 {
    let dev = Device::Cpu;
    let mut f = std::fs::File::open(path).expect("open");
    let ct = Content::read(&mut f).expect("gguf");
    let mut m = quantized_qwen2::ModelWeights::from_gguf(ct, &mut f, &dev).expect("load");
    let mut step = |ids: &[u32], pos: usize| -> u32 {
        let x = Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap();
        let logits = m.forward(&x, pos).unwrap();
        logits
            .squeeze(0)
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap()
    };
    let prompt: Vec<u32> = (0..32).map(|i| 1000 + i * 13).collect();
    let mut t = step(&prompt, 0);
    let mut times = Vec::new();
    for i in 0..steps {
        let start = Instant::now();
        t = step(&[t], 32 + i);
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    median(times)
}

/// Median ms of a k-token chain forward at offset 64 (the verify step), cache rolled back.
fn verify_ms<M: LanguageModel>(m: &M, k: usize, reps: usize) -> f64 {
    let prompt: Vec<u32> = (0..64).map(|i| 2000 + i * 7).collect();
    let pos: Vec<u32> = (0..64).collect();
    let mut cache = m.new_cache();
    m.forward(
        &mut cache,
        SeqInput::chain(&prompt, &pos, OutputSpec::last(64)),
    )
    .expect("prefill");
    let tokens: Vec<u32> = (0..k as u32).map(|i| 3000 + i).collect();
    let kpos: Vec<u32> = (64..64 + k as u32).collect();
    let vis = Visibility::Causal;
    let mut times = Vec::new();
    for _ in 0..reps {
        let start = Instant::now();
        m.forward(
            &mut cache,
            SeqInput {
                tokens: &tokens,
                positions: &kpos,
                visibility: &vis,
                outputs: OutputSpec::all(),
            },
        )
        .expect("verify");
        times.push(start.elapsed().as_secs_f64() * 1e3);
        cache.truncate(64).expect("truncate");
    }
    median(times)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut path = None;
    let mut steps = 32;
    while let Some(a) = args.next() {
        if a == "--tokens" {
            steps = args.next().and_then(|s| s.parse().ok()).unwrap_or(steps);
        } else {
            path = Some(std::path::PathBuf::from(a));
        }
    }
    let path = path.unwrap_or_else(|| {
        engine::testing::models_dir().join("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")
    });
    if !path.exists() {
        eprintln!(
            "{} not found: run scripts/fetch-models.sh first",
            path.display()
        );
        std::process::exit(2);
    }
    println!("model: {}", path.display());
    let dev = Device::Cpu;
    let opts = LoadOptions::default();
    let m = engine::load_model(&path, &opts, &dev).expect("load");

    println!("\n## one-token decode ({steps} steps after a 32-token prompt, median)");
    let ours = decode_ms(&m, steps);
    let theirs = candle_decode_ms(&path, steps);
    println!(
        "engine:               {ours:7.1} ms/token  {:6.1} tok/s",
        1e3 / ours
    );
    println!(
        "candle-transformers:  {theirs:7.1} ms/token  {:6.1} tok/s",
        1e3 / theirs
    );
    println!("ratio (engine speed / candle speed): {:.2}", theirs / ours);

    println!("\n## k-token verify forward at offset 64, relative to k=1 (median of 7)");
    let base = verify_ms(&m, 1, 7);
    for k in [1, 2, 4, 8, 16] {
        let t = if k == 1 { base } else { verify_ms(&m, k, 7) };
        println!("k={k:2}: {t:7.1} ms  {:.2}x", t / base);
    }

    println!("\n## tensor parallelism, one-token decode");
    drop(m);
    let tp2 = TpModel::load(&path, 2, &opts, &dev).expect("load tp=2");
    let t2 = decode_ms(&tp2, steps);
    println!("TP=1: {ours:7.1} ms/token  {:6.1} tok/s", 1e3 / ours);
    println!(
        "TP=2: {t2:7.1} ms/token  {:6.1} tok/s  ({:.2}x)",
        1e3 / t2,
        ours / t2
    );
}
