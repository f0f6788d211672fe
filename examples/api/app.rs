//! The example API: the seeds' endpoints behind the Idempotency-Key layer.
//!
//! Every request is authenticated first ([`authenticate`]: an API key from `x-api-key` or
//! `Authorization: Bearer`, looked up by SHA-256 in `api_credentials`), and the idempotency layers
//! scope keys by the caller's principal. A key reused with another request is
//! `409 idempotency_conflict` on every route ([`KEY_REUSED`]). [`start`] runs the server as `main`
//! does: the expired-key cleanup, and HTTP/1.1 with a header read timeout.
//!
//! - Billing (seed 003): `POST /api/v1/usage`, `POST /api/v1/usage/bulk`, `POST /api/v1/settle` —
//!   transactional mode (the usage rows and the stored response commit together), a key reused
//!   with another body is `409 idempotency_conflict`, 24 h TTL.
//! - Control plane (seed 004), with two lines of defence:
//!   1. The `Idempotency-Key` layer in front, as on every route: a retry that resends the header
//!      gets the stored response byte for byte, a key reused with another body is refused, and a
//!      request without a key gets a generated one, returned in the `Idempotency-Key` response
//!      header (1 h for `/projects`, 5 min for the key routes). It only helps clients that send
//!      the same key again.
//!   2. Behind it, each handler deduplicates on the seed's business key, whatever header came (none
//!      on a double-click, a fresh one per click, one per retrying proxy): the effect and its
//!      record in the effect ledger commit in one transaction (`oncely::with_idempotency_transactional`), so
//!      it happens once per key, and a repeat gets the recorded body with
//!      `Idempotency-Replayed: true`.
//!
//!   | route | body | business key, TTL | repeat |
//!   |---|---|---|---|
//!   | `POST /projects` | `{"project_id", "name"}` | `provision:{project_id}`, 1 h | same caller, same name: the recorded `201`; else `409 project_exists` |
//!   | `POST /projects/{id}/keys` | `{"request_id"}` (required: `400 request_id_required`) | `create_key:{request_id}`, 5 min | same caller, same project: the recorded `201` with the same key; else `409 request_id_conflict` |
//!   | `POST /keys/{id}/revoke` | none | `revoke:{key_id}`, 1 year ([`REVOKE_TTL`]) | the same `200` with the original `revoked_at` (also after the record expires) |
//!
//!   Refusals (`404` no such project or key, `409` project exists) are not recorded: the
//!   transaction rolls back and a later request runs again.
//! - Checkout (seed 001): `POST /checkout` requires a key; concurrent duplicates (a double-click)
//!   wait for the first and get its response. The payment provider is called with a stable key
//!   derived from the caller and the request's key, so even a retry after a crash creates one
//!   session, and `subscriptions.session_id` is unique, so that retry adds no second subscription.
//!   A user has at most one subscription (BUG-047): a checkout with another key, even at the same
//!   moment, gets `409 already_subscribed` with the existing session, and calls no provider.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use oncely::core::ledger::LedgerKey;
use oncely::core::step::BoxError;
use oncely::http::{
    IdempotencyConfig, IdempotencyLayer, InFlight, MissingKey, PgStore, RequestTx, IDEMPOTENCY_REPLAYED,
};
use oncely::StepError;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::{PgConnection, PgPool};

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
                                                             // Session ids are unique across processes, as a real provider's are.
        let mut sessions = self.sessions.lock().unwrap();
        let session = sessions
            .entry(idempotency_key.to_owned())
            .or_insert_with(|| format!("cs_{}", uuid::Uuid::new_v4().simple()));
        tracing::debug!(user, price, session = %session, "provider: checkout session");
        session.clone()
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
        // Which settlement billed a usage row: each row is settled once, whatever the settle keys.
        "ALTER TABLE api_usage ADD COLUMN IF NOT EXISTS settlement_id bigint",
        "CREATE TABLE IF NOT EXISTS projects (id text PRIMARY KEY, name text NOT NULL)",
        "CREATE TABLE IF NOT EXISTS api_keys (id text PRIMARY KEY, project_id text NOT NULL, revoked_at timestamptz)",
        "CREATE TABLE IF NOT EXISTS subscriptions (id bigserial PRIMARY KEY, user_id text NOT NULL, session_id text NOT NULL)",
        // One subscription per provider session (also for tables made before this index existed).
        "CREATE UNIQUE INDEX IF NOT EXISTS subscriptions_session_id_key ON subscriptions (session_id)",
        // Which checkout made it (the provider key): a retry of that checkout finds it again.
        "ALTER TABLE subscriptions ADD COLUMN IF NOT EXISTS checkout_key text",
        // Seed 001's BUG-047: one subscription per user, whatever the checkout keys.
        "CREATE UNIQUE INDEX IF NOT EXISTS subscriptions_user_id_key ON subscriptions (user_id)",
        // The callers' API keys, by SHA-256 (never the key itself), and whom each one names.
        "CREATE TABLE IF NOT EXISTS api_credentials (key_sha256 text PRIMARY KEY, principal text NOT NULL, revoked_at timestamptz)",
    ] {
        sqlx::query(sql).execute(pool).await?;
    }
    Ok(())
}

