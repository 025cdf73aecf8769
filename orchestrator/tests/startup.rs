//! `ouro serve` as a process: started before its target service (as a fresh `helm install`
//! starts them) it waits for it with backoff instead of exiting, then serves, its health
//! NOT_SERVING while the target is gone and SERVING when it is back; sent SIGTERM
//! (as Kubernetes stops a pod) with a request in flight, it finishes that request, then
//! exits cleanly.

mod common;

use common::{Procs, binary, free_port, ouro_serve, tiny_files, wait_for};
use engine::Architecture;
use engine::testing::tiny_config;
use proto::v1 as pb;
use proto::v1::ouroboros_client::OuroborosClient;
use std::process::Command;
use std::time::Duration;
use tonic_health::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// Asks for six greedy tokens, and gets them.
async fn six_tokens(client: &mut OuroborosClient<tonic::transport::Channel>) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orchestrator_waits_for_a_target_that_starts_later_and_its_health_follows_it() {
    let dir = tempfile::tempdir().unwrap();
    let (target, tokenizer) = tiny_files(dir.path(), tiny_config(Architecture::Qwen2));
    let (pt, po) = (free_port(), free_port());
    let mut procs = Procs(Vec::new());
    let mut serve = ouro_serve(po, &tokenizer);
    serve
        .args(["--target-endpoint", &format!("http://127.0.0.1:{pt}")])
        .args(["--backend-wait-s", "120", "--health-check-s", "1"]);
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
    six_tokens(&mut client).await;

    // Health follows the target (checked every second here): the target gone, NOT_SERVING;
    // back on its port, SERVING again, and requests are served.
    let channel = tonic::transport::Channel::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = HealthClient::new(channel);
    let status_becomes = |want: ServingStatus, procs: &mut Procs| {
        let mut health = health.clone();
        procs.check_alive();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                let now = health
                    .check(HealthCheckRequest::default())
                    .await
                    .unwrap()
                    .into_inner()
                    .status;
                if now == want as i32 {
                    return;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "health stays {now}, want {want:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    status_becomes(ServingStatus::Serving, &mut procs).await;
    let (_, mut gone) = procs.0.pop().unwrap();
    gone.kill().unwrap();
    gone.wait().unwrap();
    status_becomes(ServingStatus::NotServing, &mut procs).await;
    // Not ready, but alive: a liveness probe does not restart it for its target's absence.
    let alive = health
        .clone()
        .check(HealthCheckRequest {
            service: serving::server::LIVENESS.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(alive, ServingStatus::Serving as i32);
    procs.spawn("target-service", &mut cmd);
    status_becomes(ServingStatus::Serving, &mut procs).await;
    six_tokens(&mut client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_request_in_flight_finish_then_exits() {
    let dir = tempfile::tempdir().unwrap();
    let (target, tokenizer) = tiny_files(dir.path(), common::slower_config());
    let po = free_port();
    let mut procs = Procs(Vec::new());
    let mut serve = ouro_serve(po, &tokenizer);
    serve.arg("--target").arg(&target).args(["--draft", "none"]);
    procs.spawn("ouro serve", &mut serve);
    let url = format!("http://127.0.0.1:{po}");
    let mut client = wait_for(&mut procs, "ouro serve", || async {
        Ok(OuroborosClient::connect(url.clone()).await?)
    })
    .await;
    let n = 400;
    let mut stream = client
        .generate_stream(pb::GenerateRequest {
            input: Some(pb::generate_request::Input::Prompt("w3 w4 w5".into())),
            max_new_tokens: Some(n),
            strategy: pb::Strategy::Greedy as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().expect("a first message");
    let mut tokens = first.token_ids.len();
    let pid = procs.0[0].1.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    let (mut after, mut last) = (0, None);
    while let Some(m) = stream
        .message()
        .await
        .expect("the stream goes on after SIGTERM")
    {
        tokens += m.token_ids.len();
        after += 1;
        if m.finish_reason != 0 {
            last = Some(m);
        }
    }
    println!(
        "SIGTERM after {} of {n} tokens; {after} messages after it",
        first.token_ids.len()
    );
    assert!(
        after > 1,
        "the request had ended before the signal: nothing was tested"
    );
    let last = last.expect("a final message");
    assert_eq!(last.finish_reason, pb::FinishReason::Length as i32);
    assert_eq!(tokens, n as usize, "every token arrived");
    // Then the process ends, cleanly.
    let (_, child) = &mut procs.0[0];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
}
