//! The example API: the seeds' endpoints behind the Idempotency-Key layer.
//!
//! - Billing (seed 003): `POST /api/v1/usage`, `POST /api/v1/usage/bulk`, `POST /api/v1/settle` —
//!   transactional mode (the usage rows and the stored response commit together), a key reused
//!   with another body is `409 idempotency_conflict`, 24 h TTL.
//! - Control plane (seed 004): `POST /projects` (1 h TTL), `POST /projects/{id}/keys` (5 min),
//!   `POST /keys/{id}/revoke` (5 min). A request without a key gets a generated one, returned in the
//!   `Idempotency-Key` response header.
//! - Checkout (seed 001): `POST /checkout` requires a key; concurrent duplicates (a double-click)
//!   wait for the first and get its response. The payment provider is called with a stable key
//!   derived from the caller and the request's key, so even a retry after a crash creates one
//!   session.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use oncely::core::ledger::LedgerKey;
use oncely_http::{IdempotencyConfig, IdempotencyLayer, InFlight, MissingKey, PgStore, RequestTx};
use serde::Deserialize;
use serde_json::json;
use sqlx::PgPool;

/// A payment provider that deduplicates on its idempotency key, as Stripe does.
#[derive(Default)]
pub struct PaymentProvider {
    pub calls: AtomicU32,
    sessions: Mutex<HashMap<String, String>>,
}

impl PaymentProvider {
    pub async fn create_checkout_session(&self, idempotency_key: &str, user: &str, price: &str) -> String {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(30)).await; // the network
        let mut sessions = self.sessions.lock().unwrap();
        let n = sessions.len() + 1;
        sessions.entry(idempotency_key.to_owned()).or_insert_with(|| format!("cs_{n}_{user}_{price}")).clone()
    }
}

#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub provider: Arc<PaymentProvider>,
}

pub async fn setup(pool: &PgPool) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    oncely::migrate(pool).await?;
    for sql in [
        "CREATE TABLE IF NOT EXISTS api_usage (id bigserial PRIMARY KEY, caller text NOT NULL, units bigint NOT NULL)",
        "CREATE TABLE IF NOT EXISTS settlements (id bigserial PRIMARY KEY, caller text NOT NULL, amount bigint NOT NULL)",
        "CREATE TABLE IF NOT EXISTS projects (id text PRIMARY KEY, name text NOT NULL)",
        "CREATE TABLE IF NOT EXISTS api_keys (id text PRIMARY KEY, project_id text NOT NULL, revoked_at timestamptz)",
        "CREATE TABLE IF NOT EXISTS subscriptions (id bigserial PRIMARY KEY, user_id text NOT NULL, session_id text NOT NULL)",
    ] {
        sqlx::query(sql).execute(pool).await?;
    }
    Ok(())
}

fn caller(headers: &HeaderMap) -> String {
    headers
        .get("x-api-key")
        .or_else(|| headers.get("authorization"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("anonymous")
        .to_owned()
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "request failed");
    (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"error": "internal"}))).into_response()
}

#[derive(Deserialize)]
struct Usage {
    units: i64,
}

async fn record_usage(tx: Option<RequestTx>, State(s): State<AppState>, headers: HeaderMap, Json(u): Json<Usage>) -> Response {
    if u.units <= 0 {
        return (StatusCode::BAD_REQUEST, Json(json!({"error": "units must be positive"}))).into_response();
    }
    let who = caller(&headers);
    let sql = "INSERT INTO api_usage (caller, units) VALUES ($1, $2) RETURNING id";
    let id: Result<i64, _> = match &tx {
        Some(tx) => sqlx::query_scalar(sql).bind(&who).bind(u.units).fetch_one(&mut *tx.conn().await).await,
        None => sqlx::query_scalar(sql).bind(&who).bind(u.units).fetch_one(&s.pool).await,
    };
    match id {
        Ok(id) => (StatusCode::CREATED, Json(json!({"id": id, "units": u.units}))).into_response(),
        Err(e) => internal(e),
    }
}

#[derive(Deserialize)]
struct Bulk {
    items: Vec<Usage>,
}

async fn record_usage_bulk(tx: Option<RequestTx>, State(s): State<AppState>, headers: HeaderMap, Json(b): Json<Bulk>) -> Response {
    let who = caller(&headers);
    let units: Vec<i64> = b.items.iter().map(|u| u.units).collect();
    if units.is_empty() || units.iter().any(|&u| u <= 0) {
        return (StatusCode::BAD_REQUEST, Json(json!({"error": "items must be non-empty with positive units"}))).into_response();
    }
    let sql = "INSERT INTO api_usage (caller, units) SELECT $1, u FROM unnest($2::bigint[]) AS u";
    let done = match &tx {
        Some(tx) => sqlx::query(sql).bind(&who).bind(&units).execute(&mut *tx.conn().await).await,
        None => sqlx::query(sql).bind(&who).bind(&units).execute(&s.pool).await,
    };
    match done {
        Ok(r) => (StatusCode::CREATED, Json(json!({"recorded": r.rows_affected(), "units": units.iter().sum::<i64>()}))).into_response(),
        Err(e) => internal(e),
    }
}

