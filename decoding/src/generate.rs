//! The commit loop, written once over [`TargetBackend`] and [`DraftBackend`] for every
//! strategy: each round asks the strategy's round builder ([`crate::strategy`]) for a
//! verify tree, has the target verify it, and commits the accepted tokens plus the
//! target's own next token. This is the only code that commits tokens, cuts at EOS, the
//! token budget or a stop from the sink, records each token's source, and feeds the
//! shared trie. Every committed token is the target's own choice for its exact prefix, so
//! every strategy gives the tokens plain decoding gives.

use crate::auto::AutoTuner;
use crate::backend::{DraftBackend, SessionId, TargetBackend};
use crate::error::{DecodingError, Result};
use crate::logprobs::TokenLogprobs;
use crate::params::{
    DecodeParams, FinishReason, Flow, Generation, Strategy, TokenSink, TokenSource,
};
use crate::pool::{Ngram, PhrasePool};
use crate::stats::SpecStats;
use crate::strategy::{Rounds, Verdict, lookahead, overlap};
use crate::trie::{PromptTrie, TrieCache};
use futures::future::Either;
use std::time::Instant;
use tracing::Instrument;

pub(crate) struct OpenSessions<'a, T: TargetBackend, D: DraftBackend> {
    pub target: &'a T,
    pub target_id: SessionId,
    pub draft: Option<(&'a D, SessionId)>,
    /// A draft not opened yet: `auto` opens it the first time drafting pays.
    pub spare: Option<&'a D>,
}

impl<T: TargetBackend, D: DraftBackend> OpenSessions<'_, T, D> {
    /// Whether a draft is open or can still be opened.
    pub fn can_draft(&self) -> bool {
        self.draft.is_some() || self.spare.is_some()
    }

    /// Whether the draft, open or still to be opened, keeps a pool replica of its own that
    /// the calls' `pool_delta` keeps current.
    pub fn draft_has_replica(&self) -> bool {
        let draft = self.draft.map(|(d, _)| d).or(self.spare);
        draft.is_some_and(|d| d.wants_pool_delta())
    }

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

/// What requests share: the phrase pool, the output trie, and the `auto` strategy's cost
/// profile and acceptance counts (`None` where no profile was measured).
#[derive(Clone, Copy)]
pub struct Shared<'a> {
    pub pool: &'a PhrasePool,
    pub trie: &'a TrieCache,
    pub tuner: Option<&'a AutoTuner>,
}

