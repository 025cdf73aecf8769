use engine::EngineError;

#[derive(Debug, thiserror::Error)]
pub enum DecodingError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("invalid verify tree: {0}")]
    InvalidTree(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A request field that failed its check (INVALID_ARGUMENT naming the field).
    #[error(transparent)]
    Field(crate::validate::FieldError),
    #[error("unknown session {0} (closed, expired or never opened)")]
    UnknownSession(u64),
    /// The context would overflow (a remote backend's OUT_OF_RANGE).
    #[error("context overflow: {0}")]
    ContextOverflow(String),
    /// A backend is full (sessions or KV memory) and turned the request away.
    #[error("resource exhausted: {0}")]
    Exhausted(String),
    /// A backend could not be reached or answered in time.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Backend(String),
}

pub type Result<T, E = DecodingError> = std::result::Result<T, E>;

impl DecodingError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        DecodingError::InvalidArgument(msg.into())
    }
}
