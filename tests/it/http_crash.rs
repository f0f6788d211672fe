//! A request in progress when its process is killed (SIGKILL): the dead process's claim holds the
//! `Idempotency-Key` until its lease ends, and after that a retry runs the handler — once.
//!
//! The server that dies is this test binary run again with `--ignored --exact child_http_server`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use axum::body::Body;
use axum::extract::State;
use axum::routing::post;
use axum::Router;
use chrono::{DateTime, Utc};
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use oncely_http::problem::Problem;
use oncely_http::{IdempotencyConfig, IdempotencyLayer, PgStore};
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

const LEASE: Duration = Duration::from_secs(2);
const PATH: &str = "/orders";
const AUTHORIZATION: &str = "Bearer tenant-1";
const KEY: &str = "order-1";
/// The same bytes in the child's request and in every retry: the fingerprint must match.
const BODY: &str = r#"{"sku":"book-42","quantity":1}"#;

fn layer(pool: PgPool) -> IdempotencyLayer {
    IdempotencyLayer::new(PgStore::new(pool)).with_config(IdempotencyConfig { lease: LEASE, ..Default::default() })
}

/// The caller scope the layer derives from `AUTHORIZATION` by default.
fn authorization_scope() -> String {
    let (parts, ()) = Request::post(PATH).header("authorization", AUTHORIZATION).body(()).unwrap().into_parts();
    oncely_http::config::default_scope(&parts)
}

/// The child's handler: record that it started, then hang until the process is killed.
async fn hang(State(pool): State<PgPool>) -> StatusCode {
    sqlx::query("INSERT INTO started (pid) VALUES ($1)").bind(std::process::id() as i32).execute(&pool).await.unwrap();
    std::future::pending::<StatusCode>().await
}

