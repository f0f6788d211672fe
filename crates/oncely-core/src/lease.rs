//! Claims and fenced state writes: what a worker does to the jobs it runs.
//!
//! A claim sets the job `running`, increments `attempt` and gives it a lease. Every later write
//! names the claim — `id`, `attempt`, `state = 'running'` — so a worker whose lease was lost (its
//! job rescued and claimed again, or cancelled) can change nothing: it gets
//! [`Error::LeaseLost`] instead of a silent success.

use std::collections::HashSet;
use std::time::Duration;

use sqlx::{PgExecutor, Row};
use tracing::instrument;

use crate::error::{Error, Result};
use crate::job::{rows_to_jobs, ErrorKind, Job, JobId, JobRow, JobState};
use crate::queue::secs;

/// A claim on a job: the job and the attempt (fencing token) this worker holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Claim {
    /// The job.
    pub id: JobId,
    /// The attempt number of this claim.
    pub attempt: i32,
}

impl From<&Job> for Claim {
    fn from(job: &Job) -> Self {
        Claim { id: job.id, attempt: job.attempt }
    }
}

/// Claim up to `limit` available jobs of `queue` for `worker_id`, each with a lease of `lease`.
///
/// Uses `FOR UPDATE SKIP LOCKED`, so concurrent claimers never block on or share a job. Claims
/// only jobs without a concurrency key, from a queue without a global limit: the worker claims the
/// others with [`crate::flow::claim_jobs`].
///
/// The claim's commit is made durable: if `executor`'s transaction has `synchronous_commit = off`,
/// the claim sets it to `on` for the rest of that transaction (a claim lost in a crash would hand
/// its attempt number, the fencing token, out twice; `docs/operations.md`, "Durability settings").
/// The windowed and flow-control claims do the same.
#[instrument(skip(executor), err)]
pub async fn claim_jobs<'e>(
    executor: impl PgExecutor<'e>,
    queue: &str,
    limit: i32,
    worker_id: &str,
    lease: Duration,
) -> Result<Vec<Job>> {
    let rows: Vec<JobRow> = crate::pooler::query_as(crate::job::sql::JOB_CLAIM)
        .bind(queue)
        .bind(limit)
        .bind(secs(lease))
        .bind(worker_id)
        .bind(false)
        .fetch_all(executor)
        .await?;
    in_claim_order(rows)
}

/// The jobs of a claim's rows, in claim order: the update returns its rows in primary-key order.
fn in_claim_order(rows: Vec<JobRow>) -> Result<Vec<Job>> {
    let mut jobs = rows_to_jobs(rows)?;
    jobs.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.run_at.cmp(&b.run_at)).then(a.id.0.cmp(&b.id.0)));
    Ok(jobs)
}

/// Where one claimer's claims of one queue start reading: a floor per priority, so that a claim
/// steps over none of the index entries of jobs claimed long ago. [`ClaimWindow::claim_jobs`]
/// claims what [`claim_jobs`] would, in the same order, in time bounded by the recent claim rate
/// instead of by the age of the oldest open snapshot.
///
/// **Why.** A claim sets a job `running`; the job's entry in the claim index stays until vacuum
/// removes it, and vacuum cannot while any snapshot older than the claim is open (a session idle in
/// a transaction, an hour-long report, a repeatable-read reader). Those entries sit at the head of
/// the index, so a claim that starts at the head reads all of them, and their heap tuples, every
/// time: with a snapshot held for 45 s at 800 jobs/s that is 36,000 entries, 23–28 ms per claim in
/// a measurement with 50,000 (docs/benchmarks.md). The window starts each priority's read at a
/// floor instead: the `run_at` of the last job this claimer took there, less [`CLAIM_WINDOW_SLACK`].
///
/// **What a window cannot see**, and how it is found anyway: a job with a `run_at` older than the
/// floor when it becomes claimable — an enqueue whose transaction commits more than the slack after
/// it began, a job enqueued with a `run_at` in the past, the jobs of a kind that was just
/// unpaused — and a job of a priority this claimer has not met. Every so often a claim reads the
/// whole index instead ([`claim_jobs`]), which finds them all: at least every
/// [`FULL_CLAIM_MIN_INTERVAL`], and otherwise when [`FULL_CLAIM_COST_FACTOR`] times the last full
/// claim's duration has passed, so that full claims take at most about 5% of the claimer's time
/// however slow the index has made them (never less often than [`FULL_CLAIM_MAX_INTERVAL`]).
/// Such jobs wait for the next full claim; all others are claimed as soon as they are due, in
/// priority then `run_at` order, as before. Retries, snoozes and rescued jobs get a `run_at` of
/// now or later, so the window sees them.
#[derive(Debug, Clone, Default)]
pub struct ClaimWindow {
    /// The floor of each priority met, highest priority first.
    floors: std::collections::BTreeMap<std::cmp::Reverse<i16>, chrono::DateTime<chrono::Utc>>,
    /// When the next claim reads the whole index (`None`: the next claim does).
    next_full: Option<std::time::Instant>,
    /// The shortest time between two full claims (`None`: [`FULL_CLAIM_MIN_INTERVAL`]).
    min_interval: Option<Duration>,
}

