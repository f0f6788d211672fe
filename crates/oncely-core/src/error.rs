//! The core crate's error type.

use crate::job::JobId;

/// Errors returned by oncely-core.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database could not be reached or returned an error.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),

    /// Applying the embedded migrations failed or was refused (see [`MigrationError`](crate::MigrationError)).
    #[error(transparent)]
    Migration(#[from] crate::MigrationError),

    /// Job arguments could not be serialized or deserialized.
    #[error("invalid job arguments for kind `{kind}`: {source}")]
    InvalidArgs {
        /// The job kind whose arguments failed.
        kind: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },

    /// A value given to the API was not acceptable (empty kind, oversize key, ...).
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// A webhook endpoint secret could not be sealed or opened at rest: a malformed key ring, a
    /// key the installed ring does not hold, or a stored value that does not decrypt.
    #[error("webhook secret at rest: {0}")]
    Secret(String),

    /// The worker no longer holds the job: its lease expired and the job was rescued, another worker
    /// claimed it, or it was cancelled. The state write was refused (fenced) and nothing changed.
    #[error("lease lost for job {job_id} attempt {attempt}: the job is no longer running under this claim")]
    LeaseLost {
        /// The job.
        job_id: JobId,
        /// The attempt (fencing token) this worker held.
        attempt: i32,
    },

    /// A ledger claim was taken over by another claimant before this one recorded its output
    /// (its lease expired): the write was refused.
    #[error("ledger claim lost for {key} attempt {attempt}: another claimant took the key over")]
    LedgerClaimLost {
        /// The ledger key (`namespace/key`).
        key: String,
        /// The claim's attempt number.
        attempt: i32,
    },

    /// A ledger record cannot be resolved by hand: it does not exist, is already completed, or a
    /// live claim holds it (see [`ledger::resolve`](crate::ledger::resolve)).
    #[error("ledger record {key}: {reason}")]
    LedgerNotResolvable {
        /// The ledger key (`namespace/key`).
        key: String,
        /// Why.
        reason: String,
    },

    /// No such record (endpoint, event, delivery).
    #[error("{what} {id} not found")]
    NotFound {
        /// What was looked for.
        what: &'static str,
        /// Its id.
        id: i64,
    },

    /// The webhook endpoint is disabled, so the request would only fail: enable it first.
    #[error(
        "webhook endpoint {endpoint} is disabled ({reason}); enable it first (`oncely webhooks enable {endpoint}`)"
    )]
    EndpointDisabled {
        /// The endpoint.
        endpoint: i64,
        /// Why it was disabled.
        reason: String,
    },

    /// No job with this id exists.
    #[error("job {0} not found")]
    JobNotFound(JobId),

    /// The job is not in a state that allows the requested change.
    #[error("job {job_id} is {state}; {action} needs {expected}")]
    InvalidState {
        /// The job.
        job_id: JobId,
        /// Its current state.
        state: String,
        /// What was attempted.
        action: &'static str,
        /// The states that would have allowed it.
        expected: &'static str,
    },
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// True when the error comes from the connection or the server rather than from the request,
    /// so the same call may succeed later (the database went away, a pool timeout, ...).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Database(e) => {
                matches!(
                    e,
                    sqlx::Error::Io(_)
                        | sqlx::Error::PoolTimedOut
                        | sqlx::Error::PoolClosed
                        | sqlx::Error::WorkerCrashed
                        | sqlx::Error::Protocol(_)
                ) || matches!(e, sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("57P") || c.starts_with("08") || c == "40001" || c == "40P01"))
            }
            _ => false,
        }
    }
}
