//! Trie-cache drafting, after PIA's "lookahead" (Ant Group, KDD 2024): no draft model; the
//! continuations of the last tokens are read from tries built on the fly from the prompt
//! and from earlier outputs, and the most frequent sub-tree is verified in one forward.
//!
//! One trie per first token holds the next `branch_len` tokens of every occurrence of that
//! token. Prompt counts live in a [`PromptTrie`] owned by one request; output counts live
//! in the [`TrieCache`] every request shares (warm start). A query merges both. Contents
//! never affect correctness, only how often drafts hit.

use crate::pool::evict_least_recent;
use crate::tree::DraftTree;
use dashmap::DashMap;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Sizing of the tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrieConfig {
    /// Tokens kept after the first token of every occurrence (PIA: 12).
    pub branch_len: usize,
    /// Most tokens at the end of the text matched to find a sub-tree (PIA: 2).
    pub query_len: usize,
    /// Nodes of one first-token trie in the shared output trie before it is squeezed
    /// (PIA: 512).
    pub max_output_nodes: usize,
    /// Nodes of one first-token trie of a request's prompt (PIA: 65536).
    pub max_prompt_nodes: usize,
    /// Nodes in the whole shared trie; the least recently written tries go first.
    pub max_total_nodes: usize,
}

impl Default for TrieConfig {
    fn default() -> Self {
        Self {
            branch_len: 12,
            query_len: 2,
            max_output_nodes: 512,
            max_prompt_nodes: 65_536,
            max_total_nodes: 4_000_000,
        }
    }
}

impl TrieConfig {
    fn sane(self) -> Self {
        Self {
            branch_len: self.branch_len.max(1),
            query_len: self.query_len.clamp(1, self.branch_len.max(1)),
            max_output_nodes: self.max_output_nodes.max(2),
            max_prompt_nodes: self.max_prompt_nodes.max(2),
            max_total_nodes: self.max_total_nodes.max(self.max_output_nodes.max(2)),
        }
    }
}

#[derive(Debug, Clone)]
struct Node {
    token: u32,
    /// Occurrences whose path runs through this node.
    freq: u32,
    children: Vec<u32>,
}

/// The trie of one first token: node 0 is that token, every path below it is a branch.
#[derive(Debug, Clone)]
struct Branches {
    nodes: Vec<Node>,
    /// Logical time of the last write, for eviction.
    touched: u64,
}

/// Heap bytes of one node without its child list.
const NODE_BYTES: usize = std::mem::size_of::<Node>();

impl Branches {
    fn new(key: u32) -> Self {
        Self {
            nodes: vec![Node {
                token: key,
                freq: 0,
                children: Vec::new(),
            }],
            touched: 0,
        }
    }

    fn len(&self) -> usize {
        self.nodes.len()
    }

    fn memory_bytes(&self) -> usize {
        self.nodes
            .iter()
            .map(|n| NODE_BYTES + n.children.capacity() * 4)
            .sum()
    }

    fn child(&self, node: usize, token: u32) -> Option<usize> {
        self.nodes[node]
            .children
            .iter()
            .map(|&c| c as usize)
            .find(|&c| self.nodes[c].token == token)
    }

    /// The node that `path` reaches from the root, if every step exists.
    fn find(&self, path: &[u32]) -> Option<usize> {
        path.iter().try_fold(0, |at, &t| self.child(at, t))
    }

    /// Counts one occurrence along `path` below `from`, making missing nodes while `grow`
    /// allows; returns the last node reached and how many nodes were made.
    fn count(&mut self, from: usize, path: &[u32], grow: bool) -> (usize, usize) {
        let mut at = from;
        let mut made = 0;
        for &t in path {
            at = match self.child(at, t) {
                Some(c) => c,
                None if grow => {
                    self.nodes.push(Node {
                        token: t,
                        freq: 0,
                        children: Vec::new(),
                    });
                    let c = self.nodes.len() - 1;
                    self.nodes[at].children.push(c as u32);
                    made += 1;
                    c
                }
                None => break,
            };
            self.nodes[at].freq = self.nodes[at].freq.saturating_add(1);
        }
        (at, made)
    }

