//! Per-request speculation statistics, counted the way vLLM reports them: mean accepted
//! length includes the bonus token, so plain decoding scores exactly 1.

use crate::backend::{DraftOutcome, ServerTiming};
use crate::params::Strategy;

#[derive(Debug, Clone, PartialEq, Default)]
pub struct SpecStats {
    pub strategy: Option<Strategy>,
    /// Tokens returned to the caller.
    pub committed: u64,
    /// Verify rounds (target forwards after the prefill).
    pub target_forwards: u64,
    pub draft_forwards: u64,
    pub draft_calls: u64,
    /// Draft tokens sent for verification and how many the target accepted.
    pub drafted: u64,
    pub accepted: u64,
    /// `accepted_at[i]`: rounds whose draft token `i` was accepted.
    pub accepted_at: Vec<u64>,
    /// `offered_at[i]`: rounds that drafted a token `i`.
    pub offered_at: Vec<u64>,
    /// Tokens accepted from pool candidate suffixes, and rounds where any was.
    pub candidate_tokens: u64,
    pub candidate_rounds: u64,
    /// Candidate look-ups in the pool and those that found phrases.
    pub pool_lookups: u64,
    pub pool_hits: u64,
    /// Draft tokens that came from pool phrases inside the draft's lookahead.
    pub draft_phrase_hits: u64,
    /// Tree nodes verified in all.
    pub tree_nodes: u64,
    /// Trie look-ups, those that found a sub-tree, the nodes the trie added to verify
    /// trees, and the accepted tokens the trie had proposed (also those it shared with the
    /// draft chain).
    pub trie_lookups: u64,
    pub trie_hits: u64,
    pub trie_nodes: u64,
    pub trie_accepted: u64,
    /// Nodes of this request's prompt trie, and of the shared output trie at the end.
    pub trie_prompt_nodes: u64,
    pub trie_cache_nodes: u64,
    /// Estimated heap bytes of the shared output trie at the end.
    pub trie_cache_bytes: u64,
    /// `auto` only: tokens committed under each policy, in `Policy::ALL` order.
    pub policy_tokens: [u64; 3],
    /// Overlapped drafting: calls whose work the next round used, and calls taken back
    /// (of which cancelled: stopped at the verdict, not waited for).
    pub overlap_used: u64,
    pub overlap_discarded: u64,
    pub overlap_cancelled: u64,
    /// Set when the draft was missing or failed and the request went on target-only.
    pub draft_fallback: Option<String>,
    pub prefill_s: f64,
    pub draft_s: f64,
    pub verify_s: f64,
    /// Caller wall time minus the servers' own time, over all calls.
    pub network_s: f64,
    pub total_s: f64,
    /// Every model call of the request, in order, for pricing the run with a cost table
    /// afterwards (`ouro-bench --cost-model`).
    pub calls: Vec<ModelCall>,
}

/// What one model call of a request ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelCall {
    /// The target's prefill: the prompt's tokens but the last.
    Prefill { rows: u32 },
    /// A verify of a tree of `rows` nodes, `context` tokens already in the target's cache.
    Verify { rows: u32, context: u32 },
    /// A draft call: `forwards` draft forwards of `rows` rows in all, `caught_up` of them
    /// committed text the draft had not seen.
    Draft {
        forwards: u32,
        rows: u32,
        caught_up: u32,
    },
    /// A draft session opened on `rows` tokens of text (the draft's prefill).
    DraftOpen { rows: u32 },
    /// The lookahead baseline's call on its target host: `forwards` target forwards of
    /// `rows` rows in all, `caught_up` of them committed text, at `context` tokens.
    Lookahead {
        forwards: u32,
        rows: u32,
        caught_up: u32,
        context: u32,
    },
}

