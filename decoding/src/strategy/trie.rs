//! Trie drafting (PIA): continuations of the committed text from the prompt's trie and the
//! trie of earlier outputs, and beside them the request's copy guess ([`crate::copy`]),
//! verified as one tree by the target alone. Copied nodes count as trie nodes in the
//! statistics and their accepted tokens as [`crate::TokenSource::Trie`]: both are lookups
//! in the text.

use super::Round;
use crate::copy;
use crate::generate::Loop;
use crate::stats::SpecStats;
use crate::trie::TrieCache;

/// Attaches the tries' continuations of `text` to `round`, within `room` nodes.
pub(crate) fn attach(
    round: &mut Round,
    stats: &mut SpecStats,
    trie: &TrieCache,
    state: &Loop<'_>,
    text: &[u32],
    budget: usize,
    room: usize,
) {
    let Some(p) = &state.prompt_trie else {
        return;
    };
    if budget == 0 {
        return;
    }
    let tree = &mut round.tree;
    let nodes = state
        .params
        .trie_budget
        .min(room.saturating_sub(tree.len()));
    let found = trie.draft(Some(p), text, nodes, budget);
    stats.trie_lookups += 1;
    if !found.is_empty() {
        stats.trie_hits += 1;
    }
    let before = tree.len();
    let attached = found.attach(tree, room);
    stats.trie_nodes += (tree.len() - before) as u64;
    round.from_trie = vec![false; tree.len()];
    for n in attached.into_iter().flatten() {
        round.from_trie[n] = true;
    }
}

pub(crate) fn round(
    stats: &mut SpecStats,
    trie: &TrieCache,
    state: &Loop<'_>,
    text: &[u32],
    budget: usize,
    room: usize,
) -> Round {
    let root = *text.last().expect("the text is not empty");
    let mut round = Round::chain(root, Vec::new());
    attach(&mut round, stats, trie, state, text, budget, room);
    // As many copied tokens as the match behind them was long: a long repeated context
    // earns a long guess, a short one a short guess.
    if let Some(c) = copy::find(text, budget.min(COPY_LEN)) {
        let take = c
            .matched
            .min(c.tokens.len())
            .min(room.saturating_sub(round.tree.len()));
        let before = round.tree.len();
        let nodes = round.tree.add_path(0, &c.tokens[..take]);
        round.from_trie.resize(round.tree.len(), false);
        for n in nodes {
            round.from_trie[n] = true;
        }
        stats.trie_nodes += (round.tree.len() - before) as u64;
    }
    round
}

/// The longest copy guess of the trie strategy.
const COPY_LEN: usize = 16;