    /// Continues an occurrence whose first tokens `seen` were counted before: follows them
    /// as far as they still exist (a squeeze may have dropped their tail), counts what is
    /// missing again, then counts `more`. Returns how many nodes were made.
    fn extend(&mut self, seen: &[u32], more: &[u32]) -> usize {
        let mut at = 0;
        let mut kept = 0;
        for &t in seen {
            match self.child(at, t) {
                Some(c) => {
                    at = c;
                    kept += 1;
                }
                None => break,
            }
        }
        let (at, a) = self.count(at, &seen[kept..], true);
        let (_, b) = self.count(at, more, true);
        a + b
    }

    /// Halves every count and drops the nodes that reach zero (with their sub-trees),
    /// until at most `cap` nodes remain. Counts never grow downwards, so a dropped node's
    /// children are dropped too. Returns how many nodes went.
    fn squeeze(&mut self, cap: usize) -> usize {
        let before = self.len();
        while self.len() > cap {
            for n in self.nodes.iter_mut().skip(1) {
                n.freq /= 2;
            }
            let old = std::mem::take(&mut self.nodes);
            let mut nodes = Vec::with_capacity(old.len() / 2 + 1);
            nodes.push(Node {
                children: Vec::new(),
                ..old[0].clone()
            });
            // Breadth-first copy of the surviving nodes, re-indexed.
            let mut queue = std::collections::VecDeque::from([(0usize, 0usize)]);
            while let Some((from_old, to_new)) = queue.pop_front() {
                for &c in &old[from_old].children {
                    let c = c as usize;
                    if old[c].freq == 0 {
                        continue;
                    }
                    nodes.push(Node {
                        token: old[c].token,
                        freq: old[c].freq,
                        children: Vec::new(),
                    });
                    let id = nodes.len() - 1;
                    nodes[to_new].children.push(id as u32);
                    queue.push_back((c, id));
                }
            }
            self.nodes = nodes;
        }
        before - self.len()
    }
}

/// The prompt's occurrences, owned by one request and dropped with it.
#[derive(Debug, Default)]
pub struct PromptTrie {
    map: HashMap<u32, Branches>,
    nodes: usize,
}

impl PromptTrie {
    pub fn new(prompt: &[u32], config: &TrieConfig) -> Self {
        let config = config.sane();
        let mut trie = Self::default();
        for (i, &key) in prompt.iter().enumerate() {
            let end = prompt.len().min(i + 1 + config.branch_len);
            let b = trie.map.entry(key).or_insert_with(|| Branches::new(key));
            let grow = b.len() + (end - i - 1) <= config.max_prompt_nodes;
            b.nodes[0].freq = b.nodes[0].freq.saturating_add(1);
            b.count(0, &prompt[i + 1..end], grow);
        }
        trie.nodes = trie.map.values().map(Branches::len).sum();
        trie
    }

    /// Nodes held.
    pub fn len(&self) -> usize {
        self.nodes
    }

    pub fn is_empty(&self) -> bool {
        self.nodes == 0
    }

    pub fn memory_bytes(&self) -> usize {
        self.map.values().map(Branches::memory_bytes).sum()
    }
}

/// Output occurrences shared by every request, with per-trie node caps (squeezing) and a
/// global cap (eviction of the least recently written tries).
#[derive(Debug)]
pub struct TrieCache {
    config: TrieConfig,
    map: DashMap<u32, Branches>,
    total: AtomicUsize,
    clock: AtomicU64,
    squeezes: AtomicU64,
}

impl Default for TrieCache {
    fn default() -> Self {
        Self::new(TrieConfig::default())
    }
}

/// A sub-tree read from the tries: node `i` continues `parents[i]`, or the last token of
/// the query text when that is -1. Nodes come best first, so every parent precedes its
/// children.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrieDraft {
    pub tokens: Vec<u32>,
    pub parents: Vec<i32>,
    /// Tokens of the text end that the sub-tree was found under (0: nothing found).
    pub matched: usize,
    /// Occurrences behind each node (prompt and output counts together), and behind all
    /// of its siblings with it: `counts[i] / totals[i]` is how often the text went on
    /// with this node's token where it went on at all.
    pub counts: Vec<u64>,
    pub totals: Vec<u64>,
}

