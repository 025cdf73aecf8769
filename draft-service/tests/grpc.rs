//! The draft service over real gRPC: its drafts are the draft model's own greedy
//! continuation, with lookahead on or off, across calls that commit part of each draft.

use candle_core::Device;
use candle_core::quantized::GgmlDType;
use draft_service::{DraftConfig, DraftGrpc, serve};
use engine::testing::{random_weights, tiny_config, write_gguf};
use engine::{Architecture, LanguageModel, LoadOptions, OutputSpec, SeqInput};
use proto::common::v1::{Lookahead, Phrase};
use proto::draft::v1 as pb;
use proto::draft::v1::draft_service_client::DraftServiceClient;
use std::sync::Arc;
use std::time::Duration;
use tonic::Code;
use tonic::transport::Channel;

type Client = DraftServiceClient<Channel>;

async fn start<M: LanguageModel + 'static>(model: Arc<M>, config: DraftConfig) -> Client {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(
        DraftGrpc::new(model, config),
        listener,
        std::future::pending(),
    ));
    DraftServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

fn tiny_model() -> (tempfile::TempDir, Arc<engine::Transformer>) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Architecture::Llama);
    let path = dir.path().join("draft.gguf");
    write_gguf(
        &path,
        &cfg,
        &random_weights(&cfg, 5, false, false).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let m = engine::load_model(&path, &LoadOptions::default(), &Device::Cpu).unwrap();
    (dir, Arc::new(m))
}

/// The model's greedy continuation, one token per forward.
fn greedy<M: LanguageModel>(model: &M, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut cache = model.new_cache();
    let mut seq = prompt.to_vec();
    let pos: Vec<u32> = (0..prompt.len() as u32).collect();
    let mut next = model
        .forward(
            &mut cache,
            SeqInput::chain(prompt, &pos, OutputSpec::last(prompt.len())),
        )
        .unwrap()
        .argmax[0];
    for _ in 0..n {
        seq.push(next);
        let p = [seq.len() as u32 - 1];
        next = model
            .forward(&mut cache, SeqInput::chain(&[next], &p, OutputSpec::all()))
            .unwrap()
            .argmax[0];
    }
    seq[prompt.len()..].to_vec()
}

