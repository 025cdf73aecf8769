//! The embedded server (`ouro serve` without endpoints) over loopback gRPC, with tiny
//! random models: it runs the serving crate's target runtime, so concurrent requests of
//! every strategy (auto among them, seeded sampling too) share batched forwards and still
//! produce exactly what they produce alone, token for token, sessions past
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

/// Seeded sampling at temperature 0.9: the same seed gives the same text whatever the
/// strategy, alone or beside others.
fn sampled(mut r: pb::GenerateRequest, seed: u64) -> pb::GenerateRequest {
    r.sampling = Some(proto::common::v1::Sampling {
        temperature: 0.9,
        top_p: 0.95,
        top_k: 0,
        seed: Some(seed),
    });
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_concurrent_requests_of_mixed_strategies_equal_what_they_produce_alone() {
    // A short wait gathers the trees of the other open sessions into each forward.
    let mut server = embedded(TargetConfig {
        batch_wait: Duration::from_millis(2),
        ..TargetConfig::default()
    })
    .await;
    // auto on a profile where rows are nearly free, so that it drafts and builds wide
    // trees alone, and plans with the load it sees beside it.
    let profile = decoding::CostProfile::new(
        vec![(1, 0.010), (64, 0.012)],
        Some(decoding::DraftCost {
            per_call: 0.0,
            per_token: 0.001,
            catch_up: 0.0005,
        }),
    )
    .unwrap();
    let _ = server.pipeline.tuner.set(decoding::AutoTuner::new(profile));
    let prompts = prompts();
    use pb::Strategy as S;
    let strategies = [
        S::Greedy,
        S::Speculative,
        S::Auto,
        S::Ouroboros,
        S::Trie,
        S::Lookahead,
    ];
    // Requests 0..16: prompt, strategy, and from the seventh on, where the strategy
    // samples, seeded sampling with the prompt's seed (so that requests 7 and 15, 9 and
    // 13 sample one prompt with one seed under two strategies).
    let requests: Vec<(usize, pb::GenerateRequest)> = (0..16)
        .map(|i| {
            let (p, s) = (i % prompts.len(), strategies[i % strategies.len()]);
            let r = request(&prompts[p], s);
            match i >= 6 && matches!(s, S::Greedy | S::Speculative | S::Ouroboros) {
                true => (p, sampled(r, 1000 + p as u64)),
                false => (p, r),
            }
        })
        .collect();
    let mut alone = Vec::new();
    for (p, r) in &requests {
        let ids = streamed(server.client.clone(), r.clone()).await;
        assert_eq!(ids.len(), 32, "request on prompt {p} alone");
        alone.push(ids);
    }
    // Greedy requests alone equal plain greedy; sampled ones with one seed agree across
    // strategies.
    for (i, (p, r)) in requests.iter().enumerate() {
        if r.sampling.is_none() {
            assert_eq!(
                alone[i],
                greedy(&mut server, &prompts[*p]).await,
                "request {i}"
            );
        } else if let Some(j) = (0..i).find(|&j| requests[j].1.sampling == r.sampling) {
            assert_eq!(
                alone[i], alone[j],
                "requests {j} and {i}: one seed, two texts"
            );
        }
    }
    let m = telemetry::metrics();
    let (trees_before, forwards_before) = (
        m.batch_trees.get_sample_sum(),
        m.batch_trees.get_sample_count(),
    );
    let running: Vec<_> = requests
        .iter()
        .map(|(_, r)| tokio::spawn(streamed(server.client.clone(), r.clone())))
        .collect();
    for (i, task) in running.into_iter().enumerate() {
        let ids = task.await.unwrap();
        let strategy = requests[i].1.strategy;
        assert_eq!(
            ids, alone[i],
            "request {i} (strategy {strategy}) concurrently"
        );
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
    // Idle time is read from a clock the test moves: on a loaded machine the session
    // cannot expire before the test says so.
    let clock = serving::Clock::manual();
    let ttl = Duration::from_millis(100);
    let mut server = embedded(TargetConfig {
        max_sessions: 1,
        session_ttl: ttl,
        clock: clock.clone(),
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
    // Real time passes, the clock does not: nothing is evicted.
    tokio::time::sleep(ttl * 2).await;
    assert_eq!(server.pipeline.target.sessions().len(), 1);
    clock.advance(ttl * 2);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
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
