//! What the target is busy with now, and the costs a round is priced at under it.
//!
//! The [`CostProfile`] says what a forward of `n` rows costs one session alone. Under
//! load the target's scheduler puts many sessions' trees into one forward, and then a
//! session's extra rows are no longer its own business: they make the shared forward
//! dearer for every session in it. The rule, stated once:
//!
//! > With `B` trees per forward, `R` rows of other trees beside this session's, and
//! > each tree committing `t` tokens a forward, a round of `n` nodes takes `c(R + n)`,
//! > as the session waits for it; what it costs the server is one plain step, `c(1)`,
//! > plus its rows beyond the first scaled by `(1 + (B - 1) · t) · c(1) / c(R + 1)`:
//! > the other sessions' `(B - 1) · t` tokens of a forward of `c(R + 1)` are delayed by
//! > what the extra rows add to it. Draft calls are scaled by the same factor (on shared
//! > cores they take the time of the target's forwards, over the network the draft
//! > service is shared as well).
//!
//! Alone (`B` = 1, `R` = 0) both prices are the profile's own. Decisions (which nodes to
//! verify, whether and how far to draft) maximise tokens per priced second, which is the
//! server's throughput, since extra tokens per forward are weighed against the forward's
//! growth in all `B` sessions' time. Predictions that are checked against the round's
//! wall time use the waiting time. The load comes back with every verify (the trees and
//! rows of the forward that served it, and the sessions open at the target) and is kept
//! as a time-weighted average; `t` is what this session's verifies commit, as the other
//! trees' own are not reported (other `auto` sessions commit alike; a plain session's 1
//! makes the estimate err towards smaller trees under load). Without `t`, a forward
//! full of trees that each commit two tokens was priced as if they committed one, and
//! every session widened its tree where all of them together lost throughput. `B` is the larger of the trees in the forward and the
//! sessions open, and every other open session is counted for at least one row: a
//! session that is drafting, or still prefilling, is absent from this forward but shares
//! the next ones.

use super::profile::CostProfile;
use crate::backend::ServerTiming;
use std::time::Instant;

/// Seconds over which an older load observation loses weight by a factor e: long
/// enough to smooth one forward's batch against the next, short enough that a burst's
/// end shows within a few rounds.
pub const LOAD_MEMORY_S: f64 = 1.0;

/// What the verifies of late shared their forwards with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load {
    /// Trees (sessions) per forward, this session's included: at least 1.
    pub trees: f64,
    /// Rows of the other sessions' trees in those forwards.
    pub other_rows: f64,
    /// Tokens a tree commits per forward: at least 1.
    pub tree_tokens: f64,
}

impl Load {
    pub const IDLE: Load = Load {
        trees: 1.0,
        other_rows: 0.0,
        tree_tokens: 1.0,
    };

    /// What one verify reported, for a tree of `rows` nodes that committed `tokens`;
    /// `None` where the target does not report its batches (in-process targets without
    /// a scheduler).
    pub fn of_verify(timing: &ServerTiming, rows: usize, tokens: usize) -> Option<Load> {
        (timing.batch_trees > 0).then(|| {
            let trees = timing.batch_trees.max(timing.open_sessions) as f64;
            let beside = timing.batch_rows as f64 - rows as f64;
            Load {
                trees,
                other_rows: beside.max(trees - 1.0).max(0.0),
                tree_tokens: tokens as f64,
            }
        })
    }

    fn sane(self) -> Load {
        let ok = |x: f64| x.is_finite().then_some(x);
        Load {
            trees: ok(self.trees).unwrap_or(1.0).max(1.0),
            other_rows: ok(self.other_rows).unwrap_or(0.0).max(0.0),
            tree_tokens: ok(self.tree_tokens).unwrap_or(1.0).max(1.0),
        }
    }
}

/// A time-weighted average of the [`Load`] observed.
#[derive(Debug, Clone, Copy)]
pub struct LoadGauge {
    load: Load,
    at: Option<Instant>,
}

impl Default for LoadGauge {
    fn default() -> Self {
        Self {
            load: Load::IDLE,
            at: None,
        }
    }
}

impl LoadGauge {
    pub fn now(&self) -> Load {
        self.load
    }

