//! Lookahead (Jacobi) decoding inside one model, as the draft runs it (algorithm spec
//! section 7) and as the target-only lookahead baseline runs it.
//!
//! One step is one forward over: the pending committed tokens (the last of them, `u`, is
//! the current token), a trie of pool phrases keyed by `u` (the verification branch), and
//! a 2-D window of Jacobi guesses (the lookahead branch). The step emits the model's own
//! greedy tokens: `next = argmax at u`, extended along any phrase that agrees with the
//! model. The window only feeds the pool, so the output equals plain greedy decoding.

use crate::error::{DecodingError, Result};
use crate::pool::Ngram;
use crate::tree::DraftTree;
use engine::Visibility;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LookaheadParams {
    /// n-gram size `N`; phrases have `N - 1` tokens and the window `N - 2` Jacobi levels.
    pub level: usize,
    /// Window width `W`.
    pub window: usize,
    /// Most pool phrases verified per step (`G`).
    pub guess: usize,
}

impl Default for LookaheadParams {
    fn default() -> Self {
        Self {
            level: 7,
            window: 20,
            guess: 20,
        }
    }
}

impl LookaheadParams {
    pub fn phrase_len(&self) -> usize {
        self.level - 1
    }

    /// Errors name `lookahead.level`, `lookahead.window` or `lookahead.guess`.
    pub fn validate(&self) -> Result<()> {
        use crate::validate::{at_most, in_range, limits, within};
        let checked = in_range("level", self.level, limits::LEVELS)
            .and_then(|_| in_range("window", self.window, 1..=limits::MAX_WINDOW))
            .and_then(|_| at_most("guess", self.guess, limits::MAX_GUESS));
        within(checked, "lookahead")
    }

    /// Rows a steady-state step adds besides pending tokens and phrases.
    pub fn window_rows(&self) -> usize {
        (self.level - 1) * self.window
    }
}

/// The Jacobi window: `levels[0]` continues `u` (row 0 of the grid), `levels[l]` holds the
/// level-`l` guesses. Column `i` of level `l >= 1` sits at position `p + l + i`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    params: LookaheadParams,
    levels: Vec<Vec<u32>>,
}

impl Window {
    /// Starts a window with `W + N - 3` tokens drawn from `context` by a fixed-seed
    /// generator, so runs are reproducible.
    pub fn new(params: LookaheadParams, context: &[u32], seed: u64) -> Self {
        let n = params.window + params.level - 3;
        let mut state = seed ^ 0xA5A5_5A5A;
        let row0 = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                match context.len() {
                    0 => 0,
                    len => context[((state >> 33) % len as u64) as usize],
                }
            })
            .collect();
        Self {
            params,
            levels: vec![row0],
        }
    }

    pub fn params(&self) -> LookaheadParams {
        self.params
    }

    /// Whether every level is filled and the window harvests n-grams.
    pub fn is_steady(&self) -> bool {
        self.levels.len() == self.params.level - 1
    }

    pub fn rows(&self) -> usize {
        self.levels.iter().map(Vec::len).sum()
    }
}

/// One planned forward: inputs plus where each part sits among the rows.
#[derive(Debug, Clone)]
pub struct StepPlan {
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    pub visibility: Visibility,
    /// Phrase trie rooted at `u`; node `i > 0` is row `pending + i - 1`.
    pub tree: DraftTree,
    pending: usize,
    /// First row of each window level.
    level_rows: Vec<usize>,
}

impl StepPlan {
    /// The rows whose next token the step reads: `u`'s and every row after it. The
    /// pending rows before `u` (a prefill, a catch-up) only fill the cache, and skipping
    /// their output head saves a head-sized matmul per row.
    pub fn output_rows(&self) -> std::ops::Range<usize> {
        self.pending - 1..self.tokens.len()
    }

    fn tree_row(&self, node: usize) -> usize {
        if node == 0 {
            self.pending - 1
        } else {
            self.pending + node - 1
        }
    }
}

/// What a step produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepResult {
    /// The model's greedy tokens after `u`: accepted phrase tokens, then the next token.
    pub emitted: Vec<u32>,
    /// Rows (relative to the step) whose KV entries stay: the pending tokens and the
    /// accepted phrase tokens, ascending.
    pub keep_rows: Vec<usize>,
    /// n-grams the window harvested this step.
    pub harvested: Vec<Ngram>,
    /// Phrase tokens accepted (emitted beyond the plain next token).
    pub phrase_hits: usize,
}

