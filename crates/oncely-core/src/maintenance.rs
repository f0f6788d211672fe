//! Maintenance queries: rescue expired leases, prune finished jobs, elect a leader.
//!
//! The worker crate runs these on one elected worker at a time. Each is also safe to run from
//! several places at once: rescue skips rows another rescuer holds, pruning deletes by id.

use std::time::Duration;

use sqlx::{PgExecutor, Row};

use crate::error::Result;
use crate::job::{JobId, JobState};
use crate::queue::secs;

/// Take or keep the leadership `$1` for `$2` during `$3` seconds; returns a row when held.
pub(crate) const LEADER_ELECT: &str = r#"
INSERT INTO oncely.leaders AS l (name, leader_id, elected_at, expires_at)
VALUES ($1, $2, now(), now() + make_interval(secs => $3))
ON CONFLICT (name) DO UPDATE
SET leader_id = EXCLUDED.leader_id,
    elected_at = CASE WHEN l.leader_id = EXCLUDED.leader_id THEN l.elected_at ELSE now() END,
    expires_at = EXCLUDED.expires_at
WHERE l.leader_id = EXCLUDED.leader_id OR l.expires_at < now()
RETURNING leader_id
"#;

/// Give up the leadership `$1` if `$2` holds it.
pub(crate) const LEADER_RESIGN: &str = "DELETE FROM oncely.leaders WHERE name = $1 AND leader_id = $2";

/// Write the audit record of a maintenance run.
pub(crate) const MAINTENANCE_RUN_INSERT: &str = r#"
INSERT INTO oncely.maintenance_runs (task, worker_id, started_at, deleted) VALUES ($1, $2, $3, $4)
"#;

/// What one rescue pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rescued {
    /// Jobs returned to their queue.
    pub requeued: Vec<JobId>,
    /// Jobs that were out of attempts and went to the dead letter.
    pub dead: Vec<JobId>,
}

/// Rescue up to `limit` running jobs whose lease has expired (their worker died, hung, or lost the
/// database for longer than the lease): they become available now, or dead when out of attempts.
///
/// This is what turns a crashed worker into a retry. It can also re-run a job whose worker was only
/// cut off from the database for longer than the lease; that worker's later writes are fenced out.
///
/// A rescue does not count as an attempt when the job's previous recorded end was not also a lease
/// expiry: a lone expiry is most often the database or the network going away, or a deploy killing
/// the worker, not the job's fault, and counting it would let one long outage push a queue of
/// healthy jobs toward the dead letter. A second expiry in a row counts, so a job that kills its
/// worker every time still reaches the dead letter, one attempt later than its limit says.
pub async fn rescue_expired(conn: &mut sqlx::PgConnection, limit: i64) -> Result<Rescued> {
    let rows = crate::pooler::query(crate::job::sql::JOB_RESCUE_EXPIRED).bind(limit).fetch_all(&mut *conn).await?;
    let mut out = Rescued::default();
    let mut queues = Vec::new();
    for r in &rows {
        let id = JobId(r.try_get("id")?);
        if r.try_get::<String, _>("state")?.parse::<JobState>()? == JobState::Available {
            out.requeued.push(id);
            queues.push(r.try_get::<String, _>("queue")?);
        } else {
            out.dead.push(id);
        }
    }
    if !queues.is_empty() {
        crate::pooler::query(crate::job::sql::QUEUE_NOTIFY_MANY).bind(queues).execute(&mut *conn).await?;
    }
    Ok(out)
}

/// Delete up to `limit` finished jobs: completed and cancelled ones older than `retention`, dead ones
/// older than `dead_retention`. Returns how many were deleted.
pub async fn prune_finished<'e>(
    executor: impl PgExecutor<'e>,
    retention: Duration,
    dead_retention: Duration,
    limit: i64,
) -> Result<u64> {
    let deleted: i64 = crate::pooler::query_scalar(crate::job::sql::JOB_DELETE_FINISHED)
        .bind(secs(retention))
        .bind(secs(dead_retention))
        .bind(limit)
        .fetch_one(executor)
        .await?;
    Ok(deleted as u64)
}

/// Try to take, or keep, the leadership `name` for `leader_id` during `ttl`. Returns true while
/// held. Leadership passes to another candidate only after the holder stops renewing it.
pub async fn elect_leader<'e>(
    executor: impl PgExecutor<'e>,
    name: &str,
    leader_id: &str,
    ttl: Duration,
) -> Result<bool> {
    let row =
        crate::pooler::query(LEADER_ELECT).bind(name).bind(leader_id).bind(secs(ttl)).fetch_optional(executor).await?;
    Ok(row.is_some())
}

/// Give up the leadership `name` if `leader_id` holds it.
pub async fn resign_leader<'e>(executor: impl PgExecutor<'e>, name: &str, leader_id: &str) -> Result<()> {
    crate::pooler::query(LEADER_RESIGN).bind(name).bind(leader_id).execute(executor).await?;
    Ok(())
}