async fn drafts_follow_greedy(lookahead: Option<Lookahead>) -> (u32, usize) {
    let (_dir, model) = tiny_model();
    let mut c = start(model.clone(), DraftConfig::default()).await;
    // A repetitive prompt so the lookahead window finds phrases worth proposing.
    let prompt: Vec<u32> = (0..24).map(|i| [7u32, 21, 33, 40][i % 4]).collect();
    let want = greedy(&*model, &prompt, 60);
    let id = c
        .open_session(pb::OpenSessionRequest {
            tokens: prompt.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .session_id;
    let (mut committed, mut forwards, mut tokens) = (0usize, 0u32, 0usize);
    let mut new_committed = Vec::new();
    while committed < 40 {
        let r = c
            .draft(pb::DraftRequest {
                session_id: id,
                new_committed: new_committed.clone(),
                gamma: 6,
                lookahead,
                pool_delta: Vec::new(),
                eos: Vec::new(),
                stop_below: 0.0,
                start: None,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.tokens.len() >= 6, "at least gamma tokens");
        assert_eq!(r.tokens[..], want[committed..committed + r.tokens.len()]);
        forwards += r.forwards;
        tokens += r.tokens.len();
        // Commit part of the draft plus one token of our own (a correction).
        let keep = 3.min(r.tokens.len());
        new_committed = want[committed..committed + keep + 1].to_vec();
        committed += keep + 1;
    }
    (forwards, tokens)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drafts_equal_the_models_greedy_continuation() {
    let (f_off, _) = drafts_follow_greedy(None).await;
    let la = Lookahead {
        level: 4,
        window: 4,
        guess: 4,
    };
    let (f_on, _) = drafts_follow_greedy(Some(la)).await;
    assert!(f_on > 0 && f_off > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_draft_requests_get_statuses_and_idle_sessions_expire() {
    let (_dir, model) = tiny_model();
    // Idle time is read from a clock the test moves, so however slowly the calls below run
    // on a loaded machine, the session expires when the test says and not before.
    let clock = serving::Clock::manual();
    let ttl = Duration::from_millis(100);
    let config = DraftConfig {
        session_ttl: ttl,
        clock: clock.clone(),
        ..DraftConfig::default()
    };
    let mut c = start(model, config).await;
    let id = c
        .open_session(pb::OpenSessionRequest {
            tokens: vec![1, 2, 3],
        })
        .await
        .unwrap()
        .into_inner()
        .session_id;
    let base = pb::DraftRequest {
        session_id: id,
        new_committed: vec![],
        gamma: 4,
        lookahead: None,
        pool_delta: vec![],
        eos: vec![],
        stop_below: 0.0,
        start: None,
    };
    let cases = [
        (
            "gamma 0",
            pb::DraftRequest {
                gamma: 0,
                ..base.clone()
            },
            Code::InvalidArgument,
            "gamma",
        ),
        (
            "gamma huge",
            pb::DraftRequest {
                gamma: 1000,
                ..base.clone()
            },
            Code::InvalidArgument,
            "gamma",
        ),
        (
            "stop_below 1",
            pb::DraftRequest {
                stop_below: 1.0,
                ..base.clone()
            },
            Code::InvalidArgument,
            "stop_below",
        ),
        (
            "stop_below NaN",
            pb::DraftRequest {
                stop_below: f32::NAN,
                ..base.clone()
            },
            Code::InvalidArgument,
            "stop_below",
        ),
        (
            "bad lookahead",
            pb::DraftRequest {
                lookahead: Some(Lookahead {
                    level: 1,
                    window: 2,
                    guess: 2,
                }),
                ..base.clone()
            },
            Code::InvalidArgument,
            "lookahead",
        ),
        (
            "token outside vocab",
            pb::DraftRequest {
                new_committed: vec![500],
                ..base.clone()
            },
            Code::InvalidArgument,
            "vocabulary",
        ),
        (
            "start past the tokens the session holds",
            pb::DraftRequest {
                start: Some(100),
                ..base.clone()
            },
            Code::InvalidArgument,
            "start",
        ),
        (
            "start taking back the session's first token",
            pb::DraftRequest {
                start: Some(0),
                ..base.clone()
            },
            Code::InvalidArgument,
            "start",
        ),
        (
            "unknown session",
            pb::DraftRequest {
                session_id: id + 77,
                ..base.clone()
            },
            Code::NotFound,
            "session_id",
        ),
    ];
    for (what, r, code, needle) in cases {
        let s = c.draft(r).await.expect_err(what);
        assert_eq!(s.code(), code, "{what}: {}", s.message());
        assert!(s.message().contains(needle), "{what}: {}", s.message());
    }
    // A pool delta with phrases of any length is accepted and counted.
    let delta = pb::DraftRequest {
        pool_delta: vec![Phrase {
            key: 3,
            tokens: vec![4, 5, 6],
        }],
        lookahead: Some(Lookahead {
            level: 4,
            window: 2,
            guess: 2,
        }),
        ..base.clone()
    };
    c.draft(delta).await.unwrap();
    let info = c
        .info(pb::InfoRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(info.pool_phrases >= 1);
    // Idle for less than the TTL: still there (and the call resets its idle time).
    clock.advance(ttl / 2);
    tokio::time::sleep(ttl).await;
    c.draft(base.clone()).await.expect("idle for half the TTL");
    // Idle for longer: evicted by the evictor's next pass (every quarter TTL of real time).
    clock.advance(ttl * 2);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let info = c.info(pb::InfoRequest::default()).await.unwrap();
        if info.into_inner().sessions == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the idle session was never evicted"
        );
        tokio::time::sleep(ttl / 4).await;
    }
    let s = c.draft(base).await.expect_err("expired");
    assert_eq!(s.code(), Code::NotFound, "{}", s.message());
}

/// The KV budget holds while draft sessions grow: a draft that would take a session's
/// cache past its capacity, and the sessions past the budget, is refused with
/// RESOURCE_EXHAUSTED (the orchestrator goes on target-only); a session within its
/// memory drafts as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_budget_holds_while_draft_sessions_grow() {
    let (_dir, model) = tiny_model();
    let cfg = tiny_config(Architecture::Llama);
    // One session's cache at its first capacity (256 entries, f32).
    let one = 2 * cfg.num_layers * cfg.num_kv_heads * 256 * cfg.head_dim * 4;
    let config = DraftConfig {
        kv_budget_bytes: one * 5 / 2,
        ..DraftConfig::default()
    };
    let mut c = start(model.clone(), config).await;
    let mut open = async |tokens: Vec<u32>| {
        c.open_session(pb::OpenSessionRequest { tokens })
            .await
            .unwrap()
            .into_inner()
            .session_id
    };
    let long: Vec<u32> = (0..250).map(|i| (i * 7 + 3) % 64).collect();
    let a = open(long).await;
    let b = open(vec![1, 2, 3]).await;
    let draft = |session_id, gamma| pb::DraftRequest {
        session_id,
        new_committed: Vec::new(),
        gamma,
        lookahead: None,
        pool_delta: Vec::new(),
        eos: Vec::new(),
        stop_below: 0.0,
        start: None,
    };
    // A session's cache is filled on its first draft: B's takes one session's memory.
    let r = c.draft(draft(b, 4)).await.unwrap().into_inner();
    let want = greedy(&*model, &[1, 2, 3], 8);
    assert_eq!(r.tokens, want[..4]);
    // A's takes another; its tenth token after 250 would take it past 256 entries, and
    // the cache would double past the budget of two and a half.
    let e = c.draft(draft(a, 10)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("more bytes for its draft"), "{e:?}");
    // B within its memory drafts on.
    let mut next = draft(b, 4);
    next.new_committed = want[..4].to_vec();
    let r = c.draft(next).await.unwrap().into_inner();
    assert_eq!(r.tokens, want[4..]);
}