    /// Folds in an observation made at `at`: the older average keeps the weight
    /// `exp(-elapsed / LOAD_MEMORY_S)`.
    pub fn observe(&mut self, seen: Load, at: Instant) {
        let seen = seen.sane();
        let keep = match self.at {
            None => 0.0,
            Some(before) => {
                let dt = at.saturating_duration_since(before).as_secs_f64();
                (-dt / LOAD_MEMORY_S).exp()
            }
        };
        self.load = Load {
            trees: keep * self.load.trees + (1.0 - keep) * seen.trees,
            other_rows: keep * self.load.other_rows + (1.0 - keep) * seen.other_rows,
            tree_tokens: keep * self.load.tree_tokens + (1.0 - keep) * seen.tree_tokens,
        };
        self.at = Some(at);
    }
}

/// A [`CostProfile`]'s prices under a [`Load`] (see the module's rule).
#[derive(Debug, Clone, Copy)]
pub struct Pricing<'p> {
    profile: &'p CostProfile,
    /// Other trees' rows, rounded to whole rows.
    others: usize,
    /// What a second of this session's extra work costs the server, in seconds.
    scale: f64,
}

impl<'p> Pricing<'p> {
    pub fn new(profile: &'p CostProfile, load: Load) -> Self {
        let load = load.sane();
        let others = load.other_rows.round() as usize;
        let shared = profile.verify_cost(others + 1);
        let delayed = 1.0 + (load.trees - 1.0) * load.tree_tokens;
        let scale = delayed * profile.verify_cost(1) / shared.max(1e-12);
        Self {
            profile,
            others,
            scale,
        }
    }

