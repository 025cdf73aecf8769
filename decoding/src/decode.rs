//! The decoding loops, written once over [`TargetBackend`] and [`DraftBackend`]: plain
//! greedy (or plain sampling), classic speculative decoding, lookahead decoding, trie-cache
//! drafting, Ouroboros, and `auto`, which sizes each round from a cost profile. Every
//! committed token is the target's own choice for its exact prefix, so all strategies give
//! the tokens plain decoding gives.

use crate::auto::{
    AutoTuner, DraftBacklog, Guess, Policy, PolicyScores, Prediction, RoundKind, SEGMENT_TOKENS,
    would_commit,
};
use crate::backend::{DraftBackend, DraftRequest, SessionId, TargetBackend};
use crate::error::{DecodingError, Result};
use crate::lookahead::LookaheadParams;
use crate::pool::{Ngram, PhrasePool};
use crate::sampling::SamplingParams;
use crate::stats::SpecStats;
use crate::tree::DraftTree;
use crate::trie::{PromptTrie, TrieCache, TrieDraft};
use std::time::Instant;
use tracing::Instrument;

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
    /// `auto` sets its own from the cost profile.
    pub draft_stop: f32,
    pub lookahead: LookaheadParams,
    /// Pool phrases appended as candidate suffixes after the draft (Ouroboros).
    pub topk: usize,
    /// Also feed the pool with the n-grams of the prompt and of committed text.
    pub harvest_committed: bool,
    /// Most trie nodes per verify tree (trie strategy; Ouroboros adds them to its tree,
    /// 0 turns that off; `auto` sizes its trees itself, and only 0 matters to it).
    pub trie_budget: usize,
}

impl Default for DecodeParams {
    fn default() -> Self {
        Self {
            strategy: Strategy::Ouroboros,
            max_new_tokens: 256,
            eos: Vec::new(),
            sampling: SamplingParams::greedy(),
            gamma: 8,
            draft_stop: 0.0,
            lookahead: LookaheadParams::default(),
            topk: 3,
            harvest_committed: true,
            trie_budget: 4,
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
}

struct Sessions<'a, T: TargetBackend, D: DraftBackend> {
    target: &'a T,
    target_id: SessionId,
    draft: Option<(&'a D, SessionId)>,
    /// A draft not opened yet: `auto` opens it the first time drafting pays.
    spare: Option<&'a D>,
}

impl<T: TargetBackend, D: DraftBackend> Sessions<'_, T, D> {
    /// Whether a draft is open or can still be opened.
    fn can_draft(&self) -> bool {
        self.draft.is_some() || self.spare.is_some()
    }

    async fn close(self) {
        // Closing is best effort: a failed close only leaves a session for the TTL.
        if let Err(e) = self.target.close(self.target_id).await {
            tracing::debug!("closing target session: {e}");
        }
        if let Some((d, id)) = self.draft
            && let Err(e) = d.close(id).await
        {
            tracing::debug!("closing draft session: {e}");
        }
    }
}

/// What requests share: the phrase pool, the output trie, and the `auto` strategy's cost
/// profile and acceptance counts (`None` where no profile was measured).
#[derive(Clone, Copy)]
pub struct Shared<'a> {
    pub pool: &'a PhrasePool,
    pub trie: &'a TrieCache,
    pub tuner: Option<&'a AutoTuner>,
}

