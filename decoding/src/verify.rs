//! The target's half of the protocol over any [`engine::LanguageModel`]: one session's KV
//! cache, a tree's positions and mask, and after the forward the accepted path, with the
//! cache cut to it. The in-process reference backend and the serving runtime's batching
//! scheduler both run these.

use crate::backend::VerifyOutcome;
use crate::error::{DecodingError, Result};
use crate::sampling::SamplingParams;
use crate::tree::DraftTree;
use crate::validate::{FieldError, check_tokens};
use engine::{ForwardOutput, KvState, LanguageModel, OutputSpec, SeqInput, Visibility};

/// Prefills all but the last token: the invariant between rounds is that every committed
/// token but the last has a KV entry.
fn prefill<M: LanguageModel>(model: &M, cache: &mut M::Cache, tokens: &[u32]) -> Result<()> {
    if tokens.is_empty() {
        return Ok(());
    }
    let positions: Vec<u32> = (cache.len() as u32..).take(tokens.len()).collect();
    model.forward(
        cache,
        SeqInput::chain(tokens, &positions, OutputSpec::none()),
    )?;
    Ok(())
}

/// Whether a verify needs the rows' logits (sampling, or log-probabilities), not only
/// their argmax.
pub fn needs_logits(sampling: &SamplingParams, logprobs: Option<usize>) -> bool {
    !sampling.is_greedy() || logprobs.is_some()
}

/// The target's per-session state.
pub struct TargetSession<C> {
    pub cache: C,
    /// The last committed token, which the next tree's root must repeat.
    pub last: u32,
}

impl<C: KvState> TargetSession<C> {
    pub fn open<M: LanguageModel<Cache = C>>(model: &M, committed: &[u32]) -> Result<Self> {
        let mut s = Self::unfilled(model, committed)?;
        prefill(model, &mut s.cache, &committed[..committed.len() - 1])?;
        Ok(s)
    }

    /// A session whose cache is still empty: the caller prefills `committed[..n - 1]`
    /// itself (the batching service does it in chunks between other sessions' trees).
    pub fn unfilled<M: LanguageModel<Cache = C>>(model: &M, committed: &[u32]) -> Result<Self> {
        check_tokens(committed, model.info().vocab_size)?;
        // Rows, not positions: the first tree needs at least its root's row.
        let limit = model.info().max_position;
        if committed.len() > limit {
            return Err(DecodingError::Engine(
                engine::EngineError::ContextOverflow {
                    needed: committed.len(),
                    limit,
                },
            ));
        }
        Ok(Self {
            cache: model.new_cache(),
            last: committed[committed.len() - 1],
        })
    }

    /// Positions and mask of a tree for this session, after checking that it continues it.
    pub fn verify_input(
        &self,
        tree: &DraftTree,
        max_position: usize,
    ) -> Result<(Vec<u32>, Visibility)> {
        if tree.tokens[0] != self.last {
            return Err(FieldError::new(
                "tokens[0]",
                format!(
                    "the session's last committed token {} (the root continues it)",
                    self.last
                ),
                tree.tokens[0],
            )
            .into());
        }
        let base = self.cache.len() as u32;
        // Rows, not only positions, must fit: the cache holds every node until the walk.
        let needed = base as usize + tree.len();
        if needed > max_position {
            return Err(DecodingError::Engine(
                engine::EngineError::ContextOverflow {
                    needed,
                    limit: max_position,
                },
            ));
        }
        let positions: Vec<u32> = tree.depths().iter().map(|d| base + d).collect();
        Ok((positions, Visibility::Tree(tree.parents.clone())))
    }

    /// After the forward: one token per node, the accepted path, and the KV cut to it.
    pub fn verify_finish(
        &mut self,
        tree: &DraftTree,
        positions: &[u32],
        base: usize,
        out: &ForwardOutput,
        sampling: &SamplingParams,
        logprobs: Option<usize>,
    ) -> Result<VerifyOutcome> {
        let outputs: Vec<u32> = match (&out.logits, sampling.is_greedy()) {
            (Some(rows), false) => rows
                .iter()
                .zip(positions)
                .map(|(row, &p)| sampling.choose(row, p + 1))
                .collect(),
            _ => out.argmax.clone(),
        };
        let walk = tree.walk(&outputs)?;
        // Each committed token was chosen from its parent's row: the root's, then the path's.
        let logprobs = match (logprobs, &out.logits) {
            (Some(top), Some(rows)) => std::iter::once(0)
                .chain(walk.path.iter().copied())
                .zip(walk.accepted.iter().chain([&walk.bonus]))
                .map(|(row, &token)| crate::logprobs::of_row(&rows[row], token, top))
                .collect(),
            (Some(_), None) => {
                return Err(DecodingError::Backend(
                    "log-probabilities were asked for but the forward returned no logits".into(),
                ));
            }
            (None, _) => Vec::new(),
        };
        let mut keep = vec![base];
        keep.extend(walk.path.iter().map(|&n| base + n));
        self.cache.keep(base, &keep)?;
        self.last = walk.bonus;
        Ok(VerifyOutcome {
            path: walk.path,
            accepted: walk.accepted,
            bonus: walk.bonus,
            outputs,
            logprobs,
        })
    }

    /// Verifies one tree alone (the batching target service groups sessions instead).
    pub fn verify<M: LanguageModel<Cache = C>>(
        &mut self,
        model: &M,
        tree: &DraftTree,
        sampling: &SamplingParams,
        logprobs: Option<usize>,
    ) -> Result<VerifyOutcome> {
        let (positions, visibility) = self.verify_input(tree, model.info().max_position)?;
        let base = self.cache.len();
        let outputs = OutputSpec {
            logits: needs_logits(sampling, logprobs),
            ..OutputSpec::all()
        };
        let input = SeqInput {
            tokens: &tree.tokens,
            positions: &positions,
            visibility: &visibility,
            outputs,
        };
        let out = model.forward(&mut self.cache, input)?;
        self.verify_finish(tree, &positions, base, &out, sampling, logprobs)
    }

    /// KV memory this session holds.
    pub fn memory_bytes(&self) -> usize {
        self.cache.memory_bytes()
    }
}
