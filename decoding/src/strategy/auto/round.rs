//! One `auto` round: the zero-cost guesses (trie continuations, pool phrases) gathered and
//! planned on the cost profile, the draft called when the running policy says drafting
//! pays (with lookahead where a drafted token is cheaper that way) and pool phrases hung
//! after its chain's tip, and after the verify what the tuner learns: acceptance per
//! guess, the realized rate against the prediction (seconds from the wall clock, or from
//! a priced clock), and under the drafting policy how the other policies would have done
//! on the same text.

use super::{
    AutoTuner, DraftBacklog, Guess, Policy, PolicyScores, Prediction, RoundKind, would_commit,
};
use crate::backend::{DraftBackend, TargetBackend};
use crate::copy::{self, CopyGuess};
use crate::generate::{Loop, OpenSessions, Shared};
use crate::params::DecodeParams;
use crate::pool::PhrasePool;
use crate::stats::{ModelCall, SpecStats};
use crate::strategy::ouroboros::PoolLearner;
use crate::strategy::{DraftShape, Round, Verdict, call_draft, pool_phrases};
use crate::tree::DraftTree;
use crate::trie::TrieDraft;
use std::time::Instant;

/// The trees the other `auto` policies would have verified in a round of
/// [`Policy::Drafting`], to be scored against what the target commits there.
#[derive(Clone)]
pub(crate) struct Alternatives {
    /// What [`Policy::ZeroCost`] verifies, and the guesses behind its nodes.
    zero_cost: DraftTree,
    zero_cost_guesses: Vec<Vec<Guess>>,
    /// The verified tree is the zero-cost one (nothing was drafted): its guesses are
    /// counted already.
    zero_cost_verified: bool,
    /// What [`Policy::Mixed`] verifies, and whether it would have drafted for it.
    mixed: DraftTree,
    mixed_drafts: bool,
    /// Seconds of this round's draft call (0 without one).
    draft_s: f64,
}

impl Round {
    /// Draft chain, trie continuations and pool phrases, all from the root, within
    /// `room` nodes; every node remembers which guesses proposed it.
    fn from_guesses(
        root: u32,
        drafted: &[u32],
        found: &TrieDraft,
        copied: Option<&CopyGuess>,
        phrases: &[Vec<u32>],
        depth: usize,
        room: usize,
    ) -> Self {
        let mut tree = DraftTree::new(root);
        let chain = tree.add_path(0, drafted);
        let mut guesses = vec![Vec::new(); tree.len()];
        for (i, &n) in chain.iter().enumerate() {
            guesses[n].push(Guess::Draft(i));
        }
        let attached = found.attach(&mut tree, room);
        guesses.resize(tree.len(), Vec::new());
        let mut from_trie = vec![false; tree.len()];
        for (i, node) in attached.into_iter().enumerate() {
            if let Some(n) = node {
                guesses[n].push(Guess::trie(found.counts[i], found.totals[i]));
                from_trie[n] = true;
            }
        }
        if let Some(c) = copied {
            let fit = room.saturating_sub(tree.len()).min(depth);
            let nodes = tree.add_path(0, &c.tokens[..c.tokens.len().min(fit)]);
            guesses.resize(tree.len(), Vec::new());
            from_trie.resize(tree.len(), false);
            for n in nodes {
                guesses[n].push(Guess::copy(c.matched));
                from_trie[n] = true;
            }
        }
        // A node the draft chain holds counts as drafted, whatever else proposed it too
        // (the statistics' trie nodes and trie-accepted tokens are the trie's own).
        for &n in &chain {
            from_trie[n] = false;
        }
        let mut candidates = Vec::new();
        for c in phrases {
            let fit = room.saturating_sub(tree.len()).min(depth);
            let c: Vec<u32> = c.iter().copied().take(fit).collect();
            if c.is_empty() {
                continue;
            }
            let nodes = tree.add_path(0, &c);
            guesses.resize(tree.len(), Vec::new());
            for (d, &n) in nodes.iter().enumerate() {
                guesses[n].push(Guess::Pool(d));
            }
            candidates.push((c, nodes));
        }
        from_trie.resize(tree.len(), false);
        Self {
            tree,
            drafted: drafted.to_vec(),
            chain,
            anchor: 0,
            key: root,
            candidates,
            from_trie,
            guesses,
            confidence: Vec::new(),
            alternatives: None,
        }
    }