/// Runs one request. `draft` is the draft model for speculative/Ouroboros/auto, or the
/// target model's own lookahead host for [`Strategy::Lookahead`]; when it is missing or
/// fails, the loop carries on target-only (still exact) and says so in the statistics.
/// `on_tokens` sees every batch of committed tokens as soon as it is known. What `shared`
/// holds only changes how often guesses hit, never the tokens.
pub async fn generate<T: TargetBackend, D: DraftBackend>(
    target: &T,
    draft: Option<&D>,
    shared: Shared<'_>,
    prompt: &[u32],
    params: &DecodeParams,
    on_tokens: &mut TokenSink<'_>,
) -> Result<Generation> {
    params.validate()?;
    if prompt.is_empty() {
        return Err(DecodingError::invalid("the prompt has no tokens"));
    }
    let info = target.info();
    if prompt.len() >= info.max_position {
        return Err(DecodingError::invalid(format!(
            "the prompt has {} tokens; the target's context is {}",
            prompt.len(),
            info.max_position
        )));
    }
    if params.strategy == Strategy::Auto && shared.tuner.is_none() {
        return Err(DecodingError::invalid(
            "the auto strategy needs a cost profile, and none was measured here",
        ));
    }
    if params.strategy == Strategy::Lookahead {
        return lookahead_only(draft, prompt, params, on_tokens).await;
    }
    let started = Instant::now();
    let mut stats = SpecStats::new(params.strategy);
    let target_id = target
        .open(prompt)
        .instrument(tracing::debug_span!("prefill", tokens = prompt.len()))
        .await?;
    stats.prefill_s = started.elapsed().as_secs_f64();
    let mut sessions = Sessions {
        target,
        target_id,
        draft: None,
        spare: None,
    };
    if params.strategy == Strategy::Auto {
        sessions.spare = draft;
    } else if params.strategy.needs_draft() {
        match draft {
            Some(d) => match d.open(prompt).await {
                Ok(id) => sessions.draft = Some((d, id)),
                Err(e) => stats.fall_back(format!("draft open failed: {e}")),
            },
            None => stats.fall_back("no draft backend".to_string()),
        }
    }
    let r = run_rounds(&mut sessions, &mut stats, shared, prompt, params, on_tokens).await;
    sessions.close().await;
    stats.total_s = started.elapsed().as_secs_f64();
    if stats.trie_lookups > 0 {
        stats.trie_cache_nodes = shared.trie.len() as u64;
        stats.trie_cache_bytes = shared.trie.approx_bytes() as u64;
    }
    let (tokens, sources, finish) = r?;
    stats.committed = tokens.len() as u64;
    Ok(Generation {
        tokens,
        sources,
        finish,
        stats,
    })
}

/// Most trie nodes `auto` considers per round before keeping the ones that pay.
const AUTO_TRIE_NODES: usize = 48;

/// One round's verify tree and where its nodes came from.
#[derive(Clone)]
struct Round {
    tree: DraftTree,
    /// Draft tokens in the tree, and their chain of nodes below the root.
    drafted: Vec<u32>,
    chain: Vec<usize>,
    /// The node pool phrases hang from, and the token they were looked up under.
    anchor: usize,
    key: u32,
    /// Pool phrases in the tree (possibly cut short) and their nodes.
    candidates: Vec<(Vec<u32>, Vec<usize>)>,
    from_trie: Vec<bool>,
    /// `auto` only: the guesses behind every node, for its acceptance counts.
    guesses: Vec<Vec<Guess>>,
    /// `auto` only: the draft's probability of each drafted token, where it gave them.
    confidence: Vec<f32>,
    /// `auto` under [`Policy::Drafting`]: what the other policies would have verified.
    alternatives: Option<Alternatives>,
}

/// The trees the other `auto` policies would have verified in a round of
/// [`Policy::Drafting`], to be scored against what the target commits there.
#[derive(Clone)]
struct Alternatives {
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
}

impl Drop for Segment<'_> {
    fn drop(&mut self) {
        if self.policy == Policy::Drafting {
            let s = &self.scores;
            let rate = |p| s.rate(p).unwrap_or(0.0);
            tracing::debug!(
                tokens = self.tokens,
                drafting = rate(Policy::Drafting),
                mixed = rate(Policy::Mixed),
                zero_cost = rate(Policy::ZeroCost),
                "auto segment scored (tokens/s)"
            );
            self.tuner.record_scores(self.greedy, s);
        }
    }
}

/// Per-request state of the loop that the round builders read and write.
struct Loop<'p> {
    params: &'p DecodeParams,
    prompt_trie: Option<PromptTrie>,
    /// Committed tokens the draft has not seen yet.
    for_draft: Vec<u32>,
    /// Phrases learnt since the last draft call, for a remote draft's pool replica.
    delta: Vec<Ngram>,
}

