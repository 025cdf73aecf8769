//! The `auto` strategy's decisions. Two kinds of evidence drive them: what a verify of `n`
//! tree nodes and a draft call of `g` tokens cost on this hardware (a [`CostProfile`],
//! measured at start-up through the same backends requests use, network included), and
//! how often each kind of guess has been accepted so far (an [`AutoTuner`], shared by all
//! requests and updated after every round). Each round keeps the tree that maximises the
//! expected committed tokens per second; when no guess pays for its rows that is the root
//! alone, which is plain greedy decoding.
//!
//! Per-round estimates are noisy on a machine whose speed drifts, and they miss costs that
//! only show across rounds (a draft catching up after rounds without it). So the rounds
//! run under one of a few [`Policy`]s at a time, and which one is judged on what each
//! would have delivered on the same text: drafting rounds also score the trees the other
//! policies would have verified against the tokens the target committed
//! ([`PolicyScores`]), and the policy with the best rate runs the next segment, with a
//! drafting audit now and then so the scores stay current.

use crate::backend::{DraftBackend, DraftRequest, SessionId, TargetBackend};
use crate::error::{DecodingError, Result};
use crate::sampling::SamplingParams;
use crate::tree::DraftTree;
use std::sync::Mutex;
use std::time::Instant;

/// What one draft call costs: a fixed part plus one forward per drafted token, plus
/// feeding the draft the committed tokens it has not seen (its prefill, when it joins a
/// request late; on a CPU that is nearly a decode step per token).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DraftCost {
    pub per_call: f64,
    pub per_token: f64,
    pub catch_up: f64,
}

/// Seconds per verify by tree size, and per draft call by tokens, on this deployment.
#[derive(Debug, Clone, PartialEq)]
pub struct CostProfile {
    /// (tree nodes, seconds per verify call): nodes ascending from 1, costs non-decreasing.
    verify: Vec<(usize, f64)>,
    draft: Option<DraftCost>,
}

impl CostProfile {
    /// `verify` needs the one-node cost; timing noise is smoothed so that a bigger tree
    /// never looks cheaper than a smaller one.
    pub fn new(mut verify: Vec<(usize, f64)>, draft: Option<DraftCost>) -> Result<Self> {
        verify.sort_by_key(|v| v.0);
        verify.dedup_by_key(|v| v.0);
        if verify.first().map(|v| v.0) != Some(1) {
            return Err(DecodingError::invalid(
                "a cost profile needs the cost of a one-node verify",
            ));
        }
        if verify.iter().any(|v| !(v.1.is_finite() && v.1 > 0.0)) {
            return Err(DecodingError::invalid("verify costs must be positive"));
        }
        if let Some(d) = draft
            && !([d.per_call, d.per_token, d.catch_up]
                .iter()
                .all(|x| x.is_finite() && *x >= 0.0)
                && d.per_token > 0.0)
        {
            return Err(DecodingError::invalid(
                "draft costs must be finite and not negative, per token positive",
            ));
        }
        let mut most = 0.0f64;
        for v in &mut verify {
            most = most.max(v.1);
            v.1 = most;
        }
        Ok(Self { verify, draft })
    }

    pub fn verify_points(&self) -> &[(usize, f64)] {
        &self.verify
    }

    pub fn draft(&self) -> Option<DraftCost> {
        self.draft
    }

    /// Seconds for a verify of `nodes` nodes (root included): linear between measured
    /// sizes, extended with the last measured slope beyond them.
    pub fn verify_cost(&self, nodes: usize) -> f64 {
        let n = nodes.max(1);
        let v = &self.verify;
        match v.iter().position(|&(k, _)| k >= n) {
            Some(0) => v[0].1,
            Some(i) => between(v[i - 1], v[i], n),
            None if v.len() >= 2 => between(v[v.len() - 2], v[v.len() - 1], n),
            None => v[0].1 * n as f64,
        }
    }

    /// Seconds for a draft call producing `tokens` tokens, when there is a draft.
    pub fn draft_cost(&self, tokens: usize) -> Option<f64> {
        self.draft.map(|d| d.per_call + d.per_token * tokens as f64)
    }

    /// The draft length (1..=`most` tokens) that decodes fastest here when each drafted
    /// token is accepted with probability `acceptance`, independently of the others: a
    /// round drafts that many tokens with one draft forward each and verifies them in one
    /// target forward. Prefills aside, against greedy decoding's one-node verify per token.
    /// At `acceptance` 1 it is the ceiling of such drafting on this hardware: no chain
    /// commits more tokens per round than every drafted one plus the target's own.
    /// `None` without a draft.
    pub fn best_chain(&self, acceptance: f64, most: usize) -> Option<ChainEstimate> {
        let a = acceptance.clamp(0.0, 1.0);
        let step = self.verify_cost(1);
        (1..=most.max(1))
            .filter_map(|gamma| {
                let tokens: f64 = (0..=gamma).map(|i| a.powi(i as i32)).sum();
                let seconds = self.draft_cost(gamma)? + self.verify_cost(gamma + 1);
                Some(ChainEstimate {
                    gamma,
                    tokens,
                    speedup: tokens * step / seconds,
                })
            })
            .max_by(|x, y| x.speedup.total_cmp(&y.speedup))
    }

    /// One line for logs: verify milliseconds by size, and the draft's cost.
    pub fn describe(&self) -> String {
        let verify: Vec<String> = self
            .verify
            .iter()
            .map(|(n, s)| format!("{n}:{:.1}", s * 1e3))
            .collect();
        let draft = match self.draft {
            Some(d) => format!(
                "draft {:.1} ms per call + {:.1} ms per token, {:.1} ms per token caught up",
                d.per_call * 1e3,
                d.per_token * 1e3,
                d.catch_up * 1e3
            ),
            None => "no draft".to_string(),
        };
        format!("verify ms by nodes {}; {draft}", verify.join(" "))
    }
}

/// What drafting chains of one length would do on a [`CostProfile`]
/// ([`CostProfile::best_chain`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChainEstimate {
    /// Tokens drafted per round.
    pub gamma: usize,
    /// Expected tokens committed per round, the target's own included.
    pub tokens: f64,
    /// Decoding speed over greedy decoding's.
    pub speedup: f64,
}

fn between((k0, c0): (usize, f64), (k1, c1): (usize, f64), n: usize) -> f64 {
    c0 + (c1 - c0) * (n as f64 - k0 as f64) / (k1 - k0) as f64
}

/// What to time when profiling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileOptions {
    /// Verify tree sizes (nodes, root included); must include 1.
    pub verify_sizes: Vec<usize>,
    /// Draft tokens per call.
    pub draft_tokens: Vec<usize>,
    /// Timed rounds over all sizes (after one untimed warm-up round); medians are kept.
    pub reps: usize,
    /// Tokens of the synthetic prompt the sessions start from.
    pub prompt_len: usize,
}

impl Default for ProfileOptions {
    fn default() -> Self {
        Self {
            verify_sizes: vec![1, 2, 3, 4, 6, 8, 12, 16, 24, 32],
            draft_tokens: vec![1, 2, 4, 8],
            reps: 3,
            prompt_len: 64,
        }
    }
}