/// Who is calling, as stored in the tables: the principal [`authenticate`] found for the request's
/// API key, never the credential itself.
fn caller(principal: &oncely::http::Principal) -> String {
    principal.0.clone()
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "request failed");
    (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"error": "internal"}))).into_response()
}

#[derive(Deserialize)]
struct Usage {
    units: i64,
}

async fn record_usage(
    tx: Option<RequestTx>,
    State(s): State<AppState>,
    axum::Extension(principal): axum::Extension<oncely::http::Principal>,
    Json(u): Json<Usage>,
) -> Response {
    if u.units <= 0 {
        return (StatusCode::BAD_REQUEST, Json(json!({"error": "units must be positive"}))).into_response();
    }
    let who = caller(&principal);
    let sql = "INSERT INTO api_usage (caller, units) VALUES ($1, $2) RETURNING id";
    let id: Result<i64, _> = match &tx {
        Some(tx) => match tx.conn().await {
            Ok(mut conn) => sqlx::query_scalar(sql).bind(&who).bind(u.units).fetch_one(&mut *conn).await,
            Err(e) => return internal(e),
        },
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

async fn record_usage_bulk(
    tx: Option<RequestTx>,
    State(s): State<AppState>,
    axum::Extension(principal): axum::Extension<oncely::http::Principal>,
    Json(b): Json<Bulk>,
) -> Response {
    let who = caller(&principal);
    let units: Vec<i64> = b.items.iter().map(|u| u.units).collect();
    if units.is_empty() || units.iter().any(|&u| u <= 0) {
        return (StatusCode::BAD_REQUEST, Json(json!({"error": "items must be non-empty with positive units"})))
            .into_response();
    }
    let sql = "INSERT INTO api_usage (caller, units) SELECT $1, u FROM unnest($2::bigint[]) AS u";
    let done = match &tx {
        Some(tx) => match tx.conn().await {
            Ok(mut conn) => sqlx::query(sql).bind(&who).bind(&units).execute(&mut *conn).await,
            Err(e) => return internal(e),
        },
        None => sqlx::query(sql).bind(&who).bind(&units).execute(&s.pool).await,
    };
    match done {
        Ok(r) => {
            (StatusCode::CREATED, Json(json!({"recorded": r.rows_affected(), "units": units.iter().sum::<i64>()})))
                .into_response()
        }
        Err(e) => internal(e),
    }
}

async fn settle(
    tx: Option<RequestTx>,
    State(s): State<AppState>,
    axum::Extension(principal): axum::Extension<oncely::http::Principal>,
) -> Response {
    let who = caller(&principal);
    // Bills the caller's usage not billed yet, and marks it billed, in one statement. The rows are
    // locked first, so two settles with different keys at once cannot both count them: the second
    // waits, then finds them settled.
    let sql = "WITH pending AS (
                   SELECT id, units FROM api_usage WHERE caller = $1 AND settlement_id IS NULL ORDER BY id FOR UPDATE
               ), settled AS (
                   INSERT INTO settlements (caller, amount) SELECT $1, coalesce(sum(units), 0) FROM pending
                   RETURNING id, amount
               ), billed AS (
                   UPDATE api_usage a SET settlement_id = settled.id FROM settled, pending p WHERE a.id = p.id
               )
               SELECT id, amount FROM settled";
    let row: Result<(i64, i64), _> = match &tx {
        Some(tx) => match tx.conn().await {
            Ok(mut conn) => sqlx::query_as(sql).bind(&who).fetch_one(&mut *conn).await,
            Err(e) => return internal(e),
        },
        None => sqlx::query_as(sql).bind(&who).fetch_one(&s.pool).await,
    };
    match row {
        Ok((id, amount)) => (StatusCode::OK, Json(json!({"settlement": id, "amount": amount}))).into_response(),
        Err(e) => internal(e),
    }
}

/// How long `provision:{project_id}` is kept (seed 004: 1 hour).
pub const PROVISION_TTL: Duration = Duration::from_secs(3600);
/// How long `create_key:{request_id}` is kept (seed 004: 5 minutes).
pub const CREATE_KEY_TTL: Duration = Duration::from_secs(300);
/// How long `revoke:{key_id}` is kept. Seed 004 says "Immediate (revocation is permanent)": the
/// revocation itself is permanent and naturally idempotent (`revoked_at = coalesce(revoked_at,
/// now())`, so a repeat returns the original timestamp), so this record only spares the repeat a
/// write and marks it as a replay. `with_idempotency_transactional` takes a `Duration` and has no "keep
/// forever" (a huge one overflows PostgreSQL's interval), so it is a long one: a year. After it the
/// record expires, the ledger cleanup reclaims it, and a repeat runs the no-op UPDATE and answers
/// the same body again.
pub const REVOKE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({"error": message, "code": code}))).into_response()
}

