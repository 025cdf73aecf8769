//! The OpenAI wire format: `/v1/completions` and `/v1/chat/completions` requests read into
//! the public `GenerateRequest` (which the one validator then checks, as for gRPC), and
//! responses, stream chunks and errors written back in OpenAI's shapes.
//!
//! Fields are read leniently (any JSON value) and checked here, so that a bad value gets a
//! 400 naming the OpenAI parameter rather than a serde message. OpenAI's defaults apply:
//! `temperature` 1 and `top_p` 1 when absent (0 decodes greedily). Our own fields ride
//! along: `strategy` (auto, greedy, speculative, lookahead, trie, ouroboros), `top_k`, and
//! `ouroboros` (`gamma`, `topk`, `trie_budget`, `draft_stop`, `lookahead {level, window,
//! guess}`); responses add `seed` and `ouroboros` (the speculation statistics).

use decoding::logprobs::MAX_TOP_LOGPROBS;
use proto::common::v1 as common;
use proto::v1 as pb;
use serde::Deserialize;
use serde_json::{Map, Value, json};

/// An OpenAI error: HTTP status, message, and the parameter at fault.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: format!("{param}: {}", message.into()),
            param: Some(param.to_string()),
            code: None,
        }
    }

    /// OpenAI's error body.
    pub fn body(&self) -> Value {
        let kind = match self.status {
            400 | 404 | 422 => "invalid_request_error",
            401 => "authentication_error",
            429 => "rate_limit_error",
            503 => "service_unavailable_error",
            _ => "server_error",
        };
        json!({"error": {
            "message": self.message,
            "type": kind,
            "param": self.param,
            "code": self.code,
        }})
    }

    /// The HTTP form of a status from validation or decoding. The parameter comes from the
    /// status's `BadRequest` details, in OpenAI's name for it.
    pub fn of_status(s: &tonic::Status, kind: Kind) -> Self {
        use tonic::Code;
        let status = match s.code() {
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 400,
            Code::Unauthenticated => 401,
            Code::PermissionDenied => 403,
            Code::NotFound => 404,
            Code::ResourceExhausted => 429,
            Code::Unavailable => 503,
            Code::DeadlineExceeded => 504,
            _ => 500,
        };
        Self {
            status,
            message: s.message().to_string(),
            param: proto::convert::field_of(s).map(|f| openai_param(&f, kind)),
            code: None,
        }
    }
}

/// Which endpoint a request came to (some parameters are named differently).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Completion,
    Chat,
}

/// OpenAI's name for one of `GenerateRequest`'s fields.
fn openai_param(field: &str, kind: Kind) -> String {
    let prompt = match kind {
        Kind::Completion => "prompt",
        Kind::Chat => "messages",
    };
    let head = field.split(['.', '[']).next().unwrap_or(field);
    match head {
        "max_new_tokens" => "max_tokens".into(),
        "input" | "prompt" | "token_ids" | "chat" => prompt.into(),
        "sampling" => field.trim_start_matches("sampling.").into(),
        "stop" => "stop".into(),
        "params" => format!("ouroboros.{}", field.trim_start_matches("params.")),
        _ => field.into(),
    }
}

/// A request's own choices beside the `GenerateRequest`.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub request: pb::GenerateRequest,
    pub stream: bool,
    pub include_usage: bool,
    pub model: Option<String>,
}