/// How far behind the last claimed job a window's floor stays: an enqueue that commits within this
/// long of its start is always in the window.
pub const CLAIM_WINDOW_SLACK: Duration = Duration::from_secs(2);
/// The shortest time between two full claims of one window.
pub const FULL_CLAIM_MIN_INTERVAL: Duration = Duration::from_millis(250);
/// The longest time between two full claims of one window, however slow they are.
pub const FULL_CLAIM_MAX_INTERVAL: Duration = Duration::from_secs(60);
/// The time between two full claims is at least this many times the last one's duration.
pub const FULL_CLAIM_COST_FACTOR: u32 = 20;
/// A window keeps floors for at most this many priorities (the highest); lower ones are claimed by
/// full claims only.
const MAX_WINDOW_PRIORITIES: usize = 32;

impl ClaimWindow {
    /// A window that has met no job yet: its first claim is a full one.
    pub fn new() -> Self {
        Self::default()
    }

    /// Full claims no more often than every `interval` (instead of [`FULL_CLAIM_MIN_INTERVAL`]);
    /// the cost rule still applies, and [`FULL_CLAIM_MAX_INTERVAL`] yields to a longer `interval`.
    pub fn full_claims_every(mut self, interval: Duration) -> Self {
        self.min_interval = Some(interval);
        self
    }

    /// Make the next claim a full one: after something put jobs behind the window at once (a kind
    /// unpaused, jobs enqueued with an old `run_at`), so that they need not wait for the next
    /// scheduled full claim.
    pub fn read_all_next(&mut self) {
        self.next_full = None;
    }

