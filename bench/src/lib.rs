//! The benchmarks, kept out of the serving binaries: `ouro-bench` runs the decoding
//! strategies side by side on a prompt set (in process, and over loopback services with
//! `--distributed`); `ouro-load` measures a running server under concurrent streams.

pub mod cost_model;
pub mod load;
pub mod prompts;
pub mod report;
pub mod soak;
pub mod strategies;
pub mod sweep;
