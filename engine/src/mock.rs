//! A model with no weights whose every output is a deterministic hash of exactly what the
//! token was allowed to see: its own token and position, and the states of the entries
//! visible to it (the cache plus the visible new tokens). Any mistake in masks, positions,
//! truncation or compaction changes a hash, so decoding algorithms can be checked bit for
//! bit against plain greedy, independent of floating point.

use crate::api::{ForwardOutput, KvState, LanguageModel, ModelInfo, SeqInput, check_keep};
use crate::error::Result;

#[derive(Debug, Clone)]
pub struct MockModel {
    info: ModelInfo,
    /// Fraction (0..=1) of positions whose favourite next token depends on the previous
    /// token only, so that text repeats and phrase pools get hits. The rest follow the
    /// full-context hash. Either way the logits carry the full-context hash too.
    predictability: f64,
    seed: u64,
}

/// One cached entry: what a real KV row encodes (its token, position and context).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    position: u32,
    state: u64,
}

#[derive(Debug, Clone, Default)]
pub struct MockCache {
    entries: Vec<Entry>,
    max_len: usize,
}

impl KvState for MockCache {
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn truncate(&mut self, n: usize) -> Result<()> {
        self.entries.truncate(n);
        Ok(())
    }

    fn keep(&mut self, base: usize, rows: &[usize]) -> Result<()> {
        check_keep(self.entries.len(), base, rows)?;
        let kept: Vec<Entry> = rows.iter().map(|&r| self.entries[r]).collect();
        self.entries.truncate(base);
        self.entries.extend(kept);
        Ok(())
    }

    fn memory_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<Entry>()
    }

    /// As a `Vec` grows: to what is needed, or double, whichever is more.
    fn memory_bytes_after(&self, extra: usize) -> usize {
        let (needed, cap) = (self.entries.len() + extra, self.entries.capacity());
        let grown = if needed <= cap {
            cap
        } else {
            needed.max(2 * cap)
        };
        grown * std::mem::size_of::<Entry>()
    }
}

fn mix(mut h: u64) -> u64 {
    // splitmix64 finaliser
    h = h.wrapping_add(0x9E37_79B9_7F4A_7C15);
    h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^ (h >> 31)
}

impl MockModel {
    pub fn new(vocab_size: usize, max_position: usize, predictability: f64, seed: u64) -> Self {
        Self {
            info: ModelInfo {
                name: format!("mock-v{vocab_size}"),
                vocab_size,
                head_vocab: vocab_size,
                max_position,
                num_layers: 1,
            },
            predictability: predictability.clamp(0.0, 1.0),
            seed,
        }
    }

    /// Order-independent combination of the visible entries (attention is a set operation
    /// once positions are encoded), then the token itself.
    fn state(&self, token: u32, position: u32, visible: &[Entry]) -> u64 {
        let mut ctx: Vec<(u32, u64)> = visible.iter().map(|e| (e.position, e.state)).collect();
        ctx.sort_unstable();
        let mut h = mix(self.seed ^ 0x5EED);
        for (p, s) in ctx {
            h = mix(h ^ mix((p as u64) << 32 ^ s));
        }
        mix(h ^ ((position as u64) << 32 | token as u64))
    }

    /// Logits of a row: a preferred token gets a clear margin, all others small noise.
    fn logits(&self, token: u32, state: u64) -> Vec<f32> {
        let v = self.info.vocab_size as u64;
        let follows_last =
            (mix(state ^ 0xC0FFEE) % 1_000_000) as f64 / 1_000_000.0 < self.predictability;
        let favourite = if follows_last {
            mix(self.seed ^ token as u64 ^ 0xF00D) % v
        } else {
            mix(state) % v
        };
        (0..v)
            .map(|t| {
                let noise = (mix(state ^ t.wrapping_mul(0x100_0000_01B3)) % 1000) as f32 / 1000.0;
                if t == favourite { 4.0 + noise } else { noise }
            })
            .collect()
    }
}

impl LanguageModel for MockModel {
    type Cache = MockCache;

    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn new_cache(&self) -> MockCache {
        MockCache {
            entries: Vec::new(),
            max_len: self.info.max_position,
        }
    }

