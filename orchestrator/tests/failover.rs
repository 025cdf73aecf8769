//! Target replicas failing under real processes: the replica holding a running stream is
//! killed (SIGKILL) and the stream goes on, on the other replica, with exactly the tokens
//! plain greedy gives; with no replica left, requests get UNAVAILABLE.

mod common;

use common::{Procs, binary, free_port, ouro_serve, tiny_files, wait_for};
use proto::v1 as pb;
use proto::v1::ouroboros_client::OuroborosClient;
use std::process::Command;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn greedy(n: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Prompt("w3 w4 w5".into())),
        max_new_tokens: Some(n),
        strategy: pb::Strategy::Greedy as i32,
        ..Default::default()
    }
}

/// One sample of the Prometheus text at `http://127.0.0.1:{port}/metrics` (None: not
/// there, as a labelled gauge before its first value).
async fn metric(port: u16, name: &str) -> Option<f64> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_moves_to_another_target_replica_when_its_own_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let (target, tokenizer) = tiny_files(dir.path(), common::slower_config());
    let (po, pm) = (free_port(), free_port());
    // Each target's gRPC and metrics ports.
    let targets = [(free_port(), free_port()), (free_port(), free_port())];
    let mut procs = Procs(Vec::new());
    for (i, (port, metrics)) in targets.iter().enumerate() {
        let mut cmd = Command::new(binary("target-service"));
        cmd.arg("--model")
            .arg(&target)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
            .env("RUST_LOG", "warn");
        procs.spawn(&format!("target {i}"), &mut cmd);
    }
    // Both replicas answer before `ouro serve` starts: one that is not up yet when it
    // connects is left out (names are not resolved again here).
    for (port, _) in targets {
        let url = format!("http://127.0.0.1:{port}");
        wait_for(&mut procs, "a target", || async {
            let c =
                proto::target::v1::target_service_client::TargetServiceClient::connect(url.clone());
            Ok(c.await?)
        })
        .await;
    }
    let mut serve = ouro_serve(po, &tokenizer);
    serve
        .args([
            "--target-endpoint",
            &format!(
                "http://127.0.0.1:{},http://127.0.0.1:{}",
                targets[0].0, targets[1].0
            ),
        ])
        .args(["--metrics-listen", &format!("127.0.0.1:{pm}")])
        .args(["--backend-wait-s", "60", "--discovery-refresh-s", "0"]);
    procs.spawn("ouro serve", &mut serve);
    let url = format!("http://127.0.0.1:{po}");
    let mut client = wait_for(&mut procs, "ouro serve", || async {
        Ok(OuroborosClient::connect(url.clone()).await?)
    })
    .await;
    let n = 400;
    let plain = client.generate(greedy(n)).await.unwrap().into_inner();
    assert_eq!(plain.token_ids.len(), n as usize);

    let mut stream = client
        .generate_stream(greedy(n))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().expect("a first message");
    let mut tokens = first.token_ids.clone();
    // Kill the replica that holds the stream's session.
    let open = "ouro_sessions{service=\"target\"}";
    let mut holder = None;
    for (i, (_, metrics)) in targets.iter().enumerate() {
        if metric(*metrics, open).await == Some(1.0) {
            holder = Some(i);
        }
    }
    let holder = holder.expect("one replica holds the session");
    let (_, a) = &mut procs.0[holder];
    a.kill().unwrap();
    a.wait().unwrap();
    let mut after = 0;
    while let Some(m) = stream
        .message()
        .await
        .expect("the stream goes on after its replica died")
    {
        tokens.extend(&m.token_ids);
        after += 1;
    }
    println!(
        "replica killed after {} of {n} tokens; {after} messages after it",
        first.token_ids.len()
    );
    assert!(
        after > 1,
        "the request had ended before the kill: nothing was tested"
    );
    assert_eq!(tokens, plain.token_ids, "the moved stream's tokens");
    assert_eq!(metric(pm, "ouro_session_failovers_total").await, Some(1.0));

    // New requests go to the replica that is left (the dead one is passed over).
    let again = client.generate(greedy(n)).await.unwrap().into_inner();
    assert_eq!(again.token_ids, plain.token_ids);

    // No replica left: UNAVAILABLE, at once.
    let (_, b) = &mut procs.0[1 - holder];
    b.kill().unwrap();
    b.wait().unwrap();
    let started = std::time::Instant::now();
    let e = client.generate(greedy(6)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(15), "{e:?}");
}
