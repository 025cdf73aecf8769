//! How often each kind of guess is accepted (draft position, pool depth, trie share),
//! how far the draft's own confidence can be trusted, and how realized rates compare with
//! predictions; with the tuning constants behind them.

use super::config::AutoConfig;
use super::policy::*;
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
    /// A copy guess's token ([`crate::copy`]), by how long the match behind it was.
    Copy { class: u8 },
    /// A pool phrase's token at this depth below the draft chain's tip (0 first): the
    /// phrases keyed by the last drafted token, as Ouroboros hangs them.
    Suffix(usize),
}

pub(super) const POSITIONS: usize = 16;
pub(super) const SHARE_BUCKETS: usize = 5;
pub(super) const SUPPORT_BUCKETS: usize = 4;
/// Classes of copy matches: 4-7 tokens, 8-15, 16-31, 32 (the cap).
pub(super) const COPY_CLASSES: usize = 4;
pub(super) const BUCKETS: usize = 3 * POSITIONS + SHARE_BUCKETS * SUPPORT_BUCKETS + COPY_CLASSES;
/// Buckets of the draft's probability for its own token, in which acceptance is counted
/// to learn how far that probability can be trusted.
pub(super) const CONFIDENCE_BUCKETS: usize = 10;
/// The exponents `a` tried in the fit `P(accepted | p) = p^a` (0.05 apart up to 2).
pub(super) const CONFIDENCE_POWERS: usize = 40;
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
    /// As the session waits for the round (what its wall time is checked against).
    pub seconds: f64,
    /// What the round costs the server under the load it was planned for
    /// ([`super::Pricing`]); `seconds` when alone.
    pub cost: f64,
}

/// Predicted and realized totals of one kind of round. The model behind a prediction
/// misses things that the cost profile cannot see (longer contexts than the profile's,
/// catch-up after other kinds of rounds, picking the best of noisy estimates), and it
/// misses them differently for drafted and zero-cost rounds; the ratio of realized to
/// predicted rate corrects each kind's predictions before they are compared.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Realized {
    pub(super) rounds: f64,
    pub(super) predicted_tokens: f64,
    pub(super) predicted_seconds: f64,
    pub(super) tokens: f64,
    pub(super) seconds: f64,
}

impl Realized {
    /// Realized over predicted tokens per second; 1 until rounds are seen, moving to the
    /// measured ratio as they accumulate (`reality_prior` rounds at the prediction).
    pub(super) fn factor(&self, cfg: &AutoConfig) -> f64 {
        self.factor_with(cfg.reality_prior)
    }

    /// [`Self::factor`] with a prior of `prior` rounds at the prediction.
    pub(super) fn factor_with(&self, prior: f64) -> f64 {
        if self.rounds == 0.0 || self.predicted_seconds <= 0.0 || self.predicted_tokens <= 0.0 {
            return 1.0;
        }
        let w = prior / self.rounds;
        let tokens = self.tokens + w * self.predicted_tokens;
        let seconds = self.seconds + w * self.predicted_seconds;
        let predicted = self.predicted_tokens / self.predicted_seconds;
        (tokens / seconds.max(1e-12) / predicted).clamp(0.25, 4.0)
    }

    /// Scales the record by `keep`: the prior's weight stays, so the factor moves
    /// towards 1.
    pub(super) fn fade(&mut self, keep: f64) {
        self.rounds *= keep;
        self.predicted_tokens *= keep;
        self.predicted_seconds *= keep;
        self.tokens *= keep;
        self.seconds *= keep;
    }

