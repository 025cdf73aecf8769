//! Overlapped drafting (PEARL's post-verify, Liu et al. 2024), for the strategies whose
//! rounds are a draft chain (speculative, Ouroboros) when `DecodeParams::overlap` is on.
//!
//! While the target verifies round n's chain, the draft drafts round n+1 from the chain's
//! end, as if the target accepted all of it: the call sends the chain as committed. When
//! the verdict comes, the committed tokens either begin with the whole chain (the early
//! call may be worth its work: the loop waits for it), or they do not, and the loop stops
//! the early call where it is, without waiting (the draft ends a call whose caller left
//! at its next forward). The early work is used when the committed tokens go on as the
//! draft went on (the target's bonus token is the draft's first token, and any pool
//! candidates it accepted after the chain are the draft's next ones): what the draft
//! drafted beyond them is round n+1's chain without another draft call. Otherwise the
//! next draft call sends the committed tokens again from where the early call began
//! (`start`), which is right whether or not a cancelled call ever reached the draft, and
//! the draft keeps its cache where the two agree. The target decides every committed
//! token either way, so the output is the same as without overlap.
//!
//! The early call drafts as the round's own call did (its `gamma`, plus the token the bonus
//! takes): a call the verdict throws away is stopped there, so a long one costs little
//! when it is wasted, and a chain as long as the serial loop's when it is used.
//!
//! When an early call's work is thrown away, the next round does not wait for a fresh
//! chain: it verifies without one (the root alone; for Ouroboros, with its pool and trie
//! candidates), a plain step of the target, while the draft drafts from the text so far
//! beside it, as an early call for a round whose chain is empty. The step commits the
//! target's next token; when the draft's first token is that token, the rest of its call
//! is the next round's chain. So the target takes a step where it would have idled while
//! the draft drafted (PEARL's pre-verify, in its simplest form).
//!
//! The first round's draft call needs only the prompt: with overlap it runs beside the
//! target's prefill ([`first_call`]), the draft's own prefill with it.

use super::{DraftShape, Round, drop_draft, ouroboros, record_draft, speculative};
use crate::backend::{DraftBackend, DraftOutcome, DraftRequest, ServerTiming};
use crate::backend::{SessionId, TargetBackend};
use crate::error::Result;
use crate::generate::{Loop, OpenSessions};
use crate::params::{DecodeParams, Strategy};
use crate::pool::{Ngram, PhrasePool};
use crate::stats::SpecStats;
use std::time::Instant;
use tracing::Instrument;

/// What an overlapped call sent, to send again when its work is not used.
pub(crate) struct EarlyCall {
    /// Where its committed tokens began in the text.
    start: usize,
    /// The committed tokens it sent before the chain.
    unseen: Vec<u32>,
    /// The pool phrases it carried: sent again when the call was cancelled, since it may
    /// never have reached the draft.
    pool_delta: Vec<Ngram>,
}

/// The draft call to run beside the verify of `round`, if overlap is on and the round
/// has a draft chain; `share_pool` says whether the draft keeps a pool replica of its own.
/// `remaining` tokens may still be committed before this round: the call drafts no more
/// than the next round could verify, and none where this round may be the last.
pub(crate) fn request(
    state: &mut Loop<'_>,
    round: &Round,
    share_pool: bool,
    remaining: usize,
) -> Option<DraftRequest> {
    let shape = state.last_draft?;
    let chains = matches!(
        state.params.strategy,
        Strategy::Speculative | Strategy::Ouroboros
    );
    let step = std::mem::take(&mut state.step_beside_draft);
    if !state.params.overlap || !chains || (round.drafted.is_empty() && !step) {
        return None;
    }
    // After this round's chain and bonus the next round's chain has room for `next`
    // tokens (one more is its own bonus).
    let next = remaining.saturating_sub(round.drafted.len() + 2);
    if next == 0 {
        return None;
    }
    let unseen = std::mem::take(&mut state.for_draft);
    let mut new_committed = unseen.clone();
    new_committed.extend_from_slice(&round.drafted);
    let pool_delta = match share_pool {
        true => std::mem::take(&mut state.delta),
        false => Vec::new(),
    };
    // The draft holds the chain for certain only once the target has taken it.
    state.early = Some(EarlyCall {
        start: state.draft_holds,
        unseen,
        pool_delta: pool_delta.clone(),
    });
    // One more token: the first is the bonus token when all goes well.
    let shape = DraftShape {
        gamma: shape.gamma.min(next) + 1,
        ..shape
    };
    let start = Some(state.draft_holds);
    Some(shape.request(state.params, start, new_committed, pool_delta))
}