/// Runs one request. `draft` is the draft model for speculative/Ouroboros/auto, or the
/// target model's own lookahead host for [`Strategy::Lookahead`]; when it is missing or
/// fails, the loop carries on target-only (still exact) and says so in the statistics.
/// `on_tokens` sees every batch of committed tokens as soon as it is known. What `shared`
/// holds only changes how often guesses hit, never the tokens.
pub async fn generate<T: TargetBackend, D: DraftBackend>(
    target: &T,
    draft: Option<&D>,
    shared: Shared<'_>,
    prompt: &[u32],
    params: &DecodeParams,
    on_tokens: &mut TokenSink<'_>,
) -> Result<Generation> {
    params.validate()?;
    if prompt.is_empty() {
        return Err(DecodingError::invalid("the prompt has no tokens"));
    }
    let info = target.info();
    if prompt.len() >= info.max_position {
        return Err(DecodingError::invalid(format!(
            "the prompt has {} tokens; the target's context is {}",
            prompt.len(),
            info.max_position
        )));
    }
    if params.strategy == Strategy::Auto && shared.tuner.is_none() {
        return Err(DecodingError::invalid(
            "the auto strategy needs a cost profile, and none was measured here",
        ));
    }
    if params.strategy == Strategy::Lookahead {
        return lookahead::run(draft, prompt, params, on_tokens).await;
    }
    let started = Instant::now();
    let mut stats = SpecStats::new(params.strategy);
    let prefill = async {
        let id = target
            .open(prompt)
            .instrument(tracing::debug_span!("prefill", tokens = prompt.len()))
            .await;
        (id, started.elapsed().as_secs_f64())
    };
    // Overlap: the draft's first call needs only the prompt, so it runs beside the prefill.
    let ((target_id, prefill_s), first) = match draft.zip(overlap::first_shape(params)) {
        Some((d, shape)) => {
            let first = overlap::first_call(d, prompt, params, shape);
            let (opened, first) = futures::future::join(prefill, first).await;
            (opened, Some(first))
        }
        None => (prefill.await, None),
    };
    let target_id = match target_id {
        Ok(id) => id,
        Err(e) => {
            if let (Some(d), Some(id)) = (draft, first.as_ref().and_then(|f| f.session())) {
                let _ = d.close(id).await;
            }
            return Err(e);
        }
    };
    stats.prefill_s = prefill_s;
    stats.calls.push(crate::stats::ModelCall::Prefill {
        rows: prompt.len().saturating_sub(1) as u32,
    });
    let mut sessions = OpenSessions {
        target,
        target_id,
        draft: None,
        spare: None,
    };
    let mut predrafted = None;
    if params.strategy == Strategy::Auto {
        sessions.spare = draft;
    } else if params.strategy.needs_draft() {
        match (draft, first) {
            (Some(d), Some(f)) => {
                predrafted =
                    overlap::take_first(f, d, &mut sessions, &mut stats, shared.pool, prompt);
            }
            (Some(d), None) => match d.open(prompt).await {
                Ok(id) => {
                    stats.add_draft_open(prompt.len());
                    sessions.draft = Some((d, id));
                }
                Err(e) => stats.fall_back(format!("draft open failed: {e}")),
            },
            (None, _) => stats.fall_back("no draft backend".to_string()),
        }
    }
    let mut done = Committed::default();
    let r = commit_loop(
        &mut sessions,
        &mut stats,
        shared,
        prompt,
        Loop::new(params, shared, prompt, predrafted),
        on_tokens,
        &mut done,
    )
    .await;
    sessions.close().await;
    stats.total_s = started.elapsed().as_secs_f64();
    if stats.trie_lookups > 0 {
        stats.trie_cache_nodes = shared.trie.len() as u64;
        stats.trie_cache_bytes = shared.trie.approx_bytes() as u64;
    }
    let finish = r?;
    stats.committed = done.tokens.len() as u64;
    Ok(Generation {
        tokens: done.tokens,
        sources: done.sources,
        finish,
        stats,
        logprobs: done.logprobs,
    })
}

/// What a request has committed: tokens, their sources and (where asked) their
/// log-probabilities, parallel.
#[derive(Default)]
struct Committed {
    tokens: Vec<u32>,
    sources: Vec<TokenSource>,
    logprobs: Vec<TokenLogprobs>,
}

/// Per-request state of the loop that the round builders read and write.
pub(crate) struct Loop<'p> {
    pub params: &'p DecodeParams,
    pub prompt_trie: Option<PromptTrie>,
    /// Committed tokens the draft has not seen yet (or may not have: see `draft_holds`).
    pub for_draft: Vec<u32>,
    /// How many committed tokens the draft's session holds for certain: where its next
    /// call's committed tokens begin (every call says so, as the protocol's `start`, so
    /// that tokens sent ahead of the verdict, or a stopped call that reached the draft
    /// late, are taken back there). With `for_draft` after them, the whole text.
    pub draft_holds: usize,
    /// Phrases learnt since the last draft call, for a remote draft's pool replica.
    pub delta: Vec<Ngram>,
    /// The overlapped draft call under way beside the verify, if any.
    pub early: Option<crate::strategy::overlap::EarlyCall>,
    /// The next round's draft chain (and its confidence), drafted while the last verify
    /// ran (overlap).
    pub predrafted: Option<(Vec<u32>, Vec<f32>)>,
    /// How the last draft call asked.
    pub last_draft: Option<crate::strategy::DraftShape>,
    /// The next round verifies without a draft chain while the draft drafts beside it
    /// (overlap, after an early call's work was thrown away): see
    /// [`crate::strategy::overlap`].
    pub step_beside_draft: bool,
}