impl TrieDraft {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Hangs the draft below `tree`'s root, sharing nodes the tree already has, adding
    /// nodes only while the tree has fewer than `max_nodes`; returns the tree node of
    /// every draft node (`None` for those left out, and their descendants).
    pub fn attach(&self, tree: &mut DraftTree, max_nodes: usize) -> Vec<Option<usize>> {
        let mut at: Vec<Option<usize>> = Vec::with_capacity(self.len());
        for (&t, &p) in self.tokens.iter().zip(&self.parents) {
            let parent = if p < 0 { Some(0) } else { at[p as usize] };
            let node = parent.and_then(|p| match tree.child(p, t) {
                Some(c) => Some(c),
                None if tree.len() < max_nodes => Some(tree.add_path(p, &[t])[0]),
                None => None,
            });
            at.push(node);
        }
        at
    }
}

/// A node of the merged view of the prompt trie and the output trie.
struct Candidate {
    token: u32,
    parent: i32,
    depth: usize,
    prompt: Option<usize>,
    output: Option<usize>,
    count: u64,
    total: u64,
}

impl TrieCache {
    pub fn new(config: TrieConfig) -> Self {
        Self {
            config: config.sane(),
            map: DashMap::new(),
            total: AtomicUsize::new(0),
            clock: AtomicU64::new(0),
            squeezes: AtomicU64::new(0),
        }
    }

    pub fn config(&self) -> &TrieConfig {
        &self.config
    }

    /// Nodes held.
    pub fn len(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// First tokens with a trie.
    pub fn num_tries(&self) -> usize {
        self.map.len()
    }

    /// Times a trie went over its node cap and was squeezed.
    pub fn squeezes(&self) -> u64 {
        self.squeezes.load(Ordering::Relaxed)
    }

    /// Heap use estimated from the node count (a node, its slot in its parent's list,
    /// and a share of the per-trie overhead), without walking the tries.
    pub fn approx_bytes(&self) -> usize {
        self.len() * (NODE_BYTES + 4) + self.num_tries() * std::mem::size_of::<(u32, Branches)>()
    }

    /// Heap use in bytes (walks every trie).
    pub fn memory_bytes(&self) -> usize {
        self.map
            .iter()
            .map(|e| e.value().memory_bytes() + std::mem::size_of::<(u32, Branches)>())
            .sum()
    }

    pub fn clear(&self) {
        self.map.clear();
        self.total.store(0, Ordering::Relaxed);
    }

    /// Records a request's output: `output[..from]` was recorded by an earlier call, so
    /// occurrences that started there are only extended and every occurrence counts once.
    pub fn record(&self, output: &[u32], from: usize) {
        let l = self.config.branch_len;
        let from = from.min(output.len());
        for i in from.saturating_sub(l)..output.len() {
            let fresh = i >= from;
            let seen_end = if fresh { i + 1 } else { from.min(i + 1 + l) };
            let end = output.len().min(i + 1 + l);
            if !fresh && end <= seen_end {
                continue;
            }
            let key = output[i];
            let now = self.clock.fetch_add(1, Ordering::Relaxed);
            let (made, dropped) = {
                let mut b = self.map.entry(key).or_insert_with(|| {
                    self.total.fetch_add(1, Ordering::Relaxed);
                    Branches::new(key)
                });
                b.touched = now;
                if fresh {
                    b.nodes[0].freq = b.nodes[0].freq.saturating_add(1);
                }
                let made = b.extend(&output[i + 1..seen_end], &output[seen_end..end]);
                let dropped = if b.len() > self.config.max_output_nodes {
                    self.squeezes.fetch_add(1, Ordering::Relaxed);
                    b.squeeze(self.config.max_output_nodes)
                } else {
                    0
                };
                (made, dropped)
            };
            self.total.fetch_add(made, Ordering::Relaxed);
            self.total.fetch_sub(dropped, Ordering::Relaxed);
        }
        if self.len() > self.config.max_total_nodes {
            self.evict();
        }
    }

    /// Drops the least recently written tries until the cache is at 90% of its cap.
    fn evict(&self) {
        let cap = self.config.max_total_nodes;
        evict_least_recent(&self.map, &self.total, cap - cap / 10, |b| {
            (b.touched, b.len())
        });
    }

    /// The most frequent continuations of `text`: the longest end of `text` (at most
    /// `query_len` tokens) found in the prompt trie or the output trie, then its sub-tree
    /// best first by combined count, at most `budget` nodes and `max_depth` levels.
    pub fn draft(
        &self,
        prompt: Option<&PromptTrie>,
        text: &[u32],
        budget: usize,
        max_depth: usize,
    ) -> TrieDraft {
        if budget == 0 || max_depth == 0 {
            return TrieDraft::default();
        }
        let longest = self.config.query_len.min(text.len());
        for m in (1..=longest).rev() {
            let key = text[text.len() - m];
            let path = &text[text.len() - m + 1..];
            let p = prompt.and_then(|p| p.map.get(&key));
            let p_at = p.and_then(|b| b.find(path));
            // One guard at a time: a second read on the same shard could wait on a writer.
            let o = self.map.get(&key);
            let o_at = o.as_deref().and_then(|b| b.find(path));
            let has_children = |b: Option<&Branches>, at: Option<usize>| matches!((b, at), (Some(b), Some(n)) if !b.nodes[n].children.is_empty());
            if !has_children(p, p_at) && !has_children(o.as_deref(), o_at) {
                continue;
            }
            // Branches stop `branch_len` tokens after their first token.
            let depth_left = (self.config.branch_len + 1 - m).min(max_depth);
            let mut d = expand(p, p_at, o.as_deref(), o_at, budget, depth_left);
            d.matched = m;
            return d;
        }
        TrieDraft::default()
    }
}

/// Best-first walk over the merged children of a prompt node and an output node.
fn expand(
    p: Option<&Branches>,
    p_at: Option<usize>,
    o: Option<&Branches>,
    o_at: Option<usize>,
    budget: usize,
    max_depth: usize,
) -> TrieDraft {
    let mut walk = Merged {
        prompt: p,
        output: o,
        pending: Vec::new(),
        heap: BinaryHeap::new(),
    };
    let mut out = TrieDraft::default();
    walk.push_children(-1, 1, p_at, o_at);
    while out.len() < budget {
        let Some((_, _, i)) = walk.heap.pop() else {
            break;
        };
        let k = &walk.pending[i];
        let (depth, kp, ko) = (k.depth, k.prompt, k.output);
        out.tokens.push(k.token);
        out.parents.push(k.parent);
        out.counts.push(k.count);
        out.totals.push(k.total);
        if depth < max_depth {
            walk.push_children(out.len() as i32 - 1, depth + 1, kp, ko);
        }
    }
    out
}

/// The frontier of a best-first walk over two tries at once.
struct Merged<'a> {
    prompt: Option<&'a Branches>,
    output: Option<&'a Branches>,
    pending: Vec<Candidate>,
    /// (combined count, earliest first, index into `pending`)
    heap: BinaryHeap<(u64, Reverse<usize>, usize)>,
}

