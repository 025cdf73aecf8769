//! The target service over real gRPC on loopback: same answers as the engine in process,
//! batching that changes nothing, TP=2 equal to TP=1, and a clear status for bad input.

use candle_core::Device;
use candle_core::quantized::GgmlDType;
use decoding::{DraftTree, SamplingParams, TargetSession, VerifyOutcome};
use engine::testing::{random_weights, tiny_config, write_gguf};
use engine::tp::TpModel;
use engine::{Architecture, LanguageModel, LoadOptions, MockModel};
use proto::common::v1::Sampling;
use proto::target::v1 as pb;
use proto::target::v1::target_service_client::TargetServiceClient;
use std::sync::Arc;
use std::time::Duration;
use target_service::{TargetConfig, TargetGrpc, serve};
use tonic::Code;
use tonic::transport::Channel;

type Client = TargetServiceClient<Channel>;

/// Starts the service on an ephemeral loopback port; it stops when the runtime ends.
async fn start<M: LanguageModel + 'static>(model: Arc<M>, config: TargetConfig) -> Client {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(
        TargetGrpc::new(model, config),
        listener,
        std::future::pending(),
    ));
    TargetServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

fn tiny_gguf(dir: &std::path::Path) -> std::path::PathBuf {
    let cfg = tiny_config(Architecture::Qwen2);
    let path = dir.join("target.gguf");
    let w = random_weights(&cfg, 17, true, false).unwrap();
    write_gguf(&path, &cfg, &w, GgmlDType::F32).unwrap();
    path
}

fn load(path: &std::path::Path) -> Arc<engine::Transformer> {
    Arc::new(engine::load_model(path, &LoadOptions::default(), &Device::Cpu).unwrap())
}

/// A deterministic pseudo-random tree of `n` nodes below `root`.
fn tree(root: u32, n: usize, vocab: u32, seed: u64) -> DraftTree {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut tokens = vec![root];
    let mut parents = vec![-1];
    for i in 1..n {
        // mostly chains, sometimes a branch
        let p = if next() % 4 == 0 {
            next() as usize % i
        } else {
            i - 1
        };
        parents.push(p as i32);
        tokens.push((next() % vocab as u64) as u32);
    }
    DraftTree::from_parts(tokens, parents).unwrap()
}

async fn open(c: &mut Client, tokens: &[u32]) -> u64 {
    c.open_session(pb::OpenSessionRequest {
        tokens: tokens.to_vec(),
    })
    .await
    .unwrap()
    .into_inner()
    .session_id
}

fn request(id: u64, t: &DraftTree, sampling: Option<Sampling>) -> pb::VerifyRequest {
    pb::VerifyRequest {
        session_id: id,
        tokens: t.tokens.clone(),
        parents: t.parents.clone(),
        sampling,
        logprobs: None,
    }
}

fn outcome(r: pb::VerifyResponse) -> VerifyOutcome {
    VerifyOutcome {
        path: r.path.iter().map(|&n| n as usize).collect(),
        accepted: r.accepted,
        bonus: r.bonus,
        outputs: r.outputs,
        logprobs: r.logprobs.into_iter().map(Into::into).collect(),
    }
}

