//! Mapping between the wire messages and the `decoding` types, and between `DecodingError` and
//! gRPC status codes in both directions (services answer with a status; remote backends
//! turn it back into the error the decoding loops understand).

use crate::common::v1 as pb;
use decoding::{
    DecodingError, LookaheadParams, Ngram, SamplingParams, ServerTiming, TokenLogprobs,
};
use engine::EngineError;
use engine::chat_template::ChatTemplateSource;
use engine::vocab::VocabDigest;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

impl From<ServerTiming> for pb::ServerTiming {
    fn from(t: ServerTiming) -> Self {
        Self {
            queue_s: t.queue,
            forward_s: t.forward,
            total_s: t.total,
            batch_trees: t.batch_trees,
            batch_rows: t.batch_rows,
            open_sessions: t.open_sessions,
            batch_prefill_rows: t.batch_prefill_rows,
        }
    }
}

impl From<pb::ServerTiming> for ServerTiming {
    fn from(t: pb::ServerTiming) -> Self {
        Self {
            queue: t.queue_s,
            forward: t.forward_s,
            total: t.total_s,
            batch_trees: t.batch_trees,
            batch_rows: t.batch_rows,
            open_sessions: t.open_sessions,
            batch_prefill_rows: t.batch_prefill_rows,
        }
    }
}

/// Absent sampling is greedy; `top_p` 0 (the proto default) keeps everything.
pub fn sampling_from_pb(s: Option<&pb::Sampling>) -> SamplingParams {
    match s {
        None => SamplingParams::greedy(),
        Some(s) => SamplingParams {
            temperature: s.temperature,
            top_p: if s.top_p == 0.0 { 1.0 } else { s.top_p },
            top_k: s.top_k as usize,
            // A public request without one got a drawn seed at validation.
            seed: s.seed.unwrap_or_default(),
        },
    }
}

pub fn sampling_to_pb(s: &SamplingParams) -> Option<pb::Sampling> {
    if s.is_greedy() {
        return None;
    }
    Some(pb::Sampling {
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k as u32,
        seed: Some(s.seed),
    })
}

impl From<&pb::Lookahead> for LookaheadParams {
    fn from(l: &pb::Lookahead) -> Self {
        Self {
            level: l.level as usize,
            window: l.window as usize,
            guess: l.guess as usize,
        }
    }
}

impl From<&LookaheadParams> for pb::Lookahead {
    fn from(l: &LookaheadParams) -> Self {
        Self {
            level: l.level as u32,
            window: l.window as u32,
            guess: l.guess as u32,
        }
    }
}

impl From<&Ngram> for pb::Phrase {
    fn from(n: &Ngram) -> Self {
        Self {
            key: n.key,
            tokens: n.phrase.clone(),
        }
    }
}

impl From<pb::Phrase> for Ngram {
    fn from(p: pb::Phrase) -> Self {
        Self {
            key: p.key,
            phrase: p.tokens,
        }
    }
}

impl From<&ChatTemplateSource> for pb::ChatTemplate {
    fn from(t: &ChatTemplateSource) -> Self {
        Self {
            template: t.template.clone(),
            bos_token: t.bos_token.clone(),
            eos_token: t.eos_token.clone(),
        }
    }
}

impl From<&pb::ChatTemplate> for ChatTemplateSource {
    fn from(t: &pb::ChatTemplate) -> Self {
        Self {
            template: t.template.clone(),
            bos_token: t.bos_token.clone(),
            eos_token: t.eos_token.clone(),
        }
    }
}

impl From<&TokenLogprobs> for pb::TokenLogprobs {
    fn from(t: &TokenLogprobs) -> Self {
        Self {
            token: t.token,
            logprob: t.logprob,
            top_tokens: t.top.iter().map(|x| x.0).collect(),
            top_logprobs: t.top.iter().map(|x| x.1).collect(),
        }
    }
}