/// The fields both endpoints share.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Common {
    model: Option<Value>,
    max_tokens: Option<Value>,
    temperature: Option<Value>,
    top_p: Option<Value>,
    top_k: Option<Value>,
    n: Option<Value>,
    stream: Option<Value>,
    stream_options: Option<Value>,
    stop: Option<Value>,
    seed: Option<Value>,
    logprobs: Option<Value>,
    presence_penalty: Option<Value>,
    frequency_penalty: Option<Value>,
    strategy: Option<Value>,
    ouroboros: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct CompletionBody {
    prompt: Option<Value>,
    echo: Option<Value>,
    suffix: Option<Value>,
    best_of: Option<Value>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ChatBody {
    messages: Option<Value>,
    max_completion_tokens: Option<Value>,
    top_logprobs: Option<Value>,
    #[serde(flatten)]
    common: Common,
}

/// A present, non-null value.
fn given(v: &Option<Value>) -> Option<&Value> {
    v.as_ref().filter(|v| !v.is_null())
}

fn integer(v: &Value, param: &str, min: i64, max: i64) -> Result<i64, ApiError> {
    match v.as_i64() {
        Some(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(ApiError::bad(
            param,
            format!("expected an integer in [{min}, {max}], got {v}"),
        )),
    }
}

fn number(v: &Value, param: &str, min: f64, max: f64) -> Result<f64, ApiError> {
    match v.as_f64() {
        Some(x) if (min..=max).contains(&x) => Ok(x),
        _ => Err(ApiError::bad(
            param,
            format!("expected a number in [{min}, {max}], got {v}"),
        )),
    }
}

fn boolean(v: &Value, param: &str) -> Result<bool, ApiError> {
    v.as_bool()
        .ok_or_else(|| ApiError::bad(param, format!("expected true or false, got {v}")))
}

fn string<'a>(v: &'a Value, param: &str) -> Result<&'a str, ApiError> {
    v.as_str()
        .ok_or_else(|| ApiError::bad(param, format!("expected a string, got {v}")))
}

fn token_ids(items: &[Value], param: &str) -> Result<Vec<u32>, ApiError> {
    items
        .iter()
        .map(|t| integer(t, param, 0, u32::MAX as i64).map(|n| n as u32))
        .collect()
}

/// Refuses a parameter this server does not implement unless it has its neutral value.
fn unsupported(v: &Option<Value>, param: &str, neutral: &Value, why: &str) -> Result<(), ApiError> {
    match given(v) {
        Some(x) if x != neutral => Err(ApiError::bad(param, why.to_string())),
        _ => Ok(()),
    }
}

pub fn parse_completion(body: &[u8]) -> Result<Parsed, ApiError> {
    let b: CompletionBody = from_json(body)?;
    unsupported(&b.echo, "echo", &json!(false), "echo is not supported")?;
    unsupported(&b.suffix, "suffix", &json!(""), "suffix is not supported")?;
    unsupported(
        &b.best_of,
        "best_of",
        &json!(1),
        "only best_of=1 is supported",
    )?;
    let input = match given(&b.prompt) {
        None => return Err(ApiError::bad("prompt", "required")),
        Some(Value::String(s)) => pb::generate_request::Input::Prompt(s.clone()),
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(s)] => pb::generate_request::Input::Prompt(s.clone()),
            [Value::Array(ids)] => pb::generate_request::Input::TokenIds(pb::TokenIds {
                ids: token_ids(ids, "prompt")?,
            }),
            ids if !ids.is_empty() && ids.iter().all(Value::is_number) => {
                pb::generate_request::Input::TokenIds(pb::TokenIds {
                    ids: token_ids(ids, "prompt")?,
                })
            }
            _ => {
                return Err(ApiError::bad(
                    "prompt",
                    "one prompt per request: a string, an array of token ids, or an array of one of these",
                ));
            }
        },
        Some(other) => {
            return Err(ApiError::bad(
                "prompt",
                format!("expected a string or token ids, got {other}"),
            ));
        }
    };
    let logprobs = match given(&b.common.logprobs) {
        Some(v) => Some(integer(v, "logprobs", 0, MAX_TOP_LOGPROBS as i64)? as u32),
        None => None,
    };
    let mut parsed = common(b.common, input, None)?;
    parsed.request.logprobs = logprobs;
    Ok(parsed)
}

