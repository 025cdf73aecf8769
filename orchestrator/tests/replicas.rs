//! TargetSessions spread over several target replicas and stay on theirs: outputs equal a single
//! replica's, a draining replica gets no new sessions, host names resolve to replicas, and
//! the replica set follows what the names resolve to over time.

use candle_core::Device;
use candle_core::quantized::GgmlDType;
use decoding::{
    DecodeParams, DecodingError, DraftBackend, Flow, PhrasePool, Shared, Strategy, TargetBackend,
    TrieCache, generate,
};
use engine::testing::{random_weights, tiny_config, write_gguf};
use engine::{Architecture, LoadOptions};
use futures::future::join_all;
use orchestrator::remote::{RemoteDraft, RemoteTarget};
use orchestrator::replicas::Replicas;
use std::sync::Arc;
use std::time::Duration;
use target_service::{TargetConfig, TargetGrpc};
use tokio::net::TcpListener;

type Table = Arc<serving::scheduler::TargetSessions<engine::Transformer>>;

/// A target service on loopback; returns its URL and its session table.
async fn target(model: &std::path::Path) -> (String, Table) {
    target_with(model, TargetConfig::default()).await
}

async fn target_with(model: &std::path::Path, config: TargetConfig) -> (String, Table) {
    let m = Arc::new(engine::load_model(model, &LoadOptions::default(), &Device::Cpu).unwrap());
    let grpc = TargetGrpc::new(m, config);
    let sessions = grpc.sessions().clone();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(target_service::serve(grpc, l, std::future::pending()));
    (url, sessions)
}

async fn replicas(spec: &str) -> Replicas<RemoteTarget> {
    Replicas::connect(
        spec,
        |u| async move { RemoteTarget::connect(&u).await },
        <RemoteTarget as TargetBackend>::info,
        Duration::ZERO,
    )
    .await
    .unwrap()
}

async fn greedy<T: TargetBackend>(t: &T, prompt: &[u32]) -> Vec<u32> {
    greedy_n(t, prompt, 12).await
}

