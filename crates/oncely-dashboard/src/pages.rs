//! The dashboard's pages and actions, and the health, readiness and metrics endpoints.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State as AxState};
use axum::http::{StatusCode, Uri};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::Form;
use oncely_core::ledger::{LedgerKey, Resolution};
use oncely_core::outbox::EventId;
use oncely_core::webhook::EndpointId;
use oncely_core::JobId;
use serde_json::{json, Value};

use crate::auth::refuse_post;
use crate::{sql, Dashboard};

/// Rows per page of the jobs list.
const PAGE: i64 = 50;

/// What every handler shares.
pub(crate) struct State {
    pub(crate) config: Dashboard,
    pub(crate) csrf: String,
    env: minijinja::Environment<'static>,
}

impl State {
    pub(crate) fn new(config: Dashboard) -> Self {
        let mut env = minijinja::Environment::new();
        for (name, src) in [
            ("layout.html", include_str!("../templates/layout.html")),
            ("queues.html", include_str!("../templates/queues.html")),
            ("jobs.html", include_str!("../templates/jobs.html")),
            ("job.html", include_str!("../templates/job.html")),
            ("ledger.html", include_str!("../templates/ledger.html")),
            ("webhooks.html", include_str!("../templates/webhooks.html")),
            ("runs.html", include_str!("../templates/runs.html")),
        ] {
            // The templates are part of this crate; a syntax error in one fails its tests.
            env.add_template(name, src).expect("dashboard template parses");
        }
        let bytes: [u8; 32] = rand::random();
        let csrf = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Self { config, csrf, env }
    }

    /// Render a page; `uri` gives the relative path back to the dashboard's root, so the
    /// dashboard works nested under any prefix.
    fn render(&self, name: &str, uri: &Uri, mut ctx: Value) -> Result<Response, Error> {
        let depth = uri.path().trim_start_matches('/').matches('/').count();
        let base = if depth == 0 { "./".to_owned() } else { "../".repeat(depth) };
        if let Value::Object(m) = &mut ctx {
            m.insert("base".into(), base.into());
            m.insert("csrf".into(), self.csrf.clone().into());
            m.insert("read_only".into(), self.config.read_only.into());
        }
        let html = self.env.get_template(name).and_then(|t| t.render(&ctx)).map_err(|e| Error(e.to_string()))?;
        Ok(Html(html).into_response())
    }

    fn pool(&self) -> &sqlx::PgPool {
        &self.config.pool
    }
}

/// A failure shown as a 500 page (the message escaped), and logged.
#[derive(Debug)]
pub(crate) struct Error(String);

impl<E: std::fmt::Display> From<E> for Error {
    fn from(e: E) -> Self {
        Error(e.to_string())
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        tracing::warn!(error = %self.0, "dashboard request failed");
        (StatusCode::INTERNAL_SERVER_ERROR, format!("oncely dashboard: {}", self.0)).into_response()
    }
}

type Page = Result<Response, Error>;
type St = AxState<Arc<State>>;

type JsonQuery<'q> = sqlx::query::QueryScalar<'q, sqlx::Postgres, Option<Value>, sqlx::postgres::PgArguments>;

/// Run a query that returns one JSON value (NULL: no row).
async fn json(pool: &sqlx::PgPool, q: JsonQuery<'_>) -> Result<Value, Error> {
    Ok(q.fetch_optional(pool).await?.flatten().unwrap_or(Value::Null))
}

/// GET /: queues.
pub(crate) async fn queues(AxState(s): St, uri: Uri) -> Page {
    let mut queues = json(s.pool(), sqlx::query_scalar(sql::QUEUES)).await?;
    let pauses = oncely_core::pause::list_pauses(s.pool()).await?;
    let reason = |p: &oncely_core::pause::Pause| p.reason.clone().unwrap_or_else(|| "paused".into());
    if let Value::Array(list) = &mut queues {
        for q in list.iter_mut() {
            let name = q.get("queue").and_then(Value::as_str).unwrap_or_default().to_owned();
            let paused =
                pauses.iter().find(|p| matches!(&p.target, oncely_core::pause::PauseTarget::Queue(n) if *n == name));
            q["paused"] = paused.map(reason).map_or(Value::Null, Value::from);
        }
    }
    let kinds: Vec<Value> = pauses
        .iter()
        .filter_map(|p| match &p.target {
            oncely_core::pause::PauseTarget::Kind(kind) => Some(json!({ "kind": kind, "reason": reason(p) })),
            _ => None,
        })
        .collect();
    s.render("queues.html", &uri, json!({ "page": "queues", "queues": queues, "paused_kinds": kinds }))
}

