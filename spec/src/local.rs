//! Model-side halves of the protocol over any [`engine::LanguageModel`]: the target's tree
//! verification and the draft's (lookahead) drafting, as plain functions on a session so
//! that the in-process backends here and the gRPC services share them.

use crate::backend::{
    BackendInfo, DraftBackend, DraftOutcome, DraftRequest, ServerTiming, SessionId, TargetBackend,
    VerifyOutcome,
};
use crate::error::{Result, SpecError};
use crate::lookahead::{Window, finish_step, plan_step};
use crate::pool::PhrasePool;
use crate::sampling::SamplingParams;
use crate::sessions::{SessionLimits, SessionState, SessionTable};
use crate::tree::DraftTree;
use engine::{ForwardOutput, KvState, LanguageModel, OutputSpec, SeqInput, Visibility};
use std::sync::Arc;
use std::time::Instant;

fn info_of<M: LanguageModel>(model: &M) -> BackendInfo {
    let i = model.info();
    BackendInfo {
        model: i.name.clone(),
        vocab_size: i.vocab_size,
        max_position: i.max_position,
    }
}

/// Tokens that open a session: at least one, all inside the vocabulary.
fn check_tokens(tokens: &[u32], vocab: usize) -> Result<()> {
    if tokens.is_empty() {
        return Err(SpecError::invalid("a session needs at least one token"));
    }
    check_vocab(tokens, vocab)
}

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
            return Err(SpecError::Engine(engine::EngineError::ContextOverflow {
                needed: committed.len(),
                limit,
            }));
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
            return Err(SpecError::invalid(format!(
                "tree root {} does not continue the session (last committed token {})",
                tree.tokens[0], self.last
            )));
        }
        let base = self.cache.len() as u32;
        // Rows, not only positions, must fit: the cache holds every node until the walk.
        let needed = base as usize + tree.len();
        if needed > max_position {
            return Err(SpecError::Engine(engine::EngineError::ContextOverflow {
                needed,
                limit: max_position,
            }));
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
        let mut keep = vec![base];
        keep.extend(walk.path.iter().map(|&n| base + n));
        self.cache.keep(base, &keep)?;
        self.last = walk.bonus;
        Ok(VerifyOutcome {
            path: walk.path,
            accepted: walk.accepted,
            bonus: walk.bonus,
            outputs,
        })
    }

    /// Verifies one tree alone (the batching target service groups sessions instead).
    pub fn verify<M: LanguageModel<Cache = C>>(
        &mut self,
        model: &M,
        tree: &DraftTree,
        sampling: &SamplingParams,
    ) -> Result<VerifyOutcome> {
        let (positions, visibility) = self.verify_input(tree, model.info().max_position)?;
        let base = self.cache.len();
        let outputs = OutputSpec {
            logits: !sampling.is_greedy(),
            ..OutputSpec::all()
        };
        let input = SeqInput {
            tokens: &tree.tokens,
            positions: &positions,
            visibility: &visibility,
            outputs,
        };
        let out = model.forward(&mut self.cache, input)?;
        self.verify_finish(tree, &positions, base, &out, sampling)
    }
}

impl<C: KvState> SessionState for TargetSession<C> {
    fn memory_bytes(&self) -> usize {
        self.cache.memory_bytes()
    }
}

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
                return Err(SpecError::invalid(format!(
                    "lookahead level {} needs phrases of {} tokens, the pool keeps {}",
                    la.level,
                    la.phrase_len(),
                    pool.phrase_len()
                )));
            }
        }
        check_vocab(&request.new_committed, model.info().vocab_size)?;
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
        let stop_below = match (&self.window, request.stop_below) {
            (None, f) if f > 0.0 => Some(f),
            _ => None,
        };
        let mut reach = 1.0f32;
        while self.seq.len() - self.committed < request.gamma.max(1) {
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
}

impl<C: KvState> SessionState for DraftSession<C> {
    fn memory_bytes(&self) -> usize {
        self.cache.memory_bytes()
    }
}

pub fn check_vocab(tokens: &[u32], vocab: usize) -> Result<()> {
    match tokens.iter().find(|&&t| t as usize >= vocab) {
        Some(t) => Err(SpecError::invalid(format!(
            "token {t} is outside the vocabulary of {vocab}"
        ))),
        None => Ok(()),
    }
}

/// Runs an in-process call; all of its time is forward time (no queue, no network).
fn timed<R>(f: impl FnOnce() -> Result<R>) -> Result<(R, ServerTiming)> {
    let start = Instant::now();
    let out = f()?;
    let t = start.elapsed().as_secs_f64();
    Ok((
        out,
        ServerTiming {
            queue: 0.0,
            forward: t,
            total: t,
        },
    ))
}

/// A target model in this process.
pub struct LocalTarget<M: LanguageModel> {
    model: Arc<M>,
    sessions: SessionTable<TargetSession<M::Cache>>,
}

impl<M: LanguageModel> LocalTarget<M> {
    pub fn new(model: Arc<M>) -> Self {
        Self {
            model,
            sessions: SessionTable::new(SessionLimits::default()),
        }
    }

    pub fn model(&self) -> &Arc<M> {
        &self.model
    }
}

impl<M: LanguageModel> TargetBackend for LocalTarget<M> {
    fn info(&self) -> BackendInfo {
        info_of(&*self.model)
    }

    async fn open(&self, committed: &[u32]) -> Result<SessionId> {
        let s = TargetSession::open(&*self.model, committed)?;
        Ok(self.sessions.insert(s))
    }

    async fn verify(
        &self,
        session: SessionId,
        tree: &DraftTree,
        sampling: &SamplingParams,
    ) -> Result<(VerifyOutcome, ServerTiming)> {
        sampling.validate()?;
        timed(|| {
            self.sessions
                .with(session, |s| s.verify(&*self.model, tree, sampling))
        })
    }

    async fn close(&self, session: SessionId) -> Result<()> {
        self.sessions.close(session)
    }
}

/// A draft model in this process, sharing the caller's pool.
pub struct LocalDraft<M: LanguageModel> {
    model: Arc<M>,
    pool: Arc<PhrasePool>,
    sessions: SessionTable<DraftSession<M::Cache>>,
}

impl<M: LanguageModel> LocalDraft<M> {
    pub fn new(model: Arc<M>, pool: Arc<PhrasePool>) -> Self {
        Self {
            model,
            pool,
            sessions: SessionTable::new(SessionLimits::default()),
        }
    }
}

impl<M: LanguageModel> DraftBackend for LocalDraft<M> {
    fn info(&self) -> BackendInfo {
        info_of(&*self.model)
    }

    fn wants_pool_delta(&self) -> bool {
        false
    }

    async fn open(&self, committed: &[u32]) -> Result<SessionId> {
        let s = DraftSession::open(&*self.model, committed)?;
        Ok(self.sessions.insert(s))
    }

    async fn draft(
        &self,
        session: SessionId,
        request: DraftRequest,
    ) -> Result<(DraftOutcome, ServerTiming)> {
        timed(|| {
            self.sessions
                .with(session, |s| s.draft(&*self.model, &self.pool, &request))
        })
    }

    async fn close(&self, session: SessionId) -> Result<()> {
        self.sessions.close(session)
    }
}
