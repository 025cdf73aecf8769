//! `ouro generate`: one request, in this process or against a running orchestrator
//! (`--endpoint`). The text streams as it is committed, coloured by where each token came
//! from, and the statistics follow on stderr.

use crate::{DecodeArgs, ModelArgs, StrategyArg};
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use decoding::{Flow, TokenSource};
use orchestrator::api::stats_of;
use proto::common::v1 as common;
use proto::v1 as pb;
use proto::v1::ouroboros_client::OuroborosClient;
use std::io::{IsTerminal, Write};

#[derive(Args)]
pub struct GenerateArgs {
    /// The prompt text.
    prompt: String,
    /// `auto` first measures this machine's cost profile (a few seconds).
    #[arg(long, env = "OURO_STRATEGY", value_enum, default_value_t = StrategyArg::Auto)]
    strategy: StrategyArg,
    /// Send the prompt as a user message in the model's chat template.
    #[arg(long, env = "OURO_CHAT")]
    chat: bool,
    /// A running orchestrator (`ouro serve`) to ask instead of loading models here,
    /// e.g. http://localhost:50051. Decoding flags are sent with the request.
    #[arg(long, env = "OURO_ENDPOINT")]
    endpoint: Option<String>,
    /// Colour tokens by source: draft green, pool cyan, trie magenta, the target's own
    /// tokens plain.
    #[arg(long, env = "OURO_COLOR", value_enum, default_value_t = ColorArg::Auto)]
    color: ColorArg,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    decode: DecodeArgs,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum ColorArg {
    /// When stdout is a terminal.
    Auto,
    Always,
    Never,
}

/// ANSI colour of a token source; the target's own tokens stay plain.
fn colour(s: TokenSource) -> Option<&'static str> {
    match s {
        TokenSource::Target => None,
        TokenSource::Draft => Some("\x1b[32m"),
        TokenSource::Pool => Some("\x1b[36m"),
        TokenSource::Trie => Some("\x1b[35m"),
    }
}

fn source_of_pb(code: i32) -> TokenSource {
    match pb::TokenSource::try_from(code) {
        Ok(pb::TokenSource::Draft) => TokenSource::Draft,
        Ok(pb::TokenSource::Pool) => TokenSource::Pool,
        Ok(pb::TokenSource::Trie) => TokenSource::Trie,
        _ => TokenSource::Target,
    }
}

/// Writes text pieces to stdout, each in its source's colour when colouring is on.
struct Painter {
    out: std::io::Stdout,
    on: bool,
}

impl Painter {
    fn new(choice: ColorArg) -> Self {
        let out = std::io::stdout();
        let on = match choice {
            ColorArg::Always => true,
            ColorArg::Never => false,
            ColorArg::Auto => out.is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        };
        Self { out, on }
    }

    fn legend(&self) {
        if self.on {
            eprintln!(
                "colours: \x1b[32mdraft\x1b[0m \x1b[36mpool\x1b[0m \x1b[35mtrie\x1b[0m target"
            );
        }
    }

    fn write(&mut self, text: &str, source: TokenSource) {
        let r = match colour(source).filter(|_| self.on) {
            Some(c) => write!(self.out, "{c}{text}\x1b[0m"),
            None => write!(self.out, "{text}"),
        };
        // A closed stdout (a pipe into `head`) is not an error worth stopping for.
        let _ = r.and_then(|_| self.out.flush());
    }
}

pub fn run(a: GenerateArgs) -> Result<()> {
    if let Some(url) = &a.endpoint {
        return tokio::runtime::Runtime::new()?.block_on(remote(&a, url));
    }
    let (paths, phrase_len) = (a.model.paths(), a.decode.phrase_len());
    if a.model.tp > 1 {
        let e =
            orchestrator::embedded::load_tp(&paths, a.model.tp, phrase_len, &Default::default())?;
        local(&e, &a)
    } else {
        local(
            &orchestrator::embedded::load_single(&paths, phrase_len, &Default::default())?,
            &a,
        )
    }
}

fn local<T: engine::LanguageModel>(
    e: &orchestrator::embedded::Embedded<T>,
    a: &GenerateArgs,
) -> Result<()> {
    let text = if a.chat {
        e.chat_prompt(&a.prompt)?
    } else {
        a.prompt.clone()
    };
    let prompt = e.encode(&text)?;
    let params = a.decode.params(a.strategy.into(), &e.eos);
    if params.strategy == decoding::Strategy::Auto {
        e.measure_costs()?;
    }
    let mut paint = Painter::new(a.color);
    paint.legend();
    let mut all = Vec::new();
    let mut shown = 0;
    let g = e.run(
        &prompt,
        &params,
        &mut |toks: &[u32], sources: &[TokenSource]| {
            // Token by token, so each piece of text takes its own token's colour.
            for (&t, &s) in toks.iter().zip(sources) {
                all.push(t);
                if let Ok(text) = e.decode(&all)
                    && text.len() > shown
                    && text.is_char_boundary(shown)
                {
                    paint.write(&text[shown..], s);
                    shown = text.len();
                }
            }
            Flow::Continue
        },
    )?;
    println!();
    let seed = (!params.sampling.is_greedy()).then_some(params.sampling.seed);
    print_stats(&stats_of(&g.stats), g.tokens.len(), g.finish.name(), seed);
    Ok(())
}