/// Deterministic filler tokens spread over the start of the vocabulary (every model has
/// those ids); the content does not matter for the timing.
fn filler(i: usize, vocab: usize) -> u32 {
    let span = vocab.clamp(1, 4096);
    ((i * 37 + 11) % span) as u32
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Times verifies and draft calls through the backends themselves, so a remote
/// deployment's profile includes its network and batching wait.
pub async fn measure<T: TargetBackend, D: DraftBackend>(
    target: &T,
    draft: Option<&D>,
    opts: &ProfileOptions,
) -> Result<CostProfile> {
    let ascending = opts.verify_sizes.windows(2).all(|w| w[0] < w[1]);
    if opts.reps == 0 || opts.prompt_len == 0 || opts.verify_sizes.first() != Some(&1) || !ascending
    {
        return Err(DecodingError::invalid(
            "profiling needs reps >= 1, a prompt, and verify sizes ascending from 1",
        ));
    }
    let info = target.info();
    let prompt: Vec<u32> = (0..opts.prompt_len)
        .map(|i| filler(i, info.vocab_size))
        .collect();
    // Every verify may add up to its tree size to the session.
    let rounds = opts.reps + 1;
    let growth: usize = (opts.verify_sizes.iter().sum::<usize>()
        + opts.draft_tokens.iter().sum::<usize>()
        + CATCH_UP_TOKENS)
        * rounds;
    if opts.prompt_len + growth + 1 > info.max_position {
        return Err(DecodingError::invalid(format!(
            "the target's context ({}) is too short to profile {} rounds of trees up to {} nodes",
            info.max_position,
            rounds,
            opts.verify_sizes.iter().max().copied().unwrap_or(1)
        )));
    }
    let id = target.open(&prompt).await?;
    let timed = time_verifies(target, id, &prompt, opts, info.vocab_size).await;
    if let Err(e) = target.close(id).await {
        tracing::debug!("closing the profiling session: {e}");
    }
    let verify = timed?;
    let draft_cost = match draft {
        Some(d) => Some(time_drafts(d, &prompt, opts).await?),
        None => None,
    };
    CostProfile::new(verify, draft_cost)
}

async fn time_verifies<T: TargetBackend>(
    target: &T,
    id: SessionId,
    prompt: &[u32],
    opts: &ProfileOptions,
    vocab: usize,
) -> Result<Vec<(usize, f64)>> {
    let greedy = SamplingParams::greedy();
    let mut last = *prompt.last().expect("the prompt is not empty");
    let mut samples = vec![Vec::new(); opts.verify_sizes.len()];
    let mut sizes = opts.verify_sizes.len();
    for rep in 0..=opts.reps {
        for (j, &n) in opts.verify_sizes.iter().enumerate().take(sizes) {
            let mut tree = DraftTree::new(last);
            let chain: Vec<u32> = (1..n).map(|i| filler(i + 7 * rep + j, vocab)).collect();
            tree.add_path(0, &chain);
            let t0 = Instant::now();
            let (v, _) = target.verify(id, &tree, &greedy).await?;
            let t = t0.elapsed().as_secs_f64();
            samples[j].push(t);
            last = v.bonus;
        }
        if rep == 0 {
            // The warm-up round pays one-time costs (weight repacking on the first
            // multi-row forward, allocations): not kept.
            samples.iter_mut().for_each(Vec::clear);
        } else if rep == 1 {
            // The first timed round shows which sizes are worth timing further: trees
            // that cost many steps are never chosen, whatever they cost exactly.
            let first: Vec<f64> = samples.iter().map(|s| s[0]).collect();
            sizes = sizes_worth_timing(&first);
        }
    }
    Ok(opts
        .verify_sizes
        .iter()
        .zip(samples)
        .take(sizes)
        .map(|(&n, s)| (n, median(s)))
        .collect())
}

/// One plain (no lookahead) draft call and its wall time.
async fn timed_draft<D: DraftBackend>(
    draft: &D,
    id: SessionId,
    new_committed: Vec<u32>,
    gamma: usize,
) -> Result<(Vec<u32>, f64)> {
    let request = DraftRequest {
        new_committed,
        gamma,
        lookahead: None,
        pool_delta: Vec::new(),
        eos: Vec::new(),
        stop_below: 0.0,
    };
    let t0 = Instant::now();
    let (o, _) = draft.draft(id, request).await?;
    Ok((o.tokens, t0.elapsed().as_secs_f64()))
}

async fn time_drafts<D: DraftBackend>(
    draft: &D,
    prompt: &[u32],
    opts: &ProfileOptions,
) -> Result<DraftCost> {
    let vocab = draft.info().vocab_size;
    let id = draft.open(prompt).await?;
    let timed = time_draft_session(draft, id, opts, vocab).await;
    if let Err(e) = draft.close(id).await {
        tracing::debug!("closing the profiling draft session: {e}");
    }
    timed
}

async fn time_draft_session<D: DraftBackend>(
    draft: &D,
    id: SessionId,
    opts: &ProfileOptions,
    vocab: usize,
) -> Result<DraftCost> {
    let mut points: Vec<(f64, f64)> = Vec::new();
    // Each call accepts everything drafted by the one before, as a fully accepted round.
    let mut accepted: Vec<u32> = Vec::new();
    for rep in 0..=opts.reps {
        for &g in &opts.draft_tokens {
            let (tokens, t) =
                timed_draft(draft, id, std::mem::take(&mut accepted), g.max(1)).await?;
            if rep > 0 && !tokens.is_empty() {
                points.push((tokens.len() as f64, t));
            }
            accepted = tokens;
        }
    }
    let mut cost = fit_draft_cost(&points).ok_or_else(|| {
        DecodingError::Backend("the draft produced no tokens while profiling".into())
    })?;
    // Catching up: a one-token call after committed tokens the draft has not seen.
    let mut per_token = Vec::new();
    for rep in 0..opts.reps {
        let mut unseen = std::mem::take(&mut accepted);
        unseen.extend((0..CATCH_UP_TOKENS).map(|i| filler(i + rep, vocab)));
        let n = unseen.len();
        let (tokens, t) = timed_draft(draft, id, unseen, 1).await?;
        per_token.push(((t - cost.per_call - cost.per_token) / n as f64).max(0.0));
        accepted = tokens;
    }
    if !per_token.is_empty() {
        cost.catch_up = median(per_token);
    }
    Ok(cost)
}

/// Trees whose first timed verify cost more than this many one-node verifies are not timed
/// further.
const WORTH_TIMING: f64 = 6.0;

/// How many of the sizes (ascending, the first one node) to keep timing, from one timed
/// verify of each: those before the first that cost over `WORTH_TIMING` one-node
/// verifies, and never fewer than two, so there is a slope to extend.
fn sizes_worth_timing(first: &[f64]) -> usize {
    let Some(&one) = first.first() else {
        return 0;
    };
    first
        .iter()
        .position(|&t| t > WORTH_TIMING * one)
        .unwrap_or(first.len())
        .max(2)
        .min(first.len())
}

/// Unseen tokens fed to the draft when timing its catch-up.
const CATCH_UP_TOKENS: usize = 16;

/// Least-squares line through (tokens, seconds), kept physical: a call never costs less
/// than nothing and every token costs something.
fn fit_draft_cost(points: &[(f64, f64)]) -> Option<DraftCost> {
    if points.is_empty() {
        return None;
    }
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    if slope <= 0.0 || my - slope * mx < 0.0 {
        return Some(DraftCost {
            per_call: 0.0,
            per_token: (my / mx).max(1e-9),
            catch_up: 0.0,
        });
    }
    Some(DraftCost {
        per_call: my - slope * mx,
        per_token: slope,
        catch_up: 0.0,
    })
}

/// How the rounds of a segment choose their trees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Each round compares a drafted tree with the zero-cost one and takes the better.
    Mixed,
    /// Every round drafts (gamma sized by the profile), and verifies the draft's chain.
    Drafting,
    /// No round drafts: zero-cost guesses only (plain greedy when none pays).
    ZeroCost,
}

impl Policy {
    pub const ALL: [Policy; 3] = [Policy::Mixed, Policy::Drafting, Policy::ZeroCost];

    /// Where this policy sits in [`Policy::ALL`] (and in per-policy arrays).
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Policy::Mixed => "mixed",
            Policy::Drafting => "drafting",
            Policy::ZeroCost => "zero-cost",
        }
    }
}

/// Committed tokens after which a policy's segment ends and is scored.
pub const SEGMENT_TOKENS: usize = 32;
/// Whatever the scores say, at least one segment in this many runs [`Policy::Drafting`]:
/// only its segments score the policies side by side, so the evidence stays fresh when
/// the workload changes.
const AUDIT_EVERY: usize = 4;
/// Past this many scored segments, the scores count half, so the choice follows the
/// workload.
const POLICY_MEMORY: f64 = 96.0;

/// What one stretch of text cost and brought under each policy, in [`Policy::ALL`]
/// order: the one that ran and the ones that would have run on the same text.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PolicyScores {
    pub tokens: [f64; 3],
    pub seconds: [f64; 3],
}

impl PolicyScores {
    pub fn add(&mut self, policy: Policy, tokens: usize, seconds: f64) {
        self.tokens[policy.index()] += tokens as f64;
        self.seconds[policy.index()] += seconds;
    }

    /// Tokens per second `policy` scored; `None` before it has any.
    pub fn rate(&self, policy: Policy) -> Option<f64> {
        let (t, s) = (self.tokens[policy.index()], self.seconds[policy.index()]);
        (t > 0.0 && s > 0.0).then(|| t / s)
    }

    fn is_sane(&self) -> bool {
        self.tokens
            .iter()
            .chain(&self.seconds)
            .all(|x| x.is_finite() && *x >= 0.0)
    }
}

/// What a verify of `tree` would have committed where the target committed `committed`
/// (its accepted tokens and its own after them), and the path it would have accepted.
/// Greedily decoded, the target's token after a matched path is the next committed one,
/// so this is exact as far as `committed` goes; a path matching all of it is counted at
/// that length, a lower bound. (Sampled, it is an estimate: the chance that a guess meets
/// the sampled token is the chance the target would have accepted it.)
pub fn would_commit(tree: &DraftTree, committed: &[u32]) -> (usize, Vec<usize>) {
    let path = tree.follow(committed);
    ((path.len() + 1).min(committed.len()), path)
}

/// The policies' scores over the segments that scored them all (decayed sums).
#[derive(Debug, Clone, Copy, Default)]
struct PolicyRecord {
    segments: f64,
    scores: PolicyScores,
    /// Segments chosen since the last [`Policy::Drafting`] one.
    since_audit: usize,
}

impl PolicyRecord {
    /// The best-scoring policy; ties go to [`Policy::Drafting`], whose score is measured
    /// rather than reconstructed. `None` before any segment scored them.
    fn best(&self) -> Option<Policy> {
        if self.segments <= 0.0 {
            return None;
        }
        let rate = |p| self.scores.rate(p).unwrap_or(0.0);
        let mut best = Policy::Drafting;
        for p in [Policy::Mixed, Policy::ZeroCost] {
            if rate(p) > rate(best) {
                best = p;
            }
        }
        Some(best)
    }
}

