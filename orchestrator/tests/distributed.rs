//! Orchestrator, draft service and target service on loopback gRPC, with tiny random
//! models: every strategy's output equals plain greedy (or plain sampling with the same
//! seed), streaming equals unary, bad requests get INVALID_ARGUMENT, and a lost draft
//! service degrades to target-only decoding that is still exact.

mod common;

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::Value;
use decoding::{DecodeParams, LookaheadParams, PhrasePool, PoolConfig, ProfileOptions, Strategy};
use draft_service::{DraftConfig, DraftGrpc};
use engine::Architecture;
use engine::testing::{random_weights, tiny_config, write_gguf, write_gguf_with_metadata};
use orchestrator::api::GenerateService;
use orchestrator::chat::ChatTemplate;
use orchestrator::pipeline::Pipeline;
use orchestrator::remote::{CallLimits, RemoteDraft, RemoteTarget};
use proto::common::v1::{Lookahead, Sampling, TokenLogprobs};
use proto::v1 as pb;
use proto::v1::ouroboros_client::OuroborosClient;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use target_service::{TargetConfig, TargetGrpc};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::Code;
use tonic::transport::Channel;

const VOCAB: usize = 96;

/// The target's chat template, carried in its GGUF as a model's would be: the bos and eos
/// tokens around a marker word per role, and only the roles it knows (as many instruct
/// templates do, it raises on others).
const TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}\
    {% if m.role not in ['system', 'user', 'assistant'] %}\
    {{ raise_exception('Only system, user and assistant roles are supported') }}{% endif %}\
    {{ ' ' + {'system': 'w5', 'user': 'w6', 'assistant': 'w7'}[m.role] + ' ' + m.content }}\
    {% endfor %}{% if add_generation_prompt %} {{ eos_token }}{% endif %}";

fn template_metadata() -> Vec<(String, Value)> {
    let words = (0..VOCAB).map(|i| Value::String(format!("w{i}"))).collect();
    vec![
        (
            "tokenizer.chat_template".into(),
            Value::String(TEMPLATE.into()),
        ),
        ("tokenizer.ggml.tokens".into(), Value::Array(words)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
    ]
}

async fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

struct Cluster {
    _dir: tempfile::TempDir,
    client: OuroborosClient<Channel>,
    stop_draft: Option<oneshot::Sender<()>>,
    /// The draft service's task: ends once it has stopped serving.
    draft_served: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

async fn cluster() -> Cluster {
    cluster_with(false).await
}

/// `overlap`: the server's default for overlapped drafting.
async fn cluster_with(overlap: bool) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Architecture::Qwen2);
    let w = random_weights(&cfg, 17, true, false).unwrap();
    let (tp, dp) = (dir.path().join("t.gguf"), dir.path().join("d.gguf"));
    write_gguf_with_metadata(&tp, &cfg, &w, GgmlDType::F32, template_metadata()).unwrap();
    // The draft: the same weights in 8 bits, so it mostly agrees and sometimes does not.
    write_gguf(&dp, &cfg, &w, GgmlDType::Q8_0).unwrap();
    let (tl, ta) = listener().await;
    let target_config = TargetConfig {
        chat_template: engine::chat_template::of_model(&tp).unwrap(),
        ..TargetConfig::default()
    };
    tokio::spawn(target_service::serve(
        TargetGrpc::new(common::load(&tp), target_config),
        tl,
        std::future::pending(),
    ));
    let (dl, da) = listener().await;
    let (stop_draft, stopped) = oneshot::channel::<()>();
    let draft_served = tokio::spawn(draft_service::serve(
        DraftGrpc::new(common::load(&dp), DraftConfig::default()),
        dl,
        async {
            let _ = stopped.await;
        },
    ));
    // The lookahead baseline runs the target model in a draft service.
    let (ll, la) = listener().await;
    tokio::spawn(draft_service::serve(
        DraftGrpc::new(common::load(&tp), DraftConfig::default()),
        ll,
        std::future::pending(),
    ));
    let url = |a: SocketAddr| format!("http://{a}");
    let lookahead = LookaheadParams {
        level: 4,
        window: 3,
        guess: 3,
    };
    let pool = |_| {
        Arc::new(PhrasePool::new(PoolConfig {
            phrase_len: lookahead.phrase_len(),
            ..PoolConfig::default()
        }))
    };
    let target = RemoteTarget::connect(&url(ta)).await.unwrap();
    // Chat is rendered with the template the target's Info reported.
    let chat = ChatTemplate::new(
        target
            .chat_template()
            .cloned()
            .expect("the target reports its template"),
        "the target service",
    )
    .unwrap();
    let pipeline = Pipeline {
        target: Arc::new(target),
        draft: Some(Arc::new(RemoteDraft::connect(&url(da)).await.unwrap())),
        lookahead: Some(Arc::new(RemoteDraft::connect(&url(la)).await.unwrap())),
        pool: pool(()),
        lookahead_pool: pool(()),
        trie: Default::default(),
        tuner: Default::default(),
        blocking: false,
    };
    // The auto strategy's cost profile, measured over gRPC like a deployment's.
    let quick = ProfileOptions {
        verify_sizes: vec![1, 2, 4, 8],
        draft_tokens: vec![1, 2, 4],
        reps: 1,
        prompt_len: 16,
        ..ProfileOptions::default()
    };
    let profile = pipeline
        .measure_costs_here(&quick, Default::default())
        .await
        .unwrap();
    assert!(profile.draft().is_some());
    let defaults = DecodeParams {
        strategy: Strategy::Ouroboros,
        max_new_tokens: 32,
        gamma: 4,
        lookahead,
        topk: 2,
        overlap,
        ..DecodeParams::default()
    };
    let service = GenerateService::new(
        Arc::new(pipeline),
        Arc::new(common::word_tokenizer(VOCAB)),
        Arc::new(chat),
        vec![],
        defaults,
    );
    let (ol, oa) = listener().await;
    tokio::spawn(orchestrator::serve(service, ol, std::future::pending()));
    let client = OuroborosClient::connect(url(oa)).await.unwrap();
    Cluster {
        _dir: dir,
        client,
        stop_draft: Some(stop_draft),
        draft_served: Some(draft_served),
    }
}

