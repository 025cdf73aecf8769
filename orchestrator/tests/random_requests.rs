//! Random public requests against the embedded server over gRPC (a property test): every
//! field random, in range and out of it (empty and odd inputs, ids outside the vocabulary,
//! NaN and infinite floats, huge counts, unknown strategies, long and many stop strings,
//! unknown chat roles), unary and streamed. Each one gets an answer or a status naming the
//! client's mistake (or a limit), within a deadline: never a panic (INTERNAL / UNKNOWN), a
//! hang or a dropped connection, and the server still answers afterwards.

mod common;

use orchestrator::embedded::Limits;
use proptest::collection::vec;
use proptest::prelude::*;
use proto::common::v1::{Lookahead, Sampling};
use proto::v1 as pb;
use proto::v1::generate_request::Input;
use proto::v1::ouroboros_client::OuroborosClient;
use std::sync::OnceLock;
use std::time::Duration;
use tonic::Code;

/// One server for all cases: its runtime and address.
fn server() -> &'static (tokio::runtime::Runtime, String) {
    static SERVER: OnceLock<(tokio::runtime::Runtime, String)> = OnceLock::new();
    SERVER.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let addr = rt.block_on(async {
            // Leaked: the model files must outlive every case.
            let dir = Box::leak(Box::new(tempfile::tempdir().unwrap()));
            let (_, service) = common::embedded_service(dir.path(), Limits::default(), 24);
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            tokio::spawn(orchestrator::serve(service, l, std::future::pending()));
            format!("http://{addr}")
        });
        (rt, addr)
    })
}

/// Mostly what a client would send, sometimes not: each field is valid nine times in ten,
/// so requests get past the first check and reach the decoding loop (about half are
/// valid throughout), while every kind of bad value still comes up.
fn words() -> impl Strategy<Value = String> {
    vec(0u32..130, 1..12).prop_map(|ws| {
        ws.iter()
            .map(|w| format!("w{w}"))
            .collect::<Vec<_>>()
            .join(" ")
    })
}

fn odd_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        vec(any::<char>(), 1..24).prop_map(String::from_iter),
        (1usize..400).prop_map(|n| "ab".repeat(n)),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![9 => words(), 1 => odd_text()]
}

fn float(valid: std::ops::Range<f32>) -> impl Strategy<Value = f32> {
    prop_oneof![
        9 => valid,
        1 => prop_oneof![
            Just(-1.0f32),
            Just(f32::NAN),
            Just(f32::INFINITY),
            Just(1e30),
        ],
    ]
}

fn count(valid: std::ops::Range<u32>) -> impl Strategy<Value = u32> {
    prop_oneof![9 => valid, 1 => prop_oneof![Just(0u32), Just(257), Just(u32::MAX)]]
}

fn input() -> impl Strategy<Value = Option<Input>> {
    let ids = vec(prop_oneof![199 => 1u32..96, 1 => any::<u32>()], 1..24);
    let ids = prop_oneof![9 => ids, 1 => Just(Vec::new())]
        .prop_map(|ids| Input::TokenIds(pb::TokenIds { ids }));
    let role = prop_oneof![
        3 => Just("system".to_string()),
        6 => Just("user".to_string()),
        3 => Just("assistant".to_string()),
        1 => odd_text(),
    ];
    let chat = prop_oneof![9 => vec((role, text()), 1..4), 1 => Just(Vec::new())].prop_map(|m| {
        Input::Chat(pb::ChatMessages {
            messages: m
                .into_iter()
                .map(|(role, content)| pb::ChatMessage { role, content })
                .collect(),
        })
    });
    prop::option::weighted(0.97, prop_oneof![text().prop_map(Input::Prompt), ids, chat])
}

fn params() -> impl Strategy<Value = Option<pb::StrategyParams>> {
    let lookahead =
        (count(2..6), count(1..5), count(1..5)).prop_map(|(level, window, guess)| Lookahead {
            level,
            window,
            guess,
        });
    let p = (
        prop::option::of(count(1..9)),
        prop::option::of(lookahead),
        prop::option::of(count(0..4)),
        prop::option::of(count(0..64)),
        prop::option::of(float(0.0..0.9)),
    )
        .prop_map(
            |(gamma, lookahead, topk, trie_budget, draft_stop)| pb::StrategyParams {
                gamma,
                lookahead,
                topk,
                trie_budget,
                draft_stop,
            },
        );
    prop::option::of(p)
}

fn request() -> impl Strategy<Value = pb::GenerateRequest> {
    let sampling = (
        float(0.0..2.0),
        float(0.05..1.0),
        count(0..20),
        prop::option::of(any::<u64>()),
    )
        .prop_map(|(temperature, top_p, top_k, seed)| Sampling {
            temperature,
            top_p,
            top_k,
            seed,
        });
    (
        input(),
        prop::option::of(count(1..40)),
        vec(text(), 0..4),
        prop::option::of(sampling),
        prop_oneof![19 => 0i32..6, 1 => any::<i32>()],
        params(),
        prop::option::weighted(0.3, count(0..21)),
    )
        .prop_map(
            |(input, max_new_tokens, stop, sampling, strategy, params, logprobs)| {
                pb::GenerateRequest {
                    input,
                    max_new_tokens,
                    stop,
                    sampling,
                    strategy,
                    params,
                    logprobs,
                }
            },
        )
}

/// What a refused request may be told: its own mistake, or a limit.
const CLIENT_CODES: [Code; 4] = [
    Code::InvalidArgument,
    Code::OutOfRange,
    Code::ResourceExhausted,
    Code::FailedPrecondition,
];

fn check(what: &str, r: &pb::GenerateRequest, got: Result<usize, tonic::Status>) {
    match got {
        Ok(tokens) => {
            if let Some(max) = r.max_new_tokens {
                assert!(tokens <= max as usize, "{what}: {tokens} tokens of {max}");
            }
        }
        Err(s) => {
            assert!(
                CLIENT_CODES.contains(&s.code()) && !s.message().is_empty(),
                "{what}: {:?} {:?} for {r:?}",
                s.code(),
                s.message()
            );
        }
    }
}

async fn unary(
    c: &mut OuroborosClient<tonic::transport::Channel>,
    r: pb::GenerateRequest,
) -> Result<usize, tonic::Status> {
    Ok(c.generate(r).await?.into_inner().token_ids.len())
}

async fn streamed(
    c: &mut OuroborosClient<tonic::transport::Channel>,
    r: pb::GenerateRequest,
) -> Result<usize, tonic::Status> {
    let mut s = c.generate_stream(r).await?.into_inner();
    let mut n = 0;
    while let Some(m) = s.message().await? {
        n += m.token_ids.len();
    }
    Ok(n)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 160,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_random_request_gets_an_answer_or_a_client_status(r in request(), stream in any::<bool>()) {
        let (rt, addr) = server();
        rt.block_on(async {
            let mut c = OuroborosClient::connect(addr.clone()).await.unwrap();
            let call = async {
                match stream {
                    false => unary(&mut c, r.clone()).await,
                    true => streamed(&mut c, r.clone()).await,
                }
            };
            let got = tokio::time::timeout(Duration::from_secs(60), call)
                .await
                .unwrap_or_else(|_| panic!("no answer within 60 s to {r:?}"));
            check(if stream { "stream" } else { "unary" }, &r, got);
            // The server is still there and well.
            let plain = pb::GenerateRequest {
                input: Some(Input::Prompt("w3 w4".into())),
                max_new_tokens: Some(2),
                ..Default::default()
            };
            assert_eq!(unary(&mut c, plain).await.unwrap(), 2);
        });
    }
}
