//! The decoding loops, written once over [`TargetBackend`] and [`DraftBackend`]: plain
//! greedy (or plain sampling), classic speculative decoding, lookahead decoding, trie-cache
//! drafting and Ouroboros. Every committed token is the target's own choice for its exact
//! prefix, so all strategies give the tokens plain decoding gives.

use crate::backend::{DraftBackend, DraftRequest, SessionId, TargetBackend};
use crate::error::{Result, SpecError};
use crate::lookahead::LookaheadParams;
use crate::pool::{Ngram, PhrasePool};
use crate::sampling::SamplingParams;
use crate::stats::SpecStats;
use crate::tree::DraftTree;
use crate::trie::{PromptTrie, TrieCache};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// One target forward per token.
    Greedy,
    /// The draft decodes `gamma` tokens one per forward; the target verifies the chain.
    Speculative,
    /// Target only: lookahead (Jacobi) decoding inside the target model. Greedy only.
    Lookahead,
    /// Draft lookahead plus pool candidate suffixes (and trie continuations) in one
    /// verify tree.
    Ouroboros,
    /// Target only: continuations from the prompt and output tries (PIA), verified as a
    /// tree.
    Trie,
}

impl Strategy {
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::Greedy => "greedy",
            Strategy::Speculative => "speculative",
            Strategy::Lookahead => "lookahead",
            Strategy::Ouroboros => "ouroboros",
            Strategy::Trie => "trie",
        }
    }

    pub fn needs_draft(&self) -> bool {
        matches!(self, Strategy::Speculative | Strategy::Ouroboros)
    }

    /// Every strategy there is, in the order tables list them.
    pub const ALL: [Strategy; 5] = [
        Strategy::Greedy,
        Strategy::Speculative,
        Strategy::Lookahead,
        Strategy::Trie,
        Strategy::Ouroboros,
    ];
}

#[derive(Debug, Clone, PartialEq)]
pub struct DecodeParams {
    pub strategy: Strategy,
    pub max_new_tokens: usize,
    /// Generation ends after the first of these (it is kept in the output).
    pub eos: Vec<u32>,
    pub sampling: SamplingParams,
    /// Least draft tokens per round.
    pub gamma: usize,
    pub lookahead: LookaheadParams,
    /// Pool phrases appended as candidate suffixes after the draft (Ouroboros).
    pub topk: usize,
    /// Also feed the pool with the n-grams of the prompt and of committed text.
    pub harvest_committed: bool,
    /// Most trie nodes per verify tree (trie strategy; Ouroboros adds them to its tree,
    /// 0 turns that off).
    pub trie_budget: usize,
}

impl Default for DecodeParams {
    fn default() -> Self {
        Self {
            strategy: Strategy::Ouroboros,
            max_new_tokens: 256,
            eos: Vec::new(),
            sampling: SamplingParams::greedy(),
            gamma: 8,
            lookahead: LookaheadParams::default(),
            topk: 3,
            harvest_committed: true,
            trie_budget: 4,
        }
    }
}