/// Rounds of verification over gRPC equal the same rounds on an in-process session.
async fn rounds_match<M: LanguageModel + 'static>(
    model: Arc<M>,
    remote: &mut Client,
    sampling: Option<Sampling>,
    seed: u64,
) {
    let vocab = model.info().vocab_size as u32;
    let prompt: Vec<u32> = (0..9).map(|i| (i * 11 + seed as u32) % vocab).collect();
    let mut local = TargetSession::open(&*model, &prompt).unwrap();
    let id = open(remote, &prompt).await;
    let sp = proto::convert::sampling_from_pb(sampling.as_ref());
    for round in 0..5 {
        let t = tree(local.last, 3 + round * 2, vocab, seed * 31 + round as u64);
        let want = local.verify(&*model, &t, &sp, None).unwrap();
        let got = remote
            .verify(request(id, &t, sampling))
            .await
            .unwrap()
            .into_inner();
        assert!(got.timing.is_some_and(|t| t.total_s >= t.forward_s));
        assert_eq!(outcome(got), want, "round {round}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_over_grpc_equals_in_process() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&tiny_gguf(dir.path()));
    let mut c = start(model.clone(), TargetConfig::default()).await;
    rounds_match(model.clone(), &mut c, None, 1).await;
    let sampling = Sampling {
        temperature: 0.8,
        top_p: 0.9,
        top_k: 20,
        seed: Some(7),
    };
    rounds_match(model, &mut c, Some(sampling), 2).await;
}

/// A prompt prefilled two rows per forward leaves the cache a one-shot prefill leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_prefill_equals_one_shot() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&tiny_gguf(dir.path()));
    let config = TargetConfig {
        prefill_chunk: 2,
        ..TargetConfig::default()
    };
    let mut c = start(model.clone(), config).await;
    rounds_match(model, &mut c, None, 3).await;
}

/// 8 sessions verified concurrently (batched by the scheduler) give what each gives alone.
async fn batched_equals_alone<M: LanguageModel + 'static>(model: Arc<M>) {
    let config = TargetConfig {
        batch_wait: Duration::from_millis(20),
        ..TargetConfig::default()
    };
    let c = start(model.clone(), config).await;
    let vocab = model.info().vocab_size as u32;
    let mut tasks = Vec::new();
    for s in 0..8u64 {
        let (mut c, model) = (c.clone(), model.clone());
        tasks.push(tokio::spawn(async move {
            let prompt: Vec<u32> = (0..5 + s as u32)
                .map(|i| (i * 5 + s as u32) % vocab)
                .collect();
            let id = open(&mut c, &prompt).await;
            let mut local = TargetSession::open(&*model, &prompt).unwrap();
            let mut most = 0;
            for round in 0..4 {
                let t = tree(
                    local.last,
                    4 + (s as usize + round) % 5,
                    vocab,
                    s * 100 + round as u64,
                );
                let want = local
                    .verify(&*model, &t, &SamplingParams::greedy(), None)
                    .unwrap();
                let got = c.verify(request(id, &t, None)).await.unwrap().into_inner();
                most = most.max(got.timing.map_or(0, |t| t.batch_trees));
                assert_eq!(outcome(got), want, "session {s} round {round}");
            }
            most
        }));
    }
    let mut most = 0;
    for t in tasks {
        most = most.max(t.await.unwrap());
    }
    // A forward served several sessions' trees at once (the scheduler says how many).
    assert!(most > 1, "no forward carried more than {most} tree");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_sessions_batched_equal_alone_mock() {
    batched_equals_alone(Arc::new(MockModel::new(64, 512, 0.7, 3))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_sessions_batched_equal_alone_real_weights() {
    let dir = tempfile::tempdir().unwrap();
    batched_equals_alone(load(&tiny_gguf(dir.path()))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tp2_target_equals_tp1() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_gguf(dir.path());
    let tp = Arc::new(TpModel::load(&path, 2, &LoadOptions::default(), &Device::Cpu).unwrap());
    let config = TargetConfig {
        tp_size: 2,
        ..TargetConfig::default()
    };
    let mut c = start(tp, config).await;
    let info = c
        .info(pb::InfoRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.tp_size, 2);
    // The reference is the single-rank model in process.
    rounds_match(load(&path), &mut c, None, 3).await;
}

async fn code_of<T>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    match r {
        Ok(_) => (Code::Ok, String::new()),
        Err(s) => (s.code(), s.message().to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_status_naming_the_field() {
    let model = Arc::new(MockModel::new(50, 64, 0.5, 1));
    let config = TargetConfig {
        max_tree_nodes: 16,
        ..TargetConfig::default()
    };
    let mut c = start(model, config).await;
    let id = open(&mut c, &[1, 2, 3]).await;
    let req = |tokens: Vec<u32>, parents: Vec<i32>| pb::VerifyRequest {
        session_id: id,
        tokens,
        parents,
        sampling: None,
        logprobs: None,
    };
    let cases = [
        (
            "unknown session",
            pb::VerifyRequest {
                session_id: id + 999,
                ..req(vec![3], vec![-1])
            },
            Code::NotFound,
            "session_id",
        ),
        (
            "empty tree",
            req(vec![], vec![]),
            Code::InvalidArgument,
            "parents",
        ),
        (
            "parent out of range",
            req(vec![3, 4], vec![-1, 5]),
            Code::InvalidArgument,
            "parents[1]",
        ),
        (
            "parent cycle",
            req(vec![3, 4, 5], vec![-1, 2, 1]),
            Code::InvalidArgument,
            "parents[1]",
        ),
        (
            "token outside vocab",
            req(vec![3, 50], vec![-1, 0]),
            Code::InvalidArgument,
            "tokens",
        ),
        (
            "too many nodes",
            req(vec![3; 17], (-1..16).collect()),
            Code::InvalidArgument,
            "tokens",
        ),
        (
            "root does not continue",
            req(vec![4], vec![-1]),
            Code::InvalidArgument,
            "tokens",
        ),
    ];
    for (what, r, code, needle) in cases {
        let (got, msg) = code_of(c.verify(r).await).await;
        assert_eq!(got, code, "{what}: {msg}");
        assert!(msg.contains(needle), "{what}: '{msg}' should name {needle}");
    }
    let bad_sampling = pb::VerifyRequest {
        sampling: Some(Sampling {
            temperature: -1.0,
            ..Default::default()
        }),
        ..req(vec![3], vec![-1])
    };
    let (got, msg) = code_of(c.verify(bad_sampling).await).await;
    assert_eq!(got, Code::InvalidArgument, "{msg}");
    assert!(msg.contains("temperature"), "{msg}");
    // context: 64 positions, the session holds 2 cached tokens; a 63-node chain overflows
    let long: Vec<u32> = std::iter::once(3).chain((0..62).map(|i| i % 50)).collect();
    let chain: Vec<i32> = (-1..62).collect();
    let big = TargetConfig {
        max_tree_nodes: 128,
        ..TargetConfig::default()
    };
    let mut c2 = start(Arc::new(MockModel::new(50, 64, 0.5, 1)), big).await;
    let id2 = open(&mut c2, &[1, 2, 3]).await;
    let (got, msg) = code_of(
        c2.verify(pb::VerifyRequest {
            session_id: id2,
            tokens: long,
            parents: chain,
            sampling: None,
            logprobs: None,
        })
        .await,
    )
    .await;
    assert_eq!(got, Code::OutOfRange, "{msg}");
    let (got, msg) = code_of(
        c.open_session(pb::OpenSessionRequest { tokens: vec![] })
            .await,
    )
    .await;
    assert_eq!(got, Code::InvalidArgument, "{msg}");
    let (got, msg) = code_of(
        c.open_session(pb::OpenSessionRequest {
            tokens: vec![1; 64],
        })
        .await,
    )
    .await;
    assert_eq!(got, Code::OutOfRange, "{msg}");
    // The session survived every bad call.
    let ok = c.verify(req(vec![3, 9], vec![-1, 0])).await;
    assert!(ok.is_ok(), "{ok:?}");
    c.close_session(pb::CloseSessionRequest { session_id: id })
        .await
        .unwrap();
    let (got, _) = code_of(
        c.close_session(pb::CloseSessionRequest { session_id: id })
            .await,
    )
    .await;
    assert_eq!(got, Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_expire_and_full_service_refuses_new_ones() {
    let model = Arc::new(MockModel::new(50, 64, 0.5, 1));
    let config = TargetConfig {
        session_ttl: Duration::from_millis(100),
        max_sessions: 2,
        ..TargetConfig::default()
    };
    let mut c = start(model, config).await;
    let a = open(&mut c, &[1, 2]).await;
    let _b = open(&mut c, &[1, 2]).await;
    let (got, msg) = code_of(
        c.open_session(pb::OpenSessionRequest { tokens: vec![1] })
            .await,
    )
    .await;
    assert_eq!(got, Code::ResourceExhausted, "{msg}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = pb::VerifyRequest {
        session_id: a,
        tokens: vec![2],
        parents: vec![-1],
        sampling: None,
        logprobs: None,
    };
    let (got, msg) = code_of(c.verify(r).await).await;
    assert_eq!(got, Code::NotFound, "{msg}");
    // Eviction freed the places.
    open(&mut c, &[1]).await;
}

/// KV bytes of `n` sessions of the tiny model at its first cache capacity (256 entries,
/// f32).
fn sessions_bytes(n: f64) -> usize {
    let cfg = tiny_config(Architecture::Qwen2);
    let one = 2 * cfg.num_layers * cfg.num_kv_heads * 256 * cfg.head_dim * 4;
    (one as f64 * n) as usize
}

/// A budget of one session: a second is refused, while the open one keeps verifying
/// within the memory it holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_budget_refuses_new_sessions_but_keeps_existing_ones() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&tiny_gguf(dir.path()));
    let config = TargetConfig {
        kv_budget_bytes: sessions_bytes(1.0),
        ..TargetConfig::default()
    };
    let mut c = start(model, config).await;
    let a = open(&mut c, &[1, 2, 3, 4]).await;
    let (got, msg) = code_of(
        c.open_session(pb::OpenSessionRequest { tokens: vec![1, 2] })
            .await,
    )
    .await;
    assert_eq!(got, Code::ResourceExhausted, "{msg}");
    assert!(msg.contains("KV memory budget"), "{msg}");
    let t = DraftTree::from_parts(vec![4, 5], vec![-1, 0]).unwrap();
    assert!(c.verify(request(a, &t, None)).await.is_ok());
}

/// The budget holds while sessions grow: a tree that would take a session's cache past
/// its capacity, and the sessions past the budget, is refused with RESOURCE_EXHAUSTED and
/// leaves the session as it was; the other session is unaffected; once memory frees,
/// the same tree verifies, exactly as in process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_budget_holds_while_sessions_grow() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&tiny_gguf(dir.path()));
    let config = TargetConfig {
        kv_budget_bytes: sessions_bytes(2.5),
        ..TargetConfig::default()
    };
    let mut c = start(model.clone(), config).await;
    let long: Vec<u32> = (0..250).map(|i| (i * 7 + 3) % 64).collect();
    let a = open(&mut c, &long).await;
    let b = open(&mut c, &[1, 2, 3]).await;
    // 249 entries + 10 rows: past the first 256, so the cache would double.
    let mut local = TargetSession::open(&*model, &long).unwrap();
    let t = tree(local.last, 10, 64, 5);
    let (got, msg) = code_of(c.verify(request(a, &t, None)).await).await;
    assert_eq!(got, Code::ResourceExhausted, "{msg}");
    assert!(msg.contains("more bytes for its tree"), "{msg}");
    let small = DraftTree::from_parts(vec![3, 5, 6], vec![-1, 0, 1]).unwrap();
    assert!(c.verify(request(b, &small, None)).await.is_ok());
    c.close_session(pb::CloseSessionRequest { session_id: b })
        .await
        .unwrap();
    let got = c.verify(request(a, &t, None)).await.unwrap().into_inner();
    let greedy = SamplingParams::greedy();
    assert_eq!(
        outcome(got),
        local.verify(&*model, &t, &greedy, None).unwrap()
    );
}

/// On the stop signal health turns NOT_SERVING (so nothing new is routed here) while an
/// open session's calls still go on until the drain ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_says_not_serving_while_draining() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let model = Arc::new(MockModel::new(64, 512, 0.7, 3));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (drained, drain) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(target_service::serve_draining(
        TargetGrpc::new(model.clone(), TargetConfig::default()),
        listener,
        async {
            let _ = stopped.await;
        },
        async {
            let _ = drain.await;
        },
        Default::default(),
    ));
    let channel = tonic::transport::Endpoint::from_shared(addr)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    let mut c = TargetServiceClient::new(channel);
    let status = |name: &str| HealthCheckRequest {
        service: name.to_string(),
    };
    let name = "ouroboros.target.v1.TargetService";
    let serving = ServingStatus::Serving as i32;
    for n in ["", name] {
        assert_eq!(
            health.check(status(n)).await.unwrap().into_inner().status,
            serving
        );
    }
    let id = open(&mut c, &[1, 2, 3]).await;
    stop.send(()).unwrap();
    let not_serving = ServingStatus::NotServing as i32;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while health
        .check(status(name))
        .await
        .unwrap()
        .into_inner()
        .status
        != not_serving
    {
        assert!(std::time::Instant::now() < deadline, "health never changed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        health.check(status("")).await.unwrap().into_inner().status,
        not_serving
    );
    // The open session still verifies during the drain.
    let t = DraftTree::from_parts(vec![3, 5], vec![-1, 0]).unwrap();
    assert!(c.verify(request(id, &t, None)).await.is_ok());
    drained.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server stops after the drain")
        .unwrap()
        .unwrap();
}

/// A target whose model worker died cannot serve again: its health turns NOT_SERVING, the
/// `liveness` name too (Kubernetes takes the pod out of service and restarts it; the
/// orchestrator moves its sessions to other replicas), and calls get UNAVAILABLE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_says_not_serving_when_the_worker_dies() {
    use engine::mock::Doomed;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let model = Arc::new(Doomed::new(
        MockModel::new(64, 512, 0.7, 3),
        "verify-scheduler",
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve(
        TargetGrpc::new(model.clone(), TargetConfig::default()),
        listener,
        std::future::pending(),
    ));
    let channel = tonic::transport::Endpoint::from_shared(addr)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    let mut c = TargetServiceClient::new(channel);
    let mut status = async |name: &str| {
        let r = HealthCheckRequest {
            service: name.to_string(),
        };
        health.check(r).await.unwrap().into_inner().status
    };
    let name = "ouroboros.target.v1.TargetService";
    assert_eq!(status(name).await, ServingStatus::Serving as i32);
    let id = open(&mut c, &[1, 2, 3]).await;
    model.arm();
    let t = DraftTree::from_parts(vec![3, 5], vec![-1, 0]).unwrap();
    let (code, msg) = code_of(c.verify(request(id, &t, None)).await).await;
    assert_eq!(code, Code::Unavailable, "{msg}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while status(name).await != ServingStatus::NotServing as i32 {
        assert!(std::time::Instant::now() < deadline, "health never changed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status("").await, ServingStatus::NotServing as i32);
    assert_eq!(
        status(serving::server::LIVENESS).await,
        ServingStatus::NotServing as i32
    );
}
