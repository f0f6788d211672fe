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
//!
//! Functions: a [`function`] runs when an event it subscribes to is published (one run per
//! subscription, created by the publishing statement) or on a cron [`schedule`] (one run per tick
//! across the fleet).

// First: the job's SQL macros (in `job::sql`) are used by the modules below.
#[macro_use]
pub mod job;
mod boundary;
pub mod bulk;
pub mod child;
pub mod debounce;
mod effect;
pub mod error;
pub mod flow;
pub mod function;
mod idempotency;
pub mod inbox;
pub mod lease;
pub mod ledger;
pub mod maintenance;
mod migrate;
pub mod outbox;
pub mod pause;
pub mod pooler;
pub mod queue;
pub mod retry;
pub mod schedule;
pub mod secrets;
pub mod step;
pub mod trace;
pub mod txn;
pub mod unique;
pub mod wait;
pub mod webhook;

pub use effect::StepError;
pub use error::{Error, Result};
pub use idempotency::{
    idempotent, with_idempotency, with_idempotency_transactional, Idempotent, DEFAULT_IDEMPOTENCY_LEASE,
    DEFAULT_IDEMPOTENCY_TTL, IDEMPOTENCY_NAMESPACE,
};
pub use job::sql::JOBS_CHANNEL;
pub use job::{AttemptError, ErrorKind, InsertOpts, Job, JobArgs, JobId, JobState, NewJob};
pub use lease::Claim;
pub use migrate::{migrate, migrate_conn, migrate_report, MigrateReport, MigrationError, MIGRATIONS_TABLE, MIGRATOR};
pub use queue::{
    cancel_job, count_jobs, delete_finished_jobs, dismiss_dead_jobs, enqueue, enqueue_many, get_job, list_jobs,
    retry_job, Enqueued, JobFilter, QueueCount,
};

/// The hot statements by name, for the plan tests (`tests/it/plans.rs`), which `EXPLAIN` each under
/// several sets of statistics and check that it uses the primary key or its intended index. Not a
/// stable API.
#[doc(hidden)]
pub const HOT_STATEMENTS: &[(&str, &str)] = &[
    ("JOB_CLAIM", job::sql::JOB_CLAIM),
    ("JOB_CLAIM_WINDOWED", job::sql::JOB_CLAIM_WINDOWED),
    ("FLOW_KEYS_LOCK", flow::FLOW_KEYS_LOCK),
    ("FLOW_CLAIM", flow::FLOW_CLAIM),
    ("JOB_SET_COMPLETED_IF_RUNNING_MANY", job::sql::JOB_SET_COMPLETED_IF_RUNNING_MANY),
    ("JOB_SET_COMPLETED_IF_RUNNING_MANY_RECORDING", job::sql::JOB_SET_COMPLETED_IF_RUNNING_MANY_RECORDING),
    ("JOB_EXTEND_LEASE_MANY", job::sql::JOB_EXTEND_LEASE_MANY),
    ("JOB_SET_FAILED_IF_RUNNING", job::sql::JOB_SET_FAILED_IF_RUNNING),
    ("JOB_SET_AVAILABLE_IF_RUNNING", job::sql::JOB_SET_AVAILABLE_IF_RUNNING),
    ("JOB_SET_CANCELLED_IF_RUNNING", job::sql::JOB_SET_CANCELLED_IF_RUNNING),
    ("JOB_RESCUE_EXPIRED", job::sql::JOB_RESCUE_EXPIRED),
    ("LEDGER_CLAIM", ledger::sql::LEDGER_CLAIM),
    ("LEDGER_GET", ledger::sql::LEDGER_GET),
    ("LEDGER_COMPLETE", ledger::sql::LEDGER_COMPLETE),
    ("LEDGER_RECORD_BATCH", ledger::sql::LEDGER_RECORD_BATCH),
    ("DELIVERY_RECORD_ATTEMPT", crate::webhook::DELIVERY_RECORD_ATTEMPT),
    ("EVENT_PUBLISH", outbox::EVENT_PUBLISH_MANY),
];