/// Plans a step. `pending` are the committed tokens without KV entries (at least `u`),
/// the first of them at `first_position`. `phrases` must have the window's phrase length.
pub fn plan_step(
    pending: &[u32],
    first_position: u32,
    window: Option<&Window>,
    phrases: &[Vec<u32>],
) -> Result<StepPlan> {
    let Some(&u) = pending.last() else {
        return Err(DecodingError::invalid(
            "a lookahead step needs a current token",
        ));
    };
    let e = pending.len();
    let p = first_position + e as u32 - 1;
    let mut tree = DraftTree::new(u);
    for ph in phrases {
        tree.add_path(0, ph);
    }
    let depths = tree.depths();
    let mut tokens = pending.to_vec();
    let mut positions: Vec<u32> = (0..e as u32).map(|i| first_position + i).collect();
    tokens.extend(&tree.tokens[1..]);
    positions.extend(depths[1..].iter().map(|d| p + d));
    let mut level_rows = Vec::new();
    if let Some(w) = window {
        for (l, level) in w.levels.iter().enumerate() {
            level_rows.push(tokens.len());
            tokens.extend(level);
            // row 0 (L0) starts one column right of u
            let offset = if l == 0 { 1 } else { l as u32 };
            positions.extend((0..level.len() as u32).map(|i| p + offset + i));
        }
    }
    let visibility = if let Some(w) = window {
        window_visibility(&tokens, e, &tree, &w.levels, &level_rows)
    } else {
        // pending chain, then the phrase trie under its last token
        let mut parents: Vec<i32> = (0..e as i32).map(|i| i - 1).collect();
        for (i, &par) in tree.parents.iter().enumerate().skip(1) {
            let row = if par == 0 {
                e - 1
            } else {
                e + par as usize - 1
            };
            debug_assert_eq!(parents.len(), e + i - 1);
            parents.push(row as i32);
        }
        Visibility::Tree(parents)
    };
    Ok(StepPlan {
        tokens,
        positions,
        visibility,
        tree,
        pending: e,
        level_rows,
    })
}

/// Pending chain, phrase trie under `u`, then the window's Jacobi diagonals.
fn window_visibility(
    tokens: &[u32],
    e: usize,
    tree: &DraftTree,
    levels: &[Vec<u32>],
    level_rows: &[usize],
) -> Visibility {
    let n = tokens.len();
    let mut v = vec![false; n * n];
    let mut see = |i: usize, j: usize| v[i * n + j] = true;
    for i in 0..e {
        for j in 0..=i {
            see(i, j);
        }
    }
    for node in 1..tree.len() {
        let row = e + node - 1;
        (0..e).for_each(|j| see(row, j));
        let mut a = node;
        while a != 0 {
            see(row, e + a - 1);
            a = tree.parents[a] as usize;
        }
    }
    // row 0 of the grid: u then L0, causal
    let l0 = level_rows[0];
    for i in 0..levels[0].len() {
        let row = l0 + i;
        (0..e).for_each(|j| see(row, j));
        (l0..=row).for_each(|j| see(row, j));
    }
    for l in 1..levels.len() {
        for i in 0..levels[l].len() {
            let row = level_rows[l] + i;
            (0..e).for_each(|j| see(row, j));
            // row-0 columns 1..=i are L0[0..i]
            (0..i.min(levels[0].len())).for_each(|c| see(row, l0 + c));
            for m in 1..l {
                if i < levels[m].len() {
                    see(row, level_rows[m] + i);
                }
            }
            see(row, row);
        }
    }
    Visibility::Matrix { n, visible: v }
}