async fn settle(tx: Option<RequestTx>, State(s): State<AppState>, headers: HeaderMap) -> Response {
    let who = caller(&headers);
    let sql = "INSERT INTO settlements (caller, amount)
               SELECT $1, coalesce(sum(units), 0) FROM api_usage WHERE caller = $1 RETURNING id, amount";
    let row: Result<(i64, i64), _> = match &tx {
        Some(tx) => sqlx::query_as(sql).bind(&who).fetch_one(&mut *tx.conn().await).await,
        None => sqlx::query_as(sql).bind(&who).fetch_one(&s.pool).await,
    };
    match row {
        Ok((id, amount)) => (StatusCode::OK, Json(json!({"settlement": id, "amount": amount}))).into_response(),
        Err(e) => internal(e),
    }
}

#[derive(Deserialize)]
struct NewProject {
    project_id: String,
    name: String,
}

async fn provision_project(State(s): State<AppState>, Json(p): Json<NewProject>) -> Response {
    let r = sqlx::query("INSERT INTO projects (id, name) VALUES ($1, $2) ON CONFLICT DO NOTHING").bind(&p.project_id).bind(&p.name).execute(&s.pool).await;
    match r {
        Ok(r) if r.rows_affected() == 1 => {
            (StatusCode::CREATED, [("location", format!("/projects/{}", p.project_id))], Json(json!({"id": p.project_id, "name": p.name}))).into_response()
        }
        Ok(_) => (StatusCode::CONFLICT, Json(json!({"error": "project exists"}))).into_response(),
        Err(e) => internal(e),
    }
}

async fn create_key(State(s): State<AppState>, Path(project): Path<String>) -> Response {
    let id = format!("key_{}", uuid::Uuid::new_v4().simple());
    match sqlx::query("INSERT INTO api_keys (id, project_id) VALUES ($1, $2)").bind(&id).bind(&project).execute(&s.pool).await {
        Ok(_) => (StatusCode::CREATED, Json(json!({"id": id, "project_id": project}))).into_response(),
        Err(e) => internal(e),
    }
}

async fn revoke_key(State(s): State<AppState>, Path(key): Path<String>) -> Response {
    let r = sqlx::query("UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1").bind(&key).execute(&s.pool).await;
    match r {
        Ok(r) if r.rows_affected() == 1 => (StatusCode::OK, Json(json!({"id": key, "revoked": true}))).into_response(),
        Ok(_) => (StatusCode::NOT_FOUND, Json(json!({"error": "no such key"}))).into_response(),
        Err(e) => internal(e),
    }
}

#[derive(Deserialize)]
struct Checkout {
    price: String,
}

async fn create_checkout_session(State(s): State<AppState>, headers: HeaderMap, Json(c): Json<Checkout>) -> Response {
    let user = caller(&headers);
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or_default();
    // Stable across retries: derived from the caller and the request's key, never from the time.
    let provider_key = LedgerKey::new("checkout", format!("{user}|{key}")).idempotency_key();
    let session = s.provider.create_checkout_session(&provider_key, &user, &c.price).await;
    let r = sqlx::query("INSERT INTO subscriptions (user_id, session_id) VALUES ($1, $2)").bind(&user).bind(&session).execute(&s.pool).await;
    match r {
        Ok(_) => (StatusCode::CREATED, Json(json!({"checkout_session": session}))).into_response(),
        Err(e) => internal(e),
    }
}

/// The router, with the per-route idempotency policies of the seeds.
pub fn router(state: AppState) -> Router {
    let pool = state.pool.clone();
    let billing = IdempotencyLayer::transactional(pool.clone()).with_config(IdempotencyConfig {
        conflict_status: StatusCode::CONFLICT,
        ttl: Duration::from_secs(24 * 3600),
        ..IdempotencyConfig::default()
    });
    let control = |ttl: Duration| {
        IdempotencyLayer::new(PgStore::new(pool.clone()))
            .with_config(IdempotencyConfig { missing_key: MissingKey::Generate, ttl, ..IdempotencyConfig::default() })
    };
    let checkout = IdempotencyLayer::new(PgStore::new(pool.clone())).with_config(IdempotencyConfig {
        missing_key: MissingKey::Require,
        in_flight: InFlight::Wait(Duration::from_secs(10)),
        ttl: Duration::from_secs(24 * 3600),
        ..IdempotencyConfig::default()
    });
    Router::new()
        .merge(
            Router::new()
                .route("/api/v1/usage", post(record_usage))
                .route("/api/v1/usage/bulk", post(record_usage_bulk))
                .route("/api/v1/settle", post(settle))
                .layer(billing),
        )
        .merge(Router::new().route("/projects", post(provision_project)).layer(control(Duration::from_secs(3600))))
        .merge(
            Router::new()
                .route("/projects/{id}/keys", post(create_key))
                .route("/keys/{id}/revoke", post(revoke_key))
                .layer(control(Duration::from_secs(300))),
        )
        .merge(Router::new().route("/checkout", post(create_checkout_session)).layer(checkout))
        .with_state(state)
}