/// The latest runs of functions (event-triggered or cron), newest first.
pub(crate) async fn runs(AxState(s): St, uri: Uri) -> Page {
    let runs: Vec<Value> = oncely_core::function::list_runs(s.pool(), None, PAGE)
        .await?
        .into_iter()
        .map(|r| {
            let trigger = match &r.trigger {
                oncely_core::function::Trigger::Event(e) => format!("event {} ({})", e.id, e.topic),
                oncely_core::function::Trigger::Cron(t) => {
                    format!("cron tick {}", t.at.format("%Y-%m-%d %H:%M:%S UTC"))
                }
            };
            json!({
                "id": r.id.0, "function": r.function, "state": r.state, "attempt": r.attempt, "trigger": trigger,
                "created_at": r.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
            })
        })
        .collect();
    s.render("runs.html", &uri, json!({ "page": "runs", "runs": runs }))
}

/// The jobs list's filters.
#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct JobsQuery {
    state: Option<String>,
    kind: Option<String>,
    queue: Option<String>,
    q: Option<String>,
    after: Option<i64>,
}

fn nonempty(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

async fn job_page(s: &State, f: &JobsQuery, state: Option<&str>) -> Result<(Value, Option<i64>), Error> {
    if let Some(st) = state {
        st.parse::<oncely_core::JobState>().map_err(|e| Error(e.to_string()))?;
    }
    let rows = json(
        s.pool(),
        sqlx::query_scalar(sql::JOBS)
            .bind(state)
            .bind(nonempty(&f.kind))
            .bind(nonempty(&f.queue))
            .bind(nonempty(&f.q))
            .bind(f.after)
            .bind(PAGE + 1),
    )
    .await?;
    let mut rows = match rows {
        Value::Array(rows) => rows,
        _ => Vec::new(),
    };
    let next = if rows.len() as i64 > PAGE {
        rows.truncate(PAGE as usize);
        rows.last().and_then(|r| r["id"].as_i64())
    } else {
        None
    };
    Ok((Value::Array(rows), next))
}

/// GET /jobs: filtered, keyset-paginated (newest first; `after` is the last id shown).
pub(crate) async fn jobs(AxState(s): St, uri: Uri, Query(f): Query<JobsQuery>) -> Page {
    let (rows, next) = job_page(&s, &f, nonempty(&f.state)).await?;
    let filters = json!({ "state": nonempty(&f.state), "kind": nonempty(&f.kind), "queue": nonempty(&f.queue), "q": nonempty(&f.q) });
    s.render("jobs.html", &uri, json!({ "page": "jobs", "jobs": rows, "next": next, "f": filters, "dead": false }))
}

/// GET /dead: the dead letter.
pub(crate) async fn dead(AxState(s): St, uri: Uri, Query(f): Query<JobsQuery>) -> Page {
    let (rows, next) = job_page(&s, &f, Some("dead")).await?;
    let filters = json!({ "kind": nonempty(&f.kind), "queue": nonempty(&f.queue), "q": nonempty(&f.q) });
    s.render("jobs.html", &uri, json!({ "page": "dead", "jobs": rows, "next": next, "f": filters, "dead": true }))
}

/// GET /jobs/{id}: arguments, error history, step timeline.
pub(crate) async fn job(AxState(s): St, uri: Uri, Path(id): Path<i64>) -> Page {
    let job = json(s.pool(), sqlx::query_scalar(sql::JOB).bind(id)).await?;
    if job.is_null() {
        return Ok((StatusCode::NOT_FOUND, format!("job {id} not found")).into_response());
    }
    let steps = json(s.pool(), sqlx::query_scalar(sql::JOB_STEPS).bind(format!("job:{id}:"))).await?;
    s.render("job.html", &uri, json!({ "page": "jobs", "job": job, "steps": steps }))
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn bad(msg: impl Into<String>) -> Response {
    (StatusCode::BAD_REQUEST, msg.into()).into_response()
}

/// Retry, cancel or delete dead jobs, one by one or in bulk.
async fn dead_letter(s: &State, action: &str, ids: &[i64]) -> Result<Option<Response>, Error> {
    match action {
        "retry" => {
            for id in ids {
                oncely_core::retry_job(s.pool(), JobId(*id)).await?;
            }
        }
        "cancel" => {
            let ids: Vec<JobId> = ids.iter().copied().map(JobId).collect();
            oncely_core::dismiss_dead_jobs(s.pool(), &ids).await?;
        }
        "delete" => {
            let ids: Vec<JobId> = ids.iter().copied().map(JobId).collect();
            oncely_core::delete_finished_jobs(s.pool(), &ids).await?;
        }
        other => return Ok(Some(bad(format!("unknown action {other:?}")))),
    }
    tracing::info!(action, ?ids, "dead letter action from the dashboard");
    Ok(None)
}

/// POST /dead/action: `action` (retry, cancel, delete) on every checked `id`.
pub(crate) async fn dead_action(AxState(s): St, Form(fields): Form<Vec<(String, String)>>) -> Page {
    if let Some(refused) = refuse_post(&s, &fields) {
        return Ok(refused);
    }
    // A row's own Retry button submits `one=ID` (no script needed); the bulk buttons submit
    // `action` with every checked `id`.
    let (action, key) = match field(&fields, "one") {
        Some(_) => ("retry", "one"),
        None => (field(&fields, "action").unwrap_or(""), "id"),
    };
    let ids: Result<Vec<i64>, _> = fields.iter().filter(|(k, _)| k == key).map(|(_, v)| v.parse::<i64>()).collect();
    let Ok(ids) = ids else { return Ok(bad("job ids are integers")) };
    if let Some(r) = dead_letter(&s, action, &ids).await? {
        return Ok(r);
    }
    Ok(Redirect::to("../dead").into_response())
}

/// POST /jobs/{id}/action: `retry` or `cancel` one job.
pub(crate) async fn job_action(AxState(s): St, Path(id): Path<i64>, Form(fields): Form<Vec<(String, String)>>) -> Page {
    if let Some(refused) = refuse_post(&s, &fields) {
        return Ok(refused);
    }
    match field(&fields, "action") {
        Some("retry") => oncely_core::retry_job(s.pool(), JobId(id)).await?,
        Some("cancel") => oncely_core::cancel_job(s.pool(), JobId(id)).await?,
        other => return Ok(bad(format!("unknown action {other:?}"))),
    }
    Ok(Redirect::to(&format!("../{id}")).into_response())
}

/// GET /ledger: parked records, or one record (`namespace`, `key`; `output=1` shows a stored
/// idempotency response).
pub(crate) async fn ledger(AxState(s): St, uri: Uri, Query(q): Query<HashMap<String, String>>) -> Page {
    if let (Some(ns), Some(key)) = (q.get("namespace"), q.get("key")) {
        let asked = q.get("output").is_some_and(|v| v == "1");
        let show = ns != oncely_core::IDEMPOTENCY_NAMESPACE || (asked && s.config.show_idempotency_output);
        let record = json(s.pool(), sqlx::query_scalar(sql::RECORD).bind(ns).bind(key).bind(show)).await?;
        if record.is_null() {
            return Ok((StatusCode::NOT_FOUND, "effect record not found").into_response());
        }
        let idem = LedgerKey::new(ns.clone(), key.clone()).idempotency_key();
        return s.render(
            "ledger.html",
            &uri,
            json!({ "page": "ledger", "record": record, "idempotency_key": idem, "output_hidden": !show }),
        );
    }
    let parked = json(s.pool(), sqlx::query_scalar(sql::PARKED)).await?;
    s.render("ledger.html", &uri, json!({ "page": "ledger", "parked": parked }))
}

/// POST /ledger/resolve: what `oncely ledger resolve` does.
pub(crate) async fn ledger_resolve(AxState(s): St, Form(fields): Form<Vec<(String, String)>>) -> Page {
    if let Some(refused) = refuse_post(&s, &fields) {
        return Ok(refused);
    }
    let (Some(ns), Some(key)) = (field(&fields, "namespace"), field(&fields, "key")) else {
        return Ok(bad("namespace and key are required"));
    };
    let resolution = match field(&fields, "resolution") {
        Some("took_effect") => match serde_json::from_str(field(&fields, "output").unwrap_or("")) {
            Ok(v) => Resolution::TookEffect(v),
            Err(e) => return Ok(bad(format!("\"took effect\" needs the step's output as JSON: {e}"))),
        },
        Some("did_not_take_effect") => Resolution::DidNotTakeEffect,
        other => return Ok(bad(format!("unknown resolution {other:?}"))),
    };
    oncely_core::ledger::resolve(s.pool(), &LedgerKey::new(ns, key), &resolution).await?;
    tracing::info!(namespace = ns, key, "effect record resolved from the dashboard");
    Ok(Redirect::to("../ledger").into_response())
}

/// GET /webhooks: endpoints (never their secrets) and the latest deliveries.
pub(crate) async fn webhooks(AxState(s): St, uri: Uri) -> Page {
    let endpoints = json(s.pool(), sqlx::query_scalar(sql::ENDPOINTS)).await?;
    let deliveries = json(s.pool(), sqlx::query_scalar(sql::DELIVERIES)).await?;
    s.render("webhooks.html", &uri, json!({ "page": "webhooks", "endpoints": endpoints, "deliveries": deliveries }))
}

/// POST /webhooks/action: `enable` or `disable` an `endpoint`, `redeliver` an `event` to it.
pub(crate) async fn webhook_action(AxState(s): St, Form(fields): Form<Vec<(String, String)>>) -> Page {
    if let Some(refused) = refuse_post(&s, &fields) {
        return Ok(refused);
    }
    let Some(Ok(endpoint)) = field(&fields, "endpoint").map(str::parse::<i64>) else {
        return Ok(bad("endpoint id required"));
    };
    match field(&fields, "action") {
        Some("enable") => oncely_core::webhook::enable_endpoint(s.pool(), EndpointId(endpoint)).await?,
        Some("disable") => {
            oncely_core::webhook::disable_endpoint(s.pool(), EndpointId(endpoint), "disabled from the dashboard")
                .await?;
        }
        Some("redeliver") => {
            let Some(Ok(event)) = field(&fields, "event").map(str::parse::<i64>) else {
                return Ok(bad("event id required"));
            };
            oncely_core::webhook::redeliver(s.pool(), EndpointId(endpoint), EventId(event)).await?;
        }
        other => return Ok(bad(format!("unknown action {other:?}"))),
    }
    Ok(Redirect::to("../webhooks").into_response())
}

/// GET /healthz: the process answers.
pub(crate) async fn healthz() -> &'static str {
    "ok"
}

/// GET /readyz: the database answers and has every migration this build knows.
pub(crate) async fn readyz(AxState(s): St) -> Response {
    match crate::telemetry::migrated(s.pool()).await {
        Ok(true) => "ready".into_response(),
        Ok(false) => (StatusCode::SERVICE_UNAVAILABLE, "database not migrated: run `oncely migrate`").into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("database unavailable: {e}")).into_response(),
    }
}

/// GET /metrics: Prometheus text, queue gauges refreshed first.
pub(crate) async fn metrics(AxState(s): St) -> Response {
    let Some(handle) = &s.config.metrics else {
        return (StatusCode::NOT_FOUND, "metrics are not enabled").into_response();
    };
    if let Err(e) = crate::telemetry::record_queue_depth(s.pool()).await {
        tracing::warn!(error = %e, "queue depth query failed");
    }
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response()
}
