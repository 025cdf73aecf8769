//! The draft's half of the protocol over any [`engine::LanguageModel`]: one session's view
//! of the text, its KV cache and lookahead window, and a call that drafts (with lookahead
//! decoding when asked) while reading and feeding a phrase pool.

use crate::backend::{DraftOutcome, DraftRequest};
use crate::error::Result;
use crate::lookahead::{LookaheadParams, StepPlan};
use crate::lookahead::{Window, finish_step, plan_step};
use crate::pool::PhrasePool;
use crate::validate::{FieldError, check_tokens, check_vocab};
use engine::{ForwardOutput, KvState, LanguageModel, OutputSpec, SeqInput};
use std::collections::BTreeSet;
use std::sync::Arc;

/// The draft's per-session state: its own view of the text (committed tokens, then what
/// it drafted), a KV cache over a prefix of it, and the lookahead window.
pub struct DraftSession<C> {
    pub cache: C,
    seq: Vec<u32>,
    committed: usize,
    window: Option<Window>,
    /// Tokens the text has held that a narrowed output head does not score.
    beyond: BeyondHead,
}

impl<C: KvState> DraftSession<C> {
    pub fn open<M: LanguageModel<Cache = C>>(model: &M, committed: &[u32]) -> Result<Self> {
        check_tokens(committed, model.info().vocab_size)?;
        let mut beyond = BeyondHead::new(model.info().head_vocab);
        beyond.note(committed);
        // The prefill happens in the first draft step, together with the first window.
        Ok(Self {
            cache: model.new_cache(),
            seq: committed.to_vec(),
            committed: committed.len(),
            window: None,
            beyond,
        })
    }

    /// Takes back the committed tokens from `start` on (they become drafted ones again),
    /// then appends committed tokens, keeping KV entries of drafted tokens that were
    /// accepted.
    fn sync(&mut self, start: Option<usize>, new_committed: &[u32]) -> Result<()> {
        if let Some(start) = start {
            if start == 0 || start > self.committed {
                return Err(FieldError::new(
                    "start",
                    format!("in 1..={} (the tokens the session holds)", self.committed),
                    start,
                )
                .into());
            }
            self.committed = start;
        }
        let drafted = &self.seq[self.committed..];
        let same = drafted
            .iter()
            .zip(new_committed)
            .take_while(|(a, b)| a == b)
            .count();
        self.seq.truncate(self.committed);
        self.seq.extend_from_slice(new_committed);
        self.beyond.note(new_committed);
        self.committed = self.seq.len();
        let valid = (self.committed - new_committed.len() + same).min(self.seq.len() - 1);
        if self.cache.len() > valid {
            self.cache.truncate(valid)?;
        }
        Ok(())
    }

    /// Drafts at least `gamma` tokens (fewer at EOS or the context limit), one
    /// (lookahead) step per forward. The draft's pool is read for phrases and fed with
    /// the window's n-grams. (A scheduler runs the same steps of many sessions' calls in
    /// shared forwards: [`Self::begin`], [`Self::plan`], [`Self::finish`].)
    pub fn draft<M: LanguageModel<Cache = C>>(
        &mut self,
        model: &M,
        pool: &PhrasePool,
        request: &DraftRequest,
    ) -> Result<DraftOutcome> {
        let mut call = self.begin(model, pool, request)?;
        let max_pos = model.info().max_position;
        while let Some(step) = self.plan(max_pos, usize::MAX, pool, &call)? {
            let out = model.forward(&mut self.cache, step.input())?;
            self.finish(pool, &mut call, &step, &out)?;
        }
        Ok(self.outcome(&mut call))
    }

