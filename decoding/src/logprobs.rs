//! Log-probabilities of committed tokens under the target's own distribution (its logits
//! row, before temperature or nucleus cut), with the most likely alternatives. Every
//! committed token comes from one row of one target forward, and a row does not depend on
//! which tree or batch it was computed in beyond float rounding (about 1e-6 here), so a
//! token's log-probabilities are the same whichever strategy proposed it.

/// Most alternatives a request may ask for (OpenAI's `top_logprobs` bound).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// A request's `logprobs` (alternatives per token), at most [`MAX_TOP_LOGPROBS`].
pub fn check(logprobs: Option<usize>) -> crate::Result<()> {
    match logprobs {
        Some(n) => crate::validate::at_most("logprobs", n, MAX_TOP_LOGPROBS),
        None => Ok(()),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    /// The most likely tokens of the row, most likely first, with their log-probabilities.
    pub top: Vec<(u32, f32)>,
}

/// `chosen`'s log-probability in `row` (log-softmax), and the `top` most likely entries.
pub fn of_row(row: &[f32], chosen: u32, top: usize) -> TokenLogprobs {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // In f64: 150k terms summed in f32 lose digits the alternatives' order can depend on.
    let sum: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let log_z = max as f64 + sum.ln();
    let lp = |x: f32| (x as f64 - log_z) as f32;
    let mut ids: Vec<u32> = (0..row.len() as u32).collect();
    let k = top.min(row.len());
    // Larger logit first; equal logits by smaller id, so the order is fixed.
    let order = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
    if k > 0 && k < ids.len() {
        ids.select_nth_unstable_by(k - 1, order);
    }
    ids.truncate(k);
    ids.sort_by(order);
    TokenLogprobs {
        token: chosen,
        logprob: row
            .get(chosen as usize)
            .map_or(f32::NEG_INFINITY, |&x| lp(x)),
        top: ids.into_iter().map(|i| (i, lp(row[i as usize]))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_and_the_best_alternatives() {
        let row = [1.0f32, 3.0, 2.0, 3.0];
        let z = (1f64.exp() + 2.0 * 3f64.exp() + 2f64.exp()).ln();
        let t = of_row(&row, 2, 3);
        assert!((t.logprob as f64 - (2.0 - z)).abs() < 1e-6);
        // Ties go to the smaller id; the order is most likely first.
        assert_eq!(t.top.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        let total: f64 = row.iter().map(|&x| ((x as f64) - z).exp()).sum();
        assert!((total - 1.0).abs() < 1e-9);
        assert!(of_row(&row, 1, 0).top.is_empty());
        assert_eq!(of_row(&row, 1, 10).top.len(), 4);
    }
}
