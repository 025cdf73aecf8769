//! Token choice for one target row: greedy, or a seeded sample made reproducible with
//! Gumbel-max noise keyed by (seed, absolute position, token). Because the noise depends on
//! the position only, not on which tree node or request shape produced the row, speculative
//! sampling with drafts gives bit for bit the tokens plain sampling gives with that seed.
//!
//! Drafts are deterministic (point masses), so "accept while the sampled token equals the
//! draft token" is the exact speculative-sampling rule (algorithm spec section 8.2): one
//! sample per branch point, then follow the matching child.

use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus mass kept, in (0, 1]; 1 keeps everything.
    pub top_p: f32,
    /// Most tokens kept; 0 keeps everything.
    pub top_k: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }

    /// Errors name `sampling.temperature` or `sampling.top_p`.
    pub fn validate(&self) -> Result<()> {
        use crate::validate::FieldError;
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(FieldError::new(
                "sampling.temperature",
                "finite and >= 0",
                self.temperature,
            )
            .into());
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(FieldError::new("sampling.top_p", "in (0, 1]", self.top_p).into());
        }
        Ok(())
    }

    /// The token for position `position` from the logits computed at `position - 1`.
    pub fn choose(&self, logits: &[f32], position: u32) -> u32 {
        if self.is_greedy() {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.temperature;
        let mut kept: Vec<u32> = (0..logits.len() as u32).collect();
        if self.top_k > 0 && self.top_k < kept.len() {
            kept.select_nth_unstable_by(self.top_k - 1, |&a, &b| {
                logits[b as usize].total_cmp(&logits[a as usize])
            });
            kept.truncate(self.top_k);
        }
        if self.top_p < 1.0 {
            kept.sort_unstable_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
            let max = logits[kept[0] as usize] * inv_t;
            let weights: Vec<f64> = kept
                .iter()
                .map(|&t| ((logits[t as usize] * inv_t - max) as f64).exp())
                .collect();
            let total: f64 = weights.iter().sum();
            let mut mass = 0.0;
            let mut cut = kept.len();
            for (i, w) in weights.iter().enumerate() {
                mass += w / total;
                if mass >= self.top_p as f64 {
                    cut = i + 1;
                    break;
                }
            }
            kept.truncate(cut);
        }
        let mut best = (f64::NEG_INFINITY, kept[0]);
        for &t in &kept {
            let score = (logits[t as usize] * inv_t) as f64 + gumbel(self.seed, position, t);
            if score > best.0 {
                best = (score, t);
            }
        }
        best.1
    }
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn mix(mut h: u64) -> u64 {
    h = h.wrapping_add(0x9E37_79B9_7F4A_7C15);
    h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^ (h >> 31)
}

/// Standard Gumbel noise from a counter-based hash of (seed, position, token).
fn gumbel(seed: u64, position: u32, token: u32) -> f64 {
    let h = mix(mix(seed ^ ((position as u64) << 32)) ^ token as u64);
    // 53 random bits, strictly inside (0, 1)
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -(-u.ln()).ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax() {
        let p = SamplingParams::greedy();
        assert_eq!(p.choose(&[0.1, 3.0, 2.0], 5), 1);
    }

    #[test]
    fn samples_are_keyed_by_seed_and_position() {
        let p = SamplingParams {
            temperature: 1.0,
            seed: 7,
            ..SamplingParams::greedy()
        };
        let logits = vec![0.0f32; 50];
        assert_eq!(p.choose(&logits, 3), p.choose(&logits, 3));
        let picks: std::collections::HashSet<u32> =
            (0..40).map(|pos| p.choose(&logits, pos)).collect();
        assert!(picks.len() > 10, "uniform logits should spread: {picks:?}");
        // Another seed draws another sequence; the same seed the same one.
        let run = |seed| -> Vec<u32> {
            let q = SamplingParams { seed, ..p };
            (0..40).map(|pos| q.choose(&logits, pos)).collect()
        };
        assert_eq!(run(7), run(7));
        for other in [8, 9, 1 << 40] {
            let same = run(7)
                .iter()
                .zip(run(other))
                .filter(|(a, b)| **a == *b)
                .count();
            assert!(
                same < 10,
                "seed {other} repeats seed 7 at {same} of 40 positions"
            );
        }
    }

    #[test]
    fn frequencies_follow_the_softmax() {
        let p = |seed| SamplingParams {
            temperature: 1.0,
            seed,
            ..SamplingParams::greedy()
        };
        let logits = [0.0f32, (3.0f32).ln()]; // probabilities 1/4, 3/4
        let n = 20_000;
        let ones = (0..n).filter(|&s| p(s).choose(&logits, 1) == 1).count();
        let f = ones as f64 / n as f64;
        assert!((f - 0.75).abs() < 0.02, "frequency {f}");
    }

    #[test]
    fn top_k_and_top_p_restrict_the_choice() {
        let logits = [5.0f32, 4.9, 0.0, 0.0, 0.0];
        for seed in 0..200 {
            let k = SamplingParams {
                temperature: 1.0,
                top_k: 2,
                seed,
                ..SamplingParams::greedy()
            };
            assert!(k.choose(&logits, 0) < 2);
            let nucleus = SamplingParams {
                temperature: 1.0,
                top_p: 0.5,
                seed,
                ..SamplingParams::greedy()
            };
            assert_eq!(nucleus.choose(&logits, 0), 0);
        }
    }

    /// Top-k and top-p keep the right tokens and draw them with the right frequencies: the
    /// temperature's softmax renormalized over the kept ones. The reference is computed here
    /// from the definitions (the k most likely; the fewest most likely whose mass reaches p).
    #[test]
    fn top_k_and_top_p_draw_from_the_renormalized_softmax() {
        let logits = [1.0f32, 3.0, 0.5, 2.5, -1.0, 2.0];
        let t = 0.8f64;
        let probs = |kept: &[usize]| -> Vec<f64> {
            let w: Vec<f64> = (0..logits.len())
                .map(|i| match kept.contains(&i) {
                    true => (logits[i] as f64 / t).exp(),
                    false => 0.0,
                })
                .collect();
            let total: f64 = w.iter().sum();
            w.iter().map(|x| x / total).collect()
        };
        // By likelihood: 1, 3, 5, 0, 2, 4.
        let order = [1usize, 3, 5, 0, 2, 4];
        let full = probs(&order);
        let nucleus = |p: f64| {
            let mut mass = 0.0;
            let n = order.iter().take_while(|&&i| {
                let short = mass < p;
                mass += full[i];
                short
            });
            n.count()
        };
        let cases = [
            (3, 1.0, order[..3].to_vec()),
            (0, 0.75, order[..nucleus(0.75)].to_vec()),
            (0, 0.95, order[..nucleus(0.95)].to_vec()),
            (4, 0.9, order[..4.min(nucleus(0.9))].to_vec()),
            (1, 1.0, vec![1]),
        ];
        for (top_k, top_p, kept) in cases {
            let want = probs(&kept);
            let n = 40_000u64;
            let mut seen = [0u64; 6];
            for draw in 0..n {
                let q = SamplingParams {
                    temperature: t as f32,
                    top_k,
                    top_p,
                    seed: draw / 8,
                };
                seen[q.choose(&logits, (draw % 8) as u32) as usize] += 1;
            }
            for (i, (&count, &p)) in seen.iter().zip(&want).enumerate() {
                let f = count as f64 / n as f64;
                // Five standard deviations of a frequency over n draws.
                let sd = (p * (1.0 - p) / n as f64).sqrt();
                assert!(
                    (f - p).abs() <= 5.0 * sd + 1e-9,
                    "top_k {top_k} top_p {top_p} token {i}: frequency {f:.4}, probability {p:.4}"
                );
                if p == 0.0 {
                    assert_eq!(count, 0, "top_k {top_k} top_p {top_p}: token {i} drawn");
                }
            }
        }
    }

    #[test]
    fn bad_parameters_are_refused() {
        let bad = SamplingParams {
            top_p: 0.0,
            ..SamplingParams::greedy()
        };
        assert!(bad.validate().is_err());
        let bad = SamplingParams {
            temperature: f32::NAN,
            ..SamplingParams::greedy()
        };
        assert!(bad.validate().is_err());
    }
}