    fn forward_batch(
        &self,
        batch: &mut [(&mut MockCache, SeqInput<'_>)],
    ) -> Result<Vec<ForwardOutput>> {
        for (cache, input) in batch.iter() {
            input.validate(self.info.vocab_size, self.info.max_position)?;
            let needed = cache.entries.len() + input.tokens.len();
            if needed > cache.max_len {
                return Err(crate::EngineError::ContextOverflow {
                    needed,
                    limit: cache.max_len,
                });
            }
        }
        let mut outs = Vec::with_capacity(batch.len());
        for (cache, input) in batch.iter_mut() {
            let n = input.tokens.len();
            let dense = input.visibility.dense(n);
            let mut states: Vec<u64> = Vec::with_capacity(n);
            for i in 0..n {
                // An earlier visible token contributes the state it will have in the cache,
                // as it would after sequential decoding; a later one (only possible in a
                // general matrix) contributes its bare token and position.
                let mut visible = cache.entries.clone();
                for j in (0..n).filter(|&j| j != i && dense[i * n + j]) {
                    let state = if j < i {
                        states[j]
                    } else {
                        mix(input.tokens[j] as u64 ^ (input.positions[j] as u64) << 40)
                    };
                    visible.push(Entry {
                        position: input.positions[j],
                        state,
                    });
                }
                states.push(self.state(input.tokens[i], input.positions[i], &visible));
            }
            cache.entries.extend(
                states
                    .iter()
                    .zip(input.positions.iter())
                    .map(|(&state, &position)| Entry { position, state }),
            );
            let rows = input.outputs.resolve(n)?;
            let mut argmax = Vec::with_capacity(rows.len());
            let mut logits = input.outputs.logits.then(Vec::new);
            let mut confidence = input.outputs.confidence.then(Vec::new);
            for &r in &rows {
                let l = self.logits(input.tokens[r], states[r]);
                let best = l
                    .iter()
                    .enumerate()
                    .fold(
                        (0usize, f32::MIN),
                        |acc, (t, &x)| if x > acc.1 { (t, x) } else { acc },
                    );
                argmax.push(best.0 as u32);
                if let Some(cs) = confidence.as_mut() {
                    cs.push(1.0 / l.iter().map(|&x| (x - best.1).exp()).sum::<f32>());
                }
                if let Some(ls) = logits.as_mut() {
                    ls.push(l);
                }
            }
            outs.push(ForwardOutput {
                rows,
                argmax,
                logits,
                confidence,
            });
        }
        Ok(outs)
    }
}

/// A mock model for fault tests: once armed, reading its facts on the thread named
/// `thread` panics (as a bug outside a forward would), so that thread dies.
pub struct Doomed {
    model: MockModel,
    thread: &'static str,
    armed: std::sync::atomic::AtomicBool,
}

impl Doomed {
    pub fn new(model: MockModel, thread: &'static str) -> Self {
        Self {
            model,
            thread,
            armed: Default::default(),
        }
    }

    pub fn arm(&self) {
        self.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl LanguageModel for Doomed {
    type Cache = MockCache;

    fn info(&self) -> &ModelInfo {
        let here = std::thread::current().name() == Some(self.thread);
        if here && self.armed.load(std::sync::atomic::Ordering::SeqCst) {
            panic!("armed: the {} thread dies", self.thread);
        }
        self.model.info()
    }

    fn new_cache(&self) -> MockCache {
        self.model.new_cache()
    }

    fn forward_batch(
        &self,
        batch: &mut [(&mut MockCache, SeqInput<'_>)],
    ) -> Result<Vec<ForwardOutput>> {
        self.model.forward_batch(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::OutputSpec;
    use crate::mask::{Visibility, tree_positions};

    fn sequential(m: &MockModel, path: &[u32]) -> u32 {
        let mut c = m.new_cache();
        let mut last = 0;
        for (i, &t) in path.iter().enumerate() {
            last = m
                .forward(
                    &mut c,
                    SeqInput::chain(&[t], &[i as u32], OutputSpec::all()),
                )
                .unwrap()
                .argmax[0];
        }
        last
    }

    #[test]
    fn tree_rows_and_kept_paths_equal_sequential_decoding() {
        let m = MockModel::new(50, 256, 0.5, 3);
        let prompt = [1u32, 2, 3];
        let mut c = m.new_cache();
        m.forward(
            &mut c,
            SeqInput::chain(&prompt, &[0, 1, 2], OutputSpec::all()),
        )
        .unwrap();
        let parents = vec![-1, 0, 0, 1, 3];
        let tokens = [7u32, 8, 9, 10, 11];
        let pos = tree_positions(3, &parents);
        let vis = Visibility::Tree(parents);
        let out = m
            .forward(
                &mut c,
                SeqInput {
                    tokens: &tokens,
                    positions: &pos,
                    visibility: &vis,
                    outputs: OutputSpec::all(),
                },
            )
            .unwrap();
        let paths: [&[u32]; 5] = [&[7], &[7, 8], &[7, 9], &[7, 8, 10], &[7, 8, 10, 11]];
        for (i, p) in paths.iter().enumerate() {
            let full: Vec<u32> = prompt.iter().chain(p.iter()).copied().collect();
            assert_eq!(out.argmax[i], sequential(&m, &full), "row {i}");
        }
        // Keep 7, 8, 10 and decode on: must equal sequential decoding of that path.
        c.keep(3, &[3, 4, 6]).unwrap();
        let next = m
            .forward(&mut c, SeqInput::chain(&[20], &[6], OutputSpec::all()))
            .unwrap();
        assert_eq!(next.argmax[0], sequential(&m, &[1, 2, 3, 7, 8, 10, 20]));
    }

    #[test]
    fn a_wrong_mask_or_position_changes_the_output() {
        let m = MockModel::new(1000, 256, 0.0, 1);
        let mut c = m.new_cache();
        m.forward(&mut c, SeqInput::chain(&[4, 5], &[0, 1], OutputSpec::all()))
            .unwrap();
        let tokens = [6u32, 7];
        let siblings = Visibility::Tree(vec![-1, -1]);
        let chain = Visibility::Causal;
        let run = |vis: &Visibility, pos: &[u32]| {
            let mut c = c.clone();
            m.forward(
                &mut c,
                SeqInput {
                    tokens: &tokens,
                    positions: pos,
                    visibility: vis,
                    outputs: OutputSpec::all(),
                },
            )
            .unwrap()
            .argmax[1]
        };
        let right = run(&siblings, &[2, 2]);
        assert_eq!(right, sequential(&m, &[4, 5, 7]));
        assert_ne!(
            right,
            run(&chain, &[2, 2]),
            "a sibling leaked into the mask"
        );
        assert_ne!(
            right,
            run(&siblings, &[2, 3]),
            "a wrong position went unnoticed"
        );
    }
}