impl DecodeParams {
    pub fn validate(&self) -> Result<()> {
        self.sampling.validate()?;
        if self.max_new_tokens == 0 {
            return Err(SpecError::invalid("max_new_tokens must be at least 1"));
        }
        if self.strategy != Strategy::Greedy && !(1..=64).contains(&self.gamma) {
            return Err(SpecError::invalid(format!(
                "gamma must be in 1..=64, got {}",
                self.gamma
            )));
        }
        if self.topk > 16 {
            return Err(SpecError::invalid(format!(
                "topk must be at most 16, got {}",
                self.topk
            )));
        }
        if self.trie_budget > 256 {
            return Err(SpecError::invalid(format!(
                "trie_budget must be at most 256, got {}",
                self.trie_budget
            )));
        }
        if self.strategy == Strategy::Trie && self.trie_budget == 0 {
            return Err(SpecError::invalid(
                "the trie strategy needs a trie_budget of at least 1",
            ));
        }
        if matches!(self.strategy, Strategy::Lookahead | Strategy::Ouroboros) {
            self.lookahead.validate()?;
        }
        if self.strategy == Strategy::Lookahead && !self.sampling.is_greedy() {
            return Err(SpecError::invalid(
                "the lookahead strategy decodes greedily; use greedy, speculative or \
                 ouroboros for sampling",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Length,
    Eos,
    /// The caller's token sink asked to stop (a stop string, a cancelled stream).
    Stop,
    /// The model's context is full.
    ContextFull,
}

impl FinishReason {
    pub fn name(&self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::ContextFull => "context_full",
        }
    }
}

/// What the token sink tells the loop after each batch of committed tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
    pub stats: SpecStats,
}

struct Sessions<'a, T: TargetBackend, D: DraftBackend> {
    target: &'a T,
    target_id: SessionId,
    draft: Option<(&'a D, SessionId)>,
}

impl<T: TargetBackend, D: DraftBackend> Sessions<'_, T, D> {
    async fn close(self) {
        // Closing is best effort: a failed close only leaves a session for the TTL.
        if let Err(e) = self.target.close(self.target_id).await {
            tracing::debug!("closing target session: {e}");
        }
        if let Some((d, id)) = self.draft
            && let Err(e) = d.close(id).await
        {
            tracing::debug!("closing draft session: {e}");
        }
    }
}

/// Runs one request. `draft` is the draft model for speculative/Ouroboros, or the target
/// model's own lookahead host for [`Strategy::Lookahead`]; when it is missing or fails,
/// the loop carries on target-only (still exact) and says so in the statistics.
/// `on_tokens` sees every batch of committed tokens as soon as it is known. `pool` and
/// `trie` are the caches shared across requests; only their hit rates depend on them.
pub async fn generate<T: TargetBackend, D: DraftBackend>(
    target: &T,
    draft: Option<&D>,
    pool: &PhrasePool,
    trie: &TrieCache,
    prompt: &[u32],
    params: &DecodeParams,
    on_tokens: &mut (dyn FnMut(&[u32]) -> Flow + Send),
) -> Result<Generation> {
    params.validate()?;
    if prompt.is_empty() {
        return Err(SpecError::invalid("the prompt has no tokens"));
    }
    let info = target.info();
    if prompt.len() >= info.max_position {
        return Err(SpecError::invalid(format!(
            "the prompt has {} tokens; the target's context is {}",
            prompt.len(),
            info.max_position
        )));
    }
    if params.strategy == Strategy::Lookahead {
        return lookahead_only(draft, prompt, params, on_tokens).await;
    }
    let started = Instant::now();
    let mut stats = SpecStats::new(params.strategy);
    let target_id = target.open(prompt).await?;
    stats.prefill_s = started.elapsed().as_secs_f64();
    let mut sessions = Sessions {
        target,
        target_id,
        draft: None,
    };
    if params.strategy.needs_draft() {
        match draft {
            Some(d) => match d.open(prompt).await {
                Ok(id) => sessions.draft = Some((d, id)),
                Err(e) => stats.fall_back(format!("draft open failed: {e}")),
            },
            None => stats.fall_back("no draft backend".to_string()),
        }
    }
    let caches = Caches { pool, trie };
    let r = run_rounds(&mut sessions, &mut stats, caches, prompt, params, on_tokens).await;
    sessions.close().await;
    stats.total_s = started.elapsed().as_secs_f64();
    if stats.trie_lookups > 0 {
        stats.trie_cache_nodes = trie.len() as u64;
        stats.trie_cache_bytes = trie.approx_bytes() as u64;
    }
    let (tokens, finish) = r?;
    stats.committed = tokens.len() as u64;
    Ok(Generation {
        tokens,
        finish,
        stats,
    })
}

#[derive(Clone, Copy)]
struct Caches<'a> {
    pool: &'a PhrasePool,
    trie: &'a TrieCache,
}

