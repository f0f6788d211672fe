//! Transactional mode: the request's effects and its stored response commit in one transaction.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Duration;

use oncely_core::ledger;
use sqlx::{PgConnection, Postgres, Transaction};
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};

use crate::store::{claim_options, decode, ledger_key, StoreClaim, StoreError, StoredResponse};

/// SQLSTATE `lock_not_available`: a `lock_timeout` ran out.
const LOCK_NOT_AVAILABLE: &str = "55P03";
/// SQLSTATE `in_failed_sql_transaction`: an earlier statement of the transaction failed.
const IN_FAILED_SQL_TRANSACTION: &str = "25P02";
/// What a duplicate that found the key held by an open transaction is told to wait: such requests
/// hold their key only while they run, typically milliseconds.
const BUSY_RETRY_AFTER: Duration = Duration::from_secs(1);
/// Defaults to 50 ms: how long a duplicate waits on the first request's open transaction under
/// [`InFlight::Reject`](crate::InFlight::Reject) before it is answered 409 (one that is about to
/// commit is replayed instead).
pub const TX_REJECT_LOCK_WAIT: Duration = Duration::from_millis(50);

#[derive(Clone)]
pub(crate) struct TxMode {
    pub(crate) pool: sqlx::PgPool,
}

impl TxMode {
    /// Begin the request's transaction and claim the key in it. Inside the transaction the claim is
    /// invisible to others until the commit: a concurrent duplicate waits on the row, then sees the
    /// stored response (or, after a rollback, claims the key itself). That wait is bounded by
    /// `lock_wait` (a `lock_timeout` for the claim alone): past it the duplicate is
    /// [`StoreClaim::Busy`].
    pub(crate) async fn begin_and_claim(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &str,
        lease: Duration,
        ttl: Duration,
        lock_wait: Duration,
    ) -> Result<(Transaction<'static, Postgres>, StoreClaim), StoreError> {
        let db = |e: sqlx::Error| StoreError(e.to_string());
        // Cancel-safe: a client that disconnects here must not leave a pooled connection in a
        // transaction.
        let mut tx = oncely_core::txn::begin(&self.pool).await.map_err(db)?;
        let owner = format!("http-tx:{}", uuid::Uuid::new_v4());
        let wait = format!("{}ms", lock_wait.as_millis().max(1));
        let previous: String =
            sqlx::query_scalar("SELECT current_setting('lock_timeout') FROM set_config('lock_timeout', $1, true)")
                .bind(&wait)
                .fetch_one(&mut *tx)
                .await
                .map_err(db)?;
        let claimed = match ledger::claim(
            &mut tx,
            &ledger_key(scope, key),
            &claim_options(&owner, fingerprint, lease, ttl),
        )
        .await
        {
            Ok(c) => decode(c)?,
            Err(oncely_core::Error::Database(sqlx::Error::Database(e)))
                if e.code().as_deref() == Some(LOCK_NOT_AVAILABLE) =>
            {
                // The first request still holds the key in its open transaction.
                return Ok((tx, StoreClaim::Busy { retry_after: BUSY_RETRY_AFTER }));
            }
            Err(e) => return Err(e.into()),
        };
        // The handler's own statements run under the session's lock timeout again.
        sqlx::query("SELECT set_config('lock_timeout', $1, true)")
            .bind(&previous)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        Ok((tx, claimed))
    }

    /// Store the response in the request's transaction and commit. A transaction the handler's
    /// own failed statement left aborted is [`CommitError::HandlerAborted`] (rolled back), not a
    /// store failure.
    pub(crate) async fn complete_and_commit(
        &self,
        mut tx: Transaction<'static, Postgres>,
        scope: &str,
        key: &str,
        token: i32,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), CommitError> {
        let json = serde_json::to_value(response).map_err(|e| CommitError::Store(StoreError(e.to_string())))?;
        match ledger::complete(&mut *tx, &ledger_key(scope, key), token, &json, Some(ttl)).await {
            Ok(()) => {}
            Err(oncely_core::Error::Database(sqlx::Error::Database(e)))
                if e.code().as_deref() == Some(IN_FAILED_SQL_TRANSACTION) =>
            {
                return Err(CommitError::HandlerAborted);
            }
            Err(e) => return Err(CommitError::Store(e.into())),
        }
        tx.commit().await.map_err(|e| CommitError::Store(StoreError(e.to_string())))
    }
}

/// Why the request's transaction did not commit.
#[derive(Debug)]
pub(crate) enum CommitError {
    /// A statement of the handler failed and left the transaction aborted: nothing it wrote
    /// survives, and nothing can be stored.
    HandlerAborted,
    /// The store failed.
    Store(StoreError),
}

