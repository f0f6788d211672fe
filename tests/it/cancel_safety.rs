//! A caller dropped in the middle of opening a transaction (a job's timeout, a disconnected HTTP
//! client, an aborted task) must not leave a pooled connection inside a transaction: the next
//! borrower's writes would run in it and never commit. sqlx's `Pool::begin` does exactly that on
//! PostgreSQL; oncely opens its transactions on a pool through `oncely_core::txn::begin`.
//!
//! To drop callers exactly while their BEGIN is on the wire, the pools here reach PostgreSQL
//! through a local proxy that holds every answer from the server for a while: a caller given half
//! that time is dropped after sending BEGIN and before reading its answer, every time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long the proxy holds each answer from the server while a test drops callers.
const ANSWER_DELAY: Duration = Duration::from_millis(60);
/// How long a dropped caller gets: well inside the held answer to its BEGIN.
const CALLER_TIME: Duration = Duration::from_millis(25);

/// A TCP proxy to the test database's server that delays server-to-client bytes by the current
/// value of the returned delay (milliseconds), and a one-connection pool through it.
async fn slow_pool(db: &TestDb) -> (sqlx::PgPool, Arc<AtomicU64>) {
    let direct: PgConnectOptions = db.url().parse().unwrap();
    let server = format!("{}:{}", direct.get_host(), direct.get_port());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let delay = Arc::new(AtomicU64::new(0));
    let d = delay.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(upstream) = TcpStream::connect(&server).await else { continue };
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = upstream.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
            });
            let d = d.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match server_read.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    tokio::time::sleep(Duration::from_millis(d.load(Ordering::SeqCst))).await;
                    if client_write.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    // One connection, so every call and every probe uses the same session; no ping on acquire,
    // so a call's first message is its BEGIN.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .test_before_acquire(false)
        .connect_with(direct.port(port))
        .await
        .unwrap();
    (pool, delay)
}

/// Whether the connection the pool hands out next is inside a transaction (`SAVEPOINT` only
/// works in one).
async fn next_borrower_is_in_a_transaction(pool: &sqlx::PgPool) -> bool {
    let mut conn = pool.acquire().await.unwrap();
    match sqlx::query("SAVEPOINT probe").execute(&mut *conn).await {
        Ok(_) => {
            // Leave the pool clean for the report below.
            sqlx::query("ROLLBACK").execute(&mut *conn).await.unwrap();
            true
        }
        // 25P01 no_active_sql_transaction: outside a transaction, as it should be.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("25P01") => false,
        Err(e) => panic!("the probe failed otherwise (an aborted transaction?): {e}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transactional_effect_dropped_while_beginning_leaves_no_open_transaction_behind() {
    init_tracing();
    let db = TestDb::new().await;
    sqlx::query("CREATE TABLE effects (k text PRIMARY KEY)").execute(db.pool()).await.unwrap();
    let (pool, delay) = slow_pool(&db).await;
    delay.store(ANSWER_DELAY.as_millis() as u64, Ordering::SeqCst);

    let mut poisoned = Vec::new();
    for i in 0..5 {
        let key = format!("cancel:{i}");
        let call = oncely::core::with_idempotency_transactional(&pool, &key, Duration::from_secs(60), |tx| {
            let key = key.clone();
            Box::pin(async move {
                sqlx::query("INSERT INTO effects VALUES ($1)").bind(key).execute(&mut *tx).await.map(|_| ())
            })
        });
        assert!(tokio::time::timeout(CALLER_TIME, call).await.is_err(), "the call was cut off");
        if next_borrower_is_in_a_transaction(&pool).await {
            poisoned.push(i);
        }
    }
    assert!(poisoned.is_empty(), "the pool handed out a connection inside a transaction after drops {poisoned:?}");

    // The pool still works: a call runs its effect once and it commits.
    delay.store(0, Ordering::SeqCst);
    oncely::core::with_idempotency_transactional(&pool, "after", Duration::from_secs(60), |tx| {
        Box::pin(async move { sqlx::query("INSERT INTO effects VALUES ('after')").execute(&mut *tx).await.map(|_| ()) })
    })
    .await
    .unwrap();
    let effects: Vec<String> = sqlx::query_scalar("SELECT k FROM effects").fetch_all(db.pool()).await.unwrap();
    assert_eq!(effects, vec!["after".to_string()], "seen from another connection; none of the dropped calls ran");
}

/// The same for the HTTP layer's transactional mode: a client that gives up (the request future
/// is dropped) while the layer opens the request's transaction.
#[tokio::test(flavor = "multi_thread")]
async fn an_http_request_dropped_while_its_transaction_begins_leaves_no_open_transaction_behind() {
    use axum::body::Body;
    use axum::routing::post;
    use oncely_http::{IdempotencyLayer, RequestTx};
    use tower::ServiceExt;

    init_tracing();
    let db = TestDb::new().await;
    sqlx::query("CREATE TABLE usage (user_id bigint PRIMARY KEY, tokens bigint)").execute(db.pool()).await.unwrap();
    sqlx::query("INSERT INTO usage VALUES (1, 0)").execute(db.pool()).await.unwrap();
    let (pool, delay) = slow_pool(&db).await;
    let app = axum::Router::new()
        .route(
            "/usage",
            post(|tx: RequestTx| async move {
                sqlx::query("UPDATE usage SET tokens = tokens + 1 WHERE user_id = 1")
                    .execute(&mut *tx.conn().await.expect("the handler runs before the layer closes the transaction"))
                    .await
                    .unwrap();
                http::StatusCode::CREATED
            }),
        )
        .layer(IdempotencyLayer::transactional(pool.clone()));
    let req =
        |key: String| http::Request::post("/usage").header("idempotency-key", key).body(Body::from("{}")).unwrap();

    delay.store(ANSWER_DELAY.as_millis() as u64, Ordering::SeqCst);
    let mut poisoned = Vec::new();
    for i in 0..5 {
        assert!(
            tokio::time::timeout(CALLER_TIME, app.clone().oneshot(req(format!("k{i}")))).await.is_err(),
            "the request was cut off"
        );
        if next_borrower_is_in_a_transaction(&pool).await {
            poisoned.push(i);
        }
    }
    assert!(poisoned.is_empty(), "the pool handed out a connection inside a transaction after drops {poisoned:?}");

    delay.store(0, Ordering::SeqCst);
    let resp = app.clone().oneshot(req("last".into())).await.unwrap();
    assert_eq!(resp.status(), http::StatusCode::CREATED);
    let tokens: i64 =
        sqlx::query_scalar("SELECT tokens FROM usage WHERE user_id = 1").fetch_one(db.pool()).await.unwrap();
    assert_eq!(tokens, 1, "only the last request ran");
}
