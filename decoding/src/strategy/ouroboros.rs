//! One Ouroboros round (Zhao et al., 2024), start to end:
//! 1. the draft model drafts `gamma` tokens with lookahead (Jacobi) decoding, reading and
//!    feeding its phrase pool ([`crate::draft`]);
//! 2. the `topk` newest pool phrases keyed by the last draft token hang from the chain's
//!    tip as candidate suffixes, and trie continuations beside the chain;
//! 3. the target verifies the whole tree in one forward (the commit loop,
//!    [`crate::generate`]);
//! 4. what verification revealed feeds the pool ([`PoolLearner`]): phrases inspired by
//!    the target's tokens over a rejected draft tail, candidates refined to the target's
//!    own tokens, and n-grams of the committed text; a remote draft's replica gets them
//!    with its next call.

use super::{DraftShape, Round, Verdict, call_draft, pool_phrases, trie};
use crate::backend::{DraftBackend, TargetBackend};
use crate::generate::{Loop, OpenSessions, Shared};
use crate::params::DecodeParams;
use crate::pool::{Ngram, PhrasePool, ngrams_of};
use crate::stats::SpecStats;
use crate::validate::limits::MAX_POOL_DELTA;

/// How step 1 asks the draft (before the budget caps `gamma`). Lookahead steps emit several
/// tokens without one probability each: no stop floor.
pub(crate) fn draft_shape(params: &DecodeParams) -> DraftShape {
    DraftShape {
        gamma: params.gamma,
        lookahead: true,
        stop_below: 0.0,
    }
}

/// Steps 1 and 2: the draft's lookahead chain, pool phrases after its tip, trie
/// continuations beside it, within `budget` tokens and `room` nodes.
pub(crate) async fn round<T: TargetBackend, D: DraftBackend>(
    sessions: &mut OpenSessions<'_, T, D>,
    stats: &mut SpecStats,
    Shared { pool, trie, .. }: Shared<'_>,
    state: &mut Loop<'_>,
    text: &[u32],
    budget: usize,
    room: usize,
) -> Round {
    let params = state.params;
    let shape = draft_shape(params).capped(budget);
    let drafted = match shape.gamma {
        0 => Vec::new(),
        _ => call_draft(sessions, stats, pool, state, shape).await.0,
    };
    let root = *text.last().expect("the text is not empty");
    let mut round = Round::chain(root, drafted);
    let room_after = budget.saturating_sub(round.drafted.len());
    for c in pool_phrases(pool, stats, round.key, params.topk) {
        // Every node takes a cache row until the walk: stay within `room` nodes.
        let fit = room.saturating_sub(round.tree.len()).min(room_after);
        let c: Vec<u32> = c.into_iter().take(fit).collect();
        if !c.is_empty() {
            let nodes = round.tree.add_path(round.anchor, &c);
            round.candidates.push((c, nodes));
        }
    }
    trie::attach(&mut round, stats, trie, state, text, budget, room);
    round
}

/// Step 4: what verification and the committed text teach the shared pool (Ouroboros,
/// and `auto`, which drafts against the same pool).
pub(crate) struct PoolLearner {
    /// Phrase length of the pool.
    g: usize,
    harvest_committed: bool,
    /// Phrases learnt since the last round was built: handed to a remote draft's replica
    /// then ([`Self::hand_over`]).
    learnt: Vec<Ngram>,
}

impl PoolLearner {
    /// A learner where the request's lookahead shape matches the pool's phrases (none
    /// otherwise); it starts by harvesting the prompt's n-grams.
    pub fn new(params: &DecodeParams, pool: &PhrasePool, prompt: &[u32]) -> Option<Self> {
        let g = pool.phrase_len();
        if params.lookahead.phrase_len() != g {
            return None;
        }
        let mut learner = Self {
            g,
            harvest_committed: params.harvest_committed,
            learnt: Vec::new(),
        };
        if learner.harvest_committed {
            learner.learnt.extend(ngrams_of(prompt, g));
            pool.insert_all(&learner.learnt);
        }
        Some(learner)
    }

    /// Inspiration from the rejected draft tail, refinement of the candidates whose anchor
    /// the walk reached.
    pub fn learn_from_verify(&mut self, pool: &PhrasePool, round: &Round, verdict: &Verdict<'_>) {
        let (v, on_chain, g) = (verdict.outcome, verdict.on_chain, self.g);
        let mut learnt = Vec::new();
        if on_chain < round.drafted.len() {
            inspire_from_rejected_tail(
                &round.drafted[on_chain..],
                &round.chain[on_chain..],
                &v.outputs,
                g,
                &mut learnt,
            );
        }
        // Phrases hanging from a node the walk reached were scored in the right context:
        // the target's tokens along them refine them.
        let anchor_reached = round.anchor == 0 || v.path.contains(&round.anchor);
        if anchor_reached && !round.candidates.is_empty() {
            let first = v.outputs[round.anchor];
            let refined: Vec<Vec<u32>> = round
                .candidates
                .iter()
                .filter(|(c, _)| c.len() == g)
                .map(|(_, nodes)| {
                    std::iter::once(first)
                        .chain(nodes[..g - 1].iter().map(|&n| v.outputs[n]))
                        .collect()
                })
                .collect();
            pool.replace_newest(round.key, &refined);
            let key = round.key;
            learnt.extend(refined.into_iter().map(|phrase| Ngram { key, phrase }));
        }
        pool.insert_all(&learnt);
        self.learnt.append(&mut learnt);
    }

    /// The n-grams the newly committed tokens completed (`text` held `before` tokens).
    pub fn learn_from_commit(&mut self, pool: &PhrasePool, text: &[u32], before: usize) {
        if !self.harvest_committed {
            return;
        }
        let from = before.saturating_sub(self.g);
        let grams: Vec<Ngram> = ngrams_of(&text[from..], self.g).collect();
        pool.insert_all(&grams);
        self.learnt.extend(grams);
    }

    /// Hands what was learnt since the last round (the prompt's n-grams before the first)
    /// to `delta`, the phrases the next draft call carries to a remote draft's pool
    /// replica; with no replica to feed (`None`: a local draft shares this pool) it is
    /// let go. The oldest phrases give way where `delta` would outgrow what one call may
    /// carry.
    pub fn hand_over(&mut self, delta: Option<&mut Vec<Ngram>>) {
        let Some(delta) = delta else {
            self.learnt.clear();
            return;
        };
        delta.append(&mut self.learnt);
        let over = delta.len().saturating_sub(MAX_POOL_DELTA);
        delta.drain(..over);
    }
}

/// The published package's "inspiration": after a rejection, the target's outputs over the
/// rejected draft tail form phrases, kept only while each target token was computed on a
/// context whose previous token the phrase agrees with.
fn inspire_from_rejected_tail(
    tail: &[u32],
    nodes: &[usize],
    outputs: &[u32],
    g: usize,
    learnt: &mut Vec<Ngram>,
) {
    let b: Vec<u32> = nodes.iter().map(|&n| outputs[n]).collect();
    for s in 0..tail.len() {
        let mut phrase = Vec::with_capacity(g);
        let mut t = s;
        while phrase.len() < g && t < b.len() {
            phrase.push(b[t]);
            if t + 1 >= tail.len() || tail[t + 1] != b[t] {
                break;
            }
            t += 1;
        }
        if phrase.len() == g {
            learnt.push(Ngram {
                key: tail[s],
                phrase,
            });
        }
    }
}