async fn call_draft<T: TargetBackend, D: DraftBackend>(
    sessions: &mut Sessions<'_, T, D>,
    stats: &mut SpecStats,
    pool: &PhrasePool,
    state: &mut Loop<'_>,
    gamma: usize,
    lookahead: bool,
    stop_below: f32,
) -> (Vec<u32>, Vec<f32>) {
    let Some((d, id)) = sessions.draft else {
        return Default::default();
    };
    let share_pool = lookahead && d.wants_pool_delta();
    let request = DraftRequest {
        new_committed: std::mem::take(&mut state.for_draft),
        gamma,
        lookahead: lookahead.then_some(state.params.lookahead),
        pool_delta: if share_pool {
            std::mem::take(&mut state.delta)
        } else {
            Vec::new()
        },
        eos: state.params.eos.clone(),
        stop_below,
    };
    let t0 = Instant::now();
    let span = tracing::debug_span!("draft", gamma, lookahead, stop_below);
    match d.draft(id, request).instrument(span).await {
        Ok((o, timing)) => {
            stats.add_draft(&o, timing, t0.elapsed().as_secs_f64());
            if share_pool {
                pool.insert_all(&o.harvested);
            }
            let (mut drafted, mut confidence) = (o.tokens, o.confidence);
            drafted.truncate(gamma);
            confidence.truncate(drafted.len());
            (drafted, confidence)
        }
        Err(e) => {
            stats.fall_back(format!("draft failed: {e}"));
            sessions.draft = None;
            Default::default()
        }
    }
}

/// A fixed-shape round: the draft's chain (speculative, Ouroboros), pool phrases after
/// its tip (Ouroboros) and trie continuations beside it (trie, Ouroboros).
async fn fixed_round<T: TargetBackend, D: DraftBackend>(
    sessions: &mut Sessions<'_, T, D>,
    stats: &mut SpecStats,
    Shared { pool, trie, .. }: Shared<'_>,
    state: &mut Loop<'_>,
    text: &[u32],
    budget: usize,
    room: usize,
) -> Round {
    let params = state.params;
    let ouroboros = params.strategy == Strategy::Ouroboros;
    let drafted = if budget > 0 {
        let gamma = params.gamma.min(budget);
        // The draft's lookahead steps emit several tokens without one probability each.
        let stop = if ouroboros { 0.0 } else { params.draft_stop };
        call_draft(sessions, stats, pool, state, gamma, ouroboros, stop)
            .await
            .0
    } else {
        Vec::new()
    };
    state.delta.clear();
    let root = *text.last().expect("the text is not empty");
    let mut tree = DraftTree::new(root);
    let chain = tree.add_path(0, &drafted);
    let tip = chain.last().copied().unwrap_or(0);
    let key = *drafted.last().unwrap_or(&root);
    let mut candidates: Vec<(Vec<u32>, Vec<usize>)> = Vec::new();
    if ouroboros && params.topk > 0 {
        let room_after = budget.saturating_sub(drafted.len());
        let found = pool.newest(key, params.topk);
        stats.pool_lookups += 1;
        if !found.is_empty() {
            stats.pool_hits += 1;
        }
        for c in found {
            // Every node takes a cache row until the walk: stay within `room` nodes.
            let fit = room.saturating_sub(tree.len()).min(room_after);
            let c: Vec<u32> = c.into_iter().take(fit).collect();
            if !c.is_empty() {
                let nodes = tree.add_path(tip, &c);
                candidates.push((c, nodes));
            }
        }
    }
    let mut from_trie = Vec::new();
    if let Some(p) = &state.prompt_trie
        && budget > 0
    {
        // Continuations of the committed text, beside (and, where they agree, through)
        // the draft chain.
        let nodes = params.trie_budget.min(room.saturating_sub(tree.len()));
        let found = trie.draft(Some(p), text, nodes, budget);
        stats.trie_lookups += 1;
        if !found.is_empty() {
            stats.trie_hits += 1;
        }
        let before = tree.len();
        let attached = found.attach(&mut tree, room);
        stats.trie_nodes += (tree.len() - before) as u64;
        from_trie = vec![false; tree.len()];
        for n in attached.into_iter().flatten() {
            from_trie[n] = true;
        }
    }
    Round {
        tree,
        drafted,
        chain,
        anchor: tip,
        key,
        candidates,
        from_trie,
        guesses: Vec::new(),
        confidence: Vec::new(),
        alternatives: None,
    }
}