/// The first round's draft call, made beside the target's prefill: the draft's session
/// opened on the prompt, and the call's outcome with its wall seconds where it opened.
pub(crate) struct FirstCall {
    session: Result<SessionId>,
    drafted: Option<(Result<(DraftOutcome, ServerTiming)>, f64)>,
    shape: DraftShape,
}

impl FirstCall {
    /// The draft's session, where it opened.
    pub(crate) fn session(&self) -> Option<SessionId> {
        self.session.as_ref().ok().copied()
    }
}

/// How the first round asks the draft, where its call goes beside the prefill (overlap,
/// and a strategy whose rounds draft a chain).
pub(crate) fn first_shape(params: &DecodeParams) -> Option<DraftShape> {
    let shape = match params.strategy {
        Strategy::Speculative => speculative::draft_shape(params),
        Strategy::Ouroboros => ouroboros::draft_shape(params),
        _ => return None,
    };
    // At most what may still be committed after the round's bonus token.
    let shape = shape.capped(params.max_new_tokens.saturating_sub(1));
    (params.overlap && shape.gamma > 0).then_some(shape)
}

/// Opens the draft's session on `prompt` and drafts the first round's chain (`shape`).
pub(crate) async fn first_call<D: DraftBackend>(
    draft: &D,
    prompt: &[u32],
    params: &DecodeParams,
    shape: DraftShape,
) -> FirstCall {
    let t0 = Instant::now();
    let session = draft.open(prompt).await;
    let drafted = match &session {
        Ok(id) => {
            let request = shape.request(params, None, Vec::new(), Vec::new());
            let span = tracing::debug_span!("draft beside the prefill", gamma = shape.gamma);
            let r = draft.draft(*id, request).instrument(span).await;
            Some((r, t0.elapsed().as_secs_f64()))
        }
        Err(_) => None,
    };
    FirstCall {
        session,
        drafted,
        shape,
    }
}

/// Takes the first call's session into `sessions` (or says in `stats` why the request
/// goes on target-only) and returns its chain and confidence, for the first round.
pub(crate) fn take_first<'d, T: TargetBackend, D: DraftBackend>(
    first: FirstCall,
    draft: &'d D,
    sessions: &mut OpenSessions<'d, T, D>,
    stats: &mut SpecStats,
    pool: &PhrasePool,
    prompt: &[u32],
) -> Option<(Vec<u32>, Vec<f32>)> {
    let id = match first.session {
        Ok(id) => id,
        Err(e) => {
            stats.fall_back(format!("draft open failed: {e}"));
            return None;
        }
    };
    stats.add_draft_open(prompt.len());
    sessions.draft = Some((draft, id));
    match first.drafted? {
        (Ok((o, timing)), wall) => {
            let (lookahead, replica) = (first.shape.lookahead, draft.wants_pool_delta());
            record_draft(stats, pool, (&o, timing, wall), lookahead, replica);
            Some((o.tokens, o.confidence))
        }
        (Err(e), _) => {
            drop_draft(sessions, stats, &e);
            None
        }
    }
}

/// Whether the early call beside `round` can still be of use once `new` (the round's
/// committed tokens) is known: only if they begin with the whole chain and go on past it.
pub(crate) fn may_use(round: &Round, new: &[u32]) -> bool {
    let chain = round.drafted.len();
    new.len() > chain && new[..chain] == round.drafted[..]
}

