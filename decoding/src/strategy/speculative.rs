//! Classic speculative decoding: the draft model decodes up to `gamma` tokens, one per
//! forward (stopping early once its own confidence falls below `draft_stop`), and the
//! target verifies the chain in one forward.

use super::{DraftShape, Round, call_draft};
use crate::backend::{DraftBackend, TargetBackend};
use crate::generate::{Loop, OpenSessions};
use crate::params::DecodeParams;
use crate::pool::PhrasePool;
use crate::stats::SpecStats;

/// How a round asks the draft (before the budget caps `gamma`).
pub(crate) fn draft_shape(params: &DecodeParams) -> DraftShape {
    DraftShape {
        gamma: params.gamma,
        lookahead: false,
        stop_below: params.draft_stop,
    }
}

pub(crate) async fn round<T: TargetBackend, D: DraftBackend>(
    sessions: &mut OpenSessions<'_, T, D>,
    stats: &mut SpecStats,
    pool: &PhrasePool,
    state: &mut Loop<'_>,
    root: u32,
    budget: usize,
) -> Round {
    let shape = draft_shape(state.params).capped(budget);
    let drafted = match shape.gamma {
        0 => Vec::new(),
        _ => call_draft(sessions, stats, pool, state, shape).await.0,
    };
    Round::chain(root, drafted)
}