fn request(
    prompt: &[u32],
    strategy: pb::Strategy,
    sampling: Option<Sampling>,
) -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(pb::generate_request::Input::TokenIds(pb::TokenIds {
            ids: prompt.to_vec(),
        })),
        max_new_tokens: Some(32),
        stop: vec![],
        sampling,
        strategy: strategy as i32,
        params: None,
        logprobs: None,
    }
}

async fn generate(
    c: &mut OuroborosClient<Channel>,
    r: pb::GenerateRequest,
) -> pb::GenerateResponse {
    c.generate(r).await.unwrap().into_inner()
}

fn prompts() -> Vec<Vec<u32>> {
    vec![
        (0..12).map(|i| [5u32, 9, 14, 22][i % 4]).collect(),
        (0..7).map(|i| (i * 13 + 1) % VOCAB as u32).collect(),
        vec![3, 3, 3, 3, 8, 8, 8, 8, 3, 3],
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_strategy_equals_plain_decoding_over_grpc() {
    let mut cl = cluster().await;
    let c = &mut cl.client;
    use pb::Strategy as S;
    let mut accepted = HashMap::new();
    let mut trie_accepted = 0;
    for prompt in prompts() {
        let plain = generate(c, request(&prompt, S::Greedy, None)).await;
        assert_eq!(plain.token_ids.len(), 32);
        assert_eq!(plain.finish_reason, pb::FinishReason::Length as i32);
        // twice each, so the second run meets a warm pool
        for s in [
            S::Speculative,
            S::Lookahead,
            S::Trie,
            S::Ouroboros,
            S::Auto,
            S::Ouroboros,
            S::Trie,
        ] {
            let g = generate(c, request(&prompt, s, None)).await;
            assert_eq!(g.token_ids, plain.token_ids, "{s:?} on {prompt:?}");
            assert_eq!(g.text, plain.text);
            let stats = g.stats.unwrap();
            assert!(stats.draft_fallback.is_empty(), "{}", stats.draft_fallback);
            assert!(stats.mean_accepted_length >= 1.0);
            *accepted.entry(stats.strategy).or_insert(0) += stats.accepted_tokens;
            trie_accepted += stats.trie_accepted;
        }
        let sampling = Sampling {
            temperature: 0.9,
            top_p: 0.95,
            top_k: 0,
            seed: Some(42),
        };
        let plain = generate(c, request(&prompt, S::Greedy, Some(sampling))).await;
        for s in [S::Speculative, S::Trie, S::Ouroboros, S::Auto] {
            let g = generate(c, request(&prompt, s, Some(sampling))).await;
            assert_eq!(g.token_ids, plain.token_ids, "sampling {s:?}");
        }
        // Sampling with a stop string (two words of the sampled answer, so it spans a
        // token boundary): every strategy stops at the same place, the sampled tokens up to
        // there unchanged.
        let words: Vec<&str> = plain.text.split(' ').collect();
        let stop = format!(" {} {}", words[3], words[4]);
        let cut = plain.text.find(&stop).unwrap();
        for s in [S::Greedy, S::Speculative, S::Trie, S::Ouroboros, S::Auto] {
            let mut r = request(&prompt, s, Some(sampling));
            r.stop = vec![stop.clone()];
            let g = generate(c, r).await;
            assert_eq!(g.text, plain.text[..cut], "sampling {s:?}, stop {stop:?}");
            assert_eq!(g.finish_reason, pb::FinishReason::Stop as i32, "{s:?}");
            assert_eq!(
                g.token_ids[..],
                plain.token_ids[..g.token_ids.len()],
                "{s:?}"
            );
        }
        // Log-probabilities over the wire: the target service's rows, the same under
        // every strategy, sampled or not.
        let with_logprobs = |s, sampling| pb::GenerateRequest {
            logprobs: Some(3),
            ..request(&prompt, s, sampling)
        };
        let plain = generate(c, with_logprobs(S::Greedy, None)).await;
        assert_eq!(plain.logprobs.len(), plain.token_ids.len());
        for (l, &t) in plain.logprobs.iter().zip(&plain.token_ids) {
            assert_eq!((l.token, l.top_tokens.len()), (t, 3));
            assert_eq!((l.top_tokens[0], l.top_logprobs[0]), (t, l.logprob));
        }
        // A tree's rows and a one-token step's agree to float rounding, not bit for bit.
        let same = |a: &[TokenLogprobs], b: &[TokenLogprobs], what: &str| {
            assert_eq!(a.len(), b.len(), "{what}");
            for (x, y) in a.iter().zip(b) {
                assert_eq!((x.token, &x.top_tokens), (y.token, &y.top_tokens), "{what}");
                let close = |p: f32, q: f32| (p - q).abs() <= 1e-5;
                assert!(close(x.logprob, y.logprob), "{what}: {x:?} against {y:?}");
                assert!(
                    x.top_logprobs
                        .iter()
                        .zip(&y.top_logprobs)
                        .all(|(&p, &q)| close(p, q))
                );
            }
        };
        for s in [S::Speculative, S::Trie, S::Ouroboros, S::Auto] {
            let g = generate(c, with_logprobs(s, None)).await;
            same(&g.logprobs, &plain.logprobs, &format!("{s:?}"));
        }
        let sampled = generate(c, with_logprobs(S::Greedy, Some(sampling))).await;
        let drafted = generate(c, with_logprobs(S::Ouroboros, Some(sampling))).await;
        same(&drafted.logprobs, &sampled.logprobs, "sampled");
        let lookahead = c
            .generate(with_logprobs(S::Lookahead, None))
            .await
            .unwrap_err();
        assert_eq!(lookahead.code(), Code::InvalidArgument);
        assert!(lookahead.message().starts_with("logprobs"), "{lookahead:?}");
    }
    // Auto requests ran as auto (the profile was there), and the runs really speculated:
    // drafts were accepted, not only corrected.
    assert!(accepted.contains_key("auto"), "{accepted:?}");
    for s in ["speculative", "ouroboros"] {
        assert!(accepted[s] > 0, "{accepted:?}");
    }
    // The second trie run of a prompt meets the first one's output in the shared trie.
    assert!(trie_accepted > 0);
    // The metrics saw the same requests (services and orchestrator share this process).
    let m = telemetry::metrics();
    let page = m.render();
    for s in ["speculative", "ouroboros"] {
        let accepted = m.accepted_tokens.with_label_values(&[s]).get();
        assert!(accepted > 0, "no accepted tokens counted for {s}:\n{page}");
        assert!(m.num_drafts.with_label_values(&[s]).get() > 0);
        assert!(m.ttft.with_label_values(&[s]).get_sample_count() > 0);
    }
    assert!(
        m.accepted_per_pos
            .with_label_values(&["ouroboros", "0"])
            .get()
            > 0
    );
    assert!(m.trie_hits.with_label_values(&["trie"]).get() > 0);
    assert!(page.contains("ouro_spec_decode_num_accepted_tokens_total{strategy=\"ouroboros\"}"));
    assert!(page.contains("ouro_sessions{service=\"target\"}"));
    assert!(m.batch_trees.get_sample_count() > 0);
    eprintln!("accepted draft tokens by strategy: {accepted:?}, trie tokens {trie_accepted}");
}

/// Overlapped drafting over gRPC (the draft service drafts the next round while the target
/// service verifies this one): speculative and Ouroboros, greedy and sampled, equal plain
/// decoding; the early work was used in some rounds and taken back in others, and some
/// early calls were stopped at the verdict (cancelled mid-call over gRPC).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapped_drafting_over_grpc_equals_plain_decoding() {
    let mut cl = cluster_with(true).await;
    let c = &mut cl.client;
    use pb::Strategy as S;
    let sampled = Sampling {
        temperature: 0.9,
        top_p: 0.95,
        top_k: 0,
        seed: Some(7),
    };
    let (mut used, mut discarded, mut cancelled) = (0, 0, 0);
    for prompt in prompts() {
        for sampling in [None, Some(sampled)] {
            let plain = generate(c, request(&prompt, S::Greedy, sampling)).await;
            for s in [S::Speculative, S::Ouroboros, S::Speculative, S::Ouroboros] {
                let g = generate(c, request(&prompt, s, sampling)).await;
                assert_eq!(
                    g.token_ids, plain.token_ids,
                    "{s:?} {sampling:?} on {prompt:?}"
                );
                let stats = g.stats.unwrap();
                assert!(stats.draft_fallback.is_empty(), "{}", stats.draft_fallback);
                used += stats.overlap_used;
                discarded += stats.overlap_discarded;
                cancelled += stats.overlap_cancelled;
            }
        }
    }
    eprintln!(
        "overlapped draft calls: {used} used, {discarded} taken back ({cancelled} cancelled)"
    );
    assert!(
        used > 0 && discarded > 0 && cancelled > 0,
        "used {used}, taken back {discarded}, cancelled {cancelled}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chat_is_rendered_with_the_template_the_target_reports() {
    let mut cl = cluster().await;
    let c = &mut cl.client;
    let chat = |strategy: pb::Strategy| {
        let mut r = request(&[], strategy, None);
        let m = |role: &str, content: &str| pb::ChatMessage {
            role: role.into(),
            content: content.into(),
        };
        r.input = Some(pb::generate_request::Input::Chat(pb::ChatMessages {
            messages: vec![m("system", "w9"), m("user", "w10 w11")],
        }));
        r
    };
    // bos, system marker, content, user marker, content, eos (the generation prompt).
    let rendered = [1, 5, 9, 6, 10, 11, 2];
    let plain = generate(c, request(&rendered, pb::Strategy::Greedy, None)).await;
    for s in [pb::Strategy::Greedy, pb::Strategy::Ouroboros] {
        let g = generate(c, chat(s)).await;
        assert_eq!(g.usage.unwrap().prompt_tokens, rendered.len() as u32);
        assert_eq!(g.token_ids, plain.token_ids, "{s:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stream_equals_unary_and_stop_strings_cut() {
    let mut cl = cluster().await;
    let c = &mut cl.client;
    let prompt = &prompts()[0];
    let whole = generate(c, request(prompt, pb::Strategy::Ouroboros, None)).await;
    let mut stream = c
        .generate_stream(request(prompt, pb::Strategy::Ouroboros, None))
        .await
        .unwrap()
        .into_inner();
    let (mut text, mut ids, mut last) = (String::new(), Vec::new(), None);
    let mut sources = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        text.push_str(&m.text);
        ids.extend(m.token_ids.iter().copied());
        // A source per token, one source per message.
        assert_eq!(m.token_sources.len(), m.token_ids.len());
        assert!(m.token_sources.windows(2).all(|w| w[0] == w[1]), "{m:?}");
        sources.extend(m.token_sources.iter().copied());
        if m.finish_reason != 0 {
            last = Some(m);
        }
    }
    assert_eq!(ids, whole.token_ids);
    assert_eq!(text, whole.text);
    // Which guesses hit depends on what the pool learnt meanwhile; that some did not
    // come from the target alone does not.
    let target = pb::TokenSource::Target as i32;
    assert_eq!(whole.token_sources.len(), whole.token_ids.len());
    assert!(whole.token_sources.iter().any(|&s| s != target));
    assert!(sources.iter().any(|&s| s != target), "{sources:?}");
    assert!(sources.iter().all(|&s| s != 0), "unspecified source");
    let last = last.expect("a final message");
    assert_eq!(last.usage.unwrap().completion_tokens, 32);
    assert!(last.stats.unwrap().target_forwards > 0);
    // Stop at the text of the 5th generated token: the answer ends right before it.
    let words: Vec<&str> = whole.text.split(' ').collect();
    let stop = format!(" {}", words[4]);
    let cut = whole.text.find(&stop).unwrap();
    let mut r = request(prompt, pb::Strategy::Ouroboros, None);
    r.stop = vec![stop];
    let g = generate(c, r).await;
    assert_eq!(g.finish_reason, pb::FinishReason::Stop as i32);
    assert_eq!(g.text, whole.text[..cut]);
    assert_eq!(g.token_ids[..], whole.token_ids[..g.token_ids.len()]);
    assert_eq!(g.token_sources.len(), g.token_ids.len());

    // Stop strings that span token boundaries, streamed: two whole tokens' text, and one
    // that starts inside a token and ends inside the next. The stream must hold back text
    // that may begin a stop string, so what it sent adds up to the cut answer exactly.
    let tail = |w: &str| w[w.len().saturating_sub(2)..].to_string();
    for stop in [
        format!(" {} {}", words[4], words[5]),
        format!("{} {}", tail(words[6]), &words[7][..1]),
    ] {
        let cut = whole
            .text
            .find(&stop)
            .expect("the stop string is in the answer");
        let mut r = request(prompt, pb::Strategy::Ouroboros, None);
        r.stop = vec![stop.clone()];
        let mut stream = c.generate_stream(r).await.unwrap().into_inner();
        let (mut text, mut finish) = (String::new(), 0);
        while let Some(m) = stream.message().await.unwrap() {
            text.push_str(&m.text);
            assert!(
                whole.text[..cut].starts_with(&text),
                "{stop:?}: sent {text:?}, past the cut"
            );
            finish = finish.max(m.finish_reason);
        }
        assert_eq!(text, whole.text[..cut], "{stop:?}");
        assert_eq!(finish, pb::FinishReason::Stop as i32, "{stop:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_get_invalid_argument() {
    let mut cl = cluster().await;
    let c = &mut cl.client;
    let ok = request(&[1, 2, 3], pb::Strategy::Greedy, None);
    let with = |f: &dyn Fn(&mut pb::GenerateRequest)| {
        let mut r = ok.clone();
        f(&mut r);
        r
    };
    let cases: Vec<(&str, pb::GenerateRequest, &str)> = vec![
        ("no input", with(&|r| r.input = None), "input"),
        (
            "empty prompt",
            with(&|r| r.input = Some(pb::generate_request::Input::Prompt(String::new()))),
            "prompt",
        ),
        (
            "empty token ids",
            with(&|r| {
                r.input = Some(pb::generate_request::Input::TokenIds(pb::TokenIds {
                    ids: vec![],
                }))
            }),
            "prompt",
        ),
        (
            "prompt longer than the context",
            with(&|r| {
                r.input = Some(pb::generate_request::Input::TokenIds(pb::TokenIds {
                    ids: vec![1; 600],
                }))
            }),
            "context",
        ),
        (
            "token outside vocab",
            with(&|r| {
                r.input = Some(pb::generate_request::Input::TokenIds(pb::TokenIds {
                    ids: vec![1, 500],
                }))
            }),
            "token_ids",
        ),
        (
            "max_new_tokens 0",
            with(&|r| r.max_new_tokens = Some(0)),
            "max_new_tokens",
        ),
        (
            "max_new_tokens huge",
            with(&|r| r.max_new_tokens = Some(1 << 30)),
            "max_new_tokens",
        ),
        (
            "temperature < 0",
            with(&|r| {
                r.sampling = Some(Sampling {
                    temperature: -0.5,
                    ..Default::default()
                })
            }),
            "temperature",
        ),
        ("unknown strategy", with(&|r| r.strategy = 99), "strategy"),
        (
            "bad lookahead",
            with(&|r| {
                r.strategy = pb::Strategy::Ouroboros as i32;
                r.params = Some(pb::StrategyParams {
                    lookahead: Some(Lookahead {
                        level: 99,
                        window: 1,
                        guess: 1,
                    }),
                    ..Default::default()
                })
            }),
            "level",
        ),
        (
            "trie budget over the cap",
            with(&|r| {
                r.strategy = pb::Strategy::Trie as i32;
                r.params = Some(pb::StrategyParams {
                    trie_budget: Some(1000),
                    ..Default::default()
                })
            }),
            "trie_budget",
        ),
        (
            "draft stop outside [0, 1)",
            with(&|r| {
                r.strategy = pb::Strategy::Speculative as i32;
                r.params = Some(pb::StrategyParams {
                    draft_stop: Some(1.5),
                    ..Default::default()
                })
            }),
            "draft_stop",
        ),
        (
            "bad chat role",
            with(&|r| {
                r.input = Some(pb::generate_request::Input::Chat(pb::ChatMessages {
                    messages: vec![pb::ChatMessage {
                        role: "robot".into(),
                        content: "hi".into(),
                    }],
                }))
            }),
            "roles are supported",
        ),
        (
            "empty chat role",
            with(&|r| {
                r.input = Some(pb::generate_request::Input::Chat(pb::ChatMessages {
                    messages: vec![pb::ChatMessage {
                        role: String::new(),
                        content: "hi".into(),
                    }],
                }))
            }),
            "role",
        ),
        (
            "no chat messages",
            with(&|r| {
                r.input = Some(pb::generate_request::Input::Chat(pb::ChatMessages {
                    messages: vec![],
                }))
            }),
            "messages",
        ),
    ];
    for (what, r, needle) in cases {
        let s = c.generate(r.clone()).await.expect_err(what);
        assert_eq!(s.code(), Code::InvalidArgument, "{what}: {}", s.message());
        assert!(
            s.message().contains(needle),
            "{what}: '{}' should name {needle}",
            s.message()
        );
        let s = c.generate_stream(r).await.expect_err(what);
        assert_eq!(
            s.code(),
            Code::InvalidArgument,
            "stream {what}: {}",
            s.message()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_draft_service_falls_back_to_exact_target_only() {
    let mut cl = cluster().await;
    let prompt = &prompts()[1];
    let plain = generate(&mut cl.client, request(prompt, pb::Strategy::Greedy, None)).await;
    cl.stop_draft.take().unwrap().send(()).unwrap();
    // Gone for sure before the next request, however slow the machine: the service's task
    // has returned.
    let served = cl.draft_served.take().unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(60), served)
        .await
        .expect("the draft service stops")
        .unwrap()
        .unwrap();
    let g = generate(
        &mut cl.client,
        request(prompt, pb::Strategy::Ouroboros, None),
    )
    .await;
    assert_eq!(g.token_ids, plain.token_ids);
    let stats = g.stats.unwrap();
    assert!(
        !stats.draft_fallback.is_empty(),
        "the statistics say the draft was missing"
    );
}

/// Services report a fingerprint of their vocabulary's first entries; the orchestrator's
/// tokenizer must match it, for the target and for the draft, or it refuses to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokenizer_the_services_do_not_share_is_refused() {
    use engine::vocab::Vocabulary;
    use orchestrator::vocabulary::check_service;
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Architecture::Qwen2);
    let w = random_weights(&cfg, 17, true, false).unwrap();
    let (tp, dp) = (dir.path().join("t.gguf"), dir.path().join("d.gguf"));
    write_gguf_with_metadata(&tp, &cfg, &w, GgmlDType::F32, template_metadata()).unwrap();
    // A draft of another family: the same size, one entry spelled differently.
    let mut other = template_metadata();
    let words = (0..VOCAB)
        .map(|i| {
            Value::String(if i == 40 {
                "v40".into()
            } else {
                format!("w{i}")
            })
        })
        .collect();
    other[1] = ("tokenizer.ggml.tokens".into(), Value::Array(words));
    write_gguf_with_metadata(&dp, &cfg, &w, GgmlDType::Q8_0, other).unwrap();
    let vocabulary = |p: &std::path::Path| Vocabulary::of_model(p).unwrap().map(Arc::new);
    let (tl, ta) = listener().await;
    let target_config = TargetConfig {
        vocabulary: vocabulary(&tp),
        ..TargetConfig::default()
    };
    tokio::spawn(target_service::serve(
        TargetGrpc::new(common::load(&tp), target_config),
        tl,
        std::future::pending(),
    ));
    let (dl, da) = listener().await;
    let draft_config = DraftConfig {
        vocabulary: vocabulary(&dp),
        ..DraftConfig::default()
    };
    tokio::spawn(draft_service::serve(
        DraftGrpc::new(common::load(&dp), draft_config),
        dl,
        std::future::pending(),
    ));

    // The target's own words, fewer than its table (a tokenizer smaller than the model).
    let ours = Vocabulary::of_tokenizer(&common::word_tokenizer(64), "w-words");
    let target =
        RemoteTarget::connect_for(&format!("http://{ta}"), ours.len(), &CallLimits::TARGET)
            .await
            .unwrap();
    let info = decoding::TargetBackend::info(&target);
    assert_eq!(info.vocab.map(|v| v.fingerprinted), Some(64));
    check_service(&ours, "target", &info).unwrap();
    // Another family's words of the same size are refused, naming both sides.
    let theirs = Vocabulary::new((0..64).map(|i| format!("x{i}")).collect(), "x-words");
    let refused = check_service(&theirs, "target", &info)
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("x-words") && refused.contains("target service"),
        "{refused}"
    );
    // The draft differs from the target at id 40: refused for the full table, accepted by
    // a tokenizer that stops before it.
    let all = Vocabulary::of_tokenizer(&common::word_tokenizer(VOCAB), "w-words");
    let draft = RemoteDraft::connect_for(&format!("http://{da}"), all.len(), &CallLimits::DRAFT)
        .await
        .unwrap();
    let refused = check_service(&all, "draft", &decoding::DraftBackend::info(&draft))
        .unwrap_err()
        .to_string();
    assert!(refused.contains("draft service"), "{refused}");
    let draft = RemoteDraft::connect_for(&format!("http://{da}"), 40, &CallLimits::DRAFT)
        .await
        .unwrap();
    let first_40 = Vocabulary::of_tokenizer(&common::word_tokenizer(40), "w-words");
    check_service(&first_40, "draft", &decoding::DraftBackend::info(&draft)).unwrap();
}

/// A TCP proxy that can freeze: it stops moving bytes both ways without closing anything,
/// as a SIGSTOPped process or a blackholed node looks to its peers.
/// A target service on loopback over the model at `path`, serving until the test ends.
async fn serve_target(path: &std::path::Path, config: TargetConfig) -> SocketAddr {
    let (l, addr) = listener().await;
    tokio::spawn(target_service::serve(
        TargetGrpc::new(common::load(path), config),
        l,
        std::future::pending(),
    ));
    addr
}

/// A draft service on loopback over the model at `path`, serving until the test ends.
async fn serve_draft(path: &std::path::Path) -> SocketAddr {
    let (l, addr) = listener().await;
    tokio::spawn(draft_service::serve(
        DraftGrpc::new(common::load(path), DraftConfig::default()),
        l,
        std::future::pending(),
    ));
    addr
}

/// A pipeline over remote services: the target, a draft where given, fresh pools.
fn remote_pipeline(
    target: RemoteTarget,
    draft: Option<RemoteDraft>,
) -> Pipeline<RemoteTarget, RemoteDraft, RemoteDraft> {
    let pool = || Arc::new(PhrasePool::new(PoolConfig::default()));
    Pipeline {
        target: Arc::new(target),
        draft: draft.map(Arc::new),
        lookahead: None,
        pool: pool(),
        lookahead_pool: pool(),
        trie: Default::default(),
        tuner: Default::default(),
        blocking: false,
    }
}

async fn freezable_proxy(to: SocketAddr) -> (SocketAddr, Arc<std::sync::atomic::AtomicBool>) {
    let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (l, addr) = listener().await;
    let f = frozen.clone();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = l.accept().await {
            let Ok(outbound) = tokio::net::TcpStream::connect(to).await else {
                continue;
            };
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            tokio::spawn(pipe(ri, wo, f.clone()));
            tokio::spawn(pipe(ro, wi, f.clone()));
        }
    });
    (addr, frozen)
}

async fn pipe(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    frozen: Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while frozen.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A draft service that stops answering mid-stream (not refusing: hanging) costs its
/// requests the draft call timeout, then they go on target-only with the same tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_draft_service_times_out_into_exact_target_only() {
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let (tp, dp) = common::tiny_pair(dir.path(), 17);
    let ta = serve_target(&tp, TargetConfig::default()).await;
    let da = serve_draft(&dp).await;
    let (proxy, frozen) = freezable_proxy(da).await;
    // 2 s: a draft call on these tiny models takes milliseconds, so even a loaded machine
    // does not time one out before the freeze; the default (10 s) would blow the bound below.
    let limits = CallLimits {
        call: Duration::from_secs(2),
        ..CallLimits::DRAFT
    };
    let pipeline = remote_pipeline(
        RemoteTarget::connect(&format!("http://{ta}"))
            .await
            .unwrap(),
        Some(
            RemoteDraft::connect_for(&format!("http://{proxy}"), 0, &limits)
                .await
                .unwrap(),
        ),
    );
    let prompt = &prompts()[0];
    let params = |strategy| DecodeParams {
        strategy,
        max_new_tokens: 48,
        gamma: 4,
        ..DecodeParams::default()
    };
    let mut none = |_: &[u32], _: &[decoding::TokenSource]| decoding::Flow::Continue;
    let plain = pipeline
        .generate(prompt, &params(Strategy::Greedy), &mut none)
        .await
        .unwrap();
    let drafted = pipeline
        .generate(prompt, &params(Strategy::Speculative), &mut none)
        .await
        .unwrap();
    assert_eq!(drafted.tokens, plain.tokens);
    assert!(drafted.stats.draft_fallback.is_none() && drafted.stats.accepted > 0);

    // Freeze the draft after a few committed tokens of the next request.
    let mut seen = 0;
    let f = frozen.clone();
    let mut freeze_midway = |t: &[u32], _: &[decoding::TokenSource]| {
        seen += t.len();
        if seen >= 8 {
            f.store(true, Ordering::SeqCst);
        }
        decoding::Flow::Continue
    };
    let started = Instant::now();
    let g = pipeline
        .generate(prompt, &params(Strategy::Speculative), &mut freeze_midway)
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(g.tokens, plain.tokens, "the output did not change");
    let why = g.stats.draft_fallback.expect("the fallback is reported");
    assert!(why.contains("draft"), "{why}");
    assert!(
        took < Duration::from_secs(8),
        "the hung draft cost {took:?}"
    );
    frozen.store(false, Ordering::SeqCst);
}

/// A target that takes small trees only (`max_tree_nodes` 6, reported by its Info): the
/// orchestrator never sends a larger one, whatever the request's parameters allow (a draft
/// of 16, 64 trie nodes, 4 pool phrases), and the cost profile times no larger tree. Every
/// strategy then decodes exactly what greedy does (the service refuses a larger tree, so
/// a request that built one would fail).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trees_stay_within_the_targets_node_limit() {
    use orchestrator::pipeline::Runner;
    let dir = tempfile::tempdir().unwrap();
    let (tp, dp) = common::tiny_pair(dir.path(), 17);
    let (tl, ta) = listener().await;
    let small = TargetConfig {
        max_tree_nodes: 6,
        ..TargetConfig::default()
    };
    tokio::spawn(target_service::serve(
        TargetGrpc::new(common::load(&tp), small),
        tl,
        std::future::pending(),
    ));
    let da = serve_draft(&dp).await;
    let target = RemoteTarget::connect(&format!("http://{ta}"))
        .await
        .unwrap();
    assert_eq!(decoding::TargetBackend::max_tree_nodes(&target), Some(6));
    let draft = RemoteDraft::connect(&format!("http://{da}")).await.unwrap();
    let pipeline = remote_pipeline(target, Some(draft));
    let profile = pipeline
        .measure_costs(
            ProfileOptions {
                reps: 1,
                prompt_len: 16,
                ..ProfileOptions::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    assert!(!profile.describe().is_empty());
    let mut none = |_: &[u32], _: &[decoding::TokenSource]| decoding::Flow::Continue;
    for prompt in prompts() {
        let params = |strategy| DecodeParams {
            strategy,
            max_new_tokens: 40,
            gamma: 16,
            topk: 4,
            trie_budget: 64,
            ..DecodeParams::default()
        };
        let plain = pipeline
            .generate(&prompt, &params(Strategy::Greedy), &mut none)
            .await
            .unwrap();
        for s in [
            Strategy::Speculative,
            Strategy::Trie,
            Strategy::Ouroboros,
            Strategy::Auto,
        ] {
            let g = pipeline
                .generate(&prompt, &params(s), &mut none)
                .await
                .unwrap_or_else(|e| panic!("{s:?}: {e}"));
            assert_eq!(g.tokens, plain.tokens, "{s:?} on {prompt:?}");
            assert!(
                g.stats.tree_nodes <= 6 * g.stats.target_forwards,
                "{s:?}: {} nodes in {} verifies",
                g.stats.tree_nodes,
                g.stats.target_forwards
            );
        }
    }
}

/// A client's deadline bounds the internal calls of its request: with the target frozen
/// mid-request (a hung process, a blackholed node), the decoding work ends at the
/// request's deadline instead of waiting out the target call's own limit (60 s here), and
/// over gRPC the client gets DEADLINE_EXCEEDED at its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_clients_deadline_bounds_the_internal_calls() {
    use orchestrator::pipeline::Runner;
    use orchestrator::remote::REQUEST_DEADLINE;
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let (tp, _) = common::tiny_pair(dir.path(), 17);
    let ta = serve_target(&tp, TargetConfig::default()).await;
    let (proxy, frozen) = freezable_proxy(ta).await;
    let limits = CallLimits {
        call: Duration::from_secs(60),
        ..CallLimits::TARGET
    };
    let target = RemoteTarget::connect_for(&format!("http://{proxy}"), 0, &limits)
        .await
        .unwrap();
    let pipeline = remote_pipeline(target, None);
    let params = DecodeParams {
        strategy: Strategy::Greedy,
        max_new_tokens: 400,
        ..DecodeParams::default()
    };
    // Freeze the target after a few tokens; the request has 1.5 s in all.
    let f = frozen.clone();
    let mut seen = 0;
    let sink = Box::new(move |t: &[u32], _: &[decoding::TokenSource]| {
        seen += t.len();
        if seen >= 4 {
            f.store(true, Ordering::SeqCst);
        }
        decoding::Flow::Continue
    });
    let started = Instant::now();
    let deadline = started + Duration::from_millis(1500);
    // As the service calls it: inside the request's scope.
    let run = async {
        pipeline
            .run(prompts()[0].clone(), params.clone(), sink)
            .await
    };
    let ended = REQUEST_DEADLINE.scope(Some(deadline), run).await;
    let took = started.elapsed();
    let e = ended.expect_err("the frozen target cannot finish the request");
    assert!(took < Duration::from_secs(10), "the work ran {took:?}: {e}");
    assert!(
        took >= Duration::from_millis(1400),
        "ended early, at {took:?}: {e}"
    );
    frozen.store(false, Ordering::SeqCst);

    // Over gRPC: the client's deadline (its grpc-timeout) reaches the work the same way.
    // One request may run at a time, and its place is held until its work ends: the next
    // request is let in only because the frozen one's work stopped at its deadline.
    let service = GenerateService::new(
        Arc::new(pipeline),
        Arc::new(common::word_tokenizer(VOCAB)),
        Arc::new(ChatTemplate::chatml()),
        vec![],
        params,
    )
    .with_max_running(1);
    let (l, addr) = listener().await;
    tokio::spawn(orchestrator::serve(service, l, std::future::pending()));
    let mut client = OuroborosClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    frozen.store(true, Ordering::SeqCst);
    let mut r = tonic::Request::new(request(&prompts()[1], pb::Strategy::Greedy, None));
    r.set_timeout(Duration::from_millis(800));
    let s = client.generate(r).await.expect_err("the target is frozen");
    // The client's own timer or the server's answer (DEADLINE_EXCEEDED too, whichever
    // internal call noticed it), whichever came first.
    match s.code() {
        Code::DeadlineExceeded | Code::Cancelled => {}
        _ => panic!("{s:?}"),
    }
    // Still frozen: a next request is let in (and then times out itself) only once the
    // first one's work has stopped; while that work held its place it would be refused.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut r = tonic::Request::new(request(&prompts()[1], pb::Strategy::Greedy, None));
        r.set_timeout(Duration::from_millis(300));
        let s = client.generate(r).await.expect_err("the target is frozen");
        if s.code() != Code::ResourceExhausted {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the timed-out request's work still holds its place: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    frozen.store(false, Ordering::SeqCst);
    // The probe's own work ends at its deadline too, a moment after its client gave up.
    let deadline = Instant::now() + Duration::from_secs(10);
    let g = loop {
        match client
            .generate(request(&prompts()[1], pb::Strategy::Greedy, None))
            .await
        {
            Err(s) if s.code() == Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => break other.unwrap().into_inner(),
        }
    };
    assert_eq!(g.token_ids.len(), 32);
}
