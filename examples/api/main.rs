//! The example API server (seeds 001, 003, 004) behind the Idempotency-Key layer; the control-plane
//! routes also deduplicate on the seed's business keys (see `app.rs`).
//!
//! ```text
//! scripts/with-postgres cargo run --example api -- --api-key acct-1=sk_1        # serve on 127.0.0.1:3000
//! scripts/with-postgres cargo run --example api -- --listen 0.0.0.0:8080 ...     # elsewhere
//! scripts/with-postgres cargo run --example api -- --demo     # serve, double-submit, print, exit
//! ```
#![allow(clippy::print_stdout)]

mod app;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// POST `body` as user-7, with an `Idempotency-Key` header when `key` is not empty.
async fn post(addr: &str, path: &str, key: &str, body: &str) -> std::io::Result<String> {
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    let key_header = if key.is_empty() { String::new() } else { format!("idempotency-key: {key}\r\n") };
    let req = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer user-7\r\n{key_header}\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(req.as_bytes()).await?;
    let mut resp = String::new();
    conn.read_to_string(&mut resp).await?;
    let status = resp.lines().next().unwrap_or_default().to_owned();
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    Ok(format!("{status}  {body}"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    tracing_subscriber::fmt().with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into())).init();
    let mut args = <app::Args as clap::Parser>::parse();
    let demo = args.demo;
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| oncely::testkit::DEFAULT_DATABASE_URL.into());
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(16).connect(&url).await?;
    app::setup(&pool).await?;
    for pair in &args.api_keys {
        let (principal, key) = pair.split_once('=').ok_or("--api-key takes PRINCIPAL=KEY")?;
        app::add_api_key(&pool, principal, key).await?;
    }
    let provider = Arc::new(app::PaymentProvider::default());
    let state = app::AppState { pool: pool.clone(), provider: provider.clone() };
    if demo {
        args.listen = "127.0.0.1:0".parse()?;
        app::add_api_key(&pool, "user-7", "user-7").await?;
    }
    let server = app::start(state, &args).await?;
    let addr = server.addr.to_string();
    if !demo {
        println!("listening on http://{addr}  (try, after --api-key u1=k1: curl -i -X POST http://{addr}/checkout -H 'authorization: Bearer k1' -H 'idempotency-key: c1' -H 'content-type: application/json' -d '{{\"price\":\"pro\"}}')");
        server.wait().await;
        return Ok(());
    }
    let key = format!("demo-{}", std::process::id());
    let (a, b) = tokio::join!(
        post(&addr, "/checkout", &key, r#"{"price":"pro"}"#),
        post(&addr, "/checkout", &key, r#"{"price":"pro"}"#)
    );
    println!("double-click 1: {}", a?);
    println!("double-click 2: {}", b?);
    println!("same key, other body: {}", post(&addr, "/checkout", &key, r#"{"price":"team"}"#).await?);
    println!("usage:  {}", post(&addr, "/api/v1/usage", &format!("{key}-u"), r#"{"units":5}"#).await?);
    println!("replay: {}", post(&addr, "/api/v1/usage", &format!("{key}-u"), r#"{"units":5}"#).await?);
    let subs: i64 = sqlx::query_scalar("SELECT count(*) FROM subscriptions WHERE session_id IN (SELECT session_id FROM subscriptions ORDER BY id DESC LIMIT 1)")
        .fetch_one(&pool)
        .await?;
    println!(
        "subscriptions for that session: {subs}; payment provider calls: {}",
        provider.calls.load(Ordering::SeqCst)
    );

    // Control plane: the business keys dedupe whatever Idempotency-Key header comes (or none).
    let run = uuid::Uuid::new_v4().simple().to_string();
    let project = format!("demo-{}", &run[..12]);
    let body = format!(r#"{{"project_id":"{project}","name":"Demo"}}"#);
    println!("provision, key A:        {}", post(&addr, "/projects", &format!("{key}-pa"), &body).await?);
    println!("provision, key B:        {}", post(&addr, "/projects", &format!("{key}-pb"), &body).await?);
    let keys_path = format!("/projects/{project}/keys");
    let create = format!(r#"{{"request_id":"{run}"}}"#);
    let k1 = post(&addr, &keys_path, "", &create).await?;
    println!("create key, no header:   {k1}");
    println!("create key, again:       {}", post(&addr, &keys_path, "", &create).await?);
    println!("create key, no id:       {}", post(&addr, &keys_path, "", "{}").await?);
    let key_id = k1.split(r#""id":""#).nth(1).and_then(|r| r.split('"').next()).unwrap_or_default().to_owned();
    let revoke_path = format!("/keys/{key_id}/revoke");
    println!("revoke:                  {}", post(&addr, &revoke_path, "", "").await?);
    println!("revoke again:            {}", post(&addr, &revoke_path, "", "").await?);
    let (projects, keys): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM projects WHERE id = $1), (SELECT count(*) FROM api_keys WHERE project_id = $1)",
    )
    .bind(&project)
    .fetch_one(&pool)
    .await?;
    println!("projects {project}: {projects}; keys: {keys}");
    Ok(())
}
