//! The OpenAI-compatible HTTP API beside gRPC: `POST /v1/completions`,
//! `POST /v1/chat/completions` (whole, or as server-sent events with `stream: true`),
//! `GET /v1/models`, `GET /health` and `GET /metrics`, and as vLLM offers them,
//! `POST /tokenize` and `POST /detokenize`, plus `GET /info` (our `Info` RPC as JSON). Requests are read in
//! [`crate::openai`] into the public `GenerateRequest` and run by the same
//! [`GenerateService`] as gRPC calls: one validator, one chat template, the same
//! statistics. A streaming client that goes away stops its request at the next commit.

use crate::api::GenerateService;
use crate::openai::{self, ApiError, Kind, Parsed};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::{StreamExt, future, stream};
use serde_json::{Value, json};
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;

struct Served {
    service: GenerateService,
    /// The model name requests may give (the target's), and when this server started.
    model: String,
    context_length: usize,
    started: u64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The router over `service` (for tests; [`serve`] binds it).
pub fn router(service: GenerateService) -> Router {
    let target = service.target_info();
    let served = Arc::new(Served {
        model: target.model,
        context_length: target.max_position,
        started: now(),
        service,
    });
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/info", get(info))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        // The routes above need a key when keys are set; probes and scrapers do not.
        .route_layer(axum::middleware::from_fn_with_state(
            served.clone(),
            require_key,
        ))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(served)
}

/// Serves the HTTP API on `listener` until `shutdown` completes (requests in flight
/// finish first).
pub async fn serve(
    service: GenerateService,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    axum::serve(listener, router(service))
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

async fn require_key(
    State(s): State<Arc<Served>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(keys) = s.service.api_keys() {
        let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok());
        if !keys.admits(header("authorization"), header("x-api-key")) {
            return error(ApiError {
                status: 401,
                message: crate::auth::REFUSED.into(),
                param: None,
                code: Some("invalid_api_key"),
            });
        }
    }
    next.run(request).await
}

fn error(e: ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(e.body())).into_response()
}

async fn completions(State(s): State<Arc<Served>>, body: Bytes) -> Response {
    generate(&s, Kind::Completion, openai::parse_completion(&body)).await
}

async fn chat_completions(State(s): State<Arc<Served>>, body: Bytes) -> Response {
    generate(&s, Kind::Chat, openai::parse_chat(&body)).await
}

async fn generate(s: &Served, kind: Kind, parsed: Result<Parsed, ApiError>) -> Response {
    let parsed = match parsed {
        Ok(p) => p,
        Err(e) => return error(e),
    };
    if let Some(m) = parsed
        .model
        .as_deref()
        .filter(|m| !m.is_empty() && *m != s.model)
    {
        return error(ApiError {
            status: 404,
            message: format!(
                "The model `{m}` does not exist; this server serves `{}`",
                s.model
            ),
            param: Some("model".into()),
            code: Some("model_not_found"),
        });
    }
    let prefix = match kind {
        Kind::Completion => "cmpl",
        Kind::Chat => "chatcmpl",
    };
    let id = format!("{prefix}-{:016x}", rand::random::<u64>());
    let created = now();
    if !parsed.stream {
        return match s.service.complete(parsed.request).await {
            Ok(r) => {
                let tok = s.service.validator().tokenizer().clone();
                let text = move |id: u32| {
                    engine::tokenizer::decode(&tok, &[id], false).unwrap_or_default()
                };
                axum::Json(openai::response(kind, (&id, created, &s.model), &r, &text))
                    .into_response()
            }
            Err(status) => error(ApiError::of_status(&status, kind)),
        };
    }
    let chunks = match s.service.stream(parsed.request).await {
        Ok(c) => c,
        Err(status) => return error(ApiError::of_status(&status, kind)),
    };
    let model = s.model.clone();
    let include_usage = parsed.include_usage;
    let events = chunks
        .scan(true, move |first, item| {
            let meta = (id.as_str(), created, model.as_str());
            let mut out: Vec<Value> = Vec::new();
            match item {
                Ok(msg) => {
                    let last = msg.stats.is_some();
                    if !msg.text.is_empty() || (*first && kind == Kind::Chat) {
                        out.push(openai::chunk(kind, meta, Some(&msg.text), *first, None));
                        *first = false;
                    }
                    if last {
                        let finish = openai::finish_name(msg.finish_reason);
                        let mut closing = openai::chunk(kind, meta, None, false, Some(finish));
                        if let Some(seed) = msg.seed {
                            closing["seed"] = json!(seed);
                        }
                        closing["ouroboros"] =
                            msg.stats.as_ref().map_or(Value::Null, openai::stats);
                        out.push(closing);
                        if include_usage {
                            let mut usage = openai::chunk(kind, meta, None, false, None);
                            usage["choices"] = json!([]);
                            usage["usage"] = msg.usage.as_ref().map_or(Value::Null, openai::usage);
                            out.push(usage);
                        }
                    }
                }
                // A failure after the stream began: an error event, then the end.
                Err(status) => out.push(ApiError::of_status(&status, kind).body()),
            }
            future::ready(Some(stream::iter(out)))
        })
        .flatten()
        .map(|v| Ok::<_, Infallible>(Event::default().data(v.to_string())))
        .chain(stream::once(future::ready(Ok(
            Event::default().data("[DONE]")
        ))));
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn models(State(s): State<Arc<Served>>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": s.model,
            "object": "model",
            "created": s.started,
            "owned_by": "ouroboros",
            "max_model_len": s.context_length,
        }],
    }))
    .into_response()
}

