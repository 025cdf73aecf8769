//! The embedded server (`ouro serve` without endpoints) over loopback gRPC, with tiny
//! random models: it runs the serving crate's target runtime, so concurrent requests share
//! batched forwards and still equal plain greedy decoding token for token, sessions past
//! the limit are refused with RESOURCE_EXHAUSTED, and idle sessions expire after the TTL.

mod common;

use decoding::TargetBackend;
use engine::Transformer;
use orchestrator::embedded::{Limits, LocalPipeline};
use proto::v1 as pb;
use proto::v1::ouroboros_client::OuroborosClient;
use serving::TargetConfig;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::Code;
use tonic::transport::Channel;

const VOCAB: usize = 96;

struct Server {
    _dir: tempfile::TempDir,
    pipeline: Arc<LocalPipeline<Transformer>>,
    client: OuroborosClient<Channel>,
}

/// The embedded pipeline over a tiny target (f32) and its 8-bit copy as the draft, served
/// on loopback like `ouro serve`.
async fn embedded(target: TargetConfig) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let (pipeline, service) = common::embedded_service(dir.path(), Limits { target }, 32);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(orchestrator::serve(service, l, std::future::pending()));
    let client = OuroborosClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    Server {
        _dir: dir,
        pipeline,
        client,
    }
}

fn request(prompt: &[u32], strategy: pb::Strategy) -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(pb::generate_request::Input::TokenIds(pb::TokenIds {
            ids: prompt.to_vec(),
        })),
        max_new_tokens: Some(32),
        strategy: strategy as i32,
        ..Default::default()
    }
}

/// A unary greedy request, which must run to its 32 tokens.
async fn greedy(server: &mut Server, prompt: &[u32]) -> Vec<u32> {
    let g = server
        .client
        .generate(request(prompt, pb::Strategy::Greedy))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.token_ids.len(), 32);
    g.token_ids
}

/// Every token a stream sends, in order.
async fn streamed(mut c: OuroborosClient<Channel>, r: pb::GenerateRequest) -> Vec<u32> {
    let mut s = c.generate_stream(r).await.unwrap().into_inner();
    let mut ids = Vec::new();
    while let Some(m) = s.message().await.unwrap() {
        ids.extend(m.token_ids);
    }
    ids
}

fn prompts() -> Vec<Vec<u32>> {
    vec![
        (0..12).map(|i| [5u32, 9, 14, 22][i % 4]).collect(),
        (0..7).map(|i| (i * 13 + 1) % VOCAB as u32).collect(),
        vec![3, 3, 3, 3, 8, 8, 8, 8, 3, 3],
        (0..20).map(|i| (i * 7 + 2) % VOCAB as u32).collect(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_share_forwards_and_equal_plain_greedy() {
    // A short wait gathers the trees of the other open sessions into each forward.
    let mut server = embedded(TargetConfig {
        batch_wait: Duration::from_millis(2),
        ..TargetConfig::default()
    })
    .await;
    let prompts = prompts();
    let mut plain = Vec::new();
    for p in &prompts {
        plain.push(greedy(&mut server, p).await);
    }
    let m = telemetry::metrics();
    let (trees_before, forwards_before) = (
        m.batch_trees.get_sample_sum(),
        m.batch_trees.get_sample_count(),
    );
    use pb::Strategy as S;
    let strategies = [
        S::Greedy,
        S::Speculative,
        S::Ouroboros,
        S::Trie,
        S::Lookahead,
    ];
    let mut running = Vec::new();
    for i in 0..8 {
        let (p, s) = (i % prompts.len(), strategies[i % strategies.len()]);
        let c = server.client.clone();
        let r = request(&prompts[p], s);
        running.push((p, s, tokio::spawn(streamed(c, r))));
    }
    for (p, s, task) in running {
        let ids = task.await.unwrap();
        assert_eq!(ids, plain[p], "{s:?} on prompt {p}, concurrently");
    }
    let trees = m.batch_trees.get_sample_sum() - trees_before;
    let forwards = (m.batch_trees.get_sample_count() - forwards_before) as f64;
    assert!(
        trees > forwards,
        "{trees} trees in {forwards} forwards: concurrent requests were not batched"
    );
    // Every request closed its sessions.
    assert_eq!(server.pipeline.target.sessions().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_past_the_limit_are_refused() {
    let mut server = embedded(TargetConfig {
        max_sessions: 1,
        ..TargetConfig::default()
    })
    .await;
    let prompt = &prompts()[0];
    // A session that holds the only place.
    let held = server.pipeline.target.open(prompt).await.unwrap();
    let e = server
        .client
        .generate(request(prompt, pb::Strategy::Greedy))
        .await
        .expect_err("a second session is past the limit");
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert!(e.message().contains("sessions"), "{}", e.message());
    server.pipeline.target.close(held).await.unwrap();
    greedy(&mut server, prompt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_sessions_expire_after_the_ttl() {
    let ttl = Duration::from_millis(300);
    let mut server = embedded(TargetConfig {
        max_sessions: 1,
        session_ttl: ttl,
        ..TargetConfig::default()
    })
    .await;
    let prompt = &prompts()[1];
    // A session its caller abandoned.
    let abandoned = server.pipeline.target.open(prompt).await.unwrap();
    assert_eq!(server.pipeline.target.sessions().len(), 1);
    let e = server
        .client
        .generate(request(prompt, pb::Strategy::Greedy))
        .await
        .expect_err("the abandoned session holds the only place");
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    let deadline = std::time::Instant::now() + ttl * 10;
    while !server.pipeline.target.sessions().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the idle session was not evicted"
        );
        tokio::time::sleep(ttl / 4).await;
    }
    let e = server
        .pipeline
        .target
        .close(abandoned)
        .await
        .expect_err("the evicted session is gone");
    assert!(
        matches!(e, decoding::DecodingError::UnknownSession(_)),
        "{e}"
    );
    let g = server
        .client
        .generate(request(prompt, pb::Strategy::Greedy))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.token_ids.len(), 32);
}