impl<'p> Loop<'p> {
    /// A request's state before its first round; `predrafted` is the first round's chain
    /// where it was drafted beside the prefill.
    fn new(
        params: &'p DecodeParams,
        shared: Shared<'_>,
        prompt: &[u32],
        predrafted: Option<(Vec<u32>, Vec<f32>)>,
    ) -> Self {
        let use_trie = Rounds::uses_trie(params);
        Self {
            params,
            prompt_trie: use_trie.then(|| PromptTrie::new(prompt, shared.trie.config())),
            for_draft: Vec::new(),
            draft_holds: prompt.len(),
            delta: Vec::new(),
            early: None,
            predrafted,
            last_draft: None,
            step_beside_draft: false,
        }
    }
}

async fn commit_loop<T: TargetBackend, D: DraftBackend>(
    sessions: &mut OpenSessions<'_, T, D>,
    stats: &mut SpecStats,
    shared: Shared<'_>,
    prompt: &[u32],
    mut state: Loop<'_>,
    on_tokens: &mut TokenSink<'_>,
    done: &mut Committed,
) -> Result<FinishReason> {
    let params = state.params;
    let max_pos = sessions.target.info().max_position;
    // The target's own limit on a tree (every strategy keeps its tree within `nodes`).
    let max_nodes = sessions
        .target
        .max_tree_nodes()
        .unwrap_or(usize::MAX)
        .max(1);
    // The loop's state holds the prompt's trie exactly when the strategy uses tries.
    let use_trie = state.prompt_trie.is_some();
    if let Some(p) = &state.prompt_trie {
        stats.trie_prompt_nodes = p.len() as u64;
    }
    let mut rounds = Rounds::new(params, shared, prompt);
    let mut text = prompt.to_vec();
    loop {
        let remaining = params.max_new_tokens - done.tokens.len();
        // Room for the tree below the context limit: the root sits at text.len() - 1.
        let room = max_pos.saturating_sub(text.len());
        if room == 0 {
            return Ok(FinishReason::ContextFull);
        }
        // A tree's nodes: below the context limit and within the target's limit.
        let nodes = room.min(max_nodes);
        // Drafting beyond what may still be committed is wasted work.
        let budget = remaining.saturating_sub(1).min(nodes - 1);
        // One span per round, parent of its draft call and its verify.
        let round_span = tracing::debug_span!(
            "round",
            nodes = tracing::field::Empty,
            accepted = tracing::field::Empty
        );
        let started = Instant::now();
        let first_call = stats.calls.len();
        let round = rounds
            .build(sessions, stats, shared, &mut state, &text, budget, nodes)
            .instrument(round_span.clone())
            .await;
        let tree = &round.tree;
        let t0 = Instant::now();
        let verify = async {
            let r = sessions
                .target
                .verify(sessions.target_id, tree, &params.sampling, params.logprobs)
                .instrument(tracing::debug_span!(parent: &round_span, "verify", nodes = tree.len()))
                .await;
            (r, t0.elapsed().as_secs_f64())
        };
        // Overlap: the draft drafts the next round while the target verifies this one.
        let share_pool = sessions.draft_has_replica();
        let mut early = sessions.draft.and_then(|(d, id)| {
            let request = overlap::request(&mut state, &round, share_pool, remaining)?;
            let span = tracing::debug_span!(parent: &round_span, "overlapped draft");
            Some(Box::pin(async move {
                let r = d.draft(id, request).instrument(span).await;
                (r, t0.elapsed().as_secs_f64())
            }))
        });
        // The early call's result if it ended before the verify.
        let mut early_done = None;
        let (verified, verify_s) = match early.as_mut() {
            Some(call) => {
                let verify = std::pin::pin!(verify);
                match futures::future::select(verify, call.as_mut()).await {
                    Either::Left((v, _)) => v,
                    Either::Right((e, verify)) => {
                        early_done = Some(e);
                        verify.await
                    }
                }
            }
            None => verify.await,
        };
        if early_done.is_some() {
            early = None;
        }
        let (v, timing) = verified?;
        round_span.record("nodes", tree.len());
        round_span.record("accepted", v.path.len());
        stats.add_verify(timing, verify_s, tree.len(), text.len() - 1);
        // The round's seconds as the strategy learns from them: the wall's, or under a
        // priced clock (a cost table standing in for other hardware) its calls' prices.
        let (verify_s, round_s) = match shared.tuner.and_then(AutoTuner::clock) {
            Some(clock) => {
                let calls = &stats.calls[first_call..];
                let context = text.len() - 1;
                let verify = clock.seconds(&calls[calls.len() - 1..], context);
                (verify, clock.seconds(calls, context))
            }
            None => (verify_s, started.elapsed().as_secs_f64()),
        };
        // The walk may leave the chain at any node when other paths hang off the root.
        let on_chain = v
            .path
            .iter()
            .zip(&round.chain)
            .take_while(|(a, b)| a == b)
            .count();
        let verdict = Verdict {
            outcome: &v,
            on_chain,
            verify_s,
            round_s,
            remaining,
            timing,
        };
        rounds.learn(shared.pool, &round, &verdict);
        let from_trie = |n: usize| round.from_trie.get(n) == Some(&true);

        let mut new = v.accepted;
        new.push(v.bonus);
        let mut new_sources: Vec<TokenSource> = v
            .path
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                if i < on_chain {
                    TokenSource::Draft
                } else if from_trie(n) {
                    TokenSource::Trie
                } else {
                    TokenSource::Pool
                }
            })
            .collect();
        new_sources.push(TokenSource::Target);
        let finish = cut_at_end(&mut new, &params.eos, remaining);
        new_sources.truncate(new.len());
        // The statistics count what was committed: accepted tokens past an EOS are not.
        let kept = v.path.len().min(new.len());
        let kept_on_chain = on_chain.min(kept);
        stats.add_acceptance(round.drafted.len(), kept_on_chain, kept - kept_on_chain);
        stats.trie_accepted += v.path[..kept].iter().filter(|&&n| from_trie(n)).count() as u64;
        if params.logprobs.is_some() {
            if v.logprobs.len() < new.len() {
                return Err(DecodingError::Backend(format!(
                    "the target returned {} log-probabilities for {} committed tokens",
                    v.logprobs.len(),
                    new.len()
                )));
            }
            done.logprobs.extend(v.logprobs.into_iter().take(new.len()));
        }
        let before = text.len();
        text.extend_from_slice(&new);
        let recorded = done.tokens.len();
        done.tokens.extend_from_slice(&new);
        if use_trie {
            shared.trie.record(&done.tokens, recorded);
        }
        // The early call: waited for if the target took the whole chain and the request
        // goes on, else stopped.
        let early = match (early_done, early) {
            (Some(e), _) => Some(e),
            (None, Some(call)) if finish.is_none() && overlap::may_use(&round, &new) => {
                Some(call.await)
            }
            _ => None,
        };
        match early
            .map(|(r, wall)| r.map(|(o, timing)| (o, timing, wall)))
            .transpose()
        {
            Err(e) => {
                crate::strategy::drop_draft(sessions, stats, &e);
                state.early = None;
            }
            Ok(early) => {
                let p = shared.pool;
                overlap::settle(&mut state, stats, p, &round, &new, early, share_pool);
            }
        }
        rounds.committed(shared.pool, stats, &text, before);
        done.sources.extend_from_slice(&new_sources);
        if on_tokens(&new, &new_sources) == Flow::Stop {
            return Ok(FinishReason::Stop);
        }
        if let Some(f) = finish {
            return Ok(f);
        }
    }
}

/// Cuts newly committed tokens after the first stop id, and at the token budget.
pub(crate) fn cut_at_end(
    new: &mut Vec<u32>,
    eos: &[u32],
    remaining: usize,
) -> Option<FinishReason> {
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