/// An answer that is not an effect (a 404, a 409): the closure returns it as its error, so the
/// transaction rolls back, nothing is recorded under the business key, and a later request runs
/// again.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: &'static str,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl std::error::Error for Refusal {}

fn refuse(status: StatusCode, code: &'static str, message: &'static str) -> BoxError {
    Box::new(Refusal { status, code, message })
}

/// What a business-key record holds: the response body and the caller scope it was made for. The
/// business keys are global (the seed's formats name no caller), so a replay goes only to the scope
/// that made the record; anyone else is answered as if the record did not exist.
#[derive(Serialize, Deserialize)]
struct Recorded<T> {
    scope: String,
    body: T,
}

/// The caller scope, derived as the layer derives it: a hash of the [`oncely::http::Principal`] that
/// [`authenticate`] put in the extensions. Records never hold the credential itself.
fn scope(parts: &Parts) -> String {
    oncely::http::config::default_scope(parts)
}

/// Run `effect` once per business `key` for `ttl`, in one transaction with its ledger record
/// (`oncely::with_idempotency_transactional`, ledger namespace `idempotency`). Returns the effect's output,
/// or the recorded one, and whether this call ran it (`false`: replayed).
async fn once<T, F>(pool: &PgPool, key: &str, ttl: Duration, effect: F) -> Result<(T, bool), Response>
where
    T: Serialize + DeserializeOwned,
    F: for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, Result<T, BoxError>>,
{
    let ran = AtomicBool::new(false);
    let out = oncely::with_idempotency_transactional(pool, key, ttl, |tx| {
        ran.store(true, Ordering::SeqCst);
        effect(tx)
    })
    .await;
    match out {
        Ok(v) => Ok((v, ran.load(Ordering::SeqCst))),
        Err(StepError::Failed { source, .. }) => Err(match source.downcast::<Refusal>() {
            Ok(r) => error(r.status, r.code, r.message),
            Err(e) => internal(e),
        }),
        // Not expected here (a claim in a transaction waits for a concurrent one to commit), but a
        // plain `with_idempotency` on the same key could hold it.
        Err(StepError::Busy { retry_after, .. }) => {
            let mut resp = error(StatusCode::CONFLICT, "in_progress", "the same operation is in progress; retry");
            resp.headers_mut().insert("retry-after", (retry_after.as_secs() + 1).into());
            Err(resp)
        }
        Err(e) => Err(internal(e)),
    }
}

