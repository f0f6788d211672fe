//! Starting a transaction on a pool in a way a cancelled caller cannot turn into a poisoned
//! pooled connection.

use sqlx::{PgPool, Postgres, Transaction};

/// Begin a transaction on `pool`, safe against cancellation.
///
/// sqlx's `Pool::begin` is not cancel-safe on PostgreSQL (0.8.6 and 0.9.0 alike): a caller dropped
/// while the `BEGIN` round trip is in flight — a job's timeout, an HTTP client that disconnected,
/// an aborted task — leaves the session inside a transaction that nothing rolls back, and the pool
/// hands that connection to the next borrower. Its statements then run inside the stale
/// transaction, hold their locks and never commit. This runs `begin` in a task of its own: when
/// the caller goes away, the task still finishes, and the transaction it opened is dropped, which
/// rolls it back before the connection returns to the pool.
///
/// Every transaction oncely opens on a pool goes through here. Use it for your own transactions
/// on a pool whenever the future may be dropped early.
///
/// # Example
///
/// ```no_run
/// # async fn example(pool: sqlx::PgPool) -> Result<(), sqlx::Error> {
/// let mut tx = oncely_core::txn::begin(&pool).await?;
/// sqlx::query("INSERT INTO audit (what) VALUES ('x')").execute(&mut *tx).await?;
/// tx.commit().await?;
/// # Ok(()) }
/// ```
pub async fn begin(pool: &PgPool) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let pool = pool.clone();
    match tokio::spawn(async move { pool.begin().await }).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // The runtime is shutting down.
        Err(_) => Err(sqlx::Error::WorkerCrashed),
    }
}