/// Turns a step's argmax over [`StepPlan::output_rows`] into emitted tokens, the KV rows
/// to keep and (when a window ran) harvested n-grams, and advances the window by one
/// column.
pub fn finish_step(
    plan: &StepPlan,
    argmax: &[u32],
    window: Option<&mut Window>,
) -> Result<StepResult> {
    let rows = plan.output_rows();
    if argmax.len() != rows.len() {
        return Err(DecodingError::invalid(format!(
            "{} outputs for a step reading {} rows",
            argmax.len(),
            rows.len()
        )));
    }
    let first = rows.start;
    let outputs: Vec<u32> = (0..plan.tree.len())
        .map(|node| argmax[plan.tree_row(node) - first])
        .collect();
    let walk = plan.tree.walk(&outputs)?;
    let mut keep_rows: Vec<usize> = (0..plan.pending).collect();
    keep_rows.extend(walk.path.iter().map(|&n| plan.tree_row(n)));
    let mut emitted = walk.accepted.clone();
    emitted.push(walk.bonus);
    let mut result = StepResult {
        emitted,
        keep_rows,
        harvested: Vec::new(),
        phrase_hits: walk.accepted.len(),
    };
    if let Some(w) = window {
        let out_of = |l: usize| -> Vec<u32> {
            let start = plan.level_rows[l] - first;
            argmax[start..start + w.levels[l].len()].to_vec()
        };
        let top = w.levels.len() - 1;
        if !w.is_steady() {
            let mut next = out_of(top);
            for level in w.levels.iter_mut() {
                if !level.is_empty() {
                    level.remove(0);
                }
            }
            if top > 0 && !next.is_empty() {
                next.remove(0);
            }
            w.levels.push(next);
        } else {
            let new = out_of(top);
            let u = plan.tree.tokens[0];
            for (i, &last) in new.iter().enumerate() {
                let key = if i == 0 { u } else { w.levels[0][i - 1] };
                let mut phrase: Vec<u32> = w.levels[1..].iter().map(|lv| lv[i]).collect();
                phrase.push(last);
                result.harvested.push(Ngram { key, phrase });
            }
            let mut shifted = w.levels[1][1..].to_vec();
            std::mem::swap(&mut w.levels[0], &mut shifted);
            for l in 1..top {
                w.levels[l] = w.levels[l + 1].clone();
            }
            w.levels[top] = new;
        }
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(level: usize, window: usize) -> LookaheadParams {
        LookaheadParams {
            level,
            window,
            guess: window,
        }
    }

    #[test]
    fn window_warms_up_to_the_steady_shape() {
        for (n, w) in [(3, 1), (3, 4), (5, 3), (7, 20)] {
            let mut win = Window::new(params(n, w), &[1, 2, 3], 0);
            assert_eq!(win.levels[0].len(), w + n - 3);
            for _ in 0..n - 2 {
                let plan = plan_step(&[9], 10, Some(&win), &[]).unwrap();
                let out: Vec<u32> = plan.output_rows().map(|r| r as u32).collect();
                let r = finish_step(&plan, &out, Some(&mut win)).unwrap();
                assert_eq!(r.emitted.len(), 1);
                assert!(r.harvested.is_empty());
            }
            assert!(win.is_steady());
            assert_eq!(win.levels[0].len(), w - 1, "N={n} W={w}");
            for l in 1..n - 1 {
                assert_eq!(win.levels[l].len(), w, "N={n} W={w} level {l}");
            }
            // steady steps keep the shape and harvest one n-gram per column
            let plan = plan_step(&[9], 11, Some(&win), &[]).unwrap();
            assert_eq!(plan.tokens.len(), 1 + win.params().window_rows() - 1);
            let out: Vec<u32> = plan.output_rows().map(|r| 100 + r as u32).collect();
            let r = finish_step(&plan, &out, Some(&mut win)).unwrap();
            assert_eq!(r.harvested.len(), w);
            assert!(r.harvested.iter().all(|g| g.phrase.len() == n - 1));
            assert_eq!(win.levels[0].len(), w - 1);
            assert!(win.levels[1..].iter().all(|l| l.len() == w));
        }
    }

    /// Each window row must see exactly the contiguous path of positions p..=its own: one
    /// Jacobi diagonal, checked against the brute-force definition.
    #[test]
    fn window_rows_see_one_diagonal() {
        let mut win = Window::new(params(5, 4), &[1, 2, 3, 4, 5], 3);
        for _ in 0..3 {
            let plan = plan_step(&[7, 8], 20, Some(&win), &[]).unwrap();
            let out = vec![0; plan.output_rows().len()];
            finish_step(&plan, &out, Some(&mut win)).unwrap();
        }
        let plan = plan_step(&[7, 8], 20, Some(&win), &[vec![1, 2, 3, 4]]).unwrap();
        let n = plan.tokens.len();
        let Visibility::Matrix { visible, .. } = &plan.visibility else {
            panic!("window steps use a matrix");
        };
        let p = 21u32; // position of u
        for &start in &plan.level_rows {
            for row in start..n {
                if plan.level_rows.iter().all(|&s| s > row) {
                    continue;
                }
                let pos = plan.positions[row];
                let seen: Vec<u32> = (0..n)
                    .filter(|&j| visible[row * n + j])
                    .map(|j| plan.positions[j])
                    .collect();
                // pending 7 (at p-1) and u (at p) plus p+1..=pos, each once
                let mut want: Vec<u32> = (p - 1..=pos).collect();
                want.sort_unstable();
                let mut got = seen.clone();
                got.sort_unstable();
                assert_eq!(got, want, "row {row}");
            }
        }
        // phrase rows see the pending tokens and their own prefix only
        let first_phrase_row = 2;
        for m in 0..4 {
            let row = first_phrase_row + m;
            let seen: Vec<usize> = (0..n).filter(|&j| visible[row * n + j]).collect();
            let want: Vec<usize> = (0..2).chain(first_phrase_row..=row).collect();
            assert_eq!(seen, want);
        }
    }

    #[test]
    fn phrase_agreement_is_emitted_and_kept() {
        let plan = plan_step(&[4, 5], 0, None, &[vec![6, 7, 8], vec![6, 9, 1]]).unwrap();
        // rows: 4 5 | 6 7 8 9 1 (trie shares the leading 6)
        assert_eq!(plan.tokens, vec![4, 5, 6, 7, 8, 9, 1]);
        assert_eq!(plan.positions, vec![0, 1, 2, 3, 4, 3, 4]);
        // model: after 5 comes 6, after 6 comes 9, after 9 comes 2 (phrase says 1); the
        // pending row before `u` has no output
        assert_eq!(plan.output_rows(), 1..7);
        let out = vec![6, 9, 0, 0, 2, 0];
        let r = finish_step(&plan, &out, None).unwrap();
        assert_eq!(r.emitted, vec![6, 9, 2]);
        assert_eq!(r.keep_rows, vec![0, 1, 2, 5]);
        assert_eq!(r.phrase_hits, 2);
    }
}