/// OpenAI's `messages`: each a role and its content, a string or text parts.
fn chat_messages(messages: Option<&Value>) -> Result<Vec<pb::ChatMessage>, ApiError> {
    let Some(Value::Array(items)) = messages.filter(|v| !v.is_null()) else {
        return Err(ApiError::bad("messages", "required: an array of messages"));
    };
    let mut messages = Vec::with_capacity(items.len());
    for (i, m) in items.iter().enumerate() {
        let at = format!("messages[{i}]");
        let role = string(m.get("role").unwrap_or(&Value::Null), &format!("{at}.role"))?;
        let content = match m.get("content") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.iter().enumerate() {
                    let part = format!("{at}.content[{j}]");
                    match p.get("type").and_then(Value::as_str) {
                        Some("text") => {
                            text += string(p.get("text").unwrap_or(&Value::Null), &part)?
                        }
                        _ => return Err(ApiError::bad(&part, "only text parts are supported")),
                    }
                }
                text
            }
            Some(other) => {
                return Err(ApiError::bad(
                    &format!("{at}.content"),
                    format!("expected a string or text parts, got {other}"),
                ));
            }
        };
        messages.push(pb::ChatMessage {
            role: role.to_string(),
            content,
        });
    }
    Ok(messages)
}

pub fn parse_chat(body: &[u8]) -> Result<Parsed, ApiError> {
    let b: ChatBody = from_json(body)?;
    let messages = chat_messages(b.messages.as_ref())?;
    let wanted = match given(&b.common.logprobs) {
        Some(v) => boolean(v, "logprobs")?,
        None => false,
    };
    let top = match given(&b.top_logprobs) {
        Some(v) => integer(v, "top_logprobs", 0, MAX_TOP_LOGPROBS as i64)? as u32,
        None => 0,
    };
    if given(&b.top_logprobs).is_some() && !wanted {
        return Err(ApiError::bad("top_logprobs", "only with logprobs: true"));
    }
    let input = pb::generate_request::Input::Chat(pb::ChatMessages { messages });
    let mut parsed = common(b.common, input, given(&b.max_completion_tokens).cloned())?;
    parsed.request.logprobs = wanted.then_some(top);
    Ok(parsed)
}

/// `/tokenize`: `{"prompt": text}` or `{"messages": [...]}` (as chat completions take them).
pub fn parse_tokenize(body: &[u8]) -> Result<pb::TokenizeRequest, ApiError> {
    let v: Value = from_json(body)?;
    use pb::tokenize_request::Input;
    let input = match (v.get("prompt"), v.get("messages")) {
        (Some(p), None) => Input::Text(string(p, "prompt")?.to_string()),
        (None, m @ Some(_)) => Input::Chat(pb::ChatMessages {
            messages: chat_messages(m)?,
        }),
        _ => return Err(ApiError::bad("prompt", "give either prompt or messages")),
    };
    Ok(pb::TokenizeRequest { input: Some(input) })
}

/// `/detokenize`: `{"tokens": [ids]}`.
pub fn parse_detokenize(body: &[u8]) -> Result<pb::DetokenizeRequest, ApiError> {
    let v: Value = from_json(body)?;
    let Some(Value::Array(ids)) = v.get("tokens") else {
        return Err(ApiError::bad("tokens", "required: an array of token ids"));
    };
    Ok(pb::DetokenizeRequest {
        token_ids: token_ids(ids, "tokens")?,
        skip_special_tokens: false,
    })
}

fn from_json<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| ApiError {
        status: 400,
        message: format!("the body is not valid JSON: {e}"),
        param: None,
        code: None,
    })?;
    if !v.is_object() {
        return Err(ApiError {
            status: 400,
            message: "the body must be a JSON object".into(),
            param: None,
            code: None,
        });
    }
    serde_json::from_value(v).map_err(|e| ApiError {
        status: 400,
        message: format!("bad request body: {e}"),
        param: None,
        code: None,
    })
}

