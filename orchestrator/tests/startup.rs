//! `ouro serve` started before its target service (as a fresh `helm install` starts them)
//! waits for it with backoff instead of exiting, then serves.

mod common;

use candle_core::quantized::GgmlDType;
use common::{Procs, binary, free_port, wait_for};
use engine::Architecture;
use engine::testing::{random_weights, tiny_config, write_gguf};
use proto::v1 as pb;
use proto::v1::ouroboros_client::OuroborosClient;
use std::process::Command;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orchestrator_waits_for_a_target_that_starts_later() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Architecture::Qwen2);
    let w = random_weights(&cfg, 5, true, false).unwrap();
    let target = dir.path().join("t.gguf");
    write_gguf(&target, &cfg, &w, GgmlDType::F32).unwrap();
    let tokenizer = dir.path().join("tokenizer.json");
    common::word_tokenizer(cfg.vocab_size)
        .save(&tokenizer, false)
        .unwrap();
    let (pt, po) = (free_port(), free_port());
    let mut procs = Procs(Vec::new());
    let mut serve = Command::new(env!("CARGO_BIN_EXE_ouro"));
    serve
        .arg("serve")
        .args([
            "--listen",
            &format!("127.0.0.1:{po}"),
            "--http-listen",
            "off",
        ])
        .args(["--target-endpoint", &format!("http://127.0.0.1:{pt}")])
        .arg("--tokenizer")
        .arg(&tokenizer)
        .args(["--skip-profile", "--backend-wait-s", "120"])
        .env("RUST_LOG", "warn");
    procs.spawn("ouro serve", &mut serve);
    // Nothing answers on the target's port yet: the orchestrator keeps waiting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    procs.check_alive();

    let mut cmd = Command::new(binary("target-service"));
    cmd.arg("--model")
        .arg(&target)
        .args(["--listen", &format!("127.0.0.1:{pt}")])
        .env("RUST_LOG", "warn");
    procs.spawn("target-service", &mut cmd);
    let url = format!("http://127.0.0.1:{po}");
    let mut client = wait_for(&mut procs, "ouro serve", || async {
        Ok(OuroborosClient::connect(url.clone()).await?)
    })
    .await;
    let r = client
        .generate(pb::GenerateRequest {
            input: Some(pb::generate_request::Input::Prompt("w3 w4 w5".into())),
            max_new_tokens: Some(6),
            strategy: pb::Strategy::Greedy as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.token_ids.len(), 6);
}