/// `status` with `body` as JSON; a recorded answer (`ran` false) is marked
/// `Idempotency-Replayed: true`, as the layer marks its replays.
fn answer(status: StatusCode, ran: bool, body: impl Serialize) -> Response {
    let mut resp = (status, Json(body)).into_response();
    if !ran {
        resp.headers_mut().insert(IDEMPOTENCY_REPLAYED, HeaderValue::from_static("true"));
    }
    resp
}

#[derive(Deserialize)]
struct NewProject {
    project_id: String,
    name: String,
}

#[derive(Serialize, Deserialize, PartialEq)]
struct Project {
    id: String,
    name: String,
}

/// `POST /projects {"project_id", "name"}`: one project per `provision:{project_id}`.
async fn provision_project(
    State(s): State<AppState>,
    parts: Parts,
    body: Result<Json<NewProject>, JsonRejection>,
) -> Response {
    let Ok(Json(p)) = body else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "the body must be JSON {\"project_id\": \"...\", \"name\": \"...\"}",
        );
    };
    if p.project_id.is_empty() || p.project_id.len() > 255 {
        return error(StatusCode::BAD_REQUEST, "invalid_project_id", "project_id must be 1 to 255 bytes");
    }
    let scope = scope(&parts);
    let wanted = Project { id: p.project_id, name: p.name };
    let key = format!("provision:{}", wanted.id);
    let record = Recorded { scope: scope.clone(), body: Project { id: wanted.id.clone(), name: wanted.name.clone() } };
    let out = once(&s.pool, &key, PROVISION_TTL, move |tx| {
        Box::pin(async move {
            let r = sqlx::query("INSERT INTO projects (id, name) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(&record.body.id)
                .bind(&record.body.name)
                .execute(&mut *tx)
                .await?;
            if r.rows_affected() == 0 {
                // Provisioned before this key's record (or after it expired): not ours to replay.
                return Err(refuse(StatusCode::CONFLICT, "project_exists", "project exists"));
            }
            Ok(record)
        })
    })
    .await;
    match out {
        // The same caller asking for the same project again: the same answer.
        Ok((rec, ran)) if rec.scope == scope && rec.body == wanted => {
            let location = HeaderValue::from_str(&format!("/projects/{}", rec.body.id));
            let mut resp = answer(StatusCode::CREATED, ran, rec.body);
            if let Ok(v) = location {
                resp.headers_mut().insert("location", v);
            }
            resp
        }
        // Someone else's project, or this id with another name: exactly what it is.
        Ok(_) => error(StatusCode::CONFLICT, "project_exists", "project exists"),
        Err(resp) => resp,
    }
}

