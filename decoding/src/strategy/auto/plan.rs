//! Which nodes of a candidate tree a round verifies: the closed sub-tree that maximises
//! expected committed tokens per second on the cost profile.

use super::calibration::*;
/// The nodes a round verifies and what they are expected to bring.
#[derive(Debug, Clone, PartialEq)]
pub struct TreePlan {
    /// Per node of the candidate tree: verify it (the root always).
    pub keep: Vec<bool>,
    /// Expected committed tokens (accepted guesses plus the target's own token).
    pub expected_tokens: f64,
    /// What the verify is expected to cost ([`super::Pricing::verify`]): the seconds the
    /// rate is made of.
    pub seconds: f64,
    /// Seconds the session is expected to wait for it; `seconds` unless the caller sets
    /// it (under load, [`super::Pricing::verify_wall`]).
    pub wait_seconds: f64,
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
            seconds: self.wait_seconds,
            cost: self.seconds,
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
    let seconds = verify_cost(best.1 + 1);
    TreePlan {
        keep,
        expected_tokens: expected,
        seconds,
        wait_seconds: seconds,
    }
}

/// What the draft would have to catch up on before drafting, and how it could draft.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DraftBacklog {
    /// Committed tokens an open draft session has not seen.
    pub pending: usize,
    /// The whole text, when the draft has no session in this request yet.
    pub unopened: usize,
    /// Tokens the request may still produce.
    pub remaining: usize,
    /// Rows of one lookahead (Jacobi) draft step under the request's lookahead shape, where
    /// the draft could draft that way (0 where it cannot).
    pub lookahead_rows: usize,
}
