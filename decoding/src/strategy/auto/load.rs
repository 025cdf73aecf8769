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
//! What a row adds to a forward under load is measured while serving, not taken from the
//! profile alone: every verify reports its forward's seconds and rows, and a least-squares
//! line through the recent forwards (those without prefill chunks) gives the seconds a row
//! adds, as a share of the forward's; the profile's rows are priced at that share of its
//! own shared forward. (A batched forward of many sessions' trees is not the profile's
//! one-session forward of as many rows: each tree attends to its own cache.)
//!
//! Alone (`B` = 1, `R` = 0) both prices are the profile's own, its rows priced at the
//! measured share where the forwards of late show it (the profile's shape, timed once at
//! start-up on a VM whose speed drifts, put a row at half of what it cost). Decisions
//! (which nodes to verify, whether and how far to draft) maximise tokens per priced second,
//! which is the server's throughput, since extra tokens per forward are weighed against the
//! forward's growth in all `B` sessions' time. Predictions that are checked against the
//! round's wall time use the waiting time. The load comes back with every verify (the trees
//! and rows of the forward that served it, and the sessions open at the target) and is kept
//! as a time-weighted average; `t` is what this session's verifies commit, as the other
//! trees' own are not reported (other `auto` sessions commit alike; a plain session's 1
//! makes the estimate err towards smaller trees under load). Without `t`, a forward full of
//! trees that each commit two tokens was priced as if they committed one, and every session
//! widened its tree where all of them together lost throughput. `B` is the larger of the
//! trees in the forward and the sessions open, and every other open session is counted for
//! at least one row: a session that is drafting, or still prefilling, is absent from this
//! forward but shares the next ones.

use super::profile::CostProfile;
use crate::backend::ServerTiming;
use std::time::Instant;

/// Seconds over which an older load observation loses weight by a factor e: long
/// enough to smooth one forward's batch against the next, short enough that a burst's
/// end shows within a few rounds.
pub const LOAD_MEMORY_S: f64 = 1.0;

/// Seconds over which an older forward loses weight by a factor e in the live fit of
/// forward time against rows: long enough for the rows to vary, short enough to follow
/// the load.
pub const FIT_MEMORY_S: f64 = 10.0;
/// The forwards' weight, and the variance of their rows, the fit needs before it is used.
const FIT_MIN_WEIGHT: f64 = 16.0;
const FIT_MIN_SPREAD: f64 = 0.5;

/// What the verifies of late shared their forwards with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load {
    /// Trees (sessions) per forward, this session's included: at least 1.
    pub trees: f64,
    /// Rows of the other sessions' trees in those forwards.
    pub other_rows: f64,
    /// Tokens a tree commits per forward: at least 1.
    pub tree_tokens: f64,
    /// What one more row adds to a forward of `other_rows + 1` rows, as a share of it,
    /// measured on the forwards of late; 0 where not known (the profile's is used).
    pub row_share: f64,
}

impl Load {
    pub const IDLE: Load = Load {
        trees: 1.0,
        other_rows: 0.0,
        tree_tokens: 1.0,
        row_share: 0.0,
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
                row_share: 0.0,
            }
        })
    }

    /// What guesses must promise beyond their price under this load, given `full`, the
    /// margin asked of a full forward ([`super::AutoConfig::load_margin`]): 1 alone,
    /// approaching `full` as the trees per forward grow.
    pub fn margin(&self, full: f64) -> f64 {
        let trees = self.sane().trees;
        let full = if full.is_finite() { full.max(1.0) } else { 1.0 };
        1.0 + (full - 1.0) * (1.0 - 1.0 / trees)
    }

    fn sane(self) -> Load {
        let ok = |x: f64| x.is_finite().then_some(x);
        Load {
            trees: ok(self.trees).unwrap_or(1.0).max(1.0),
            other_rows: ok(self.other_rows).unwrap_or(0.0).max(0.0),
            tree_tokens: ok(self.tree_tokens).unwrap_or(1.0).max(1.0),
            row_share: ok(self.row_share).unwrap_or(0.0).max(0.0),
        }
    }
}

