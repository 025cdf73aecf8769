//! The OpenAI-compatible HTTP API over the embedded pipeline with tiny random models,
//! called in memory through its router: the same text as gRPC, server-sent events that
//! add up to it, drawn seeds that reproduce their output, and OpenAI error bodies.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use orchestrator::api::GenerateService;
use orchestrator::embedded::Limits;
use proto::v1 as pb;
use serde_json::{Value, json};
use tower::ServiceExt;

const VOCAB: usize = 96;

fn service() -> (tempfile::TempDir, GenerateService) {
    let dir = tempfile::tempdir().unwrap();
    let (_, service) = common::embedded_service(dir.path(), Limits::default(), 24);
    (dir, service)
}

async fn post(s: &GenerateService, path: &str, body: Value) -> (StatusCode, String) {
    let r = orchestrator::http::router(s.clone())
        .oneshot(
            Request::post(path)
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = r.status();
    let bytes = r.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

async fn post_json(s: &GenerateService, path: &str, body: Value) -> (StatusCode, Value) {
    let (status, text) = post(s, path, body).await;
    (status, serde_json::from_str(&text).unwrap())
}

const PROMPT: &str = "w5 w9 w5 w9 w5 w9 w12";

async fn grpc_text(s: &GenerateService, strategy: pb::Strategy) -> pb::GenerateResponse {
    s.complete(pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Prompt(PROMPT.into())),
        max_new_tokens: Some(20),
        strategy: strategy as i32,
        ..Default::default()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_equal_grpc_for_every_strategy() {
    let (_dir, s) = service();
    let plain = grpc_text(&s, pb::Strategy::Greedy).await;
    assert!(!plain.text.is_empty());
    for strategy in ["greedy", "speculative", "trie", "ouroboros"] {
        let (status, r) = post_json(
            &s,
            "/v1/completions",
            json!({"prompt": PROMPT, "max_tokens": 20, "temperature": 0, "strategy": strategy}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{r}");
        assert_eq!(r["choices"][0]["text"], plain.text, "{strategy}");
        assert_eq!(r["object"], "text_completion");
        assert_eq!(r["ouroboros"]["strategy"], strategy);
        assert_eq!(r["usage"]["completion_tokens"], 20);
        assert_eq!(r["choices"][0]["finish_reason"], "length");
        assert!(r.get("seed").is_none(), "greedy has no seed: {r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_chat_adds_up_to_the_whole_answer() {
    let (_dir, s) = service();
    let body = json!({
        "messages": [{"role": "user", "content": "w7 w8 w7 w8"}],
        "max_tokens": 16, "temperature": 0, "strategy": "ouroboros",
    });
    let (status, whole) = post_json(&s, "/v1/chat/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{whole}");
    let text = whole["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");

    let mut streamed = body;
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (status, sse) = post(&s, "/v1/chat/completions", streamed).await;
    assert_eq!(status, StatusCode::OK, "{sse}");
    let events: Vec<&str> = sse
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{sse}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let deltas: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(deltas, text);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    let finishes: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, [&whole["choices"][0]["finish_reason"]]);
    // The usage chunk comes last, with no choices.
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], whole["usage"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drawn_seeds_differ_and_reproduce_their_text() {
    let (_dir, s) = service();
    let sample = |seed: Option<u64>| {
        let mut body = json!({"prompt": PROMPT, "max_tokens": 20, "temperature": 1.0, "strategy": "speculative"});
        if let Some(seed) = seed {
            body["seed"] = json!(seed);
        }
        post_json(&s, "/v1/completions", body)
    };
    let (_, a) = sample(None).await;
    let (_, b) = sample(None).await;
    let (sa, sb) = (a["seed"].as_u64().unwrap(), b["seed"].as_u64().unwrap());
    assert_ne!(sa, sb);
    for (seed, first) in [(sa, &a), (sb, &b)] {
        let (_, again) = sample(Some(seed)).await;
        assert_eq!(again["seed"], seed);
        assert_eq!(again["choices"][0]["text"], first["choices"][0]["text"]);
    }
    // gRPC reports the drawn seed too, and replaying it there gives the same text.
    let request = |seed| pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Prompt(PROMPT.into())),
        max_new_tokens: Some(20),
        sampling: Some(proto::common::v1::Sampling {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed,
        }),
        strategy: pb::Strategy::Greedy as i32,
        ..Default::default()
    };
    let drawn = s.complete(request(None)).await.unwrap();
    let replayed = s.complete(request(drawn.seed)).await.unwrap();
    assert!(drawn.seed.is_some());
    assert_eq!(replayed.token_ids, drawn.token_ids);
    let (_, http) = sample(drawn.seed).await;
    assert_eq!(http["choices"][0]["text"], drawn.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_openai_bodies_with_http_codes() {
    let (_dir, s) = service();
    let (status, e) = post_json(
        &s,
        "/v1/completions",
        json!({"prompt": "w1", "max_tokens": -1}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(e["error"]["param"], "max_tokens");
    assert_eq!(e["error"]["type"], "invalid_request_error");
    // Errors found by the shared validator are named in OpenAI's terms too.
    let (status, e) = post_json(
        &s,
        "/v1/completions",
        json!({"prompt": "w1", "ouroboros": {"gamma": 0}, "strategy": "speculative"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["error"]["param"], "ouroboros.gamma");
    let (status, e) = post_json(&s, "/v1/completions", json!({"prompt": [500]})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["error"]["param"], "prompt");
    let (status, e) = post_json(
        &s,
        "/v1/completions",
        json!({"prompt": "w1", "model": "gpt-4"}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(e["error"]["code"], "model_not_found");
    let (status, e) = post_json(&s, "/v1/chat/completions", json!({"messages": "hi"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(e["error"]["param"], "messages");
    // The served name is accepted, and listed.
    let models = orchestrator::http::router(s.clone())
        .oneshot(Request::get("/v1/models").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let bytes = models.into_body().collect().await.unwrap().to_bytes();
    let models: Value = serde_json::from_slice(&bytes).unwrap();
    let name = models["data"][0]["id"].as_str().unwrap().to_string();
    let (status, _) = post_json(
        &s,
        "/v1/completions",
        json!({"prompt": "w1", "model": name, "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_detokenize_and_info() {
    let (_dir, s) = service();
    let (status, t) = post_json(&s, "/tokenize", json!({"prompt": "w3 w4 w5"})).await;
    assert_eq!(status, StatusCode::OK, "{t}");
    assert_eq!(t["tokens"], json!([3, 4, 5]));
    assert_eq!(t["token_strs"], json!(["w3", "w4", "w5"]));
    assert_eq!(t["count"], 3);
    let (status, d) = post_json(&s, "/detokenize", json!({"tokens": [3, 4, 5]})).await;
    assert_eq!(status, StatusCode::OK, "{d}");
    assert_eq!(d["prompt"], "w3 w4 w5");
    // Chat is rendered as Generate renders it: the same ids as the prompt tokens of a
    // chat request.
    let messages = json!([{"role": "user", "content": "w7 w8"}]);
    let (_, chat_ids) = post_json(&s, "/tokenize", json!({"messages": messages})).await;
    let (_, chat) = post_json(
        &s,
        "/v1/chat/completions",
        json!({"messages": messages, "max_tokens": 1, "temperature": 0}),
    )
    .await;
    assert_eq!(chat_ids["count"], chat["usage"]["prompt_tokens"]);
    // An id past the tokenizer is a 400 naming it.
    let (status, e) = post_json(&s, "/detokenize", json!({"tokens": [3, 4000]})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["error"]["param"], "tokens");
    let (status, e) = post_json(&s, "/tokenize", json!({"text": "w1"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{e}");

    let info = s.info();
    assert_eq!(info.tokenizer_entries, VOCAB as u32);
    assert!(info.context_length > 0 && !info.model.is_empty());
    assert!(
        !info.draft_model.is_empty(),
        "the embedded pair has a draft"
    );
    assert!(info.strategies.contains(&(pb::Strategy::Ouroboros as i32)));
    assert!(info.verify_costs.is_empty(), "nothing measured yet");
    let r = orchestrator::http::router(s.clone())
        .oneshot(Request::get("/info").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let bytes = r.into_body().collect().await.unwrap().to_bytes();
    let info: Value = serde_json::from_slice(&bytes).unwrap();
    assert!(
        info["strategies"]
            .as_array()
            .unwrap()
            .contains(&json!("ouroboros"))
    );
}

/// Log-probabilities come from the target's rows, so every strategy reports the same ones
/// (to float rounding: a tree's rows and a one-token step's are not bit-identical); under
/// greedy the chosen token is the most likely of its row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_are_the_same_under_every_strategy() {
    let (_dir, s) = service();
    let ask = |strategy: &str| {
        post_json(
            &s,
            "/v1/completions",
            json!({"prompt": PROMPT, "max_tokens": 20, "temperature": 0, "logprobs": 5,
                   "strategy": strategy}),
        )
    };
    let (status, greedy) = ask("greedy").await;
    assert_eq!(status, StatusCode::OK, "{greedy}");
    let lp = &greedy["choices"][0]["logprobs"];
    let chosen = lp["token_logprobs"].as_array().unwrap();
    assert_eq!(chosen.len(), 20);
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 20);
    for (i, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        let top = top.as_object().unwrap();
        assert_eq!(top.len(), 5, "{top:?}");
        let best = top
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        let mine = chosen[i].as_f64().unwrap();
        assert_eq!(mine, best, "token {i}: greedy chose the most likely token");
        assert!(mine <= 0.0);
        assert_eq!(top[lp["tokens"][i].as_str().unwrap()].as_f64(), Some(mine));
    }
    for strategy in ["speculative", "trie", "ouroboros"] {
        let (_, other) = ask(strategy).await;
        assert_eq!(other["choices"][0]["text"], greedy["choices"][0]["text"]);
        let theirs = &other["choices"][0]["logprobs"];
        assert_eq!(theirs["tokens"], lp["tokens"], "{strategy}");
        for (a, b) in theirs["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .zip(chosen)
        {
            let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            assert!((a - b).abs() <= 1e-5, "{strategy}: {a} against {b}");
        }
        // Rows of a tree and of a one-token step agree to float rounding.
        for (a, b) in theirs["top_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .zip(lp["top_logprobs"].as_array().unwrap())
        {
            let (a, b) = (a.as_object().unwrap(), b.as_object().unwrap());
            assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
            for (k, v) in a {
                assert!((v.as_f64().unwrap() - b[k].as_f64().unwrap()).abs() <= 1e-5);
            }
        }
    }
    // Chat's shape; and what is refused: with streaming, and above 20 alternatives.
    let (status, chat) = post_json(
        &s,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "w1 w2"}], "max_tokens": 4,
               "temperature": 0, "logprobs": true, "top_logprobs": 2}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{chat}");
    let content = chat["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(content.len(), 4);
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);
    let (status, e) = post_json(
        &s,
        "/v1/completions",
        json!({"prompt": PROMPT, "logprobs": 2, "stream": true}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["error"]["param"], "logprobs");
    let (status, e) = post_json(
        &s,
        "/v1/completions",
        json!({"prompt": PROMPT, "logprobs": 21}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{e}");
    // Without logprobs there are none.
    let (_, plain) = post_json(
        &s,
        "/v1/completions",
        json!({"prompt": PROMPT, "max_tokens": 2}),
    )
    .await;
    assert!(plain["choices"][0]["logprobs"].is_null());
}

/// With API keys set, the API needs one (401 / UNAUTHENTICATED without); health, metrics
/// and gRPC health stay open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_required_when_set() {
    let (_dir, s) = service();
    let s = s.with_api_keys(orchestrator::auth::ApiKeys::new(["sesame"]).unwrap());
    let call = |path: &str, key: Option<&str>| {
        let mut r = Request::post(path).header("content-type", "application/json");
        if let Some(k) = key {
            r = r.header("authorization", format!("Bearer {k}"));
        }
        let body = Body::from(json!({"prompt": "w1", "max_tokens": 2}).to_string());
        orchestrator::http::router(s.clone()).oneshot(r.body(body).unwrap())
    };
    let refused = call("/v1/completions", None).await.unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let bytes = refused.into_body().collect().await.unwrap().to_bytes();
    let e: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(e["error"]["code"], "invalid_api_key");
    assert_eq!(
        call("/v1/completions", Some("open"))
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call("/v1/completions", Some("sesame"))
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        call("/tokenize", None).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    for open in ["/health", "/metrics"] {
        let r = orchestrator::http::router(s.clone())
            .oneshot(Request::get(open).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{open}");
    }

    // gRPC on loopback.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(orchestrator::serve(s.clone(), l, std::future::pending()));
    let mut c = proto::v1::ouroboros_client::OuroborosClient::connect(addr.clone())
        .await
        .unwrap();
    let request = || pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Prompt("w1 w2".into())),
        max_new_tokens: Some(2),
        ..Default::default()
    };
    let e = c.generate(request()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(c.info(pb::InfoRequest::default()).await.is_err());
    let mut with_key = tonic::Request::new(request());
    with_key
        .metadata_mut()
        .insert("authorization", "Bearer sesame".parse().unwrap());
    assert_eq!(
        c.generate(with_key)
            .await
            .unwrap()
            .into_inner()
            .token_ids
            .len(),
        2
    );
    let channel = tonic::transport::Endpoint::from_shared(addr)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}