async fn remote(a: &GenerateArgs, url: &str) -> Result<()> {
    let mut client = OuroborosClient::connect(url.to_string())
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let d = &a.decode;
    let input = if a.chat {
        pb::generate_request::Input::Chat(pb::ChatMessages {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: a.prompt.clone(),
            }],
        })
    } else {
        pb::generate_request::Input::Prompt(a.prompt.clone())
    };
    let request = pb::GenerateRequest {
        input: Some(input),
        max_new_tokens: Some(d.max_new_tokens as u32),
        stop: Vec::new(),
        sampling: Some(common::Sampling {
            temperature: d.temperature,
            top_p: d.top_p,
            top_k: d.top_k as u32,
            seed: d.seed,
        }),
        strategy: pb::Strategy::from(a.strategy) as i32,
        params: Some(pb::StrategyParams {
            gamma: Some(d.gamma as u32),
            lookahead: Some(common::Lookahead {
                level: d.level as u32,
                window: d.window as u32,
                guess: d.guess as u32,
            }),
            topk: Some(d.topk as u32),
            trie_budget: Some(d.trie_budget as u32),
            draft_stop: Some(d.draft_stop),
        }),
        logprobs: None,
    };
    let mut stream = client
        .generate_stream(request)
        .await
        .map_err(|s| anyhow::anyhow!("{url}: {} ({:?})", s.message(), s.code()))?
        .into_inner();
    let mut paint = Painter::new(a.color);
    paint.legend();
    let mut tokens = 0;
    let mut last = None;
    while let Some(msg) = stream
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("{url}: {} ({:?})", s.message(), s.code()))?
    {
        tokens += msg.token_ids.len();
        // The server sends one source per message (runs of one source), so the text
        // takes the colour of its first token.
        let source = msg
            .token_sources
            .first()
            .map_or(TokenSource::Target, |&c| source_of_pb(c));
        paint.write(&msg.text, source);
        if msg.stats.is_some() {
            last = Some(msg);
        }
    }
    println!();
    let last = last.context("the stream ended without its closing message")?;
    let finish = pb::FinishReason::try_from(last.finish_reason)
        .map(|f| {
            f.as_str_name()
                .trim_start_matches("FINISH_REASON_")
                .to_lowercase()
        })
        .unwrap_or_default();
    print_stats(&last.stats.unwrap_or_default(), tokens, &finish, last.seed);
    Ok(())
}

/// The statistics line, the same in-process and remote.
fn print_stats(s: &pb::SpecStats, tokens: usize, finish: &str, seed: Option<u64>) {
    let acceptance = if s.drafted_tokens > 0 {
        100.0 * s.accepted_tokens as f64 / s.drafted_tokens as f64
    } else {
        0.0
    };
    eprintln!(
        "{} tokens in {:.2} s ({:.2} tok/s), finish: {finish}, strategy: {}; target forwards \
         {}, mean accepted length {:.2}, draft forwards {}, acceptance {acceptance:.0}%, \
         candidate tokens {}, trie tokens {}; draft {:.2} s, verify {:.2} s{}{}",
        tokens,
        s.total_s,
        tokens as f64 / s.total_s.max(1e-9),
        s.strategy,
        s.target_forwards,
        s.mean_accepted_length,
        s.draft_forwards,
        s.candidate_tokens,
        s.trie_accepted,
        s.draft_s,
        s.verify_s,
        if s.draft_fallback.is_empty() {
            String::new()
        } else {
            format!(" (target-only: {})", s.draft_fallback)
        },
        seed.map_or(String::new(), |s| format!("; seed {s}")),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use orchestrator::api::source_to_pb;

    #[test]
    fn sources_survive_the_wire_and_only_guesses_are_coloured() {
        for s in [
            TokenSource::Target,
            TokenSource::Draft,
            TokenSource::Pool,
            TokenSource::Trie,
        ] {
            assert_eq!(source_of_pb(source_to_pb(s) as i32), s);
            assert_eq!(colour(s).is_none(), s == TokenSource::Target);
        }
        // Unknown codes (a newer server) read as the target's own tokens.
        assert_eq!(source_of_pb(99), TokenSource::Target);
    }
}