async fn greedy_n<T: TargetBackend>(t: &T, prompt: &[u32], n: usize) -> Vec<u32> {
    let params = DecodeParams {
        strategy: Strategy::Greedy,
        max_new_tokens: n,
        ..DecodeParams::default()
    };
    let (pool, trie) = (PhrasePool::new(Default::default()), TrieCache::default());
    let shared = Shared {
        pool: &pool,
        trie: &trie,
        tuner: None,
    };
    generate::<_, RemoteDraft>(
        t,
        None,
        shared,
        prompt,
        &params,
        &mut |_: &[u32], _: &[decoding::TokenSource]| Flow::Continue,
    )
    .await
    .unwrap()
    .tokens
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_spread_over_replicas_and_stay_there() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Architecture::Llama);
    let w = random_weights(&cfg, 5, false, false).unwrap();
    let path = dir.path().join("t.gguf");
    write_gguf(&path, &cfg, &w, GgmlDType::F32).unwrap();
    let (a, sa) = target(&path).await;
    let (b, sb) = target(&path).await;
    let both = replicas(&format!("{a}, {b}")).await;
    assert_eq!(both.urls(), vec![a.clone(), b.clone()]);

    // Open sessions are balanced over the two replicas.
    let mut ids = Vec::new();
    for i in 0..6u32 {
        ids.push(both.open(&[1 + i, 2, 3]).await.unwrap());
    }
    assert_eq!((sa.len(), sb.len()), (3, 3));
    for id in ids {
        both.close(id).await.unwrap();
    }
    assert_eq!((sa.len(), sb.len()), (0, 0));
    assert!(matches!(
        both.close(12345).await,
        Err(DecodingError::UnknownSession(12345))
    ));

    // Concurrent requests through the replicas give what one replica alone gives.
    let single = replicas(&a).await;
    let prompts: Vec<Vec<u32>> = (0..6u32).map(|i| vec![i + 3, 7, i * 5 % 90 + 1]).collect();
    let spread = join_all(prompts.iter().map(|p| greedy(&both, p))).await;
    for (p, got) in prompts.iter().zip(spread) {
        assert_eq!(got, greedy(&single, p).await, "prompt {p:?}");
    }

    // A draining replica takes no new session; the other one takes them all.
    sa.drain();
    for i in 0..4u32 {
        both.open(&[i + 1, 9]).await.unwrap();
    }
    assert_eq!((sa.len(), sb.len()), (0, 4));
    sb.drain();
    assert!(matches!(
        both.open(&[1, 2]).await,
        Err(DecodingError::Unavailable(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_names_resolve_to_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Architecture::Llama);
    let w = random_weights(&cfg, 6, false, false).unwrap();
    let path = dir.path().join("t.gguf");
    write_gguf(&path, &cfg, &w, GgmlDType::F32).unwrap();
    let (a, _) = target(&path).await;
    let port = a.rsplit(':').next().unwrap();
    // "localhost" may also give ::1, where nothing listens: that address is left out.
    let r = replicas(&format!("http://localhost:{port}")).await;
    assert!(r.urls().contains(&a), "{:?}", r.urls());
    let addrs = orchestrator::replicas::resolve(&format!("http://localhost:{port},{a}"))
        .await
        .unwrap();
    assert!(addrs.contains(&a));
    assert!(
        orchestrator::replicas::resolve("http://no-such-host.invalid:1")
            .await
            .is_err()
    );
    assert!(
        Replicas::<RemoteDraft>::connect(
            "http://127.0.0.1:1",
            |u| async move { RemoteDraft::connect(&u).await },
            <RemoteDraft as DraftBackend>::info,
            Duration::ZERO,
        )
        .await
        .is_err(),
        "nothing answers on port 1"
    );
}

/// The periodic re-resolution: a pod that appears behind the name is connected and takes
/// new sessions; one that disappears takes no more, while a session already on it goes on
/// there; one serving another model is left out. The names resolve through the test's own
/// resolver, which it changes as DNS would when pods come and go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_follow_what_the_names_resolve_to() {
    use orchestrator::replicas::Resolver;
    use std::sync::Mutex;
    let dir = tempfile::tempdir().unwrap();
    let model = |arch, name: &str| {
        let cfg = tiny_config(arch);
        let path = dir.path().join(name);
        let w = random_weights(&cfg, 5, false, false).unwrap();
        write_gguf(&path, &cfg, &w, GgmlDType::F32).unwrap();
        path
    };
    let (same, other) = (
        model(Architecture::Llama, "t.gguf"),
        model(Architecture::Qwen2, "o.gguf"),
    );
    let (a, sa) = target(&same).await;
    let (b, sb) = target(&same).await;
    let (c, sc) = target(&other).await;
    let names = Arc::new(Mutex::new(vec![a.clone()]));
    let now = names.clone();
    let resolver: Resolver = Arc::new(move |_spec| {
        let urls = now.lock().unwrap().clone();
        Box::pin(async move { Ok(urls) })
    });
    let r = Replicas::connect_resolving(
        "http://target-headless:50051",
        resolver,
        |u| async move { RemoteTarget::connect(&u).await },
        <RemoteTarget as TargetBackend>::info,
        Duration::from_millis(20),
    )
    .await
    .unwrap();
    let on_a = r.open(&[1, 2, 3]).await.unwrap();
    assert_eq!(sa.len(), 1);

    // Polls (the refresh runs every 20 ms; the deadline only bounds a broken one).
    let until = |want: Vec<String>| {
        let r = &r;
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while r.urls() != want {
                assert!(
                    std::time::Instant::now() < deadline,
                    "replicas {:?}, want {want:?}",
                    r.urls()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    // A pod appears: it is connected and, having fewer sessions, takes the next ones.
    *names.lock().unwrap() = vec![a.clone(), b.clone()];
    until(vec![a.clone(), b.clone()]).await;
    let on_b = r.open(&[4, 5]).await.unwrap();
    assert_eq!((sa.len(), sb.len()), (1, 1));

    // The first pod goes, and one serving another model appears: new sessions all go to
    // the one left, the other model's pod is never used, and the session on the pod that
    // went is still served there.
    *names.lock().unwrap() = vec![b.clone(), c.clone()];
    until(vec![b.clone()]).await;
    let mut more = Vec::new();
    for i in 0..3u32 {
        more.push(r.open(&[i + 6, 7]).await.unwrap());
    }
    assert_eq!((sa.len(), sb.len(), sc.len()), (1, 4, 0));
    r.close(on_a).await.unwrap();
    assert_eq!(
        sa.len(),
        0,
        "the call went to the pod that holds the session"
    );
    for id in more.into_iter().chain([on_b]) {
        r.close(id).await.unwrap();
    }
    assert_eq!(sb.len(), 0);

    // A name that resolves to nothing keeps the replicas there are.
    names.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(r.urls(), vec![b.clone()]);
}

/// A replica without the memory to grow a session (its KV budget, 1.5 sessions at the
/// first cache capacity, is full once the cache would double) hands it over: the session
/// is opened on the other replica with every token it held and goes on there, with the
/// output one replica alone gives; the full replica gets its memory back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_moves_when_its_replica_has_no_memory_to_grow_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Architecture::Llama);
    let w = random_weights(&cfg, 5, false, false).unwrap();
    let path = dir.path().join("t.gguf");
    write_gguf(&path, &cfg, &w, GgmlDType::F32).unwrap();
    let one = 2 * cfg.num_layers * cfg.num_kv_heads * 256 * cfg.head_dim * 4;
    let small = TargetConfig {
        kv_budget_bytes: one * 3 / 2,
        ..TargetConfig::default()
    };
    let (a, sa) = target_with(&path, small).await;
    let (b, sb) = target(&path).await;
    let both = replicas(&format!("{a}, {b}")).await;
    let alone = replicas(&b).await;
    // 249 cached prompt tokens: the 8th token after them takes the cache past 256.
    let prompt: Vec<u32> = (0..250).map(|i| (i * 7 + 3) % 64).collect();
    let before = telemetry::metrics().session_failovers.get();
    let got = greedy_n(&both, &prompt, 16).await;
    assert_eq!(got, greedy_n(&alone, &prompt, 16).await);
    // At least this one (the counter is the process's: a test beside may move one too).
    assert!(telemetry::metrics().session_failovers.get() > before);
    assert_eq!(
        (sa.len(), sa.bytes()),
        (0, 0),
        "the full replica got its memory back"
    );
    assert_eq!(sb.len(), 0);
}

/// Draft replicas fail over the same way: a draft replica without the memory to grow a
/// session hands it to the other replica, opened on every token it held, and the draft
/// call returns what a session on that replica alone drafts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draft_session_moves_when_its_replica_has_no_memory_to_grow_it() {
    use decoding::{DraftLength, DraftRequest};
    use draft_service::{DraftConfig, DraftGrpc};
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Architecture::Llama);
    let w = random_weights(&cfg, 5, false, false).unwrap();
    let path = dir.path().join("d.gguf");
    write_gguf(&path, &cfg, &w, GgmlDType::F32).unwrap();
    let one = 2 * cfg.num_layers * cfg.num_kv_heads * 256 * cfg.head_dim * 4;
    let draft = |budget: usize| {
        let path = path.clone();
        async move {
            let m =
                Arc::new(engine::load_model(&path, &LoadOptions::default(), &Device::Cpu).unwrap());
            let config = DraftConfig {
                kv_budget_bytes: budget,
                ..DraftConfig::default()
            };
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", l.local_addr().unwrap());
            tokio::spawn(draft_service::serve(
                DraftGrpc::new(m, config),
                l,
                std::future::pending(),
            ));
            url
        }
    };
    let (a, b) = (draft(one * 3 / 2).await, draft(one * 4).await);
    let connect = |spec: String| async move {
        Replicas::connect(
            &spec,
            |u| async move { RemoteDraft::connect(&u).await },
            <RemoteDraft as DraftBackend>::info,
            Duration::ZERO,
        )
        .await
        .unwrap()
    };
    let (both, alone) = (connect(format!("{a}, {b}")).await, connect(b.clone()).await);
    // 250 tokens fill the first 256 entries; drafting 10 more would double the cache.
    let prompt: Vec<u32> = (0..250).map(|i| (i * 7 + 3) % 64).collect();
    let request = || DraftRequest {
        new_committed: Vec::new(),
        start: None,
        length: DraftLength::AtLeast(10),
        lookahead: None,
        pool_delta: Vec::new(),
        eos: Vec::new(),
    };
    let before = telemetry::metrics().session_failovers.get();
    let id = both.open(&prompt).await.unwrap();
    let (moved, _) = both.draft(id, request()).await.unwrap();
    // At least this one (the counter is the process's: a test beside may move one too).
    assert!(telemetry::metrics().session_failovers.get() > before);
    let reference = alone.open(&prompt).await.unwrap();
    let (want, _) = alone.draft(reference, request()).await.unwrap();
    assert_eq!(moved.tokens, want.tokens);
    assert!(moved.tokens.len() >= 10);
    both.close(id).await.unwrap();
    alone.close(reference).await.unwrap();
}
