//! The example API end to end over real HTTP (a server on a loopback port, a raw HTTP/1.1 client).

#[path = "../../examples/api/app.rs"]
mod app;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
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
    let headers =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned())).collect();
    Resp { status, headers, body: body.to_owned() }
}

/// The API keys the tests use, and whom each one names.
const CALLERS: [(&str, &str); 6] = [
    ("user-7", "user-7"),
    ("user-8", "user-8"),
    ("user-9", "user-9"),
    ("acct-1", "ak_live_1"),
    ("operator", "ops"),
    ("someone-else", "someone-else"),
];

fn args(extra: &[&str]) -> app::Args {
    let mut argv = vec!["api", "--listen", "127.0.0.1:0"];
    argv.extend_from_slice(extra);
    <app::Args as clap::Parser>::try_parse_from(argv).unwrap()
}

/// The example's server as its `main` starts it, on a loopback port, with the test callers' keys.
async fn serve_with(db: &TestDb, args: &app::Args) -> (String, Arc<app::PaymentProvider>) {
    app::setup(db.pool()).await.unwrap();
    for (principal, key) in CALLERS {
        app::add_api_key(db.pool(), principal, key).await.unwrap();
    }
    let provider = Arc::new(app::PaymentProvider::default());
    let state = app::AppState { pool: db.pool().clone(), provider: provider.clone() };
    let server = app::start(state, args).await.unwrap();
    (server.addr.to_string(), provider)
}

