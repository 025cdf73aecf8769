//! Command-line arguments shared by the `ouro` and `ouro-bench` binaries: which models to
//! load and the decoding defaults.

use crate::embedded::{DEFAULT_DRAFT, DEFAULT_TARGET, ModelPaths, models_dir};
use clap::{Args, ValueEnum};
use decoding::{DecodeParams, LookaheadParams, SamplingParams, Strategy};
use std::path::PathBuf;

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Target model (GGUF file or Hugging Face folder); default: the fetched 1.5B target.
    #[arg(long, env = "OURO_TARGET_MODEL")]
    pub target: Option<PathBuf>,
    /// Draft model; default: the fetched 0.5B draft. "none" runs target-only.
    #[arg(long, env = "OURO_DRAFT_MODEL")]
    pub draft: Option<String>,
    /// The tokenizer: a tokenizer.json, a model folder or a GGUF file (its own tokenizer);
    /// default: the target model's own. Checked against every model's vocabulary at start.
    #[arg(long, env = "OURO_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,
    /// A Jinja chat template to use instead of the model's own (which comes from the GGUF
    /// metadata, the model folder or the tokenizer's folder; ChatML where there is none).
    #[arg(long, env = "OURO_CHAT_TEMPLATE")]
    pub chat_template: Option<PathBuf>,
    /// Tensor-parallel ranks for the target (threads; one GPU each with --device cuda).
    #[arg(long, env = "OURO_TARGET_TP", default_value_t = 1)]
    pub tp: usize,
    /// Where the models run: cpu, cuda or cuda:N (the target's rank r on GPU N + r, the
    /// draft on GPU N). cuda needs a binary built with --features cuda.
    #[arg(long, env = "OURO_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Dequantize the target's GGUF weights to dense f16 at load (the unquantized
    /// deployment; about 3 GB for the 1.5B target).
    #[arg(long, env = "OURO_TARGET_F16")]
    pub target_f16: bool,
    /// The draft's output head scores only the first N vocabulary entries and the tokens
    /// its session's text has held (a cheaper head; 32768 suits Qwen-style vocabularies;
    /// the target still checks every draft token, so the output does not change).
    #[arg(long, env = "OURO_DRAFT_HEAD_VOCAB", value_parser = clap::value_parser!(u64).range(1..))]
    pub draft_head_vocab: Option<u64>,
    /// Re-encode the draft's matrices in these blocks at load: `q4k` halves a Q8_0
    /// draft's bytes per token (other numbers than the file's, but the target checks
    /// every draft token, so the output does not change).
    #[arg(long, env = "OURO_DRAFT_REQUANTIZE")]
    pub draft_requantize: Option<String>,
}

