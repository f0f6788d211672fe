//! oncely-dashboard: the operations surface of oncely as one axum [`Router`] — a server-rendered
//! web dashboard, the Prometheus `/metrics` endpoint, and `/healthz` / `/readyz`.
//!
//! `oncely serve` mounts it; a service can mount it in its own server instead:
//!
//! ```no_run
//! # async fn f(pool: sqlx::PgPool) {
//! let ops = oncely_dashboard::Dashboard::new(pool)
//!     .token("a long random token")
//!     .read_only(true)
//!     .router();
//! // With the trailing slash: axum then serves the root page at `/oncely/`, where the
//! // dashboard's relative links resolve (nested at `/oncely`, it would be at `/oncely`, and
//! // `./jobs` there is `/jobs`). `/oncely` itself sends the browser on.
//! let app: axum::Router = axum::Router::new()
//!     .nest("/oncely/", ops)
//!     .route("/oncely", axum::routing::get(|| async { axum::response::Redirect::permanent("/oncely/") }));
//! # }
//! ```
//!
//! Templates are [minijinja] (Jinja syntax, HTML auto-escaping, compiled into the binary as
//! strings, no build step and no JavaScript). Every POST carries a CSRF token (a random value per
//! [`Dashboard`], compared in constant time); one without it is refused with 403. Webhook secrets
//! are never rendered; stored idempotency responses only on the record page, when asked for.
//!
//! Metrics go through the [`metrics`] facade, which costs nothing when no recorder is installed;
//! the `/metrics` endpoint renders a [`PrometheusHandle`] given to [`Dashboard::metrics`]
//! (`oncely serve` installs one). Queue-depth gauges are refreshed by one query per scrape.

mod auth;
mod pages;
mod sql;
pub mod telemetry;

use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;
pub use metrics_exporter_prometheus::PrometheusHandle;

/// Decides whether a request may see the dashboard (an embedder's own authentication).
pub type AuthHook = Arc<dyn Fn(&axum::http::request::Parts) -> bool + Send + Sync>;

/// How requests are authenticated.
#[derive(Clone, Default)]
pub(crate) enum Auth {
    /// Everyone who can reach the listener (bind it to a private address).
    #[default]
    Open,
    /// `Authorization: Bearer TOKEN`, or the cookie the login form sets.
    Token(String),
    /// The embedder's hook.
    Hook(AuthHook),
}

/// The dashboard's configuration; [`router`](Dashboard::router) builds the axum [`Router`].
#[derive(Clone)]
pub struct Dashboard {
    pool: sqlx::PgPool,
    auth: Auth,
    read_only: bool,
    metrics: Option<PrometheusHandle>,
    show_idempotency_output: bool,
}

impl std::fmt::Debug for Dashboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let auth = match &self.auth {
            Auth::Open => "open",
            Auth::Token(_) => "token",
            Auth::Hook(_) => "hook",
        };
        f.debug_struct("Dashboard")
            .field("auth", &auth)
            .field("read_only", &self.read_only)
            .field("metrics", &self.metrics.is_some())
            .finish_non_exhaustive()
    }
}

impl Dashboard {
    /// A dashboard over oncely's tables in `pool`'s database: open to anyone who reaches it,
    /// read-write, without `/metrics`.
    pub fn new(pool: sqlx::PgPool) -> Self {
        Self { pool, auth: Auth::Open, read_only: false, metrics: None, show_idempotency_output: false }
    }

    /// Require this token: as `Authorization: Bearer TOKEN` or through the login form (which sets
    /// an HttpOnly, SameSite=Strict cookie). `/healthz`, `/readyz` and `/metrics` stay open.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.auth = Auth::Token(token.into());
        self
    }

    /// Authenticate with the embedding service's own check instead; `false` answers 401.
    pub fn auth_hook(mut self, hook: AuthHook) -> Self {
        self.auth = Auth::Hook(hook);
        self
    }

    /// Hide every action and refuse every POST with 403.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Serve `/metrics` from this Prometheus handle (see [`telemetry::install_prometheus`]).
    pub fn metrics(mut self, handle: PrometheusHandle) -> Self {
        self.metrics = Some(handle);
        self
    }

    /// Show the stored outputs of idempotency records (HTTP responses) on their record page; off
    /// by default, as they may hold personal data.
    pub fn show_idempotency_output(mut self, show: bool) -> Self {
        self.show_idempotency_output = show;
        self
    }

    /// The router: the dashboard at `/`, `/metrics`, `/healthz`, `/readyz`.
    pub fn router(self) -> Router {
        let state = Arc::new(pages::State::new(self));
        let ui = Router::new()
            .route("/", get(pages::queues))
            .route("/jobs", get(pages::jobs))
            .route("/jobs/{id}", get(pages::job))
            .route("/dead", get(pages::dead))
            .route("/dead/action", post(pages::dead_action))
            .route("/jobs/{id}/action", post(pages::job_action))
            .route("/runs", get(pages::runs))
            .route("/ledger", get(pages::ledger))
            .route("/ledger/resolve", post(pages::ledger_resolve))
            .route("/webhooks", get(pages::webhooks))
            .route("/webhooks/action", post(pages::webhook_action))
            .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::require));
        Router::new()
            .merge(ui)
            .route("/login", get(auth::login_form).post(auth::login))
            .route("/healthz", get(pages::healthz))
            .route("/readyz", get(pages::readyz))
            .route("/metrics", get(pages::metrics))
            .with_state(state)
    }
}
