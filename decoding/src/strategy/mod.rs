//! One file per strategy's round, behind one small seam that the commit loop
//! ([`crate::generate`]) calls: [`Rounds::build`] proposes the round's verify tree,
//! [`Rounds::learn`] sees the target's verdict on it, [`Rounds::committed`] sees what was
//! committed. The loop alone commits tokens; a round builder only proposes and learns.
//!
//! - [`greedy`]: the root alone, one token per target forward.
//! - [`speculative`]: the draft model's chain.
//! - [`trie`]: continuations from the prompt and output tries (PIA), target only.
//! - [`ouroboros`]: the draft's lookahead chain, pool phrases after its tip, trie
//!   continuations beside it, and the pool fed from what verification reveals.
//! - [`auto`]: every round sized from the measured cost profile.
//! - [`lookahead`]: target-only lookahead decoding, a loop of its own (the host's tokens
//!   are the target's own, so nothing is verified).

pub mod auto;
pub mod greedy;
pub mod lookahead;
pub mod ouroboros;
pub(crate) mod overlap;
pub mod speculative;
pub mod trie;

use crate::backend::{DraftBackend, DraftLength, DraftOutcome, DraftRequest, ServerTiming};
use crate::backend::{TargetBackend, VerifyOutcome};
use crate::error::DecodingError;
use crate::generate::{Loop, OpenSessions, Shared};
use crate::params::{DecodeParams, Strategy};
use crate::pool::{Ngram, PhrasePool};
use crate::stats::SpecStats;
use crate::tree::DraftTree;
use auto::Guess;
use auto::round::{Alternatives, AutoRounds};
use ouroboros::PoolLearner;
use std::time::Instant;
use tracing::Instrument;

/// One round's verify tree and where its nodes came from.
#[derive(Clone)]
pub(crate) struct Round {
    pub tree: DraftTree,
    /// Draft tokens in the tree, and their chain of nodes below the root.
    pub drafted: Vec<u32>,
    pub chain: Vec<usize>,
    /// The node pool phrases hang from, and the token they were looked up under.
    pub anchor: usize,
    pub key: u32,
    /// Pool phrases in the tree (possibly cut short) and their nodes.
    pub candidates: Vec<(Vec<u32>, Vec<usize>)>,
    pub from_trie: Vec<bool>,
    /// `auto` only: the guesses behind every node, for its acceptance counts.
    pub guesses: Vec<Vec<Guess>>,
    /// `auto` only: the draft's probability of each drafted token, where it gave them.
    pub confidence: Vec<f32>,
    /// `auto` under its drafting policy: what the other policies would have verified.
    pub alternatives: Option<Alternatives>,
}

impl Round {
    /// The root alone, plus the draft chain `drafted` below it.
    pub fn chain(root: u32, drafted: Vec<u32>) -> Self {
        let mut tree = DraftTree::new(root);
        let chain = tree.add_path(0, &drafted);
        let tip = chain.last().copied().unwrap_or(0);
        let key = *drafted.last().unwrap_or(&root);
        Self {
            tree,
            drafted,
            chain,
            anchor: tip,
            key,
            candidates: Vec::new(),
            from_trie: Vec::new(),
            guesses: Vec::new(),
            confidence: Vec::new(),
            alternatives: None,
        }
    }
}

/// What the loop learnt from a verify, for the round builders.
pub(crate) struct Verdict<'v> {
    pub outcome: &'v VerifyOutcome,
    /// Accepted nodes that lie on the draft chain (the walk may leave it).
    pub on_chain: usize,
    /// The verify's wall time, and the round's so far (draft and verify).
    pub verify_s: f64,
    pub round_s: f64,
    /// Tokens the request may still commit, before this round's.
    pub remaining: usize,
    /// The target's account of the verify (its batch among them).
    pub timing: crate::backend::ServerTiming,
}

/// The strategy of one request: its round builder and what it keeps across rounds.
pub(crate) enum Rounds<'a> {
    Greedy,
    Speculative,
    Trie,
    Ouroboros(Option<PoolLearner>),
    Auto(Box<AutoRounds<'a>>),
}

