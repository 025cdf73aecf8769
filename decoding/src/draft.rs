//! The draft's half of the protocol over any [`engine::LanguageModel`]: one session's view
//! of the text, its KV cache and lookahead window, and a call that drafts (with lookahead
//! decoding when asked) while reading and feeding a phrase pool.

use crate::backend::{DraftOutcome, DraftRequest};
use crate::error::Result;
use crate::lookahead::{Window, finish_step, plan_step};
use crate::pool::PhrasePool;
use crate::validate::{FieldError, check_tokens, check_vocab};
use engine::{KvState, LanguageModel, OutputSpec, SeqInput};

/// The draft's per-session state: its own view of the text (committed tokens, then what
/// it drafted), a KV cache over a prefix of it, and the lookahead window.
pub struct DraftSession<C> {
    pub cache: C,
    seq: Vec<u32>,
    committed: usize,
    window: Option<Window>,
}

impl<C: KvState> DraftSession<C> {
    pub fn open<M: LanguageModel<Cache = C>>(model: &M, committed: &[u32]) -> Result<Self> {
        check_tokens(committed, model.info().vocab_size)?;
        // The prefill happens in the first draft step, together with the first window.
        Ok(Self {
            cache: model.new_cache(),
            seq: committed.to_vec(),
            committed: committed.len(),
            window: None,
        })
    }

    /// Appends committed tokens, keeping KV entries of drafted tokens that were accepted.
    fn sync(&mut self, new_committed: &[u32]) -> Result<()> {
        let drafted = &self.seq[self.committed..];
        let same = drafted
            .iter()
            .zip(new_committed)
            .take_while(|(a, b)| a == b)
            .count();
        self.seq.truncate(self.committed);
        self.seq.extend_from_slice(new_committed);
        self.committed = self.seq.len();
        let valid = (self.committed - new_committed.len() + same).min(self.seq.len() - 1);
        if self.cache.len() > valid {
            self.cache.truncate(valid)?;
        }
        Ok(())
    }

    /// Drafts at least `gamma` tokens (fewer at EOS or the context limit), one
    /// (lookahead) step per forward. The draft's pool is read for phrases and fed with
    /// the window's n-grams.
    pub fn draft<M: LanguageModel<Cache = C>>(
        &mut self,
        model: &M,
        pool: &PhrasePool,
        request: &DraftRequest,
    ) -> Result<DraftOutcome> {
        if let Some(la) = &request.lookahead {
            la.validate()?;
            if la.phrase_len() != pool.phrase_len() {
                return Err(FieldError::new(
                    "lookahead.level",
                    format!(
                        "{} (the pool keeps phrases of {} tokens)",
                        pool.phrase_len() + 1,
                        pool.phrase_len()
                    ),
                    la.level,
                )
                .into());
            }
        }
        check_vocab(
            &request.new_committed,
            model.info().vocab_size,
            "new_committed",
        )?;
        pool.insert_all(&request.pool_delta);
        self.sync(&request.new_committed)?;
        if let (Some(la), None) = (request.lookahead, &self.window) {
            self.window = Some(Window::new(la, &self.seq, 0));
        }
        if request.lookahead.is_none() {
            self.window = None;
        }
        let max_pos = model.info().max_position;
        let mut outcome = DraftOutcome::default();
        let stop_below = match (&self.window, request.length.stop_below()) {
            (None, f) if f > 0.0 => Some(f),
            _ => None,
        };
        let mut reach = 1.0f32;
        while self.seq.len() - self.committed < request.length.tokens().max(1) {
            if self.seq.len() >= max_pos {
                break;
            }
            let base = self.cache.len();
            let pending = self.seq[base..].to_vec();
            let u = *pending.last().expect("the last token is never cached");
            let p = self.seq.len() - 1;
            // The window and phrases only fit while their positions stay in the context.
            let room = |extra: usize| p + extra < max_pos;
            let window = self
                .window
                .as_mut()
                .filter(|w| room(w.params().level + w.params().window));
            let phrases = match (&window, request.lookahead) {
                (Some(w), Some(la)) if w.is_steady() && la.guess > 0 && room(la.level) => {
                    pool.newest(u, la.guess)
                }
                _ => Vec::new(),
            };
            let mut plan = plan_step(&pending, base as u32, window.as_deref(), &phrases)?;
            let mut window = window;
            if base + plan.tokens.len() > max_pos {
                // Near the context limit the cache cannot hold the extra rows.
                window = None;
                plan = plan_step(&pending, base as u32, None, &[])?;
            }
            let input = SeqInput {
                tokens: &plan.tokens,
                positions: &plan.positions,
                visibility: &plan.visibility,
                outputs: OutputSpec {
                    rows: Some(plan.output_rows().collect()),
                    logits: false,
                    confidence: stop_below.is_some(),
                },
            };
            let out = model.forward(&mut self.cache, input)?;
            outcome.forwards += 1;
            // Without a window a step emits the one token of its one output row.
            let confidence = match (stop_below, &out.confidence) {
                (Some(_), Some(c)) => c.first().copied(),
                _ => None,
            };
            let step = finish_step(&plan, &out.argmax, window)?;
            let keep: Vec<usize> = step.keep_rows.iter().map(|r| base + r).collect();
            self.cache.keep(base, &keep)?;
            pool.insert_all(&step.harvested);
            outcome.harvested.extend(step.harvested);
            outcome.phrase_hits += step.phrase_hits as u32;
            let mut ended = false;
            if let (Some(floor), Some(c)) = (stop_below, confidence) {
                outcome.confidence.push(c);
                reach *= c;
                ended = reach < floor;
            }
            for t in step.emitted {
                self.seq.push(t);
                if request.eos.contains(&t) || self.seq.len() >= max_pos {
                    ended = true;
                    break;
                }
            }
            if self.cache.len() >= self.seq.len() {
                // cut after EOS: drop KV entries of tokens past the end
                self.cache.truncate(self.seq.len() - 1)?;
            }
            if ended {
                break;
            }
        }
        outcome.tokens = self.seq[self.committed..].to_vec();
        // A step cut short by EOS or the context emitted fewer tokens than it scored.
        outcome.confidence.truncate(outcome.tokens.len());
        Ok(outcome)
    }

    /// KV memory this session holds.
    pub fn memory_bytes(&self) -> usize {
        self.cache.memory_bytes()
    }
}