    /// Hangs `phrases` (the pool's, keyed by the last drafted token) from the draft
    /// chain's tip, within `depth` tokens below the root and `room` nodes, as Ouroboros
    /// does: where the whole chain is accepted they may carry the round further. They are
    /// not candidates for the pool learner's refinement (those hang from the root).
    fn hang_from_tip(&mut self, phrases: &[Vec<u32>], depth: usize, room: usize) {
        let Some(&tip) = self.chain.last() else {
            return;
        };
        for c in phrases {
            let fit = room
                .saturating_sub(self.tree.len())
                .min(depth.saturating_sub(self.chain.len()));
            if fit == 0 {
                break;
            }
            let nodes = self.tree.add_path(tip, &c[..c.len().min(fit)]);
            self.guesses.resize(self.tree.len(), Vec::new());
            self.from_trie.resize(self.tree.len(), false);
            for (d, &n) in nodes.iter().enumerate() {
                self.guesses[n].push(Guess::Suffix(d));
            }
        }
    }

    /// Keeps the nodes marked in `keep` (a closed sub-tree), cutting the chain and the
    /// phrases where their first node went.
    fn retain(self, keep: &[bool]) -> Self {
        let (tree, map) = self.tree.retain(keep);
        let chain: Vec<usize> = self.chain.iter().map_while(|&n| map[n]).collect();
        let mut drafted = self.drafted;
        drafted.truncate(chain.len());
        let mut confidence = self.confidence;
        confidence.truncate(chain.len());
        let candidates = self
            .candidates
            .into_iter()
            .filter_map(|(mut c, nodes)| {
                let nodes: Vec<usize> = nodes.iter().map_while(|&n| map[n]).collect();
                c.truncate(nodes.len());
                (!nodes.is_empty()).then_some((c, nodes))
            })
            .collect();
        let mut from_trie = vec![false; tree.len()];
        let mut guesses = vec![Vec::new(); tree.len()];
        for (old, new) in map.iter().enumerate() {
            if let Some(new) = *new {
                from_trie[new] = self.from_trie[old];
                guesses[new] = self.guesses[old].clone();
            }
        }
        Self {
            tree,
            drafted,
            chain,
            anchor: 0,
            key: self.key,
            candidates,
            from_trie,
            guesses,
            confidence,
            alternatives: self.alternatives,
        }
    }
}

/// The `auto` policy running this stretch of a request and, under
/// [`Policy::Drafting`], how every policy scored on it. The scores are recorded when it
/// ends, and on drop: a request's last stretch, or one cut short by an error, counts for
/// what it did.
struct Segment<'t> {
    tuner: &'t AutoTuner,
    greedy: bool,
    policy: Policy,
    tokens: usize,
    scores: PolicyScores,
    /// Under [`Policy::Drafting`], the tokens the target committed in this segment's
    /// scored rounds, and the other policies' trees whose paths ran to the end of what was
    /// committed when they were scored: how far such a tree would have got is settled by
    /// the tokens committed after it.
    committed: Vec<u32>,
    unsettled: Vec<Unsettled>,
}

/// Another policy's tree from an earlier round, scored for its cost and waiting for the
/// committed tokens that show how many it would have committed.
struct Unsettled {
    policy: Policy,
    tree: DraftTree,
    /// Where its round started in [`Segment::committed`].
    from: usize,
}

impl<'t> Segment<'t> {
    fn new(tuner: &'t AutoTuner, greedy: bool, policy: Policy) -> Self {
        Self {
            tuner,
            greedy,
            policy,
            tokens: 0,
            scores: PolicyScores::default(),
            committed: Vec::new(),
            unsettled: Vec::new(),
        }
    }

    /// Scores `tree` of `policy`, verified in place of the round whose `committed` tokens
    /// were just added, for `seconds`; its tokens are counted once its path stops short of
    /// what the target committed, or at the segment's end (then, a lower bound).
    fn score_tree(&mut self, policy: Policy, tree: DraftTree, committed: usize, seconds: f64) {
        self.scores.seconds[policy.index()] += seconds;
        let from = self.committed.len() - committed;
        self.unsettled.push(Unsettled { policy, tree, from });
        self.settle(false);
    }

