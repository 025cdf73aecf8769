//! Checks on token ids that every entry point shares.

use crate::error::{DecodingError, Result};

/// Tokens that open a session: at least one, all inside the vocabulary.
pub fn check_tokens(tokens: &[u32], vocab: usize) -> Result<()> {
    if tokens.is_empty() {
        return Err(DecodingError::invalid("a session needs at least one token"));
    }
    check_vocab(tokens, vocab)
}

pub fn check_vocab(tokens: &[u32], vocab: usize) -> Result<()> {
    match tokens.iter().find(|&&t| t as usize >= vocab) {
        Some(t) => Err(DecodingError::invalid(format!(
            "token {t} is outside the vocabulary of {vocab}"
        ))),
        None => Ok(()),
    }
}
