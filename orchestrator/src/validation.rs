//! The public request checked once, where it enters: a `GenerateRequest` becomes a
//! [`ValidRequest`] (prompt token ids, decoding parameters with the server's defaults
//! filled in, stop strings) that the rest of the orchestrator takes as given. Every field
//! error is INVALID_ARGUMENT with a message that starts with the field's name; the limits
//! are those of [`decoding::validate::limits`]. Tokenization and chat rendering run on the
//! blocking pool, off the async workers.

use crate::chat::ChatTemplate;
use crate::pipeline::Runner;
use decoding::validate::{FieldError, check_vocab, limits};
use decoding::{DecodeParams, LookaheadParams, SamplingParams, Strategy};
use proto::convert::{field_status, sampling_from_pb, status_of};
use proto::v1 as pb;
use std::sync::Arc;
use tokenizers::Tokenizer;
use tonic::Status;

/// Text past [`limits::MAX_TEXT_BYTES`] is refused before it is tokenized.
fn text_size(name: &str, bytes: usize) -> Result<(), Status> {
    if bytes > limits::MAX_TEXT_BYTES {
        return Err(field(FieldError::new(
            name,
            format!("at most {} bytes of text", limits::MAX_TEXT_BYTES),
            format!("{bytes} bytes"),
        )));
    }
    Ok(())
}

/// A seed for a sampled request that gave none: random, below 2^53 so that JSON clients
/// (whose numbers are doubles) can give it back exactly.
pub fn draw_seed() -> u64 {
    rand::random::<u64>() >> 11
}

/// A request that passed every check.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub prompt: Vec<u32>,
    pub params: DecodeParams,
    pub stop: Vec<String>,
}

#[derive(Clone)]
pub struct Validator {
    runner: Arc<dyn Runner>,
    tokenizer: Arc<Tokenizer>,
    chat: Arc<ChatTemplate>,
    eos: Vec<u32>,
    /// Server defaults for what a request leaves out.
    defaults: DecodeParams,
}

fn field(e: FieldError) -> Status {
    status_of(&e.into())
}

