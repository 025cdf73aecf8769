//! What a request asks for and what it gets back: the strategy, the decoding parameters
//! (checked against [`crate::validate::limits`]), committed tokens with their sources, and
//! how generation ended.

use crate::error::Result;
use crate::lookahead::LookaheadParams;
use crate::sampling::SamplingParams;
use crate::stats::SpecStats;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// One target forward per token.
    Greedy,
    /// The draft decodes `gamma` tokens one per forward; the target verifies the chain.
    Speculative,
    /// Target only: lookahead (Jacobi) decoding inside the target model. Greedy only.
    Lookahead,
    /// Draft lookahead plus pool candidate suffixes (and trie continuations) in one
    /// verify tree.
    Ouroboros,
    /// Target only: continuations from the prompt and output tries (PIA), verified as a
    /// tree.
    Trie,
    /// Every round sized by the measured cost profile and the acceptance seen so far:
    /// trie continuations and pool phrases when they pay for their rows, draft tokens
    /// when drafting pays, the root alone (plain greedy) when nothing does.
    Auto,
}

impl Strategy {
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::Greedy => "greedy",
            Strategy::Speculative => "speculative",
            Strategy::Lookahead => "lookahead",
            Strategy::Ouroboros => "ouroboros",
            Strategy::Trie => "trie",
            Strategy::Auto => "auto",
        }
    }

    pub fn needs_draft(&self) -> bool {
        matches!(self, Strategy::Speculative | Strategy::Ouroboros)
    }

    /// Every strategy there is, in the order tables list them.
    pub const ALL: [Strategy; 6] = [
        Strategy::Greedy,
        Strategy::Speculative,
        Strategy::Lookahead,
        Strategy::Trie,
        Strategy::Ouroboros,
        Strategy::Auto,
    ];
}

#[derive(Debug, Clone, PartialEq)]
pub struct DecodeParams {
    pub strategy: Strategy,
    pub max_new_tokens: usize,
    /// Generation ends after the first of these (it is kept in the output).
    pub eos: Vec<u32>,
    pub sampling: SamplingParams,
    /// Least draft tokens per round (`auto`, and speculative with `draft_stop`: the most).
    pub gamma: usize,
    /// Speculative: above 0, the draft stops early once the product of its tokens'
    /// probabilities falls below this (confidence-sized rounds); 0 drafts `gamma` always.
    /// `auto` sets its own from the cost profile. Default 0.6: on the 2-core CPU,
    /// speculative at 0.6 against drafting `gamma` always, same run: HumanEval 9-12
    /// 1.34x against 1.18x greedy, BBH 1-3 1.10x against 0.82x
    /// (`results/sweep-draft-stop/new-engine`).
    pub draft_stop: f32,
    pub lookahead: LookaheadParams,
    /// Pool phrases appended as candidate suffixes after the draft (Ouroboros).
    pub topk: usize,
    /// Also feed the pool with the n-grams of the prompt and of committed text.
    pub harvest_committed: bool,
    /// Most trie nodes per verify tree (trie strategy; Ouroboros adds them to its tree,
    /// 0 turns that off; `auto` sizes its trees itself, and only 0 matters to it).
    pub trie_budget: usize,
    /// Report each generated token's log-probability with this many alternatives.
    pub logprobs: Option<usize>,
    /// Speculative and Ouroboros: while the target verifies a round's draft chain, the
    /// draft already drafts the next round from the chain's end, as if the target accepted
    /// it all (PEARL's post-verify); that work is used when the target did, and stopped and
    /// taken back (from the draft's `start`) when it did not. The first round's draft call
    /// runs beside the target's prefill. Pays where draft and target run on separate
    /// hardware; the output is the same either way.
    pub overlap: bool,
}

impl Default for DecodeParams {
    fn default() -> Self {
        Self {
            strategy: Strategy::Ouroboros,
            max_new_tokens: 256,
            eos: Vec::new(),
            sampling: SamplingParams::greedy(),
            gamma: 8,
            draft_stop: 0.6,
            lookahead: LookaheadParams::default(),
            topk: 3,
            harvest_committed: true,
            trie_budget: 4,
            logprobs: None,
            overlap: false,
        }
    }
}

impl DecodeParams {
    /// Checks every field against [`crate::validate::limits`]; errors name the field as
    /// the public API spells it (`max_new_tokens`, `sampling.*`, `params.*`).
    pub fn validate(&self) -> Result<()> {
        use crate::validate::{FieldError, at_most, in_range, limits, unit_floor, within};
        self.sampling.validate()?;
        if self.max_new_tokens == 0 {
            return Err(FieldError::new("max_new_tokens", "at least 1", 0).into());
        }
        if self.strategy != Strategy::Greedy {
            in_range("params.gamma", self.gamma, 1..=limits::MAX_GAMMA)?;
        }
        unit_floor("params.draft_stop", self.draft_stop)?;
        at_most("params.topk", self.topk, limits::MAX_TOPK)?;
        at_most(
            "params.trie_budget",
            self.trie_budget,
            limits::MAX_TRIE_BUDGET,
        )?;
        if self.strategy == Strategy::Trie && self.trie_budget == 0 {
            return Err(FieldError::new(
                "params.trie_budget",
                "at least 1 for the trie strategy",
                0,
            )
            .into());
        }
        if matches!(self.strategy, Strategy::Lookahead | Strategy::Ouroboros) {
            within(self.lookahead.validate(), "params")?;
        }
        crate::logprobs::check(self.logprobs)?;
        if self.strategy == Strategy::Lookahead && self.logprobs.is_some() {
            return Err(FieldError::new(
                "logprobs",
                "absent for the lookahead strategy, whose target host returns tokens without \
                 their distribution (use greedy, speculative, trie or ouroboros)",
                self.logprobs.unwrap_or_default(),
            )
            .into());
        }
        if self.strategy == Strategy::Lookahead && !self.sampling.is_greedy() {
            return Err(FieldError::new(
                "sampling.temperature",
                "0 for the lookahead strategy, which decodes greedily (use greedy, \
                 speculative or ouroboros for sampling)",
                self.sampling.temperature,
            )
            .into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Length,
    Eos,
    /// The caller's token sink asked to stop (a stop string, a cancelled stream).
    Stop,
    /// The model's context is full.
    ContextFull,
}

impl FinishReason {
    pub fn name(&self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::ContextFull => "context_full",
        }
    }
}

/// Where a committed token came from. Every token is the target's own choice; this says
/// which guess (if any) proposed it before the target confirmed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenSource {
    /// The target's own next token: the bonus after a verified path, or a correction.
    Target,
    /// An accepted draft-model token.
    Draft,
    /// An accepted phrase-pool (lookahead n-gram) token.
    Pool,
    /// An accepted token-trie continuation.
    Trie,
}

/// Receives each batch of committed tokens with their sources, as soon as it is known.
pub type TokenSink<'a> = dyn FnMut(&[u32], &[TokenSource]) -> Flow + Send + 'a;

/// What the token sink tells the loop after each batch of committed tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub tokens: Vec<u32>,
    /// Where each token came from (parallel to `tokens`).
    pub sources: Vec<TokenSource>,
    pub finish: FinishReason,
    pub stats: SpecStats,
    /// With `DecodeParams::logprobs`: one per token, parallel to `tokens`.
    pub logprobs: Vec<crate::logprobs::TokenLogprobs>,
}
