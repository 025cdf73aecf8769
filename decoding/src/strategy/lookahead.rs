//! Lookahead decoding in the target model (the target-only baseline): the lookahead host
//! runs Jacobi decoding inside the target and verifies its own n-gram guesses, so its
//! tokens are the target's greedy tokens and are committed as they come, in a loop of
//! their own.

use crate::backend::{DraftBackend, DraftLength, DraftRequest};
use crate::error::{DecodingError, Result};
use crate::generate::cut_at_end;
use crate::params::{
    DecodeParams, FinishReason, Flow, Generation, Strategy, TokenSink, TokenSource,
};
use crate::stats::SpecStats;
use std::time::Instant;
use tracing::Instrument;

/// Lookahead decoding in the target model: the lookahead host's drafts are the target's
/// own greedy tokens, so they are committed as they come.
pub(crate) async fn run<D: DraftBackend>(
    host: Option<&D>,
    prompt: &[u32],
    params: &DecodeParams,
    on_tokens: &mut TokenSink<'_>,
) -> Result<Generation> {
    let Some(host) = host else {
        return Err(DecodingError::invalid(
            "the lookahead strategy needs the target model's lookahead host",
        ));
    };
    let started = Instant::now();
    let mut stats = SpecStats::new(Strategy::Lookahead);
    let max_pos = host.info().max_position;
    let id = host.open(prompt).await?;
    let mut out = Vec::new();
    let mut sources = Vec::new();
    let mut new_committed = Vec::new();
    let result = loop {
        let remaining = params.max_new_tokens - out.len();
        if prompt.len() + out.len() >= max_pos {
            break Ok(FinishReason::ContextFull);
        }
        let request = DraftRequest {
            new_committed: std::mem::take(&mut new_committed),
            start: None,
            length: DraftLength::AtLeast(1),
            lookahead: Some(params.lookahead),
            pool_delta: Vec::new(),
            eos: params.eos.clone(),
        };
        let t0 = Instant::now();
        let span = tracing::debug_span!("lookahead");
        let (o, timing) = match host.draft(id, request).instrument(span).await {
            Ok(r) => r,
            Err(e) => break Err(e),
        };
        let context = (prompt.len() + out.len()).saturating_sub(1);
        stats.add_lookahead(&o, timing, t0.elapsed().as_secs_f64(), context);
        let mut new = o.tokens;
        if new.is_empty() {
            break Ok(FinishReason::ContextFull);
        }
        let finish = cut_at_end(&mut new, &params.eos, remaining);
        // The host's first token is the model's own next token; the rest came through
        // its n-gram verification branch.
        let mut new_sources = vec![TokenSource::Pool; new.len()];
        if let Some(first) = new_sources.first_mut() {
            *first = TokenSource::Target;
        }
        out.extend_from_slice(&new);
        sources.extend_from_slice(&new_sources);
        new_committed.extend_from_slice(&new);
        if on_tokens(&new, &new_sources) == Flow::Stop {
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
        sources,
        finish: result?,
        stats,
        // Refused by validation: the host returns tokens without their distribution.
        logprobs: Vec::new(),
    })
}