async fn info(State(s): State<Arc<Served>>) -> Response {
    let i = s.service.info();
    let strategies: Vec<String> = i
        .strategies
        .iter()
        .filter_map(|&c| proto::v1::Strategy::try_from(c).ok())
        .map(|st| {
            st.as_str_name()
                .trim_start_matches("STRATEGY_")
                .to_lowercase()
        })
        .collect();
    let costs: Vec<Value> = i
        .verify_costs
        .iter()
        .map(|c| json!({"tree_nodes": c.tree_nodes, "seconds": c.seconds}))
        .collect();
    axum::Json(json!({
        "model": i.model,
        "draft_model": i.draft_model,
        "context_length": i.context_length,
        "vocab_size": i.vocab_size,
        "tokenizer_entries": i.tokenizer_entries,
        "chat_template_source": i.chat_template_source,
        "strategies": strategies,
        "verify_costs": costs,
        "draft_token_s": i.draft_token_s,
        "draft_call_s": i.draft_call_s,
    }))
    .into_response()
}

/// vLLM's shape: `{"prompt": "..."}` or `{"messages": [...]}` in, `{"tokens", "count",
/// "max_model_len"}` out.
async fn tokenize(State(s): State<Arc<Served>>, body: Bytes) -> Response {
    let request = match openai::parse_tokenize(&body) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    match s.service.tokenize(request).await {
        Ok(r) => axum::Json(json!({
            "tokens": r.token_ids,
            "token_strs": r.tokens,
            "count": r.token_ids.len(),
            "max_model_len": s.context_length,
        }))
        .into_response(),
        Err(status) => error(ApiError::of_status(&status, Kind::Completion)),
    }
}

/// `{"tokens": [...]}` in, `{"prompt": "..."}` out.
async fn detokenize(State(s): State<Arc<Served>>, body: Bytes) -> Response {
    let request = match openai::parse_detokenize(&body) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    match s.service.detokenize(request).await {
        Ok(r) => axum::Json(json!({"prompt": r.text})).into_response(),
        Err(status) => error(ApiError {
            // The ids came in as `tokens`.
            param: proto::convert::field_of(&status).map(|_| "tokens".into()),
            ..ApiError::of_status(&status, Kind::Completion)
        }),
    }
}

/// Ready while the server takes requests (it stops listening when it drains).
async fn health() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        telemetry::metrics().render(),
    )
        .into_response()
}