    fn settle(&mut self, at_end: bool) {
        let (text, scores) = (&self.committed, &mut self.scores);
        self.unsettled.retain(|u| {
            let known = &text[u.from..];
            let (tokens, path) = would_commit(&u.tree, known);
            let settled = at_end || path.len() < known.len();
            if settled {
                scores.tokens[u.policy.index()] += tokens as f64;
            }
            !settled
        });
    }
}

impl Drop for Segment<'_> {
    fn drop(&mut self) {
        if self.policy == Policy::Drafting {
            self.settle(true);
            let s = &self.scores;
            let rate = |p| s.rate(p).unwrap_or(0.0);
            tracing::debug!(
                tokens = self.tokens,
                drafting = rate(Policy::Drafting),
                mixed = rate(Policy::Mixed),
                zero_cost = rate(Policy::ZeroCost),
                seconds = ?s.seconds,
                scored_tokens = ?s.tokens,
                "auto segment scored (tokens/s)"
            );
            self.tuner.record_scores(self.greedy, s);
        }
    }
}

/// What `auto` keeps across one request's rounds.
pub(crate) struct AutoRounds<'t> {
    tuner: &'t AutoTuner,
    greedy: bool,
    /// The policy running now (a new one is chosen after each segment).
    segment: Option<Segment<'t>>,
    /// The last round's prediction and the time it spent opening the draft.
    predicted: Option<(Prediction, f64)>,
    pub(crate) learner: Option<PoolLearner>,
}

