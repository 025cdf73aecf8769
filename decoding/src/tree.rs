//! Verify trees: a root (the last committed token, not yet in the target's KV cache) with
//! draft paths hanging off it, de-duplicated into a trie so that shared prefixes are scored
//! once. The target computes one output token per node; walking the tree along matching
//! children gives the accepted path and the bonus token.

use crate::error::{DecodingError, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DraftTree {
    /// `tokens[0]` is the root.
    pub tokens: Vec<u32>,
    /// `parents[0] == -1`; every other parent is an earlier node.
    pub parents: Vec<i32>,
    children: Vec<Vec<usize>>,
}

/// The result of walking a scored tree.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Walk {
    /// Accepted nodes after the root, root to leaf.
    pub path: Vec<usize>,
    /// Their tokens.
    pub accepted: Vec<u32>,
    /// The target's token after the accepted path (correction or bonus).
    pub bonus: u32,
}

impl DraftTree {
    pub fn new(root: u32) -> Self {
        Self {
            tokens: vec![root],
            parents: vec![-1],
            children: vec![Vec::new()],
        }
    }

    /// Rebuilds a tree received from outside, checking its shape.
    pub fn from_parts(tokens: Vec<u32>, parents: Vec<i32>) -> Result<Self> {
        use crate::validate::FieldError;
        if tokens.is_empty() {
            return Err(FieldError::new("parents", "at least the root's -1", "no nodes").into());
        }
        if tokens.len() != parents.len() {
            return Err(FieldError::new(
                "parents",
                format!("one per token ({})", tokens.len()),
                parents.len(),
            )
            .into());
        }
        if parents[0] != -1 {
            return Err(FieldError::new(
                "parents[0]",
                "-1 (the root continues the committed text)",
                parents[0],
            )
            .into());
        }
        let mut children = vec![Vec::new(); tokens.len()];
        for (i, &p) in parents.iter().enumerate().skip(1) {
            if p < 0 || p as usize >= i {
                return Err(FieldError::new(
                    format!("parents[{i}]"),
                    "the index of an earlier node",
                    p,
                )
                .into());
            }
            children[p as usize].push(i);
        }
        Ok(Self {
            tokens,
            parents,
            children,
        })
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn child(&self, node: usize, token: u32) -> Option<usize> {
        self.children[node]
            .iter()
            .copied()
            .find(|&c| self.tokens[c] == token)
    }

    /// Adds `path` below `from`, reusing nodes that already spell a prefix of it; returns
    /// the node of every token of `path`.
    pub fn add_path(&mut self, from: usize, path: &[u32]) -> Vec<usize> {
        let mut at = from;
        let mut nodes = Vec::with_capacity(path.len());
        for &t in path {
            at = match self.child(at, t) {
                Some(c) => c,
                None => {
                    self.tokens.push(t);
                    self.parents.push(at as i32);
                    self.children.push(Vec::new());
                    self.children[at].push(self.tokens.len() - 1);
                    self.tokens.len() - 1
                }
            };
            nodes.push(at);
        }
        nodes
    }

    /// The sub-tree of the nodes marked in `keep` (the root always stays; a kept node's
    /// parent must be kept too), and each old node's new index.
    pub fn retain(&self, keep: &[bool]) -> (DraftTree, Vec<Option<usize>>) {
        let mut out = DraftTree::new(self.tokens[0]);
        let mut map = vec![None; self.len()];
        map[0] = Some(0);
        for i in 1..self.len() {
            if !keep.get(i).copied().unwrap_or(false) {
                continue;
            }
            if let Some(p) = map[self.parents[i] as usize] {
                map[i] = Some(out.add_path(p, &[self.tokens[i]])[0]);
            }
        }
        (out, map)
    }

    /// The nodes a verify would have accepted had the target's tokens after the root been
    /// `committed`: the longest path from the root spelling a prefix of it. (Beyond
    /// `committed` the target's tokens are unknown, so the path never goes further.)
    pub fn follow(&self, committed: &[u32]) -> Vec<usize> {
        let mut path = Vec::new();
        let mut at = 0;
        for &t in committed {
            match self.child(at, t) {
                Some(c) => {
                    path.push(c);
                    at = c;
                }
                None => break,
            }
        }
        path
    }

    /// Distance from the root: node `i` sits at position `root_position + depth(i)`.
    pub fn depths(&self) -> Vec<u32> {
        let mut d = vec![0u32; self.len()];
        for i in 1..self.len() {
            d[i] = d[self.parents[i] as usize] + 1;
        }
        d
    }

    /// Follows, from the root, the child whose token equals the parent's output.
    pub fn walk(&self, outputs: &[u32]) -> Result<Walk> {
        if outputs.len() != self.len() {
            return Err(DecodingError::InvalidTree(format!(
                "{} outputs for {} nodes",
                outputs.len(),
                self.len()
            )));
        }
        let mut walk = Walk::default();
        let mut at = 0;
        while let Some(c) = self.child(at, outputs[at]) {
            walk.path.push(c);
            walk.accepted.push(self.tokens[c]);
            at = c;
        }
        walk.bonus = outputs[at];
        Ok(walk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_share_prefixes() {
        let mut t = DraftTree::new(5);
        let a = t.add_path(0, &[1, 2, 3]);
        let b = t.add_path(0, &[1, 2, 4]);
        let c = t.add_path(a[2], &[9]);
        assert_eq!(a, vec![1, 2, 3]);
        assert_eq!(b, vec![1, 2, 4]);
        assert_eq!(c, vec![5]);
        assert_eq!(t.parents, vec![-1, 0, 1, 2, 2, 3]);
        assert_eq!(t.depths(), vec![0, 1, 2, 3, 3, 4]);
        let rebuilt = DraftTree::from_parts(t.tokens.clone(), t.parents.clone()).unwrap();
        assert_eq!(rebuilt, t);
    }

    #[test]
    fn retain_keeps_a_closed_sub_tree() {
        let mut t = DraftTree::new(5);
        t.add_path(0, &[1, 2, 3]);
        t.add_path(0, &[4, 6]);
        // nodes: 1:1 2:2 3:3 4:4 5:6 ; keep 1, 2, 4, 5, and 3's parent is kept but 3 is not
        let (r, map) = t.retain(&[true, true, true, false, true, true]);
        assert_eq!(r.tokens, vec![5, 1, 2, 4, 6]);
        assert_eq!(r.parents, vec![-1, 0, 1, 0, 3]);
        assert_eq!(map, vec![Some(0), Some(1), Some(2), None, Some(3), Some(4)]);
        // an orphan (parent dropped) is dropped as well
        let (r, map) = t.retain(&[true, false, true, true, false, false]);
        assert_eq!(r.tokens, vec![5]);
        assert_eq!(map, vec![Some(0), None, None, None, None, None]);
    }

    #[test]
    fn follow_matches_what_a_walk_would_accept() {
        let mut t = DraftTree::new(5);
        t.add_path(0, &[1, 2, 3]);
        t.add_path(0, &[1, 2, 4]);
        // the second branch, then a token no node spells
        assert_eq!(t.follow(&[1, 2, 4, 8, 9]), vec![1, 2, 4]);
        assert_eq!(t.follow(&[7, 1]), Vec::<usize>::new());
        // the committed tokens end before the tree does
        assert_eq!(t.follow(&[1]), vec![1]);
        assert_eq!(t.follow(&[]), Vec::<usize>::new());
    }

    #[test]
    fn walk_follows_matching_children() {
        let mut t = DraftTree::new(5);
        t.add_path(0, &[1, 2, 3]);
        t.add_path(0, &[1, 2, 4]);
        // root -> 1, node1 -> 2, node2 -> 4 (second branch), node4 -> 7 (bonus)
        let outputs = [1, 2, 4, 0, 7];
        let w = t.walk(&outputs).unwrap();
        assert_eq!(w.accepted, vec![1, 2, 4]);
        assert_eq!(w.path, vec![1, 2, 4]);
        assert_eq!(w.bonus, 7);
        let w = t.walk(&[8, 0, 0, 0, 0]).unwrap();
        assert!(w.accepted.is_empty());
        assert_eq!(w.bonus, 8);
    }

    #[test]
    fn malformed_trees_are_refused() {
        assert!(DraftTree::from_parts(vec![], vec![]).is_err());
        assert!(DraftTree::from_parts(vec![1, 2], vec![-1]).is_err());
        assert!(DraftTree::from_parts(vec![1, 2], vec![0, 0]).is_err());
        assert!(DraftTree::from_parts(vec![1, 2], vec![-1, 1]).is_err());
        assert!(DraftTree::from_parts(vec![1, 2], vec![-1, -1]).is_err());
        assert!(DraftTree::new(1).walk(&[1, 2]).is_err());
    }
}