/// The shared fields, onto a `GenerateRequest` for `input`. `max_completion_tokens`
/// (chat's newer name) wins over `max_tokens`.
fn common(
    c: Common,
    input: pb::generate_request::Input,
    max_completion_tokens: Option<Value>,
) -> Result<Parsed, ApiError> {
    let model = match given(&c.model) {
        None => None,
        Some(v) => Some(string(v, "model")?.to_string()),
    };
    if let Some(n) = given(&c.n) {
        integer(n, "n", 1, 1).map_err(|_| ApiError::bad("n", "only n=1 is supported"))?;
    }
    for (v, p) in [
        (&c.presence_penalty, "presence_penalty"),
        (&c.frequency_penalty, "frequency_penalty"),
    ] {
        if let Some(v) = given(v)
            && number(v, p, -2.0, 2.0)? != 0.0
        {
            return Err(ApiError::bad(
                p,
                "penalties are not supported (they would change the target's distribution)",
            ));
        }
    }
    let max_new_tokens = match (max_completion_tokens.as_ref(), given(&c.max_tokens)) {
        (Some(v), _) => Some(integer(v, "max_completion_tokens", 1, u32::MAX as i64)? as u32),
        (None, Some(v)) => Some(integer(v, "max_tokens", 1, u32::MAX as i64)? as u32),
        (None, None) => None,
    };
    let temperature = match given(&c.temperature) {
        Some(v) => number(v, "temperature", 0.0, 2.0)? as f32,
        None => 1.0,
    };
    let top_p = match given(&c.top_p) {
        Some(v) => number(v, "top_p", f64::MIN_POSITIVE, 1.0)? as f32,
        None => 1.0,
    };
    let top_k = match given(&c.top_k) {
        // vLLM's extension: -1 or 0 keeps every token.
        Some(v) => integer(v, "top_k", -1, u32::MAX as i64)?.max(0) as u32,
        None => 0,
    };
    let seed = match given(&c.seed) {
        Some(v) => Some(integer(v, "seed", 0, i64::MAX)? as u64),
        None => None,
    };
    let stream = match given(&c.stream) {
        Some(v) => boolean(v, "stream")?,
        None => false,
    };
    let include_usage = match given(&c.stream_options) {
        None => false,
        Some(o) => {
            if !stream {
                return Err(ApiError::bad("stream_options", "only with stream: true"));
            }
            match o.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(v) => boolean(v, "stream_options.include_usage")?,
            }
        }
    };
    let stop = match given(&c.stop) {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, s)| string(s, &format!("stop[{i}]")).map(str::to_string))
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(ApiError::bad(
                "stop",
                format!("expected a string or an array of strings, got {other}"),
            ));
        }
    };
    let strategy = match given(&c.strategy) {
        None => pb::Strategy::Auto,
        Some(v) => {
            let name = string(v, "strategy")?;
            pb::Strategy::from_str_name(&format!("STRATEGY_{}", name.to_ascii_uppercase()))
                .ok_or_else(|| {
                    ApiError::bad(
                        "strategy",
                        format!("one of auto, greedy, speculative, lookahead, trie, ouroboros; got {name:?}"),
                    )
                })?
        }
    };
    let params = match given(&c.ouroboros) {
        None => None,
        Some(Value::Object(o)) => Some(strategy_params(o)?),
        Some(other) => {
            return Err(ApiError::bad(
                "ouroboros",
                format!("expected an object, got {other}"),
            ));
        }
    };
    Ok(Parsed {
        request: pb::GenerateRequest {
            input: Some(input),
            max_new_tokens,
            stop,
            sampling: Some(common::Sampling {
                temperature,
                top_p,
                top_k,
                seed,
            }),
            strategy: strategy as i32,
            params,
            logprobs: None,
        },
        stream,
        include_usage,
        model,
    })
}