impl From<pb::TokenLogprobs> for TokenLogprobs {
    fn from(t: pb::TokenLogprobs) -> Self {
        Self {
            token: t.token,
            logprob: t.logprob,
            top: t.top_tokens.into_iter().zip(t.top_logprobs).collect(),
        }
    }
}

impl From<VocabDigest> for pb::Vocabulary {
    fn from(d: VocabDigest) -> Self {
        Self {
            entries: d.entries as u32,
            fingerprint: d.fingerprint,
            fingerprint_entries: d.fingerprinted as u32,
        }
    }
}

impl From<&pb::Vocabulary> for VocabDigest {
    fn from(v: &pb::Vocabulary) -> Self {
        Self {
            entries: v.entries as usize,
            fingerprinted: v.fingerprint_entries as usize,
            fingerprint: v.fingerprint,
        }
    }
}

/// INVALID_ARGUMENT for a field: the message starts with the field's name, and the
/// details carry a `google.rpc.BadRequest` naming it (as `grpcio-status` and other clients
/// decode them).
pub fn field_status(field: &str, message: String) -> Status {
    Status::with_error_details(
        Code::InvalidArgument,
        message.clone(),
        ErrorDetails::with_bad_request_violation(field, message),
    )
}

/// The field a status's `BadRequest` details name, if any.
pub fn field_of(s: &Status) -> Option<String> {
    s.get_details_bad_request()
        .and_then(|b| b.field_violations.into_iter().next())
        .map(|v| v.field)
}

/// The status a service answers with for an error. A field error's message starts with
/// the field it names (and its details name it); an unknown session's with `session_id`.
pub fn status_of(e: &DecodingError) -> Status {
    if let DecodingError::Field(f) = e {
        return field_status(&f.field, e.to_string());
    }
    let code = match e {
        DecodingError::UnknownSession(_) => {
            return Status::not_found(format!("session_id: {e}"));
        }
        DecodingError::InvalidTree(_)
        | DecodingError::InvalidArgument(_)
        | DecodingError::Field(_) => Code::InvalidArgument,
        DecodingError::ContextOverflow(_) => Code::OutOfRange,
        DecodingError::Exhausted(_) => Code::ResourceExhausted,
        DecodingError::Unavailable(_) => Code::Unavailable,
        DecodingError::Engine(EngineError::ContextOverflow { .. }) => Code::OutOfRange,
        DecodingError::Engine(EngineError::InvalidInput(_)) => Code::InvalidArgument,
        DecodingError::Engine(_) | DecodingError::Backend(_) => Code::Internal,
    };
    Status::new(code, e.to_string())
}

/// Whether `s` is the client's report of a failed transport rather than an answer.
fn broken_connection(s: &Status) -> bool {
    let mut cause = std::error::Error::source(s);
    while let Some(e) = cause {
        if e.is::<tonic::transport::Error>() || e.is::<std::io::Error>() {
            return true;
        }
        cause = e.source();
    }
    false
}

/// The error a remote backend reports for a status it received about `session`.
pub fn error_of(s: &Status, session: Option<u64>) -> DecodingError {
    let msg = s.message().to_string();
    match (s.code(), session) {
        (Code::NotFound, Some(id)) => DecodingError::UnknownSession(id),
        (Code::InvalidArgument, _) => DecodingError::InvalidArgument(msg),
        (Code::OutOfRange, _) => DecodingError::ContextOverflow(msg),
        (Code::ResourceExhausted, _) => DecodingError::Exhausted(msg),
        (Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled, _) => {
            DecodingError::Unavailable(msg)
        }
        // The connection broke under the call (the peer died mid-answer): the client's
        // own status, as unreachable as a refused connection.
        (Code::Unknown, _) if broken_connection(s) => {
            DecodingError::Unavailable(format!("the connection broke: {msg}"))
        }
        (code, _) => DecodingError::Backend(format!("{code:?}: {msg}")),
    }
}