/// A kind of guess whose acceptance is counted on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guess {
    /// The draft model's token at this position of its chain (0 first).
    Draft(usize),
    /// A pool phrase's token at this depth below the root (0 first).
    Pool(usize),
    /// A trie continuation, by the share of the text's continuations it had and by how
    /// many continuations that share was counted on.
    Trie { share: u8, support: u8 },
}

const POSITIONS: usize = 16;
const SHARE_BUCKETS: usize = 5;
const SUPPORT_BUCKETS: usize = 4;
const BUCKETS: usize = 2 * POSITIONS + SHARE_BUCKETS * SUPPORT_BUCKETS;
/// Weight of the prior, in observations.
const PRIOR_WEIGHT: f64 = 4.0;
/// No guess is counted as a sure thing.
const MAX_ACCEPTANCE: f64 = 0.98;
/// Past this many observations a bucket halves its counts, so it follows the workload.
const MEMORY: f64 = 2000.0;
/// Drafting must promise this much more than the zero-cost tree: its estimate is the
/// less certain one, and a draft round that disappoints costs most.
const DRAFT_MARGIN: f64 = 1.05;
/// Until the draft's first position has been tried this often, drafting is judged as if
/// its tokens were accepted at least `OPTIMISTIC_DRAFT` of the time. Without that, a
/// prior below the draft's real acceptance keeps `auto` from ever drafting, and so from
/// ever learning better; with it, a draft that cannot pay even then is never tried, and
/// one that disappoints costs a few rounds per process (the counts are shared).
const EXPLORE_TRIES: f64 = 12.0;
const OPTIMISTIC_DRAFT: f64 = 0.9;
/// The highest confidence floor `auto` asks of a draft: above it nearly every round would
/// stop after one token, whatever the draft's confidence.
const MAX_DRAFT_STOP: f64 = 0.9;
/// Buckets of the draft's probability for its own token, in which acceptance is counted
/// to learn how far that probability can be trusted.
const CONFIDENCE_BUCKETS: usize = 10;
/// The exponents `a` tried in the fit `P(accepted | p) = p^a` (0.05 apart up to 2).
const CONFIDENCE_POWERS: usize = 40;
/// Rounds of a kind after which its realized rate is trusted as much as its predicted
/// one, and rounds after which old ones count half (so the factor follows the workload).
const REALITY_PRIOR: f64 = 8.0;
const REALITY_MEMORY: f64 = 400.0;
/// Per round of the other kind, what a kind's realized record keeps of its weight
/// (half after about 70 rounds).
const REALITY_FADE: f64 = 0.99;

/// What kind of round a prediction was made for: one with a draft call, or one that
/// verifies only zero-cost guesses (trie, pool; none at all is greedy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundKind {
    ZeroCost,
    Drafted,
}

/// A round's predicted tokens and seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    pub kind: RoundKind,
    pub tokens: f64,
    pub seconds: f64,
}

/// Predicted and realized totals of one kind of round. The model behind a prediction
/// misses things that the cost profile cannot see (longer contexts than the profile's,
/// catch-up after other kinds of rounds, picking the best of noisy estimates), and it
/// misses them differently for drafted and zero-cost rounds; the ratio of realized to
/// predicted rate corrects each kind's predictions before they are compared.
#[derive(Debug, Clone, Copy, Default)]
struct Realized {
    rounds: f64,
    predicted_tokens: f64,
    predicted_seconds: f64,
    tokens: f64,
    seconds: f64,
}

impl Realized {
    /// Realized over predicted tokens per second; 1 until rounds are seen, moving to the
    /// measured ratio as they accumulate (`REALITY_PRIOR` rounds at the prediction).
    fn factor(&self) -> f64 {
        if self.rounds == 0.0 || self.predicted_seconds <= 0.0 || self.predicted_tokens <= 0.0 {
            return 1.0;
        }
        let w = REALITY_PRIOR / self.rounds;
        let tokens = self.tokens + w * self.predicted_tokens;
        let seconds = self.seconds + w * self.predicted_seconds;
        let predicted = self.predicted_tokens / self.predicted_seconds;
        (tokens / seconds.max(1e-12) / predicted).clamp(0.25, 4.0)
    }

    /// Scales the record by `keep`: the prior's weight stays, so the factor moves
    /// towards 1.
    fn fade(&mut self, keep: f64) {
        self.rounds *= keep;
        self.predicted_tokens *= keep;
        self.predicted_seconds *= keep;
        self.tokens *= keep;
        self.seconds *= keep;
    }

    fn add(&mut self, p: Prediction, tokens: f64, seconds: f64) {
        self.rounds += 1.0;
        self.predicted_tokens += p.tokens;
        self.predicted_seconds += p.seconds;
        self.tokens += tokens;
        self.seconds += seconds;
        if self.rounds > REALITY_MEMORY {
            self.fade(0.5);
        }
    }
}

impl Guess {
    /// A trie node that `count` of `total` continuations took.
    pub fn trie(count: u64, total: u64) -> Self {
        let share = if total == 0 {
            0.0
        } else {
            count as f64 / total as f64
        };
        let share = ((share * SHARE_BUCKETS as f64) as usize).min(SHARE_BUCKETS - 1);
        let support = match total {
            0 | 1 => 0,
            2..=3 => 1,
            4..=9 => 2,
            _ => 3,
        };
        Guess::Trie {
            share: share as u8,
            support: support as u8,
        }
    }

    fn bucket(self) -> usize {
        match self {
            Guess::Draft(i) => i.min(POSITIONS - 1),
            Guess::Pool(d) => POSITIONS + d.min(POSITIONS - 1),
            Guess::Trie { share, support } => {
                2 * POSITIONS
                    + (share as usize).min(SHARE_BUCKETS - 1) * SUPPORT_BUCKETS
                    + (support as usize).min(SUPPORT_BUCKETS - 1)
            }
        }
    }

    /// Acceptance expected before any evidence: drafts of a same-family model agree
    /// often, pool phrases seldom, trie continuations about as often as the text went
    /// their way, less when that was seen once.
    fn prior(self) -> f64 {
        match self {
            Guess::Draft(_) => 0.75,
            Guess::Pool(_) => 0.3,
            Guess::Trie { share, support } => {
                let mid = (share as f64 + 0.5) / SHARE_BUCKETS as f64;
                let seen_once = if support == 0 { 0.8 } else { 1.0 };
                0.7 * mid * seen_once
            }
        }
    }
}

/// Accepted and offered counts per kind of guess (offers are counted only where the
/// guess's parent was accepted, so the ratio is the conditional acceptance).
#[derive(Debug, Clone)]
struct Calibration {
    hits: [f64; BUCKETS],
    tries: [f64; BUCKETS],
    /// Indexed by `RoundKind as usize`.
    realized: [Realized; 2],
    policies: PolicyRecord,
    /// Draft tokens accepted and tried, by the draft's probability for them.
    confident_hits: [f64; CONFIDENCE_BUCKETS],
    confident_tries: [f64; CONFIDENCE_BUCKETS],
}

impl Default for Calibration {
    fn default() -> Self {
        Self {
            hits: [0.0; BUCKETS],
            tries: [0.0; BUCKETS],
            realized: Default::default(),
            policies: PolicyRecord::default(),
            confident_hits: [0.0; CONFIDENCE_BUCKETS],
            confident_tries: [0.0; CONFIDENCE_BUCKETS],
        }
    }
}

impl Calibration {
    fn estimate(&self, g: Guess) -> f64 {
        let b = g.bucket();
        let p = (self.hits[b] + PRIOR_WEIGHT * g.prior()) / (self.tries[b] + PRIOR_WEIGHT);
        p.clamp(0.0, MAX_ACCEPTANCE)
    }

    /// How often the guess's bucket has been tried (decayed).
    fn tries(&self, g: Guess) -> f64 {
        self.tries[g.bucket()]
    }

    /// A node's chance given its parent's: the best of the guesses behind it (0: none).
    fn best(&self, guesses: &[Guess]) -> f64 {
        self.best_given(guesses, &[], 1.0)
    }

    /// [`Self::best`], where a draft token with a probability in `confidence` goes by
    /// that probability raised to `power` rather than by its position's record.
    fn best_given(&self, guesses: &[Guess], confidence: &[f32], power: f64) -> f64 {
        guesses
            .iter()
            .map(|&g| match g {
                Guess::Draft(j) if j < confidence.len() => (f64::from(confidence[j])
                    .clamp(0.0, 1.0))
                .powf(power)
                .min(MAX_ACCEPTANCE),
                g => self.estimate(g),
            })
            .fold(0.0, f64::max)
    }

    fn record_confidence(&mut self, p: f32, accepted: bool) {
        let b =
            ((p.clamp(0.0, 1.0) * CONFIDENCE_BUCKETS as f32) as usize).min(CONFIDENCE_BUCKETS - 1);
        count_try(
            &mut self.confident_hits[b],
            &mut self.confident_tries[b],
            accepted,
        );
    }

