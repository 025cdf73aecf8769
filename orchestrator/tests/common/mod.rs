//! Helpers shared by the orchestrator's integration tests.

pub use orchestrator::testing::word_tokenizer;
