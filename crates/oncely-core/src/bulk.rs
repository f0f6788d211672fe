//! Bulk operations by filter: cancel, retry or delete every job that matches, in batches.
//!
//! Each batch is one statement that locks at most `batch_size` rows, found by walking the primary
//! key upward from where the previous batch stopped, so no batch holds many locks or runs long,
//! and jobs enqueued during the operation with a higher id than the last batch's are included.
//! Pass a connection, not a transaction, to commit batch by batch (the point of batches); inside a
//! transaction the whole operation commits or rolls back as one, holding every lock until then.
//!
//! The rows are locked with `FOR UPDATE` (a batch waits for a worker's write in flight on a row of
//! it, briefly; it never skips one) and the state filter is checked again on the locked row, so a
//! job that finished meanwhile is not cancelled, and a job that started is not deleted.
//!
//! What it does not do: the walk reads `oncely.jobs` in id order, checking the filter on each row;
//! on a large table with a narrow filter that is a long (if lock-light) read.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};
use tracing::instrument;

use crate::error::{Error, Result};
use crate::job::sql;
use crate::job::JobState;

/// Rows per batch unless set: [`BulkFilter::batch_size`].
pub const DEFAULT_BATCH_SIZE: i64 = 1000;

/// Which jobs a bulk operation applies to. Every set field must match.
#[derive(Debug, Clone, Default)]
pub struct BulkFilter {
    /// Only jobs in these states. Empty: every state the operation applies to (see each operation).
    pub states: Vec<JobState>,
    /// Only jobs of this kind.
    pub kind: Option<String>,
    /// Only jobs on this queue.
    pub queue: Option<String>,
    /// Only jobs created at or after this time.
    pub created_after: Option<DateTime<Utc>>,
    /// Only jobs created before this time.
    pub created_before: Option<DateTime<Utc>>,
    /// Only jobs whose arguments contain this JSON (`args @> value`), e.g. `{"tenant": 7}`.
    pub args_contain: Option<serde_json::Value>,
    /// Rows locked and changed per statement. Defaults to [`DEFAULT_BATCH_SIZE`].
    pub batch_size: Option<i64>,
}

/// What a bulk operation did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BulkReport {
    /// Jobs changed (cancelled, put back, deleted).
    pub affected: u64,
    /// Jobs that matched the filter but were left alone: for a retry, those whose unique key a
    /// live job holds.
    pub skipped: u64,
    /// Statements run.
    pub batches: u64,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Cancel,
    Retry,
    Delete,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Cancel => "cancel",
            Op::Retry => "retry",
            Op::Delete => "delete",
        }
    }

    /// The states the operation may change, the default filter.
    fn allowed(self) -> &'static [JobState] {
        match self {
            Op::Cancel => &[JobState::Available, JobState::Running],
            Op::Retry => &[JobState::Dead, JobState::Cancelled],
            Op::Delete => &[JobState::Available, JobState::Completed, JobState::Dead, JobState::Cancelled],
        }
    }

    fn sql(self) -> &'static str {
        match self {
            Op::Cancel => sql::JOB_CANCEL_BATCH,
            Op::Retry => sql::JOB_RETRY_BATCH,
            Op::Delete => sql::JOB_DELETE_BATCH,
        }
    }
}

/// Cancel every available or running job that matches (by default both states; `states` may
/// narrow it). A running job's worker is fenced out, as with [`cancel_job`](crate::cancel_job).
#[instrument(skip(conn))]
pub async fn cancel_jobs(conn: &mut PgConnection, filter: &BulkFilter) -> Result<BulkReport> {
    run(conn, filter, Op::Cancel).await
}

/// Put every dead or cancelled job that matches back in its queue, with one more attempt allowed
/// (as [`retry_job`](crate::retry_job)), and wake the workers of those queues. A job whose unique
/// key a live job holds is skipped and counted in [`BulkReport::skipped`].
#[instrument(skip(conn))]
pub async fn retry_jobs(conn: &mut PgConnection, filter: &BulkFilter) -> Result<BulkReport> {
    run(conn, filter, Op::Retry).await
}

/// Delete every job that matches, in states available, completed, dead or cancelled (by default
/// all four). Running jobs are refused with [`Error::InvalidInput`]: cancel them first.
#[instrument(skip(conn))]
pub async fn delete_jobs(conn: &mut PgConnection, filter: &BulkFilter) -> Result<BulkReport> {
    run(conn, filter, Op::Delete).await
}

async fn run(conn: &mut PgConnection, filter: &BulkFilter, op: Op) -> Result<BulkReport> {
    let allowed = op.allowed();
    let states: Vec<&str> = if filter.states.is_empty() {
        allowed.iter().map(|s| s.as_str()).collect()
    } else {
        for s in &filter.states {
            if !allowed.contains(s) {
                return Err(Error::InvalidInput(format!(
                    "bulk {} applies to jobs in states {}; not to {s} jobs",
                    op.name(),
                    allowed.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                )));
            }
        }
        filter.states.iter().map(|s| s.as_str()).collect()
    };
    let batch = filter.batch_size.unwrap_or(DEFAULT_BATCH_SIZE);
    if !(1..=100_000).contains(&batch) {
        return Err(Error::InvalidInput(format!("a bulk batch size must be 1 to 100000, got {batch}")));
    }
    if let (Some(a), Some(b)) = (filter.created_after, filter.created_before) {
        if a >= b {
            return Err(Error::InvalidInput(format!("empty time range: created after {a} and before {b}")));
        }
    }
    let mut report = BulkReport::default();
    let mut after = 0i64;
    loop {
        let row = crate::pooler::query(op.sql())
            .bind(after)
            .bind(&states)
            .bind(&filter.kind)
            .bind(&filter.queue)
            .bind(filter.created_after)
            .bind(filter.created_before)
            .bind(&filter.args_contain)
            .bind(batch)
            .fetch_one(&mut *conn)
            .await?;
        report.batches += 1;
        let last: Option<i64> = row.try_get("last")?;
        let matched: i64 = row.try_get("matched")?;
        let changed: i64 = row.try_get("changed")?;
        report.affected += changed as u64;
        report.skipped += (matched - changed).max(0) as u64;
        if let Op::Retry = op {
            let queues: Vec<String> = row.try_get("queues")?;
            if !queues.is_empty() {
                crate::pooler::query(sql::QUEUE_NOTIFY_MANY).bind(&queues).execute(&mut *conn).await?;
            }
        }
        match last {
            Some(last) => after = last,
            None => break,
        }
        tracing::debug!(op = op.name(), after, affected = report.affected, "bulk batch done");
    }
    tracing::info!(op = op.name(), affected = report.affected, skipped = report.skipped, "bulk operation done");
    Ok(report)
}