async fn serve(db: &TestDb) -> (String, Arc<app::PaymentProvider>) {
    serve_with(db, &args(&[])).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_double_submitted_checkout_creates_one_subscription_and_one_provider_call() {
    let db = TestDb::new().await;
    let (addr, provider) = serve(&db).await;
    let h = [("authorization", "Bearer user-7"), ("idempotency-key", "checkout-click-1")];
    let (a, b) = tokio::join!(
        post(&addr, "/checkout", &h, r#"{"price":"pro"}"#),
        post(&addr, "/checkout", &h, r#"{"price":"pro"}"#)
    );
    assert_eq!((a.status, b.status), (201, 201));
    assert_eq!(a.body, b.body, "both clicks get the same session");
    assert_eq!(provider.calls.load(Ordering::SeqCst), 1, "one provider call");
    let subs: i64 = sqlx::query_scalar("SELECT count(*) FROM subscriptions").fetch_one(db.pool()).await.unwrap();
    assert_eq!(subs, 1, "one subscription");
    assert!([a.header("idempotency-replayed"), b.header("idempotency-replayed")].contains(&Some("true")));

    // Another user with the same key is a different checkout.
    let other = post(
        &addr,
        "/checkout",
        &[("authorization", "Bearer user-8"), ("idempotency-key", "checkout-click-1")],
        r#"{"price":"pro"}"#,
    )
    .await;
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

    // Seed 003's "settle twice", with eight different keys at once (a client that lost track of
    // its key): the new usage is billed once, the old usage not again.
    post(&addr, "/api/v1/usage", &key("u-2"), r#"{"units":4}"#).await;
    let keys: Vec<_> =
        (0..8).map(|i| [("x-api-key", "ak_live_1".to_string()), ("idempotency-key", format!("s-many-{i}"))]).collect();
    let settles = futures::future::join_all(keys.iter().map(|k| {
        let headers = [(k[0].0, k[0].1.as_str()), (k[1].0, k[1].1.as_str())];
        let addr = addr.clone();
        async move { post(&addr, "/api/v1/settle", &headers, "").await }
    }))
    .await;
    assert!(settles.iter().all(|r| r.status == 200), "{:?}", settles.iter().map(|r| r.status).collect::<Vec<_>>());
    let amounts: Vec<i64> =
        sqlx::query_scalar("SELECT amount FROM settlements ORDER BY amount").fetch_all(db.pool()).await.unwrap();
    assert_eq!(amounts, vec![0, 0, 0, 0, 0, 0, 0, 4, 8], "the new 4 units billed by one settle, the old 8 not again");
    // The tables hold a digest of the caller, never the API key.
    let leaked: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM api_usage WHERE caller LIKE '%ak_live%') + (SELECT count(*) FROM settlements WHERE caller LIKE '%ak_live%')",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(leaked, 0);
}

/// Seed 001's BUG-047: one user, two checkouts with different keys at the same moment (two tabs):
/// one subscription, one provider call, and the other checkout is told which session exists.
#[tokio::test(flavor = "multi_thread")]
async fn one_user_gets_one_subscription_whatever_the_checkout_keys() {
    let db = TestDb::new().await;
    let (addr, provider) = serve(&db).await;
    let tab = |k: &'static str| [("authorization", "Bearer user-9"), ("idempotency-key", k)];
    let (t1, t2) = (tab("tab-1"), tab("tab-2"));
    let (a, b) = tokio::join!(
        post(&addr, "/checkout", &t1, r#"{"price":"pro"}"#),
        post(&addr, "/checkout", &t2, r#"{"price":"pro"}"#)
    );
    let mut statuses = [a.status, b.status];
    statuses.sort();
    assert_eq!(statuses, [201, 409], "{} / {}", a.body, b.body);
    let (made, refused) = if a.status == 201 { (&a, &b) } else { (&b, &a) };
    assert!(refused.body.contains("already_subscribed"), "{}", refused.body);
    let session = made.body.split('"').nth(3).unwrap();
    assert!(refused.body.contains(session), "the refusal names the existing session: {}", refused.body);
    assert_eq!(provider.calls.load(Ordering::SeqCst), 1, "the refused checkout called no provider");
    let subs: i64 = sqlx::query_scalar("SELECT count(*) FROM subscriptions").fetch_one(db.pool()).await.unwrap();
    assert_eq!(subs, 1);
}

/// Simulate a crash after the checkout handler ran and before the layer stored its response: the
/// key's record is back in progress with its lease run out, so the retry runs the handler again.
#[tokio::test(flavor = "multi_thread")]
async fn a_checkout_retried_after_a_crash_adds_no_second_subscription() {
    let db = TestDb::new().await;
    let (addr, provider) = serve(&db).await;
    let h = [("authorization", "Bearer user-7"), ("idempotency-key", "checkout-crash-1")];
    let first = post(&addr, "/checkout", &h, r#"{"price":"pro"}"#).await;
    assert_eq!(first.status, 201);
    let crashed = sqlx::query(
        "UPDATE oncely.ledger SET state = 'in_progress', output = NULL, lease_expires_at = now() - interval '1 second'
         WHERE namespace = 'http' AND key LIKE '%|checkout-crash-1'",
    )
    .execute(db.pool())
    .await
    .unwrap();
    assert_eq!(crashed.rows_affected(), 1);

    let retry = post(&addr, "/checkout", &h, r#"{"price":"pro"}"#).await;
    assert_eq!(retry.status, 201);
    assert_eq!(retry.header("idempotency-replayed"), None, "the handler ran again");
    assert_eq!(
        provider.calls.load(Ordering::SeqCst),
        1,
        "it found the subscription its checkout made: no second provider call"
    );
    assert_eq!(retry.body, first.body, "and returned the same session");
    let subs: i64 = sqlx::query_scalar("SELECT count(*) FROM subscriptions").fetch_one(db.pool()).await.unwrap();
    assert_eq!(subs, 1, "one subscription per provider session");
}

fn json(r: &Resp) -> serde_json::Value {
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.body))
}

async fn scalar(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(db.pool()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn control_plane_endpoints_generate_a_key_when_none_is_sent() {
    let db = TestDb::new().await;
    let (addr, _) = serve(&db).await;
    let created = post(&addr, "/projects", &[("x-api-key", "ops")], r#"{"project_id":"p1","name":"One"}"#).await;
    assert_eq!(created.status, 201);
    let key = created.header("idempotency-key").unwrap().to_owned();
    let again = post(
        &addr,
        "/projects",
        &[("x-api-key", "ops"), ("idempotency-key", &key)],
        r#"{"project_id":"p1","name":"One"}"#,
    )
    .await;
    assert_eq!(
        (again.status, again.body.as_str()),
        (201, created.body.as_str()),
        "a retry with the returned key replays"
    );
    assert_eq!(again.header("location"), Some("/projects/p1"));
    assert_eq!(again.header("idempotency-replayed"), Some("true"));

    let body = r#"{"request_id":"req-1"}"#;
    let k1 =
        post(&addr, "/projects/p1/keys", &[("x-api-key", "ops"), ("idempotency-key", "create_key:req-1")], body).await;
    let k2 =
        post(&addr, "/projects/p1/keys", &[("x-api-key", "ops"), ("idempotency-key", "create_key:req-1")], body).await;
    assert_eq!(k1.status, 201);
    assert_eq!(k1.body, k2.body, "a retried create returns the same key");
    assert_eq!(scalar(&db, "SELECT count(*) FROM api_keys").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn provisioning_a_project_twice_with_different_or_no_keys_creates_one_project() {
    let db = TestDb::new().await;
    let (addr, _) = serve(&db).await;
    let body = r#"{"project_id":"p1","name":"One"}"#;
    // A double-click that sends no header: two generated keys, so the layer cannot tell.
    let (a, b) = tokio::join!(
        post(&addr, "/projects", &[("x-api-key", "ops")], body),
        post(&addr, "/projects", &[("x-api-key", "ops")], body)
    );
    assert_eq!((a.status, b.status), (201, 201), "{} / {}", a.body, b.body);
    assert_ne!(a.header("idempotency-key"), b.header("idempotency-key"));
    assert_eq!(a.body, b.body, "the same response");
    assert_eq!(json(&a), serde_json::json!({"id": "p1", "name": "One"}));
    let replays = [a.header("idempotency-replayed"), b.header("idempotency-replayed")];
    assert_eq!(replays.iter().filter(|r| **r == Some("true")).count(), 1, "one ran, one got its record: {replays:?}");
    // Two different header keys: the same again.
    let c = post(&addr, "/projects", &[("x-api-key", "ops"), ("idempotency-key", "click-1")], body).await;
    let d = post(&addr, "/projects", &[("x-api-key", "ops"), ("idempotency-key", "click-2")], body).await;
    assert_eq!((c.status, c.body.as_str(), d.status, d.body.as_str()), (201, a.body.as_str(), 201, a.body.as_str()));
    assert_eq!((c.header("location"), d.header("location")), (Some("/projects/p1"), Some("/projects/p1")));
    assert_eq!(scalar(&db, "SELECT count(*) FROM projects").await, 1, "one project");
    assert_eq!(
        scalar(&db, "SELECT count(*) FROM oncely.ledger WHERE namespace = 'idempotency' AND key = 'provision:p1'")
            .await,
        1
    );

    // Not the same request: another caller, or another name for the id. Nothing is replayed to it.
    let other = post(&addr, "/projects", &[("x-api-key", "someone-else")], body).await;
    assert_eq!((other.status, json(&other)["code"].as_str()), (409, Some("project_exists")));
    let renamed = post(&addr, "/projects", &[("x-api-key", "ops")], r#"{"project_id":"p1","name":"Renamed"}"#).await;
    assert_eq!((renamed.status, json(&renamed)["code"].as_str()), (409, Some("project_exists")));
    // A project made before any record (or after it expired) is a conflict, not a replay.
    sqlx::query("INSERT INTO projects (id, name) VALUES ('p0', 'Zero')").execute(db.pool()).await.unwrap();
    let old = post(&addr, "/projects", &[("x-api-key", "ops")], r#"{"project_id":"p0","name":"Zero"}"#).await;
    assert_eq!(old.status, 409);
    assert_eq!(
        scalar(&db, "SELECT count(*) FROM oncely.ledger WHERE namespace = 'idempotency' AND key = 'provision:p0'")
            .await,
        0,
        "refusals are not recorded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn creating_a_key_twice_with_one_request_id_creates_one_key() {
    let db = TestDb::new().await;
    let (addr, _) = serve(&db).await;
    assert_eq!(
        post(&addr, "/projects", &[("x-api-key", "ops")], r#"{"project_id":"p1","name":"One"}"#).await.status,
        201
    );
    let body = r#"{"request_id":"req-42"}"#;
    // Five concurrent retries, each with its own header key or none.
    let headers: [&[(&str, &str)]; 5] = [
        &[("x-api-key", "ops")],
        &[("x-api-key", "ops")],
        &[("x-api-key", "ops"), ("idempotency-key", "k-1")],
        &[("x-api-key", "ops"), ("idempotency-key", "k-2")],
        &[("x-api-key", "ops"), ("idempotency-key", "k-3")],
    ];
    let all = futures::future::join_all(headers.iter().map(|h| post(&addr, "/projects/p1/keys", h, body))).await;
    for r in &all {
        assert_eq!((r.status, r.body.as_str()), (201, all[0].body.as_str()), "the same key for every retry");
    }
    let key = json(&all[0]);
    assert_eq!(key["project_id"], "p1");
    assert!(key["id"].as_str().unwrap().starts_with("key_"));
    assert_eq!(all.iter().filter(|r| r.header("idempotency-replayed").is_none()).count(), 1, "one ran");
    assert_eq!(scalar(&db, "SELECT count(*) FROM api_keys").await, 1, "one key");

    // Another request id is another key.
    let other = post(&addr, "/projects/p1/keys", &[("x-api-key", "ops")], r#"{"request_id":"req-43"}"#).await;
    assert_eq!(other.status, 201);
    assert_ne!(json(&other)["id"], key["id"]);
    // The request id reused by another caller, or for another project: refused, the key not shown.
    let thief = post(&addr, "/projects/p1/keys", &[("x-api-key", "someone-else")], body).await;
    assert_eq!((thief.status, json(&thief)["code"].as_str()), (409, Some("request_id_conflict")));
    assert!(!thief.body.contains(key["id"].as_str().unwrap()));
    let elsewhere = post(&addr, "/projects/p2/keys", &[("x-api-key", "ops")], body).await;
    assert_eq!(elsewhere.status, 409);
    // An unknown project: 404, and nothing recorded under the request id.
    let missing = post(&addr, "/projects/nope/keys", &[("x-api-key", "ops")], r#"{"request_id":"req-44"}"#).await;
    assert_eq!((missing.status, json(&missing)["code"].as_str()), (404, Some("no_such_project")));
    assert_eq!(scalar(&db, "SELECT count(*) FROM api_keys").await, 2);
    assert_eq!(
        scalar(&db, "SELECT count(*) FROM oncely.ledger WHERE namespace = 'idempotency' AND key = 'create_key:req-44'")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn creating_a_key_without_a_request_id_is_a_400() {
    let db = TestDb::new().await;
    let (addr, _) = serve(&db).await;
    assert_eq!(
        post(&addr, "/projects", &[("x-api-key", "ops")], r#"{"project_id":"p1","name":"One"}"#).await.status,
        201
    );
    let long = format!(r#"{{"request_id":"{}"}}"#, "r".repeat(256));
    for (i, body) in
        ["", "{}", r#"{"request_id":""}"#, r#"{"request_id":null}"#, "not json", &long].into_iter().enumerate()
    {
        let header_key = format!("create-{i}");
        let r = post(&addr, "/projects/p1/keys", &[("x-api-key", "ops"), ("idempotency-key", &header_key)], body).await;
        assert_eq!(r.status, 400, "body {body:?}: {}", r.body);
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(json(&r)["code"], "request_id_required");
        assert!(json(&r)["error"].as_str().unwrap().contains("request_id"));
    }
    // Without any header too.
    let r = post(&addr, "/projects/p1/keys", &[("x-api-key", "ops")], "").await;
    assert_eq!((r.status, json(&r)["code"].as_str()), (400, Some("request_id_required")));
    assert_eq!(scalar(&db, "SELECT count(*) FROM api_keys").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn revoking_a_key_twice_returns_the_same_response_and_one_timestamp() {
    let db = TestDb::new().await;
    let (addr, _) = serve(&db).await;
    assert_eq!(
        post(&addr, "/projects", &[("x-api-key", "ops")], r#"{"project_id":"p1","name":"One"}"#).await.status,
        201
    );
    let key = json(&post(&addr, "/projects/p1/keys", &[("x-api-key", "ops")], r#"{"request_id":"req-1"}"#).await)["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/keys/{key}/revoke");

    let first = post(&addr, &path, &[("x-api-key", "ops")], "").await;
    let second = post(&addr, &path, &[("x-api-key", "ops"), ("idempotency-key", "revoke-again")], "").await;
    assert_eq!((first.status, second.status), (200, 200), "{}", first.body);
    assert_eq!(first.body, second.body, "the same response");
    assert_eq!((first.header("idempotency-replayed"), second.header("idempotency-replayed")), (None, Some("true")));
    let body = json(&first);
    assert_eq!((body["id"].as_str(), body["revoked"].as_bool()), (Some(key.as_str()), Some(true)));
    let stored: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT revoked_at FROM api_keys WHERE id = $1")
        .bind(&key)
        .fetch_one(db.pool())
        .await
        .unwrap();
    let answered: chrono::DateTime<chrono::Utc> = body["revoked_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(answered, stored, "one revocation timestamp");

    // After the record expires the revocation is still permanent: the same body again.
    let expired = sqlx::query("UPDATE oncely.ledger SET expires_at = now() - interval '1 second' WHERE namespace = 'idempotency' AND key = $1")
        .bind(format!("revoke:{key}"))
        .execute(db.pool())
        .await
        .unwrap();
    assert_eq!(expired.rows_affected(), 1);
    let third = post(&addr, &path, &[("x-api-key", "ops")], "").await;
    assert_eq!((third.status, third.body.as_str()), (200, first.body.as_str()));
    assert_eq!(third.header("idempotency-replayed"), None, "it ran again, and changed nothing");
    let stored_again: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT revoked_at FROM api_keys WHERE id = $1")
            .bind(&key)
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(stored_again, stored);

    let unknown = post(&addr, "/keys/key_nope/revoke", &[("x-api-key", "ops")], "").await;
    assert_eq!((unknown.status, json(&unknown)["code"].as_str()), (404, Some("no_such_key")));
    assert_eq!(
        scalar(&db, "SELECT count(*) FROM oncely.ledger WHERE namespace = 'idempotency' AND key = 'revoke:key_nope'")
            .await,
        0
    );
}

fn problem(r: &Resp) -> serde_json::Value {
    assert_eq!(r.header("content-type"), Some("application/problem+json"), "{}", r.body);
    serde_json::from_str(&r.body).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn callers_are_authenticated_and_one_principal_is_one_scope_whatever_its_credential() {
    let db = TestDb::new().await;
    let (addr, _) = serve(&db).await;
    // A key acct-1 was given after ak_live_1 (a rotation): the same principal.
    app::add_api_key(db.pool(), "acct-1", "ak_live_1_rotated").await.unwrap();
    let usage = |auth: (&'static str, &'static str)| {
        let addr = addr.clone();
        async move { post(&addr, "/api/v1/usage", &[auth, ("idempotency-key", "u-1")], r#"{"units":5}"#).await }
    };
    let first = usage(("authorization", "Bearer ak_live_1")).await;
    assert_eq!(first.status, 201, "{}", first.body);
    for cred in [
        ("authorization", "bearer ak_live_1"),
        ("authorization", "Bearer   ak_live_1"),
        ("x-api-key", "ak_live_1"),
        ("authorization", "Bearer ak_live_1_rotated"),
    ] {
        let again = usage(cred).await;
        assert_eq!((again.status, again.body.as_str()), (201, first.body.as_str()), "{cred:?}");
        assert_eq!(again.header("idempotency-replayed"), Some("true"), "{cred:?} ran again");
    }
    assert_eq!(scalar(&db, "SELECT count(*) FROM api_usage").await, 1, "one effect");
    assert_eq!(scalar(&db, "SELECT count(*) FROM api_usage WHERE caller = 'acct-1'").await, 1);

    // No key, an unknown key, a revoked key: 401 before any idempotency layer, nothing stored.
    sqlx::query("UPDATE api_credentials SET revoked_at = now() WHERE principal = 'someone-else'")
        .execute(db.pool())
        .await
        .unwrap();
    for headers in [
        vec![("idempotency-key", "u-2")],
        vec![("authorization", "Bearer nope"), ("idempotency-key", "u-2")],
        vec![("authorization", "Basic ak_live_1"), ("idempotency-key", "u-2")],
        vec![("x-api-key", "someone-else"), ("idempotency-key", "u-2")],
    ] {
        let r = post(&addr, "/api/v1/usage", &headers, r#"{"units":5}"#).await;
        assert_eq!((r.status, json(&r)["code"].as_str()), (401, Some("unauthenticated")), "{headers:?}");
        assert!(r.header("x-request-id").is_some_and(|v| !v.is_empty()), "{headers:?}");
    }
    assert_eq!(scalar(&db, "SELECT count(*) FROM api_usage").await, 1);
    assert_eq!(scalar(&db, "SELECT count(*) FROM oncely.ledger WHERE key LIKE '%|u-2'").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_response_of_the_example_carries_a_request_id() {
    let db = TestDb::new().await;
    let (addr, _) = serve(&db).await;
    let h = [("x-api-key", "ak_live_1"), ("idempotency-key", "rid-1"), ("x-request-id", "trace-1")];
    let first = post(&addr, "/api/v1/usage", &h, r#"{"units":1}"#).await;
    assert_eq!((first.status, first.header("x-request-id")), (201, Some("trace-1")));
    let long = "t".repeat(oncely_http::MAX_REQUEST_ID_LEN + 1);
    let r = post(&addr, "/api/v1/settle", &[("x-api-key", "ak_live_1"), ("x-request-id", &long)], "").await;
    assert_eq!(r.status, 200);
    assert!(r.header("x-request-id").is_some_and(|v| v.len() == 36), "{:?}", r.header("x-request-id"));
    let lost = post(&addr, "/nowhere", &[("x-api-key", "ak_live_1")], "").await;
    // (An unknown route reaches the last merged router's fallback, behind its idempotency layer.)
    assert!((400..500).contains(&lost.status), "{}", lost.status);
    assert!(lost.header("x-request-id").is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_reused_on_another_route_gets_the_same_answer_on_every_route() {
    let db = TestDb::new().await;
    let (addr, _) = serve(&db).await;
    let h = |k: &'static str| [("x-api-key", "ops"), ("idempotency-key", k)];
    let project = r#"{"project_id":"p1","name":"One"}"#;
    // Billing first, then the control plane; and the other way round.
    assert_eq!(post(&addr, "/api/v1/usage", &h("shared-1"), r#"{"units":1}"#).await.status, 201);
    assert_eq!(post(&addr, "/projects", &h("shared-2"), project).await.status, 201);
    for (path, key, body) in [
        ("/projects", "shared-1", project),
        ("/checkout", "shared-1", r#"{"price":"pro"}"#),
        ("/api/v1/usage", "shared-2", r#"{"units":1}"#),
        ("/api/v1/settle", "shared-2", ""),
    ] {
        let r = post(&addr, path, &h(key), body).await;
        assert_eq!(r.status, 409, "{path} with {key}: {}", r.body);
        assert_eq!(problem(&r)["code"], "idempotency_conflict", "{path}");
        assert_eq!(problem(&r)["type"], "urn:oncely:problem:idempotency-key-reused", "{path}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_example_server_deletes_expired_keys_itself() {
    let db = TestDb::new().await;
    let (addr, _) = serve_with(&db, &args(&["--cleanup-interval", "0.05"])).await;
    let h = |k: &'static str| [("x-api-key", "ops"), ("idempotency-key", k)];
    assert_eq!(post(&addr, "/projects", &h("old"), r#"{"project_id":"p1","name":"One"}"#).await.status, 201);
    assert_eq!(post(&addr, "/projects", &h("new"), r#"{"project_id":"p2","name":"Two"}"#).await.status, 201);
    // The first key's 1 h ran out (moved back, rather than waited for).
    sqlx::query("UPDATE oncely.ledger SET expires_at = now() - interval '1 minute' WHERE namespace = 'http' AND key LIKE '%|old'")
        .execute(db.pool())
        .await
        .unwrap();
    eventually(Duration::from_secs(20), "the expired key to be deleted", || async {
        (scalar(&db, "SELECT count(*) FROM oncely.ledger WHERE namespace = 'http' AND key LIKE '%|old'").await == 0)
            .then_some(())
    })
    .await;
    assert_eq!(
        scalar(&db, "SELECT count(*) FROM oncely.ledger WHERE namespace = 'http' AND key LIKE '%|new'").await,
        1
    );
    assert!(
        scalar(
            &db,
            "SELECT coalesce(sum(deleted), 0)::bigint FROM oncely.maintenance_runs WHERE task = 'ledger_cleanup'"
        )
        .await
            >= 1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_example_server_listens_where_told() {
    let db = TestDb::new().await;
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let listen = format!("127.0.0.1:{port}");
    let mut a = args(&[]);
    a.listen = listen.parse().unwrap();
    assert_eq!(<app::Args as clap::Parser>::try_parse_from(["api", "--listen", &listen]).unwrap().listen, a.listen);
    let (addr, _) = serve_with(&db, &a).await;
    assert_eq!(addr, listen);
    let r = post(&listen, "/projects", &[("x-api-key", "ops")], r#"{"project_id":"p1","name":"One"}"#).await;
    assert_eq!(r.status, 201);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let db = TestDb::new().await;
    let (addr, _) = serve_with(&db, &args(&["--header-read-timeout", "0.2"])).await;
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"POST /projects HTTP/1.1\r\nhost: x\r\nx-api-key: ops\r\n").await.unwrap();
    // The server closes the connection (perhaps after a 408); without a timeout this never ends.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(30), slow.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the connection is still open");
    // Other clients are served meanwhile and after.
    let r = post(&addr, "/projects", &[("x-api-key", "ops")], r#"{"project_id":"p1","name":"One"}"#).await;
    assert_eq!(r.status, 201);
}