impl ModelCall {
    /// A draft call's rows beyond one a forward and the caught-up ones: a lookahead
    /// step's window and phrases (0 for plain drafts and other calls).
    pub fn extra_draft_rows(&self) -> u32 {
        match *self {
            ModelCall::Draft {
                forwards,
                rows,
                caught_up,
            } => rows.saturating_sub(forwards + caught_up),
            _ => 0,
        }
    }
}

impl SpecStats {
    pub fn new(strategy: Strategy) -> Self {
        Self {
            strategy: Some(strategy),
            ..Self::default()
        }
    }

    /// Committed tokens per target forward (bonus included).
    pub fn mean_accepted_length(&self) -> f64 {
        if self.target_forwards == 0 {
            return 0.0;
        }
        self.committed as f64 / self.target_forwards as f64
    }

    pub fn acceptance_rate(&self) -> f64 {
        if self.drafted == 0 {
            return 0.0;
        }
        self.accepted as f64 / self.drafted as f64
    }

    /// Acceptance by draft position: accepted / offered at each index.
    pub fn acceptance_by_position(&self) -> Vec<f64> {
        self.accepted_at
            .iter()
            .zip(&self.offered_at)
            .map(|(&a, &o)| if o == 0 { 0.0 } else { a as f64 / o as f64 })
            .collect()
    }

    pub fn fall_back(&mut self, why: String) {
        tracing::warn!("continuing target-only: {why}");
        self.draft_fallback.get_or_insert(why);
    }

    /// A draft session opened on `rows` tokens of text.
    pub(crate) fn add_draft_open(&mut self, rows: usize) {
        self.calls.push(ModelCall::DraftOpen { rows: rows as u32 });
    }

    pub(crate) fn add_draft(&mut self, o: &DraftOutcome, server: ServerTiming, wall: f64) {
        self.draft_calls += 1;
        self.draft_forwards += o.forwards as u64;
        self.draft_phrase_hits += o.phrase_hits as u64;
        self.draft_s += wall;
        self.network_s += (wall - server.total).max(0.0);
        self.calls.push(ModelCall::Draft {
            forwards: o.forwards,
            rows: o.rows,
            caught_up: o.caught_up,
        });
    }

    /// A verify of `nodes` nodes whose root is token `context` (0-based) of the text.
    pub(crate) fn add_verify(
        &mut self,
        server: ServerTiming,
        wall: f64,
        nodes: usize,
        context: usize,
    ) {
        self.target_forwards += 1;
        self.tree_nodes += nodes as u64;
        self.calls.push(ModelCall::Verify {
            rows: nodes as u32,
            context: context as u32,
        });
        self.verify_s += wall;
        self.network_s += (wall - server.total).max(0.0);
    }

    pub(crate) fn add_acceptance(
        &mut self,
        drafted: usize,
        on_chain: usize,
        from_candidates: usize,
    ) {
        self.drafted += drafted as u64;
        self.accepted += on_chain as u64;
        if self.offered_at.len() < drafted {
            self.offered_at.resize(drafted, 0);
            self.accepted_at.resize(drafted, 0);
        }
        for i in 0..drafted {
            self.offered_at[i] += 1;
            if i < on_chain {
                self.accepted_at[i] += 1;
            }
        }
        if from_candidates > 0 {
            self.candidate_tokens += from_candidates as u64;
            self.candidate_rounds += 1;
        }
    }

    /// Target-only lookahead: every host forward is a target forward; `context` tokens
    /// were committed before the call.
    pub(crate) fn add_lookahead(
        &mut self,
        o: &DraftOutcome,
        server: ServerTiming,
        wall: f64,
        context: usize,
    ) {
        self.target_forwards += o.forwards as u64;
        self.calls.push(ModelCall::Lookahead {
            forwards: o.forwards,
            rows: o.rows,
            caught_up: o.caught_up,
            context: context as u32,
        });
        self.draft_phrase_hits += o.phrase_hits as u64;
        self.verify_s += wall;
        self.network_s += (wall - server.total).max(0.0);
    }
}
