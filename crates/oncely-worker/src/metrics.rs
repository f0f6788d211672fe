//! Metrics through the [`metrics`] facade: nothing is recorded until the host installs a
//! recorder (`oncely serve` installs the Prometheus one). Names are listed in
//! `docs/operations.md`.

use std::time::Duration;

/// Attempts that completed their job, by kind (a completion later refused for a lost lease is
/// also counted in [`LEASE_LOST`]).
pub const JOBS_COMPLETED: &str = "oncely_jobs_completed_total";
/// Failed attempts, by kind (each is also retried or dead).
pub const JOBS_FAILED: &str = "oncely_jobs_failed_total";
/// Failed attempts that will run again, by kind.
pub const JOBS_RETRIED: &str = "oncely_jobs_retried_total";
/// Jobs that went to the dead letter, by kind (`kind="rescued"` when maintenance found their
/// lease expired on their last attempt).
pub const JOBS_DEAD: &str = "oncely_jobs_dead_total";
/// Jobs whose lease expired, put back in their queue by the maintenance leader.
pub const JOBS_RESCUED: &str = "oncely_jobs_rescued_total";
/// Writes refused or handlers told to stop because the job's lease was lost.
pub const LEASE_LOST: &str = "oncely_lease_lost_total";
/// Handler run time, seconds, by kind.
pub const HANDLER_DURATION: &str = "oncely_handler_duration_seconds";
/// From when a job was due (enqueued, or its retry time) to its claim, seconds, by queue.
pub const START_LATENCY: &str = "oncely_job_start_latency_seconds";
/// Jobs per claim statement that claimed any, by queue.
pub const CLAIM_BATCH: &str = "oncely_claim_batch_size";
/// Wall time of each claim statement as the worker saw it, seconds, by queue and `claim`:
/// `window` (within the claim window), `full` (from the head of the claim index) or `flow` (the
/// flow-control claim).
pub const CLAIM_DURATION: &str = "oncely_claim_duration_seconds";

/// Jobs that found every run slot of their queue taken when their claim handed them out, and so
/// waited on the worker claimed ahead (`WorkerConfig::prefetch`), by queue; the worker's own count
/// is `WorkerStats::claimed_ahead`.
pub const CLAIMED_AHEAD: &str = "oncely_jobs_claimed_ahead_total";
/// How many jobs each queue's fetcher may hold claimed ahead now, by queue: the adaptive
/// prefetch's allowance (`WorkerConfig::adaptive_prefetch`), or the fixed prefetch.
pub const PREFETCH_ALLOWANCE: &str = "oncely_prefetch_allowance";

/// Which claim statement a fetcher ran, for [`CLAIM_DURATION`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClaimKind {
    /// Within the claim window (`oncely_core::lease::ClaimWindow`).
    Window,
    /// From the head of the claim index (windowed claims off, or the window's periodic full claim).
    Full,
    /// The flow-control claim (keyed jobs, queues with a global limit).
    Flow,
}

impl ClaimKind {
    fn label(self) -> &'static str {
        match self {
            ClaimKind::Window => "window",
            ClaimKind::Full => "full",
            ClaimKind::Flow => "flow",
        }
    }
}

/// Count one claim statement of `kind` on `queue` that took `took`, in the worker's stats and
/// [`CLAIM_DURATION`].
pub(crate) fn claim_timed(stats: &crate::WorkerStats, queue: &str, kind: ClaimKind, took: Duration) {
    crate::WorkerStats::add(&stats.claims, 1);
    crate::WorkerStats::add(&stats.claim_micros, u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
    metrics::histogram!(CLAIM_DURATION, "queue" => queue.to_owned(), "claim" => kind.label())
        .record(took.as_secs_f64());
}

pub(crate) fn count(name: &'static str, kind: &str) {
    metrics::counter!(name, "kind" => kind.to_owned()).increment(1);
}

pub(crate) fn lease_lost(n: u64) {
    if n > 0 {
        metrics::counter!(LEASE_LOST).increment(n);
    }
}

pub(crate) fn handler_duration(kind: &str, d: Duration) {
    metrics::histogram!(HANDLER_DURATION, "kind" => kind.to_owned()).record(d.as_secs_f64());
}

pub(crate) fn claimed(queue: &str, jobs: &[oncely_core::Job]) {
    if jobs.is_empty() {
        return;
    }
    metrics::histogram!(CLAIM_BATCH, "queue" => queue.to_owned()).record(jobs.len() as f64);
    let latency = metrics::histogram!(START_LATENCY, "queue" => queue.to_owned());
    for job in jobs {
        if let Some(at) = job.attempted_at {
            latency.record((at - job.run_at).num_milliseconds().max(0) as f64 / 1000.0);
        }
    }
}

/// A job of `queue` waits claimed ahead for a run slot ([`CLAIMED_AHEAD`]).
pub(crate) fn claimed_ahead(queue: &str) {
    metrics::counter!(CLAIMED_AHEAD, "queue" => queue.to_owned()).increment(1);
}

/// `queue` may now hold `jobs` claimed ahead ([`PREFETCH_ALLOWANCE`]).
pub(crate) fn prefetch_allowance(queue: &str, jobs: usize) {
    metrics::gauge!(PREFETCH_ALLOWANCE, "queue" => queue.to_owned()).set(jobs as f64);
}
