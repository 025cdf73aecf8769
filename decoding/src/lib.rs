//! Speculative decoding algorithms, free of I/O: the phrase pool, verify trees, acceptance
//! and sampling, the lookahead window, and the decoding loops (greedy, speculative,
//! lookahead, trie, Ouroboros, and `auto`, which sizes every round from a cost profile)
//! over draft/target backend traits.

pub mod backend;
pub mod copy;
pub mod draft;
pub mod error;
pub mod generate;
pub mod local;
pub mod logprobs;
pub mod lookahead;
pub mod params;
pub mod pool;
pub mod sampling;
pub mod stats;
pub mod strategy;
pub mod tree;
pub mod trie;
pub mod validate;
pub mod verify;

pub use auto::{
    AutoConfig, AutoTuner, CallClock, ChainEstimate, CostProfile, DraftBacklog, DraftCost, Policy,
    PolicyScores, Prediction, ProfileOptions, RoundKind, SEGMENT_TOKENS, would_commit,
};
pub use backend::{
    BackendInfo, DraftBackend, DraftLength, DraftOutcome, DraftRequest, ServerTiming, SessionId,
    TargetBackend, VerifyOutcome,
};
pub use draft::{DraftCall, DraftSession, DraftStep};
pub use error::{DecodingError, Result};
pub use generate::{Shared, generate};
pub use local::{LocalDraft, LocalTarget};
pub use logprobs::TokenLogprobs;
pub use lookahead::LookaheadParams;
pub use params::{DecodeParams, FinishReason, Flow, Generation, Strategy, TokenSink, TokenSource};
pub use pool::{Ngram, PhrasePool, PoolConfig, VocabStamp};
pub use sampling::SamplingParams;
pub use stats::{ModelCall, SpecStats};
pub use strategy::auto;
pub use tree::DraftTree;
pub use trie::{PromptTrie, TrieCache, TrieConfig, TrieDraft};
pub use verify::TargetSession;
