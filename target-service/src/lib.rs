//! The target service: hosts the large model (optionally tensor-parallel), keeps one KV
//! cache per session and verifies draft trees over gRPC, batching trees of concurrent
//! sessions into one forward.

pub mod grpc;
pub mod scheduler;

pub use grpc::{TargetConfig, TargetGrpc, serve};
