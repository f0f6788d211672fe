//! oncely: durable jobs and events on PostgreSQL with exactly-once effects.
//!
//! This facade re-exports the parts most services need:
//! - [`oncely_core`] (as [`core`]): the schema, the queue, fenced state writes — usable alone by
//!   services that only enqueue;
//! - [`oncely_worker`] (as [`worker`]): the runtime that runs handlers.
//!
//! See the repository README for what "exactly once" does and does not mean here.

pub use oncely_core as core;
pub use oncely_worker as worker;

pub use oncely_core::step::OnUnknown;
pub use oncely_core::{
    cancel_job, enqueue, enqueue_many, get_job, list_jobs, migrate, retry_job, with_idempotency, with_idempotency_tx,
    Enqueued, Error, Job, JobArgs, JobFilter, JobId, JobState, NewJob, Result, StepError,
};
pub use oncely_worker::{
    handler_fn, Handler, HandlerResult, JobContext, Outcome, ResultExt, Worker, WorkerConfig, WorkerHandle,
};

/// The README's code blocks, compiled as doctests so the quick start stays true.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// The events guide's code blocks, compiled as doctests.
#[doc = include_str!("../docs/webhooks.md")]
#[cfg(doctest)]
pub struct WebhooksGuideDoctests;
