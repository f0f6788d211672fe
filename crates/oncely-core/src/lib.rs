//! oncely-core: the PostgreSQL side of oncely — the schema and its migrations, the job queue, and
//! the fenced state writes workers make.
//!
//! This crate knows nothing of the worker runtime or of HTTP: it is plain functions over
//! [`sqlx::PgExecutor`], so every write can run inside the caller's own transaction. The worker
//! (`oncely-worker`) and the HTTP layer depend on it, never the other way round.
//!
//! Delivery of a job to its handler is **at least once**: a worker that dies mid-job leaves a lease
//! that expires, and the job runs again. Exactly-once *effects* are built on top of that by the
//! effect [`ledger`]: [`step`]s inside jobs and [`with_idempotency`] outside them. Effects in this
//! PostgreSQL database, committed with their ledger record, happen exactly once; calls to other
//! systems get a stable idempotency key and are effectively once when the callee deduplicates.
//!
//! Events: the [`outbox`] publishes an event inside the caller's transaction and fans it out to
//! [`webhook`] endpoints as delivery jobs; the [`inbox`] accepts an inbound event once per
//! `(source, event id)` together with the job that processes it.

// First: its SQL macros are used by the modules below.
#[macro_use]
mod queries;
pub mod bulk;
mod effect;
pub mod error;
pub mod inbox;
pub mod job;
pub mod lease;
pub mod ledger;
pub mod maintenance;
mod migrate;
pub mod outbox;
pub mod pause;
pub mod queue;
pub mod retry;
pub mod step;
pub mod txn;
pub mod unique;
pub mod webhook;

pub use effect::{
    idempotent, with_idempotency, with_idempotency_tx, Idempotent, StepError, DEFAULT_IDEMPOTENCY_LEASE,
    DEFAULT_IDEMPOTENCY_TTL, IDEMPOTENCY_NAMESPACE,
};
pub use error::{Error, Result};
pub use job::{AttemptError, ErrorKind, InsertOpts, Job, JobArgs, JobId, JobState, NewJob};
pub use lease::Claim;
pub use migrate::{migrate, migrate_conn, migrate_report, MigrateReport, MigrationError, MIGRATIONS_TABLE, MIGRATOR};
#[doc(hidden)]
pub use queries::HOT_STATEMENTS;
pub use queries::JOBS_CHANNEL;
pub use queue::{
    cancel_job, count_jobs, enqueue, enqueue_many, get_job, list_jobs, retry_job, Enqueued, JobFilter, QueueCount,
};
