//! The seam between the engine and everything above it: a language model takes, per
//! sequence, new tokens with explicit positions and a visibility pattern, appends them to
//! that sequence's cache, and returns ids (and logits only where asked for).

use crate::error::{EngineError, Result};
use crate::mask::Visibility;
use std::sync::Arc;

/// Which rows of a forward to produce outputs for, and how much of each.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutputSpec {
    /// Row indices into the new tokens; `None` means every row.
    pub rows: Option<Vec<usize>>,
    /// Also return each selected row's full logits (needed for sampling).
    pub logits: bool,
    /// Also return each selected row's probability of its argmax token (a draft uses it
    /// to stop drafting where it is unsure).
    pub confidence: bool,
    /// Tokens beyond a narrowed output head (`LoadOptions::head_vocab`) that these rows
    /// may predict all the same, each scored against the full head's row for it: a draft
    /// passes the tokens its text has held, so that a narrowed head still proposes the
    /// prompt's rare identifiers. Tokens the head covers are ignored, and so is the list
    /// where the head is whole.
    pub also: Option<Arc<[u32]>>,
}

impl OutputSpec {
    pub fn all() -> Self {
        Self::default()
    }

    /// No outputs at all: a prefill only fills the cache.
    pub fn none() -> Self {
        Self {
            rows: Some(Vec::new()),
            ..Self::default()
        }
    }

    pub fn last(n: usize) -> Self {
        Self {
            rows: Some(vec![n.saturating_sub(1)]),
            ..Self::default()
        }
    }

    pub fn with_logits(mut self) -> Self {
        self.logits = true;
        self
    }

    pub fn with_confidence(mut self) -> Self {
        self.confidence = true;
        self
    }

    /// See [`Self::also`].
    pub fn also(mut self, tokens: Arc<[u32]>) -> Self {
        self.also = Some(tokens);
        self
    }

    pub(crate) fn resolve(&self, n: usize) -> Result<Vec<usize>> {
        match &self.rows {
            None => Ok((0..n).collect()),
            Some(rows) => {
                if let Some(&r) = rows.iter().find(|&&r| r >= n) {
                    return Err(EngineError::invalid(format!(
                        "output row {r} out of range for {n} new tokens"
                    )));
                }
                Ok(rows.clone())
            }
        }
    }
}

/// One sequence's part of a forward.
#[derive(Debug, Clone)]
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub positions: &'a [u32],
    pub visibility: &'a Visibility,
    pub outputs: OutputSpec,
}

impl<'a> SeqInput<'a> {
    /// A causal chain continuing a cache of `past` tokens (prefill or decode).
    pub fn chain(tokens: &'a [u32], positions: &'a [u32], outputs: OutputSpec) -> Self {
        Self {
            tokens,
            positions,
            visibility: &Visibility::Causal,
            outputs,
        }
    }

    /// Shape checks that need no model: lengths agree, structure is well-formed.
    pub fn validate(&self, vocab: usize, max_position: usize) -> Result<()> {
        let n = self.tokens.len();
        if n == 0 {
            return Err(EngineError::invalid("no tokens to forward"));
        }
        if self.positions.len() != n {
            return Err(EngineError::invalid(format!(
                "{} positions for {n} tokens",
                self.positions.len()
            )));
        }
        if let Some((i, t)) = self
            .tokens
            .iter()
            .enumerate()
            .find(|(_, t)| **t as usize >= vocab)
        {
            return Err(EngineError::invalid(format!(
                "tokens[{i}] = {t} is outside the vocabulary of {vocab}"
            )));
        }
        if let Some(&p) = self.positions.iter().find(|&&p| p as usize >= max_position) {
            return Err(EngineError::ContextOverflow {
                needed: p as usize + 1,
                limit: max_position,
            });
        }
        if let Some((i, t)) = self
            .outputs
            .also
            .iter()
            .flat_map(|a| a.iter().enumerate())
            .find(|(_, t)| **t as usize >= vocab)
        {
            return Err(EngineError::invalid(format!(
                "outputs.also[{i}] = {t} is outside the vocabulary of {vocab}"
            )));
        }
        self.visibility.validate(n)?;
        self.outputs.resolve(n)?;
        Ok(())
    }
}

/// Outputs for the selected rows of one sequence, in the order they were asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardOutput {
    pub rows: Vec<usize>,
    pub argmax: Vec<u32>,
    pub logits: Option<Vec<Vec<f32>>>,
    /// Softmax probability of each row's argmax, where asked for.
    pub confidence: Option<Vec<f32>>,
}

/// A sequence's attention state. Entries are in the order tokens were forwarded.
pub trait KvState: Send {
    /// Number of cached entries.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Drop every entry at index `n` and beyond. O(1).
    fn truncate(&mut self, n: usize) -> Result<()>;
    /// Keep entries `0..base`, then move `rows` (ascending, each `>= base`) into
    /// `base..base + rows.len()` and drop the rest: the accepted path of a verify tree.
    fn keep(&mut self, base: usize, rows: &[usize]) -> Result<()>;
    /// Bytes of memory held, for admission control.
    fn memory_bytes(&self) -> usize;
    /// Bytes it would hold once `extra` more entries are written (its growth policy
    /// applied), so a server can refuse a forward that would overrun its memory budget.
    fn memory_bytes_after(&self, extra: usize) -> usize;
}

pub(crate) fn check_keep(len: usize, base: usize, rows: &[usize]) -> Result<()> {
    if base > len {
        return Err(EngineError::invalid(format!(
            "keep base {base} is past the cache length {len}"
        )));
    }
    let mut prev = None;
    for &r in rows {
        if r < base || r >= len || prev.is_some_and(|p| r <= p) {
            return Err(EngineError::invalid(format!(
                "keep rows {rows:?} must ascend within {base}..{len}"
            )));
        }
        prev = Some(r);
    }
    Ok(())
}

/// Static facts about a loaded model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub name: String,
    pub vocab_size: usize,
    /// Tokens the output head scores on its own: `vocab_size` unless the head was
    /// narrowed at load (`LoadOptions::head_vocab`; see [`OutputSpec::also`]).
    pub head_vocab: usize,
    pub max_position: usize,
    pub num_layers: usize,
}

/// A language model that forwards many sequences at once: linear layers run over all
/// rows together, attention per sequence against its own cache.
pub trait LanguageModel: Send + Sync {
    type Cache: KvState;

    fn info(&self) -> &ModelInfo;

    fn new_cache(&self) -> Self::Cache;

    /// Forwards each `(cache, input)` pair, appending the new tokens to that cache.
    /// Either every cache advances or (on error) none does.
    fn forward_batch(
        &self,
        batch: &mut [(&mut Self::Cache, SeqInput<'_>)],
    ) -> Result<Vec<ForwardOutput>>;

    fn forward(&self, cache: &mut Self::Cache, input: SeqInput<'_>) -> Result<ForwardOutput> {
        let mut out = self.forward_batch(&mut [(cache, input)])?;
        Ok(out.remove(0))
    }
}