/// A least-squares line through (rows, seconds) of forwards, its sums decayed with time.
#[derive(Debug, Clone, Copy, Default)]
struct RowFit {
    w: f64,
    x: f64,
    xx: f64,
    y: f64,
    xy: f64,
}

impl RowFit {
    fn scale(&mut self, keep: f64) {
        for v in [
            &mut self.w,
            &mut self.x,
            &mut self.xx,
            &mut self.y,
            &mut self.xy,
        ] {
            *v *= keep;
        }
    }

    fn add(&mut self, rows: f64, seconds: f64) {
        self.w += 1.0;
        self.x += rows;
        self.xx += rows * rows;
        self.y += seconds;
        self.xy += rows * seconds;
    }

    /// The line's intercept and slope (seconds per row); `None` before there are enough
    /// forwards of different sizes, or where the slope is not positive.
    fn line(&self) -> Option<(f64, f64)> {
        if self.w < FIT_MIN_WEIGHT {
            return None;
        }
        let mx = self.x / self.w;
        let my = self.y / self.w;
        let var = self.xx / self.w - mx * mx;
        if var.is_nan() || var < FIT_MIN_SPREAD {
            return None;
        }
        let slope = (self.xy / self.w - mx * my) / var;
        (slope.is_finite() && slope > 0.0).then_some((my - slope * mx, slope))
    }
}

/// A time-weighted average of the [`Load`] observed, and the live fit of forward time
/// against rows.
#[derive(Debug, Clone, Copy)]
pub struct LoadGauge {
    load: Load,
    at: Option<Instant>,
    fit: RowFit,
    fit_at: Option<Instant>,
}

impl Default for LoadGauge {
    fn default() -> Self {
        Self {
            load: Load::IDLE,
            at: None,
            fit: RowFit::default(),
            fit_at: None,
        }
    }
}

impl LoadGauge {
    pub fn now(&self) -> Load {
        let row_share = match self.fit.line() {
            Some((a, b)) => {
                let forward = a + b * (self.load.other_rows + 1.0);
                if forward > 0.0 { b / forward } else { 0.0 }
            }
            None => 0.0,
        };
        Load {
            row_share,
            ..self.load
        }
    }

    /// Folds in a forward of `rows` tree rows (no prefill chunks) that took `seconds`,
    /// seen at `at`: older forwards keep the weight `exp(-elapsed / FIT_MEMORY_S)`.
    pub fn observe_forward(&mut self, rows: f64, seconds: f64, at: Instant) {
        if !(rows.is_finite() && rows >= 1.0 && seconds.is_finite() && seconds > 0.0) {
            return;
        }
        if let Some(before) = self.fit_at {
            let dt = at.saturating_duration_since(before).as_secs_f64();
            self.fit.scale((-dt / FIT_MEMORY_S).exp());
        }
        self.fit.add(rows, seconds);
        self.fit_at = Some(at);
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
            row_share: 0.0,
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
    /// Seconds (on the profile's clock) each row beyond a tree's first adds to the
    /// shared forward, where the live fit says so; the profile's curve otherwise.
    row_s: Option<f64>,
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
        // The measured share of a forward one row adds, within a factor 4 of the
        // profile's own over the next 8 rows (a fit is a fit). Alone too: the profile was
        // timed once, at start-up, and a VM's speed drifts by more between a forward's
        // first row and its others than the level the plain steps correct.
        let row_s = (load.row_share > 0.0).then(|| {
            let own = (profile.verify_cost(others + 9) - shared) / 8.0;
            (load.row_share * shared).clamp(own / 4.0, own * 4.0)
        });
        Self {
            profile,
            others,
            row_s,
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
        self.profile.verify_cost(self.others + 1) + self.extra_rows(nodes)
    }

    /// What a verify of `nodes` nodes costs the server, in seconds of a plain step.
    pub fn verify(&self, nodes: usize) -> f64 {
        self.profile.verify_cost(1) + self.scale * self.extra_rows(nodes)
    }

    /// Seconds the rows of a tree of `nodes` nodes beyond its first add to the forward.
    fn extra_rows(&self, nodes: usize) -> f64 {
        let n = nodes.max(1);
        match self.row_s {
            Some(per_row) => per_row * (n - 1) as f64,
            None => {
                self.profile.verify_cost(self.others + n)
                    - self.profile.verify_cost(self.others + 1)
            }
        }
    }

    /// What a draft call of `tokens` plain draft tokens' time costs the server (fewer
    /// than it drafts where lookahead drafts them); `None` without a draft.
    pub fn draft(&self, tokens: f64) -> Option<f64> {
        self.draft_wall(tokens).map(|s| s * self.scale)
    }

    /// What one more drafted token costs the server; `None` without a draft.
    pub fn draft_per_token(&self) -> Option<f64> {
        self.profile.draft().map(|d| d.per_token * self.scale)
    }

    /// Seconds of a draft call of `tokens` plain draft tokens' time as the profile timed
    /// it.
    pub fn draft_wall(&self, tokens: f64) -> Option<f64> {
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
        assert_eq!(alone.draft(3.0), p.draft_cost(3.0));
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
                row_share: 0.0,
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
        assert!((busy.draft(2.0).unwrap() - scale * 0.008).abs() < 1e-12);
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
            row_share: 0.0,
        }
    }