#[derive(Deserialize)]
struct NewKey {
    request_id: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct ApiKey {
    id: String,
    project_id: String,
}

/// `POST /projects/{id}/keys {"request_id"}`: one key per `create_key:{request_id}`.
async fn create_key(
    State(s): State<AppState>,
    Path(project): Path<String>,
    parts: Parts,
    body: Result<Json<NewKey>, JsonRejection>,
) -> Response {
    let request_id = match body {
        Ok(Json(NewKey { request_id: Some(id) })) if !id.is_empty() && id.len() <= 255 => id,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "request_id_required",
                "the body must be JSON {\"request_id\": \"...\"} with a request id of 1 to 255 bytes, made once per key to create and sent again on every retry",
            )
        }
    };
    let scope = scope(&parts);
    let key = format!("create_key:{request_id}");
    let record = Recorded {
        scope: scope.clone(),
        body: ApiKey { id: format!("key_{}", uuid::Uuid::new_v4().simple()), project_id: project.clone() },
    };
    let out = once(&s.pool, &key, CREATE_KEY_TTL, move |tx| {
        Box::pin(async move {
            let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM projects WHERE id = $1)")
                .bind(&record.body.project_id)
                .fetch_one(&mut *tx)
                .await?;
            if !exists {
                return Err(refuse(StatusCode::NOT_FOUND, "no_such_project", "no such project"));
            }
            sqlx::query("INSERT INTO api_keys (id, project_id) VALUES ($1, $2)")
                .bind(&record.body.id)
                .bind(&record.body.project_id)
                .execute(&mut *tx)
                .await?;
            Ok(record)
        })
    })
    .await;
    match out {
        Ok((rec, ran)) if rec.scope == scope && rec.body.project_id == project => {
            answer(StatusCode::CREATED, ran, rec.body)
        }
        // Never hand a key to another caller, or to a request for another project.
        Ok(_) => error(
            StatusCode::CONFLICT,
            "request_id_conflict",
            "this request_id was already used for a different request",
        ),
        Err(resp) => resp,
    }
}

#[derive(Serialize, Deserialize)]
struct Revocation {
    id: String,
    revoked: bool,
    revoked_at: DateTime<Utc>,
}

/// `POST /keys/{id}/revoke`: naturally idempotent, recorded under `revoke:{key_id}`.
async fn revoke_key(State(s): State<AppState>, Path(key_id): Path<String>) -> Response {
    let key = format!("revoke:{key_id}");
    let out = once(&s.pool, &key, REVOKE_TTL, move |tx| {
        Box::pin(async move {
            // `coalesce` keeps the first revocation's time: a repeat that runs (after the record
            // expired) answers the same body.
            let at: Option<DateTime<Utc>> = sqlx::query_scalar(
                "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1 RETURNING revoked_at",
            )
            .bind(&key_id)
            .fetch_optional(&mut *tx)
            .await?;
            match at {
                Some(revoked_at) => Ok(Revocation { id: key_id, revoked: true, revoked_at }),
                None => Err(refuse(StatusCode::NOT_FOUND, "no_such_key", "no such key")),
            }
        })
    })
    .await;
    match out {
        Ok((body, ran)) => answer(StatusCode::OK, ran, body),
        Err(resp) => resp,
    }
}

#[derive(Deserialize)]
struct Checkout {
    price: String,
}

async fn create_checkout_session(
    State(s): State<AppState>,
    axum::Extension(principal): axum::Extension<oncely::http::Principal>,
    headers: HeaderMap,
    Json(c): Json<Checkout>,
) -> Response {
    let user = caller(&principal);
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or_default();
    // Stable across retries: derived from the caller and the request's key, never from the time.
    let provider_key = LedgerKey::new("checkout", format!("{user}|{key}")).idempotency_key();
    match checkout(&s, &user, &provider_key, &c.price).await {
        Ok(Ok(session)) => (StatusCode::CREATED, Json(json!({"checkout_session": session}))).into_response(),
        Ok(Err(existing)) => (
            StatusCode::CONFLICT,
            Json(json!({"error": "this user already has a subscription", "code": "already_subscribed", "checkout_session": existing})),
        )
            .into_response(),
        Err(e) => internal(e),
    }
}

