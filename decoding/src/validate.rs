//! What a request is checked against, in one place: every limit, and one error type that
//! names the field at fault, what it must be and what it was. The servers check a request
//! once where it enters (the wire conversion) and the model-side code checks what only it
//! can know (vocabulary, context, the session's last token); both report this type.

use crate::error::{DecodingError, Result};

/// The limits requests are held to.
pub mod limits {
    /// Most draft tokens one round or one draft call may ask for.
    pub const MAX_GAMMA: usize = 64;
    /// Lookahead n-gram size N.
    pub const LEVELS: std::ops::RangeInclusive<usize> = 3..=16;
    /// Lookahead window width W.
    pub const MAX_WINDOW: usize = 64;
    /// Pool phrases verified per lookahead step G.
    pub const MAX_GUESS: usize = 64;
    /// Pool phrases appended as candidate suffixes (Ouroboros).
    pub const MAX_TOPK: usize = 16;
    /// Most trie nodes per verify tree.
    pub const MAX_TRIE_BUDGET: usize = 256;
    /// Most stop strings per request, and bytes per stop string.
    pub const MAX_STOP_STRINGS: usize = 16;
    pub const MAX_STOP_BYTES: usize = 256;
    /// Most chat messages per request.
    pub const MAX_CHAT_MESSAGES: usize = 1024;
    /// Most bytes of text (a prompt, or all chat messages together) per request, checked
    /// before tokenizing it.
    pub const MAX_TEXT_BYTES: usize = 4 << 20;
    /// Most pool phrases one draft call may carry to a draft service's replica.
    pub const MAX_POOL_DELTA: usize = 1 << 16;
}

/// A request field that failed its check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: must be {expected}, got {got}")]
pub struct FieldError {
    /// The field's path in the request, as the client wrote it (`params.gamma`,
    /// `parents[3]`).
    pub field: String,
    /// What it must be: the limit or rule.
    pub expected: String,
    /// What it was.
    pub got: String,
}

impl FieldError {
    pub fn new(
        field: impl Into<String>,
        expected: impl Into<String>,
        got: impl std::fmt::Display,
    ) -> Self {
        Self {
            field: field.into(),
            expected: expected.into(),
            got: got.to_string(),
        }
    }

    /// The same error for a field inside `parent` (`lookahead` + `level`).
    pub fn within(mut self, parent: &str) -> Self {
        self.field = format!("{parent}.{}", self.field);
        self
    }
}

impl From<FieldError> for DecodingError {
    fn from(e: FieldError) -> Self {
        DecodingError::Field(e)
    }
}

/// Nests a result's field error inside `parent`.
pub fn within<T>(r: Result<T>, parent: &str) -> Result<T> {
    r.map_err(|e| match e {
        DecodingError::Field(f) => DecodingError::Field(f.within(parent)),
        e => e,
    })
}

/// Tokens that open a session: at least one, all inside the vocabulary.
pub fn check_tokens(tokens: &[u32], vocab: usize) -> Result<()> {
    if tokens.is_empty() {
        return Err(FieldError::new("tokens", "at least one token", "none").into());
    }
    check_vocab(tokens, vocab, "tokens")
}

/// Every token of `field` inside the vocabulary.
pub fn check_vocab(tokens: &[u32], vocab: usize, field: &str) -> Result<()> {
    match tokens.iter().find(|&&t| t as usize >= vocab) {
        Some(t) => Err(FieldError::new(
            field,
            format!("inside the vocabulary of {vocab}"),
            format!("token {t}"),
        )
        .into()),
        None => Ok(()),
    }
}

/// `value` at most `max`.
pub fn at_most(field: &str, value: usize, max: usize) -> Result<()> {
    if value > max {
        return Err(FieldError::new(field, format!("at most {max}"), value).into());
    }
    Ok(())
}

/// `value` in `range`.
pub fn in_range(field: &str, value: usize, range: std::ops::RangeInclusive<usize>) -> Result<()> {
    if !range.contains(&value) {
        return Err(FieldError::new(
            field,
            format!("in {}..={}", range.start(), range.end()),
            value,
        )
        .into());
    }
    Ok(())
}

/// A probability floor in [0, 1).
pub fn unit_floor(field: &str, value: f32) -> Result<()> {
    if !(0.0..1.0).contains(&value) {
        return Err(FieldError::new(field, "in [0, 1)", value).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_error_names_field_rule_and_value() {
        let e = DecodingError::from(FieldError::new("level", "in 3..=16", 40).within("lookahead"));
        assert_eq!(e.to_string(), "lookahead.level: must be in 3..=16, got 40");
        let e = check_vocab(&[1, 99], 96, "token_ids").unwrap_err();
        assert_eq!(
            e.to_string(),
            "token_ids: must be inside the vocabulary of 96, got token 99"
        );
        let e = within(in_range("window", 0, 1..=limits::MAX_WINDOW), "lookahead").unwrap_err();
        assert_eq!(e.to_string(), "lookahead.window: must be in 1..=64, got 0");
        assert!(unit_floor("draft_stop", f32::NAN).is_err());
        assert!(unit_floor("draft_stop", 0.5).is_ok());
    }
}
