//! The Idempotency-Key layer over axum, with the PostgreSQL store and the in-memory store.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use axum::body::Body;
use axum::extract::State;
use axum::routing::post;
use axum::Router;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use oncely_http::{IdempotencyConfig, IdempotencyLayer, InFlight, MemoryStore, MissingKey, PgStore, RequestTx};
use tower::ServiceExt;

#[derive(Clone, Default)]
struct Counter(Arc<AtomicU32>);

async fn create(State(c): State<Counter>, body: String) -> axum::response::Response {
    let n = c.0.fetch_add(1, Ordering::SeqCst) + 1;
    // Longer than a transactional duplicate waits under InFlight::Reject (TX_REJECT_LOCK_WAIT).
    tokio::time::sleep(Duration::from_millis(80)).await;
    axum::response::Response::builder()
        .status(StatusCode::CREATED)
        .header("content-type", "application/json")
        .header("location", format!("/things/{n}"))
        .header("set-cookie", "session=secret")
        .body(Body::from(format!(r#"{{"thing":{n},"echo":{body:?}}}"#)))
        .unwrap()
}

fn app(layer: IdempotencyLayer, counter: Counter) -> Router {
    Router::new().route("/things", post(create).put(create)).layer(layer).with_state(counter)
}

fn req(key: Option<&str>, body: &str) -> Request<Body> {
    let mut b = Request::post("/things").header("x-api-key", "tenant-a");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(Body::from(body.to_owned())).unwrap()
}

struct Got {
    status: StatusCode,
    headers: http::HeaderMap,
    body: bytes::Bytes,
}

async fn send(app: &Router, r: Request<Body>) -> Got {
    let resp = app.clone().oneshot(r).await.unwrap();
    let (parts, body) = resp.into_parts();
    Got { status: parts.status, headers: parts.headers, body: body.collect().await.unwrap().to_bytes() }
}

fn problem_type(g: &Got) -> String {
    assert_eq!(g.headers["content-type"], "application/problem+json");
    let doc: serde_json::Value = serde_json::from_slice(&g.body).unwrap();
    assert!(doc["request_id"].as_str().is_some_and(|s| !s.is_empty()));
    doc["type"].as_str().unwrap().to_owned()
}

/// Both stores, fresh.
async fn stores() -> Vec<(&'static str, IdempotencyLayer, Option<TestDb>)> {
    let db = TestDb::new().await;
    vec![
        ("postgres", IdempotencyLayer::new(PgStore::new(db.pool().clone())), Some(db)),
        ("memory", IdempotencyLayer::new(MemoryStore::default()), None),
    ]
}

fn with(layer: IdempotencyLayer, f: impl FnOnce(&mut IdempotencyConfig)) -> IdempotencyLayer {
    let mut c = IdempotencyConfig::default();
    f(&mut c);
    layer.with_config(c)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_first_request_runs_and_a_replay_gets_identical_bytes_and_safe_headers() {
    for (name, layer, _db) in stores().await {
        let counter = Counter::default();
        let app = app(layer, counter.clone());
        let first = send(&app, req(Some("k1"), "a")).await;
        let again = send(&app, req(Some("\"k1\""), "a")).await;
        assert_eq!(counter.0.load(Ordering::SeqCst), 1, "{name}: the handler ran once");
        assert_eq!((first.status, again.status), (StatusCode::CREATED, StatusCode::CREATED), "{name}");
        assert_eq!(first.body, again.body, "{name}: byte for byte");
        assert_eq!(again.headers["idempotency-replayed"], "true");
        assert!(first.headers.get("idempotency-replayed").is_none());
        assert_eq!(again.headers["location"], first.headers["location"]);
        assert_eq!(again.headers["content-type"], "application/json");
        assert!(again.headers.get("set-cookie").is_none(), "{name}: set-cookie is never replayed");
        // Another method passes through.
        let get = send(&app, Request::get("/things").body(Body::empty()).unwrap()).await;
        assert_eq!(get.status, StatusCode::METHOD_NOT_ALLOWED);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_reused_with_another_body_is_422_or_409_when_configured() {
    for (name, layer, _db) in stores().await {
        let app = app(layer, Counter::default());
        send(&app, req(Some("k"), "a")).await;
        let conflict = send(&app, req(Some("k"), "b")).await;
        assert_eq!(conflict.status, StatusCode::UNPROCESSABLE_ENTITY, "{name}");
        assert_eq!(problem_type(&conflict), "urn:oncely:problem:idempotency-key-reused");
    }
    for (name, layer, _db) in stores().await {
        let app = app(with(layer, |c| c.conflict_status = StatusCode::CONFLICT), Counter::default());
        send(&app, req(Some("k"), "a")).await;
        let conflict = send(&app, req(Some("k"), "b")).await;
        assert_eq!(conflict.status, StatusCode::CONFLICT, "{name}");
        let doc: serde_json::Value = serde_json::from_slice(&conflict.body).unwrap();
        assert_eq!(doc["code"], "idempotency_conflict");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_key_passes_through_is_required_or_is_generated_per_policy() {
    for (name, layer, _db) in stores().await {
        let counter = Counter::default();
        let pass = app(layer.clone(), counter.clone());
        send(&pass, req(None, "a")).await;
        send(&pass, req(None, "a")).await;
        assert_eq!(counter.0.load(Ordering::SeqCst), 2, "{name}: pass-through runs every time");

        let require = app(with(layer.clone(), |c| c.missing_key = MissingKey::Require), counter.clone());
        let refused = send(&require, req(None, "a")).await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST);
        assert_eq!(problem_type(&refused), "urn:oncely:problem:idempotency-key-missing");

        let generate = app(with(layer, |c| c.missing_key = MissingKey::Generate), counter.clone());
        let got = send(&generate, req(None, "a")).await;
        let key = got.headers["idempotency-key"].to_str().unwrap().to_owned();
        assert!(uuid_like(&key), "{key}");
        let replay = send(&generate, req(Some(&key), "a")).await;
        assert_eq!(replay.headers["idempotency-replayed"], "true", "{name}: the generated key works for retries");
        assert_eq!(counter.0.load(Ordering::SeqCst), 3);
    }
}

fn uuid_like(s: &str) -> bool {
    s.len() == 36 && s.chars().filter(|&c| c == '-').count() == 4
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_keys_and_oversize_bodies_are_refused_and_nothing_is_stored() {
    let db = TestDb::new().await;
    let layer = with(IdempotencyLayer::new(PgStore::new(db.pool().clone())), |c| c.max_body_bytes = 16);
    let counter = Counter::default();
    let app = app(layer, counter.clone());
    let long = "k".repeat(256);
    for bad in ["", "\"unterminated", "has space", long.as_str(), "caf\u{e9}"] {
        let mut r = req(None, "a");
        if let Ok(v) = http::HeaderValue::from_str(bad) {
            r.headers_mut().insert("idempotency-key", v);
        } else {
            r.headers_mut().insert("idempotency-key", http::HeaderValue::from_bytes(bad.as_bytes()).unwrap());
        }
        let got = send(&app, r).await;
        assert_eq!(got.status, StatusCode::BAD_REQUEST, "{bad:?}");
        assert_eq!(problem_type(&got), "urn:oncely:problem:idempotency-key-malformed");
    }
    let mut twice = req(Some("a"), "a");
    twice.headers_mut().append("idempotency-key", http::HeaderValue::from_static("b"));
    assert_eq!(send(&app, twice).await.status, StatusCode::BAD_REQUEST);

    let big = send(&app, req(Some("big"), &"x".repeat(17))).await;
    assert_eq!(big.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(problem_type(&big), "urn:oncely:problem:body-too-large");
    assert_eq!(counter.0.load(Ordering::SeqCst), 0, "the handler never ran");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM oncely.ledger").fetch_one(db.pool()).await.unwrap();
    assert_eq!(stored, 0, "nothing stored");
    let ok = send(&app, req(Some("big"), "small")).await;
    assert_eq!(ok.status, StatusCode::CREATED, "the key is still free");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_key_runs_again() {
    let db = TestDb::new().await;
    let counter = Counter::default();
    let app = app(IdempotencyLayer::new(PgStore::new(db.pool().clone())), counter.clone());
    send(&app, req(Some("k"), "a")).await;
    send(&app, req(Some("k"), "a")).await;
    assert_eq!(counter.0.load(Ordering::SeqCst), 1);
    sqlx::query("UPDATE oncely.ledger SET expires_at = now() - interval '1 second'").execute(db.pool()).await.unwrap();
    let again = send(&app, req(Some("k"), "a")).await;
    assert!(again.headers.get("idempotency-replayed").is_none());
    assert_eq!(counter.0.load(Ordering::SeqCst), 2);

    // The memory store with a short TTL.
    let counter = Counter::default();
    let app = self::app(
        with(IdempotencyLayer::new(MemoryStore::default()), |c| c.ttl = Duration::from_millis(100)),
        counter.clone(),
    );
    send(&app, req(Some("k"), "a")).await;
    eventually(Duration::from_secs(5), "the memory entry to expire", || async {
        send(&app, req(Some("k"), "a")).await;
        (counter.0.load(Ordering::SeqCst) == 2).then_some(())
    })
    .await;
}

/// A router with one POST route behind `layer`, whose handler `f` gets its 0-based call number;
/// and the call counter.
fn counting<F, Fut, R>(path: &str, layer: IdempotencyLayer, f: F) -> (Router, Arc<AtomicU32>)
where
    F: Fn(u32) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = R> + Send + 'static,
    R: axum::response::IntoResponse + 'static,
{
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let handler = move || {
        let (c, f) = (c.clone(), f.clone());
        async move { f(c.fetch_add(1, Ordering::SeqCst)).await }
    };
    (Router::new().route(path, post(handler)).layer(layer), calls)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_error_or_a_panic_releases_the_key_so_the_retry_runs() {
    for (name, layer, _db) in stores().await {
        let (app, calls) = counting("/pay", layer, |n| async move {
            match n {
                0 => (StatusCode::BAD_GATEWAY, "upstream down").into_response_(),
                1 => panic!("handler bug"),
                _ => (StatusCode::OK, "paid").into_response_(),
            }
        });
        let r = || Request::post("/pay").header("idempotency-key", "p").body(Body::empty()).unwrap();
        assert_eq!(send(&app, r()).await.status, StatusCode::BAD_GATEWAY, "{name}");
        let panicked = send(&app, r()).await;
        assert_eq!(panicked.status, StatusCode::INTERNAL_SERVER_ERROR, "{name}");
        assert_eq!(problem_type(&panicked), "urn:oncely:problem:internal-error");
        let ok = send(&app, r()).await;
        assert_eq!((ok.status, &ok.body[..]), (StatusCode::OK, &b"paid"[..]), "{name}");
        let replay = send(&app, r()).await;
        assert_eq!(replay.headers["idempotency-replayed"], "true");
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }
}

trait IntoResponse_ {
    fn into_response_(self) -> axum::response::Response;
}
impl<T: axum::response::IntoResponse> IntoResponse_ for T {
    fn into_response_(self) -> axum::response::Response {
        self.into_response()
    }
}

async fn concurrent(app: &Router, n: usize, key: &'static str) -> Vec<Got> {
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (app, barrier) = (app.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                send(&app, req(Some(key), "body")).await
            })
        })
        .collect();
    futures::future::join_all(tasks).await.into_iter().map(Result::unwrap).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_identical_requests_run_the_handler_once() {
    for n in [10, 100] {
        let mut layers = stores().await;
        let tx_db = TestDb::new().await;
        layers.push(("transactional", IdempotencyLayer::transactional(tx_db.new_pool(8).await), Some(tx_db)));
        for (name, layer, _db) in layers {
            // Default: the others get 409 with Retry-After (or a replay if they came late).
            let counter = Counter::default();
            let app = app(layer.clone(), counter.clone());
            let got = concurrent(&app, n, "reject-mode").await;
            assert_eq!(counter.0.load(Ordering::SeqCst), 1, "{name} x{n}: handler ran once");
            let created = got.iter().filter(|g| g.status == StatusCode::CREATED).count();
            let busy: Vec<_> = got.iter().filter(|g| g.status == StatusCode::CONFLICT).collect();
            assert_eq!(created + busy.len(), n, "{name} x{n}");
            assert!(busy.iter().all(|g| g.headers.contains_key("retry-after")));
            assert!(!busy.is_empty(), "{name} x{n}: some duplicates arrived while the first ran");
            let ran = got
                .iter()
                .filter(|g| g.status == StatusCode::CREATED && !g.headers.contains_key("idempotency-replayed"));
            assert_eq!(ran.count(), 1, "{name} x{n}: the other 201s are replays");

            // Wait mode: every response is the same.
            let counter = Counter::default();
            let app =
                self::app(with(layer, |c| c.in_flight = InFlight::Wait(Duration::from_secs(20))), counter.clone());
            let got = concurrent(&app, n, "wait-mode").await;
            assert_eq!(counter.0.load(Ordering::SeqCst), 1, "{name} x{n} wait: handler ran once");
            assert!(
                got.iter().all(|g| g.status == StatusCode::CREATED && g.body == got[0].body),
                "{name} x{n} wait: identical"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_tenants_with_the_same_key_are_independent() {
    for (name, layer, _db) in stores().await {
        let counter = Counter::default();
        let app = app(layer, counter.clone());
        let as_tenant = |t: &str, body: &str| {
            Request::post("/things")
                .header("x-api-key", t)
                .header("idempotency-key", "shared")
                .body(Body::from(body.to_owned()))
                .unwrap()
        };
        let a = send(&app, as_tenant("tenant-a", "from a")).await;
        let b = send(&app, as_tenant("tenant-b", "from b")).await;
        assert_eq!(counter.0.load(Ordering::SeqCst), 2, "{name}: both ran");
        assert_ne!(a.body, b.body);
        assert!(b.headers.get("idempotency-replayed").is_none(), "{name}: B never gets A's response");
        let a2 = send(&app, as_tenant("tenant-a", "from a")).await;
        assert_eq!(a2.body, a.body);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn responses_from_outer_layers_are_never_stored() {
    let db = TestDb::new().await;
    let counter = Counter::default();
    let app = app(IdempotencyLayer::new(PgStore::new(db.pool().clone())), counter.clone()).layer(
        axum::middleware::from_fn(|r: Request<Body>, next: axum::middleware::Next| async move {
            if r.headers().get("authorization").is_none() {
                return StatusCode::UNAUTHORIZED.into_response_();
            }
            next.run(r).await
        }),
    );
    let unauth = send(&app, req(Some("k"), "a")).await;
    assert_eq!(unauth.status, StatusCode::UNAUTHORIZED);
    let mut authed = req(Some("k"), "a");
    authed.headers_mut().insert("authorization", http::HeaderValue::from_static("Bearer t"));
    assert_eq!(send(&app, authed).await.status, StatusCode::CREATED);
    assert_eq!(counter.0.load(Ordering::SeqCst), 1);
}

/// A handler's own 401, 403 and 429 are answers about the moment (not signed in yet, not allowed
/// yet, slow down), not about the request: they are not stored, so the retry with the same key runs
/// the handler again and gets its real answer, which is then stored and replayed.
#[tokio::test(flavor = "multi_thread")]
async fn a_handlers_own_401_403_and_429_are_not_stored() {
    for status in [StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN, StatusCode::TOO_MANY_REQUESTS] {
        for (name, layer, _db) in stores().await {
            let (app, calls) = counting("/things", layer, move |n| async move {
                if n == 0 {
                    status
                } else {
                    StatusCode::CREATED
                }
            });
            assert_eq!(send(&app, req(Some("k"), "a")).await.status, status, "{name}");
            let retry = send(&app, req(Some("k"), "a")).await;
            assert_eq!(retry.status, StatusCode::CREATED, "{name} {status}: the retry ran the handler");
            let third = send(&app, req(Some("k"), "a")).await;
            assert_eq!(
                (third.status, third.headers.contains_key("idempotency-replayed")),
                (StatusCode::CREATED, true),
                "{name}"
            );
            assert_eq!(calls.load(Ordering::SeqCst), 2, "{name} {status}");
        }
    }
}

/// Clients that send the key under an older name keep working when that name is configured:
/// either name finds the same record, and a request carrying both is refused.
#[tokio::test(flavor = "multi_thread")]
async fn the_key_can_arrive_under_a_configured_older_header_name() {
    for (name, layer, _db) in stores().await {
        let counter = Counter::default();
        let plain = app(layer.clone(), counter.clone());
        let layer_copy = layer.clone();
        let aliased = app(
            with(layer, |c| {
                c.key_headers = vec![
                    http::HeaderName::from_static("idempotency-key"),
                    http::HeaderName::from_static("x-idempotency-key"),
                ]
            }),
            counter.clone(),
        );
        let old_name = |key: &str| {
            Request::post("/things")
                .header("x-api-key", "tenant-a")
                .header("x-idempotency-key", key)
                .body(Body::from("a"))
                .unwrap()
        };
        // Not configured: the old name is no key at all, so each request runs.
        send(&plain, old_name("legacy-0")).await;
        send(&plain, old_name("legacy-0")).await;
        assert_eq!(counter.0.load(Ordering::SeqCst), 2, "{name}");

        let first = send(&aliased, old_name("legacy-1")).await;
        let again = send(&aliased, old_name("legacy-1")).await;
        let new_name = send(&aliased, req(Some("legacy-1"), "a")).await;
        assert_eq!(counter.0.load(Ordering::SeqCst), 3, "{name}: one more run");
        assert_eq!(
            (first.body.clone(), first.body.clone()),
            (again.body, new_name.body),
            "{name}: both names replay it"
        );
        let mut both = old_name("legacy-2");
        both.headers_mut().insert("idempotency-key", http::HeaderValue::from_static("legacy-2"));
        // A name listed twice is still one header.
        let twice = app(
            with(layer_copy.clone(), |c| c.key_headers = vec![http::HeaderName::from_static("idempotency-key"); 2]),
            counter.clone(),
        );
        assert_eq!(send(&twice, req(Some("legacy-3"), "a")).await.status, StatusCode::CREATED, "{name}");
        let refused = send(&aliased, both).await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{name}");
        assert!(problem_type(&refused).ends_with("idempotency-key-malformed"), "{name}");
    }
}

/// Record usage: the effect is an UPDATE; in transactional mode through the request's transaction.
async fn add_usage(tx: Option<RequestTx>, pool: sqlx::PgPool) -> StatusCode {
    let sql = "UPDATE usage SET tokens = tokens + 10 WHERE user_id = 1";
    match tx {
        Some(tx) => {
            sqlx::query(sql).execute(&mut *tx.conn().await.unwrap()).await.unwrap();
        }
        None => {
            sqlx::query(sql).execute(&pool).await.unwrap();
        }
    }
    StatusCode::CREATED
}

/// The process dies after the effect and before the response is stored: the request task is
/// aborted at that point (the `before_store` hook never returns), then the client retries after the
/// lease. Without transactional mode the effect happens twice; with it, once.
async fn crash_between_effect_and_store(transactional: bool) -> i64 {
    let db = TestDb::new().await;
    let pool = db.pool().clone();
    sqlx::query("CREATE TABLE usage (user_id bigint PRIMARY KEY, tokens bigint)").execute(&pool).await.unwrap();
    sqlx::query("INSERT INTO usage VALUES (1, 0)").execute(&pool).await.unwrap();
    let crash = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let reached = Arc::new(tokio::sync::Notify::new());
    let (c, r) = (crash.clone(), reached.clone());
    let mut config = IdempotencyConfig { lease: Duration::from_millis(500), ..IdempotencyConfig::default() };
    config.before_store = Some(Arc::new(move || {
        let (c, r) = (c.clone(), r.clone());
        Box::pin(async move {
            if c.swap(false, Ordering::SeqCst) {
                r.notify_one();
                std::future::pending::<()>().await;
            }
        })
    }));
    let layer = if transactional {
        IdempotencyLayer::transactional(pool.clone())
    } else {
        IdempotencyLayer::new(PgStore::new(pool.clone()))
    };
    let p = pool.clone();
    let app = Router::new()
        .route(
            "/usage",
            post(move |tx: Option<RequestTx>| {
                let p = p.clone();
                async move { add_usage(if transactional { tx } else { None }, p).await }
            }),
        )
        .layer(layer.with_config(config));
    let r = || Request::post("/usage").header("idempotency-key", "u1").body(Body::from("{}")).unwrap();
    let app2 = app.clone();
    let first = tokio::spawn(async move { send(&app2, r()).await });
    reached.notified().await;
    first.abort(); // the process dies here
    let _ = first.await;

    let retried = eventually(Duration::from_secs(10), "the retry to succeed after the lease", || async {
        let g = send(&app, r()).await;
        (g.status == StatusCode::CREATED).then_some(g)
    })
    .await;
    assert_eq!(retried.status, StatusCode::CREATED);
    sqlx::query_scalar("SELECT tokens / 10 FROM usage WHERE user_id = 1").fetch_one(&pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_between_effect_and_store_repeats_the_effect_only_without_transactional_mode() {
    assert_eq!(crash_between_effect_and_store(false).await, 2, "the documented window: the effect ran twice");
    assert_eq!(crash_between_effect_and_store(true).await, 1, "transactional mode: the effect ran once");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_whose_process_died_mid_handler_holds_its_key_only_until_the_lease_ends() {
    let db = TestDb::new().await;
    let calls = Arc::new(AtomicU32::new(0));
    let started = Arc::new(tokio::sync::Notify::new());
    let (c, s) = (calls.clone(), started.clone());
    let lease = Duration::from_millis(800);
    let app = Router::new()
        .route(
            "/provision",
            post(move || {
                let (c, s) = (c.clone(), s.clone());
                async move {
                    if c.fetch_add(1, Ordering::SeqCst) == 0 {
                        s.notify_one();
                        std::future::pending::<()>().await; // the process dies in here
                    }
                    (StatusCode::CREATED, "project p1").into_response_()
                }
            }),
        )
        .layer(
            IdempotencyLayer::new(PgStore::new(db.pool().clone()))
                .with_config(IdempotencyConfig { lease, ..Default::default() }),
        );
    let r = || Request::post("/provision").header("idempotency-key", "provision:p1").body(Body::empty()).unwrap();
    let app2 = app.clone();
    let first = tokio::spawn(async move { send(&app2, r()).await });
    started.notified().await;
    first.abort();
    let _ = first.await;
    let killed_at = std::time::Instant::now();

    let busy = send(&app, r()).await;
    assert_eq!(busy.status, StatusCode::CONFLICT, "still in progress within the lease");
    assert_eq!(problem_type(&busy), "urn:oncely:problem:idempotency-key-in-progress");
    assert!(busy.headers.contains_key("retry-after"));
    let ok = eventually(Duration::from_secs(10), "the lease to end", || async {
        let g = send(&app, r()).await;
        (g.status == StatusCode::CREATED).then_some(g)
    })
    .await;
    assert!(killed_at.elapsed() >= lease - Duration::from_millis(100), "not before the lease ended");
    assert_eq!(&ok.body[..], b"project p1");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A request to `path` with `method`, key `k`, no caller identity header.
fn anonymous(method: http::Method, path: &str, key: &str, body: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("idempotency-key", key)
        .body(Body::from(body.to_owned()))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn keyless_callers_are_scoped_by_their_address_from_connect_info() {
    let db = TestDb::new().await;
    let counter = Counter::default();
    let app = app(IdempotencyLayer::new(PgStore::new(db.pool().clone())), counter.clone());
    let from = |ip: [u8; 4]| {
        let mut r = anonymous(http::Method::POST, "/things", "shared-key", "b");
        r.extensions_mut().insert(axum::extract::ConnectInfo(std::net::SocketAddr::from((ip, 40_000))));
        r
    };
    let a = send(&app, from([10, 0, 0, 1])).await;
    let b = send(&app, from([10, 0, 0, 2])).await;
    assert_eq!((a.status, b.status), (StatusCode::CREATED, StatusCode::CREATED));
    assert!(!b.headers.contains_key("idempotency-replayed"), "another address never gets the first's response");
    assert_ne!(a.body, b.body);
    let again = send(&app, from([10, 0, 0, 1])).await;
    assert_eq!((again.body, again.headers.contains_key("idempotency-replayed")), (a.body, true));
    assert_eq!(counter.0.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn other_methods_pass_through_and_a_key_reused_on_another_route_or_method_conflicts() {
    let db = TestDb::new().await;
    let counter = Counter::default();
    let router = Router::new()
        .route("/things", post(create).put(create).get(create))
        .route("/other", post(create))
        .layer(IdempotencyLayer::new(PgStore::new(db.pool().clone())))
        .with_state(counter.clone());
    // GET is not idempotency-checked by default: both run, nothing is stored.
    for _ in 0..2 {
        let mut r = anonymous(http::Method::GET, "/things", "get-key", "");
        r.headers_mut().insert("x-api-key", http::HeaderValue::from_static("tenant-a"));
        assert_eq!(send(&router, r).await.status, StatusCode::CREATED);
    }
    assert_eq!(counter.0.load(Ordering::SeqCst), 2);
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM oncely.ledger").fetch_one(db.pool()).await.unwrap();
    assert_eq!(stored, 0);

    assert_eq!(send(&router, req(Some("k1"), "same")).await.status, StatusCode::CREATED);
    let mut other_route = anonymous(http::Method::POST, "/other", "k1", "same");
    other_route.headers_mut().insert("x-api-key", http::HeaderValue::from_static("tenant-a"));
    let g = send(&router, other_route).await;
    assert_eq!(
        (g.status, problem_type(&g).ends_with("idempotency-key-reused")),
        (StatusCode::UNPROCESSABLE_ENTITY, true)
    );
    let mut other_method = anonymous(http::Method::PATCH, "/things", "k1", "same");
    other_method.headers_mut().insert("x-api-key", http::HeaderValue::from_static("tenant-a"));
    assert_eq!(send(&router, other_method).await.status, StatusCode::UNPROCESSABLE_ENTITY);
    // The query string is part of the request: the same key with other parameters is refused too.
    let mut with_query = anonymous(http::Method::POST, "/things?units=5", "k2", "same");
    with_query.headers_mut().insert("x-api-key", http::HeaderValue::from_static("tenant-a"));
    assert_eq!(send(&router, with_query).await.status, StatusCode::CREATED);
    let mut other_query = anonymous(http::Method::POST, "/things?units=50", "k2", "same");
    other_query.headers_mut().insert("x-api-key", http::HeaderValue::from_static("tenant-a"));
    let g = send(&router, other_query).await;
    assert_eq!(
        (g.status, problem_type(&g).ends_with("idempotency-key-reused")),
        (StatusCode::UNPROCESSABLE_ENTITY, true)
    );
    let mut same_query = anonymous(http::Method::POST, "/things?units=5", "k2", "same");
    same_query.headers_mut().insert("x-api-key", http::HeaderValue::from_static("tenant-a"));
    let g = send(&router, same_query).await;
    assert_eq!(g.status, StatusCode::CREATED);
    assert_eq!(g.headers.get("idempotency-replayed").map(|v| v.to_str().unwrap()), Some("true"), "replayed");
    assert_eq!(counter.0.load(Ordering::SeqCst), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_that_fails_answers_503_without_its_error_text_and_runs_nothing() {
    let db = TestDb::new().await;
    let pool = db.new_pool(2).await;
    let counter = Counter::default();
    let app = app(IdempotencyLayer::new(PgStore::new(pool.clone())), counter.clone());
    // The database goes away under the store.
    sqlx::query("DROP TABLE oncely.ledger").execute(db.pool()).await.unwrap();
    let g = send(&app, req(Some("k"), "a")).await;
    assert_eq!(g.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(problem_type(&g).ends_with("store-unavailable"), "{}", problem_type(&g));
    assert!(g.headers.contains_key("retry-after"));
    let text = String::from_utf8_lossy(&g.body).to_lowercase();
    for leak in ["ledger", "relation", "sqlx", "database", "does not exist", "oncely."] {
        assert!(!text.contains(leak), "the response leaks `{leak}`: {text}");
    }
    assert_eq!(counter.0.load(Ordering::SeqCst), 0, "nothing ran without a claim");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_store_server_errors_a_5xx_is_replayed_instead_of_run_again() {
    for (name, layer, _db) in stores().await {
        let (app, runs) = counting("/things", with(layer, |c| c.store_server_errors = true), |n| async move {
            (StatusCode::BAD_GATEWAY, format!("upstream failed, run {}", n + 1))
        });
        let first = send(&app, req(Some("k"), "a")).await;
        let second = send(&app, req(Some("k"), "a")).await;
        assert_eq!((first.status, second.status), (StatusCode::BAD_GATEWAY, StatusCode::BAD_GATEWAY), "{name}");
        assert_eq!(second.body, first.body, "{name}");
        assert!(second.headers.contains_key("idempotency-replayed"), "{name}");
        assert_eq!(runs.load(Ordering::SeqCst), 1, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_http_keys_are_cleaned_up_live_ones_kept_and_each_run_audited() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let store = PgStore::new(pool.clone());
    let counter = Counter::default();
    let expired = app(with(IdempotencyLayer::new(store.clone()), |c| c.ttl = Duration::ZERO), counter.clone());
    let live = app(with(IdempotencyLayer::new(store.clone()), |c| c.ttl = Duration::from_secs(3600)), counter.clone());
    assert_eq!(send(&expired, req(Some("old"), "a")).await.status, StatusCode::CREATED);
    assert_eq!(send(&live, req(Some("new"), "a")).await.status, StatusCode::CREATED);
    let keys = || async {
        sqlx::query_scalar::<_, String>("SELECT key FROM oncely.ledger WHERE namespace = 'http' ORDER BY key")
            .fetch_all(pool)
            .await
            .unwrap()
    };
    assert_eq!(keys().await.len(), 2);

    let cleanup = store.spawn_cleanup(Duration::from_millis(50));
    let deleted: i64 = eventually(Duration::from_secs(10), "an audited cleanup run", || async {
        sqlx::query_scalar(
            "SELECT deleted FROM oncely.maintenance_runs WHERE task = 'ledger_cleanup' ORDER BY id LIMIT 1",
        )
        .fetch_optional(pool)
        .await
        .unwrap()
    })
    .await;
    cleanup.abort();
    assert_eq!(deleted, 1);
    let left = keys().await;
    assert_eq!(left.len(), 1);
    assert!(left[0].ends_with("|new"), "{left:?}");
    // The live key still replays; the expired one runs again.
    assert!(send(&live, req(Some("new"), "a")).await.headers.contains_key("idempotency-replayed"));
    assert!(!send(&expired, req(Some("old"), "a")).await.headers.contains_key("idempotency-replayed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_running_longer_than_the_lease_keeps_its_key_and_runs_once() {
    const LEASE: Duration = Duration::from_millis(300);
    for (name, layer, _db) in stores().await {
        let (app, runs) = counting("/things", with(layer, |c| c.lease = LEASE), |_| async {
            tokio::time::sleep(LEASE * 4).await; // the handler's slow work
            StatusCode::CREATED
        });
        let started = std::time::Instant::now();
        let first = tokio::spawn({
            let app = app.clone();
            async move { send(&app, req(Some("slow"), "a")).await }
        });
        let r = runs.clone();
        eventually(Duration::from_secs(5), "the first request's handler to start", || async {
            (r.load(Ordering::SeqCst) == 1).then_some(())
        })
        .await;
        let mut late_duplicates = 0;
        while !first.is_finished() {
            let dup = send(&app, req(Some("slow"), "a")).await;
            assert!(
                dup.status == StatusCode::CONFLICT || dup.headers.contains_key("idempotency-replayed"),
                "{name}: a duplicate ran beside the first ({})",
                dup.status
            );
            if dup.status == StatusCode::CONFLICT && started.elapsed() > LEASE * 2 {
                late_duplicates += 1;
            }
            tokio::time::sleep(Duration::from_millis(50)).await; // pacing the client, not waiting on state
        }
        assert_eq!(first.await.unwrap().status, StatusCode::CREATED, "{name}");
        assert!(late_duplicates > 0, "{name}: duplicates were sent after the original lease ran out");
        assert_eq!(runs.load(Ordering::SeqCst), 1, "{name}: the slow handler ran once");
    }
}

// ---- Over real HTTP: a server on a loopback port, a raw HTTP/1.1 client. ----

/// Serve `router` on a loopback port.
async fn listen(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

/// POST `body` to `addr` with `headers`, over a fresh connection.
async fn post_http(addr: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Got {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req =
        format!("POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: {}\r\nconnection: close\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await.unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse::<u16>().unwrap();
    let mut headers = http::HeaderMap::new();
    for (k, v) in lines.filter_map(|l| l.split_once(':')) {
        headers.append(
            http::HeaderName::from_bytes(k.trim().as_bytes()).unwrap(),
            http::HeaderValue::from_str(v.trim()).unwrap(),
        );
    }
    Got {
        status: StatusCode::from_u16(status).unwrap(),
        headers,
        body: bytes::Bytes::copy_from_slice(&raw[split + 4..]),
    }
}

/// A 30-second bound on a step that must finish; a hang fails the test instead of stalling it.
async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), f).await.unwrap_or_else(|_| panic!("{what} never finished"))
}

/// Both stores and the transactional mode, fresh.
async fn all_modes() -> Vec<(&'static str, IdempotencyLayer, Option<TestDb>)> {
    let mut modes = stores().await;
    let db = TestDb::new().await;
    modes.push(("transactional", IdempotencyLayer::transactional(db.new_pool(4).await), Some(db)));
    modes
}

#[derive(serde::Deserialize)]
struct Order {
    units: i64,
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_rejected_before_its_handler_ran_is_not_stored_and_its_corrected_retry_runs() {
    for (name, layer, _db) in all_modes().await {
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        let router = Router::new()
            .route(
                "/orders",
                post(move |axum::Json(o): axum::Json<Order>| {
                    let r = r.clone();
                    async move {
                        let n = r.fetch_add(1, Ordering::SeqCst) + 1;
                        (StatusCode::CREATED, format!("order {n} of {} units", o.units))
                    }
                }),
            )
            .layer(layer);
        let addr = listen(router).await;
        let json = [("x-api-key", "tenant-a"), ("content-type", "application/json"), ("idempotency-key", "o1")];
        let text = [("x-api-key", "tenant-a"), ("content-type", "text/plain"), ("idempotency-key", "o1")];
        // A wrong Content-Type: axum's Json extractor answers 415 before the handler runs.
        let first = post_http(&addr, "/orders", &text, r#"{"units":5}"#).await;
        assert_eq!(first.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{name}");
        assert!(!first.headers.contains_key("idempotency-replayed"));
        // The corrected retry with the same key runs (the 415 was not stored)...
        let fixed = post_http(&addr, "/orders", &json, r#"{"units":5}"#).await;
        assert_eq!((fixed.status, &fixed.body[..]), (StatusCode::CREATED, &b"order 1 of 5 units"[..]), "{name}");
        assert!(!fixed.headers.contains_key("idempotency-replayed"), "{name}: the 415 was replayed");
        // ...and is stored as usual.
        let again = post_http(&addr, "/orders", &json, r#"{"units":5}"#).await;
        assert_eq!((again.body, again.headers.contains_key("idempotency-replayed")), (fixed.body, true), "{name}");

        // Unparsable JSON (400) and JSON of the wrong shape (422): the same.
        for (k, bad, status) in
            [("b1", "{units", StatusCode::BAD_REQUEST), ("b2", r#"{"units":"x"}"#, StatusCode::UNPROCESSABLE_ENTITY)]
        {
            let key = [("x-api-key", "tenant-a"), ("content-type", "application/json"), ("idempotency-key", k)];
            let refused = post_http(&addr, "/orders", &key, bad).await;
            assert_eq!(refused.status, status, "{name}: {bad}");
            // The fixed body is another request: the same key with it runs, it is not a reuse.
            let fixed = post_http(&addr, "/orders", &key, r#"{"units":7}"#).await;
            assert_eq!(fixed.status, StatusCode::CREATED, "{name}: {bad}: {:?}", fixed.body);
            // The bad body again is refused again, by the extractor, not replayed.
            let refused = post_http(&addr, "/orders", &key, bad).await;
            assert!(refused.status == StatusCode::UNPROCESSABLE_ENTITY || refused.status == status, "{name}");
            assert!(!refused.headers.contains_key("idempotency-replayed"), "{name}: {bad}");
        }
        assert_eq!(runs.load(Ordering::SeqCst), 3, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handler_marks_its_own_refusals_as_not_started_and_its_executed_4xx_as_started() {
    use oncely_http::Execution;
    for (name, layer, _db) in all_modes().await {
        let runs = Arc::new(AtomicU32::new(0));
        let (r1, r2) = (runs.clone(), runs.clone());
        let router = Router::new()
            // The first call refuses (a check before any effect), the next succeeds.
            .route(
                "/ship",
                post(move || {
                    let r = r1.clone();
                    async move {
                        match r.fetch_add(1, Ordering::SeqCst) {
                            0 => (StatusCode::CONFLICT, Execution::NotStarted, "not yet").into_response_(),
                            _ => (StatusCode::CREATED, "shipped").into_response_(),
                        }
                    }
                }),
            )
            // A declined charge that was recorded: a 422 that did execute.
            .route(
                "/charge",
                post(move || {
                    let r = r2.clone();
                    async move {
                        r.fetch_add(1, Ordering::SeqCst);
                        (StatusCode::UNPROCESSABLE_ENTITY, Execution::Started, "card declined")
                    }
                }),
            )
            .layer(layer);
        let addr = listen(router).await;
        let h = |k| [("x-api-key", "tenant-a"), ("idempotency-key", k)];
        assert_eq!(post_http(&addr, "/ship", &h("s"), "").await.status, StatusCode::CONFLICT, "{name}");
        let shipped = post_http(&addr, "/ship", &h("s"), "").await;
        assert_eq!((shipped.status, &shipped.body[..]), (StatusCode::CREATED, &b"shipped"[..]), "{name}");
        let declined = post_http(&addr, "/charge", &h("c"), "").await;
        let replayed = post_http(&addr, "/charge", &h("c"), "").await;
        assert_eq!(
            (declined.status, replayed.status),
            (StatusCode::UNPROCESSABLE_ENTITY, StatusCode::UNPROCESSABLE_ENTITY)
        );
        assert!(replayed.headers.contains_key("idempotency-replayed"), "{name}: an executed 422 is stored");
        assert_eq!(runs.load(Ordering::SeqCst), 3, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_duplicate_of_a_short_request_is_told_to_retry_in_a_second_not_the_lease() {
    for (name, layer, _db) in stores().await {
        let release = Arc::new(tokio::sync::Notify::new());
        let started = Arc::new(AtomicU32::new(0));
        let (rel, st) = (release.clone(), started.clone());
        let router = Router::new()
            .route(
                "/quick",
                post(move || {
                    let (rel, st) = (rel.clone(), st.clone());
                    async move {
                        if st.fetch_add(1, Ordering::SeqCst) == 1 {
                            rel.notified().await; // the second request stays in flight until told
                        }
                        StatusCode::CREATED
                    }
                }),
            )
            .layer(layer); // the default lease: 60 s
        let addr = listen(router).await;
        let h = |k| [("x-api-key", "tenant-a"), ("idempotency-key", k)];
        // One quick request first, so the layer has seen how long its requests take.
        assert_eq!(post_http(&addr, "/quick", &h("warm-up"), "").await.status, StatusCode::CREATED);
        let first = tokio::spawn({
            let addr = addr.clone();
            async move { post_http(&addr, "/quick", &[("x-api-key", "tenant-a"), ("idempotency-key", "q")], "").await }
        });
        let s = started.clone();
        eventually(Duration::from_secs(10), "the request to be in flight", || async {
            (s.load(Ordering::SeqCst) == 2).then_some(())
        })
        .await;
        let dup = post_http(&addr, "/quick", &h("q"), "").await;
        assert_eq!(dup.status, StatusCode::CONFLICT, "{name}");
        assert_eq!(dup.headers["retry-after"], "1", "{name}: not the 60 s left on the lease");
        release.notify_one();
        assert_eq!(bounded("the first request", first).await.unwrap().status, StatusCode::CREATED);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_are_scoped_by_the_principal_an_auth_layer_found_whatever_the_credential_spelling() {
    for (name, layer, _db) in stores().await {
        let counter = Counter::default();
        // The service's authentication: two tokens of one account (one refreshed), any scheme case.
        let auth =
            axum::middleware::from_fn(|mut req: axum::extract::Request, next: axum::middleware::Next| async move {
                let token = req
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.split_whitespace().nth(1))
                    .unwrap_or_default()
                    .to_owned();
                let principal = match token.as_str() {
                    "T1" | "T2" => "account-1",
                    "U1" => "account-2",
                    _ => return StatusCode::UNAUTHORIZED.into_response_(),
                };
                req.extensions_mut().insert(oncely_http::Principal(principal.into()));
                next.run(req).await
            });
        let router = Router::new().route("/things", post(create)).layer(layer).layer(auth).with_state(counter.clone());
        let addr = listen(router).await;
        let send_as = |auth: &'static str| {
            let addr = addr.clone();
            async move { post_http(&addr, "/things", &[("authorization", auth), ("idempotency-key", "k")], "a").await }
        };
        let first = send_as("Bearer T1").await;
        assert_eq!(first.status, StatusCode::CREATED, "{name}");
        for spelling in ["bearer T1", "Bearer  T1", "BEARER T2"] {
            let again = send_as(spelling).await;
            assert_eq!(again.body, first.body, "{name}: {spelling}");
            assert!(again.headers.contains_key("idempotency-replayed"), "{name}: {spelling} ran again");
        }
        assert_eq!(counter.0.load(Ordering::SeqCst), 1, "{name}: one effect");
        // Another principal with the same key is its own scope.
        assert!(!send_as("Bearer U1").await.headers.contains_key("idempotency-replayed"), "{name}");
        assert_eq!(counter.0.load(Ordering::SeqCst), 2, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_response_carries_a_request_id_echoed_only_when_short() {
    for (name, layer, _db) in stores().await {
        let router = Router::new().route("/things", post(create)).layer(layer).with_state(Counter::default());
        let addr = listen(router).await;
        let first = post_http(
            &addr,
            "/things",
            &[("x-api-key", "a"), ("idempotency-key", "r"), ("x-request-id", "req-1")],
            "a",
        )
        .await;
        assert_eq!(first.status, StatusCode::CREATED, "{name}");
        assert_eq!(first.headers["x-request-id"], "req-1", "{name}: a first 2xx carries it");
        let replay = post_http(
            &addr,
            "/things",
            &[("x-api-key", "a"), ("idempotency-key", "r"), ("x-request-id", "req-2")],
            "a",
        )
        .await;
        assert_eq!(replay.headers["x-request-id"], "req-2", "{name}: the replay's own id");
        // Without a key, or with none sent: generated.
        let keyless = post_http(&addr, "/things", &[("x-api-key", "a")], "a").await;
        assert!(uuid_like(keyless.headers["x-request-id"].to_str().unwrap()), "{name}");
        // Too long, or two values: not echoed.
        let long = "r".repeat(oncely_http::MAX_REQUEST_ID_LEN + 1);
        let g =
            post_http(&addr, "/things", &[("x-api-key", "a"), ("idempotency-key", "r2"), ("x-request-id", &long)], "a")
                .await;
        assert!(uuid_like(g.headers["x-request-id"].to_str().unwrap()), "{name}");
        let max = "r".repeat(oncely_http::MAX_REQUEST_ID_LEN);
        let g = post_http(&addr, "/things", &[("x-api-key", "a"), ("x-request-id", &max)], "a").await;
        assert_eq!(g.headers["x-request-id"], max.as_str(), "{name}");
        let g =
            post_http(&addr, "/things", &[("x-api-key", "a"), ("x-request-id", "a"), ("x-request-id", "b")], "a").await;
        assert_eq!(g.headers.get_all("x-request-id").iter().count(), 1, "{name}");
        assert!(uuid_like(g.headers["x-request-id"].to_str().unwrap()), "{name}");
    }
}

/// Transactional mode: the handler's transaction misused, over HTTP.
async fn tx_misuse(tx: RequestTx, uri: http::Uri) -> axum::response::Response {
    match uri.path() {
        // A statement fails, the handler refuses (a 409 it decided after a failed insert).
        "/refuse" => {
            let failed = sqlx::query("SELECT 1 / 0").execute(&mut *tx.conn().await.unwrap()).await;
            assert!(failed.is_err());
            (StatusCode::CONFLICT, "duplicate").into_response_()
        }
        // A statement fails and the handler answers success anyway: its writes are lost.
        "/pretend" => {
            sqlx::query("INSERT INTO effects VALUES (1)").execute(&mut *tx.conn().await.unwrap()).await.unwrap();
            let _ = sqlx::query("SELECT 1 / 0").execute(&mut *tx.conn().await.unwrap()).await;
            (StatusCode::CREATED, "done").into_response_()
        }
        _ => StatusCode::NOT_FOUND.into_response_(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handler_failure_in_transactional_mode_is_never_labelled_a_store_failure() {
    let db = TestDb::new().await;
    sqlx::query("CREATE TABLE effects (n int)").execute(db.pool()).await.unwrap();
    let pool = db.new_pool(4).await;
    let router = Router::new()
        .route("/refuse", post(tx_misuse))
        .route("/pretend", post(tx_misuse))
        .layer(IdempotencyLayer::transactional(pool));
    let addr = listen(router).await;
    let h = |k| [("x-api-key", "a"), ("idempotency-key", k)];
    // The handler's own refusal stands; nothing was stored, so a retry runs (and refuses) again.
    for _ in 0..2 {
        let g = post_http(&addr, "/refuse", &h("r"), "").await;
        assert_eq!((g.status, &g.body[..]), (StatusCode::CONFLICT, &b"duplicate"[..]));
        assert!(!g.headers.contains_key("idempotency-replayed"));
    }
    // Success over a failed transaction: a 500 of the handler, not a 503 of the store.
    let g = post_http(&addr, "/pretend", &h("p"), "").await;
    assert_eq!(g.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(problem_type(&g), "urn:oncely:problem:handler-failed");
    let effects: i64 = sqlx::query_scalar("SELECT count(*) FROM effects").fetch_one(db.pool()).await.unwrap();
    assert_eq!(effects, 0, "nothing was committed");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM oncely.ledger").fetch_one(db.pool()).await.unwrap();
    assert_eq!(stored, 0, "no key is held");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_request_transaction_used_after_the_handler_returned_is_a_typed_error_and_a_500() {
    let db = TestDb::new().await;
    let pool = db.new_pool(4).await;
    let (late_tx, late_rx) = tokio::sync::mpsc::unbounded_channel();
    let release = Arc::new(tokio::sync::Notify::new());
    let rel = release.clone();
    let done = Arc::new(tokio::sync::Notify::new());
    let finished = done.clone();
    let router = Router::new()
        // Spawns work that uses the transaction after the handler returned.
        .route(
            "/late",
            post(move |tx: RequestTx| {
                let late_tx = late_tx.clone();
                let rel = rel.clone();
                async move {
                    tokio::spawn(async move {
                        rel.notified().await;
                        let got = tx.conn().await.map(|_| ());
                        late_tx.send(got).unwrap();
                    });
                    StatusCode::CREATED
                }
            }),
        )
        // Spawns work that still holds the transaction's connection when the handler returns.
        .route(
            "/held",
            post(move |tx: RequestTx| {
                let finished = finished.clone();
                async move {
                    let (locked_tx, locked) = tokio::sync::oneshot::channel();
                    tokio::spawn(async move {
                        let conn = tx.conn().await.unwrap();
                        locked_tx.send(()).unwrap();
                        finished.notified().await; // held until the test ends
                        drop(conn);
                    });
                    locked.await.unwrap();
                    StatusCode::CREATED
                }
            }),
        )
        .layer(IdempotencyLayer::transactional(pool));
    let addr = listen(router).await;
    let mut late_rx = late_rx;
    let g = bounded("/late", post_http(&addr, "/late", &[("x-api-key", "a"), ("idempotency-key", "l")], "")).await;
    assert_eq!(g.status, StatusCode::CREATED);
    release.notify_one();
    let late = bounded("the late use", late_rx.recv()).await.unwrap();
    assert_eq!(late, Err(oncely_http::RequestTxClosed));

    let g = bounded("/held", post_http(&addr, "/held", &[("x-api-key", "a"), ("idempotency-key", "h")], "")).await;
    assert_eq!(g.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(problem_type(&g), "urn:oncely:problem:handler-failed", "a handler bug, not the store");
    done.notify_one();
}
