//! Maintenance queries: rescue expired leases, prune finished jobs, elect a leader.
//!
//! The worker crate runs these on one elected worker at a time. Each is also safe to run from
//! several places at once: rescue skips rows another rescuer holds, pruning deletes by id.

use std::time::Duration;

use sqlx::{PgExecutor, Row};

use crate::error::Result;
use crate::job::{JobId, JobState};
use crate::queries;
use crate::queue::secs;

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
pub async fn rescue_expired(conn: &mut sqlx::PgConnection, limit: i64) -> Result<Rescued> {
    let rows = sqlx::query(queries::JOB_RESCUE_EXPIRED).bind(limit).fetch_all(&mut *conn).await?;
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
        sqlx::query(queries::QUEUE_NOTIFY_MANY).bind(queues).execute(&mut *conn).await?;
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
    let res = sqlx::query(queries::JOB_DELETE_FINISHED)
        .bind(secs(retention))
        .bind(secs(dead_retention))
        .bind(limit)
        .execute(executor)
        .await?;
    Ok(res.rows_affected())
}

/// Try to take, or keep, the leadership `name` for `leader_id` during `ttl`. Returns true while
/// held. Leadership passes to another candidate only after the holder stops renewing it.
pub async fn elect_leader<'e>(executor: impl PgExecutor<'e>, name: &str, leader_id: &str, ttl: Duration) -> Result<bool> {
    let row = sqlx::query(queries::LEADER_ELECT)
        .bind(name)
        .bind(leader_id)
        .bind(secs(ttl))
        .fetch_optional(executor)
        .await?;
    Ok(row.is_some())
}

/// Give up the leadership `name` if `leader_id` holds it.
pub async fn resign_leader<'e>(executor: impl PgExecutor<'e>, name: &str, leader_id: &str) -> Result<()> {
    sqlx::query(queries::LEADER_RESIGN).bind(name).bind(leader_id).execute(executor).await?;
    Ok(())
}
