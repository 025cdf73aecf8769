//! The `auto` strategy: every round sized from a cost profile measured on this hardware
//! and the acceptance seen so far. Split by job: [`config`] (every tuning constant), [`profile`] (what calls cost here),
//! [`calibration`] (how often guesses are accepted), [`load`] (what the target is busy
//! with now, and what a round costs under it), [`plan`] (which nodes a round
//! verifies), [`policy`] (which policy runs a segment), [`tuner`] (the shared state that
//! ties them together) and [`round`] (one round built with them, and what the verify
//! teaches them).

pub mod calibration;
pub mod config;
pub mod load;
pub mod plan;
pub mod policy;
pub mod profile;
pub mod round;
pub mod tuner;

pub use calibration::{Guess, Prediction, RoundKind};
pub use config::AutoConfig;
pub use load::{Load, LoadGauge, Pricing};
pub use plan::{DraftBacklog, TreePlan, choose_nodes};
pub use policy::{Policy, PolicyScores, SEGMENT_TOKENS, would_commit};
pub use profile::{CallClock, ChainEstimate, CostProfile, DraftCost, ProfileOptions, measure};
pub use tuner::AutoTuner;
