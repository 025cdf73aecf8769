//! The seams between the decoding loops and the models: a target that verifies trees and a
//! draft that proposes tokens. In-process implementations live in [`crate::local`]; the
//! orchestrator provides gRPC ones. The loops are written once against these traits.

use crate::error::Result;
use crate::lookahead::LookaheadParams;
use crate::pool::Ngram;
use crate::sampling::SamplingParams;
use crate::tree::DraftTree;
use std::future::Future;

pub type SessionId = u64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendInfo {
    pub model: String,
    pub vocab_size: usize,
    pub max_position: usize,
    /// What a remote service reported of its vocabulary's strings (None in process, where
    /// the model files themselves are checked, and where the file carries none).
    pub vocab: Option<engine::vocab::VocabDigest>,
}

/// Server-side time of one call, in seconds; the caller's wall time minus `total` is what
/// the network and (de)serialisation cost.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ServerTiming {
    pub queue: f64,
    pub forward: f64,
    pub total: f64,
    /// Verify calls: trees (one per session) in the forward that served the call; draft
    /// calls: the most sessions one of the call's forwards carried; 0 where not reported.
    pub batch_trees: u32,
    /// Verify calls: the tree rows of those trees, this call's included (prefill chunks
    /// in the same forward are not counted); 0 where not reported.
    pub batch_rows: u32,
    /// Verify calls: the sessions open at the target when the forward ran (prefilling
    /// ones included); 0 where not reported.
    pub open_sessions: u32,
    /// Verify calls: prompt rows of prefill chunks that shared the forward.
    pub batch_prefill_rows: u32,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct VerifyOutcome {
    /// Accepted tree nodes after the root, root to leaf.
    pub path: Vec<usize>,
    /// Their tokens.
    pub accepted: Vec<u32>,
    /// The target's token after the accepted path.
    pub bonus: u32,
    /// The target's token at every node (what it would emit after that node's path).
    pub outputs: Vec<u32>,
    /// Where asked for: the log-probabilities of `accepted` and then `bonus`.
    pub logprobs: Vec<crate::logprobs::TokenLogprobs>,
}

/// How many tokens one draft call drafts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DraftLength {
    /// At least this many (a lookahead step may emit several at once).
    AtLeast(usize),
    /// At most `tokens`, one per forward, stopping once the product of the drafted tokens'
    /// probabilities under the draft model falls below `stop_below`, since the target
    /// rarely accepts that far. With lookahead there is no per-token probability, and it
    /// drafts as [`DraftLength::AtLeast`].
    UpTo { tokens: usize, stop_below: f32 },
}

impl DraftLength {
    /// From the protocol's `gamma` and `stop_below` (0: no floor).
    pub fn new(gamma: usize, stop_below: f32) -> Self {
        if stop_below > 0.0 {
            DraftLength::UpTo {
                tokens: gamma,
                stop_below,
            }
        } else {
            DraftLength::AtLeast(gamma)
        }
    }

    /// The number the caller gave: the least, or the most.
    pub fn tokens(&self) -> usize {
        match *self {
            DraftLength::AtLeast(n) | DraftLength::UpTo { tokens: n, .. } => n,
        }
    }

    /// The confidence floor (0: none).
    pub fn stop_below(&self) -> f32 {
        match *self {
            DraftLength::AtLeast(_) => 0.0,
            DraftLength::UpTo { stop_below, .. } => stop_below,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DraftRequest {
    /// Committed tokens appended since the previous call (or since `open`).
    pub new_committed: Vec<u32>,
    /// Where `new_committed` begins in the session's committed text: the committed tokens
    /// the session holds from there on are taken back first. The caller sent them ahead
    /// of the target's verdict (overlapped drafting) and the target did not accept them
    /// all, or it cancelled that call and cannot know whether it ran. At least 1 and at
    /// most the tokens the session holds; `None`: after all of them.
    pub start: Option<usize>,
    pub length: DraftLength,
    /// Lookahead decoding inside the draft model; `None` decodes one token per forward.
    pub lookahead: Option<LookaheadParams>,
    /// Phrases the caller learnt since the previous call, for the draft's pool replica.
    pub pool_delta: Vec<Ngram>,
    /// Drafting stops after any of these.
    pub eos: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct DraftOutcome {
    /// The draft model's greedy continuation of the committed tokens.
    pub tokens: Vec<u32>,
    /// n-grams the lookahead window produced.
    pub harvested: Vec<Ngram>,
    /// Model forwards spent.
    pub forwards: u32,
    /// Tokens that came from pool phrases the model agreed with.
    pub phrase_hits: u32,
    /// With `stop_below` set, the draft model's probability of each of `tokens`.
    pub confidence: Vec<f32>,
    /// Rows its forwards ran in all, and how many of them were committed text the
    /// session had not seen (0 where not reported).
    pub rows: u32,
    pub caught_up: u32,
}

pub trait TargetBackend: Send + Sync {
    fn info(&self) -> BackendInfo;

    /// Most nodes one verify may carry, where the backend has a limit: the decoding loop
    /// never builds a larger tree.
    fn max_tree_nodes(&self) -> Option<usize> {
        None
    }

    /// Whether the backend answers now (for health checks); in process it always does.
    fn reachable(&self) -> impl Future<Output = bool> + Send {
        async { true }
    }

    /// Starts a session on `committed` (at least one token); all but the last are
    /// prefilled, the last becomes the root of the first tree.
    fn open(&self, committed: &[u32]) -> impl Future<Output = Result<SessionId>> + Send;

    /// Scores every node of `tree` (root = the last committed token), accepts the longest
    /// path whose tokens equal the target's choices, and keeps only that path's KV. With
    /// `logprobs` (`Some(n)`), the outcome carries the committed tokens' log-probabilities
    /// with `n` alternatives each.
    fn verify(
        &self,
        session: SessionId,
        tree: &DraftTree,
        sampling: &SamplingParams,
        logprobs: Option<usize>,
    ) -> impl Future<Output = Result<(VerifyOutcome, ServerTiming)>> + Send;

    fn close(&self, session: SessionId) -> impl Future<Output = Result<()>> + Send;
}

pub trait DraftBackend: Send + Sync {
    fn info(&self) -> BackendInfo;

    /// Whether the backend keeps its own pool replica that needs `pool_delta` (a remote
    /// draft), as opposed to sharing the caller's pool.
    fn wants_pool_delta(&self) -> bool;

    fn open(&self, committed: &[u32]) -> impl Future<Output = Result<SessionId>> + Send;

    fn draft(
        &self,
        session: SessionId,
        request: DraftRequest,
    ) -> impl Future<Output = Result<(DraftOutcome, ServerTiming)>> + Send;

    fn close(&self, session: SessionId) -> impl Future<Output = Result<()>> + Send;
}