impl<'t> AutoRounds<'t> {
    pub fn new(tuner: &'t AutoTuner, params: &DecodeParams, learner: Option<PoolLearner>) -> Self {
        Self {
            tuner,
            greedy: params.sampling.is_greedy(),
            segment: None,
            predicted: None,
            learner,
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn round<T: TargetBackend, D: DraftBackend>(
        &mut self,
        sessions: &mut OpenSessions<'_, T, D>,
        stats: &mut SpecStats,
        shared: Shared<'_>,
        state: &mut Loop<'_>,
        text: &[u32],
        budget: usize,
        room: usize,
    ) -> Round {
        let (tuner, greedy) = (self.tuner, self.greedy);
        let policy = self
            .segment
            .get_or_insert_with(|| {
                Segment::new(
                    tuner,
                    greedy,
                    tuner.choose_policy(greedy, sessions.can_draft()),
                )
            })
            .policy;
        let (round, predicted, opening_s) = build(
            sessions, stats, shared, tuner, policy, state, text, budget, room,
        )
        .await;
        self.predicted = Some((predicted, opening_s));
        round
    }

    pub fn learn(&mut self, pool: &PhrasePool, round: &Round, verdict: &Verdict<'_>) {
        let (t, greedy, v) = (self.tuner, self.greedy, verdict.outcome);
        t.observe_load(&verdict.timing, round.tree.len(), v.path.len() + 1);
        t.learn(greedy, &round.tree, &round.guesses, &v.path);
        let opening_s = self.predicted.map_or(0.0, |(_, s)| s);
        if let Some((p, opening_s)) = self.predicted.take() {
            // The accepted path plus the target's own token, as the plan counted.
            let seconds = verdict.round_s - opening_s;
            tracing::debug!(
                policy = self.segment.as_ref().map(|s| s.policy.name()),
                kind = ?p.kind,
                predicted_tokens = p.tokens,
                predicted_ms = p.seconds * 1e3,
                tokens = v.path.len() + 1,
                ms = seconds * 1e3,
                nodes = round.tree.len(),
                verify_ms = verdict.verify_s * 1e3,
                plain_speed = t.plain_speed(greedy),
                row_share = t.load().row_share,
                load_margin = t.load_margin(),
                "auto round"
            );
            t.observe(greedy, p, v.path.len() + 1, seconds);
        }
        if let (Some(alt), Some(seg)) = (&round.alternatives, &mut self.segment) {
            let mut committed = v.accepted.clone();
            committed.push(v.bonus);
            // Opening the draft serves the rest of the request: this segment carries its
            // share, or the policy that happened to open it would look slow.
            let share = (t.config().segment_tokens as f64 / verdict.remaining as f64).min(1.0);
            score_alternatives(
                t,
                seg,
                alt,
                &committed,
                verdict.verify_s,
                round.tree.len(),
                opening_s * share,
            );
        }
        t.learn_confidence(greedy, &round.confidence, verdict.on_chain);
        if let Some(l) = &mut self.learner {
            l.learn_from_verify(pool, round, verdict);
        }
    }

    /// Counts the committed tokens against the running policy's segment.
    pub fn committed(
        &mut self,
        pool: &PhrasePool,
        stats: &mut SpecStats,
        text: &[u32],
        before: usize,
    ) {
        let n = text.len() - before;
        if let Some(seg) = &mut self.segment {
            stats.policy_tokens[seg.policy.index()] += n as u64;
            seg.tokens += n;
            if seg.tokens >= self.tuner.config().segment_tokens {
                self.segment = None;
            }
        }
        if let Some(l) = &mut self.learner {
            l.learn_from_commit(pool, text, before);
        }
    }
}

/// The longest copy guess `auto` considers (its plan keeps what pays).
const COPY_LEN: usize = 32;

/// An `auto` round: gathers the zero-cost guesses, drafts when `policy` says so (under
/// [`Policy::Mixed`], when the profile says the draft's tokens are worth their time), and
/// keeps the nodes that pay for their rows. Under [`Policy::Drafting`] it also keeps the
/// trees the other policies would have verified here, to score them on the same text.
#[allow(clippy::too_many_arguments)]
async fn build<T: TargetBackend, D: DraftBackend>(
    sessions: &mut OpenSessions<'_, T, D>,
    stats: &mut SpecStats,
    Shared { pool, trie, .. }: Shared<'_>,
    tuner: &AutoTuner,
    policy: Policy,
    state: &mut Loop<'_>,
    text: &[u32],
    budget: usize,
    room: usize,
) -> (Round, Prediction, f64) {
    let params = state.params;
    let greedy = params.sampling.is_greedy();
    let root = *text.last().expect("the text is not empty");
    let can_draft = sessions.can_draft();
    let gamma = params.gamma.min(budget).min(room.saturating_sub(1));
    // An open draft lags by what was committed since its last call; an unopened one
    // would start from the whole text.
    let (pending, unopened) = match sessions.draft {
        Some(_) => (state.for_draft.len(), 0),
        None => (0, text.len()),
    };
    // A steady lookahead step's rows: the input token, the window's, the pool phrases
    // (where the request's phrases are the pool's).
    let la = params.lookahead;
    let lookahead_rows = match la.level >= 3 && la.phrase_len() == pool.phrase_len() {
        true => 1 + la.window_rows() + la.guess * la.phrase_len(),
        false => 0,
    };
    let backlog = DraftBacklog {
        pending,
        unopened,
        remaining: budget + 1,
        lookahead_rows,
    };
    let mut found = TrieDraft::default();
    let mut phrases = Vec::new();
    // The copy guess at its longest: the plan keeps the part that pays for its rows.
    let copied = copy::find(text, budget.min(COPY_LEN));
    if budget > 0 {
        if let Some(p) = &state.prompt_trie {
            found = trie.draft(Some(p), text, tuner.config().trie_nodes.min(room), budget);
            stats.trie_lookups += 1;
            stats.trie_hits += u64::from(!found.is_empty());
        }
        phrases = pool_phrases(pool, stats, root, params.topk);
    }
    let zero_cost = Round::from_guesses(root, &[], &found, copied.as_ref(), &phrases, budget, room);
    let mut zero_cost_plan = tuner.plan(
        greedy,
        &zero_cost.tree.parents,
        &zero_cost.guesses,
        &[],
        RoundKind::ZeroCost,
    );
    // Now and then a round that would verify guesses is a plain step instead, so that
    // the plain steps' speed, which every other round is judged against, stays known
    // (the drafting policy's audits are left whole).
    let probe =
        policy != Policy::Drafting && zero_cost_plan.nodes() > 1 && tuner.wants_plain_step(greedy);
    if probe {
        zero_cost_plan = tuner.plain_plan(zero_cost.tree.len());
    }
    let zero_cost = zero_cost.retain(&zero_cost_plan.keep);
    let drafting = match policy {
        _ if probe => None,
        _ if !can_draft || gamma == 0 => None,
        Policy::ZeroCost => None,
        Policy::Mixed => tuner.draft_gamma(greedy, gamma, &zero_cost_plan, backlog),
        // The best draft length whatever the zero-cost guesses promise.
        Policy::Drafting => tuner.drafting_gamma(greedy, gamma, backlog),
    };
    let mut predicted = zero_cost_plan.prediction(RoundKind::ZeroCost);
    let mut opening_s = 0.0;
    let mut draft_s = 0.0;
    let (mut drafted, mut confidence) = (Vec::new(), Vec::new());
    if let Some((g, p)) = drafting {
        if sessions.draft.is_none()
            && let Some(d) = sessions.spare.take()
        {
            let t0 = Instant::now();
            let opened = d.open(text).await;
            opening_s = t0.elapsed().as_secs_f64();
            match opened {
                Ok(id) => {
                    stats.add_draft_open(text.len());
                    if let Some(clock) = tuner.clock() {
                        let open = &stats.calls[stats.calls.len() - 1..];
                        opening_s = clock.seconds(open, text.len());
                    }
                    sessions.draft = Some((d, id));
                    state.for_draft.clear();
                    state.draft_holds = text.len();
                }
                Err(e) => stats.fall_back(format!("draft open failed: {e}")),
            }
        }
        // With lookahead where a token is cheaper that way (its steps give several
        // tokens and no probability each: `g` tokens). Otherwise up to the most tokens
        // allowed, cut where the draft's confidence says the next token would not pay:
        // long runs where the text is predictable, short elsewhere.
        let lookahead = tuner.lookahead_ratio(greedy, lookahead_rows).is_some();
        let stop = match lookahead {
            true => 0.0,
            false => tuner.draft_stop(greedy, gamma, &p),
        };
        let ask = if stop > 0.0 { gamma.max(g) } else { g };
        let t0 = Instant::now();
        let first_call = stats.calls.len();
        let shape = DraftShape {
            gamma: ask,
            lookahead,
            stop_below: stop,
        };
        (drafted, confidence) = call_draft(sessions, stats, pool, state, shape).await;
        let calls = &stats.calls[first_call..];
        draft_s = match tuner.clock() {
            Some(clock) => clock.seconds(calls, text.len()),
            None => t0.elapsed().as_secs_f64(),
        };
        if let (true, Some(call @ &ModelCall::Draft { forwards, .. })) = (lookahead, calls.last()) {
            let extra = call.extra_draft_rows() as usize;
            tuner.learn_lookahead(greedy, drafted.len(), forwards as usize, extra);
        }
        // Charged to drafting even when the draft came back empty: that was its cost.
        predicted = p;
    }
    // Pool phrases keyed by the last drafted token, to hang from the chain's tip.
    let tip_phrases = match drafted.last() {
        Some(&last) => pool_phrases(pool, stats, last, params.topk),
        None => Vec::new(),
    };
    // The draft's chain with the given zero-cost guesses beside it (and the phrases after
    // its tip), the nodes that pay.
    let with_draft = |found: &TrieDraft, copied: Option<&CopyGuess>, phrases: &[Vec<u32>]| {
        let mut r = Round::from_guesses(root, &drafted, found, copied, phrases, budget, room);
        r.hang_from_tip(&tip_phrases, budget, room);
        r.confidence = confidence.clone();
        let plan = tuner.plan(
            greedy,
            &r.tree.parents,
            &r.guesses,
            &r.confidence,
            RoundKind::Drafted,
        );
        r.retain(&plan.keep)
    };
    let mut round = match policy {
        _ if drafted.is_empty() => zero_cost.clone(),
        // The chain goes alone: zero-cost nodes beside it cost rows that the per-round
        // estimates over-value, which is what scoring `Mixed` beside it measures.
        Policy::Drafting => with_draft(&TrieDraft::default(), None, &[]),
        _ => with_draft(&found, copied.as_ref(), &phrases),
    };
    if policy == Policy::Drafting {
        // Mixed would have drafted the same tokens (the same length is best for both).
        let mixed_drafts = !drafted.is_empty()
            && tuner
                .draft_gamma(greedy, gamma, &zero_cost_plan, backlog)
                .is_some();
        let mixed = match mixed_drafts {
            true => with_draft(&found, copied.as_ref(), &phrases).tree,
            false => zero_cost.tree.clone(),
        };
        round.alternatives = Some(Alternatives {
            zero_cost: zero_cost.tree,
            zero_cost_guesses: zero_cost.guesses,
            zero_cost_verified: drafted.is_empty(),
            mixed,
            mixed_drafts,
            draft_s,
        });
    }
    stats.trie_nodes += round.from_trie.iter().filter(|&&t| t).count() as u64;
    (round, predicted, opening_s)
}

/// Scores a round of [`Policy::Drafting`] and the trees the other policies would have
/// verified in its place against the `committed` tokens (accepted and the target's own),
/// and, where such a tree matches all of them, against the tokens committed after (a
/// zero-cost guess that copies a long stretch would have committed more than the drafted
/// chain did). The verify took `verify_s` for `nodes` nodes; the others' verifies are
/// priced by the cost profile under the current load (the time the session waits),
/// scaled to that. The zero-cost guesses' outcome teaches their acceptance as if
/// verified, where it is known (the path stopped short of the committed tokens).
fn score_alternatives(
    tuner: &AutoTuner,
    seg: &mut Segment<'_>,
    alt: &Alternatives,
    committed: &[u32],
    verify_s: f64,
    nodes: usize,
    opening_s: f64,
) {
    let pricing = tuner.pricing();
    let scale = verify_s / pricing.verify_wall(nodes).max(1e-12);
    let verify = |tree: &DraftTree| pricing.verify_wall(tree.len()) * scale;
    seg.scores.add(
        Policy::Drafting,
        committed.len(),
        alt.draft_s + verify_s + opening_s,
    );
    seg.committed.extend_from_slice(committed);
    let (_, path) = would_commit(&alt.zero_cost, committed);
    if !alt.zero_cost_verified && path.len() < committed.len() {
        tuner.learn(seg.greedy, &alt.zero_cost, &alt.zero_cost_guesses, &path);
    }
    let zero_cost_s = verify(&alt.zero_cost);
    seg.score_tree(
        Policy::ZeroCost,
        alt.zero_cost.clone(),
        committed.len(),
        zero_cost_s,
    );
    let draft_s = match alt.mixed_drafts {
        true => alt.draft_s + opening_s,
        false => 0.0,
    };
    let mixed_s = draft_s + verify(&alt.mixed);
    seg.score_tree(Policy::Mixed, alt.mixed.clone(), committed.len(), mixed_s);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::auto::{CostProfile, DraftCost};

    /// Another policy's tree that matches every token the drafted round committed is
    /// followed along the tokens committed after it: a long zero-cost guess is credited
    /// with all it would have committed, not cut to the drafted round's length; at the
    /// segment's end what is still open counts as far as the tokens go.
    #[test]
    fn a_tree_that_outruns_the_drafted_round_is_followed_along_the_next_rounds() {
        let draft = DraftCost {
            per_call: 0.0,
            per_token: 0.01,
            catch_up: 0.001,
        };
        let tuner = AutoTuner::new(CostProfile::new(vec![(1, 0.02)], Some(draft)).unwrap());
        let mut seg = Segment::new(&tuner, true, Policy::Drafting);
        let mut long = DraftTree::new(0);
        long.add_path(0, &[1, 2, 3, 4, 5, 6]);
        let mut short = DraftTree::new(0);
        short.add_path(0, &[1, 9]);
        let zero_cost = |seg: &Segment<'_>| seg.scores.tokens[Policy::ZeroCost.index()];
        let mixed = |seg: &Segment<'_>| seg.scores.tokens[Policy::Mixed.index()];

        // The drafted round commits 1 2: the long guess matched both and waits.
        seg.committed.extend_from_slice(&[1, 2]);
        seg.score_tree(Policy::ZeroCost, long.clone(), 2, 0.5);
        seg.score_tree(Policy::Mixed, short, 2, 0.25);
        assert_eq!(zero_cost(&seg), 0.0);
        assert_eq!(seg.scores.seconds[Policy::ZeroCost.index()], 0.5);
        assert_eq!(mixed(&seg), 2.0, "matched 1, then the target's 2");

        // The next commits 3 4 5 7: the long guess stops at 5, and the target's 7 follows.
        seg.committed.extend_from_slice(&[3, 4, 5, 7]);
        seg.score_tree(Policy::ZeroCost, DraftTree::new(2), 4, 0.5);
        assert_eq!(zero_cost(&seg), 6.0 + 1.0, "1 2 3 4 5 and 7; then 3 alone");

        // Still open at the end: counted as far as the committed tokens go.
        seg.committed.push(1);
        seg.score_tree(Policy::ZeroCost, long, 1, 0.5);
        assert_eq!(zero_cost(&seg), 7.0);
        seg.scores.add(Policy::Drafting, 7, 1.0);
        drop(seg);
        let rate = tuner.policy_rate(true, Policy::ZeroCost);
        assert_eq!(rate, Some(8.0 / 1.5));
    }

    /// Trie and copy guesses that run along the draft chain leave its nodes drafted: only
    /// the nodes they add are the trie's (every proposer is still remembered per node).
    #[test]
    fn guesses_along_the_draft_chain_leave_its_nodes_drafted() {
        let found = TrieDraft {
            tokens: vec![5, 6, 7],
            parents: vec![-1, 0, 1],
            matched: 2,
            counts: vec![3, 3, 2],
            totals: vec![4, 3, 3],
        };
        let copied = CopyGuess {
            tokens: vec![5, 9],
            matched: 8,
        };
        let r = Round::from_guesses(1, &[5, 6], &found, Some(&copied), &[], 8, 16);
        // Nodes: root, 5, 6 (the chain), 7 (the trie's), 9 (the copy's).
        assert_eq!(r.tree.tokens, vec![1, 5, 6, 7, 9]);
        assert_eq!(r.chain, vec![1, 2]);
        assert_eq!(r.from_trie, vec![false, false, false, true, true]);
        assert_eq!(r.guesses[1].len(), 3, "drafted, the trie's and the copy's");
        assert_eq!(r.guesses[3].len(), 1);
    }

    /// Phrases after the chain's tip hang from its last node, within the depth and room
    /// left, each token a suffix guess at its depth below the tip; a round without a
    /// chain takes none; retaining the chain's nodes but the tip's children keeps the
    /// chain whole.
    #[test]
    fn phrases_hang_from_the_draft_chains_tip() {
        let none = TrieDraft::default();
        let mut r = Round::from_guesses(1, &[5, 6], &none, None, &[], 6, 16);
        r.hang_from_tip(&[vec![7, 8, 9], vec![7, 3]], 6, 16);
        // root, 5, 6 (the chain), then 7, 8, 9 below 6 and 3 below that 7 (the second
        // phrase shares the first's 7): within 6 tokens of the root, 4 after the chain.
        assert_eq!(r.tree.tokens, vec![1, 5, 6, 7, 8, 9, 3]);
        assert_eq!(r.tree.parents, vec![-1, 0, 1, 2, 3, 4, 3]);
        assert_eq!(r.guesses[3], vec![Guess::Suffix(0), Guess::Suffix(0)]);
        assert_eq!(r.guesses[5], vec![Guess::Suffix(2)]);
        assert_eq!(r.guesses[6], vec![Guess::Suffix(1)]);
        assert!(r.candidates.is_empty() && r.from_trie.iter().all(|&t| !t));
        let mut deep = Round::from_guesses(1, &[5, 6], &none, None, &[], 3, 16);
        deep.hang_from_tip(&[vec![7, 8, 9]], 3, 16);
        assert_eq!(
            deep.tree.tokens,
            vec![1, 5, 6, 7],
            "depth 3: one suffix token"
        );
        let mut tight = Round::from_guesses(1, &[5, 6], &none, None, &[], 8, 4);
        tight.hang_from_tip(&[vec![7, 8, 9]], 8, 4);
        assert_eq!(tight.tree.len(), 4, "room for 4 nodes");
        let mut plain = Round::from_guesses(1, &[], &none, None, &[], 8, 16);
        plain.hang_from_tip(&[vec![7, 8]], 8, 16);
        assert_eq!(plain.tree.len(), 1);
        let kept = r.retain(&[true, true, true, false, false, false, false]);
        assert_eq!(kept.chain, vec![1, 2]);
        assert_eq!(kept.drafted, vec![5, 6]);
    }
}
