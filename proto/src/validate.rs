//! The internal requests checked where they enter a service: `TryFrom` a wire message into
//! the type the runtime takes, every structural rule checked once, errors naming the field
//! ([`decoding::validate::FieldError`]). What only the runtime knows (vocabulary, context,
//! its tree-size limit, the session) it checks itself, with the same error type.

use crate::convert::sampling_from_pb;
use crate::draft::v1 as draft_pb;
use crate::target::v1 as target_pb;
use decoding::validate::{FieldError, at_most, in_range, limits, unit_floor};
use decoding::{
    DecodingError, DraftLength, DraftRequest, DraftTree, LookaheadParams, Ngram, SamplingParams,
    SessionId,
};

/// A checked `Verify`: a well-formed tree and valid sampling.
#[derive(Debug, Clone)]
pub struct VerifyCall {
    pub session: SessionId,
    pub tree: DraftTree,
    pub sampling: SamplingParams,
    pub logprobs: Option<usize>,
}

impl TryFrom<target_pb::VerifyRequest> for VerifyCall {
    type Error = DecodingError;

    fn try_from(r: target_pb::VerifyRequest) -> Result<Self, Self::Error> {
        let sampling = sampling_from_pb(r.sampling.as_ref());
        sampling.validate()?;
        let logprobs = r.logprobs.map(|n| n as usize);
        decoding::logprobs::check(logprobs)?;
        Ok(Self {
            session: r.session_id,
            tree: DraftTree::from_parts(r.tokens, r.parents)?,
            sampling,
            logprobs,
        })
    }
}

/// A checked `Draft`: gamma, the confidence floor and the lookahead shape in range.
#[derive(Debug, Clone)]
pub struct DraftCall {
    pub session: SessionId,
    pub request: DraftRequest,
}

impl TryFrom<draft_pb::DraftRequest> for DraftCall {
    type Error = DecodingError;

    fn try_from(r: draft_pb::DraftRequest) -> Result<Self, Self::Error> {
        in_range("gamma", r.gamma as usize, 1..=limits::MAX_GAMMA)?;
        unit_floor("stop_below", r.stop_below)?;
        let lookahead = r.lookahead.as_ref().map(LookaheadParams::from);
        if let Some(la) = &lookahead {
            la.validate()?;
        }
        // The delta feeds a pool replica per phrase length: one length per call, one that
        // a lookahead level allows, and bounded in count.
        at_most("pool_delta", r.pool_delta.len(), limits::MAX_POOL_DELTA)?;
        if let Some(first) = r.pool_delta.first() {
            let len = first.tokens.len();
            let allowed = (*limits::LEVELS.start() - 1)..=(*limits::LEVELS.end() - 1);
            if let Some(i) = r
                .pool_delta
                .iter()
                .position(|p| p.tokens.len() != len || !allowed.contains(&p.tokens.len()))
            {
                return Err(FieldError::new(
                    format!("pool_delta[{i}].tokens"),
                    format!(
                        "{len} tokens, one phrase length of {}..={} for the whole call",
                        allowed.start(),
                        allowed.end()
                    ),
                    r.pool_delta[i].tokens.len(),
                )
                .into());
            }
        }
        Ok(Self {
            session: r.session_id,
            request: DraftRequest {
                new_committed: r.new_committed,
                start: r.start.map(|s| usize::try_from(s).unwrap_or(usize::MAX)),
                length: DraftLength::new(r.gamma as usize, r.stop_below),
                lookahead,
                pool_delta: r.pool_delta.into_iter().map(Ngram::from).collect(),
                eos: r.eos,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::v1::{Lookahead, Sampling};
    use crate::convert::status_of;
    use tonic::Code;

    /// Every field of the internal requests that can be wrong gets INVALID_ARGUMENT naming it.
    #[test]
    fn each_bad_field_is_named() {
        let verify = |f: &dyn Fn(&mut target_pb::VerifyRequest)| {
            let mut r = target_pb::VerifyRequest {
                session_id: 1,
                tokens: vec![3, 4],
                parents: vec![-1, 0],
                sampling: None,
                logprobs: None,
            };
            f(&mut r);
            VerifyCall::try_from(r).map(|_| ())
        };
        let draft = |f: &dyn Fn(&mut draft_pb::DraftRequest)| {
            let mut r = draft_pb::DraftRequest {
                session_id: 1,
                gamma: 4,
                ..Default::default()
            };
            f(&mut r);
            DraftCall::try_from(r).map(|_| ())
        };
        assert!(verify(&|_| {}).is_ok());
        assert!(draft(&|_| {}).is_ok());
        let sampling = |t: f32, p: f32| {
            Some(Sampling {
                temperature: t,
                top_p: p,
                ..Default::default()
            })
        };
        let phrase = |n: usize| crate::common::v1::Phrase {
            key: 1,
            tokens: vec![2; n],
        };
        let lookahead = |level, window, guess| {
            Some(Lookahead {
                level,
                window,
                guess,
            })
        };
        let cases: Vec<(&str, Result<(), DecodingError>, &str)> = vec![
            (
                "empty tree",
                verify(&|r| {
                    r.tokens.clear();
                    r.parents.clear()
                }),
                "parents",
            ),
            (
                "parents short",
                verify(&|r| r.parents.truncate(1)),
                "parents",
            ),
            ("root parent", verify(&|r| r.parents[0] = 0), "parents[0]"),
            (
                "too many alternatives",
                verify(&|r| r.logprobs = Some(21)),
                "logprobs",
            ),
            (
                "forward parent",
                verify(&|r| r.parents[1] = 1),
                "parents[1]",
            ),
            (
                "temperature",
                verify(&|r| r.sampling = sampling(-1.0, 1.0)),
                "sampling.temperature",
            ),
            (
                "top_p",
                verify(&|r| r.sampling = sampling(0.5, 1.5)),
                "sampling.top_p",
            ),
            ("gamma 0", draft(&|r| r.gamma = 0), "gamma"),
            ("gamma huge", draft(&|r| r.gamma = 65), "gamma"),
            ("stop_below 1", draft(&|r| r.stop_below = 1.0), "stop_below"),
            (
                "stop_below NaN",
                draft(&|r| r.stop_below = f32::NAN),
                "stop_below",
            ),
            (
                "level",
                draft(&|r| r.lookahead = lookahead(2, 4, 4)),
                "lookahead.level",
            ),
            (
                "window",
                draft(&|r| r.lookahead = lookahead(4, 0, 4)),
                "lookahead.window",
            ),
            (
                "guess",
                draft(&|r| r.lookahead = lookahead(4, 4, 65)),
                "lookahead.guess",
            ),
            (
                "delta too big",
                draft(&|r| r.pool_delta = vec![phrase(3); limits::MAX_POOL_DELTA + 1]),
                "pool_delta",
            ),
            (
                "delta lengths mixed",
                draft(&|r| r.pool_delta = vec![phrase(3), phrase(3), phrase(4)]),
                "pool_delta[2].tokens",
            ),
            (
                "delta length out of range",
                draft(&|r| r.pool_delta = vec![phrase(40)]),
                "pool_delta[0].tokens",
            ),
        ];
        for (what, r, field) in cases {
            let e = r.expect_err(what);
            match &e {
                DecodingError::Field(f) => assert_eq!(f.field, field, "{what}: {e}"),
                e => panic!("{what}: not a field error: {e}"),
            }
            let s = status_of(&e);
            assert_eq!(s.code(), Code::InvalidArgument, "{what}");
            assert!(
                s.message().starts_with(&format!("{field}: ")),
                "{what}: {}",
                s.message()
            );
        }
    }
}