/// An `auto` round: gathers the zero-cost guesses, drafts when `policy` says so (under
/// [`Policy::Mixed`], when the profile says the draft's tokens are worth their time), and
/// keeps the nodes that pay for their rows. Under [`Policy::Drafting`] it also keeps the
/// trees the other policies would have verified here, to score them on the same text.
#[allow(clippy::too_many_arguments)]
async fn auto_round<T: TargetBackend, D: DraftBackend>(
    sessions: &mut Sessions<'_, T, D>,
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
    let backlog = DraftBacklog {
        pending,
        unopened,
        remaining: budget + 1,
    };
    let mut found = TrieDraft::default();
    let mut phrases = Vec::new();
    if budget > 0 {
        if let Some(p) = &state.prompt_trie {
            found = trie.draft(Some(p), text, AUTO_TRIE_NODES.min(room), budget);
            stats.trie_lookups += 1;
            stats.trie_hits += u64::from(!found.is_empty());
        }
        if params.topk > 0 {
            phrases = pool.newest(root, params.topk);
            stats.pool_lookups += 1;
            stats.pool_hits += u64::from(!phrases.is_empty());
        }
    }
    let zero_cost = Round::from_guesses(root, &[], &found, &phrases, budget, room);
    let zero_cost_plan = tuner.plan(
        greedy,
        &zero_cost.tree.parents,
        &zero_cost.guesses,
        &[],
        RoundKind::ZeroCost,
    );
    let zero_cost = zero_cost.retain(&zero_cost_plan.keep);
    let drafting = match policy {
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
                    sessions.draft = Some((d, id));
                    state.for_draft.clear();
                }
                Err(e) => stats.fall_back(format!("draft open failed: {e}")),
            }
        }
        // Up to the most tokens allowed, cut where the draft's confidence says the next
        // token would not pay: long runs where the text is predictable, short elsewhere.
        let stop = tuner.draft_stop(greedy, gamma, &p);
        let ask = if stop > 0.0 { gamma.max(g) } else { g };
        let t0 = Instant::now();
        (drafted, confidence) = call_draft(sessions, stats, pool, state, ask, false, stop).await;
        draft_s = t0.elapsed().as_secs_f64();
        // Charged to drafting even when the draft came back empty: that was its cost.
        predicted = p;
    }
    // The draft's chain with the given zero-cost guesses beside it, the nodes that pay.
    let with_draft = |found: &TrieDraft, phrases: &[Vec<u32>]| {
        let mut r = Round::from_guesses(root, &drafted, found, phrases, budget, room);
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
        Policy::Drafting => with_draft(&TrieDraft::default(), &[]),
        _ => with_draft(&found, &phrases),
    };
    if policy == Policy::Drafting {
        // Mixed would have drafted the same tokens (the same length is best for both).
        let mixed_drafts = !drafted.is_empty()
            && tuner
                .draft_gamma(greedy, gamma, &zero_cost_plan, backlog)
                .is_some();
        let mixed = match mixed_drafts {
            true => with_draft(&found, &phrases).tree,
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

async fn run_rounds<T: TargetBackend, D: DraftBackend>(
    sessions: &mut Sessions<'_, T, D>,
    stats: &mut SpecStats,
    shared: Shared<'_>,
    prompt: &[u32],
    params: &DecodeParams,
    on_tokens: &mut TokenSink<'_>,
) -> Result<(Vec<u32>, Vec<TokenSource>, FinishReason)> {
    let Shared { pool, trie, .. } = shared;
    let max_pos = sessions.target.info().max_position;
    let tuner = shared.tuner.filter(|_| params.strategy == Strategy::Auto);
    let ouroboros = params.strategy == Strategy::Ouroboros;
    let use_trie = params.trie_budget > 0
        && matches!(
            params.strategy,
            Strategy::Trie | Strategy::Ouroboros | Strategy::Auto
        );
    let mut state = Loop {
        params,
        prompt_trie: use_trie.then(|| PromptTrie::new(prompt, trie.config())),
        for_draft: Vec::new(),
        delta: Vec::new(),
    };
    if let Some(p) = &state.prompt_trie {
        stats.trie_prompt_nodes = p.len() as u64;
    }
    let g = pool.phrase_len();
    let learn = (ouroboros || tuner.is_some()) && params.lookahead.phrase_len() == g;
    let greedy = params.sampling.is_greedy();
    let mut text = prompt.to_vec();
    let mut out: Vec<u32> = Vec::new();
    let mut sources: Vec<TokenSource> = Vec::new();
    let mut learnt = Vec::new();
    // `auto` only: the policy running now (a new one is chosen after each segment).
    let mut segment: Option<Segment<'_>> = None;
    if learn && params.harvest_committed {
        learnt.extend(crate::pool::ngrams_of(prompt, g));
        pool.insert_all(&learnt);
    }
    loop {
        let remaining = params.max_new_tokens - out.len();
        // Room for the tree below the context limit: the root sits at text.len() - 1.
        let room = max_pos.saturating_sub(text.len());
        if room == 0 {
            return Ok((out, sources, FinishReason::ContextFull));
        }
        // Drafting beyond what may still be committed is wasted work.
        let budget = remaining.saturating_sub(1).min(room - 1);
        // One span per round, parent of its draft call and its verify.
        let round_span = tracing::debug_span!(
            "round",
            nodes = tracing::field::Empty,
            accepted = tracing::field::Empty
        );
        let started = Instant::now();
        let (round, predicted) = match tuner {
            Some(t) => {
                let policy = segment
                    .get_or_insert_with(|| Segment {
                        tuner: t,
                        greedy,
                        policy: t.choose_policy(greedy, sessions.can_draft()),
                        tokens: 0,
                        scores: PolicyScores::default(),
                    })
                    .policy;
                let (r, p, opening_s) = auto_round(
                    sessions, stats, shared, t, policy, &mut state, &text, budget, room,
                )
                .instrument(round_span.clone())
                .await;
                (r, Some((p, opening_s)))
            }
            None => {
                let r = fixed_round(sessions, stats, shared, &mut state, &text, budget, room)
                    .instrument(round_span.clone())
                    .await;
                (r, None)
            }
        };
        let Round {
            tree,
            drafted,
            chain,
            anchor,
            key,
            candidates,
            from_trie,
            guesses,
            confidence,
            alternatives,
        } = round;
        let t0 = Instant::now();
        let (v, timing) = sessions
            .target
            .verify(sessions.target_id, &tree, &params.sampling)
            .instrument(tracing::debug_span!(parent: &round_span, "verify", nodes = tree.len()))
            .await?;
        round_span.record("nodes", tree.len());
        round_span.record("accepted", v.path.len());
        let verify_s = t0.elapsed().as_secs_f64();
        stats.add_verify(timing, verify_s, tree.len());
        if let Some(t) = tuner {
            t.learn(greedy, &tree, &guesses, &v.path);
            if let Some((p, opening_s)) = predicted {
                // The accepted path plus the target's own token, as the plan counted.
                let seconds = started.elapsed().as_secs_f64() - opening_s;
                tracing::debug!(
                    policy = segment.as_ref().map(|s| s.policy.name()),
                    kind = ?p.kind,
                    predicted_tokens = p.tokens,
                    predicted_ms = p.seconds * 1e3,
                    tokens = v.path.len() + 1,
                    ms = seconds * 1e3,
                    nodes = tree.len(),
                    verify_ms = verify_s * 1e3,
                    "auto round"
                );
                t.observe(greedy, p, v.path.len() + 1, seconds);
            }
            if let (Some(alt), Some(seg)) = (&alternatives, &mut segment) {
                let mut committed = v.accepted.clone();
                committed.push(v.bonus);
                // Opening the draft serves the rest of the request: this segment carries
                // its share, or the policy that happened to open it would look slow.
                let opening_s = predicted.map_or(0.0, |(_, s)| s);
                let opening_share = opening_s * (SEGMENT_TOKENS as f64 / remaining as f64).min(1.0);
                score_alternatives(t, seg, alt, &committed, verify_s, tree.len(), opening_share);
            }
        }
        // The walk may leave the chain at any node when other paths hang off the root.
        let on_chain = v
            .path
            .iter()
            .zip(&chain)
            .take_while(|(a, b)| a == b)
            .count();
        if let Some(t) = tuner {
            t.learn_confidence(greedy, &confidence, on_chain);
        }
        stats.add_acceptance(drafted.len(), on_chain, v.path.len() - on_chain);
        stats.trie_accepted += v
            .path
            .iter()
            .filter(|&&n| from_trie.get(n) == Some(&true))
            .count() as u64;

        if learn {
            learnt.clear();
            if on_chain < drafted.len() {
                inspire_from_rejected_tail(
                    &drafted[on_chain..],
                    &chain[on_chain..],
                    &v.outputs,
                    g,
                    &mut learnt,
                );
            }
            // Phrases hanging from a node the walk reached were scored in the right
            // context: the target's tokens along them refine them.
            let anchor_reached = anchor == 0 || v.path.contains(&anchor);
            if anchor_reached && !candidates.is_empty() {
                let first = v.outputs[anchor];
                let refined: Vec<Vec<u32>> = candidates
                    .iter()
                    .filter(|(c, _)| c.len() == g)
                    .map(|(_, nodes)| {
                        std::iter::once(first)
                            .chain(nodes[..g - 1].iter().map(|&n| v.outputs[n]))
                            .collect()
                    })
                    .collect();
                pool.replace_newest(key, &refined);
                learnt.extend(refined.into_iter().map(|phrase| Ngram { key, phrase }));
            }
            pool.insert_all(&learnt);
        }

        let mut new = v.accepted;
        new.push(v.bonus);
        let mut new_sources: Vec<TokenSource> = v
            .path
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                if i < on_chain {
                    TokenSource::Draft
                } else if from_trie.get(n) == Some(&true) {
                    TokenSource::Trie
                } else {
                    TokenSource::Pool
                }
            })
            .collect();
        new_sources.push(TokenSource::Target);
        let finish = cut_at_end(&mut new, &params.eos, remaining);
        new_sources.truncate(new.len());
        if let Some(seg) = &mut segment {
            stats.policy_tokens[seg.policy.index()] += new.len() as u64;
            seg.tokens += new.len();
            if seg.tokens >= SEGMENT_TOKENS {
                segment = None;
            }
        }
        let before = text.len();
        text.extend_from_slice(&new);
        let recorded = out.len();
        out.extend_from_slice(&new);
        if use_trie {
            trie.record(&out, recorded);
        }
        state.for_draft.extend_from_slice(&new);
        if learn && params.harvest_committed {
            let from = before.saturating_sub(g);
            let grams: Vec<Ngram> = crate::pool::ngrams_of(&text[from..], g).collect();
            pool.insert_all(&grams);
            learnt.extend(grams);
        }
        if ouroboros && learn && sessions.draft.is_some_and(|(d, _)| d.wants_pool_delta()) {
            state.delta.append(&mut learnt);
        }
        sources.extend_from_slice(&new_sources);
        if on_tokens(&new, &new_sources) == Flow::Stop {
            return Ok((out, sources, FinishReason::Stop));
        }
        if let Some(f) = finish {
            return Ok((out, sources, f));
        }
    }
}

