//! Which policy runs a segment of a request: each policy's rate, scored on the same text
//! ([`PolicyScores`], [`would_commit`]), and the record that picks the best.

use crate::tree::DraftTree;

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

/// Committed tokens after which a policy's segment ends and is scored, by default
/// ([`super::AutoConfig::segment_tokens`]).
pub const SEGMENT_TOKENS: usize = 32;

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

    pub(super) fn is_sane(&self) -> bool {
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
pub(super) struct PolicyRecord {
    pub(super) segments: f64,
    pub(super) scores: PolicyScores,
    /// Segments chosen since the last [`Policy::Drafting`] one.
    pub(super) since_audit: usize,
}

impl PolicyRecord {
    /// The best-scoring policy; ties go to [`Policy::Drafting`], whose score is measured
    /// rather than reconstructed. `None` before any segment scored them.
    pub(super) fn best(&self) -> Option<Policy> {
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