/// Runs only as the child process of the test below: an HTTP server whose handler claims the key
/// (through the layer), marks that it started and hangs until killed.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "spawned by a_request_in_progress_when_its_process_is_killed_runs_again_after_the_lease as a child process"]
async fn child_http_server() {
    let Ok(url) = std::env::var("ONCELY_CHILD_DATABASE_URL") else { return };
    let pool = PgPool::connect(&url).await.unwrap();
    let app = Router::new().route(PATH, post(hang)).layer(layer(pool.clone())).with_state(pool.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    sqlx::query("INSERT INTO child_port (port) VALUES ($1)").bind(i32::from(port)).execute(&pool).await.unwrap();
    axum::serve(listener, app).await.unwrap();
}

/// Send the request over a raw HTTP/1.1 connection and return whatever comes back before the
/// connection ends (nothing, when the server dies first).
async fn post_raw(port: u16) -> Vec<u8> {
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let req = format!(
        "POST {PATH} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         authorization: {AUTHORIZATION}\r\nidempotency-key: {KEY}\r\n\r\n{BODY}",
        BODY.len()
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    // Ends with EOF or a reset when the server's process dies; keep what arrived (nothing).
    let _ = conn.read_to_end(&mut got).await;
    got
}

/// What the parent's handler saw of the key's ledger record while it ran.
#[derive(Debug, Clone)]
struct ClaimSeen {
    attempt: i32,
    previous_owner: Option<String>,
    /// When this claim was made (the database's clock): its lease end minus the lease.
    claimed_at: DateTime<Utc>,
}

#[derive(Clone)]
struct Parent {
    pool: PgPool,
    /// The key's ledger record (as the layer named it).
    ledger_key: String,
    seen: Arc<Mutex<Vec<ClaimSeen>>>,
}

/// The parent's handler: make the effect and answer 201.
async fn create_order(State(s): State<Parent>, body: String) -> axum::response::Response {
    let (attempt, previous_owner, claimed_at): (i32, Option<String>, DateTime<Utc>) = sqlx::query_as(
        "SELECT attempt, previous_owner, lease_expires_at - make_interval(secs => $3) \
         FROM oncely.ledger WHERE namespace = 'http' AND key = $1 AND state = $2",
    )
    .bind(&s.ledger_key)
    .bind("in_progress")
    .bind(LEASE.as_secs_f64())
    .fetch_one(&s.pool)
    .await
    .unwrap();
    s.seen.lock().unwrap().push(ClaimSeen { attempt, previous_owner, claimed_at });
    let id: i64 = sqlx::query_scalar("INSERT INTO orders (body) VALUES ($1) RETURNING id")
        .bind(&body)
        .fetch_one(&s.pool)
        .await
        .unwrap();
    axum::response::Response::builder()
        .status(StatusCode::CREATED)
        .header("content-type", "application/json")
        .header("location", format!("/orders/{id}"))
        .body(Body::from(format!(r#"{{"order":{id}}}"#)))
        .unwrap()
}

/// The child's claim, as the ledger holds it.
#[derive(Debug, sqlx::FromRow)]
struct LedgerRecord {
    key: String,
    state: String,
    attempt: i32,
    owner: String,
    fingerprint: Option<String>,
    lease_expires_at: DateTime<Utc>,
}

struct Got {
    status: StatusCode,
    headers: http::HeaderMap,
    body: bytes::Bytes,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

/// The same request as the child's, in-process.
async fn send(app: &Router) -> Got {
    let req = Request::post(PATH)
        .header("content-type", "application/json")
        .header("authorization", AUTHORIZATION)
        .header("idempotency-key", KEY)
        .body(Body::from(BODY))
        .unwrap();
    let (parts, body) = app.clone().oneshot(req).await.unwrap().into_parts();
    Got { status: parts.status, headers: parts.headers, body: body.collect().await.unwrap().to_bytes() }
}

/// A 409 for a key whose claim is still live, with a `Retry-After` no longer than the lease.
fn assert_busy(g: &Got) {
    assert_eq!(g.status, StatusCode::CONFLICT, "{:?}", g.body);
    let retry_after: u64 = g.header("retry-after").expect("a 409 has Retry-After").parse().unwrap();
    assert!((1..=LEASE.as_secs()).contains(&retry_after), "Retry-After {retry_after}");
    let doc: serde_json::Value = serde_json::from_slice(&g.body).unwrap();
    assert_eq!(doc["type"], Problem::InProgress.type_uri());
    assert!(g.header("idempotency-replayed").is_none());
}

async fn count_orders(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM orders").fetch_one(pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_in_progress_when_its_process_is_killed_runs_again_after_the_lease() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    for ddl in [
        "CREATE TABLE started (pid int)",
        "CREATE TABLE child_port (port int)",
        "CREATE TABLE orders (id bigserial, body text)",
    ] {
        sqlx::query(ddl).execute(pool).await.unwrap();
    }

    let mut child =
        spawn_child(concat!(module_path!(), "::child_http_server"), &[("ONCELY_CHILD_DATABASE_URL", db.url())]);
    let port: i32 = eventually(Duration::from_secs(30), "the child to listen", || async {
        sqlx::query_scalar("SELECT port FROM child_port").fetch_optional(pool).await.unwrap()
    })
    .await;
    let port = u16::try_from(port).unwrap();
    // The client never gets an answer: the server dies mid-request.
    let client = tokio::spawn(post_raw(port));

    let pid: i32 = eventually(Duration::from_secs(30), "the child's handler to start", || async {
        sqlx::query_scalar("SELECT pid FROM started").fetch_optional(pool).await.unwrap()
    })
    .await;
    assert_eq!(pid as u32, child.id().unwrap());
    // The layer claimed the key before the handler ran: the only record in the `http` namespace.
    // (How the layer spells scope and key into the ledger key is its business: read it back.)
    let mut records: Vec<LedgerRecord> = sqlx::query_as(
        "SELECT key, state, attempt, owner, fingerprint, lease_expires_at FROM oncely.ledger WHERE namespace = 'http'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(records.len(), 1, "{records:?}");
    let LedgerRecord { key, state, attempt, owner, fingerprint: fp, lease_expires_at } = records.remove(0);
    assert!(key.contains(&authorization_scope()) && key.ends_with(KEY), "{key}");
    assert_eq!((state.as_str(), attempt), ("in_progress", 1));
    assert_eq!(fp.as_deref(), Some(oncely_http::fingerprint(&Method::POST, PATH, BODY.as_bytes()).as_str()));

    // SIGKILL: no release, no stored response, no last write.
    child.start_kill().unwrap();
    let status = child.wait().await.unwrap();
    assert!(!status.success(), "{status:?}");
    let killed_at = Instant::now();
    let answer =
        tokio::time::timeout(Duration::from_secs(10), client).await.expect("the client's connection ends").unwrap();
    assert!(answer.is_empty(), "the client got an answer: {:?}", String::from_utf8_lossy(&answer));

    // The dead process's claim still holds the key.
    let (state_after, owner_after): (String, String) =
        sqlx::query_as("SELECT state, owner FROM oncely.ledger WHERE namespace = 'http' AND key = $1")
            .bind(&key)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!((state_after.as_str(), owner_after.as_str()), ("in_progress", owner.as_str()));

    let seen = Arc::new(Mutex::new(Vec::new()));
    let app = Router::new().route(PATH, post(create_order)).layer(layer(pool.clone())).with_state(Parent {
        pool: pool.clone(),
        ledger_key: key.clone(),
        seen: seen.clone(),
    });
    let app = &app;

    // Right after the kill: busy, until the dead claim's lease ends.
    let lease_left: f64 = sqlx::query_scalar("SELECT extract(epoch FROM $1 - now())::float8")
        .bind(lease_expires_at)
        .fetch_one(pool)
        .await
        .unwrap();
    let first = send(app).await;
    assert_eq!(
        first.status,
        StatusCode::CONFLICT,
        "right after the kill ({lease_left:.3} s of lease left before the request)"
    );
    assert_busy(&first);

    let busy = std::cell::Cell::new(1);
    let created = eventually(Duration::from_secs(10), "a retry after the lease to run the handler", || async {
        let g = send(app).await;
        if g.status == StatusCode::CONFLICT {
            assert_busy(&g);
            busy.set(busy.get() + 1);
            return None;
        }
        Some(g)
    })
    .await;
    let recovered_in = killed_at.elapsed();
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    assert!(created.header("idempotency-replayed").is_none(), "the handler ran: not a replay");
    assert_eq!(count_orders(pool).await, 1);

    // Not before the lease allowed: the database's clock is past the dead claim's lease, and the
    // retry's claim itself was made no earlier than that.
    let after_lease: bool =
        sqlx::query_scalar("SELECT now() >= $1").bind(lease_expires_at).fetch_one(pool).await.unwrap();
    assert!(after_lease);
    let runs = seen.lock().unwrap().clone();
    assert_eq!(runs.len(), 1, "{runs:?}");
    let run = &runs[0];
    assert_eq!(run.attempt, 2, "the retry took the key over: {run:?}");
    assert_eq!(run.previous_owner.as_deref(), Some(owner.as_str()), "taken over from the dead process's claim");
    assert!(
        run.claimed_at >= lease_expires_at,
        "claimed at {} before the dead claim's lease ended at {lease_expires_at}",
        run.claimed_at
    );
    let (state, attempt): (String, i32) =
        sqlx::query_as("SELECT state, attempt FROM oncely.ledger WHERE namespace = 'http' AND key = $1")
            .bind(&key)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!((state.as_str(), attempt), ("completed", 2));
    let http_records: i64 = sqlx::query_scalar("SELECT count(*) FROM oncely.ledger WHERE namespace = 'http'")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(http_records, 1);

    // A further retry replays the stored response; the handler does not run again.
    let replayed = send(app).await;
    assert_eq!(replayed.status, created.status);
    assert_eq!(replayed.body, created.body);
    assert_eq!(replayed.header("location"), created.header("location"));
    assert_eq!(replayed.header("content-type"), Some("application/json"));
    assert_eq!(replayed.header("idempotency-replayed"), Some("true"));
    assert_eq!(count_orders(pool).await, 1);
    assert_eq!(seen.lock().unwrap().len(), 1);
    let body: Option<String> = sqlx::query_scalar("SELECT body FROM orders").fetch_one(pool).await.unwrap();
    assert_eq!(body.as_deref(), Some(BODY));

    eprintln!("http crash: lease {LEASE:?}, {} busy answers, the retry ran {recovered_in:?} after SIGKILL", busy.get());
}
