//! The worker crate's error type.

/// Errors returned by oncely-worker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The worker's configuration is invalid; the message says what to change.
    #[error("invalid worker configuration: {0}")]
    Config(String),
    /// An error from oncely-core (database, fencing, ...).
    #[error(transparent)]
    Core(#[from] oncely_core::Error),
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
