//! What verifies and draft calls cost on this hardware: the [`CostProfile`], measured at
//! start-up through the same backends requests use (network included), and what a draft
//! chain can gain on it.

use crate::backend::{DraftBackend, DraftLength, DraftRequest, SessionId, TargetBackend};
use crate::error::{DecodingError, Result};
use crate::sampling::SamplingParams;
use crate::tree::DraftTree;
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
    pub(super) verify: Vec<(usize, f64)>,
    pub(super) draft: Option<DraftCost>,
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

    /// Seconds for a draft call producing `tokens` tokens, when there is a draft (a
    /// fraction where each token costs less than a plain draft step: lookahead).
    pub fn draft_cost(&self, tokens: f64) -> Option<f64> {
        self.draft.map(|d| d.per_call + d.per_token * tokens)
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
                let seconds = self.draft_cost(gamma as f64)? + self.verify_cost(gamma + 1);
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

pub(super) fn between((k0, c0): (usize, f64), (k1, c1): (usize, f64), n: usize) -> f64 {
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
    /// Told after each timed call (verify calls, then draft calls).
    pub progress: engine::progress::ProgressHook,
}

impl Default for ProfileOptions {
    fn default() -> Self {
        Self {
            verify_sizes: vec![1, 2, 3, 4, 6, 8, 12, 16, 24, 32],
            draft_tokens: vec![1, 2, 4, 8],
            reps: 3,
            prompt_len: 64,
            progress: Default::default(),
        }
    }
}

/// Deterministic filler tokens spread over the start of the vocabulary (every model has
/// those ids); the content does not matter for the timing.
pub fn filler(i: usize, vocab: usize) -> u32 {
    let span = vocab.clamp(1, 4096);
    ((i * 37 + 11) % span) as u32
}

pub(super) fn median(mut xs: Vec<f64>) -> f64 {
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
    // Trees larger than the target takes are never built, so not timed either.
    let limit = target.max_tree_nodes().unwrap_or(usize::MAX);
    let opts = &ProfileOptions {
        verify_sizes: opts
            .verify_sizes
            .iter()
            .copied()
            .filter(|&n| n <= limit)
            .collect(),
        ..opts.clone()
    };
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
    // Sizes not worth timing were skipped: what is left is the draft's part.
    let steps = opts.verify_sizes.len() * (opts.reps + 1) + opts.draft_tokens.len();
    opts.progress.report(steps - opts.draft_tokens.len(), steps);
    let draft_cost = match draft {
        Some(d) => Some(time_drafts(d, &prompt, opts).await?),
        None => None,
    };
    opts.progress.report(steps, steps);
    CostProfile::new(verify, draft_cost)
}

pub(super) async fn time_verifies<T: TargetBackend>(
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
    let mut done = 0;
    for rep in 0..=opts.reps {
        for (j, &n) in opts.verify_sizes.iter().enumerate().take(sizes) {
            // Steps still to come at the current size count, drafts after them.
            let total = done + sizes * (opts.reps + 1 - rep) - j + opts.draft_tokens.len();
            opts.progress.report(done, total);
            done += 1;
            let mut tree = DraftTree::new(last);
            let chain: Vec<u32> = (1..n).map(|i| filler(i + 7 * rep + j, vocab)).collect();
            tree.add_path(0, &chain);
            let t0 = Instant::now();
            let (v, _) = target.verify(id, &tree, &greedy, None).await?;
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
pub(super) async fn timed_draft<D: DraftBackend>(
    draft: &D,
    id: SessionId,
    new_committed: Vec<u32>,
    gamma: usize,
) -> Result<(Vec<u32>, f64)> {
    let request = DraftRequest {
        new_committed,
        start: None,
        length: DraftLength::AtLeast(gamma),
        lookahead: None,
        pool_delta: Vec::new(),
        eos: Vec::new(),
    };
    let t0 = Instant::now();
    let (o, _) = draft.draft(id, request).await?;
    Ok((o.tokens, t0.elapsed().as_secs_f64()))
}

pub(super) async fn time_drafts<D: DraftBackend>(
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

pub(super) async fn time_draft_session<D: DraftBackend>(
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
pub(super) const WORTH_TIMING: f64 = 6.0;

/// How many of the sizes (ascending, the first one node) to keep timing, from one timed
/// verify of each: those before the first that cost over `WORTH_TIMING` one-node
/// verifies, and never fewer than two, so there is a slope to extend.
pub(super) fn sizes_worth_timing(first: &[f64]) -> usize {
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
pub(super) const CATCH_UP_TOKENS: usize = 16;

/// Least-squares line through (tokens, seconds), kept physical: a call never costs less
/// than nothing and every token costs something.
pub(super) fn fit_draft_cost(points: &[(f64, f64)]) -> Option<DraftCost> {
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

/// What `auto` learns its rounds' seconds from instead of the wall clock: the prices of the
/// model calls they made, where a cost table stands in for other hardware
/// (`ouro-bench --cost-model`). Without one, a run on this CPU planning with a GPU's
/// table would hold every round against seconds of a machine it does not plan for, and
/// its corrections would pull it back towards this CPU's choices.
pub trait CallClock: Send + Sync + std::fmt::Debug {
    /// Seconds of `calls`, one round's (or one call); `context` is the text's length
    /// where a call carries none of its own.
    fn seconds(&self, calls: &[crate::stats::ModelCall], context: usize) -> f64;
}
