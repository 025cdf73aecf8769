//! Classic speculative decoding: the draft model decodes up to `gamma` tokens, one per
//! forward (stopping early once its own confidence falls below `draft_stop`), and the
//! target verifies the chain in one forward.

use super::{Round, call_draft};
use crate::backend::{DraftBackend, TargetBackend};
use crate::generate::{Loop, OpenSessions};
use crate::pool::PhrasePool;
use crate::stats::SpecStats;

pub(crate) async fn round<T: TargetBackend, D: DraftBackend>(
    sessions: &mut OpenSessions<'_, T, D>,
    stats: &mut SpecStats,
    pool: &PhrasePool,
    state: &mut Loop<'_>,
    root: u32,
    budget: usize,
) -> Round {
    let drafted = match budget {
        0 => Vec::new(),
        _ => {
            let (gamma, stop) = (state.params.gamma.min(budget), state.params.draft_stop);
            call_draft(sessions, stats, pool, state, gamma, false, stop)
                .await
                .0
        }
    };
    state.delta.clear();
    Round::chain(root, drafted)
}
