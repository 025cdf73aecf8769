//! Which new tokens of a forward each new token may attend to. Every new token always sees
//! the whole KV cache and itself; `Visibility` says what it sees among the other new tokens.
//! Positions are passed separately and explicitly, never derived from the packed index.

use crate::error::{EngineError, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Visibility {
    /// Token `i` sees new tokens `0..=i`: a plain chain (prefill, decode, draft verify).
    Causal,
    /// Token `i` sees itself and its ancestors. `parents[i]` is the index of its parent
    /// among the new tokens, or -1 for a root that hangs directly off the cache. Parents
    /// must come before their children (`parents[i] < i`), which also rules out cycles.
    Tree(Vec<i32>),
    /// Any pattern (the draft's lookahead window): `visible[i * n + j]` says whether new
    /// token `i` sees new token `j`. The diagonal must be set; nothing else is required.
    Matrix { n: usize, visible: Vec<bool> },
}

impl Visibility {
    /// Checks the structure against `n` new tokens, with a message naming the fault.
    pub fn validate(&self, n: usize) -> Result<()> {
        match self {
            Visibility::Causal => Ok(()),
            Visibility::Tree(parents) => {
                if parents.len() != n {
                    return Err(EngineError::invalid(format!(
                        "tree has {} parent entries for {n} tokens",
                        parents.len()
                    )));
                }
                for (i, &p) in parents.iter().enumerate() {
                    if p < -1 || p >= i as i32 {
                        return Err(EngineError::invalid(format!(
                            "parents[{i}] = {p}: a parent must be -1 or the index of an \
                             earlier node (0..{i})"
                        )));
                    }
                }
                Ok(())
            }
            Visibility::Matrix { n: m, visible } => {
                if *m != n || visible.len() != n * n {
                    return Err(EngineError::invalid(format!(
                        "visibility matrix is {m}x{m} with {} cells for {n} tokens",
                        visible.len()
                    )));
                }
                if let Some(i) = (0..n).find(|&i| !visible[i * n + i]) {
                    return Err(EngineError::invalid(format!(
                        "visibility matrix row {i} does not see itself"
                    )));
                }
                Ok(())
            }
        }
    }

    /// Whether new token `i` sees new token `j` (after `validate`).
    pub fn sees(&self, i: usize, j: usize) -> bool {
        match self {
            Visibility::Causal => j <= i,
            Visibility::Tree(parents) => {
                let mut at = i as i32;
                while at > j as i32 {
                    at = parents[at as usize];
                }
                at == j as i32
            }
            Visibility::Matrix { n, visible } => visible[i * n + j],
        }
    }

    /// Row-major `n x n` visibility among the new tokens.
    pub fn dense(&self, n: usize) -> Vec<bool> {
        match self {
            Visibility::Matrix { visible, .. } => visible.clone(),
            Visibility::Causal => (0..n * n).map(|c| c % n <= c / n).collect(),
            Visibility::Tree(parents) => {
                let mut out = vec![false; n * n];
                for i in 0..n {
                    out[i * n + i] = true;
                    let p = parents[i];
                    if p >= 0 {
                        // A node sees exactly what its parent sees, plus itself.
                        let (above, row) = out.split_at_mut(i * n);
                        let parent_row = &above[p as usize * n..p as usize * n + n];
                        for (dst, &src) in row[..n].iter_mut().zip(parent_row) {
                            *dst |= src;
                        }
                    }
                }
                out
            }
        }
    }

    /// Additive attention mask of shape `(n, past + n)`: 0 where visible, -inf elsewhere.
    /// `None` when no masking is needed (a causal chain of one token).
    pub fn additive_mask(&self, n: usize, past: usize) -> Option<Vec<f32>> {
        if n <= 1 {
            return None;
        }
        let width = past + n;
        let dense = self.dense(n);
        let mut mask = vec![0f32; n * width];
        for i in 0..n {
            for j in 0..n {
                if !dense[i * n + j] {
                    mask[i * width + past + j] = f32::NEG_INFINITY;
                }
            }
        }
        Some(mask)
    }
}

/// Depth-based positions for a tree hanging off a cache of `base` tokens: a root sits at
/// `base`, each child one past its parent, so siblings share a position.
pub fn tree_positions(base: u32, parents: &[i32]) -> Vec<u32> {
    let mut pos: Vec<u32> = Vec::with_capacity(parents.len());
    for &p in parents {
        let at = if p < 0 { base } else { pos[p as usize] + 1 };
        pos.push(at);
    }
    pos
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn random_tree() -> impl Strategy<Value = Vec<i32>> {
        (1usize..24).prop_flat_map(|n| {
            (0..n)
                .map(|i| (-1i32..i as i32).boxed())
                .collect::<Vec<_>>()
        })
    }

    /// Brute-force definition: j is visible from i iff j is on the parent chain of i.
    fn ancestors(parents: &[i32], i: usize) -> Vec<usize> {
        let mut out = vec![i];
        let mut at = parents[i];
        while at >= 0 {
            out.push(at as usize);
            at = parents[at as usize];
        }
        out
    }

    proptest! {
        #[test]
        fn tree_mask_matches_ancestor_definition(parents in random_tree(), past in 0usize..5) {
            let n = parents.len();
            let vis = Visibility::Tree(parents.clone());
            vis.validate(n).unwrap();
            let dense = vis.dense(n);
            let mask = vis.additive_mask(n, past);
            for i in 0..n {
                let anc = ancestors(&parents, i);
                for j in 0..n {
                    let want = anc.contains(&j);
                    prop_assert_eq!(dense[i * n + j], want);
                    prop_assert_eq!(vis.sees(i, j), want);
                    if let Some(m) = &mask {
                        prop_assert_eq!(m[i * (past + n) + past + j] == 0.0, want);
                    }
                }
                if let Some(m) = &mask {
                    for c in 0..past {
                        prop_assert_eq!(m[i * (past + n) + c], 0.0);
                    }
                }
            }
        }

        #[test]
        fn tree_positions_are_depths(parents in random_tree(), base in 0u32..100) {
            let pos = tree_positions(base, &parents);
            for (i, &p) in pos.iter().enumerate() {
                prop_assert_eq!(p, base + ancestors(&parents, i).len() as u32 - 1);
            }
        }
    }

    #[test]
    fn chain_tree_is_causal() {
        let vis = Visibility::Tree(vec![-1, 0, 1, 2]);
        assert_eq!(vis.dense(4), Visibility::Causal.dense(4));
        assert_ne!(
            Visibility::Tree(vec![-1, 0, 0]).dense(3),
            Visibility::Causal.dense(3)
        );
    }

    #[test]
    fn bad_structures_are_rejected_with_the_field() {
        let err = Visibility::Tree(vec![-1, 1])
            .validate(2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("parents[1] = 1"), "{err}");
        let err = Visibility::Tree(vec![-1, -2])
            .validate(2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("parents[1] = -2"), "{err}");
        let err = Visibility::Tree(vec![-1])
            .validate(2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("1 parent entries for 2 tokens"), "{err}");
        let m = Visibility::Matrix {
            n: 2,
            visible: vec![true, false, false, false],
        };
        let err = m.validate(2).unwrap_err().to_string();
        assert!(err.contains("row 1"), "{err}");
    }
}
