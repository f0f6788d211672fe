//! The example API end to end over real HTTP (a server on a loopback port, a raw HTTP/1.1 client).

mod common;

#[path = "../examples/api/app.rs"]
mod app;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

async fn post(addr: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    conn.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned())).collect();
    Resp { status, headers, body: body.to_owned() }
}

async fn serve(db: &TestDb) -> (String, Arc<app::PaymentProvider>) {
    app::setup(db.pool()).await.unwrap();
    let provider = Arc::new(app::PaymentProvider::default());
    let router = app::router(app::AppState { pool: db.pool().clone(), provider: provider.clone() });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (addr, provider)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_double_submitted_checkout_creates_one_subscription_and_one_provider_call() {
    let db = TestDb::new().await;
    let (addr, provider) = serve(&db).await;
    let h = [("authorization", "Bearer user-7"), ("idempotency-key", "checkout-click-1")];
    let (a, b) = tokio::join!(post(&addr, "/checkout", &h, r#"{"price":"pro"}"#), post(&addr, "/checkout", &h, r#"{"price":"pro"}"#));
    assert_eq!((a.status, b.status), (201, 201));
    assert_eq!(a.body, b.body, "both clicks get the same session");
    assert_eq!(provider.calls.load(Ordering::SeqCst), 1, "one provider call");
    let subs: i64 = sqlx::query_scalar("SELECT count(*) FROM subscriptions").fetch_one(db.pool()).await.unwrap();
    assert_eq!(subs, 1, "one subscription");
    assert!([a.header("idempotency-replayed"), b.header("idempotency-replayed")].contains(&Some("true")));

    // Another user with the same key is a different checkout.
    let other = post(&addr, "/checkout", &[("authorization", "Bearer user-8"), ("idempotency-key", "checkout-click-1")], r#"{"price":"pro"}"#).await;
    assert_eq!(other.status, 201);
    assert_ne!(other.body, a.body);
    // No key: refused on this route.
    let nokey = post(&addr, "/checkout", &[("authorization", "Bearer user-7")], r#"{"price":"pro"}"#).await;
    assert_eq!(nokey.status, 400);
    assert_eq!(nokey.header("content-type"), Some("application/problem+json"));
}

#[tokio::test(flavor = "multi_thread")]
async fn billing_endpoints_count_once_and_refuse_a_reused_key_with_409() {
    let db = TestDb::new().await;
    let (addr, _) = serve(&db).await;
    let key = |k: &'static str| [("x-api-key", "ak_live_1"), ("idempotency-key", k)];
    let first = post(&addr, "/api/v1/usage", &key("u-1"), r#"{"units":5}"#).await;
    let retry = post(&addr, "/api/v1/usage", &key("u-1"), r#"{"units":5}"#).await;
    assert_eq!((first.status, retry.status), (201, 201));
    assert_eq!(first.body, retry.body);
    assert_eq!(retry.header("idempotency-replayed"), Some("true"));
    let reused = post(&addr, "/api/v1/usage", &key("u-1"), r#"{"units":6}"#).await;
    assert_eq!(reused.status, 409);
    assert!(reused.body.contains("idempotency_conflict") && reused.body.contains("request_id"));

    let bulk = post(&addr, "/api/v1/usage/bulk", &key("b-1"), r#"{"items":[{"units":1},{"units":2}]}"#).await;
    assert_eq!(bulk.status, 201);
    post(&addr, "/api/v1/usage/bulk", &key("b-1"), r#"{"items":[{"units":1},{"units":2}]}"#).await;
    let settle = post(&addr, "/api/v1/settle", &key("s-1"), "").await;
    let settle_again = post(&addr, "/api/v1/settle", &key("s-1"), "").await;
    assert_eq!(settle.body, settle_again.body);
    assert!(settle.body.contains(r#""amount":8"#), "5 + 1 + 2 counted once each: {}", settle.body);
    let settlements: i64 = sqlx::query_scalar("SELECT count(*) FROM settlements").fetch_one(db.pool()).await.unwrap();
    assert_eq!(settlements, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn control_plane_endpoints_generate_a_key_when_none_is_sent() {
    let db = TestDb::new().await;
    let (addr, _) = serve(&db).await;
    let created = post(&addr, "/projects", &[("x-api-key", "ops")], r#"{"project_id":"p1","name":"One"}"#).await;
    assert_eq!(created.status, 201);
    let key = created.header("idempotency-key").unwrap().to_owned();
    let again = post(&addr, "/projects", &[("x-api-key", "ops"), ("idempotency-key", &key)], r#"{"project_id":"p1","name":"One"}"#).await;
    assert_eq!((again.status, again.body.as_str()), (201, created.body.as_str()), "a retry with the returned key replays");
    assert_eq!(again.header("location"), Some("/projects/p1"));

    let k1 = post(&addr, "/projects/p1/keys", &[("x-api-key", "ops"), ("idempotency-key", "create_key:req-1")], "").await;
    let k2 = post(&addr, "/projects/p1/keys", &[("x-api-key", "ops"), ("idempotency-key", "create_key:req-1")], "").await;
    assert_eq!(k1.body, k2.body, "a retried create returns the same key");
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys").fetch_one(db.pool()).await.unwrap();
    assert_eq!(keys, 1);
}