/// Seed 001's BUG-047: two checkouts of one user with different keys (two tabs, a client that
/// lost its key) both passed the "no subscription yet" check. Here one user's checkouts take
/// turns (a transaction lock per user), the check and the insert happen under it, and a unique
/// index backs it up. A retry of the checkout that made the subscription (same provider key)
/// gets that subscription's session again, without calling the provider. `Err(session)`: the user
/// already has a subscription, made by another checkout.
async fn checkout(
    s: &AppState,
    user: &str,
    provider_key: &str,
    price: &str,
) -> Result<Result<String, String>, sqlx::Error> {
    let mut tx = oncely::core::txn::begin(&s.pool).await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('checkout/' || $1, 0))")
        .bind(user)
        .execute(&mut *tx)
        .await?;
    let existing: Option<(String, Option<String>)> =
        sqlx::query_as("SELECT session_id, checkout_key FROM subscriptions WHERE user_id = $1")
            .bind(user)
            .fetch_optional(&mut *tx)
            .await?;
    if let Some((session, made_by)) = existing {
        return Ok(if made_by.as_deref() == Some(provider_key) { Ok(session) } else { Err(session) });
    }
    let session = s.provider.create_checkout_session(provider_key, user, price).await;
    // A crash after the provider call and before this commit leaves no row; the retry calls the
    // provider again with the same key and gets the same session.
    sqlx::query("INSERT INTO subscriptions (user_id, session_id, checkout_key) VALUES ($1, $2, $3) ON CONFLICT (session_id) DO NOTHING")
        .bind(user)
        .bind(&session)
        .bind(provider_key)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Ok(session))
}

/// The status of a key reused with a different request, on every route: keys are one namespace per
/// caller across all the routes (the layers share the ledger), so a client that reuses a key on
/// another route gets the same answer as one that reuses it with another body. Seed 003 promised
/// `409 idempotency_conflict`; the problem carries that code on every route.
pub const KEY_REUSED: StatusCode = StatusCode::CONFLICT;

/// The settings every route starts from; each route group changes only its own policy.
fn base_config(ttl: Duration) -> IdempotencyConfig {
    IdempotencyConfig { conflict_status: KEY_REUSED, ttl, ..IdempotencyConfig::default() }
}

/// The router, with the per-route idempotency policies of the seeds, behind the authentication
/// layer ([`authenticate`]) and the request-id layer ([`request_ids`]).
pub fn router(state: AppState) -> Router {
    let pool = state.pool.clone();
    let billing =
        IdempotencyLayer::transactional(pool.clone()).with_config(base_config(Duration::from_secs(24 * 3600)));
    let control = |ttl: Duration| {
        IdempotencyLayer::new(PgStore::new(pool.clone()))
            .with_config(IdempotencyConfig { missing_key: MissingKey::Generate, ..base_config(ttl) })
    };
    let checkout = IdempotencyLayer::new(PgStore::new(pool.clone())).with_config(IdempotencyConfig {
        missing_key: MissingKey::Require,
        in_flight: InFlight::Wait(Duration::from_secs(10)),
        ..base_config(Duration::from_secs(24 * 3600))
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
        // Outside the idempotency layers: a 401 is never stored, and the scope is the principal.
        .layer(axum::middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(axum::middleware::from_fn(request_ids))
        .with_state(state)
}

/// Register `key` as an API key of `principal` (stored as its SHA-256). The operator's tool, and
/// the tests' and demo's set-up.
pub async fn add_api_key(pool: &PgPool, principal: &str, key: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO api_credentials (key_sha256, principal) VALUES ($1, $2)
         ON CONFLICT (key_sha256) DO UPDATE SET principal = excluded.principal, revoked_at = NULL",
    )
    .bind(key_digest(key.as_bytes()))
    .bind(principal)
    .execute(pool)
    .await?;
    Ok(())
}

fn key_digest(key: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(key).iter().map(|b| format!("{b:02x}")).collect()
}

/// The API key of a request: `x-api-key: K`, or `Authorization: Bearer K` (the scheme in any case,
/// any spaces around it).
fn credential(headers: &HeaderMap) -> Option<Vec<u8>> {
    if let Some(v) = headers.get("x-api-key") {
        return Some(v.as_bytes().to_vec());
    }
    let v = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, key) = v.split_once([' ', '\t'])?;
    let key = key.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !key.is_empty()).then(|| key.as_bytes().to_vec())
}