    /// Claim up to `limit` available jobs of `queue`, as [`claim_jobs`] does, reading only the
    /// window when it can (see [`ClaimWindow`]): a full claim when one is due
    /// ([`full_claim_due`](Self::full_claim_due)), else [`claim_in_window`](Self::claim_in_window).
    #[instrument(skip(self, executor), err)]
    pub async fn claim_jobs<'e>(
        &mut self,
        executor: impl PgExecutor<'e>,
        queue: &str,
        limit: i32,
        worker_id: &str,
        lease: Duration,
    ) -> Result<Vec<Job>> {
        if !self.full_claim_due() {
            return self.claim_in_window(executor, queue, limit, worker_id, lease).await;
        }
        let started = std::time::Instant::now();
        let jobs = claim_jobs(executor, queue, limit, worker_id, lease).await?;
        self.full_claim_done(&jobs, limit, started.elapsed());
        Ok(jobs)
    }

    /// Claim up to `limit` jobs of `queue` within the window only; nothing before this window has
    /// met a job. A caller that runs its full claims elsewhere (the worker runs them beside its
    /// windowed claims, on slots of their own) pairs this with [`full_claim_due`](Self::full_claim_due),
    /// [`full_claim_started`](Self::full_claim_started) and [`full_claim_done`](Self::full_claim_done).
    #[instrument(skip(self, executor), err)]
    pub async fn claim_in_window<'e>(
        &mut self,
        executor: impl PgExecutor<'e>,
        queue: &str,
        limit: i32,
        worker_id: &str,
        lease: Duration,
    ) -> Result<Vec<Job>> {
        if self.floors.is_empty() || limit <= 0 {
            return Ok(Vec::new());
        }
        let (priorities, floors): (Vec<i16>, Vec<_>) = self.floors.iter().map(|(p, f)| (p.0, *f)).unzip();
        let rows: Vec<JobRow> = crate::pooler::query_as(crate::job::sql::JOB_CLAIM_WINDOWED)
            .bind(queue)
            .bind(limit)
            .bind(secs(lease))
            .bind(worker_id)
            .bind(priorities)
            .bind(floors)
            .fetch_all(executor)
            .await?;
        let jobs = in_claim_order(rows)?;
        self.learn(&jobs, jobs.len() < usize::try_from(limit).unwrap_or(0));
        Ok(jobs)
    }

    /// Whether the next claim should be a full one ([`claim_jobs`]): the window has met no job yet,
    /// or the time for the next full claim has come.
    pub fn full_claim_due(&self) -> bool {
        self.floors.is_empty() || self.next_full.is_none_or(|at| std::time::Instant::now() >= at)
    }

    /// Whether this window has met any job (without one it can read nothing).
    pub fn has_floors(&self) -> bool {
        !self.floors.is_empty()
    }

    /// A full claim has started elsewhere: no other is due until it reports with
    /// [`full_claim_done`](Self::full_claim_done) (or [`FULL_CLAIM_MAX_INTERVAL`] has passed).
    pub fn full_claim_started(&mut self) {
        let min = self.min_interval.unwrap_or(FULL_CLAIM_MIN_INTERVAL);
        self.next_full = Some(std::time::Instant::now() + FULL_CLAIM_MAX_INTERVAL.max(min));
    }

    /// A full claim of up to `limit` jobs took `jobs` in `cost`: learn from it, and schedule the
    /// next one.
    pub fn full_claim_done(&mut self, jobs: &[Job], limit: i32, cost: Duration) {
        let min = self.min_interval.unwrap_or(FULL_CLAIM_MIN_INTERVAL);
        let wait = (cost * FULL_CLAIM_COST_FACTOR).clamp(min, FULL_CLAIM_MAX_INTERVAL.max(min));
        self.next_full = Some(std::time::Instant::now() + wait);
        self.learn(jobs, jobs.len() < usize::try_from(limit).unwrap_or(0));
    }

    /// Move the floors after a claim. `short`: the claim took fewer jobs than it asked for, so it
    /// took every due job it could see at the priorities it read.
    fn learn(&mut self, jobs: &[Job], short: bool) {
        let slack = chrono::Duration::from_std(CLAIM_WINDOW_SLACK).expect("a small constant");
        for job in jobs {
            let floor = job.run_at - slack;
            self.floors.entry(std::cmp::Reverse(job.priority)).and_modify(|f| *f = (*f).max(floor)).or_insert(floor);
        }
        // After a short claim nothing due was left behind at any priority it read (every known
        // one, or all of them): every floor can move up to the claim's own time, the database
        // clock as it wrote `attempted_at`.
        if short {
            if let Some(at) = jobs.iter().filter_map(|j| j.attempted_at).min() {
                for floor in self.floors.values_mut() {
                    *floor = (*floor).max(at - slack);
                }
            }
        }
        while self.floors.len() > MAX_WINDOW_PRIORITIES {
            self.floors.pop_last();
        }
    }

    /// The floor of `priority`, if this window has met it (for tests and diagnostics).
    pub fn floor(&self, priority: i16) -> Option<chrono::DateTime<chrono::Utc>> {
        self.floors.get(&std::cmp::Reverse(priority)).copied()
    }
}

