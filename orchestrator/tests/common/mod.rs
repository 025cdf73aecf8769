//! Helpers shared by the orchestrator's integration tests (each test binary uses some).
#![allow(dead_code)]

use candle_core::Device;
use candle_core::quantized::GgmlDType;
use decoding::{DecodeParams, LookaheadParams, Strategy};
use engine::testing::{random_weights, tiny_config, write_gguf};
use engine::{Architecture, LoadOptions, Transformer};
use orchestrator::api::GenerateService;
use orchestrator::chat::ChatTemplate;
use orchestrator::embedded::{Limits, LocalPipeline, fresh_pipeline};
pub use orchestrator::testing::word_tokenizer;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Child processes, killed when the test ends however it ends.
pub struct Procs(pub Vec<(String, Child)>);

impl Procs {
    pub fn spawn(&mut self, what: &str, cmd: &mut Command) {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        self.0.push((what.to_string(), child));
    }

    /// Fails the test at once if a process died (instead of waiting out a timeout).
    pub fn check_alive(&mut self) {
        for (what, c) in &mut self.0 {
            if let Ok(Some(status)) = c.try_wait() {
                panic!("{what} exited early with {status}");
            }
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The binaries beside `ouro` in cargo's output folder (built by `cargo build
/// --workspace`, as scripts/test.sh does first).
pub fn binary(name: &str) -> PathBuf {
    let ouro = Path::new(env!("CARGO_BIN_EXE_ouro"));
    let p = ouro.with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (cargo build --release --workspace)",
        p.display()
    );
    p
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Retries `connect` until it answers or a minute passes.
pub async fn wait_for<F, Fut, T>(procs: &mut Procs, what: &str, mut connect: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        procs.check_alive();
        match connect().await {
            Ok(v) => return v,
            Err(e) if Instant::now() > deadline => panic!("{what} not answering: {e:#}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// A tiny random target (f32) and its 8-bit copy as the draft, written into `dir`: the
/// draft mostly agrees with the target and sometimes does not.
pub fn tiny_pair(dir: &Path, seed: u64) -> (PathBuf, PathBuf) {
    let cfg = tiny_config(Architecture::Qwen2);
    let w = random_weights(&cfg, seed, true, false).unwrap();
    let (tp, dp) = (dir.join("t.gguf"), dir.join("d.gguf"));
    write_gguf(&tp, &cfg, &w, GgmlDType::F32).unwrap();
    write_gguf(&dp, &cfg, &w, GgmlDType::Q8_0).unwrap();
    (tp, dp)
}

pub fn load(path: &Path) -> Arc<Transformer> {
    Arc::new(engine::load_model(path, &LoadOptions::default(), &Device::Cpu).unwrap())
}

/// The embedded pipeline (the serving runtimes in this process) over [`tiny_pair`] in
/// `dir`, and the public service over it: Ouroboros by default, `max_new_tokens` tokens,
/// lookahead 4/3/3, the word tokenizer and ChatML.
pub fn embedded_service(
    dir: &Path,
    limits: Limits,
    max_new_tokens: usize,
) -> (Arc<LocalPipeline<Transformer>>, GenerateService) {
    let (tp, dp) = tiny_pair(dir, 23);
    let lookahead = LookaheadParams {
        level: 4,
        window: 3,
        guess: 3,
    };
    let pipeline = Arc::new(fresh_pipeline(
        &load(&tp),
        Some(&load(&dp)),
        lookahead.phrase_len(),
        &limits,
    ));
    let defaults = DecodeParams {
        strategy: Strategy::Ouroboros,
        max_new_tokens,
        gamma: 4,
        lookahead,
        topk: 2,
        ..DecodeParams::default()
    };
    let vocab = tiny_config(Architecture::Qwen2).vocab_size;
    let service = GenerateService::new(
        pipeline.clone(),
        Arc::new(word_tokenizer(vocab)),
        Arc::new(ChatTemplate::chatml()),
        vec![],
        defaults,
    );
    (pipeline, service)
}

/// A random model of `cfg` and a tokenizer for it, written into `dir`.
pub fn tiny_files(dir: &Path, cfg: engine::ModelConfig) -> (PathBuf, PathBuf) {
    let w = random_weights(&cfg, 5, true, false).unwrap();
    let target = dir.join("t.gguf");
    write_gguf(&target, &cfg, &w, GgmlDType::F32).unwrap();
    let tokenizer = dir.join("tokenizer.json");
    word_tokenizer(cfg.vocab_size)
        .save(&tokenizer, false)
        .unwrap();
    (target, tokenizer)
}

/// `ouro serve` on `port` (gRPC only, no profile) with `tokenizer`; the caller adds its
/// backends.
pub fn ouro_serve(port: u16, tokenizer: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ouro"));
    c.arg("serve")
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--http-listen",
            "off",
        ])
        .arg("--tokenizer")
        .arg(tokenizer)
        .arg("--skip-profile")
        .env("RUST_LOG", "warn");
    c
}

/// A random model big enough that 400 tokens take a while (~1 ms each), so a signal sent
/// after the first ones lands mid-way.
pub fn slower_config() -> engine::ModelConfig {
    engine::ModelConfig {
        hidden_size: 256,
        intermediate_size: 768,
        num_layers: 4,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
        ..tiny_config(Architecture::Qwen2)
    }
}