impl ModelArgs {
    pub fn paths(&self) -> ModelPaths {
        let dir = models_dir();
        ModelPaths {
            target_f16: self.target_f16,
            draft_head_vocab: self.draft_head_vocab.map(|n| n as usize),
            draft_requantize: self.draft_requantize.clone(),
            target: self
                .target
                .clone()
                .unwrap_or_else(|| dir.join(DEFAULT_TARGET)),
            draft: match self.draft.as_deref() {
                Some("none") => None,
                Some(p) => Some(PathBuf::from(p)),
                None => Some(dir.join(DEFAULT_DRAFT)),
            },
            chat_template: self.chat_template.clone(),
            tokenizer: self.tokenizer.clone(),
            device: self.device.clone(),
        }
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum StrategyArg {
    Auto,
    Greedy,
    Speculative,
    Lookahead,
    Ouroboros,
    Trie,
}

impl From<StrategyArg> for proto::v1::Strategy {
    fn from(s: StrategyArg) -> Self {
        use proto::v1::Strategy as S;
        match s {
            StrategyArg::Auto => S::Auto,
            StrategyArg::Greedy => S::Greedy,
            StrategyArg::Speculative => S::Speculative,
            StrategyArg::Lookahead => S::Lookahead,
            StrategyArg::Ouroboros => S::Ouroboros,
            StrategyArg::Trie => S::Trie,
        }
    }
}

impl From<StrategyArg> for Strategy {
    fn from(s: StrategyArg) -> Self {
        match s {
            StrategyArg::Auto => Strategy::Auto,
            StrategyArg::Greedy => Strategy::Greedy,
            StrategyArg::Speculative => Strategy::Speculative,
            StrategyArg::Lookahead => Strategy::Lookahead,
            StrategyArg::Ouroboros => Strategy::Ouroboros,
            StrategyArg::Trie => Strategy::Trie,
        }
    }
}

#[derive(Args, Clone)]
pub struct DecodeArgs {
    #[arg(long, env = "OURO_MAX_NEW_TOKENS", default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Least draft tokens per round (auto: the most).
    #[arg(long, env = "OURO_GAMMA", default_value_t = 8)]
    pub gamma: usize,
    /// Speculative: above 0, gamma is the most draft tokens per round, and the draft stops
    /// once the product of its tokens' probabilities falls below this (0 to 1).
    #[arg(long, env = "OURO_DRAFT_STOP", default_value_t = DecodeParams::default().draft_stop)]
    pub draft_stop: f32,
    /// Lookahead n-gram size N (phrases of N-1 tokens).
    #[arg(long, env = "OURO_LEVEL", default_value_t = 5)]
    pub level: usize,
    /// Lookahead window width W.
    #[arg(long, env = "OURO_WINDOW", default_value_t = 8)]
    pub window: usize,
    /// Pool phrases verified per lookahead step (G).
    #[arg(long, env = "OURO_GUESS", default_value_t = 8)]
    pub guess: usize,
    /// Pool phrases appended as candidate suffixes (Ouroboros).
    #[arg(long, env = "OURO_TOPK", default_value_t = 3)]
    pub topk: usize,
    /// Most trie nodes per verify tree (trie strategy; Ouroboros adds them beside its
    /// draft, 0 turns that off).
    #[arg(long, env = "OURO_TRIE_BUDGET", default_value_t = DecodeParams::default().trie_budget)]
    pub trie_budget: usize,
    /// 0 decodes greedily.
    #[arg(long, env = "OURO_TEMPERATURE", default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, env = "OURO_TOP_P", default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, env = "OURO_TOP_K", default_value_t = 0)]
    pub top_k: usize,
    /// Sampling seed; when sampling without one, the server draws one (and reports it).
    #[arg(long, env = "OURO_SEED")]
    pub seed: Option<u64>,
    /// Speculative and Ouroboros: the draft drafts the next round while the target
    /// verifies this one (pays where draft and target run on separate hardware).
    #[arg(long, env = "OURO_OVERLAP")]
    pub overlap: bool,
}

/// Pool phrase length for a lookahead level (at least 1, even for a bad level, which the
/// request's own validation then reports).
pub fn phrase_len_for(level: usize) -> usize {
    level.saturating_sub(1).max(1)
}

impl DecodeArgs {
    /// Pool phrase length for these lookahead flags.
    pub fn phrase_len(&self) -> usize {
        phrase_len_for(self.level)
    }

    pub fn params(&self, strategy: Strategy, eos: &[u32]) -> DecodeParams {
        DecodeParams {
            strategy,
            max_new_tokens: self.max_new_tokens,
            eos: eos.to_vec(),
            sampling: SamplingParams {
                temperature: self.temperature,
                top_p: self.top_p,
                top_k: self.top_k,
                seed: self.seed.unwrap_or_else(crate::validation::draw_seed),
            },
            gamma: self.gamma,
            draft_stop: self.draft_stop,
            lookahead: LookaheadParams {
                level: self.level,
                window: self.window,
                guess: self.guess,
            },
            topk: self.topk,
            harvest_committed: true,
            trie_budget: self.trie_budget,
            logprobs: None,
            overlap: self.overlap,
        }
    }
}