fn split(claims: &[Claim]) -> (Vec<i64>, Vec<i32>) {
    claims.iter().map(|c| (c.id.0, c.attempt)).unzip()
}

/// The claims named by `RETURNING id, attempt` rows.
fn claims_of(rows: Vec<sqlx::postgres::PgRow>) -> Result<HashSet<Claim>> {
    rows.iter().map(|r| Ok(Claim { id: JobId(r.try_get("id")?), attempt: r.try_get("attempt")? })).collect()
}

/// Complete many claims in one statement. Returns the claims that were refused because their lease
/// was lost (each is a [`Error::LeaseLost`] for its caller to report).
pub async fn complete_jobs<'e>(executor: impl PgExecutor<'e>, claims: &[Claim]) -> Result<Vec<Claim>> {
    if claims.is_empty() {
        return Ok(Vec::new());
    }
    let (ids_in, attempts) = split(claims);
    let rows = crate::pooler::query(crate::job::sql::JOB_SET_COMPLETED_IF_RUNNING_MANY)
        .bind(&ids_in)
        .bind(&attempts)
        .fetch_all(executor)
        .await?;
    let done = claims_of(rows)?;
    Ok(claims.iter().filter(|c| !done.contains(c)).copied().collect())
}

/// [`complete_jobs`], writing the attempts' deferred step records in the same statement
/// ([`crate::ledger::DeferredRecord`]). The records are written even for a claim that was lost:
/// they are results of work that was done, and a key that already has a record keeps it.
pub async fn complete_jobs_recording<'e>(
    executor: impl PgExecutor<'e>,
    claims: &[Claim],
    records: &[crate::ledger::DeferredRecord],
) -> Result<Vec<Claim>> {
    if records.is_empty() {
        return complete_jobs(executor, claims).await;
    }
    let (ids_in, attempts) = split(claims);
    let c = crate::ledger::DeferredColumns::of(records)?;
    let query = crate::pooler::query(crate::job::sql::JOB_SET_COMPLETED_IF_RUNNING_MANY_RECORDING)
        .bind(&ids_in)
        .bind(&attempts);
    let rows = c.bind(query).fetch_all(executor).await?;
    let done = claims_of(rows)?;
    Ok(claims.iter().filter(|c| !done.contains(c)).copied().collect())
}

/// Complete one claim.
pub async fn complete_job<'e>(executor: impl PgExecutor<'e>, claim: Claim) -> Result<()> {
    match complete_jobs(executor, &[claim]).await?.as_slice() {
        [] => Ok(()),
        _ => Err(lost(claim)),
    }
}

/// Extend the leases of many claims by `lease` from now. Returns the claims that no longer hold
/// (rescued, cancelled or claimed by another worker): their handlers should stop.
pub async fn extend_leases<'e>(executor: impl PgExecutor<'e>, claims: &[Claim], lease: Duration) -> Result<Vec<Claim>> {
    if claims.is_empty() {
        return Ok(Vec::new());
    }
    let (ids_in, attempts) = split(claims);
    let rows = crate::pooler::query(crate::job::sql::JOB_EXTEND_LEASE_MANY)
        .bind(&ids_in)
        .bind(&attempts)
        .bind(secs(lease))
        .fetch_all(executor)
        .await?;
    let held = claims_of(rows)?;
    Ok(claims.iter().filter(|c| !held.contains(c)).copied().collect())
}

/// The most leases one heartbeat statement extends; see [`extend_leases_batched`].
pub const MAX_LEASE_BATCH: usize = 1000;

/// [`extend_leases`] in statements of at most [`MAX_LEASE_BATCH`] claims each, in ascending id
/// order: a worker with many running jobs holds each statement's row locks briefly, and a slow
/// moment does not make one statement ever larger. Each statement commits on its own; the first
/// error stops the rest (the next heartbeat tries again).
pub async fn extend_leases_batched<'e, E>(executor: E, claims: &[Claim], lease: Duration) -> Result<Vec<Claim>>
where
    E: PgExecutor<'e> + Copy,
{
    let mut claims = claims.to_vec();
    claims.sort_unstable_by_key(|c| c.id.0);
    let mut lost = Vec::new();
    for chunk in claims.chunks(MAX_LEASE_BATCH) {
        lost.extend(extend_leases(executor, chunk, lease).await?);
    }
    Ok(lost)
}

