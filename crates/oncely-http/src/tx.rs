//! Transactional mode: the request's effects and its stored response commit in one transaction.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Duration;

use oncely_core::ledger;
use sqlx::{PgConnection, Postgres, Transaction};
use tokio::sync::{Mutex, MutexGuard};

use crate::store::{claim_options, decode, ledger_key, StoreClaim, StoreError, StoredResponse};

#[derive(Clone)]
pub(crate) struct TxMode {
    pub(crate) pool: sqlx::PgPool,
}

impl TxMode {
    pub(crate) async fn begin_and_claim(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &str,
        lease: Duration,
        ttl: Duration,
    ) -> Result<(Transaction<'static, Postgres>, StoreClaim), StoreError> {
        let mut tx = self.pool.begin().await.map_err(|e| StoreError(e.to_string()))?;
        let owner = format!("http-tx:{}", uuid::Uuid::new_v4());
        // Inside the transaction the claim is invisible to others until the commit; a concurrent
        // duplicate waits on the row and then sees the stored response.
        let claimed = ledger::claim(&mut tx, &ledger_key(scope, key), &claim_options(&owner, fingerprint, lease, ttl)).await?;
        Ok((tx, decode(claimed)?))
    }

    pub(crate) async fn complete_and_commit(
        &self,
        mut tx: Transaction<'static, Postgres>,
        scope: &str,
        key: &str,
        token: i32,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_value(response).map_err(|e| StoreError(e.to_string()))?;
        ledger::complete(&mut *tx, &ledger_key(scope, key), token, &json, Some(ttl)).await?;
        tx.commit().await.map_err(|e| StoreError(e.to_string()))
    }
}

/// The request's transaction in transactional mode, found in the request extensions (and, with the
/// `axum` feature, an extractor). Write the request's effects through it: they commit together
/// with the stored response, or not at all.
///
/// ```no_run
/// # async fn handler(tx: oncely_http::RequestTx) -> Result<(), sqlx::Error> {
/// let mut conn = tx.conn().await;
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

impl RequestTx {
    pub(crate) fn new(tx: Transaction<'static, Postgres>) -> Self {
        RequestTx(Arc::new(Mutex::new(Some(tx))))
    }

    pub(crate) async fn take(&self) -> Option<Transaction<'static, Postgres>> {
        self.0.lock().await.take()
    }

    /// The transaction's connection, held until the guard drops.
    pub async fn conn(&self) -> TxConn<'_> {
        TxConn(self.0.lock().await)
    }
}

/// A lock on the request's transaction; derefs to its connection.
pub struct TxConn<'a>(MutexGuard<'a, Option<Transaction<'static, Postgres>>>);

impl Deref for TxConn<'_> {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        self.0.as_ref().expect("the request transaction is only taken after the handler returned")
    }
}

impl DerefMut for TxConn<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.0.as_mut().expect("the request transaction is only taken after the handler returned")
    }
}

#[cfg(feature = "axum")]
mod extract {
    use axum_core::extract::{FromRequestParts, OptionalFromRequestParts};
    use axum_core::response::{IntoResponse, Response};
    use http::request::Parts;
    use http::StatusCode;

    use super::RequestTx;

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
                    "",
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