    /// The exponent `a` that best explains the acceptance seen per bucket as `p^a`
    /// (maximum likelihood over a grid, with `PRIOR_WEIGHT` tries per bucket at `a = 1`,
    /// taking the draft at its word until there is evidence). Below 1 the draft is
    /// under-confident: the target agrees with its choice more often than its
    /// probability says, which is usual where several tokens are likely and both models
    /// rank them alike.
    fn confidence_power(&self) -> f64 {
        let buckets: Vec<(f64, f64, f64)> = (0..CONFIDENCE_BUCKETS)
            .map(|b| {
                let p = (b as f64 + 0.5) / CONFIDENCE_BUCKETS as f64;
                let hits = self.confident_hits[b] + PRIOR_WEIGHT * p;
                let tries = self.confident_tries[b] + PRIOR_WEIGHT;
                (p.ln(), hits, tries - hits)
            })
            .collect();
        let likelihood = |a: f64| -> f64 {
            buckets
                .iter()
                .map(|&(ln_p, hits, misses)| {
                    let accept = (a * ln_p).exp().min(1.0 - 1e-9);
                    hits * a * ln_p + misses * (1.0 - accept).ln()
                })
                .sum()
        };
        (1..=CONFIDENCE_POWERS)
            .map(|i| i as f64 * 0.05)
            .map(|a| (likelihood(a), a))
            .fold((f64::NEG_INFINITY, 1.0), |best, x| {
                if x.0 > best.0 { x } else { best }
            })
            .1
    }

    fn record(&mut self, g: Guess, accepted: bool) {
        let b = g.bucket();
        count_try(&mut self.hits[b], &mut self.tries[b], accepted);
    }
}

/// Counts one try in a bucket; past `MEMORY` tries the bucket's counts halve, so it
/// follows the workload.
fn count_try(hits: &mut f64, tries: &mut f64, accepted: bool) {
    *tries += 1.0;
    if accepted {
        *hits += 1.0;
    }
    if *tries > MEMORY {
        *tries /= 2.0;
        *hits /= 2.0;
    }
}

/// The nodes a round verifies and what they are expected to bring.
#[derive(Debug, Clone, PartialEq)]
pub struct TreePlan {
    /// Per node of the candidate tree: verify it (the root always).
    pub keep: Vec<bool>,
    /// Expected committed tokens (accepted guesses plus the target's own token).
    pub expected_tokens: f64,
    /// Expected seconds of the verify.
    pub seconds: f64,
}

impl TreePlan {
    pub fn tokens_per_second(&self) -> f64 {
        self.expected_tokens / self.seconds.max(1e-12)
    }

    /// This plan as the prediction of a round of `kind`.
    pub fn prediction(&self, kind: RoundKind) -> Prediction {
        Prediction {
            kind,
            tokens: self.expected_tokens,
            seconds: self.seconds,
        }
    }

    pub fn nodes(&self) -> usize {
        self.keep.iter().filter(|&&k| k).count()
    }
}

/// Picks the nodes worth verifying. `accept[i]` is node `i`'s chance of being accepted
/// once its parent is; a node's chance of being on the accepted path is the product along
/// its path, and a node's expected yield never exceeds its parent's, so taking nodes best
/// first keeps the set a tree. The prefix of that order with the best expected tokens per
/// second wins. `trust` scales the rate of every tree with guesses in it against the
/// plain step, whose rate is exact: below 1 where such trees have delivered less than
/// predicted, so that they must promise more to be verified at all.
pub fn choose_nodes(
    parents: &[i32],
    accept: &[f64],
    verify_cost: impl Fn(usize) -> f64,
    trust: f64,
) -> TreePlan {
    let n = parents.len();
    let mut reach = vec![1.0f64; n];
    for i in 1..n {
        let p = parents[i].max(0) as usize;
        reach[i] = reach[p] * accept.get(i).copied().unwrap_or(0.0).clamp(0.0, 1.0);
    }
    let mut order: Vec<usize> = (1..n).collect();
    // Stable: equal yields keep index order, and parents precede their children.
    order.sort_by(|&a, &b| reach[b].total_cmp(&reach[a]));
    let mut best = (1.0 / verify_cost(1).max(1e-12), 0usize);
    let mut sum = 1.0;
    for (taken, &i) in order.iter().enumerate() {
        sum += reach[i];
        let rate = trust * sum / verify_cost(taken + 2).max(1e-12);
        if rate > best.0 {
            best = (rate, taken + 1);
        }
    }
    let mut keep = vec![false; n];
    if n > 0 {
        keep[0] = true;
    }
    let mut expected = 1.0;
    for &i in &order[..best.1] {
        keep[i] = true;
        expected += reach[i];
    }
    TreePlan {
        keep,
        expected_tokens: expected,
        seconds: verify_cost(best.1 + 1),
    }
}

/// What the draft would have to catch up on before drafting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DraftBacklog {
    /// Committed tokens an open draft session has not seen.
    pub pending: usize,
    /// The whole text, when the draft has no session in this request yet.
    pub unopened: usize,
    /// Tokens the request may still produce.
    pub remaining: usize,
}

/// The cost profile and the acceptance counts that every `auto` request shares.
#[derive(Debug)]
pub struct AutoTuner {
    profile: CostProfile,
    /// Greedy and sampled decoding accept differently; index 0 is greedy.
    calibration: [Mutex<Calibration>; 2],
}

impl AutoTuner {
    pub fn new(profile: CostProfile) -> Self {
        Self {
            profile,
            calibration: Default::default(),
        }
    }

    pub fn profile(&self) -> &CostProfile {
        &self.profile
    }

    fn calibration(&self, greedy: bool) -> std::sync::MutexGuard<'_, Calibration> {
        let m = &self.calibration[usize::from(!greedy)];
        // Counts stay usable after a panic elsewhere: they are only statistics.
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A node's chance of acceptance given its parent's: the best of the guesses that
    /// proposed it (0 for none).
    pub fn acceptance(&self, greedy: bool, guesses: &[Guess]) -> f64 {
        self.calibration(greedy).best(guesses)
    }

    /// Which nodes of a candidate tree to verify in a round of `kind`; `guesses[i]`
    /// proposed node `i`, and `confidence[j]` is the draft's probability for its `j`-th
    /// token where it gave one. A zero-cost tree is held to what such trees have
    /// delivered against their predictions, so that where they keep falling short the
    /// round is a plain greedy step instead of a slower one. (A drafted tree's draft is
    /// paid for by then; only its nodes are chosen.)
    pub fn plan(
        &self,
        greedy: bool,
        parents: &[i32],
        guesses: &[Vec<Guess>],
        confidence: &[f32],
        kind: RoundKind,
    ) -> TreePlan {
        let (accept, trust): (Vec<f64>, f64) = {
            // One lock for the whole tree, not one per node.
            let c = self.calibration(greedy);
            let trust = match kind {
                RoundKind::ZeroCost => c.realized[kind as usize].factor(),
                RoundKind::Drafted => 1.0,
            };
            // A draft token's own probability says more than its position: one the draft
            // was sure of is kept where an average token that deep would not be. (The
            // power's fit is only worth running where there are probabilities.)
            let power = match confidence.is_empty() {
                true => 1.0,
                false => c.confidence_power(),
            };
            let accept = guesses
                .iter()
                .map(|gs| c.best_given(gs, confidence, power))
                .collect();
            (accept, trust)
        };
        choose_nodes(parents, &accept, |n| self.profile.verify_cost(n), trust)
    }

    /// How many tokens to ask the draft model for, if drafting is expected to beat
    /// `without` (the zero-cost plan's prediction); `None` when it is not. Both sides are
    /// corrected by how their kind of round has fared against its predictions. The
    /// returned prediction is the drafted round's, uncorrected, for [`Self::observe`].
    pub fn draft_gamma(
        &self,
        greedy: bool,
        max_gamma: usize,
        without: &TreePlan,
        backlog: DraftBacklog,
    ) -> Option<(usize, Prediction)> {
        let (rate, g, p) = self.best_gamma(greedy, max_gamma, backlog)?;
        let c = self.calibration(greedy);
        let without = without.tokens_per_second()
            * c.realized[RoundKind::ZeroCost as usize].factor()
            / c.realized[RoundKind::Drafted as usize].factor();
        (rate > without * DRAFT_MARGIN).then_some((g, p))
    }

    /// How many tokens to draft in a round of [`Policy::Drafting`]: the best length,
    /// whatever the zero-cost guesses promise, as long as drafting is expected to beat a
    /// plain greedy step at all.
    pub fn drafting_gamma(
        &self,
        greedy: bool,
        max_gamma: usize,
        backlog: DraftBacklog,
    ) -> Option<(usize, Prediction)> {
        let plain = 1.0 / self.profile.verify_cost(1);
        self.best_gamma(greedy, max_gamma, backlog)
            .filter(|&(rate, _, _)| rate > plain)
            .map(|(_, g, p)| (g, p))
    }