    pub fn profile(&self) -> &'p CostProfile {
        self.profile
    }

    /// The factor on this session's extra seconds (1 alone).
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Seconds this session waits for a verify of `nodes` nodes.
    pub fn verify_wall(&self, nodes: usize) -> f64 {
        self.profile.verify_cost(self.others + nodes.max(1))
    }

    /// What a verify of `nodes` nodes costs the server, in seconds of a plain step.
    pub fn verify(&self, nodes: usize) -> f64 {
        self.profile.verify_cost(1) + self.scale * (self.verify_wall(nodes) - self.verify_wall(1))
    }

    /// What a draft call of `tokens` tokens costs the server; `None` without a draft.
    pub fn draft(&self, tokens: usize) -> Option<f64> {
        self.draft_wall(tokens).map(|s| s * self.scale)
    }

    /// What one more drafted token costs the server; `None` without a draft.
    pub fn draft_per_token(&self) -> Option<f64> {
        self.profile.draft().map(|d| d.per_token * self.scale)
    }

    /// Seconds of a draft call of `tokens` tokens as the profile timed it.
    pub fn draft_wall(&self, tokens: usize) -> Option<f64> {
        self.profile.draft_cost(tokens)
    }

    /// What catching the draft up on one token costs the server, and takes.
    pub fn catch_up(&self) -> Option<(f64, f64)> {
        self.profile
            .draft()
            .map(|d| (d.catch_up * self.scale, d.catch_up))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::auto::DraftCost;
    use std::time::Duration;

    /// One row 10 ms, each further row 3 ms; a draft token 4 ms.
    fn profile() -> CostProfile {
        let verify = (1..=64)
            .map(|n| (n, 0.010 + 0.003 * (n - 1) as f64))
            .collect();
        let draft = DraftCost {
            per_call: 0.0,
            per_token: 0.004,
            catch_up: 0.001,
        };
        CostProfile::new(verify, Some(draft)).unwrap()
    }

    #[test]
    fn alone_the_prices_are_the_profiles_own() {
        let p = profile();
        let alone = Pricing::new(&p, Load::IDLE);
        for n in [1, 2, 5, 17] {
            assert!((alone.verify(n) - p.verify_cost(n)).abs() < 1e-12);
            assert!((alone.verify_wall(n) - p.verify_cost(n)).abs() < 1e-12);
        }
        assert_eq!(alone.draft(3), p.draft_cost(3));
    }

    #[test]
    fn under_load_extra_rows_cost_every_session_in_the_forward() {
        let p = profile();
        // 8 sessions of one row each: 7 other rows, a shared forward of 8 rows (31 ms).
        let busy = Pricing::new(
            &p,
            Load {
                trees: 8.0,
                other_rows: 7.0,
                tree_tokens: 1.0,
            },
        );
        let shared = 0.010 + 0.003 * 7.0;
        let scale = 8.0 * 0.010 / shared;
        assert!((busy.scale() - scale).abs() < 1e-12);
        // Waiting: the whole shared forward and the session's extra rows.
        assert!((busy.verify_wall(1) - shared).abs() < 1e-12);
        assert!((busy.verify_wall(3) - (shared + 0.006)).abs() < 1e-12);
        // Priced: a plain step, plus the extra rows at the scale.
        assert!((busy.verify(1) - 0.010).abs() < 1e-12);
        assert!((busy.verify(3) - (0.010 + scale * 0.006)).abs() < 1e-12);
        assert!((busy.draft(2).unwrap() - scale * 0.008).abs() < 1e-12);
        // Dearer than alone: eight sessions wait for the extra rows.
        assert!(busy.verify(3) > p.verify_cost(3));
        // Dearer still where the others' trees commit two tokens a forward: 14 tokens,
        // not 7, wait for the extra rows besides the session's own.
        let guessing = Pricing::new(
            &p,
            Load {
                tree_tokens: 2.0,
                ..busy_load()
            },
        );
        let scale = (1.0 + 7.0 * 2.0) * 0.010 / shared;
        assert!((guessing.scale() - scale).abs() < 1e-12);
        assert!((guessing.verify(3) - (0.010 + scale * 0.006)).abs() < 1e-12);
        // Alone, what the session's own tree commits changes nothing.
        let alone = Pricing::new(
            &p,
            Load {
                tree_tokens: 3.0,
                ..Load::IDLE
            },
        );
        assert!((alone.verify(3) - p.verify_cost(3)).abs() < 1e-12);
    }

    fn busy_load() -> Load {
        Load {
            trees: 8.0,
            other_rows: 7.0,
            tree_tokens: 1.0,
        }
    }

    #[test]
    fn the_gauge_follows_the_load_and_forgets_it() {
        let t0 = Instant::now();
        let mut g = LoadGauge::default();
        assert_eq!(g.now(), Load::IDLE);
        let busy = Load {
            trees: 8.0,
            other_rows: 14.0,
            tree_tokens: 2.0,
        };
        // The first observation is taken whole.
        g.observe(busy, t0);
        assert_eq!(g.now(), busy);
        // Half a memory later an idle forward moves the average part of the way.
        g.observe(Load::IDLE, t0 + Duration::from_millis(500));
        let keep = (-0.5f64).exp();
        assert!((g.now().trees - (keep * 8.0 + (1.0 - keep))).abs() < 1e-9);
        // After a long quiet spell the next observation stands alone.
        g.observe(Load::IDLE, t0 + Duration::from_secs(60));
        assert!((g.now().trees - 1.0).abs() < 1e-9);
        assert!(g.now().other_rows < 1e-9);
        // Nonsense is read as idle, not propagated.
        g.observe(
            Load {
                trees: f64::NAN,
                other_rows: -3.0,
                tree_tokens: f64::INFINITY,
            },
            t0 + Duration::from_secs(120),
        );
        assert!((g.now().trees - 1.0).abs() < 1e-9 && g.now().other_rows < 1e-9);
        assert!((g.now().tree_tokens - 1.0).abs() < 1e-9);
    }

    #[test]
    fn a_verify_reports_the_load_beside_it() {
        let t = ServerTiming {
            batch_trees: 4,
            batch_rows: 10,
            open_sessions: 4,
            ..Default::default()
        };
        assert_eq!(
            Load::of_verify(&t, 3, 2),
            Some(Load {
                trees: 4.0,
                other_rows: 7.0,
                tree_tokens: 2.0,
            })
        );
        // Alone in the forward while seven other sessions draft or prefill: they count,
        // a row each.
        let t = ServerTiming {
            batch_trees: 1,
            batch_rows: 3,
            open_sessions: 8,
            ..Default::default()
        };
        assert_eq!(
            Load::of_verify(&t, 3, 1),
            Some(Load {
                trees: 8.0,
                other_rows: 7.0,
                tree_tokens: 1.0,
            })
        );
        assert_eq!(Load::of_verify(&ServerTiming::default(), 3, 1), None);
    }
}
