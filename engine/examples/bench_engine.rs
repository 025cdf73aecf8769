//! Engine benchmark on a real GGUF model (default: the 1.5B Qwen target):
//! 1. one-token decode tokens/s, engine vs candle-transformers' quantized_qwen2, same run;
//! 2. cost of a k-token verify forward relative to a 1-token forward (k = 1, 2, 4, 8, 16,
//!    and 64: eight sessions' 8-node trees in one batch);
//! 3. tensor-parallel decode, TP=1 vs TP=2.
//!
//!   cargo run --release -p engine --example bench_engine -- [MODEL.gguf] [--tokens N]
//!       [--context N] [--f16 | --requantize q4k] [--head-vocab N]
//!
//! `--f16` holds the weights as dense f16 (the unquantized deployment), `--requantize`
//! re-encodes them in other blocks at load; both run 1 and 2 only, on the engine alone.
//! `--context` sets the prompt before the decode steps (32 tokens unless given).
//! `--head-vocab` narrows the output head (then 1 runs on the engine alone).
//! `--kernels` instead compares our Q4_K/Q6_K kernels with candle's on the same file
//! (one-token decode and k-token forwards, interleaved).

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

/// Prompt length before the timed decode steps (`--context`; 32 unless given).
static PROMPT_LEN: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

fn prompt_len() -> u32 {
    *PROMPT_LEN.get_or_init(|| 32)
}

fn prompt() -> Vec<u32> {
    (0..prompt_len()).map(|i| 1000 + i * 13).collect()
}

/// The prompt prefilled whole into `cache`: the greedy token after it.
fn prefill<M: LanguageModel>(m: &M, cache: &mut M::Cache) -> u32 {
    let prompt = prompt();
    let pos: Vec<u32> = (0..prompt_len()).collect();
    m.forward(
        cache,
        SeqInput::chain(&prompt, &pos, OutputSpec::last(prompt.len())),
    )
    .expect("prefill")
    .argmax[0]
}