    pub(super) fn add(&mut self, p: Prediction, tokens: f64, seconds: f64, cfg: &AutoConfig) {
        self.rounds += 1.0;
        self.predicted_tokens += p.tokens;
        self.predicted_seconds += p.seconds;
        self.tokens += tokens;
        self.seconds += seconds;
        if self.rounds > cfg.reality_memory {
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

    /// A copied token whose guess matched `matched` tokens of the text.
    pub fn copy(matched: usize) -> Self {
        let class = match matched {
            0..=7 => 0,
            8..=15 => 1,
            16..=31 => 2,
            _ => 3,
        };
        Guess::Copy { class }
    }

    pub(super) fn bucket(self) -> usize {
        match self {
            Guess::Draft(i) => i.min(POSITIONS - 1),
            Guess::Pool(d) => POSITIONS + d.min(POSITIONS - 1),
            Guess::Trie { share, support } => {
                2 * POSITIONS
                    + (share as usize).min(SHARE_BUCKETS - 1) * SUPPORT_BUCKETS
                    + (support as usize).min(SUPPORT_BUCKETS - 1)
            }
            Guess::Copy { class } => {
                2 * POSITIONS
                    + SHARE_BUCKETS * SUPPORT_BUCKETS
                    + (class as usize).min(COPY_CLASSES - 1)
            }
            Guess::Suffix(d) => {
                2 * POSITIONS
                    + SHARE_BUCKETS * SUPPORT_BUCKETS
                    + COPY_CLASSES
                    + d.min(POSITIONS - 1)
            }
        }
    }

    /// Acceptance expected before any evidence: drafts of a same-family model agree
    /// often, pool phrases seldom, trie continuations about as often as the text went
    /// their way, less when that was seen once; copied tokens the more often the longer
    /// the match behind them.
    pub(super) fn prior(self) -> f64 {
        match self {
            Guess::Draft(_) => 0.75,
            Guess::Pool(_) | Guess::Suffix(_) => 0.3,
            Guess::Trie { share, support } => {
                let mid = (share as f64 + 0.5) / SHARE_BUCKETS as f64;
                let seen_once = if support == 0 { 0.8 } else { 1.0 };
                0.7 * mid * seen_once
            }
            Guess::Copy { class } => [0.5, 0.65, 0.8, 0.9][(class as usize).min(COPY_CLASSES - 1)],
        }
    }
}

/// Accepted and offered counts per kind of guess (offers are counted only where the
/// guess's parent was accepted, so the ratio is the conditional acceptance).
#[derive(Debug, Clone)]
pub(super) struct Calibration {
    pub(super) hits: [f64; BUCKETS],
    pub(super) tries: [f64; BUCKETS],
    /// Indexed by `RoundKind as usize`. Their predictions are recorded at the speed the
    /// plain steps show (`plain`), so each factor says how a kind of round fares against
    /// a plain step now, not against the profile's start-up timing.
    pub(super) realized: [Realized; 2],
    /// Plain greedy steps: their tokens are certain, so their factor is how much faster
    /// (above 1) or slower the target runs than the profile says.
    pub(super) plain: Realized,
    pub(super) policies: PolicyRecord,
    /// Draft tokens accepted and tried, by the draft's probability for them.
    pub(super) confident_hits: [f64; CONFIDENCE_BUCKETS],
    pub(super) confident_tries: [f64; CONFIDENCE_BUCKETS],
    /// What lookahead draft calls yielded.
    pub(super) lookahead: LookaheadYield,
    pub(super) config: AutoConfig,
}

/// Lookahead draft calls so far (decayed sums): tokens drafted, forwards spent, and the
/// rows those forwards ran beyond one each.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct LookaheadYield {
    pub(super) calls: f64,
    pub(super) tokens: f64,
    pub(super) forwards: f64,
    pub(super) extra_rows: f64,
}

impl LookaheadYield {
    pub(super) fn add(&mut self, tokens: usize, forwards: usize, extra_rows: usize, memory: f64) {
        self.calls += 1.0;
        self.tokens += tokens as f64;
        self.forwards += forwards as f64;
        self.extra_rows += extra_rows as f64;
        if self.calls > memory {
            for x in [
                &mut self.calls,
                &mut self.tokens,
                &mut self.forwards,
                &mut self.extra_rows,
            ] {
                *x /= 2.0;
            }
        }
    }
}

impl Calibration {
    pub(super) fn new(config: AutoConfig) -> Self {
        Self {
            config,
            hits: [0.0; BUCKETS],
            tries: [0.0; BUCKETS],
            realized: Default::default(),
            plain: Realized::default(),
            policies: PolicyRecord::default(),
            confident_hits: [0.0; CONFIDENCE_BUCKETS],
            confident_tries: [0.0; CONFIDENCE_BUCKETS],
            lookahead: LookaheadYield::default(),
        }
    }
}

impl Calibration {
    pub(super) fn estimate(&self, g: Guess) -> f64 {
        let b = g.bucket();
        let w = self.config.prior_weight;
        let p = (self.hits[b] + w * g.prior()) / (self.tries[b] + w);
        p.clamp(0.0, self.config.max_acceptance)
    }

    /// How often the guess's bucket has been tried (decayed).
    pub(super) fn tries(&self, g: Guess) -> f64 {
        self.tries[g.bucket()]
    }

    /// A node's chance given its parent's: the best of the guesses behind it (0: none).
    pub(super) fn best(&self, guesses: &[Guess]) -> f64 {
        self.best_given(guesses, &[], 1.0)
    }

    /// [`Self::best`], where a draft token with a probability in `confidence` goes by
    /// that probability raised to `power` rather than by its position's record.
    pub(super) fn best_given(&self, guesses: &[Guess], confidence: &[f32], power: f64) -> f64 {
        guesses
            .iter()
            .map(|&g| match g {
                Guess::Draft(j) if j < confidence.len() => (f64::from(confidence[j])
                    .clamp(0.0, 1.0))
                .powf(power)
                .min(self.config.max_acceptance),
                g => self.estimate(g),
            })
            .fold(0.0, f64::max)
    }

    pub(super) fn record_confidence(&mut self, p: f32, accepted: bool) {
        let b =
            ((p.clamp(0.0, 1.0) * CONFIDENCE_BUCKETS as f32) as usize).min(CONFIDENCE_BUCKETS - 1);
        count_try(
            &mut self.confident_hits[b],
            &mut self.confident_tries[b],
            accepted,
            self.config.memory,
        );
    }

    /// The exponent `a` that best explains the acceptance seen per bucket as `p^a`
    /// (maximum likelihood over a grid, with `prior_weight` tries per bucket at `a = 1`,
    /// taking the draft at its word until there is evidence). Below 1 the draft is
    /// under-confident: the target agrees with its choice more often than its
    /// probability says, which is usual where several tokens are likely and both models
    /// rank them alike.
    pub(super) fn confidence_power(&self) -> f64 {
        let buckets: Vec<(f64, f64, f64)> = (0..CONFIDENCE_BUCKETS)
            .map(|b| {
                let p = (b as f64 + 0.5) / CONFIDENCE_BUCKETS as f64;
                let hits = self.confident_hits[b] + self.config.prior_weight * p;
                let tries = self.confident_tries[b] + self.config.prior_weight;
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

    pub(super) fn record(&mut self, g: Guess, accepted: bool) {
        let b = g.bucket();
        count_try(
            &mut self.hits[b],
            &mut self.tries[b],
            accepted,
            self.config.memory,
        );
    }
}

/// Counts one try in a bucket; past `memory` tries the bucket's counts halve, so it
/// follows the workload.
pub(super) fn count_try(hits: &mut f64, tries: &mut f64, accepted: bool, memory: f64) {
    *tries += 1.0;
    if accepted {
        *hits += 1.0;
    }
    if *tries > memory {
        *tries /= 2.0;
        *hits /= 2.0;
    }
}