/// What the overlapped call was worth now that `new` (the round's committed tokens) is
/// known: `early` is its outcome, or `None` when the loop cancelled it. The next round's
/// chain when the draft went the target's way, else the committed tokens sent again from
/// where the call began. Returns whether the work was used.
pub(crate) fn settle(
    state: &mut Loop<'_>,
    stats: &mut SpecStats,
    pool: &PhrasePool,
    round: &Round,
    new: &[u32],
    early: Option<(DraftOutcome, ServerTiming, f64)>,
    share_pool: bool,
) -> bool {
    let Some(call) = state.early.take() else {
        // No early call was made: the committed tokens go to the next call as usual.
        state.for_draft.extend_from_slice(new);
        return false;
    };
    match early {
        Some((outcome, timing, wall)) => {
            let lookahead = state.last_draft.is_some_and(|s| s.lookahead);
            record_draft(stats, pool, (&outcome, timing, wall), lookahead, share_pool);
            let beyond = new.get(round.drafted.len()..).unwrap_or_default();
            if may_use(round, new) && outcome.tokens.starts_with(beyond) {
                // The draft holds the chain as committed and `beyond` as its own first
                // tokens: sent as committed with the next call, they keep their cache
                // entries.
                let (tokens, confidence) = (outcome.tokens, outcome.confidence);
                state.predrafted = Some((
                    tokens[beyond.len()..].to_vec(),
                    confidence.get(beyond.len()..).unwrap_or_default().to_vec(),
                ));
                state.draft_holds = call.start + call.unseen.len() + round.drafted.len();
                state.for_draft = beyond.to_vec();
                stats.overlap_used += 1;
                return true;
            }
        }
        None => {
            stats.overlap_cancelled += 1;
            let mut delta = call.pool_delta;
            delta.append(&mut state.delta);
            state.delta = delta;
        }
    }
    state.draft_holds = call.start;
    state.for_draft = call.unseen;
    state.for_draft.extend_from_slice(new);
    state.predrafted = None;
    state.step_beside_draft = true;
    stats.overlap_discarded += 1;
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::DecodeParams;
    use crate::pool::PoolConfig;

    fn phrase(key: u32) -> Ngram {
        Ngram {
            key,
            phrase: vec![key + 1, key + 2],
        }
    }

    static PARAMS: std::sync::LazyLock<DecodeParams> = std::sync::LazyLock::new(|| DecodeParams {
        strategy: Strategy::Ouroboros,
        overlap: true,
        ..DecodeParams::default()
    });

    /// The loop before a round: committed tokens 7 8 the draft has not seen (the text
    /// holds 20 tokens), the last call drafting 4 with lookahead, `delta` for the replica.
    fn loop_before(delta: Vec<Ngram>) -> Loop<'static> {
        Loop {
            params: &PARAMS,
            prompt_trie: None,
            for_draft: vec![7, 8],
            draft_holds: 18,
            delta,
            early: None,
            predrafted: None,
            last_draft: Some(DraftShape {
                gamma: 4,
                lookahead: true,
                stop_below: 0.0,
            }),
            step_beside_draft: false,
        }
    }

    /// The early call of a round whose chain is 1 2 3, with committed tokens 7 8 the draft
    /// has not seen (the text holds 20 tokens) and phrase 10 learnt for its replica; then
    /// the verdict `new` and the call's end (`None`: cancelled), with phrase 30 learnt in
    /// between. Returns the state after, whether the work was used, and the request.
    fn one_round(
        new: &[u32],
        outcome: Option<Vec<u32>>,
    ) -> (Loop<'static>, SpecStats, bool, DraftRequest) {
        let mut state = loop_before(vec![phrase(10)]);
        let mut stats = SpecStats::default();
        let round = Round::chain(5, vec![1, 2, 3]);
        let request = request(&mut state, &round, true, 100).expect("overlap is on");
        state.delta.push(phrase(30));
        let pool = PhrasePool::new(PoolConfig {
            phrase_len: 2,
            per_key: 4,
            max_phrases: 100,
        });
        let early = outcome.map(|tokens| {
            let outcome = DraftOutcome {
                tokens,
                ..DraftOutcome::default()
            };
            (outcome, ServerTiming::default(), 0.01)
        });
        let used = settle(&mut state, &mut stats, &pool, &round, new, early, true);
        (state, stats, used, request)
    }

    #[test]
    fn the_early_call_sends_the_chain_as_committed_with_what_the_draft_lacks() {
        let (_, _, _, request) = one_round(&[1, 2, 3, 4], None);
        assert_eq!(request.new_committed, [7, 8, 1, 2, 3]);
        assert_eq!(
            request.start,
            Some(18),
            "where the draft's certain tokens end"
        );
        assert_eq!(request.pool_delta, [phrase(10)]);
        assert_eq!(
            request.length.tokens(),
            5,
            "the round's gamma, plus the bonus's token"
        );
    }

    #[test]
    fn work_the_target_went_along_with_is_the_next_chain() {
        let (state, stats, used, _) = one_round(&[1, 2, 3, 4], Some(vec![4, 5, 6]));
        assert!(used);
        assert_eq!(state.predrafted, Some((vec![5, 6], vec![])));
        // The draft holds the chain for certain now: 18 + 7 8 + 1 2 3.
        assert_eq!((state.for_draft, state.draft_holds), (vec![4], 23));
        assert_eq!((stats.overlap_used, stats.overlap_discarded), (1, 0));
    }

    /// A call that ran, whose chain the target cut short: the committed tokens go again
    /// from where the call began (18: the text's 20 less the 2 it sent before the chain).
    #[test]
    fn work_the_target_did_not_take_is_taken_back_from_where_the_call_began() {
        for (new, outcome) in [(&[1, 9][..], vec![2, 3]), (&[1, 2, 3, 4], vec![6, 7])] {
            let (state, stats, used, _) = one_round(new, Some(outcome));
            assert!(!used);
            let resent = [&[7, 8][..], new].concat();
            assert_eq!((state.for_draft, state.draft_holds), (resent, 18));
            assert_eq!(state.predrafted, None);
            assert_eq!(state.delta, [phrase(30)], "the call delivered phrase 10");
            assert_eq!(stats.overlap_discarded, 1);
            assert_eq!(stats.overlap_cancelled, 0);
        }
    }

    /// A call stopped at the verdict may never have reached the draft: its phrases go
    /// again, before the ones learnt since, and its tokens go from where it began.
    #[test]
    fn a_cancelled_call_is_sent_again_phrases_and_all() {
        let (state, stats, used, _) = one_round(&[1, 9], None);
        assert!(!used);
        assert_eq!((state.for_draft, state.draft_holds), (vec![7, 8, 1, 9], 18));
        assert_eq!(state.delta, [phrase(10), phrase(30)]);
        assert_eq!((stats.overlap_discarded, stats.overlap_cancelled), (1, 1));
    }

    /// After work thrown away the next round is a plain step with the draft's call
    /// beside it: the call sends the committed tokens the draft lacks and nothing ahead of
    /// the verdict; the step's token is then the first the draft must have drafted.
    #[test]
    fn after_work_thrown_away_the_draft_drafts_beside_a_plain_step() {
        let (mut state, mut stats, _, _) = one_round(&[1, 9], None);
        assert!(state.step_beside_draft);
        let step = Round::chain(9, Vec::new());
        let call = request(&mut state, &step, true, 100).expect("a call beside the step");
        assert!(!state.step_beside_draft, "one step per thrown-away call");
        assert_eq!(call.new_committed, [7, 8, 1, 9]);
        assert_eq!(call.start, Some(18));
        assert!(
            may_use(&step, &[4]),
            "any committed token may be the draft's first"
        );
        let pool = PhrasePool::new(PoolConfig {
            phrase_len: 3,
            per_key: 4,
            max_phrases: 100,
        });
        let drafted = Some((
            DraftOutcome {
                tokens: vec![4, 5, 6],
                ..DraftOutcome::default()
            },
            ServerTiming::default(),
            0.01,
        ));
        assert!(settle(
            &mut state,
            &mut stats,
            &pool,
            &step,
            &[4],
            drafted,
            true
        ));
        assert_eq!(state.predrafted, Some((vec![5, 6], vec![])));
        assert_eq!((state.for_draft, state.draft_holds), (vec![4], 22));
        // Without thrown-away work, a round without a chain has no call beside it.
        let (mut used, ..) = one_round(&[1, 2, 3, 4], Some(vec![4, 5, 6]));
        assert!(request(&mut used, &step, true, 100).is_none());
    }

    /// Near the token budget the call drafts only what the next round could verify, and
    /// no call goes beside a round that may be the request's last.
    #[test]
    fn the_early_call_stays_within_the_token_budget() {
        let round = Round::chain(5, vec![1, 2, 3]);
        let gamma = |remaining| {
            let mut state = loop_before(Vec::new());
            request(&mut state, &round, true, remaining).map(|r| r.length.tokens())
        };
        // The chain (3), its bonus and 4 more tokens: a whole next chain, plus the bonus's
        // stand-in.
        assert_eq!(gamma(9), Some(5));
        // Room for one more chain token after this round: the stand-in and that token.
        assert_eq!(gamma(6), Some(2));
        // This round's chain and bonus may end the request (or leave a plain step).
        assert_eq!(gamma(5), None);
        assert_eq!(gamma(4), None);
    }

    #[test]
    fn the_loop_waits_only_for_a_call_whose_chain_the_target_took_whole() {
        let round = Round::chain(5, vec![1, 2, 3]);
        assert!(may_use(&round, &[1, 2, 3, 4]));
        assert!(may_use(&round, &[1, 2, 3, 4, 8]));
        assert!(
            !may_use(&round, &[1, 2, 3]),
            "the draft's first token is past the end"
        );
        assert!(!may_use(&round, &[1, 2, 4]));
        assert!(!may_use(&round, &[9]));
    }
}