    /// The draft length (1..=`max_gamma`) with the best expected rate, that rate, and the
    /// round's prediction (without the opening's share, see [`Self::observe`]); `None`
    /// without a draft.
    fn best_gamma(
        &self,
        greedy: bool,
        max_gamma: usize,
        backlog: DraftBacklog,
    ) -> Option<(f64, usize, Prediction)> {
        let cost = self.profile.draft?;
        let c = self.calibration(greedy);
        let floor = match c.tries(Guess::Draft(0)) < EXPLORE_TRIES {
            true => OPTIMISTIC_DRAFT,
            false => 0.0,
        };
        let mut reach = 1.0;
        let mut expected = 1.0;
        let mut best: Option<(f64, usize, Prediction)> = None;
        for g in 1..=max_gamma {
            reach *= c.estimate(Guess::Draft(g - 1)).max(floor);
            expected += reach;
            // Joining late means a prefill of the whole text, and coming back after
            // rounds without the draft a catch-up on what they committed: paid once,
            // whenever drafting resumes, so worth it only if the request has enough
            // tokens left to earn it back. This round carries its share. (Charged whole
            // to the round, a backlog would stop drafting for good once it was long.)
            let share = (expected / backlog.remaining.max(1) as f64).min(1.0);
            let round = self.profile.draft_cost(g)? + self.profile.verify_cost(g + 1);
            let catch_up = cost.catch_up * backlog.pending as f64;
            let backlog_share = cost.catch_up * (backlog.pending + backlog.unopened) as f64 * share;
            let rate = expected / (round + backlog_share).max(1e-12);
            if best.is_none_or(|(r, _, _)| rate > r) {
                // The round as the caller observes it: with the catch-up, which it pays
                // in this round's draft call, and without the opening, which it pays
                // apart.
                let p = Prediction {
                    kind: RoundKind::Drafted,
                    tokens: expected,
                    seconds: round + catch_up,
                };
                best = Some((rate, g, p));
            }
        }
        best
    }

    /// The floor for the draft's running confidence (the product of its tokens'
    /// probabilities) in a round predicted as `p` with up to `gamma` draft tokens: below
    /// it, the chance that the target accepts one more draft token, times what a token is
    /// worth (the round's predicted seconds per token), no longer pays for that token's
    /// draft forward and verify row. 0 without a draft.
    pub fn draft_stop(&self, greedy: bool, gamma: usize, p: &Prediction) -> f32 {
        let Some(cost) = self.profile.draft else {
            return 0.0;
        };
        if gamma == 0 || p.tokens <= 0.0 {
            return 0.0;
        }
        let row =
            (self.profile.verify_cost(gamma + 1) - self.profile.verify_cost(1)) / gamma as f64;
        let token_worth = p.seconds / p.tokens;
        let c = self.calibration(greedy);
        let next = c.estimate(Guess::Draft(0));
        // The floor on the chance of reaching the next token, which is the draft's
        // probabilities' product raised to the learnt power; the draft checks the
        // product itself, so the floor goes the other way.
        let reach = (cost.per_token + row) / (next * token_worth).max(1e-12);
        let floor = reach.clamp(0.0, 1.0).powf(1.0 / c.confidence_power());
        floor.clamp(0.0, MAX_DRAFT_STOP) as f32
    }

    /// Counts a drafted chain's outcome against the draft's probability for each token:
    /// the first `accepted` were accepted, the one after them (if any) was rejected.
    pub fn learn_confidence(&self, greedy: bool, confidence: &[f32], accepted: usize) {
        if confidence.is_empty() {
            return;
        }
        let mut c = self.calibration(greedy);
        for (i, &p) in confidence.iter().enumerate().take(accepted + 1) {
            c.record_confidence(p, i < accepted);
        }
    }

    /// The policy for a request's next segment: the one that scored best on the same
    /// text (see [`Self::record_scores`]), but [`Policy::Drafting`] before there are any
    /// scores and for one segment in `AUDIT_EVERY` (4), since only its segments score all
    /// three. Without a draft only zero-cost rounds are possible.
    pub fn choose_policy(&self, greedy: bool, can_draft: bool) -> Policy {
        if !can_draft || self.profile.draft.is_none() {
            return Policy::ZeroCost;
        }
        let mut c = self.calibration(greedy);
        let r = &mut c.policies;
        let policy = match r.best() {
            Some(p) if r.since_audit + 1 < AUDIT_EVERY => p,
            _ => Policy::Drafting,
        };
        r.since_audit = match policy {
            Policy::Drafting => 0,
            _ => r.since_audit + 1,
        };
        policy
    }

    /// Scores the policies on a segment of [`Policy::Drafting`]: what it cost and
    /// brought, and what the other policies' trees would have on the same positions.
    /// Comparing policies on the same text keeps a lucky stretch (a prompt's repeated
    /// lines, say) from crediting whichever policy happened to run on it.
    pub fn record_scores(&self, greedy: bool, scores: &PolicyScores) {
        let drafted = scores.tokens[Policy::Drafting.index()];
        if !scores.is_sane() || drafted <= 0.0 {
            return;
        }
        let mut c = self.calibration(greedy);
        let r = &mut c.policies;
        // A short segment (the end of a request) counts for its share of a full one.
        r.segments += (drafted / SEGMENT_TOKENS as f64).min(1.0);
        for i in 0..Policy::ALL.len() {
            r.scores.tokens[i] += scores.tokens[i];
            r.scores.seconds[i] += scores.seconds[i];
        }
        if r.segments > POLICY_MEMORY {
            r.segments /= 2.0;
            for x in r.scores.tokens.iter_mut().chain(&mut r.scores.seconds) {
                *x /= 2.0;
            }
        }
    }

    /// Committed tokens per second a policy scored so far.
    pub fn policy_rate(&self, greedy: bool, policy: Policy) -> Option<f64> {
        self.calibration(greedy).policies.scores.rate(policy)
    }

    /// Records how a round predicted as `p` turned out: `tokens` committed in `seconds`
    /// (the draft call, if any, and the verify, as the caller saw them; without opening a
    /// draft session). The other kind's record fades a little towards its prediction, so
    /// a kind that fared badly once is tried again some time later instead of never.
    pub fn observe(&self, greedy: bool, p: Prediction, tokens: usize, seconds: f64) {
        if !(seconds.is_finite() && seconds > 0.0 && p.seconds > 0.0) {
            return;
        }
        let mut c = self.calibration(greedy);
        // A round with nothing but the root is a plain greedy step whose prediction is
        // exact; counting it would only dilute what the rounds with guesses teach.
        // Such a step is a round of neither kind, and fades both records: where zero-cost
        // trees fell short enough to be planned away, they are tried again some time
        // later.
        if p.kind == RoundKind::ZeroCost && p.tokens <= 1.0 + 1e-9 {
            c.realized.iter_mut().for_each(|r| r.fade(REALITY_FADE));
            return;
        }
        c.realized[p.kind as usize].add(p, tokens as f64, seconds);
        let other = match p.kind {
            RoundKind::Drafted => RoundKind::ZeroCost,
            RoundKind::ZeroCost => RoundKind::Drafted,
        };
        c.realized[other as usize].fade(REALITY_FADE);
    }

    /// Realized over predicted rate of a kind of round so far (1 before any).
    pub fn reality(&self, greedy: bool, kind: RoundKind) -> f64 {
        self.calibration(greedy).realized[kind as usize].factor()
    }

