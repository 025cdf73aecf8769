//! The `auto` strategy: every round sized from a cost profile measured on this hardware
//! and the acceptance seen so far. [`tuner`] holds the profile, the acceptance calibration,
//! the node planning and the policy choice; [`round`] builds a round with them and feeds
//! back what the verify showed.

pub mod round;
pub mod tuner;

pub use tuner::*;