/// Scores a round of [`Policy::Drafting`] and the trees the other policies would have
/// verified in its place against the `committed` tokens (accepted and the target's own).
/// The verify took `verify_s` for `nodes` nodes; the others' verifies are priced by the
/// cost profile, scaled to that. The zero-cost guesses' outcome teaches their acceptance
/// as if verified, where it is known (the path stopped short of the committed tokens).
fn score_alternatives(
    tuner: &AutoTuner,
    seg: &mut Segment<'_>,
    alt: &Alternatives,
    committed: &[u32],
    verify_s: f64,
    nodes: usize,
    opening_s: f64,
) {
    let profile = tuner.profile();
    let scale = verify_s / profile.verify_cost(nodes).max(1e-12);
    let verify = |tree: &DraftTree| profile.verify_cost(tree.len()) * scale;
    seg.scores.add(
        Policy::Drafting,
        committed.len(),
        alt.draft_s + verify_s + opening_s,
    );
    let (zero_cost, path) = would_commit(&alt.zero_cost, committed);
    seg.scores
        .add(Policy::ZeroCost, zero_cost, verify(&alt.zero_cost));
    if !alt.zero_cost_verified && path.len() < committed.len() {
        tuner.learn(seg.greedy, &alt.zero_cost, &alt.zero_cost_guesses, &path);
    }
    let (mixed, _) = would_commit(&alt.mixed, committed);
    let draft_s = match alt.mixed_drafts {
        true => alt.draft_s + opening_s,
        false => 0.0,
    };
    seg.scores
        .add(Policy::Mixed, mixed, draft_s + verify(&alt.mixed));
    tracing::trace!(
        drafting = committed.len(),
        mixed,
        zero_cost,
        "policies scored"
    );
}