/// The audit task name of the worker's pruning runs (finished jobs, events, inbox records).
pub const PRUNE_TASK: &str = "prune";
/// The audit task name of expired-ledger-record cleanups ([`crate::ledger::cleanup_expired`]).
pub const LEDGER_CLEANUP_TASK: &str = "ledger_cleanup";

/// How long ago (database clock) the latest run of `task` recorded in `oncely.maintenance_runs`
/// started; `None` if none is recorded. Periodic tasks schedule from this rather than from their
/// process's start, so a fleet that restarts more often than a task's interval still runs it.
pub async fn last_run_age<'e>(executor: impl PgExecutor<'e>, task: &str) -> Result<Option<Duration>> {
    let secs: Option<f64> = crate::pooler::query_scalar(
        // NULL when no run is recorded (not greatest(.., 0), which would turn that into "just now").
        "SELECT extract(epoch FROM now() - max(started_at))::float8 FROM oncely.maintenance_runs WHERE task = $1",
    )
    .bind(task)
    .fetch_one(executor)
    .await?;
    Ok(secs.map(|s| Duration::from_secs_f64(s.max(0.0))))
}

/// How long until `task` is next due, given its `interval`: zero when it is due now (never run,
/// or its latest run started at least `interval` ago).
pub async fn due_in<'e>(executor: impl PgExecutor<'e>, task: &str, interval: Duration) -> Result<Duration> {
    Ok(match last_run_age(executor, task).await? {
        Some(age) => interval.saturating_sub(age),
        None => Duration::ZERO,
    })
}

/// Record one run of `task` in `oncely.maintenance_runs`: when it started (database clock), by
/// whom, and how many rows it deleted.
pub async fn record_run<'e>(
    executor: impl PgExecutor<'e>,
    task: &str,
    worker_id: Option<&str>,
    started: chrono::DateTime<chrono::Utc>,
    deleted: u64,
) -> Result<()> {
    crate::pooler::query(MAINTENANCE_RUN_INSERT)
        .bind(task)
        .bind(worker_id)
        .bind(started)
        .bind(i64::try_from(deleted).unwrap_or(i64::MAX))
        .execute(executor)
        .await?;
    Ok(())
}

/// Delete up to `limit` recorded runs of `task` that started more than `older_than` ago; returns
/// how many. (The worker keeps a week of its per-minute prune runs; cleanup audits stay.)
pub async fn prune_runs<'e>(
    executor: impl PgExecutor<'e>,
    task: &str,
    older_than: Duration,
    limit: i64,
) -> Result<u64> {
    let res = crate::pooler::query(
        "DELETE FROM oncely.maintenance_runs WHERE id IN (SELECT id FROM oncely.maintenance_runs \
         WHERE task = $1 AND started_at < now() - make_interval(secs => $2) LIMIT $3)",
    )
    .bind(task)
    .bind(secs(older_than))
    .bind(limit)
    .execute(executor)
    .await?;
    Ok(res.rows_affected())
}

/// Run `task` if it is due (its last recorded run started `interval` ago or more), holding a
/// per-task lock meanwhile so that two runners (a new maintenance leader while the old one is
/// still at it, several replicas cleaning up) never run it at once. `work` returns how many rows it
/// deleted, recorded as the run. Returns how long
/// until the task is due again (also when it did not run: not due, or running elsewhere).
///
/// The lock is a transaction-level advisory lock on a connection of its own: it is released when
/// that transaction ends, also if this future is dropped.
pub async fn run_if_due<F, Fut>(
    pool: &sqlx::PgPool,
    task: &str,
    interval: Duration,
    worker_id: Option<&str>,
    work: F,
) -> Result<Duration>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<u64>>,
{
    let wait = due_in(crate::pooler::db(pool), task, interval).await?;
    if !wait.is_zero() {
        return Ok(wait);
    }
    let mut lock = crate::txn::begin(pool).await?;
    // now(): the lock transaction's start, which is when this run starts.
    let (locked, started): (bool, chrono::DateTime<chrono::Utc>) = crate::pooler::query_as(
        "SELECT pg_try_advisory_xact_lock(hashtextextended('oncely.maintenance/' || $1, 0)), now()",
    )
    .bind(task)
    .fetch_one(&mut *lock)
    .await?;
    if !locked {
        // Running elsewhere right now: look again in a while.
        return Ok(interval.min(Duration::from_secs(60)));
    }
    // Someone may have finished a run between the first look and the lock.
    let wait = due_in(crate::pooler::db(pool), task, interval).await?;
    if !wait.is_zero() {
        return Ok(wait);
    }
    let deleted = work().await?;
    record_run(crate::pooler::db(pool), task, worker_id, started, deleted).await?;
    lock.rollback().await?;
    Ok(interval)
}