    /// Starts a draft call: checks the request, takes in the newly committed tokens and
    /// the caller's phrases, and sets the lookahead window up.
    pub fn begin<M: LanguageModel<Cache = C>>(
        &mut self,
        model: &M,
        pool: &PhrasePool,
        request: &DraftRequest,
    ) -> Result<DraftCall> {
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
        self.sync(request.start, &request.new_committed)?;
        if let (Some(la), None) = (request.lookahead, &self.window) {
            self.window = Some(Window::new(la, &self.seq, 0));
        }
        if request.lookahead.is_none() {
            self.window = None;
        }
        let stop_below = match (&self.window, request.length.stop_below()) {
            (None, f) if f > 0.0 => Some(f),
            _ => None,
        };
        // Everything before the last committed token that the cache lacks.
        let unseen = (self.seq.len() - 1).saturating_sub(self.cache.len());
        Ok(DraftCall {
            want: request.length.tokens().max(1),
            eos: request.eos.clone(),
            lookahead: request.lookahead,
            stop_below,
            reach: 1.0,
            ended: false,
            outcome: DraftOutcome {
                caught_up: unseen as u32,
                ..DraftOutcome::default()
            },
        })
    }

    /// The call's next step (the rows of one forward over this session's cache), or
    /// `None` when it has drafted enough, ended, or reached the context limit. Text the
    /// cache has not seen beyond `chunk` tokens is caught up on first, `chunk` rows per
    /// step without outputs, so that a long catch-up shares forwards with other sessions'
    /// steps instead of holding them up.
    pub fn plan(
        &mut self,
        max_pos: usize,
        chunk: usize,
        pool: &PhrasePool,
        call: &DraftCall,
    ) -> Result<Option<DraftStep>> {
        if call.ended || self.seq.len() - self.committed >= call.want || self.seq.len() >= max_pos {
            return Ok(None);
        }
        let base = self.cache.len();
        let pending = &self.seq[base..];
        let chunk = chunk.max(1);
        if pending.len() > chunk.saturating_add(1) {
            let tokens = pending[..chunk].to_vec();
            let positions = (base as u32..(base + chunk) as u32).collect();
            return Ok(Some(DraftStep {
                work: Work::CatchUp { tokens, positions },
                base,
                windowed: false,
                confidence: false,
                also: None,
                max_pos,
            }));
        }
        let u = *pending.last().expect("the last token is never cached");
        let p = self.seq.len() - 1;
        // The window and phrases only fit while their positions stay in the context.
        let room = |extra: usize| p + extra < max_pos;
        let window = self
            .window
            .as_ref()
            .filter(|w| room(w.params().level + w.params().window));
        let phrases = match (&window, call.lookahead) {
            (Some(w), Some(la)) if w.is_steady() && la.guess > 0 && room(la.level) => {
                pool.newest(u, la.guess)
            }
            _ => Vec::new(),
        };
        let mut plan = plan_step(pending, base as u32, window, &phrases)?;
        let mut windowed = window.is_some();
        if base + plan.tokens.len() > max_pos {
            // Near the context limit the cache cannot hold the extra rows.
            windowed = false;
            plan = plan_step(pending, base as u32, None, &[])?;
        }
        Ok(Some(DraftStep {
            work: Work::Step(plan),
            base,
            windowed,
            confidence: call.stop_below.is_some(),
            also: self.beyond.tokens(),
            max_pos,
        }))
    }

    /// Takes in a step's forward: the emitted tokens, the window's advance, the KV rows
    /// worth keeping and the n-grams harvested.
    pub fn finish(
        &mut self,
        pool: &PhrasePool,
        call: &mut DraftCall,
        step: &DraftStep,
        out: &ForwardOutput,
    ) -> Result<()> {
        call.outcome.forwards += 1;
        call.outcome.rows += step.rows() as u32;
        let Work::Step(plan) = &step.work else {
            // A catch-up's rows are all kept: the cache has them now.
            return Ok(());
        };
        // Without a window a step emits the one token of its one output row.
        let confidence = match (call.stop_below, &out.confidence) {
            (Some(_), Some(c)) => c.first().copied(),
            _ => None,
        };
        let window = match step.windowed {
            true => self.window.as_mut(),
            false => None,
        };
        let result = finish_step(plan, &out.argmax, window)?;
        let keep: Vec<usize> = result.keep_rows.iter().map(|r| step.base + r).collect();
        self.cache.keep(step.base, &keep)?;
        pool.insert_all(&result.harvested);
        call.outcome.harvested.extend(result.harvested);
        call.outcome.phrase_hits += result.phrase_hits as u32;
        if let (Some(floor), Some(c)) = (call.stop_below, confidence) {
            call.outcome.confidence.push(c);
            call.reach *= c;
            call.ended = call.reach < floor;
        }
        for t in result.emitted {
            self.seq.push(t);
            if call.eos.contains(&t) || self.seq.len() >= step.max_pos {
                call.ended = true;
                break;
            }
        }
        if self.cache.len() >= self.seq.len() {
            // cut after EOS: drop KV entries of tokens past the end
            self.cache.truncate(self.seq.len() - 1)?;
        }
        Ok(())
    }

