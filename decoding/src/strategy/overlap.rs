//! Overlapped drafting (PEARL's post-verify, Liu et al. 2024), for the strategies whose
//! rounds are a draft chain (speculative, Ouroboros) when `DecodeParams::overlap` is on.
//!
//! While the target verifies round n's chain, the draft drafts round n+1 from the chain's
//! end, as if the target accepted all of it: the call sends the chain as committed. When
//! the verdict comes, the committed tokens either begin with the whole chain and go on as
//! the draft went on (the target's bonus token is the draft's first token, and any pool
//! candidates it accepted after the chain are the draft's next ones), and what the draft
//! drafted beyond them is round n+1's chain without another draft call; or they do not,
//! and the next draft call takes the chain back (`rewind`) before it sends what was really
//! committed, the draft keeping its cache where the two agree. The target decides every
//! committed token either way, so the output is the same as without overlap.
//!
//! How far the early call drafts: as far as the draft gets while the target verifies (the
//! request's mean verify time over its mean draft forward time, PEARL's speed ratio), at
//! most the round's own length, plus the token the bonus takes. A call that runs past the
//! verify delays the next round, and more so when the verdict throws it away; one that
//! ends with the verify costs nothing either way.

use super::Round;
use crate::backend::{DraftLength, DraftOutcome, DraftRequest, ServerTiming};
use crate::generate::Loop;
use crate::params::Strategy;
use crate::pool::PhrasePool;
use crate::stats::SpecStats;

/// How the last draft call asked, for the overlapped call that repeats it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct DraftShape {
    pub gamma: usize,
    pub lookahead: bool,
    pub stop_below: f32,
}

/// The draft call to run beside the verify of `round`, if overlap is on and the round
/// has a draft chain; `share_pool` says whether the draft keeps a pool replica of its own.
pub(crate) fn request(
    state: &mut Loop<'_>,
    stats: &SpecStats,
    round: &Round,
    share_pool: bool,
) -> Option<DraftRequest> {
    let shape = state.last_draft?;
    let chains = matches!(
        state.params.strategy,
        Strategy::Speculative | Strategy::Ouroboros
    );
    if !state.params.overlap || !chains || round.drafted.is_empty() {
        return None;
    }
    let tokens = fits_in_a_verify(stats).map_or(shape.gamma, |n| n.clamp(1, shape.gamma));
    let mut new_committed = std::mem::take(&mut state.for_draft);
    new_committed.extend_from_slice(&round.drafted);
    let share_pool = shape.lookahead && share_pool;
    Some(DraftRequest {
        new_committed,
        rewind: std::mem::take(&mut state.rewind),
        // One more: the first is the bonus token when all goes well.
        length: DraftLength::new(tokens + 1, shape.stop_below),
        lookahead: shape.lookahead.then_some(state.params.lookahead),
        pool_delta: match share_pool {
            true => std::mem::take(&mut state.delta),
            false => Vec::new(),
        },
        eos: state.params.eos.clone(),
    })
}

/// Draft forwards that fit in one verify, by the request's means so far (None before
/// both were timed).
fn fits_in_a_verify(stats: &SpecStats) -> Option<usize> {
    if stats.target_forwards == 0 || stats.draft_forwards == 0 || stats.draft_s <= 0.0 {
        return None;
    }
    let verify = stats.verify_s / stats.target_forwards as f64;
    let forward = stats.draft_s / stats.draft_forwards as f64;
    // (A hair added so that a ratio of 3 computed as 2.999... counts 3.)
    Some((verify / forward + 1e-9).floor() as usize)
}

/// What the overlapped call `outcome` is worth now that `new` (the round's committed
/// tokens) is known: the next round's chain when the draft went the target's way, else
/// the chain taken back at the next call. Returns whether the work was used.
pub(crate) fn settle(
    state: &mut Loop<'_>,
    stats: &mut SpecStats,
    pool: &PhrasePool,
    round: &Round,
    new: &[u32],
    (outcome, timing, wall): (DraftOutcome, ServerTiming, f64),
    share_pool: bool,
) -> bool {
    stats.add_draft(&outcome, timing, wall);
    if share_pool && state.last_draft.is_some_and(|s| s.lookahead) {
        pool.insert_all(&outcome.harvested);
    }
    let chain = round.drafted.len();
    let beyond = new.get(chain..).unwrap_or_default();
    let went_our_way = new.len() > chain
        && new[..chain] == round.drafted[..]
        && outcome.tokens.starts_with(beyond);
    if went_our_way {
        // The draft holds the chain as committed and `beyond` as its own first tokens:
        // sent as committed with the next call, they keep their cache entries.
        let (tokens, confidence) = (outcome.tokens, outcome.confidence);
        state.predrafted = Some((
            tokens[beyond.len()..].to_vec(),
            confidence.get(beyond.len()..).unwrap_or_default().to_vec(),
        ));
        state.for_draft = beyond.to_vec();
        stats.overlap_used += 1;
    } else {
        state.rewind = chain;
        state.for_draft = new.to_vec();
        state.predrafted = None;
        stats.overlap_discarded += 1;
    }
    went_our_way
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_early_call_drafts_what_fits_in_a_verify() {
        let mut stats = SpecStats::default();
        assert_eq!(fits_in_a_verify(&stats), None, "nothing timed yet");
        // 4 verifies of 0.3 s, 10 draft forwards of 0.1 s: three fit in a verify.
        (stats.target_forwards, stats.verify_s) = (4, 1.2);
        assert_eq!(fits_in_a_verify(&stats), None, "the draft not timed yet");
        (stats.draft_forwards, stats.draft_s) = (10, 1.0);
        assert_eq!(fits_in_a_verify(&stats), Some(3));
        // A draft slower than the target: none fits (the call still drafts one).
        stats.draft_s = 20.0;
        assert_eq!(fits_in_a_verify(&stats), Some(0));
    }
}
