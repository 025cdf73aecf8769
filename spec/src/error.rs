use engine::EngineError;

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("invalid verify tree: {0}")]
    InvalidTree(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("unknown session {0} (closed, expired or never opened)")]
    UnknownSession(u64),
    #[error("{0}")]
    Backend(String),
}

pub type Result<T, E = SpecError> = std::result::Result<T, E>;

impl SpecError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        SpecError::InvalidArgument(msg.into())
    }
}
