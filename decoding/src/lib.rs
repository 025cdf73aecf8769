//! Speculative decoding algorithms, free of I/O: the phrase pool, verify trees, acceptance
//! and sampling, the lookahead window, and the decoding loops (greedy, speculative,
//! lookahead, trie, Ouroboros, and `auto`, which sizes every round from a cost profile)
//! over draft/target backend traits.

pub mod auto;
pub mod backend;
pub mod decode;
pub mod draft;
pub mod error;
pub mod local;
pub mod lookahead;
pub mod pool;
pub mod sampling;
pub mod stats;
pub mod tree;
pub mod trie;
pub mod validate;
pub mod verify;

pub use auto::{
    AutoTuner, ChainEstimate, CostProfile, DraftBacklog, DraftCost, Policy, PolicyScores,
    Prediction, ProfileOptions, RoundKind, SEGMENT_TOKENS, would_commit,
};
pub use backend::{
    BackendInfo, DraftBackend, DraftOutcome, DraftRequest, ServerTiming, SessionId, TargetBackend,
    VerifyOutcome,
};
pub use decode::{
    DecodeParams, FinishReason, Flow, Generation, Shared, Strategy, TokenSink, TokenSource,
    generate,
};
pub use draft::DraftSession;
pub use error::{DecodingError, Result};
pub use local::{LocalDraft, LocalTarget};
pub use lookahead::LookaheadParams;
pub use pool::{Ngram, PhrasePool, PoolConfig};
pub use sampling::SamplingParams;
pub use stats::SpecStats;
pub use tree::DraftTree;
pub use trie::{PromptTrie, TrieCache, TrieConfig, TrieDraft};
pub use verify::TargetSession;