/// The authentication layer: looks the request's API key up in `api_credentials` and puts the
/// caller's [`Principal`] in the request extensions, where the handlers and the idempotency
/// layers' scope find it. A missing, unknown or revoked key is `401`, before any idempotency
/// layer (so never stored).
pub async fn authenticate(
    State(s): State<AppState>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let unauthorized = || {
        let mut resp = error(StatusCode::UNAUTHORIZED, "unauthenticated", "a valid API key is required");
        resp.headers_mut().insert(axum::http::header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        resp
    };
    let Some(key) = credential(req.headers()) else { return unauthorized() };
    let found: Result<Option<String>, _> =
        sqlx::query_scalar("SELECT principal FROM api_credentials WHERE key_sha256 = $1 AND revoked_at IS NULL")
            .bind(key_digest(&key))
            .fetch_optional(&s.pool)
            .await;
    match found {
        Ok(Some(principal)) => {
            req.extensions_mut().insert(oncely::http::Principal(principal));
            next.run(req).await
        }
        Ok(None) => unauthorized(),
        Err(e) => internal(e),
    }
}

/// Every response carries `x-request-id`: the client's (when it is short and plain,
/// [`oncely::http::request_id`]) or a new one, also given to the handlers in the request. The
/// idempotency layers inside keep the same id.
pub async fn request_ids(mut req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let id = oncely::http::request_id(req.headers());
    let value = HeaderValue::from_str(&id).expect("request ids are visible ASCII");
    req.headers_mut().insert(oncely::http::REQUEST_ID, value.clone());
    let mut resp = next.run(req).await;
    resp.headers_mut().entry(oncely::http::REQUEST_ID).or_insert(value);
    resp
}

/// Defaults to 10 s: how long a client may take to send a request's headers before the connection
/// is closed (slow clients must not hold connections open forever).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How the server runs.
#[derive(Debug, Clone, clap::Parser)]
pub struct Args {
    /// The address to listen on.
    #[arg(long, default_value = "127.0.0.1:3000")]
    pub listen: std::net::SocketAddr,
    /// Serve on a free loopback port, double-submit a few requests, print what happened, exit.
    #[arg(long)]
    pub demo: bool,
    /// Seconds a client may take to send a request's headers.
    #[arg(long, default_value_t = HEADER_READ_TIMEOUT.as_secs_f64())]
    pub header_read_timeout: f64,
    /// Register an API key at start-up (repeatable): `--api-key account-1=sk_test_123`.
    #[arg(long = "api-key", value_name = "PRINCIPAL=KEY")]
    pub api_keys: Vec<String>,
    /// Seconds between deletions of expired idempotency keys.
    #[arg(long, default_value_t = oncely::http::store::DEFAULT_CLEANUP_INTERVAL.as_secs_f64())]
    pub cleanup_interval: f64,
}

/// A running server: its address, and its tasks (they run on when it drops).
#[derive(Debug)]
pub struct Server {
    pub addr: std::net::SocketAddr,
    serve: tokio::task::JoinHandle<()>,
    cleanup: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Run until the process ends.
    pub async fn wait(self) {
        let _ = self.serve.await;
    }

    /// Stop serving and cleaning up.
    pub fn stop(self) {
        self.serve.abort();
        self.cleanup.abort();
    }
}

/// Start the API on `args.listen`: the expired-key cleanup (no oncely worker runs beside this
/// service, so the layer's store deletes expired keys itself, in batches, audited) and an HTTP/1
/// server that closes connections whose headers take longer than `args.header_read_timeout`.
pub async fn start(state: AppState, args: &Args) -> std::io::Result<Server> {
    let cleanup = PgStore::new(state.pool.clone()).spawn_cleanup(Duration::from_secs_f64(args.cleanup_interval));
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    let timeout = Duration::from_secs_f64(args.header_read_timeout);
    let serve = tokio::spawn(serve(listener, router(state), timeout));
    Ok(Server { addr, serve, cleanup })
}

/// Serve `router` on `listener` over HTTP/1.1 with a header read timeout (`axum::serve` has none).
async fn serve(listener: tokio::net::TcpListener, router: Router, header_read_timeout: Duration) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    loop {
        let (stream, _peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: wait a little rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection closed");
            }
        });
    }
}
