//! The target service: hosts the large model (optionally tensor-parallel) and verifies
//! draft trees over gRPC through the serving crate's target runtime, which batches trees of
//! concurrent sessions into one forward.

pub mod grpc;

pub use grpc::{TargetGrpc, serve, serve_draining};
pub use serving::TargetConfig;