async fn run_rounds<T: TargetBackend, D: DraftBackend>(
    sessions: &mut Sessions<'_, T, D>,
    stats: &mut SpecStats,
    Caches { pool, trie }: Caches<'_>,
    prompt: &[u32],
    params: &DecodeParams,
    on_tokens: &mut (dyn FnMut(&[u32]) -> Flow + Send),
) -> Result<(Vec<u32>, FinishReason)> {
    let max_pos = sessions.target.info().max_position;
    let ouroboros = params.strategy == Strategy::Ouroboros;
    let use_trie =
        params.trie_budget > 0 && matches!(params.strategy, Strategy::Trie | Strategy::Ouroboros);
    let prompt_trie = use_trie.then(|| PromptTrie::new(prompt, trie.config()));
    if let Some(p) = &prompt_trie {
        stats.trie_prompt_nodes = p.len() as u64;
    }
    let g = pool.phrase_len();
    let learn = ouroboros && params.lookahead.phrase_len() == g;
    let mut text = prompt.to_vec();
    let mut out: Vec<u32> = Vec::new();
    let mut for_draft: Vec<u32> = Vec::new();
    let mut delta: Vec<Ngram> = Vec::new();
    let mut learnt = Vec::new();
    if learn && params.harvest_committed {
        learnt.extend(crate::pool::ngrams_of(prompt, g));
        pool.insert_all(&learnt);
    }
    loop {
        let remaining = params.max_new_tokens - out.len();
        // Room for the tree below the context limit: the root sits at text.len() - 1.
        let room = max_pos.saturating_sub(text.len());
        if room == 0 {
            return Ok((out, FinishReason::ContextFull));
        }
        // Drafting beyond what may still be committed is wasted work.
        let budget = remaining.saturating_sub(1).min(room - 1);
        let mut drafted: Vec<u32> = Vec::new();
        if let Some((d, id)) = sessions.draft
            && budget > 0
        {
            let request = DraftRequest {
                new_committed: std::mem::take(&mut for_draft),
                gamma: params.gamma.min(budget),
                lookahead: ouroboros.then_some(params.lookahead),
                pool_delta: if d.wants_pool_delta() {
                    std::mem::take(&mut delta)
                } else {
                    Vec::new()
                },
                eos: params.eos.clone(),
            };
            let t0 = Instant::now();
            match d.draft(id, request).await {
                Ok((o, timing)) => {
                    stats.add_draft(&o, timing, t0.elapsed().as_secs_f64());
                    if d.wants_pool_delta() {
                        pool.insert_all(&o.harvested);
                    }
                    drafted = o.tokens;
                    drafted.truncate(params.gamma.min(budget));
                }
                Err(e) => {
                    stats.fall_back(format!("draft failed: {e}"));
                    sessions.draft = None;
                }
            }
        }
        delta.clear();
        let mut tree = DraftTree::new(*text.last().expect("prompt is not empty"));
        let chain = tree.add_path(0, &drafted);
        let tip = chain.last().copied().unwrap_or(0);
        let key = *drafted.last().unwrap_or(tree.tokens.first().expect("root"));
        let mut candidates: Vec<(Vec<u32>, Vec<usize>)> = Vec::new();
        if ouroboros && params.topk > 0 {
            let room_after = budget.saturating_sub(drafted.len());
            let found = pool.newest(key, params.topk);
            stats.pool_lookups += 1;
            if !found.is_empty() {
                stats.pool_hits += 1;
            }
            for c in found {
                // Every node takes a cache row until the walk: stay within `room` nodes.
                let fit = room.saturating_sub(tree.len()).min(room_after);
                let c: Vec<u32> = c.into_iter().take(fit).collect();
                if !c.is_empty() {
                    let nodes = tree.add_path(tip, &c);
                    candidates.push((c, nodes));
                }
            }
        }
        let mut from_trie = Vec::new();
        if use_trie && budget > 0 {
            // Continuations of the committed text, beside (and, where they agree, through)
            // the draft chain.
            let nodes = params.trie_budget.min(room.saturating_sub(tree.len()));
            let found = trie.draft(prompt_trie.as_ref(), &text, nodes, budget);
            stats.trie_lookups += 1;
            if !found.is_empty() {
                stats.trie_hits += 1;
            }
            let before = tree.len();
            let attached = found.attach(&mut tree);
            stats.trie_nodes += (tree.len() - before) as u64;
            from_trie = vec![false; tree.len()];
            for n in attached {
                from_trie[n] = true;
            }
        }
        let t0 = Instant::now();
        let (v, timing) = sessions
            .target
            .verify(sessions.target_id, &tree, &params.sampling)
            .await?;
        stats.add_verify(timing, t0.elapsed().as_secs_f64(), tree.len());
        // The walk may leave the chain at any node when other paths hang off the root.
        let on_chain = v
            .path
            .iter()
            .zip(&chain)
            .take_while(|(a, b)| a == b)
            .count();
        stats.add_acceptance(drafted.len(), on_chain, v.path.len() - on_chain);
        stats.trie_accepted += v
            .path
            .iter()
            .filter(|&&n| from_trie.get(n) == Some(&true))
            .count() as u64;

        if learn {
            learnt.clear();
            if on_chain < drafted.len() {
                inspire_from_rejected_tail(
                    &drafted[on_chain..],
                    &chain[on_chain..],
                    &v.outputs,
                    g,
                    &mut learnt,
                );
            } else if !candidates.is_empty() {
                let first = v.outputs[tip];
                let refined: Vec<Vec<u32>> = candidates
                    .iter()
                    .filter(|(c, _)| c.len() == g)
                    .map(|(_, nodes)| {
                        std::iter::once(first)
                            .chain(nodes[..g - 1].iter().map(|&n| v.outputs[n]))
                            .collect()
                    })
                    .collect();
                pool.replace_newest(key, &refined);
                learnt.extend(refined.into_iter().map(|phrase| Ngram { key, phrase }));
            }
            pool.insert_all(&learnt);
        }

        let mut new = v.accepted;
        new.push(v.bonus);
        let finish = cut_at_end(&mut new, &params.eos, remaining);
        let before = text.len();
        text.extend_from_slice(&new);
        let recorded = out.len();
        out.extend_from_slice(&new);
        if use_trie {
            trie.record(&out, recorded);
        }
        for_draft.extend_from_slice(&new);
        if learn && params.harvest_committed {
            let from = before.saturating_sub(g);
            let grams: Vec<Ngram> = crate::pool::ngrams_of(&text[from..], g).collect();
            pool.insert_all(&grams);
            learnt.extend(grams);
        }
        if learn && sessions.draft.is_some_and(|(d, _)| d.wants_pool_delta()) {
            delta.append(&mut learnt);
        }
        if on_tokens(&new) == Flow::Stop {
            return Ok((out, FinishReason::Stop));
        }
        if let Some(f) = finish {
            return Ok((out, f));
        }
    }
}