fn strategy_params(o: &Map<String, Value>) -> Result<pb::StrategyParams, ApiError> {
    let count = |key: &str| -> Result<Option<u32>, ApiError> {
        o.get(key)
            .filter(|v| !v.is_null())
            .map(|v| integer(v, &format!("ouroboros.{key}"), 0, u32::MAX as i64).map(|n| n as u32))
            .transpose()
    };
    for key in o.keys() {
        if !["gamma", "topk", "trie_budget", "draft_stop", "lookahead"].contains(&key.as_str()) {
            return Err(ApiError::bad(
                &format!("ouroboros.{key}"),
                "unknown (gamma, topk, trie_budget, draft_stop, lookahead)",
            ));
        }
    }
    let lookahead = match o.get("lookahead").filter(|v| !v.is_null()) {
        None => None,
        Some(Value::Object(l)) => {
            let get = |key: &str| -> Result<u32, ApiError> {
                let v = l.get(key).ok_or_else(|| {
                    ApiError::bad(&format!("ouroboros.lookahead.{key}"), "required")
                })?;
                integer(v, &format!("ouroboros.lookahead.{key}"), 0, u32::MAX as i64)
                    .map(|n| n as u32)
            };
            Some(common::Lookahead {
                level: get("level")?,
                window: get("window")?,
                guess: get("guess")?,
            })
        }
        Some(other) => {
            return Err(ApiError::bad(
                "ouroboros.lookahead",
                format!("expected an object, got {other}"),
            ));
        }
    };
    Ok(pb::StrategyParams {
        gamma: count("gamma")?,
        lookahead,
        topk: count("topk")?,
        trie_budget: count("trie_budget")?,
        draft_stop: o
            .get("draft_stop")
            .filter(|v| !v.is_null())
            .map(|v| number(v, "ouroboros.draft_stop", 0.0, 1.0).map(|x| x as f32))
            .transpose()?,
    })
}

/// OpenAI's finish reason: "stop" for an end-of-sequence token or a stop string.
pub fn finish_name(code: i32) -> &'static str {
    match pb::FinishReason::try_from(code) {
        Ok(pb::FinishReason::Length | pb::FinishReason::ContextFull) => "length",
        _ => "stop",
    }
}

pub fn usage(u: &pb::Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

/// Our statistics, as the `ouroboros` field of a response.
pub fn stats(s: &pb::SpecStats) -> Value {
    json!({
        "strategy": s.strategy,
        "target_forwards": s.target_forwards,
        "draft_forwards": s.draft_forwards,
        "drafted_tokens": s.drafted_tokens,
        "accepted_tokens": s.accepted_tokens,
        "mean_accepted_length": s.mean_accepted_length,
        "candidate_tokens": s.candidate_tokens,
        "trie_accepted": s.trie_accepted,
        "draft_fallback": s.draft_fallback,
        "total_s": s.total_s,
    })
}

/// Log-probabilities in OpenAI's shape for `kind` (`text` spells a token id); null when
/// none were asked for.
pub fn logprobs(kind: Kind, l: &[common::TokenLogprobs], text: &dyn Fn(u32) -> String) -> Value {
    if l.is_empty() {
        return Value::Null;
    }
    match kind {
        Kind::Completion => {
            let tokens: Vec<String> = l.iter().map(|t| text(t.token)).collect();
            let mut offset = 0;
            let offsets: Vec<usize> = tokens
                .iter()
                .map(|t| {
                    let at = offset;
                    offset += t.len();
                    at
                })
                .collect();
            let top: Vec<Value> = l
                .iter()
                .map(|t| {
                    let m: Map<String, Value> = t
                        .top_tokens
                        .iter()
                        .zip(&t.top_logprobs)
                        .map(|(&id, &lp)| (text(id), json!(lp)))
                        .collect();
                    Value::Object(m)
                })
                .collect();
            json!({
                "tokens": tokens,
                "token_logprobs": l.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                "top_logprobs": top,
                "text_offset": offsets,
            })
        }
        Kind::Chat => {
            let entry = |id: u32, lp: f32| {
                let t = text(id);
                json!({"token": t, "logprob": lp, "bytes": t.as_bytes()})
            };
            let content: Vec<Value> = l
                .iter()
                .map(|t| {
                    let mut e = entry(t.token, t.logprob);
                    e["top_logprobs"] = t
                        .top_tokens
                        .iter()
                        .zip(&t.top_logprobs)
                        .map(|(&id, &lp)| entry(id, lp))
                        .collect();
                    e
                })
                .collect();
            json!({"content": content, "refusal": null})
        }
    }
}

/// A whole response (`id`, `created` and `model` from the caller; `text` spells token ids
/// for the log-probabilities).
pub fn response(
    kind: Kind,
    (id, created, model): (&str, u64, &str),
    r: &pb::GenerateResponse,
    text: &dyn Fn(u32) -> String,
) -> Value {
    let finish = finish_name(r.finish_reason);
    let lp = logprobs(kind, &r.logprobs, text);
    let choice = match kind {
        Kind::Completion => json!({
            "index": 0, "text": r.text, "logprobs": lp, "finish_reason": finish,
        }),
        Kind::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": r.text},
            "logprobs": lp,
            "finish_reason": finish,
        }),
    };
    let mut v = json!({
        "id": id,
        "object": match kind { Kind::Completion => "text_completion", Kind::Chat => "chat.completion" },
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": r.usage.as_ref().map(usage),
        "ouroboros": r.stats.as_ref().map(stats),
    });
    if let Some(seed) = r.seed {
        v["seed"] = json!(seed);
    }
    v
}