impl<'a> Rounds<'a> {
    pub fn new(params: &DecodeParams, shared: Shared<'a>, prompt: &[u32]) -> Self {
        let learner = || PoolLearner::new(params, shared.pool, prompt);
        match (params.strategy, shared.tuner) {
            (Strategy::Speculative, _) => Rounds::Speculative,
            (Strategy::Trie, _) => Rounds::Trie,
            (Strategy::Ouroboros, _) => Rounds::Ouroboros(learner()),
            (Strategy::Auto, Some(tuner)) => {
                Rounds::Auto(Box::new(AutoRounds::new(tuner, params, learner())))
            }
            // Lookahead runs its own loop; auto without a profile is refused before this.
            (Strategy::Greedy | Strategy::Lookahead | Strategy::Auto, _) => Rounds::Greedy,
        }
    }

    /// Whether its trees take trie continuations (and its output feeds the trie).
    pub fn uses_trie(params: &DecodeParams) -> bool {
        params.trie_budget > 0
            && matches!(
                params.strategy,
                Strategy::Trie | Strategy::Ouroboros | Strategy::Auto
            )
    }

    /// The next round's verify tree, within `budget` guessed tokens and `room` nodes.
    #[allow(clippy::too_many_arguments)]
    pub async fn build<T: TargetBackend, D: DraftBackend>(
        &mut self,
        sessions: &mut OpenSessions<'_, T, D>,
        stats: &mut SpecStats,
        shared: Shared<'_>,
        state: &mut Loop<'_>,
        text: &[u32],
        budget: usize,
        room: usize,
    ) -> Round {
        let root = *text.last().expect("the text is not empty");
        // A remote draft's pool replica learns what this pool learnt, with the next call.
        if let Some(l) = self.learner() {
            let replica = sessions.draft_has_replica();
            l.hand_over(replica.then_some(&mut state.delta));
        }
        match self {
            Rounds::Greedy => greedy::round(root),
            Rounds::Speculative => {
                speculative::round(sessions, stats, shared.pool, state, root, budget).await
            }
            Rounds::Trie => trie::round(stats, shared.trie, state, text, budget, room),
            Rounds::Ouroboros(_) => {
                ouroboros::round(sessions, stats, shared, state, text, budget, room).await
            }
            Rounds::Auto(a) => {
                a.round(sessions, stats, shared, state, text, budget, room)
                    .await
            }
        }
    }

    /// What teaches the shared pool, where the strategy has one.
    fn learner(&mut self) -> Option<&mut PoolLearner> {
        match self {
            Rounds::Ouroboros(l) => l.as_mut(),
            Rounds::Auto(a) => a.learner.as_mut(),
            _ => None,
        }
    }

    /// The target's verdict on `round`.
    pub fn learn(&mut self, pool: &PhrasePool, round: &Round, verdict: &Verdict<'_>) {
        match self {
            Rounds::Ouroboros(Some(l)) => l.learn_from_verify(pool, round, verdict),
            Rounds::Auto(a) => a.learn(pool, round, verdict),
            _ => {}
        }
    }

    /// `new` tokens were committed and `text` now ends with them (it held `before`).
    pub fn committed(
        &mut self,
        pool: &PhrasePool,
        stats: &mut SpecStats,
        text: &[u32],
        before: usize,
    ) {
        match self {
            Rounds::Ouroboros(Some(l)) => l.learn_from_commit(pool, text, before),
            Rounds::Auto(a) => a.committed(pool, stats, text, before),
            _ => {}
        }
    }
}

/// The `topk` newest pool phrases keyed by `key` (none where `topk` is 0), the lookup
/// counted in `stats`.
pub(crate) fn pool_phrases(
    pool: &PhrasePool,
    stats: &mut SpecStats,
    key: u32,
    topk: usize,
) -> Vec<Vec<u32>> {
    if topk == 0 {
        return Vec::new();
    }
    let found = pool.newest(key, topk);
    stats.pool_lookups += 1;
    stats.pool_hits += u64::from(!found.is_empty());
    found
}

/// How a draft call asks (the overlapped call repeats the last one's shape).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct DraftShape {
    pub gamma: usize,
    pub lookahead: bool,
    pub stop_below: f32,
}

