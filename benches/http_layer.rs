//! Requests/s through the Idempotency-Key layer (first requests and replays, in-memory and
//! PostgreSQL stores) against the same handler without it, in one run. Not a test.
//!
//! `scripts/with-postgres cargo bench --bench http_layer`
#![allow(clippy::print_stdout)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use http::{Request, StatusCode};
use oncely_http::{IdempotencyLayer, MemoryStore, PgStore};
use sqlx::Connection;
use tower::ServiceExt;

const TASKS: usize = 16;
const PHASE: Duration = Duration::from_secs(3);

/// The handler: with a pool, one INSERT per request (through the request's transaction in
/// transactional mode); without, an in-memory answer.
fn router(layer: Option<IdempotencyLayer>, pool: Option<sqlx::PgPool>) -> Router {
    let r = Router::new().route(
        "/things",
        post(move |tx: Option<oncely_http::RequestTx>, body: String| {
            let pool = pool.clone();
            async move {
                let sql = "INSERT INTO things (body) VALUES ($1)";
                match (tx, pool) {
                    (Some(tx), _) => {
                        sqlx::query(sql).bind(&body).execute(&mut *tx.conn().await.unwrap()).await.unwrap();
                    }
                    (None, Some(pool)) => {
                        sqlx::query(sql).bind(&body).execute(&pool).await.unwrap();
                    }
                    (None, None) => {}
                }
                (StatusCode::CREATED, format!(r#"{{"echo":{}}}"#, body.len()))
            }
        }),
    );
    match layer {
        Some(l) => r.layer(l),
        None => r,
    }
}

/// Run `TASKS` concurrent clients for `PHASE`; `key(task, i)` gives each request's key.
async fn rate(app: Router, key: impl Fn(usize, u64) -> Option<String> + Send + Sync + 'static) -> f64 {
    let key = Arc::new(key);
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let (app, key, done) = (app.clone(), key.clone(), done.clone());
            tokio::spawn(async move {
                let mut i = 0u64;
                while start.elapsed() < PHASE {
                    let mut b = Request::post("/things").header("x-api-key", "bench");
                    if let Some(k) = key(t, i) {
                        b = b.header("idempotency-key", k);
                    }
                    let resp = app.clone().oneshot(b.body(Body::from(r#"{"units":1}"#)).unwrap()).await.unwrap();
                    assert_eq!(resp.status(), StatusCode::CREATED);
                    i += 1;
                }
                done.fetch_add(i, Ordering::Relaxed);
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let server = std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let name = format!("oncely_http_bench_{}", std::process::id());
    let mut admin = sqlx::PgConnection::connect(&server).await.expect("DATABASE_URL must reach PostgreSQL");
    sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&mut admin).await.unwrap();
    let url = oncely_testkit::url_with_database(&server, &name);
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(TASKS as u32).connect(&url).await.unwrap();
    oncely::migrate(&pool).await.unwrap();

    sqlx::query("CREATE TABLE things (id bigserial PRIMARY KEY, body text NOT NULL)").execute(&pool).await.unwrap();
    println!("http_layer bench: {TASKS} concurrent clients, {PHASE:?} per phase, in-process (tower oneshot)");
    for (name, db) in [("handler answers from memory", None), ("handler writes one row", Some(pool.clone()))] {
        println!("-- {name}");
        let base = rate(router(None, db.clone()), |_, _| None).await;
        println!("   no layer (baseline):                {base:>10.0} req/s");
        let mem = IdempotencyLayer::new(MemoryStore::with_capacity(10_000_000));
        let first = rate(router(Some(mem.clone()), db.clone()), |t, i| Some(format!("m-{t}-{i}"))).await;
        println!("   memory store, first requests:       {first:>10.0} req/s  {:.2}x baseline", first / base);
        let replay = rate(router(Some(mem), db.clone()), |t, _| Some(format!("m-{t}-0"))).await;
        println!("   memory store, replays:              {replay:>10.0} req/s  {:.2}x baseline", replay / base);
        let tag = if db.is_some() { "w" } else { "r" };
        let pg = IdempotencyLayer::new(PgStore::new(pool.clone()));
        let first = rate(router(Some(pg.clone()), db.clone()), move |t, i| Some(format!("p{tag}-{t}-{i}"))).await;
        println!("   postgres store, first requests:     {first:>10.0} req/s  {:.2}x baseline", first / base);
        let replay = rate(router(Some(pg), db.clone()), move |t, _| Some(format!("p{tag}-{t}-0"))).await;
        println!("   postgres store, replays:            {replay:>10.0} req/s  {:.2}x baseline", replay / base);
        if db.is_some() {
            let tx = IdempotencyLayer::transactional(pool.clone());
            let first = rate(router(Some(tx), db.clone()), |t, i| Some(format!("t-{t}-{i}"))).await;
            println!("   postgres transactional, first:      {first:>10.0} req/s  {:.2}x baseline", first / base);
        }
    }

    pool.close().await;
    sqlx::query(&format!("DROP DATABASE \"{name}\" WITH (FORCE)")).execute(&mut admin).await.unwrap();
}