impl Validator {
    pub fn new(
        runner: Arc<dyn Runner>,
        tokenizer: Arc<Tokenizer>,
        chat: Arc<ChatTemplate>,
        eos: Vec<u32>,
        defaults: DecodeParams,
    ) -> Self {
        Self {
            runner,
            tokenizer,
            chat,
            eos,
            defaults,
        }
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    pub fn chat(&self) -> &ChatTemplate {
        &self.chat
    }

    /// `text`'s token ids; a failure names `field`.
    pub fn encode(&self, text: &str, field: &str) -> Result<Vec<u32>, Status> {
        engine::tokenizer::encode(&self.tokenizer, text)
            .map_err(|e| field_status(field, format!("{field}: {e}")))
    }

    /// Messages rendered in the model's chat template, the assistant's turn opened.
    pub fn render_chat(&self, messages: &[pb::ChatMessage]) -> Result<String, Status> {
        self.chat
            .render(messages)
            .map_err(|e| field_status("chat.messages", e))
    }

    /// Checks `r` and tokenizes its input (on the blocking pool).
    pub async fn validate(&self, r: pb::GenerateRequest) -> Result<ValidRequest, Status> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.validate_blocking(r))
            .await
            .map_err(|e| Status::internal(format!("validation task failed: {e}")))?
    }

    /// As [`Self::validate`], on the calling thread.
    pub fn validate_blocking(&self, r: pb::GenerateRequest) -> Result<ValidRequest, Status> {
        let info = self.runner.target_info();
        let prompt = self.prompt(r.input, info.vocab_size)?;
        if prompt.len() >= info.max_position {
            return Err(field(FieldError::new(
                "prompt",
                format!("shorter than the model's context of {}", info.max_position),
                format!("{} tokens", prompt.len()),
            )));
        }
        let d = &self.defaults;
        let max_new_tokens = match r.max_new_tokens {
            None => d.max_new_tokens,
            Some(n) if n as usize > info.max_position => {
                return Err(field(FieldError::new(
                    "max_new_tokens",
                    format!("at most the model's context of {}", info.max_position),
                    n,
                )));
            }
            Some(n) => n as usize,
        };
        if let Some(i) = r.stop.iter().position(String::is_empty) {
            return Err(field(FieldError::new(
                format!("stop[{i}]"),
                "a non-empty string",
                "\"\"",
            )));
        }
        if r.stop.len() > limits::MAX_STOP_STRINGS {
            return Err(field(FieldError::new(
                "stop",
                format!("at most {} strings", limits::MAX_STOP_STRINGS),
                r.stop.len(),
            )));
        }
        if let Some(i) = r.stop.iter().position(|s| s.len() > limits::MAX_STOP_BYTES) {
            return Err(field(FieldError::new(
                format!("stop[{i}]"),
                format!("at most {} bytes", limits::MAX_STOP_BYTES),
                format!("{} bytes", r.stop[i].len()),
            )));
        }
        let sampling = match &r.sampling {
            // The server's default sampling, with a seed of the request's own.
            None if !d.sampling.is_greedy() => SamplingParams {
                seed: draw_seed(),
                ..d.sampling
            },
            None => d.sampling,
            Some(s) => {
                let mut p = sampling_from_pb(Some(s));
                if s.seed.is_none() {
                    p.seed = draw_seed();
                }
                p
            }
        };
        let strategy = self.strategy(r.strategy)?;
        let p = r.params.unwrap_or_default();
        let params = DecodeParams {
            strategy,
            max_new_tokens,
            eos: self.eos.clone(),
            sampling,
            gamma: p.gamma.map_or(d.gamma, |g| g as usize),
            draft_stop: p.draft_stop.unwrap_or(d.draft_stop),
            lookahead: p
                .lookahead
                .as_ref()
                .map_or(d.lookahead, LookaheadParams::from),
            topk: p.topk.map_or(d.topk, |k| k as usize),
            harvest_committed: d.harvest_committed,
            trie_budget: p.trie_budget.map_or(d.trie_budget, |k| k as usize),
            logprobs: r.logprobs.map(|n| n as usize),
            overlap: d.overlap,
        };
        params.validate().map_err(|e| status_of(&e))?;
        Ok(ValidRequest {
            prompt,
            params,
            stop: r.stop,
        })
    }

    /// The prompt's token ids: text tokenized, ids checked against the vocabulary, chat
    /// rendered in the model's template.
    fn prompt(
        &self,
        input: Option<pb::generate_request::Input>,
        vocab: usize,
    ) -> Result<Vec<u32>, Status> {
        use pb::generate_request::Input;
        let encode = |text: &str, what: &str| self.encode(text, what);
        let prompt = match input {
            None => {
                return Err(field(FieldError::new(
                    "input",
                    "one of prompt, token_ids or chat",
                    "none",
                )));
            }
            Some(Input::Prompt(p)) => {
                text_size("prompt", p.len())?;
                encode(&p, "prompt")?
            }
            Some(Input::TokenIds(t)) => {
                check_vocab(&t.ids, vocab, "token_ids").map_err(|e| status_of(&e))?;
                t.ids
            }
            Some(Input::Chat(c)) => {
                if c.messages.len() > limits::MAX_CHAT_MESSAGES {
                    return Err(field(FieldError::new(
                        "chat.messages",
                        format!("at most {} messages", limits::MAX_CHAT_MESSAGES),
                        c.messages.len(),
                    )));
                }
                let bytes = c
                    .messages
                    .iter()
                    .map(|m| m.role.len() + m.content.len())
                    .sum();
                text_size("chat.messages", bytes)?;
                let text = self.render_chat(&c.messages)?;
                encode(&text, "chat")?
            }
        };
        if prompt.is_empty() {
            return Err(field(FieldError::new(
                "prompt",
                "at least one token",
                "none",
            )));
        }
        Ok(prompt)
    }

    fn strategy(&self, code: i32) -> Result<Strategy, Status> {
        let s = pb::Strategy::try_from(code).map_err(|_| {
            field(FieldError::new(
                "strategy",
                "a known strategy",
                format!("value {code}"),
            ))
        })?;
        Ok(match s {
            // Without a cost profile nothing says speculation pays here.
            pb::Strategy::Auto if self.runner.has_auto() => Strategy::Auto,
            pb::Strategy::Auto | pb::Strategy::Greedy => Strategy::Greedy,
            pb::Strategy::Speculative => Strategy::Speculative,
            pb::Strategy::Ouroboros => Strategy::Ouroboros,
            pb::Strategy::Trie => Strategy::Trie,
            pb::Strategy::Lookahead if self.runner.has_lookahead() => Strategy::Lookahead,
            pb::Strategy::Lookahead => {
                return Err(Status::failed_precondition(
                    "strategy: this server has no lookahead host",
                ));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use decoding::{BackendInfo, Generation};
    use futures::future::BoxFuture;
    use proto::common::v1::{Lookahead, Sampling};
    use tonic::Code;

    /// A runner that only answers what validation asks.
    struct Info;

    impl Runner for Info {
        fn target_info(&self) -> BackendInfo {
            BackendInfo {
                model: "test".into(),
                vocab_size: 32,
                max_position: 64,
                vocab: None,
            }
        }
        fn has_draft(&self) -> bool {
            true
        }
        fn run(
            &self,
            _: Vec<u32>,
            _: DecodeParams,
            _: crate::pipeline::BoxedSink,
        ) -> BoxFuture<'static, decoding::Result<Generation>> {
            unreachable!("validation runs nothing")
        }
    }

    fn validator() -> Validator {
        let t = crate::testing::word_tokenizer(32);
        Validator::new(
            Arc::new(Info),
            Arc::new(t),
            Arc::new(ChatTemplate::chatml()),
            vec![],
            DecodeParams::default(),
        )
    }

    fn good() -> pb::GenerateRequest {
        pb::GenerateRequest {
            input: Some(pb::generate_request::Input::TokenIds(pb::TokenIds {
                ids: vec![1, 2, 3],
            })),
            max_new_tokens: Some(8),
            strategy: pb::Strategy::Ouroboros as i32,
            ..Default::default()
        }
    }

    /// Each bad field of the public request gets INVALID_ARGUMENT whose message starts
    /// with that field (FAILED_PRECONDITION for a strategy this server lacks).
    #[test]
    fn each_bad_field_is_named() {
        let v = validator();
        let ok = v.validate_blocking(good()).unwrap();
        assert_eq!(ok.prompt, vec![1, 2, 3]);
        assert_eq!(ok.params.strategy, Strategy::Ouroboros);
        type Edit = Box<dyn Fn(&mut pb::GenerateRequest)>;
        let params = |f: fn(&mut pb::StrategyParams)| -> Edit {
            Box::new(move |r| {
                let mut p = pb::StrategyParams::default();
                f(&mut p);
                r.params = Some(p);
            })
        };
        let sampling = |t: f32, p: f32| -> Edit {
            Box::new(move |r| {
                r.sampling = Some(Sampling {
                    temperature: t,
                    top_p: p,
                    ..Default::default()
                })
            })
        };
        let ids = |ids: Vec<u32>| -> Edit {
            Box::new(move |r| {
                r.input = Some(pb::generate_request::Input::TokenIds(pb::TokenIds {
                    ids: ids.clone(),
                }))
            })
        };
        let cases: Vec<(&str, Edit, Code)> = vec![
            ("input", Box::new(|r| r.input = None), Code::InvalidArgument),
            ("prompt", ids(vec![]), Code::InvalidArgument),
            ("prompt", ids(vec![1; 64]), Code::InvalidArgument),
            ("token_ids", ids(vec![1, 40]), Code::InvalidArgument),
            (
                "prompt",
                Box::new(|r| r.input = Some(pb::generate_request::Input::Prompt(String::new()))),
                Code::InvalidArgument,
            ),
            (
                "chat.messages",
                Box::new(|r| {
                    r.input = Some(pb::generate_request::Input::Chat(pb::ChatMessages {
                        messages: vec![],
                    }))
                }),
                Code::InvalidArgument,
            ),
            (
                "max_new_tokens",
                Box::new(|r| r.max_new_tokens = Some(0)),
                Code::InvalidArgument,
            ),
            (
                "max_new_tokens",
                Box::new(|r| r.max_new_tokens = Some(65)),
                Code::InvalidArgument,
            ),
            (
                "stop[1]",
                Box::new(|r| r.stop = vec!["a".into(), String::new()]),
                Code::InvalidArgument,
            ),
            (
                "stop",
                Box::new(|r| r.stop = vec!["a".into(); limits::MAX_STOP_STRINGS + 1]),
                Code::InvalidArgument,
            ),
            (
                "stop[0]",
                Box::new(|r| r.stop = vec!["a".repeat(limits::MAX_STOP_BYTES + 1)]),
                Code::InvalidArgument,
            ),
            (
                "prompt",
                Box::new(|r| {
                    r.input = Some(pb::generate_request::Input::Prompt(
                        "w1 ".repeat(limits::MAX_TEXT_BYTES / 3 + 1),
                    ))
                }),
                Code::InvalidArgument,
            ),
            (
                "chat.messages",
                Box::new(|r| {
                    let m = pb::ChatMessage {
                        role: "user".into(),
                        content: "w1".into(),
                    };
                    r.input = Some(pb::generate_request::Input::Chat(pb::ChatMessages {
                        messages: vec![m; limits::MAX_CHAT_MESSAGES + 1],
                    }))
                }),
                Code::InvalidArgument,
            ),
            (
                "chat.messages",
                Box::new(|r| {
                    let m = pb::ChatMessage {
                        role: "user".into(),
                        content: "w1 ".repeat(limits::MAX_TEXT_BYTES / 3 + 1),
                    };
                    r.input = Some(pb::generate_request::Input::Chat(pb::ChatMessages {
                        messages: vec![m],
                    }))
                }),
                Code::InvalidArgument,
            ),
            (
                "sampling.temperature",
                sampling(-1.0, 1.0),
                Code::InvalidArgument,
            ),
            ("sampling.top_p", sampling(0.7, 1.5), Code::InvalidArgument),
            (
                "strategy",
                Box::new(|r| r.strategy = 99),
                Code::InvalidArgument,
            ),
            (
                "strategy",
                Box::new(|r| r.strategy = pb::Strategy::Lookahead as i32),
                Code::FailedPrecondition,
            ),
            (
                "params.gamma",
                params(|p| p.gamma = Some(0)),
                Code::InvalidArgument,
            ),
            (
                "params.gamma",
                params(|p| p.gamma = Some(65)),
                Code::InvalidArgument,
            ),
            (
                "params.draft_stop",
                params(|p| p.draft_stop = Some(1.0)),
                Code::InvalidArgument,
            ),
            (
                "params.topk",
                params(|p| p.topk = Some(17)),
                Code::InvalidArgument,
            ),
            (
                "params.trie_budget",
                params(|p| p.trie_budget = Some(257)),
                Code::InvalidArgument,
            ),
            (
                "params.lookahead.level",
                params(|p| {
                    p.lookahead = Some(Lookahead {
                        level: 2,
                        window: 4,
                        guess: 4,
                    })
                }),
                Code::InvalidArgument,
            ),
            (
                "params.lookahead.window",
                params(|p| {
                    p.lookahead = Some(Lookahead {
                        level: 4,
                        window: 65,
                        guess: 4,
                    })
                }),
                Code::InvalidArgument,
            ),
            (
                "params.lookahead.guess",
                params(|p| {
                    p.lookahead = Some(Lookahead {
                        level: 4,
                        window: 4,
                        guess: 65,
                    })
                }),
                Code::InvalidArgument,
            ),
        ];
        for (field, edit, code) in cases {
            let mut r = good();
            edit(&mut r);
            let s = v.validate_blocking(r).expect_err(field);
            assert_eq!(s.code(), code, "{field}: {}", s.message());
            assert!(
                s.message().starts_with(&format!("{field}: ")),
                "'{}' should start with {field}",
                s.message()
            );
        }
    }
}