impl Merged<'_> {
    fn freq(b: Option<&Branches>, n: Option<usize>) -> u64 {
        match (b, n) {
            (Some(b), Some(n)) => b.nodes[n].freq as u64,
            _ => 0,
        }
    }

    /// Queues the children of the merged node (`p_at` in the prompt trie, `o_at` in the
    /// output trie), one candidate per distinct token.
    fn push_children(
        &mut self,
        parent: i32,
        depth: usize,
        p_at: Option<usize>,
        o_at: Option<usize>,
    ) {
        let first = self.pending.len();
        if let (Some(b), Some(n)) = (self.prompt, p_at) {
            for &c in &b.nodes[n].children {
                self.pending.push(Candidate {
                    token: b.nodes[c as usize].token,
                    parent,
                    depth,
                    prompt: Some(c as usize),
                    output: None,
                    count: 0,
                    total: 0,
                });
            }
        }
        if let (Some(b), Some(n)) = (self.output, o_at) {
            for &c in &b.nodes[n].children {
                let token = b.nodes[c as usize].token;
                match self.pending[first..].iter_mut().find(|k| k.token == token) {
                    Some(k) => k.output = Some(c as usize),
                    None => self.pending.push(Candidate {
                        token,
                        parent,
                        depth,
                        prompt: None,
                        output: Some(c as usize),
                        count: 0,
                        total: 0,
                    }),
                }
            }
        }
        let mut total = 0;
        for k in &mut self.pending[first..] {
            k.count = Self::freq(self.prompt, k.prompt) + Self::freq(self.output, k.output);
            total += k.count;
        }
        for i in first..self.pending.len() {
            let k = &mut self.pending[i];
            k.total = total;
            self.heap.push((k.count, Reverse(i), i));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(branch_len: usize, max_output_nodes: usize) -> TrieConfig {
        TrieConfig {
            branch_len,
            max_output_nodes,
            ..TrieConfig::default()
        }
    }

    /// Root-to-node token paths of a draft, for readable assertions.
    fn paths(d: &TrieDraft) -> Vec<Vec<u32>> {
        (0..d.len())
            .map(|i| {
                let mut p = vec![d.tokens[i]];
                let mut at = d.parents[i];
                while at >= 0 {
                    p.push(d.tokens[at as usize]);
                    at = d.parents[at as usize];
                }
                p.reverse();
                p
            })
            .collect()
    }

    #[test]
    fn prompt_occurrences_are_counted_and_ranked() {
        let c = config(3, 512);
        let prompt = [1, 2, 3, 4, 9, 1, 2, 3, 5, 1, 2, 7];
        let p = PromptTrie::new(&prompt, &c);
        let cache = TrieCache::new(c);
        // After "... 1": "2" thrice, then "2 3" twice; "2 7", "2 3 4", "2 3 5" once each,
        // and equal counts keep the order they were found in (shallower first).
        let d = cache.draft(Some(&p), &[8, 1], 3, 10);
        assert_eq!(d.matched, 1);
        assert_eq!(paths(&d), vec![vec![2], vec![2, 3], vec![2, 7]]);
        // The two-token match wins over the one-token one: after "9 1" only "2 3" was
        // seen, and a branch of 9 stops 3 tokens after it.
        let d = cache.draft(Some(&p), &[9, 1], 10, 10);
        assert_eq!(d.matched, 2);
        assert_eq!(paths(&d), vec![vec![2], vec![2, 3]]);
        // Unknown text finds nothing.
        assert!(cache.draft(Some(&p), &[30, 31], 10, 10).is_empty());
        assert_eq!(p.len(), p.map.values().map(Branches::len).sum::<usize>());
        assert!(p.memory_bytes() > 0);
    }

    #[test]
    fn output_is_recorded_incrementally_and_counted_once() {
        let c = config(4, 512);
        let whole = TrieCache::new(c);
        let pieces = TrieCache::new(c);
        let out = [5, 6, 7, 5, 6, 8, 5, 6, 7, 1, 2];
        whole.record(&out, 0);
        let mut from = 0;
        for end in [1, 2, 5, 6, 9, 11] {
            pieces.record(&out[..end], from);
            from = end;
        }
        assert_eq!(whole.len(), pieces.len());
        for text in [&[5][..], &[5, 6], &[6], &[7, 5], &[2]] {
            assert_eq!(
                whole.draft(None, text, 50, 50),
                pieces.draft(None, text, 50, 50),
                "after {text:?}"
            );
        }
        // "5 6" is followed by 7 twice and 8 once: 7 ranks first.
        let d = whole.draft(None, &[5, 6], 2, 50);
        assert_eq!(paths(&d), vec![vec![7], vec![8]]);
    }

    #[test]
    fn prompt_and_output_counts_add_up() {
        let c = config(2, 512);
        let p = PromptTrie::new(&[1, 2, 1, 3], &c);
        let cache = TrieCache::new(c);
        cache.record(&[1, 3, 1, 3, 1, 2], 0);
        // After 1: "2" 1 (prompt) + 1 (output) = 2; "3" 1 + 2 = 3.
        let d = cache.draft(Some(&p), &[1], 2, 1);
        assert_eq!(d.tokens, vec![3, 2]);
        let d = cache.draft(None, &[1], 2, 1);
        assert_eq!(d.tokens, vec![3, 2]);
        let only_prompt = TrieCache::new(c);
        let d = only_prompt.draft(Some(&p), &[1], 2, 1);
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn queries_stay_within_budget_and_depth_and_form_a_tree() {
        let c = config(12, 100_000);
        let cache = TrieCache::new(c);
        let out: Vec<u32> = (0..3000u32).map(|i| (i * 7919 % 13) ^ (i % 5)).collect();
        cache.record(&out, 0);
        for budget in [1, 5, 16, 64] {
            for depth in [1, 3, 12, 40] {
                let d = cache.draft(None, &out[..100], budget, depth);
                assert!(d.len() <= budget);
                assert!(!d.is_empty());
                for (i, &p) in d.parents.iter().enumerate() {
                    assert!(p < i as i32, "parents come first");
                }
                let deepest = paths(&d).iter().map(Vec::len).max().unwrap();
                assert!(deepest <= depth.min(12));
                // Siblings differ: the draft is a trie.
                for i in 0..d.len() {
                    for j in i + 1..d.len() {
                        assert!(
                            !(d.parents[i] == d.parents[j] && d.tokens[i] == d.tokens[j]),
                            "duplicate sibling"
                        );
                    }
                }
                let mut tree = DraftTree::new(out[99]);
                let at = d.attach(&mut tree, usize::MAX);
                assert_eq!(tree.len(), d.len() + 1);
                assert_eq!(at.len(), d.len());
                assert!(at.iter().all(Option::is_some));
                // Bounded: the tree stops growing at the bound, children of left-out
                // nodes are left out too, and what was attached keeps its parents.
                let mut small = DraftTree::new(out[99]);
                let bound = d.len().min(3);
                let at = d.attach(&mut small, bound);
                assert_eq!(small.len(), bound.max(1));
                for (i, node) in at.iter().enumerate() {
                    let p = d.parents[i];
                    if p >= 0 && at[p as usize].is_none() {
                        assert!(node.is_none(), "child of a left-out node");
                    }
                    if let Some(n) = node {
                        assert_eq!(small.tokens[*n], d.tokens[i]);
                    }
                }
            }
        }
    }

    #[test]
    fn squeezing_keeps_each_trie_under_its_cap() {
        let cap = 64;
        let cache = TrieCache::new(config(12, cap));
        // Key 0 followed by ever new continuations, and one frequent one.
        let mut out = Vec::new();
        for i in 0..400u32 {
            out.push(0);
            if i % 2 == 0 {
                out.extend([1, 2, 3]);
            } else {
                out.extend([100 + i, 200 + i, 300 + i]);
            }
        }
        let mut from = 0;
        for end in (7..out.len()).step_by(7).chain([out.len()]) {
            cache.record(&out[..end], from);
            from = end;
            let b = cache.map.get(&0).unwrap();
            assert!(b.len() <= cap, "trie of 0 has {} nodes", b.len());
        }
        assert!(cache.squeezes() > 0);
        // The O(1) estimate stays near the walked figure (lists over-allocate a little).
        let (approx, walked) = (cache.approx_bytes() as f64, cache.memory_bytes() as f64);
        assert!((approx / walked - 1.0).abs() < 0.5, "{approx} vs {walked}");
        let counted: usize = cache.map.iter().map(|e| e.value().len()).sum();
        assert_eq!(cache.len(), counted, "the node counter follows squeezes");
        // The frequent continuation survives squeezing and ranks first.
        let d = cache.draft(None, &[0], 3, 3);
        assert_eq!(d.tokens, vec![1, 2, 3]);
    }

    #[test]
    fn the_global_cap_evicts_whole_tries() {
        let cache = TrieCache::new(TrieConfig {
            branch_len: 4,
            max_output_nodes: 64,
            max_total_nodes: 500,
            ..TrieConfig::default()
        });
        for r in 0..50u32 {
            let out: Vec<u32> = (0..40).map(|i| r * 1000 + i).collect();
            cache.record(&out, 0);
            assert!(cache.len() <= 500, "{} nodes", cache.len());
        }
        let counted: usize = cache.map.iter().map(|e| e.value().len()).sum();
        assert_eq!(cache.len(), counted);
        // The newest output is still there.
        let d = cache.draft(None, &[49_000], 4, 4);
        assert_eq!(d.tokens, vec![49_001, 49_002, 49_003, 49_004]);
        cache.clear();
        assert!(cache.is_empty() && cache.num_tries() == 0);
    }

    #[test]
    fn prompt_trie_growth_stops_at_its_cap() {
        let prompt: Vec<u32> = (0..5000u32)
            .map(|i| if i % 2 == 0 { 0 } else { i })
            .collect();
        let p = PromptTrie::new(
            &prompt,
            &TrieConfig {
                branch_len: 3,
                max_prompt_nodes: 100,
                ..TrieConfig::default()
            },
        );
        assert!(p.map[&0].len() <= 100);
        assert_eq!(p.len(), p.map.values().map(Branches::len).sum::<usize>());
    }
}
