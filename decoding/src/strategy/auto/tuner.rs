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

use crate::tree::DraftTree;
use std::sync::Mutex;

use super::calibration::*;
use super::config::AutoConfig;
use super::load::*;
use super::plan::*;
use super::policy::*;
use super::profile::*;
/// The cost profile, the target's load and the acceptance counts that every `auto`
/// request shares.
#[derive(Debug)]
pub struct AutoTuner {
    profile: CostProfile,
    config: AutoConfig,
    load: Mutex<LoadGauge>,
    /// Greedy and sampled decoding accept differently; index 0 is greedy.
    calibration: [Mutex<Calibration>; 2],
    /// Where rounds' seconds come from, when not from the wall clock.
    clock: Option<std::sync::Arc<dyn CallClock>>,
}

impl AutoTuner {
    pub fn new(profile: CostProfile) -> Self {
        Self::with_config(profile, AutoConfig::default())
    }

    pub fn with_config(profile: CostProfile, config: AutoConfig) -> Self {
        Self {
            profile,
            config,
            load: Mutex::default(),
            calibration: [
                Mutex::new(Calibration::new(config)),
                Mutex::new(Calibration::new(config)),
            ],
            clock: None,
        }
    }

    /// The same tuner, learning its rounds' seconds from `clock` (the prices of their
    /// model calls) instead of the wall clock: for planning with a cost table of other
    /// hardware, whose profile this tuner should have been made with.
    pub fn priced_by(self, clock: std::sync::Arc<dyn CallClock>) -> Self {
        Self {
            clock: Some(clock),
            ..self
        }
    }

    /// The priced clock, where there is one.
    pub fn clock(&self) -> Option<&dyn CallClock> {
        self.clock.as_deref()
    }

    pub fn profile(&self) -> &CostProfile {
        &self.profile
    }

    pub fn config(&self) -> &AutoConfig {
        &self.config
    }

    /// The target's load as the verifies of late reported it.
    pub fn load(&self) -> Load {
        self.load.lock().unwrap_or_else(|e| e.into_inner()).now()
    }

    /// Folds in the load beside a verify of `rows` nodes that committed `tokens` (see
    /// [`Load::of_verify`]).
    pub fn observe_load(&self, timing: &crate::backend::ServerTiming, rows: usize, tokens: usize) {
        if let Some(seen) = Load::of_verify(timing, rows, tokens) {
            let now = std::time::Instant::now();
            let mut g = self.load.lock().unwrap_or_else(|e| e.into_inner());
            g.observe(seen, now);
            // A forward that carried prefill chunks took longer than its tree rows say;
            // and under a priced clock the table prices rows, not this machine's forwards.
            if timing.batch_prefill_rows == 0 && self.clock.is_none() {
                g.observe_forward(timing.batch_rows as f64, timing.forward, now);
            }
        }
    }

    /// What rounds cost now: the profile priced under the current load.
    pub fn pricing(&self) -> Pricing<'_> {
        Pricing::new(&self.profile, self.load())
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

    /// What guesses must promise beyond their price under the load now (see
    /// [`AutoConfig::load_margin`]): 1 alone.
    pub fn load_margin(&self) -> f64 {
        self.load().margin(self.config.load_margin)
    }

