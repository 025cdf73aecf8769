//! One error type for the engine. Every failure that can come from a file or a caller's
//! input is a variant with a message that names the thing at fault; panics are bugs.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid {format} file: {reason}")]
    BadFile {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },
    #[error("unsupported model architecture '{0}' (supported: llama, qwen2, mistral)")]
    UnsupportedArchitecture(String),
    #[error("tensor '{tensor}' has unsupported type {dtype}")]
    UnsupportedDType { tensor: String, dtype: String },
    #[error("missing tensor '{0}'")]
    MissingTensor(String),
    #[error("missing or invalid metadata '{key}': {reason}")]
    BadMetadata { key: String, reason: String },
    #[error("tensor '{tensor}' has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        tensor: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("context overflow: {needed} tokens needed, the model's context is {limit}")]
    ContextOverflow { needed: usize, limit: usize },
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("tensor-parallel rank failed: {0}")]
    Rank(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

impl EngineError {
    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        EngineError::InvalidInput(msg.into())
    }
}

/// The message a panic carried (its `&str` or `String` payload), for errors that report a
/// caught panic.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}
