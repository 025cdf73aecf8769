//! Plain decoding: the tree is the root alone, so each target forward commits the
//! target's own next token (its argmax, or its seeded sample).

use super::Round;

pub(crate) fn round(root: u32) -> Round {
    Round::chain(root, Vec::new())
}