    /// Which nodes of a candidate tree to verify in a round of `kind`; `guesses[i]`
    /// proposed node `i`, and `confidence[j]` is the draft's probability for its `j`-th
    /// token where it gave one. A zero-cost tree is held to what such trees have
    /// delivered against their predictions, so that where they keep falling short the
    /// round is a plain greedy step instead of a slower one. (A drafted tree's draft is
    /// paid for by then; only its nodes are chosen.) Under load every tree with guesses
    /// is held to the load's margin besides.
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
                RoundKind::ZeroCost => c.realized[kind as usize].factor(&self.config),
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
        let load = self.load();
        let pricing = Pricing::new(&self.profile, load);
        let trust = trust / load.margin(self.config.load_margin);
        let mut plan = choose_nodes(parents, &accept, |n| pricing.verify(n), trust);
        plan.wait_seconds = pricing.verify_wall(plan.nodes());
        plan
    }

    /// The plan of a plain step over a candidate tree of `nodes` nodes: its root alone.
    pub fn plain_plan(&self, nodes: usize) -> TreePlan {
        let pricing = self.pricing();
        let mut keep = vec![false; nodes.max(1)];
        keep[0] = true;
        TreePlan {
            keep,
            expected_tokens: 1.0,
            seconds: pricing.verify(1),
            wait_seconds: pricing.verify_wall(1),
        }
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
        let without_guesses = without.nodes() > 1;
        let (rate, g, p) = self.best_gamma(greedy, max_gamma, backlog)?;
        // Under load both sides' guesses are held to the load's margin; a plain step
        // has none.
        let margin = self.load_margin();
        let c = self.calibration(greedy);
        let mut without = without.tokens_per_second()
            * c.realized[RoundKind::ZeroCost as usize].factor(&self.config)
            / c.realized[RoundKind::Drafted as usize].factor(&self.config);
        if without_guesses {
            without /= margin;
        }
        (rate / margin > without * self.config.draft_margin).then_some((g, p))
    }

    /// How many tokens to draft in a round of [`Policy::Drafting`]: the best length,
    /// whatever the zero-cost guesses promise, as long as drafting is expected to beat a
    /// plain greedy step at all (by the load's margin under load).
    pub fn drafting_gamma(
        &self,
        greedy: bool,
        max_gamma: usize,
        backlog: DraftBacklog,
    ) -> Option<(usize, Prediction)> {
        let plain = self.load_margin() / self.pricing().verify(1);
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
        let pricing = self.pricing();
        let (catch_up_cost, catch_up_wait) = pricing.catch_up()?;
        let c = self.calibration(greedy);
        // Drafted with lookahead where that makes a token cheaper: the same tokens.
        let per_token = self
            .lookahead_ratio_in(&c, backlog.lookahead_rows)
            .unwrap_or(1.0);
        let floor = match c.tries(Guess::Draft(0)) < self.config.explore_tries {
            true => self.config.optimistic_draft,
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
            let round = pricing.draft(g as f64 * per_token)? + pricing.verify(g + 1);
            let backlog_share = catch_up_cost * (backlog.pending + backlog.unopened) as f64 * share;
            let rate = expected / (round + backlog_share).max(1e-12);
            if best.is_none_or(|(r, _, _)| rate > r) {
                // The round as the caller observes it: with the catch-up, which it pays
                // in this round's draft call, and without the opening, which it pays
                // apart.
                let pending = backlog.pending as f64;
                let p = Prediction {
                    kind: RoundKind::Drafted,
                    tokens: expected,
                    seconds: pricing.draft_wall(g as f64 * per_token)?
                        + pricing.verify_wall(g + 1)
                        + catch_up_wait * pending,
                    cost: round + catch_up_cost * pending,
                };
                best = Some((rate, g, p));
            }
        }
        best
    }

    /// What a drafted token costs with lookahead against without, where lookahead steps
    /// of `rows` rows are possible (`rows` > 0) and make a token cheaper by the draft
    /// margin; `None` where plain drafting is the cheaper (see
    /// [`AutoConfig::lookahead_yield_prior`]).
    pub fn lookahead_ratio(&self, greedy: bool, rows: usize) -> Option<f64> {
        let c = self.calibration(greedy);
        self.lookahead_ratio_in(&c, rows)
    }

    fn lookahead_ratio_in(&self, c: &Calibration, rows: usize) -> Option<f64> {
        if rows == 0 {
            return None;
        }
        let d = self.profile.draft()?;
        let y = &c.lookahead;
        let (mut per_forward, extra_rows) = match y.forwards > 0.0 {
            true => (y.tokens / y.forwards, y.extra_rows / y.forwards),
            false => (0.0, (rows - 1) as f64),
        };
        if y.calls < self.config.explore_tries {
            per_forward = per_forward.max(self.config.lookahead_yield_prior);
        }
        let per_token = (d.per_token + d.catch_up * extra_rows) / per_forward.max(1e-9);
        let ratio = per_token / d.per_token.max(1e-12);
        (ratio.is_finite() && ratio * self.config.draft_margin < 1.0).then_some(ratio)
    }

    /// Counts a lookahead draft call: `tokens` drafted in `forwards` forwards that ran
    /// `extra` rows beyond one each and the caught-up ones
    /// ([`crate::stats::ModelCall::extra_draft_rows`]).
    pub fn learn_lookahead(&self, greedy: bool, tokens: usize, forwards: usize, extra: usize) {
        if forwards == 0 {
            return;
        }
        let memory = self.config.reality_memory;
        self.calibration(greedy)
            .lookahead
            .add(tokens, forwards, extra, memory);
    }

    /// The floor for the draft's running confidence (the product of its tokens'
    /// probabilities) in a round predicted as `p` with up to `gamma` draft tokens: below
    /// it, the chance that the target accepts one more draft token, times what a token is
    /// worth (the round's predicted cost per token), no longer pays for that token's
    /// draft forward and verify row. 0 without a draft.
    pub fn draft_stop(&self, greedy: bool, gamma: usize, p: &Prediction) -> f32 {
        let pricing = self.pricing();
        let Some(per_token) = pricing.draft_per_token() else {
            return 0.0;
        };
        if gamma == 0 || p.tokens <= 0.0 {
            return 0.0;
        }
        let row = (pricing.verify(gamma + 1) - pricing.verify(1)) / gamma as f64;
        let token_worth = p.cost / p.tokens;
        let c = self.calibration(greedy);
        let next = c.estimate(Guess::Draft(0));
        // The floor on the chance of reaching the next token, which is the draft's
        // probabilities' product raised to the learnt power; the draft checks the
        // product itself, so the floor goes the other way.
        let reach = (per_token + row) / (next * token_worth).max(1e-12);
        let floor = reach.clamp(0.0, 1.0).powf(1.0 / c.confidence_power());
        floor.clamp(0.0, self.config.max_draft_stop) as f32
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
    /// scores and for one segment in `audit_every` (4), since only its segments score all
    /// three. Without a draft only zero-cost rounds are possible.
    pub fn choose_policy(&self, greedy: bool, can_draft: bool) -> Policy {
        if !can_draft || self.profile.draft.is_none() {
            return Policy::ZeroCost;
        }
        let mut c = self.calibration(greedy);
        let r = &mut c.policies;
        let policy = match r.best() {
            Some(p) if r.since_audit + 1 < self.config.audit_every => p,
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
        r.segments += (drafted / self.config.segment_tokens as f64).min(1.0);
        for i in 0..Policy::ALL.len() {
            r.scores.tokens[i] += scores.tokens[i];
            r.scores.seconds[i] += scores.seconds[i];
        }
        if r.segments > self.config.policy_memory {
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
        // A round with nothing but the root is a plain greedy step: its tokens are
        // certain, so it measures only the target's speed against the profile (which
        // moves: the profile was timed once, and a VM's speed drifts). Such a step is a
        // round of neither kind, and fades both records: where zero-cost trees fell short
        // enough to be planned away, they are tried again some time later.
        if p.kind == RoundKind::ZeroCost && p.tokens <= 1.0 + 1e-9 {
            c.plain.add(p, tokens as f64, seconds, &self.config);
            c.realized
                .iter_mut()
                .for_each(|r| r.fade(self.config.reality_fade));
            return;
        }
        // The other rounds are held against what the profile predicts at the plain
        // steps' speed: a target running faster than its profile makes every round beat
        // its prediction, plain steps too, and only the part beyond theirs is the
        // guesses' own (without this, trees that lose to plain steps kept being verified
        // on a fast machine).
        let speed = c.plain.factor_with(self.config.plain_prior);
        c.plain.fade(self.config.plain_fade);
        let at_speed = Prediction {
            seconds: p.seconds / speed,
            ..p
        };
        c.realized[p.kind as usize].add(at_speed, tokens as f64, seconds, &self.config);
        let other = match p.kind {
            RoundKind::Drafted => RoundKind::ZeroCost,
            RoundKind::ZeroCost => RoundKind::Drafted,
        };
        c.realized[other as usize].fade(self.config.reality_fade);
    }

    /// Realized over predicted rate of a kind of round so far, against a plain step's
    /// (1 before any).
    pub fn reality(&self, greedy: bool, kind: RoundKind) -> f64 {
        self.calibration(greedy).realized[kind as usize].factor(&self.config)
    }

    /// How much faster than its profile the target runs plain steps now (1 before any).
    pub fn plain_speed(&self, greedy: bool) -> f64 {
        self.calibration(greedy)
            .plain
            .factor_with(self.config.plain_prior)
    }

    /// Whether a round whose plan has guesses should be a plain step instead: when too
    /// few plain steps were seen of late to know the target's speed by.
    pub fn wants_plain_step(&self, greedy: bool) -> bool {
        self.calibration(greedy).plain.rounds < self.config.plain_probe_below
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
            lookahead_rows: 0,
        }
    }

    /// A zero-cost plan making `r` tokens per second.
    fn rate(r: f64) -> TreePlan {
        TreePlan {
            keep: vec![true],
            expected_tokens: r,
            seconds: 1.0,
            wait_seconds: 1.0,
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

    /// A clock that prices every call at nothing (only its presence matters here).
    #[derive(Debug)]
    struct FreeClock;

    impl CallClock for FreeClock {
        fn seconds(&self, _: &[crate::stats::ModelCall], _: usize) -> f64 {
            0.0
        }
    }

    /// Forwards alone of 1 to 8 rows took 20 ms + 3 ms a row, where the profile says
    /// 10 ms + 3 ms: the wall clock's tuner prices a row at the measured share of a
    /// forward (3 / 23 of the profile's 10 ms), the one planning with a priced clock
    /// (another machine's table) keeps the table's rows.
    #[test]
    fn rows_are_priced_by_the_forwards_seen_unless_a_table_prices_them() {
        let p = profile(
            &[(1, 0.010), (16, 0.010 + 0.003 * 15.0)],
            Some((0.0, 0.004)),
        );
        let serve = |t: &AutoTuner| {
            for i in 0..40u32 {
                let rows = 1 + i % 8;
                let timing = crate::backend::ServerTiming {
                    forward: 0.020 + 0.003 * f64::from(rows),
                    batch_trees: 1,
                    batch_rows: rows,
                    open_sessions: 1,
                    ..Default::default()
                };
                t.observe_load(&timing, rows as usize, 1);
            }
        };
        let wall = AutoTuner::new(p.clone());
        serve(&wall);
        let measured = 0.010 + 2.0 * 0.003 / 0.023 * 0.010;
        assert!((wall.pricing().verify(3) - measured).abs() < 1e-9);
        let priced = AutoTuner::new(p.clone()).priced_by(std::sync::Arc::new(FreeClock));
        serve(&priced);
        assert!((priced.pricing().verify(3) - p.verify_cost(3)).abs() < 1e-12);
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
    fn a_loaded_target_gets_fewer_drafted_tokens_and_smaller_trees() {
        // Rows at 0.1 of a step (a GPU-like profile, where wide trees pay alone), a draft
        // token at 0.1 of a step.
        let costs = || profile(&[(1, 1.0), (64, 7.3)], Some((0.0, 0.1)));
        let idle = AutoTuner::new(costs());
        let busy = AutoTuner::new(costs());
        // Eight sessions of 2-row trees in every forward: 14 rows beside each.
        let timing = crate::backend::ServerTiming {
            batch_trees: 8,
            batch_rows: 16,
            ..Default::default()
        };
        busy.observe_load(&timing, 2, 1);
        assert_eq!(
            busy.load(),
            Load {
                trees: 8.0,
                other_rows: 14.0,
                tree_tokens: 1.0,
                row_share: 0.0,
            }
        );
        // A verify reported without its batch (an in-process target) leaves it idle.
        idle.observe_load(&crate::backend::ServerTiming::default(), 2, 1);
        assert_eq!(idle.load(), Load::IDLE);

        let parents = [-1, 0, 1, 2, 3, 4, 5, 0, 7];
        let guesses: Vec<Vec<Guess>> = std::iter::once(Vec::new())
            .chain((0..6).map(|i| vec![Guess::Draft(i)]))
            .chain([vec![Guess::Pool(0)], vec![Guess::Pool(1)]])
            .collect();
        let nodes = |t: &AutoTuner| {
            t.plan(true, &parents, &guesses, &[], RoundKind::Drafted)
                .nodes()
        };
        let (idle_nodes, busy_nodes) = (nodes(&idle), nodes(&busy));
        assert!(busy_nodes < idle_nodes, "{busy_nodes} vs {idle_nodes}");
        let gamma = |t: &AutoTuner| t.drafting_gamma(true, 8, in_step(100)).map(|(g, _)| g);
        let idle_gamma = gamma(&idle).expect("alone, drafting pays");
        assert!(
            gamma(&busy).is_none_or(|g| g < idle_gamma),
            "{:?} vs {idle_gamma}",
            gamma(&busy)
        );
        // The prediction a busy round is checked against is the time the session waits
        // for the shared forward, longer than what it was priced at.
        let plan = busy.plan(true, &parents, &guesses, &[], RoundKind::Drafted);
        let p = plan.prediction(RoundKind::Drafted);
        assert!(p.seconds > p.cost, "{p:?}");
        assert!((p.seconds - busy.profile().verify_cost(14 + plan.nodes())).abs() < 1e-12);
        // When the load goes (a second later, forwards of this session alone), the same
        // tuner plans as an idle one again.
        busy.load.lock().unwrap().observe(
            Load::IDLE,
            std::time::Instant::now() + std::time::Duration::from_secs(60),
        );
        assert_eq!(nodes(&busy), idle_nodes);
    }

    #[test]
    fn under_load_guesses_must_clear_the_margin_and_alone_they_need_not() {
        let costs = || profile(&[(1, 1.0), (64, 7.3)], Some((0.0, 0.1)));
        let config = AutoConfig {
            load_margin: 1.5,
            ..AutoConfig::default()
        };
        let with_margin = AutoTuner::with_config(costs(), config);
        let no_margin = AutoConfig {
            load_margin: 1.0,
            ..AutoConfig::default()
        };
        let without = AutoTuner::with_config(costs(), no_margin);
        // One pool guess whose odds (0.6 after its prior) pay for its row by less than
        // the margin asks.
        let parents = [-1, 0];
        let guesses = vec![Vec::new(), vec![Guess::Pool(0)]];
        for t in [&with_margin, &without] {
            for _ in 0..40 {
                t.calibration(true).record(Guess::Pool(0), true);
            }
            for _ in 0..20 {
                t.calibration(true).record(Guess::Pool(0), false);
            }
        }
        let nodes = |t: &AutoTuner| {
            t.plan(true, &parents, &guesses, &[], RoundKind::ZeroCost)
                .nodes()
        };
        // Alone the margin asks nothing: both keep the guess.
        assert_eq!(with_margin.load_margin(), 1.0);
        assert_eq!((nodes(&with_margin), nodes(&without)), (2, 2));
        // Eight sessions of plain steps in every forward.
        let timing = crate::backend::ServerTiming {
            batch_trees: 8,
            batch_rows: 8,
            ..Default::default()
        };
        for t in [&with_margin, &without] {
            t.observe_load(&timing, 1, 1);
        }
        let m = with_margin.load_margin();
        assert!((m - (1.0 + 0.5 * (1.0 - 1.0 / 8.0))).abs() < 1e-12, "{m}");
        assert_eq!(without.load_margin(), 1.0);
        // The guess still pays for its row under this load, by less than the margin.
        let plain = without.plain_plan(2);
        let plan = without.plan(true, &parents, &guesses, &[], RoundKind::ZeroCost);
        assert_eq!(plan.nodes(), 2);
        let gain = plan.tokens_per_second() / plain.tokens_per_second();
        assert!(gain > 1.0 && gain < m, "{gain} against {m}");
        assert_eq!(nodes(&with_margin), 1);
        // Drafting is held to it too: a draft whose best rate beats a plain step by less
        // than the margin is not asked for.
        let drafted = |t: &AutoTuner| t.drafting_gamma(true, 8, in_step(100)).is_some();
        let margin_gamma = with_margin.best_gamma(true, 8, in_step(100));
        let (rate, _, _) = margin_gamma.expect("a draft");
        let over_plain = rate * with_margin.pricing().verify(1);
        assert_eq!(
            drafted(&with_margin),
            over_plain > m,
            "{over_plain} against {m}"
        );
        assert_eq!(drafted(&without), over_plain > 1.0);
    }

    #[test]
    fn lookahead_drafts_where_a_step_s_extra_rows_are_nearly_free_and_it_yields() {
        // A draft token 0.1 of a step; a caught-up row 0.1 of a draft token (GPU-like),
        // or a third of one (this CPU's kind).
        let with = |catch_up: f64| {
            let verify = vec![(1, 1.0), (64, 1.3)];
            let draft = DraftCost {
                per_call: 0.0,
                per_token: 0.1,
                catch_up,
            };
            AutoTuner::new(CostProfile::new(verify, Some(draft)).unwrap())
        };
        let gpu = with(0.001);
        let cpu = with(0.033);
        let rows = 57;
        // Untried, a step is taken to give 2 tokens: 0.1 + 56 * 0.001 for two tokens.
        let r = gpu.lookahead_ratio(true, rows).expect("cheaper per token");
        assert!((r - (0.1 + 56.0 * 0.001) / 2.0 / 0.1).abs() < 1e-12, "{r}");
        assert_eq!(
            cpu.lookahead_ratio(true, rows),
            None,
            "56 rows cost 18 tokens"
        );
        assert_eq!(gpu.lookahead_ratio(true, 0), None, "no lookahead here");
        // The drafted round is priced at that ratio.
        let backlog = DraftBacklog {
            lookahead_rows: rows,
            ..in_step(100)
        };
        let (g, p) = gpu.drafting_gamma(true, 8, backlog).expect("drafting pays");
        let want = 0.1 * g as f64 * r + gpu.profile().verify_cost(g + 1);
        assert!((p.seconds - want).abs() < 1e-12, "{p:?} against {want}");
        // Tried, and giving one token a forward, it is no cheaper: plain drafting again.
        for _ in 0..AutoConfig::default().explore_tries as usize {
            // 8 forwards of `rows` rows and 5 caught up: 8 * (rows - 1) beyond one each.
            gpu.learn_lookahead(true, 8, 8, 8 * (rows - 1));
        }
        assert_eq!(gpu.lookahead_ratio(true, rows), None);
        // Giving three a forward, it is.
        for _ in 0..400 {
            gpu.learn_lookahead(true, 9, 3, 3 * (rows - 1));
        }
        let r = gpu
            .lookahead_ratio(true, rows)
            .expect("three tokens a step");
        assert!(r < 0.6, "{r}");
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
            lookahead_rows: 0,
        };
        assert_eq!(cheap.draft_gamma(true, 8, &rate(1.0), behind(5)), None);
        let (g, p) = cheap
            .draft_gamma(true, 8, &rate(1.0), behind(100_000))
            .expect("the catch-up is earned back");
        // ... and the round it runs in is predicted with the catch-up in it
        let round = cheap.profile.draft_cost(g as f64).unwrap() + cheap.profile.verify_cost(g + 1);
        assert!((p.seconds - round - 10.0 * 0.5).abs() < 1e-9, "{p:?}");
        // ... and so does joining late with a long text and few tokens left, but not
        // with many tokens left to earn the prefill back
        let late = |remaining| DraftBacklog {
            pending: 0,
            unopened: 200,
            remaining,
            lookahead_rows: 0,
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
            for _ in 0..AutoConfig::default().explore_tries as usize {
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

    /// On a target running faster than its profile every round beats its prediction,
    /// plain steps too; trees that gain less than plain steps do are planned away.
    #[test]
    fn rounds_with_guesses_are_judged_against_plain_steps_at_the_speed_they_run_now() {
        let parents = [-1, 0];
        let guesses = vec![vec![], vec![Guess::trie(9, 10)]];
        let run = |plain_s: f64| {
            let t = AutoTuner::new(profile(&[(1, 1.0), (2, 1.5)], Some((0.0, 0.1))));
            assert!(
                t.wants_plain_step(true),
                "nothing is known of plain steps yet"
            );
            let plain = t.plain_plan(2);
            assert_eq!(plain.nodes(), 1);
            for _ in 0..40 {
                t.observe(true, plain.prediction(RoundKind::ZeroCost), 1, plain_s);
            }
            assert!(!t.wants_plain_step(true));
            let tree = t.plan(true, &parents, &guesses, &[], RoundKind::ZeroCost);
            assert_eq!(tree.nodes(), 2, "on paper the guess pays");
            // the trees deliver the tokens promised, in 90 % of the profile's time
            for _ in 0..40 {
                let p = tree.prediction(RoundKind::ZeroCost);
                t.observe(true, p, 2, 0.9 * p.seconds);
            }
            t
        };
        // plain steps as the profile says: the trees beat their prediction, and stay
        let same = run(1.0);
        assert!((same.plain_speed(true) - 1.0).abs() < 1e-9);
        assert!(same.reality(true, RoundKind::ZeroCost) > 1.05);
        let nodes = |t: &AutoTuner| {
            t.plan(true, &parents, &guesses, &[], RoundKind::ZeroCost)
                .nodes()
        };
        assert_eq!(nodes(&same), 2);
        // plain steps at 60 % of the profile's time: the same trees lose to them
        let fast = run(0.6);
        assert!(fast.plain_speed(true) > 1.5, "{}", fast.plain_speed(true));
        let trust = fast.reality(true, RoundKind::ZeroCost);
        assert!(trust < 0.9, "{trust}");
        assert_eq!(nodes(&fast), 1);
        // without plain steps of late, a round with guesses is asked to be one
        let mut rounds = 0;
        while !fast.wants_plain_step(true) {
            let p = fast.plan(true, &parents, &guesses, &[], RoundKind::Drafted);
            fast.observe(true, p.prediction(RoundKind::Drafted), 2, p.seconds);
            rounds += 1;
            assert!(rounds < 2000, "plain steps are never asked for");
        }
        assert!(rounds > 20, "a plain step asked for after {rounds} rounds");
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
        let round = t.profile().draft_cost(g as f64).unwrap() + t.profile().verify_cost(g + 1);
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
        let chosen: Vec<Policy> = (0..2 * AutoConfig::default().audit_every)
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
        assert!(
            segments <= AutoConfig::default().policy_memory,
            "{segments}"
        );
        assert!((t.policy_rate(true, Policy::ZeroCost).unwrap() - 20.0).abs() < 1e-9);
        // a new workload overturns an old one within one memory's worth of segments
        score(
            &t,
            AutoConfig::default().policy_memory as usize,
            [5.0, 20.0, 10.0],
        );
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
            cost: 1.0,
        };
        let t = AutoTuner::new(profile(&[(1, 1.0), (9, 1.16)], Some((0.0, 0.1))));
        let floor = t.draft_stop(true, 8, &p);
        assert!((floor - 0.12 / (0.75 * 0.25)).abs() < 1e-4, "{floor}");
        // a cheaper draft drafts on at lower confidence
        let cheap = AutoTuner::new(profile(&[(1, 1.0), (9, 1.16)], Some((0.0, 0.01))));
        assert!(cheap.draft_stop(true, 8, &p) < floor);
        // a dear one is capped, so a confident draft still gets past its first token
        let dear = AutoTuner::new(profile(&[(1, 1.0), (9, 1.16)], Some((0.0, 5.0))));
        assert_eq!(
            dear.draft_stop(true, 8, &p),
            AutoConfig::default().max_draft_stop as f32
        );
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
            cost: 1.0,
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