    #[test]
    fn rows_are_priced_at_the_share_of_a_forward_measured_while_serving() {
        let p = profile();
        let t0 = Instant::now();
        let mut g = LoadGauge::default();
        g.observe(busy_load(), t0);
        // Forwards of 8 to 16 rows at 2 ms + 6 ms a row: a row adds 12 % to a forward of
        // 8 rows (50 ms), where the profile's adds 9.7 % (3 ms to 31 ms).
        for i in 0..40 {
            let rows = 8.0 + (i % 9) as f64;
            g.observe_forward(rows, 0.002 + 0.006 * rows, t0);
        }
        let load = g.now();
        assert!((load.row_share - 0.006 / 0.050).abs() < 1e-9, "{load:?}");
        let live = Pricing::new(&p, load);
        let by_profile = Pricing::new(&p, busy_load());
        let shared = 0.010 + 0.003 * 7.0;
        // a row adds 12 % of the shared forward, on the profile's clock
        let per_row = 0.006 / 0.050 * shared;
        assert!((live.verify_wall(3) - (shared + 2.0 * per_row)).abs() < 1e-12);
        assert!((live.verify(3) - (0.010 + live.scale() * 2.0 * per_row)).abs() < 1e-12);
        assert!(live.verify(3) > by_profile.verify(3));
        assert!((live.verify(1) - by_profile.verify(1)).abs() < 1e-12);
        // alone, rows are priced at the share measured on the session's own forwards:
        // 1 to 8 rows at 20 ms + 3 ms a row, a row 3 / 23 of a one-row forward, which
        // the profile times at 10 ms (where its own row adds 3 ms)
        let mut solo = LoadGauge::default();
        for i in 0..40 {
            let rows = 1.0 + (i % 8) as f64;
            solo.observe_forward(rows, 0.020 + 0.003 * rows, t0);
        }
        let alone = Pricing::new(&p, solo.now());
        let per_row = 0.003 / 0.023 * 0.010;
        assert!((alone.verify_wall(3) - (0.010 + 2.0 * per_row)).abs() < 1e-12);
        assert!((alone.verify(3) - alone.verify_wall(3)).abs() < 1e-12);
        assert!(alone.verify(3) < p.verify_cost(3));
        // forwards all of one size say nothing about rows; prefills and nonsense are
        // not counted
        let mut flat = LoadGauge::default();
        for _ in 0..40 {
            flat.observe_forward(8.0, 0.05, t0);
        }
        flat.observe_forward(f64::NAN, 0.05, t0);
        flat.observe_forward(4.0, -1.0, t0);
        assert_eq!(flat.now().row_share, 0.0);
        // old forwards fade: a minute later a few new ones are not yet enough
        let mut late = g;
        for i in 0..4 {
            late.observe_forward(8.0 + i as f64, 0.5, t0 + Duration::from_secs(60));
        }
        assert_eq!(late.now().row_share, 0.0);
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
            row_share: 0.0,
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
                row_share: 0.0,
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
                row_share: 0.0,
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
                row_share: 0.0,
            })
        );
        assert_eq!(Load::of_verify(&ServerTiming::default(), 3, 1), None);
    }
}