impl DraftShape {
    /// At most `budget` tokens.
    pub(crate) fn capped(self, budget: usize) -> Self {
        Self {
            gamma: self.gamma.min(budget),
            ..self
        }
    }

    /// The request that asks as this shape does: `new_committed` from the session's
    /// `start`-th committed token on, with `pool_delta` for the draft's pool replica.
    pub(crate) fn request(
        self,
        params: &DecodeParams,
        start: Option<usize>,
        new_committed: Vec<u32>,
        pool_delta: Vec<Ngram>,
    ) -> DraftRequest {
        DraftRequest {
            new_committed,
            start,
            length: DraftLength::new(self.gamma, self.stop_below),
            lookahead: self.lookahead.then_some(params.lookahead),
            pool_delta,
            eos: params.eos.clone(),
        }
    }
}

/// A draft call's outcome counted in `stats`; where the draft keeps a pool replica of its
/// own (`replica`) and drafted with lookahead, the phrases its window harvested go to the
/// caller's `pool` too.
pub(crate) fn record_draft(
    stats: &mut SpecStats,
    pool: &PhrasePool,
    (outcome, timing, wall): (&DraftOutcome, ServerTiming, f64),
    lookahead: bool,
    replica: bool,
) {
    stats.add_draft(outcome, timing, wall);
    if lookahead && replica {
        pool.insert_all(&outcome.harvested);
    }
}

/// A failed draft is dropped for the rest of the request, which carries on target-only
/// and says so in `stats`.
pub(crate) fn drop_draft<T: TargetBackend, D: DraftBackend>(
    sessions: &mut OpenSessions<'_, T, D>,
    stats: &mut SpecStats,
    e: &DecodingError,
) {
    stats.fall_back(format!("draft failed: {e}"));
    sessions.draft = None;
}

/// One draft call asked as `shape` says: the committed tokens the draft has not seen, at
/// most `shape.gamma` tokens back (and their probabilities where `stop_below` asked for
/// them). A failed draft is dropped for the rest of the request, which carries on
/// target-only and says so in `stats`.
pub(crate) async fn call_draft<T: TargetBackend, D: DraftBackend>(
    sessions: &mut OpenSessions<'_, T, D>,
    stats: &mut SpecStats,
    pool: &PhrasePool,
    state: &mut Loop<'_>,
    shape: DraftShape,
) -> (Vec<u32>, Vec<f32>) {
    let Some((d, id)) = sessions.draft else {
        return Default::default();
    };
    state.last_draft = Some(shape);
    let DraftShape {
        gamma,
        lookahead,
        stop_below,
    } = shape;
    // Drafted while the last verify ran (overlap), and the target went its way.
    if let Some((mut drafted, mut confidence)) = state.predrafted.take()
        && !drafted.is_empty()
    {
        drafted.truncate(gamma);
        confidence.truncate(drafted.len());
        return (drafted, confidence);
    }
    // Overlap after thrown-away work: this round's chain is drafted beside its verify.
    if state.step_beside_draft {
        return Default::default();
    }
    let replica = d.wants_pool_delta();
    let start = state.draft_holds;
    state.draft_holds += state.for_draft.len();
    let pool_delta = match replica {
        true => std::mem::take(&mut state.delta),
        false => Vec::new(),
    };
    let new_committed = std::mem::take(&mut state.for_draft);
    let request = shape.request(state.params, Some(start), new_committed, pool_delta);
    let t0 = Instant::now();
    let span = tracing::debug_span!("draft", gamma, lookahead, stop_below);
    match d.draft(id, request).instrument(span).await {
        Ok((o, timing)) => {
            let wall = t0.elapsed().as_secs_f64();
            record_draft(stats, pool, (&o, timing, wall), lookahead, replica);
            let (mut drafted, mut confidence) = (o.tokens, o.confidence);
            drafted.truncate(gamma);
            confidence.truncate(drafted.len());
            (drafted, confidence)
        }
        Err(e) => {
            drop_draft(sessions, stats, &e);
            Default::default()
        }
    }
}