/// One streamed chunk: `text` as a delta (`first` adds chat's role), or the closing
/// `finish` reason.
pub fn chunk(
    kind: Kind,
    (id, created, model): (&str, u64, &str),
    text: Option<&str>,
    first: bool,
    finish: Option<&str>,
) -> Value {
    let choice = match kind {
        Kind::Completion => json!({
            "index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish,
        }),
        Kind::Chat => {
            let mut delta = Map::new();
            if first {
                delta.insert("role".into(), json!("assistant"));
            }
            if let Some(t) = text {
                delta.insert("content".into(), json!(t));
            }
            json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
        }
    };
    json!({
        "id": id,
        "object": match kind { Kind::Completion => "text_completion", Kind::Chat => "chat.completion.chunk" },
        "created": created,
        "model": model,
        "choices": [choice],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> Result<Parsed, ApiError> {
        parse_chat(body.to_string().as_bytes())
    }

    fn completion(body: Value) -> Result<Parsed, ApiError> {
        parse_completion(body.to_string().as_bytes())
    }

    #[test]
    fn a_chat_request_becomes_a_generate_request() {
        let p = chat(json!({
            "model": "m", "stream": true, "stream_options": {"include_usage": true},
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
            ],
            "max_tokens": 9, "max_completion_tokens": 64, "temperature": 0, "seed": 7,
            "stop": "\n", "strategy": "ouroboros",
            "ouroboros": {"gamma": 4, "lookahead": {"level": 4, "window": 2, "guess": 2}},
        }))
        .unwrap();
        assert!(p.stream && p.include_usage);
        assert_eq!(p.model.as_deref(), Some("m"));
        let r = p.request;
        assert_eq!(r.max_new_tokens, Some(64));
        assert_eq!(r.stop, ["\n"]);
        assert_eq!(r.strategy, pb::Strategy::Ouroboros as i32);
        let s = r.sampling.unwrap();
        assert_eq!((s.temperature, s.top_p, s.seed), (0.0, 1.0, Some(7)));
        let params = r.params.unwrap();
        assert_eq!(params.gamma, Some(4));
        assert_eq!(params.lookahead.unwrap().window, 2);
        let Some(pb::generate_request::Input::Chat(c)) = r.input else {
            panic!("not chat")
        };
        assert_eq!(c.messages[1].content, "Hi there");
        assert_eq!(c.messages[0].role, "system");
    }

    #[test]
    fn openai_defaults_sample_at_temperature_one() {
        let p = completion(json!({"prompt": "x"})).unwrap();
        let s = p.request.sampling.unwrap();
        assert_eq!(
            (s.temperature, s.top_p, s.top_k, s.seed),
            (1.0, 1.0, 0, None)
        );
        assert_eq!(p.request.strategy, pb::Strategy::Auto as i32);
        assert!(!p.stream);
    }

    #[test]
    fn prompts_are_text_or_token_ids() {
        let input = |v: Value| completion(json!({"prompt": v})).map(|p| p.request.input.unwrap());
        use pb::generate_request::Input;
        assert_eq!(input(json!(["a"])).unwrap(), Input::Prompt("a".into()));
        assert_eq!(
            input(json!([1, 2])).unwrap(),
            Input::TokenIds(pb::TokenIds { ids: vec![1, 2] })
        );
        assert_eq!(
            input(json!([[3]])).unwrap(),
            Input::TokenIds(pb::TokenIds { ids: vec![3] })
        );
        for bad in [json!(["a", "b"]), json!([]), json!(5), json!([-1])] {
            assert_eq!(input(bad).unwrap_err().param.as_deref(), Some("prompt"));
        }
    }

    /// Each bad parameter gets a 400 naming it.
    #[test]
    fn bad_parameters_are_named() {
        let cases = [
            (json!({"prompt": "x", "max_tokens": -1}), "max_tokens"),
            (json!({"prompt": "x", "max_tokens": "ten"}), "max_tokens"),
            (json!({"prompt": "x", "temperature": 3}), "temperature"),
            (json!({"prompt": "x", "top_p": 0}), "top_p"),
            (json!({"prompt": "x", "n": 2}), "n"),
            (json!({"prompt": "x", "seed": -5}), "seed"),
            (json!({"prompt": "x", "stop": [1]}), "stop[0]"),
            (json!({"prompt": "x", "stream": "yes"}), "stream"),
            (
                json!({"prompt": "x", "stream_options": {"include_usage": true}}),
                "stream_options",
            ),
            (json!({"prompt": "x", "strategy": "fast"}), "strategy"),
            (
                json!({"prompt": "x", "ouroboros": {"gama": 3}}),
                "ouroboros.gama",
            ),
            (json!({"prompt": "x", "logprobs": 21}), "logprobs"),
            (json!({"prompt": "x", "echo": true}), "echo"),
            (
                json!({"prompt": "x", "presence_penalty": 0.5}),
                "presence_penalty",
            ),
            (json!({"max_tokens": 3}), "prompt"),
        ];
        for (body, param) in cases {
            let e = completion(body.clone()).unwrap_err();
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e:?}");
            assert!(e.message.starts_with(param), "{e:?}");
        }
        let e = chat(json!({"messages": [], "top_logprobs": 3})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("top_logprobs"));
        let p = chat(json!({"messages": [], "logprobs": true, "top_logprobs": 3})).unwrap();
        assert_eq!(p.request.logprobs, Some(3));
        let p = completion(json!({"prompt": "x", "logprobs": 5})).unwrap();
        assert_eq!(p.request.logprobs, Some(5));
        let e = chat(json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}))
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content[0]"));
        assert_eq!(
            chat(json!({})).unwrap_err().param.as_deref(),
            Some("messages")
        );
        let e = parse_chat(b"{not json").unwrap_err();
        assert_eq!((e.status, e.param), (400, None));
    }

    #[test]
    fn statuses_map_to_http_codes_and_openai_names() {
        use tonic::{Code, Status};
        let field = proto::convert::field_status("max_new_tokens", "max_new_tokens: bad".into());
        let e = ApiError::of_status(&field, Kind::Completion);
        assert_eq!((e.status, e.param.as_deref()), (400, Some("max_tokens")));
        let e = ApiError::of_status(
            &proto::convert::field_status("chat.messages", "x".into()),
            Kind::Chat,
        );
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e = ApiError::of_status(
            &proto::convert::field_status("params.gamma", "x".into()),
            Kind::Chat,
        );
        assert_eq!(e.param.as_deref(), Some("ouroboros.gamma"));
        for (code, http) in [
            (Code::Unauthenticated, 401),
            (Code::NotFound, 404),
            (Code::ResourceExhausted, 429),
            (Code::Unavailable, 503),
            (Code::Internal, 500),
        ] {
            assert_eq!(
                ApiError::of_status(&Status::new(code, "m"), Kind::Chat).status,
                http
            );
        }
        let body = ApiError::bad("n", "only 1").body();
        assert_eq!(body["error"]["param"], "n");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
}
