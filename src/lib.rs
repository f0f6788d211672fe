//! oncely: durable jobs and events on PostgreSQL with exactly-once effects.
//!
//! One dependency line gives the whole product under `oncely::`:
//!
//! ```toml
//! oncely = { version = "0.1", features = ["http", "webhooks"] }
//! ```
//!
//! - always: the queue ([`enqueue`], [`Worker`], ...), steps ([`step`], [`JobContext::step`]),
//!   [`idempotent`] and [`with_idempotency`] outside jobs, the [`outbox`], the [`inbox`], webhook
//!   endpoints ([`webhook`]), the [`migrate`] runner, and the two crates whole as [`core`]
//!   (`oncely-core`: the schema, the queue, fenced state writes — it knows nothing of the runtime)
//!   and [`worker`] (`oncely-worker`: the runtime that runs handlers);
//! - feature `http`: the `Idempotency-Key` tower layer, as `oncely::http` (`oncely-http`); feature
//!   `axum` adds its axum extractors;
//! - feature `webhooks`: webhook delivery and receiver-side signature checks, as `oncely::webhooks`
//!   (`oncely-webhooks`);
//! - feature `testkit`: a database per test, `eventually`, the crash harness, as `oncely::testkit`
//!   (`oncely-testkit`), for `[dev-dependencies]`;
//! - feature `signal`: the worker's signal handling (Tokio's `signal` feature), for binaries.
//! - feature `dashboard`: the web dashboard, Prometheus `/metrics`, `/healthz` and `/readyz` as an axum
//!   `Router`, as `oncely::dashboard` (`oncely-dashboard`).
//! - feature `otel`: tracing across the queue with OpenTelemetry — the enqueue stores the current
//!   span's trace context and the job's span continues it ([`trace`]; `tracing-opentelemetry`).
//!   Without it, a `traceparent` set by hand is still stored and shown to the handler, and no
//!   OpenTelemetry crate is compiled.
//!
//! See the repository README for what "exactly once" does and does not mean here.

pub use oncely_core as core;
pub use oncely_worker as worker;

/// The dashboard, `/metrics`, `/healthz` and `/readyz` as an axum Router (feature `dashboard`).
#[cfg(feature = "dashboard")]
pub use oncely_dashboard as dashboard;
#[cfg(feature = "http")]
pub use oncely_http as http;
#[cfg(feature = "testkit")]
pub use oncely_testkit as testkit;
#[cfg(feature = "webhooks")]
pub use oncely_webhooks as webhooks;

pub use oncely_core::step::{self, OnUnknown};
pub use oncely_core::{
    bulk, debounce, flow, function, inbox, ledger, outbox, pause, schedule, secrets, trace, unique, wait, webhook,
    InsertOpts,
};
pub use oncely_core::{
    cancel_job, enqueue, enqueue_many, get_job, idempotent, list_jobs, migrate, migrate_report, retry_job,
    with_idempotency, with_idempotency_transactional, Enqueued, Error, Idempotent, Job, JobArgs, JobFilter, JobId,
    JobState, MigrateReport, NewJob, Result, StepError,
};
pub use oncely_worker::{
    handler_fn, FunctionHandler, Handler, HandlerResult, JobContext, Outcome, ResultExt, Worker, WorkerConfig,
    WorkerHandle,
};

/// The README's code blocks, compiled as doctests so the quick start stays true.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
#[derive(Debug)]
pub struct ReadmeDoctests;

/// The events guide's code blocks, compiled as doctests.
#[doc = include_str!("../docs/webhooks.md")]
#[cfg(doctest)]
#[derive(Debug)]
pub struct WebhooksGuideDoctests;

#[doc = include_str!("../docs/functions.md")]
#[cfg(doctest)]
#[derive(Debug)]
pub struct FunctionsGuideDoctests;