/// The request's transaction in transactional mode, found in the request extensions (and, with the
/// `axum` feature, an extractor). Write the request's effects through it: they commit together
/// with the stored response, or not at all.
///
/// ```no_run
/// # async fn handler(tx: oncely_http::RequestTx) -> Result<(), Box<dyn std::error::Error>> {
/// let mut conn = tx.conn().await?;
/// sqlx::query("UPDATE usage SET tokens = tokens + 10 WHERE user_id = 1").execute(&mut *conn).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RequestTx(Arc<Mutex<Option<Transaction<'static, Postgres>>>>);

impl std::fmt::Debug for RequestTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequestTx")
    }
}

/// [`RequestTx::conn`] was called after the layer finished with the request's transaction: the
/// handler had returned (a task it spawned kept the handle), and the transaction was committed or
/// rolled back. Writes made now would belong to no request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the request transaction is closed: the handler returned and the layer committed or rolled it back")]
pub struct RequestTxClosed;

/// What the layer found when the handler returned.
pub(crate) enum Taken {
    /// The transaction, for the layer to store the response in and commit (or roll back).
    Tx(Transaction<'static, Postgres>),
    /// The handler's work still holds the connection (a spawned task kept a [`TxConn`]): the
    /// transaction can be neither committed nor rolled back now. It rolls back when that work drops
    /// it, with the key's claim.
    InUse,
}

impl RequestTx {
    pub(crate) fn new(tx: Transaction<'static, Postgres>) -> Self {
        RequestTx(Arc::new(Mutex::new(Some(tx))))
    }

    /// Take the transaction back once the handler returned. Never waits: a lock held now is held
    /// by work that outlived the handler.
    pub(crate) fn take(&self) -> Taken {
        match self.0.try_lock() {
            Ok(mut guard) => guard.take().map_or(Taken::InUse, Taken::Tx),
            Err(_) => Taken::InUse,
        }
    }

    /// The transaction's connection, held until the guard drops. [`RequestTxClosed`] once the
    /// handler has returned and the layer has committed or rolled the transaction back.
    pub async fn conn(&self) -> Result<TxConn<'_>, RequestTxClosed> {
        MutexGuard::try_map(self.0.lock().await, Option::as_mut).map(TxConn).map_err(|_| RequestTxClosed)
    }
}

/// A lock on the request's transaction; derefs to its connection.
pub struct TxConn<'a>(MappedMutexGuard<'a, Transaction<'static, Postgres>>);

impl std::fmt::Debug for TxConn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TxConn")
    }
}

impl Deref for TxConn<'_> {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        &self.0
    }
}

impl DerefMut for TxConn<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.0
    }
}

#[cfg(feature = "axum")]
mod extract {
    use axum_core::extract::{FromRequestParts, OptionalFromRequestParts};
    use axum_core::response::{IntoResponse, Response};
    use http::request::Parts;
    use http::StatusCode;

    use super::{RequestTx, RequestTxClosed};

    /// A 500 problem: a handler that returns `Result<_, RequestTxClosed>` answers it.
    impl IntoResponse for RequestTxClosed {
        fn into_response(self) -> Response {
            tracing::error!("the request transaction was used after the handler returned");
            crate::problem::Problem::HandlerFailed
                .response(StatusCode::INTERNAL_SERVER_ERROR, "internal error", &uuid::Uuid::new_v4().to_string(), None)
                .into_response()
        }
    }

    /// No transaction: the route is not behind a transactional `IdempotencyLayer`, or the request
    /// had no key (and passed through).
    #[derive(Debug)]
    pub struct MissingRequestTx;

    impl IntoResponse for MissingRequestTx {
        fn into_response(self) -> Response {
            crate::problem::Problem::KeyMissing
                .response(
                    StatusCode::BAD_REQUEST,
                    "this endpoint needs an Idempotency-Key (it runs in the key's transaction)",
                    &uuid::Uuid::new_v4().to_string(),
                    None,
                )
                .into_response()
        }
    }

    impl<S: Send + Sync> FromRequestParts<S> for RequestTx {
        type Rejection = MissingRequestTx;
        async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
            parts.extensions.get::<RequestTx>().cloned().ok_or(MissingRequestTx)
        }
    }

    /// `Option<RequestTx>`: `None` outside transactional mode or for requests without a key.
    impl<S: Send + Sync> OptionalFromRequestParts<S> for RequestTx {
        type Rejection = std::convert::Infallible;
        async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Option<Self>, Self::Rejection> {
            Ok(parts.extensions.get::<RequestTx>().cloned())
        }
    }
}

#[cfg(feature = "axum")]
pub use extract::MissingRequestTx;