/// Cuts newly committed tokens after the first stop id, and at the token budget.
fn cut_at_end(new: &mut Vec<u32>, eos: &[u32], remaining: usize) -> Option<FinishReason> {
    let mut finish = None;
    if let Some(i) = new.iter().position(|t| eos.contains(t)) {
        new.truncate(i + 1);
        finish = Some(FinishReason::Eos);
    }
    if new.len() >= remaining {
        new.truncate(remaining);
        finish = finish.or(Some(FinishReason::Length));
    }
    finish
}

/// Published-package "inspiration": after a rejection, the target's outputs over the
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

/// Lookahead decoding in the target model: the lookahead host's drafts are the target's
/// own greedy tokens, so they are committed as they come.
async fn lookahead_only<D: DraftBackend>(
    host: Option<&D>,
    prompt: &[u32],
    params: &DecodeParams,
    on_tokens: &mut TokenSink<'_>,
) -> Result<Generation> {
    let Some(host) = host else {
        return Err(DecodingError::invalid(
            "the lookahead strategy needs the target model's lookahead host",
        ));
    };
    let started = Instant::now();
    let mut stats = SpecStats::new(Strategy::Lookahead);
    let max_pos = host.info().max_position;
    let id = host.open(prompt).await?;
    let mut out = Vec::new();
    let mut sources = Vec::new();
    let mut new_committed = Vec::new();
    let result = loop {
        let remaining = params.max_new_tokens - out.len();
        if prompt.len() + out.len() >= max_pos {
            break Ok(FinishReason::ContextFull);
        }
        let request = DraftRequest {
            new_committed: std::mem::take(&mut new_committed),
            gamma: 1,
            lookahead: Some(params.lookahead),
            pool_delta: Vec::new(),
            eos: params.eos.clone(),
            stop_below: 0.0,
        };
        let t0 = Instant::now();
        let span = tracing::debug_span!("lookahead");
        let (o, timing) = match host.draft(id, request).instrument(span).await {
            Ok(r) => r,
            Err(e) => break Err(e),
        };
        stats.add_lookahead(&o, timing, t0.elapsed().as_secs_f64());
        let mut new = o.tokens;
        if new.is_empty() {
            break Ok(FinishReason::ContextFull);
        }
        let finish = cut_at_end(&mut new, &params.eos, remaining);
        // The host's first token is the model's own next token; the rest came through
        // its n-gram verification branch.
        let mut new_sources = vec![TokenSource::Pool; new.len()];
        if let Some(first) = new_sources.first_mut() {
            *first = TokenSource::Target;
        }
        out.extend_from_slice(&new);
        sources.extend_from_slice(&new_sources);
        new_committed.extend_from_slice(&new);
        if on_tokens(&new, &new_sources) == Flow::Stop {
            break Ok(FinishReason::Stop);
        }
        if let Some(f) = finish {
            break Ok(f);
        }
    };
    if let Err(e) = host.close(id).await {
        tracing::debug!("closing lookahead session: {e}");
    }
    stats.total_s = started.elapsed().as_secs_f64();
    stats.committed = out.len() as u64;
    Ok(Generation {
        tokens: out,
        sources,
        finish: result?,
        stats,
    })
}