/// Cuts newly committed tokens after the first stop id, and at the token budget.
fn cut_at_end(new: &mut Vec<u32>, eos: &[u32], remaining: usize) -> Option<FinishReason> {
    let mut finish = None;
    if let Some(i) = new.iter().position(|t| eos.contains(t)) {
        new.truncate(i + 1);
        finish = Some(FinishReason::Eos);
    }
    if new.len() >= remaining {
        new.truncate(remaining);
        finish = finish.or(Some(FinishReason::Length));
    }
    finish
}

/// Published-package "inspiration": after a rejection, the target's outputs over the
/// rejected draft tail form phrases, kept only while each target token was computed on a
/// context whose previous token the phrase agrees with.
fn inspire_from_rejected_tail(
    tail: &[u32],
    nodes: &[usize],
    outputs: &[u32],
    g: usize,
    learnt: &mut Vec<Ngram>,
) {
    let b: Vec<u32> = nodes.iter().map(|&n| outputs[n]).collect();
    for s in 0..tail.len() {
        let mut phrase = Vec::with_capacity(g);
        let mut t = s;
        while phrase.len() < g && t < b.len() {
            phrase.push(b[t]);
            if t + 1 >= tail.len() || tail[t + 1] != b[t] {
                break;
            }
            t += 1;
        }
        if phrase.len() == g {
            learnt.push(Ngram {
                key: tail[s],
                phrase,
            });
        }
    }
}

/// Lookahead decoding in the target model: the lookahead host's drafts are the target's
/// own greedy tokens, so they are committed as they come.
async fn lookahead_only<D: DraftBackend>(
    host: Option<&D>,
    prompt: &[u32],
    params: &DecodeParams,
    on_tokens: &mut (dyn FnMut(&[u32]) -> Flow + Send),
) -> Result<Generation> {
    let Some(host) = host else {
        return Err(SpecError::invalid(
            "the lookahead strategy needs the target model's lookahead host",
        ));
    };
    let started = Instant::now();
    let mut stats = SpecStats::new(Strategy::Lookahead);
    let max_pos = host.info().max_position;
    let id = host.open(prompt).await?;
    let mut out = Vec::new();
    let mut new_committed = Vec::new();
    let result = loop {
        let remaining = params.max_new_tokens - out.len();
        if prompt.len() + out.len() >= max_pos {
            break Ok(FinishReason::ContextFull);
        }
        let request = DraftRequest {
            new_committed: std::mem::take(&mut new_committed),
            gamma: 1,
            lookahead: Some(params.lookahead),
            pool_delta: Vec::new(),
            eos: params.eos.clone(),
        };
        let t0 = Instant::now();
        let (o, timing) = match host.draft(id, request).await {
            Ok(r) => r,
            Err(e) => break Err(e),
        };
        stats.add_lookahead(&o, timing, t0.elapsed().as_secs_f64());
        let mut new = o.tokens;
        if new.is_empty() {
            break Ok(FinishReason::ContextFull);
        }
        let finish = cut_at_end(&mut new, &params.eos, remaining);
        out.extend_from_slice(&new);
        new_committed.extend_from_slice(&new);
        if on_tokens(&new) == Flow::Stop {
            break Ok(FinishReason::Stop);
        }
        if let Some(f) = finish {
            break Ok(f);
        }
    };
    if let Err(e) = host.close(id).await {
        tracing::debug!("closing lookahead session: {e}");
    }
    stats.total_s = started.elapsed().as_secs_f64();
    stats.committed = out.len() as u64;
    Ok(Generation {
        tokens: out,
        finish: result?,
        stats,
    })
}