/// Milliseconds of a whole prefill of the prompt into an empty cache (median of 3).
fn prefill_ms<M: LanguageModel>(m: &M) -> f64 {
    median(
        (0..3)
            .map(|_| {
                let mut cache = m.new_cache();
                let start = Instant::now();
                prefill(m, &mut cache);
                start.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    )
}

/// A greedy decoder on the engine after the prompt: each call runs one step and returns
/// its milliseconds.
fn engine_stepper<M: LanguageModel>(m: &M) -> impl FnMut() -> f64 + '_ {
    let mut cache = m.new_cache();
    let mut t = prefill(m, &mut cache);
    let mut at = prompt_len();
    move || {
        let start = Instant::now();
        t = m
            .forward(&mut cache, SeqInput::chain(&[t], &[at], OutputSpec::all()))
            .expect("decode")
            .argmax[0];
        at += 1;
        start.elapsed().as_secs_f64() * 1e3
    }
}

/// The same with candle-transformers' quantized_qwen2 on the same file.
fn candle_stepper(path: &std::path::Path) -> impl FnMut() -> f64 {
    let dev = Device::Cpu;
    let mut f = std::fs::File::open(path).expect("open");
    let ct = Content::read(&mut f).expect("gguf");
    let mut m = quantized_qwen2::ModelWeights::from_gguf(ct, &mut f, &dev).expect("load");
    let mut step = move |ids: &[u32], pos: usize| -> u32 {
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
    let mut t = step(&prompt(), 0);
    let mut at = prompt_len() as usize;
    move || {
        let start = Instant::now();
        t = step(&[t], at);
        at += 1;
        start.elapsed().as_secs_f64() * 1e3
    }
}

/// Median ms per step of several decoders run step by step in turn, so that machine
/// drift (this is a shared 2-core VM) hits all of them alike.
fn interleaved_ms(steppers: &mut [&mut dyn FnMut() -> f64], steps: usize) -> Vec<f64> {
    let mut times = vec![Vec::with_capacity(steps); steppers.len()];
    for _ in 0..steps {
        for (s, t) in steppers.iter_mut().zip(times.iter_mut()) {
            t.push(s());
        }
    }
    times.into_iter().map(median).collect()
}

/// Median ms of k-token chain forwards at offset 64 (the verify step, cache rolled back
/// after each), for every k, interleaved rep by rep so drift hits every k alike.
fn verify_ms<M: LanguageModel>(m: &M, ks: &[usize], reps: usize) -> Vec<f64> {
    let prompt: Vec<u32> = (0..64).map(|i| 2000 + i * 7).collect();
    let pos: Vec<u32> = (0..64).collect();
    let mut cache = m.new_cache();
    m.forward(
        &mut cache,
        SeqInput::chain(&prompt, &pos, OutputSpec::last(64)),
    )
    .expect("prefill");
    let vis = Visibility::Causal;
    let mut times = vec![Vec::new(); ks.len()];
    for _ in 0..reps {
        for (&k, t) in ks.iter().zip(times.iter_mut()) {
            let tokens: Vec<u32> = (0..k as u32).map(|i| 3000 + i).collect();
            let kpos: Vec<u32> = (64..64 + k as u32).collect();
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
            t.push(start.elapsed().as_secs_f64() * 1e3);
            cache.truncate(64).expect("truncate");
        }
    }
    times.into_iter().map(median).collect()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut path = None;
    let mut steps = 32;
    let mut f16 = false;
    let mut requantize = None;
    let mut head_vocab = None;
    let mut kernels = false;
    while let Some(a) = args.next() {
        if a == "--kernels" {
            kernels = true;
        } else if a == "--head-vocab" {
            head_vocab = args.next().and_then(|s| s.parse().ok());
        } else if a == "--f16" {
            f16 = true;
        } else if a == "--requantize" {
            let name = args.next().unwrap_or_default();
            requantize = Some(engine::block_type(&name).unwrap_or_else(|e| {
                eprintln!("{e}");
                std::process::exit(2)
            }));
        } else if a == "--context" {
            let n = args.next().and_then(|s| s.parse().ok()).unwrap_or(32u32);
            PROMPT_LEN.get_or_init(|| n.max(1));
        } else if a == "--tokens" {
            steps = args.next().and_then(|s| s.parse().ok()).unwrap_or(steps);
        } else {
            path = Some(std::path::PathBuf::from(a));
        }
    }
    let path = path.unwrap_or_else(|| {
        engine::models::models_dir().join("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")
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
    let opts = LoadOptions {
        dequantize_f16: f16,
        requantize,
        head_vocab,
        ..LoadOptions::default()
    };
    if kernels {
        kernels_against_candle(&path, &opts, steps);
        return;
    }
    let loading = Instant::now();
    let m = engine::load_model(&path, &opts, &dev).expect("load");
    println!("loaded in {:.1} s", loading.elapsed().as_secs_f64());
    if let Some(n) = head_vocab {
        println!("output head: the first {n} vocabulary entries");
    }
    if f16 || requantize.is_some() || head_vocab.is_some() {
        match (requantize, f16) {
            (Some(dtype), _) => println!("weights: requantized to {dtype:?}"),
            (None, true) => println!("weights: dense f16"),
            (None, false) => println!("weights: as in the file"),
        }
        let mut a = engine_stepper(&m);
        let ours = interleaved_ms(&mut [&mut a], steps)[0];
        println!(
            "\n## one-token decode ({steps} steps after a {}-token prompt, median)",
            prompt_len()
        );
        println!("engine: {ours:7.1} ms/token  {:6.1} tok/s", 1e3 / ours);
        let prefill = prefill_ms(&m);
        println!(
            "prefill of the {}-token prompt: {prefill:.0} ms ({:.0} tok/s, median of 3)",
            prompt_len(),
            f64::from(prompt_len()) * 1e3 / prefill
        );
    } else {
        decode_against_candle(&m, &path, steps);
        if std::env::var_os("OURO_BENCH_DECODE_ONLY").is_some() {
            return;
        }
    }

    println!(
        "\n## k-token verify forward at offset 64, relative to k=1 (median of 9, interleaved)"
    );
    let ks = [1, 2, 4, 8, 16, 64];
    let t = verify_ms(&m, &ks, 9);
    for (k, ms) in ks.iter().zip(&t) {
        println!("k={k:2}: {ms:7.1} ms  {:.2}x", ms / t[0]);
    }
    // Neither runs tensor-parallel (the requantized load refuses shards).
    if f16 || requantize.is_some() {
        return;
    }

    println!("\n## tensor parallelism, one-token decode (interleaved)");
    let tp2 = TpModel::load(&path, 2, &opts, &dev).expect("load tp=2");
    let (t1, t2) = {
        let mut a = engine_stepper(&m);
        let mut b = engine_stepper(&tp2);
        let r = interleaved_ms(&mut [&mut a, &mut b], steps);
        (r[0], r[1])
    };
    println!("TP=1: {t1:7.1} ms/token  {:6.1} tok/s", 1e3 / t1);
    println!(
        "TP=2: {t2:7.1} ms/token  {:6.1} tok/s  ({:.2}x)",
        1e3 / t2,
        t1 / t2
    );
}

/// One-token decode, the engine against candle-transformers' quantized_qwen2.
fn decode_against_candle<M: LanguageModel>(m: &M, path: &std::path::Path, steps: usize) {
    println!(
        "\n## one-token decode ({steps} steps after a {}-token prompt, interleaved step by step, median)",
        prompt_len()
    );
    let (ours, theirs) = {
        let mut a = engine_stepper(m);
        let mut b = candle_stepper(path);
        let r = interleaved_ms(&mut [&mut a, &mut b], steps);
        (r[0], r[1])
    };
    println!(
        "engine:               {ours:7.1} ms/token  {:6.1} tok/s",
        1e3 / ours
    );
    println!(
        "candle-transformers:  {theirs:7.1} ms/token  {:6.1} tok/s",
        1e3 / theirs
    );
    println!("ratio (engine speed / candle speed): {:.2}", theirs / ours);
}

/// Our K-quant kernels against candle's on one file: two loads of the same weights, every
/// measurement interleaved between them.
fn kernels_against_candle(path: &std::path::Path, opts: &LoadOptions, steps: usize) {
    let dev = Device::Cpu;
    let ours = engine::load_model(path, opts, &dev).expect("load");
    let candle_opts = LoadOptions {
        candle_kquants: true,
        ..opts.clone()
    };
    let theirs = engine::load_model(path, &candle_opts, &dev).expect("load");
    println!("\n## one-token decode ({steps} steps, interleaved step by step, median)");
    let (a_ms, b_ms) = {
        let mut a = engine_stepper(&ours);
        let mut b = engine_stepper(&theirs);
        let r = interleaved_ms(&mut [&mut a, &mut b], steps);
        (r[0], r[1])
    };
    println!("our kernels:    {a_ms:7.1} ms/token");
    println!(
        "candle kernels: {b_ms:7.1} ms/token  ({:.2}x ours)",
        b_ms / a_ms
    );
    println!("\n## k-token forward at offset 64 (median of 9)");
    let ks = [1, 2, 4, 5, 8, 16];
    let reps = 9;
    let (mut ta, mut tb) = (vec![Vec::new(); ks.len()], vec![Vec::new(); ks.len()]);
    for _ in 0..reps {
        let a = verify_ms(&ours, &ks, 1);
        let b = verify_ms(&theirs, &ks, 1);
        for i in 0..ks.len() {
            ta[i].push(a[i]);
            tb[i].push(b[i]);
        }
    }
    for ((k, a), b) in ks.iter().zip(ta).zip(tb) {
        let (a, b) = (median(a), median(b));
        println!(
            "k={k:2}: ours {a:7.1} ms  candle {b:7.1} ms  ({:.2}x ours)",
            b / a
        );
    }
}