    /// Counts the outcome of a verified tree: every node whose parent was accepted was
    /// a fair try of each guess that proposed it.
    pub fn learn(&self, greedy: bool, tree: &DraftTree, guesses: &[Vec<Guess>], path: &[usize]) {
        let mut on_path = vec![false; tree.len()];
        on_path[0] = true;
        for &n in path {
            if let Some(x) = on_path.get_mut(n) {
                *x = true;
            }
        }
        let mut c = self.calibration(greedy);
        for i in 1..tree.len() {
            if !on_path[tree.parents[i] as usize] {
                continue;
            }
            for &g in guesses.get(i).map(Vec::as_slice).unwrap_or(&[]) {
                c.record(g, on_path[i]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A draft that has seen every committed token, with `remaining` tokens to go.
    fn in_step(remaining: usize) -> DraftBacklog {
        DraftBacklog {
            pending: 0,
            unopened: 0,
            remaining,
        }
    }

    /// A zero-cost plan making `r` tokens per second.
    fn rate(r: f64) -> TreePlan {
        TreePlan {
            keep: vec![true],
            expected_tokens: r,
            seconds: 1.0,
        }
    }

    fn profile(points: &[(usize, f64)], draft: Option<(f64, f64)>) -> CostProfile {
        CostProfile::new(
            points.to_vec(),
            draft.map(|(per_call, per_token)| DraftCost {
                per_call,
                per_token,
                catch_up: 0.5,
            }),
        )
        .unwrap()
    }

    #[test]
    fn verify_cost_interpolates_and_never_falls() {
        let p = profile(&[(1, 1.0), (2, 1.1), (4, 0.9), (8, 2.0)], None);
        // the noisy dip at 4 is lifted to the cost at 2
        assert_eq!(p.verify_points()[2], (4, 1.1));
        assert!((p.verify_cost(3) - 1.1).abs() < 1e-9);
        assert!((p.verify_cost(6) - 1.55).abs() < 1e-9);
        // beyond the last point the last slope goes on
        assert!((p.verify_cost(16) - 3.8).abs() < 1e-9);
        assert_eq!(p.verify_cost(0), 1.0);
        assert!(CostProfile::new(vec![(2, 1.0)], None).is_err());
        assert!(CostProfile::new(vec![(1, 0.0)], None).is_err());
    }

    #[test]
    fn dear_sizes_are_not_timed_further() {
        assert_eq!(sizes_worth_timing(&[1.0, 1.1, 2.0, 5.9]), 4);
        assert_eq!(sizes_worth_timing(&[1.0, 1.1, 7.0, 5.0]), 2);
        // at least two sizes, so the cost can be extended beyond them
        assert_eq!(sizes_worth_timing(&[1.0, 9.0, 20.0]), 2);
        assert_eq!(sizes_worth_timing(&[1.0]), 1);
        assert_eq!(sizes_worth_timing(&[]), 0);
    }

    #[test]
    fn the_best_chain_weighs_drafted_tokens_against_their_cost() {
        // a verify row a tenth of a step, a draft token a fifth: with every token
        // accepted each one adds a step's worth for 0.3 of one, so the longest chain wins
        let p = profile(&[(1, 1.0), (2, 1.1)], Some((0.0, 0.2)));
        let c = p.best_chain(1.0, 8).unwrap();
        assert_eq!(c.gamma, 8);
        assert_eq!(c.tokens, 9.0);
        assert!((c.speedup - 9.0 / (1.6 + 1.8)).abs() < 1e-9);
        // at 60 % the tail does not repay its cost: a shorter chain, a smaller gain
        let c60 = p.best_chain(0.6, 8).unwrap();
        assert!(c60.gamma < 8 && c60.speedup < c.speedup, "{c60:?}");
        let g = c60.gamma;
        let tokens: f64 = (0..=g).map(|i| 0.6f64.powi(i as i32)).sum();
        assert!((c60.tokens - tokens).abs() < 1e-9);
        let rate_at = |gamma: usize| {
            let t: f64 = (0..=gamma).map(|i| 0.6f64.powi(i as i32)).sum();
            t / (0.2 * gamma as f64 + 1.0 + 0.1 * gamma as f64)
        };
        assert!((1..=8).all(|k| rate_at(k) <= c60.speedup + 1e-12));
        // a draft token that costs a whole step never pays, even always accepted
        let slow = profile(&[(1, 1.0), (2, 1.1)], Some((0.0, 1.0)));
        assert!(slow.best_chain(1.0, 8).unwrap().speedup < 1.0);
        assert!(profile(&[(1, 1.0)], None).best_chain(1.0, 8).is_none());
    }

    #[test]
    fn draft_cost_fit_recovers_a_line() {
        let pts: Vec<(f64, f64)> = [1.0, 2.0, 4.0, 8.0]
            .iter()
            .map(|&g| (g, 0.01 + 0.04 * g))
            .collect();
        let d = fit_draft_cost(&pts).unwrap();
        assert_eq!(d.catch_up, 0.0);
        assert!((d.per_call - 0.01).abs() < 1e-9 && (d.per_token - 0.04).abs() < 1e-9);
        // noise that would make the call cost negative is clamped to a per-token cost
        let d = fit_draft_cost(&[(1.0, 0.05), (2.0, 0.2)]).unwrap();
        assert_eq!(d.per_call, 0.0);
        assert!(fit_draft_cost(&[]).is_none());
    }

    #[test]
    fn cheap_rows_take_likely_guesses_and_expensive_rows_take_none() {
        // root, a chain of two likely tokens, a long shot beside them
        let parents = [-1, 0, 1, 0];
        let accept = [1.0, 0.9, 0.8, 0.05];
        // rows nearly free: everything that can add tokens goes in
        let plan = choose_nodes(&parents, &accept, |n| 1.0 + 0.001 * n as f64, 1.0);
        assert_eq!(plan.keep, vec![true, true, true, true]);
        assert!((plan.expected_tokens - (1.0 + 0.9 + 0.72 + 0.05)).abs() < 1e-9);
        // each row costs as much as a whole step: plain greedy wins
        let plan = choose_nodes(&parents, &accept, |n| n as f64, 1.0);
        assert_eq!(plan.keep, vec![true, false, false, false]);
        assert_eq!(plan.expected_tokens, 1.0);
        // rows at a third of a step: the likely chain pays, the long shot does not
        let plan = choose_nodes(&parents, &accept, |n| 1.0 + (n as f64 - 1.0) / 3.0, 1.0);
        assert_eq!(plan.keep, vec![true, true, true, false]);
        assert!(plan.tokens_per_second() > 1.0);
        // the same chain from guesses that have delivered half of what they promised
        let plan = choose_nodes(&parents, &accept, |n| 1.0 + (n as f64 - 1.0) / 3.0, 0.5);
        assert_eq!(plan.keep, vec![true, false, false, false]);
    }

    #[test]
    fn a_drafted_chain_is_kept_as_far_as_the_drafts_own_odds_pay() {
        // every row costs 0.3 of a step; a chain of six draft tokens
        let t = AutoTuner::new(profile(&[(1, 1.0), (16, 5.5)], Some((0.0, 0.1))));
        let parents = [-1, 0, 1, 2, 3, 4, 5];
        let guesses: Vec<Vec<Guess>> = std::iter::once(Vec::new())
            .chain((0..6).map(|i| vec![Guess::Draft(i)]))
            .collect();
        let kept = |confidence: &[f32]| {
            t.plan(true, &parents, &guesses, confidence, RoundKind::Drafted)
                .nodes()
        };
        // on the average odds at each depth (the prior's 0.75) the tail does not pay
        let by_depth = kept(&[]);
        assert!((2..=4).contains(&by_depth), "{by_depth}");
        // a draft sure of every token is verified whole...
        assert_eq!(kept(&[0.99; 6]), 7);
        // ...and one that lost confidence is cut where it did
        assert_eq!(kept(&[0.99, 0.99, 0.05, 0.99, 0.99, 0.99]), 3);
        // probabilities for the first tokens only: the rest go by their depth
        assert!(kept(&[0.99, 0.99]) >= by_depth);
    }

    #[test]
    fn kept_nodes_always_form_a_tree() {
        // a child more likely than its parent's siblings but behind its own parent
        let parents = [-1, 0, 0, 1, 3];
        let accept = [1.0, 0.6, 0.5, 0.99, 0.99];
        for step in [0.01, 0.1, 0.2, 0.4] {
            let plan = choose_nodes(&parents, &accept, |n| 1.0 + step * n as f64, 1.0);
            for (i, &p) in parents.iter().enumerate().skip(1) {
                if plan.keep[i] {
                    assert!(plan.keep[p as usize], "step {step}: {:?}", plan.keep);
                }
            }
        }
    }

    #[test]
    fn acceptance_follows_the_evidence() {
        let t = AutoTuner::new(profile(&[(1, 1.0)], None));
        let g = Guess::trie(1, 1);
        let before = t.acceptance(true, &[g]);
        let mut tree = DraftTree::new(0);
        tree.add_path(0, &[5]);
        let guesses = vec![vec![], vec![g]];
        for _ in 0..50 {
            t.learn(true, &tree, &guesses, &[1]);
        }
        let after = t.acceptance(true, &[g]);
        assert!(after > 0.9 && after > before, "{before} -> {after}");
        // sampled decoding keeps counts of its own
        assert_eq!(t.acceptance(false, &[g]), before);
        // a node whose parent was rejected says nothing about it
        let mut deep = DraftTree::new(0);
        deep.add_path(0, &[5, 6]);
        let p = Guess::Pool(1);
        let prior = t.acceptance(true, &[p]);
        t.learn(true, &deep, &[vec![], vec![], vec![p]], &[]);
        assert_eq!(t.acceptance(true, &[p]), prior);
        t.learn(true, &deep, &[vec![], vec![], vec![p]], &[1]);
        assert!(t.acceptance(true, &[p]) < prior);
    }

    #[test]
    fn drafting_only_when_it_pays() {
        // draft tokens cost a tenth of a verify: drafting beats greedy
        let cheap = AutoTuner::new(profile(&[(1, 1.0), (16, 1.3)], Some((0.0, 0.1))));
        let synced = in_step(100);
        let (g, _) = cheap
            .draft_gamma(true, 8, &rate(1.0), synced)
            .expect("drafting pays");
        assert!(g >= 2);
        // the zero-cost tree already promises more than any draft can
        assert_eq!(cheap.draft_gamma(true, 8, &rate(10.0), synced), None);
        // a long backlog to catch up on (half a step per token) eats the gain when few
        // tokens are left to earn it back, not when many are ...
        let behind = |remaining| DraftBacklog {
            pending: 10,
            unopened: 0,
            remaining,
        };
        assert_eq!(cheap.draft_gamma(true, 8, &rate(1.0), behind(5)), None);
        let (g, p) = cheap
            .draft_gamma(true, 8, &rate(1.0), behind(100_000))
            .expect("the catch-up is earned back");
        // ... and the round it runs in is predicted with the catch-up in it
        let round = cheap.profile.draft_cost(g).unwrap() + cheap.profile.verify_cost(g + 1);
        assert!((p.seconds - round - 10.0 * 0.5).abs() < 1e-9, "{p:?}");
        // ... and so does joining late with a long text and few tokens left, but not
        // with many tokens left to earn the prefill back
        let late = |remaining| DraftBacklog {
            pending: 0,
            unopened: 200,
            remaining,
        };
        assert_eq!(cheap.draft_gamma(true, 8, &rate(1.0), late(20)), None);
        assert!(
            cheap
                .draft_gamma(true, 8, &rate(1.0), late(100_000))
                .is_some()
        );
        // draft tokens cost as much as a verify: never
        let dear = AutoTuner::new(profile(&[(1, 1.0), (16, 1.3)], Some((0.0, 1.0))));
        assert_eq!(dear.draft_gamma(true, 8, &rate(1.0), synced), None);
        // no draft model at all
        let none = AutoTuner::new(profile(&[(1, 1.0)], None));
        assert_eq!(none.draft_gamma(true, 8, &rate(0.1), synced), None);
    }

    /// A draft whose prior looks too weak to pay is still tried until measured, then
    /// kept when it is accepted often and dropped when it is not.
    #[test]
    fn an_untried_draft_is_tried_then_judged_by_its_record() {
        // a draft token costs 0.7 of a one-node verify: at the 0.75 prior the best plan
        // (one token) makes 1.75 / 1.73 = 1.01 tokens a verify-time, short of the 1.05
        // margin over plain greedy (1.0); at 0.9 it makes 1.9 / 1.73 = 1.10
        let fresh = || AutoTuner::new(profile(&[(1, 1.0), (16, 1.5)], Some((0.0, 0.7))));
        let synced = in_step(1000);
        let chain = |n: usize| {
            let mut tree = DraftTree::new(0);
            tree.add_path(0, &vec![1; n]);
            tree
        };
        let guesses = |n: usize| -> Vec<Vec<Guess>> {
            std::iter::once(vec![])
                .chain((0..n).map(|i| vec![Guess::Draft(i)]))
                .collect()
        };
        for (accepted, keeps_drafting) in [(true, true), (false, false)] {
            let t = fresh();
            let (g, _) = t
                .draft_gamma(true, 4, &rate(1.0), synced)
                .expect("tried while untried");
            for _ in 0..EXPLORE_TRIES as usize {
                let path: Vec<usize> = if accepted { (1..=g).collect() } else { vec![] };
                t.learn(true, &chain(g), &guesses(g), &path);
            }
            assert_eq!(
                t.draft_gamma(true, 4, &rate(1.0), synced).is_some(),
                keeps_drafting,
                "accepted: {accepted}"
            );
        }
        // a draft that cannot pay even at the optimistic rate is not tried at all
        let dear = AutoTuner::new(profile(&[(1, 1.0), (16, 1.5)], Some((0.0, 1.0))));
        assert_eq!(dear.draft_gamma(true, 4, &rate(1.0), synced), None);
    }

    /// A kind of round that keeps falling short of its predictions loses to the other
    /// kind, whatever the model says.
    #[test]
    fn realized_rates_correct_the_predictions() {
        let cheap = || AutoTuner::new(profile(&[(1, 1.0), (16, 1.3)], Some((0.0, 0.1))));
        let synced = in_step(1000);
        // drafting is predicted to pay, then delivers a token per round at its cost
        let t = cheap();
        let (_, p) = t.draft_gamma(true, 8, &rate(1.0), synced).expect("pays");
        assert_eq!(p.kind, RoundKind::Drafted);
        for _ in 0..40 {
            t.observe(true, p, 1, p.seconds);
        }
        assert!(t.reality(true, RoundKind::Drafted) < 0.5);
        assert_eq!(t.draft_gamma(true, 8, &rate(1.0), synced), None);
        // sampled decoding keeps its own record
        assert!(t.draft_gamma(false, 8, &rate(1.0), synced).is_some());
        // the zero-cost plan is predicted to beat drafting, then makes a quarter of that
        let t = cheap();
        let zero = rate(4.0);
        assert_eq!(t.draft_gamma(true, 8, &zero, synced), None);
        for _ in 0..40 {
            t.observe(true, zero.prediction(RoundKind::ZeroCost), 1, 1.0);
        }
        assert!(t.draft_gamma(true, 8, &zero, synced).is_some());
        // rounds that do what was predicted change nothing
        let t = cheap();
        for _ in 0..40 {
            t.observe(true, zero.prediction(RoundKind::ZeroCost), 4, 1.0);
        }
        assert!((t.reality(true, RoundKind::ZeroCost) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn plain_greedy_steps_fade_the_zero_cost_record_slowly() {
        let t = AutoTuner::new(profile(&[(1, 1.0), (16, 1.3)], Some((0.0, 0.1))));
        let guessing = rate(3.0);
        for _ in 0..20 {
            t.observe(true, guessing.prediction(RoundKind::ZeroCost), 1, 1.0);
        }
        let after_guesses = t.reality(true, RoundKind::ZeroCost);
        assert!(after_guesses < 0.55, "{after_guesses}");
        // a likely trie guess (1.6x a plain step on paper) is not worth it at that record
        let parents = [-1, 0];
        let guesses = vec![vec![], vec![Guess::trie(9, 10)]];
        let nodes = |t: &AutoTuner| {
            t.plan(true, &parents, &guesses, &[], RoundKind::ZeroCost)
                .nodes()
        };
        assert_eq!(nodes(&t), 1);
        // (a drafted tree's nodes are chosen on their estimates alone: its draft is paid)
        assert_eq!(
            t.plan(true, &parents, &guesses, &[], RoundKind::Drafted)
                .nodes(),
            2
        );
        // a plain step's prediction is exact: counted as a round it would wash the
        // record out at once ...
        let plain = rate(1.0).prediction(RoundKind::ZeroCost);
        for _ in 0..20 {
            t.observe(true, plain, 1, 1.0);
        }
        let after_some = t.reality(true, RoundKind::ZeroCost);
        assert!(
            after_some > after_guesses && after_some < 0.6,
            "{after_some}"
        );
        // ... but where guesses were planned away for long, they are given another chance
        for _ in 0..180 {
            t.observe(true, plain, 1, 1.0);
        }
        let after_many = t.reality(true, RoundKind::ZeroCost);
        assert!(after_many > 0.8, "{after_many}");
        assert_eq!(nodes(&t), 2);
    }

    #[test]
    fn a_kind_that_disappointed_is_tried_again_later() {
        let t = AutoTuner::new(profile(&[(1, 1.0), (16, 1.3)], Some((0.0, 0.1))));
        let synced = in_step(1000);
        let zero = rate(1.0);
        let (_, p) = t.draft_gamma(true, 8, &zero, synced).expect("pays");
        // a few drafted rounds go badly (say, a slow spell), so zero-cost rounds run...
        for _ in 0..20 {
            t.observe(true, p, 1, p.seconds * 2.0);
        }
        assert_eq!(t.draft_gamma(true, 8, &zero, synced), None);
        let mut waited = 0;
        while t.draft_gamma(true, 8, &zero, synced).is_none() {
            t.observe(true, zero.prediction(RoundKind::ZeroCost), 1, 1.0);
            waited += 1;
            assert!(waited < 1000, "drafting was never tried again");
        }
        // ...but the bad spell fades, and drafting gets another chance
        assert!(waited > 10, "tried again after only {waited} rounds");
    }

    #[test]
    fn opening_a_draft_session_counts_in_the_decision_but_not_in_the_round() {
        let t = AutoTuner::new(profile(&[(1, 1.0), (16, 1.3)], Some((0.0, 0.1))));
        let zero = rate(1.0);
        let opened = in_step(40);
        let unopened = DraftBacklog {
            unopened: 4,
            ..opened
        };
        let (g, p) = t.draft_gamma(true, 8, &zero, unopened).expect("still pays");
        // the predicted round is the draft call and the verify, without the opening
        let round = t.profile().draft_cost(g).unwrap() + t.profile().verify_cost(g + 1);
        assert!((p.seconds - round).abs() < 1e-12, "{p:?} vs {round}");
        let long_prompt = DraftBacklog {
            unopened: 10_000,
            ..opened
        };
        assert_eq!(t.draft_gamma(true, 8, &zero, long_prompt), None);
    }

    /// Scores `segments` full segments at the given rates (tokens per second, in
    /// `Policy::ALL` order).
    fn score(t: &AutoTuner, segments: usize, rates: [f64; 3]) {
        for _ in 0..segments {
            let mut s = PolicyScores::default();
            for p in Policy::ALL {
                s.add(p, SEGMENT_TOKENS, SEGMENT_TOKENS as f64 / rates[p.index()]);
            }
            t.record_scores(true, &s);
        }
    }

    #[test]
    fn another_tree_is_scored_on_the_tokens_the_target_committed() {
        let mut t = DraftTree::new(5);
        t.add_path(0, &[1, 2, 3]);
        t.add_path(0, &[7]);
        // two guesses matched, then the target's own token
        assert_eq!(would_commit(&t, &[1, 2, 9, 4]), (3, vec![1, 2]));
        // nothing matched: the target's token alone
        assert_eq!(would_commit(&t, &[8, 1]), (1, vec![]));
        // matched all that is known: no more than that is counted
        assert_eq!(would_commit(&t, &[1, 2]), (2, vec![1, 2]));
        assert_eq!(would_commit(&t, &[7]), (1, vec![4]));
    }

    #[test]
    fn drafting_runs_until_the_scores_say_otherwise() {
        let t = AutoTuner::new(profile(&[(1, 1.0), (16, 1.3)], Some((0.0, 0.1))));
        // no scores yet: the policy that scores them all runs
        assert_eq!(t.choose_policy(true, true), Policy::Drafting);
        assert_eq!(t.choose_policy(true, true), Policy::Drafting);
        score(&t, 1, [10.0, 14.0, 12.0]);
        assert_eq!(t.choose_policy(true, true), Policy::Drafting);
        assert!((t.policy_rate(true, Policy::Drafting).unwrap() - 14.0).abs() < 1e-9);
        // a tie goes to the measured policy
        score(&t, 1, [14.0, 14.0, 14.0]);
        assert_eq!(t.choose_policy(true, true), Policy::Drafting);
        // sampled decoding keeps its own scores
        assert_eq!(t.policy_rate(false, Policy::Drafting), None);
        // no draft: zero-cost rounds are all there is
        assert_eq!(t.choose_policy(true, false), Policy::ZeroCost);
        let no_draft = AutoTuner::new(profile(&[(1, 1.0)], None));
        assert_eq!(no_draft.choose_policy(true, true), Policy::ZeroCost);
    }

    #[test]
    fn a_better_scoring_policy_runs_with_a_drafting_audit_now_and_then() {
        let t = AutoTuner::new(profile(&[(1, 1.0), (16, 1.3)], Some((0.0, 0.1))));
        score(&t, 4, [10.0, 8.0, 12.0]);
        let chosen: Vec<Policy> = (0..2 * AUDIT_EVERY)
            .map(|_| t.choose_policy(true, true))
            .collect();
        let audits = chosen.iter().filter(|&&p| p == Policy::Drafting).count();
        assert_eq!(audits, 2, "{chosen:?}");
        assert!(
            chosen
                .iter()
                .all(|&p| p == Policy::Drafting || p == Policy::ZeroCost),
            "{chosen:?}"
        );
        // audits that find drafting ahead on new text turn the choice back
        score(&t, 12, [10.0, 16.0, 9.0]);
        assert_eq!(t.choose_policy(true, true), Policy::Drafting);
        assert_eq!(t.choose_policy(true, true), Policy::Drafting);
    }

    #[test]
    fn policy_scores_follow_the_workload() {
        let t = AutoTuner::new(profile(&[(1, 1.0), (16, 1.3)], Some((0.0, 0.1))));
        score(&t, 200, [5.0, 10.0, 20.0]);
        // halved again and again, the scores keep their rates but not their weight
        let segments = t.calibration(true).policies.segments;
        assert!(segments <= POLICY_MEMORY, "{segments}");
        assert!((t.policy_rate(true, Policy::ZeroCost).unwrap() - 20.0).abs() < 1e-9);
        // a new workload overturns an old one within one memory's worth of segments
        score(&t, POLICY_MEMORY as usize, [5.0, 20.0, 10.0]);
        assert!(t.policy_rate(true, Policy::Drafting) > t.policy_rate(true, Policy::ZeroCost));
        // a short segment counts for its share; nonsense is ignored
        let before = t.calibration(true).policies;
        let mut short = PolicyScores::default();
        short.add(Policy::Drafting, SEGMENT_TOKENS / 4, 1.0);
        t.record_scores(true, &short);
        let after = t.calibration(true).policies;
        assert!((after.segments - before.segments - 0.25).abs() < 1e-9);
        for bad in [f64::NAN, -1.0, f64::INFINITY] {
            let mut s = PolicyScores::default();
            s.add(Policy::Drafting, 5, 1.0);
            s.add(Policy::ZeroCost, 5, bad);
            t.record_scores(true, &s);
        }
        let mut nothing_drafted = PolicyScores::default();
        nothing_drafted.add(Policy::ZeroCost, 5, 1.0);
        t.record_scores(true, &nothing_drafted);
        let last = t.calibration(true).policies;
        assert_eq!(last.segments, after.segments);
        assert_eq!(last.scores, after.scores);
    }

    #[test]
    fn the_drafting_policy_drafts_only_where_a_draft_can_beat_a_plain_step() {
        let zero = rate(100.0);
        let cheap = AutoTuner::new(profile(&[(1, 1.0), (16, 1.3)], Some((0.0, 0.1))));
        // zero-cost guesses promising far more do not stop it...
        assert_eq!(cheap.draft_gamma(true, 8, &zero, in_step(40)), None);
        let (g, p) = cheap.drafting_gamma(true, 8, in_step(40)).expect("drafts");
        assert!(g >= 1 && p.kind == RoundKind::Drafted);
        // ...but a draft token dearer than a whole step never drafts
        let dear = AutoTuner::new(profile(&[(1, 1.0), (16, 1.3)], Some((0.0, 2.0))));
        assert_eq!(dear.drafting_gamma(true, 8, in_step(40)), None);
    }

    #[test]
    fn the_confidence_floor_follows_what_a_draft_token_costs() {
        // a token worth 0.25 s: a draft token at 0.1 s plus a 0.02 s row, judged
        // against the first position's prior acceptance (0.75)
        let p = Prediction {
            kind: RoundKind::Drafted,
            tokens: 4.0,
            seconds: 1.0,
        };
        let t = AutoTuner::new(profile(&[(1, 1.0), (9, 1.16)], Some((0.0, 0.1))));
        let floor = t.draft_stop(true, 8, &p);
        assert!((floor - 0.12 / (0.75 * 0.25)).abs() < 1e-4, "{floor}");
        // a cheaper draft drafts on at lower confidence
        let cheap = AutoTuner::new(profile(&[(1, 1.0), (9, 1.16)], Some((0.0, 0.01))));
        assert!(cheap.draft_stop(true, 8, &p) < floor);
        // a dear one is capped, so a confident draft still gets past its first token
        let dear = AutoTuner::new(profile(&[(1, 1.0), (9, 1.16)], Some((0.0, 5.0))));
        assert_eq!(dear.draft_stop(true, 8, &p), MAX_DRAFT_STOP as f32);
        // once the draft is seen to be accepted more, the floor drops
        let tree = DraftTree::new(0);
        let mut learnt = AutoTuner::new(profile(&[(1, 1.0), (9, 1.16)], Some((0.0, 0.1))));
        for _ in 0..50 {
            let mut tr = tree.clone();
            tr.add_path(0, &[1]);
            learnt.learn(true, &tr, &[vec![], vec![Guess::Draft(0)]], &[1]);
        }
        assert!(learnt.draft_stop(true, 8, &p) < floor);
        learnt = AutoTuner::new(profile(&[(1, 1.0)], None));
        assert_eq!(learnt.draft_stop(true, 8, &p), 0.0);
    }

    #[test]
    fn the_floor_trusts_the_draft_as_far_as_its_record_shows() {
        let p = Prediction {
            kind: RoundKind::Drafted,
            tokens: 4.0,
            seconds: 1.0,
        };
        let cost = || AutoTuner::new(profile(&[(1, 1.0), (9, 1.16)], Some((0.0, 0.1))));
        let fresh = cost();
        assert_eq!(fresh.calibration(true).confidence_power(), 1.0);
        let floor = fresh.draft_stop(true, 8, &p);
        // tokens drafted at probability 0.45 that the target takes 4 times in 5: the
        // draft is under-confident (0.45^a = 0.8 at a = 0.28), so drafting goes on
        // further below the same floor on the real chance
        let under = cost();
        for _ in 0..200 {
            under.learn_confidence(true, &[0.45; 6], 4);
        }
        let a = under.calibration(true).confidence_power();
        assert!((0.2..=0.35).contains(&a), "{a}");
        let trusted = under.draft_stop(true, 8, &p);
        assert!(trusted < floor, "{trusted} vs {floor}");
        let want = (0.12f64 / (0.75 * 0.25)).powf(1.0 / a) as f32;
        assert!((trusted - want).abs() < 1e-4, "{trusted} vs {want}");
        // only the tokens up to the first rejection were tried: the rest count nowhere
        let tries: f64 = under.calibration(true).confident_tries.iter().sum();
        assert_eq!(tries, 200.0 * 5.0);
        // an over-confident draft (0.95, taken half the time) is cut short
        let over = cost();
        for _ in 0..200 {
            over.learn_confidence(true, &[0.95, 0.95], 1);
        }
        assert!(over.calibration(true).confidence_power() > 1.5);
        assert!(over.draft_stop(true, 8, &p) > floor);
        // a chain without probabilities (a lookahead draft) teaches nothing
        over.learn_confidence(true, &[], 0);
    }
}