/// Record a failed attempt. With `retry_in: Some(d)` the job runs again after `d` (database clock)
/// unless it is out of attempts; with `None` it goes to the dead letter now. Returns the new state
/// ([`JobState::Available`] or [`JobState::Dead`]).
#[instrument(skip(executor, message), fields(job.id = %claim.id, attempt = claim.attempt), err)]
pub async fn fail_job<'e>(
    executor: impl PgExecutor<'e>,
    claim: Claim,
    kind: ErrorKind,
    message: &str,
    retry_in: Option<Duration>,
) -> Result<JobState> {
    let row = crate::pooler::query(crate::job::sql::JOB_SET_FAILED_IF_RUNNING)
        .bind(claim.id)
        .bind(claim.attempt)
        .bind(retry_in.is_some())
        .bind(secs(retry_in.unwrap_or_default()))
        .bind(error_kind_str(kind))
        .bind(message)
        .fetch_optional(executor)
        .await?
        .ok_or(lost(claim))?;
    row.try_get::<String, _>("state")?.parse()
}

/// Snooze: the job runs again after `delay`, and this claim does not count as an attempt.
pub async fn snooze_job<'e>(executor: impl PgExecutor<'e>, claim: Claim, delay: Duration) -> Result<()> {
    set_available(executor, claim, delay, None).await
}

/// Release a claim at shutdown: the job is available again now, the claim does not count as an
/// attempt, and a `shutdown` note goes to its error history.
pub async fn release_job<'e>(executor: impl PgExecutor<'e>, claim: Claim, why: &str) -> Result<()> {
    set_available(executor, claim, Duration::ZERO, Some((ErrorKind::Shutdown, why))).await
}

/// Give a claim back after its attempt was cut short by a lost database connection: available
/// again after `delay`, the claim does not count as an attempt, and an `interrupted` note goes to
/// its error history.
pub async fn interrupt_job<'e>(executor: impl PgExecutor<'e>, claim: Claim, delay: Duration, why: &str) -> Result<()> {
    set_available(executor, claim, delay, Some((ErrorKind::Interrupted, why))).await
}

async fn set_available<'e>(
    executor: impl PgExecutor<'e>,
    claim: Claim,
    delay: Duration,
    note: Option<(ErrorKind, &str)>,
) -> Result<()> {
    crate::pooler::query(crate::job::sql::JOB_SET_AVAILABLE_IF_RUNNING)
        .bind(claim.id)
        .bind(claim.attempt)
        .bind(secs(delay))
        .bind(note.map(|(k, _)| error_kind_str(k)))
        .bind(note.map(|(_, m)| m))
        .fetch_optional(executor)
        .await?
        .map(|_| ())
        .ok_or(lost(claim))
}

/// The handler cancelled its own job: it will not run again.
pub async fn cancel_running_job<'e>(executor: impl PgExecutor<'e>, claim: Claim, reason: &str) -> Result<()> {
    crate::pooler::query(crate::job::sql::JOB_SET_CANCELLED_IF_RUNNING)
        .bind(claim.id)
        .bind(claim.attempt)
        .bind(reason)
        .fetch_optional(executor)
        .await?
        .map(|_| ())
        .ok_or(lost(claim))
}

fn lost(claim: Claim) -> Error {
    Error::LeaseLost { job_id: claim.id, attempt: claim.attempt }
}

fn error_kind_str(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Error => "error",
        ErrorKind::Panic => "panic",
        ErrorKind::Timeout => "timeout",
        ErrorKind::LeaseExpired => "lease_expired",
        ErrorKind::UnknownKind => "unknown_kind",
        ErrorKind::InvalidArgs => "invalid_args",
        ErrorKind::Shutdown => "shutdown",
        ErrorKind::Interrupted => "interrupted",
    }
}
