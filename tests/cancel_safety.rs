//! A caller dropped in the middle of opening a transaction (a job's timeout, a disconnected HTTP
//! client, an aborted task) must not leave a pooled connection inside a transaction: the next
//! borrower's writes would run in it and never commit. (sqlx's `Pool::begin` does exactly that on
//! PostgreSQL; oncely opens every transaction on a pool through `oncely_core::txn::begin`, which
//! transactional steps, `with_idempotency_tx` and the HTTP layer's transactional mode share. This
//! test drops `with_idempotency_tx` calls at growing delays; with `Pool::begin` in its place it
//! fails in every run, on several of its 600 drops.)

mod common;

use std::time::Duration;

use common::*;

/// Whether the connection the pool hands out next is inside a transaction (`SAVEPOINT` only
/// works in one).
async fn next_borrower_is_in_a_transaction(pool: &sqlx::PgPool) -> bool {
    let mut conn = pool.acquire().await.unwrap();
    let inside = sqlx::query("SAVEPOINT probe").execute(&mut *conn).await.is_ok();
    if inside {
        // Leave the pool clean for the report below.
        sqlx::query("ROLLBACK").execute(&mut *conn).await.unwrap();
    }
    inside
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transactional_effect_dropped_while_beginning_leaves_no_open_transaction_behind() {
    init_tracing();
    let db = TestDb::new().await;
    sqlx::query("CREATE TABLE effects (k text PRIMARY KEY)").execute(db.pool()).await.unwrap();
    // One connection, so every attempt and every probe uses the same session.
    let pool = db.new_pool(1).await;

    // Drop the call after a growing delay, so that some drops land while BEGIN is on the wire.
    let mut poisoned = Vec::new();
    for i in 0..600u64 {
        let key = format!("cancel:{i}");
        let call = oncely::core::with_idempotency_tx(&pool, &key, Duration::from_secs(60), |tx| {
            let key = key.clone();
            Box::pin(async move { sqlx::query("INSERT INTO effects VALUES ($1)").bind(key).execute(&mut *tx).await.map(|_| ()) })
        });
        let _ = tokio::time::timeout(Duration::from_micros(2 * (i % 100)), call).await;
        if next_borrower_is_in_a_transaction(&pool).await {
            poisoned.push(i);
        }
    }
    assert!(poisoned.is_empty(), "the pool handed out a connection inside a transaction after drops {poisoned:?}");

    // The pool still works: a call runs its effect once and it commits.
    let call = oncely::core::with_idempotency_tx(&pool, "after", Duration::from_secs(60), |tx| {
        Box::pin(async move { sqlx::query("INSERT INTO effects VALUES ('after')").execute(&mut *tx).await.map(|_| ()) })
    });
    call.await.unwrap();
    let committed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM effects WHERE k = 'after'").fetch_one(db.pool()).await.unwrap();
    assert_eq!(committed, 1, "seen from another connection");
}