    /// What the call drafted (taken out of it: call this once, when it is done).
    pub fn outcome(&self, call: &mut DraftCall) -> DraftOutcome {
        let mut outcome = std::mem::take(&mut call.outcome);
        outcome.tokens = self.seq[self.committed..].to_vec();
        // A step cut short by EOS or the context emitted fewer tokens than it scored.
        outcome.confidence.truncate(outcome.tokens.len());
        outcome
    }

    /// KV memory this session holds.
    pub fn memory_bytes(&self) -> usize {
        self.cache.memory_bytes()
    }
}

/// The tokens a session's text has held that its model's narrowed output head does not
/// score (`engine::OutputSpec::also`): a head cut to the vocabulary's first tokens still
/// proposes the prompt's rare identifiers and the chat template's markers.
struct BeyondHead {
    head_vocab: usize,
    seen: BTreeSet<u32>,
    /// `seen` as the forwards take it, made again when it grows.
    tokens: Option<Arc<[u32]>>,
}

impl BeyondHead {
    fn new(head_vocab: usize) -> Self {
        Self {
            head_vocab,
            seen: BTreeSet::new(),
            tokens: None,
        }
    }

    fn note(&mut self, text: &[u32]) {
        let before = self.seen.len();
        self.seen
            .extend(text.iter().filter(|&&t| t as usize >= self.head_vocab));
        if self.seen.len() > before {
            self.tokens = Some(self.seen.iter().copied().collect());
        }
    }

    fn tokens(&self) -> Option<Arc<[u32]>> {
        self.tokens.clone()
    }
}

/// One draft call in progress ([`DraftSession::begin`]): what it asked for and what it
/// has drafted so far.
pub struct DraftCall {
    /// Tokens to draft (at least, or at most with a confidence floor).
    want: usize,
    eos: Vec<u32>,
    lookahead: Option<LookaheadParams>,
    /// The floor on the drafted tokens' probability product, when the call has one.
    stop_below: Option<f32>,
    reach: f32,
    ended: bool,
    outcome: DraftOutcome,
}

/// One planned step of a draft call: the rows of one forward over its session's cache.
pub struct DraftStep {
    work: Work,
    /// The cache's length when the step was planned: its rows go after it.
    base: usize,
    /// The step carries the lookahead window.
    windowed: bool,
    confidence: bool,
    /// Tokens beyond a narrowed head that the step's rows may also predict.
    also: Option<Arc<[u32]>>,
    /// The model's context: emitting stops there.
    max_pos: usize,
}

enum Work {
    /// Text the cache has not seen, without outputs.
    CatchUp {
        tokens: Vec<u32>,
        positions: Vec<u32>,
    },
    /// A (lookahead) decoding step.
    Step(StepPlan),
}

impl DraftStep {
    pub fn input(&self) -> SeqInput<'_> {
        match &self.work {
            Work::CatchUp { tokens, positions } => {
                SeqInput::chain(tokens, positions, OutputSpec::none())
            }
            Work::Step(plan) => SeqInput {
                tokens: &plan.tokens,
                positions: &plan.positions,
                visibility: &plan.visibility,
                outputs: OutputSpec {
                    rows: Some(plan.output_rows().collect()),
                    logits: false,
                    confidence: self.confidence,
                    also: self.also.clone(),
                },
            },
        }
    }

    /// Rows the step runs.
    pub fn rows(&self) -> usize {
        match &self.work {
            Work::CatchUp { tokens, .. } => tokens.len(),
            Work::Step(plan) => plan.tokens.len(),
        }
    }
}
