//! Child runs: a run starts jobs ([`start_children`]) and waits for their results
//! ([`settle_children`]); the worker's `ctx.invoke` and `ctx.invoke_all` are built on these.
//!
//! # Identity: a child is never started twice
//!
//! A child's identity is `(parent run, step name, index)`, the primary key of
//! `oncely.child_runs`. The parent's invoke step inserts the children's jobs and these rows in the
//! transaction that records the step in the effect ledger: either all of it commits, or none. A
//! re-executed parent (after a crash anywhere) finds the step recorded and starts nothing.
//!
//! # Fan-in
//!
//! A trigger on `oncely.jobs`, gated on the `parent_id` column (plain jobs never call it), records a
//! child's final state (`completed`, `dead` or `cancelled`) in its `child_runs` row, once, in the
//! transaction that finishes the child, whatever finished it (the worker, a person, an event). When
//! the step's last child finished, or at the first failure of a fail-fast step, it wakes the
//! parent. The parent's [`settle_children`] takes the same advisory lock before it reads its
//! children and suspends itself: a child finishing at the same moment either is seen by the read,
//! or commits after the suspension and wakes the parent.
//!
//! # Output
//!
//! A child stores its result with [`set_output`] (the worker's `ctx.set_output`): the last value an
//! attempt stored before the child completed is the result. A child completed without one has the
//! output `null`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Row};

use crate::error::{Error, Result};
use crate::job::{JobId, NewJob};
use crate::lease::Claim;

/// One child of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildRecord {
    /// The parent's invoke step.
    pub step: String,
    /// Its index among the step's children (0 for `invoke`).
    pub index: i32,
    /// The child's job id.
    pub child: JobId,
    /// The child's job kind.
    pub kind: String,
    /// `pending` (not finished), `completed`, `dead` or `cancelled`.
    pub state: String,
    /// Its output ([`set_output`]), once completed.
    pub output: Option<serde_json::Value>,
    /// Its last error, when dead or cancelled.
    pub error: Option<String>,
    /// When it was started.
    pub created_at: DateTime<Utc>,
    /// When it finished.
    pub finished_at: Option<DateTime<Utc>>,
}

impl ChildRecord {
    /// True once it is dead or cancelled.
    pub fn failed(&self) -> bool {
        matches!(self.state.as_str(), "dead" | "cancelled")
    }
}

/// Where the children of one invoke step stand.
#[derive(Debug, Clone, PartialEq)]
pub enum ChildrenStatus {
    /// Every child finished (some may have failed, when not fail-fast): all of them, by index.
    Done(Vec<ChildRecord>),
    /// A fail-fast step: the first child that failed (earliest to finish).
    Failed(ChildRecord),
    /// Some are still running: the parent was suspended (until woken, or `recheck` at the latest).
    Pending {
        /// Children not finished yet.
        open: usize,
    },
}

fn children_lock(parent: JobId) -> String {
    format!("oncely.children/{}", parent.0)
}

/// Check that `jobs` can be children: none may have a unique key (a live job holding it would be
/// taken for the child; a child's identity is its parent, step and index).
pub fn check_children(step: &str, jobs: &[NewJob]) -> Result<()> {
    match jobs.iter().find(|j| j.unique_key.is_some()) {
        Some(j) => Err(Error::InvalidInput(format!(
            "step `{step}`: a child run cannot have a unique key (kind {}); its identity is (parent, step, index)",
            j.kind
        ))),
        None => Ok(()),
    }
}

/// Start `jobs` as the children of `parent`'s invoke step `step`, in `tx` (the transaction that
/// records the step). Returns their ids, by index. A child may not have a unique key (a live job
/// holding it would be taken for the child).
pub async fn start_children(
    tx: &mut PgConnection,
    parent: JobId,
    step: &str,
    jobs: &[NewJob],
    fail_fast: bool,
) -> Result<Vec<JobId>> {
    check_children(step, jobs)?;
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let enqueued = crate::queue::enqueue_many(&mut *tx, jobs).await?;
    let ids: Vec<i64> = enqueued.iter().map(|e| e.id.0).collect();
    let kinds: Vec<&str> = jobs.iter().map(|j| j.kind.as_str()).collect();
    crate::pooler::query("UPDATE oncely.jobs SET parent_id = $1 WHERE id = ANY($2)")
        .bind(parent)
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    crate::pooler::query(
        "INSERT INTO oncely.child_runs (parent_id, step, idx, child_id, kind, fail_fast) \
         SELECT $1, $2, (n - 1)::int, id, kind, $5 FROM unnest($3::bigint[], $4::text[]) WITH ORDINALITY AS c(id, kind, n)",
    )
    .bind(parent)
    .bind(step)
    .bind(&ids)
    .bind(&kinds)
    .bind(fail_fast)
    .execute(&mut *tx)
    .await?;
    tracing::debug!(parent = %parent, step, children = ids.len(), "child runs started");
    Ok(ids.into_iter().map(JobId).collect())
}

/// The children of `claim`'s run's invoke step `step`, settled: all finished, the first failure
/// (when `fail_fast`), or still pending — then the run is suspended in the same transaction (a
/// fenced snooze, not an attempt) until a finishing child wakes it, or `recheck` at the latest;
/// `before_commit` runs just before that commit (the worker marks the attempt as finishing).
pub async fn settle_children(
    pool: &PgPool,
    claim: Claim,
    step: &str,
    fail_fast: bool,
    recheck: Duration,
    before_commit: impl FnOnce(),
) -> Result<ChildrenStatus> {
    let mut tx = crate::txn::begin(pool).await?;
    crate::pooler::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(children_lock(claim.id))
        .execute(&mut *tx)
        .await?;
    let children = step_children(&mut tx, claim.id, step).await?;
    if children.is_empty() {
        tx.rollback().await?;
        return Err(Error::InvalidInput(format!("run {} has no children in step `{step}`", claim.id)));
    }
    let first_failed = children.iter().filter(|c| c.failed()).min_by_key(|c| (c.finished_at, c.index)).cloned();
    let open = children.iter().filter(|c| c.state == "pending").count();
    let status = match first_failed {
        Some(failed) if fail_fast => ChildrenStatus::Failed(failed),
        _ if open == 0 => ChildrenStatus::Done(children),
        _ => {
            crate::lease::snooze_job(&mut *tx, claim, recheck).await?;
            before_commit();
            ChildrenStatus::Pending { open }
        }
    };
    tx.commit().await?;
    Ok(status)
}

const CHILD_COLUMNS: &str = "step, idx, child_id, kind, state, output, error, created_at, finished_at";

fn child_from_row(r: &sqlx::postgres::PgRow) -> Result<ChildRecord> {
    Ok(ChildRecord {
        step: r.try_get("step")?,
        index: r.try_get("idx")?,
        child: JobId(r.try_get("child_id")?),
        kind: r.try_get("kind")?,
        state: r.try_get("state")?,
        output: r.try_get("output")?,
        error: r.try_get("error")?,
        created_at: r.try_get("created_at")?,
        finished_at: r.try_get("finished_at")?,
    })
}

async fn step_children(conn: &mut PgConnection, parent: JobId, step: &str) -> Result<Vec<ChildRecord>> {
    let rows = crate::pooler::query(&format!(
        "SELECT {CHILD_COLUMNS} FROM oncely.child_runs WHERE parent_id = $1 AND step = $2 ORDER BY idx"
    ))
    .bind(parent)
    .bind(step)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(child_from_row).collect()
}

/// A run's children, every step's, oldest first.
pub async fn run_children<'e>(executor: impl sqlx::PgExecutor<'e>, parent: JobId) -> Result<Vec<ChildRecord>> {
    let rows = crate::pooler::query(&format!(
        "SELECT {CHILD_COLUMNS} FROM oncely.child_runs WHERE parent_id = $1 ORDER BY created_at, step, idx"
    ))
    .bind(parent)
    .fetch_all(executor)
    .await?;
    rows.iter().map(child_from_row).collect()
}

/// Store `output` as the result of the child run `claim` (fenced: only while this attempt holds
/// it). Returns `false`, writing nothing, when the job is not a child run. A later attempt's
/// output replaces an earlier one's until the child completes; after that it is final.
pub async fn set_output(pool: &PgPool, claim: Claim, output: &serde_json::Value) -> Result<bool> {
    let row: Option<(bool,)> = crate::pooler::query_as(
        "WITH held AS (SELECT 1 FROM oncely.jobs WHERE id = $1 AND attempt = $2 AND state = 'running'), \
         w AS (UPDATE oncely.child_runs SET output = $3 WHERE child_id = $1 AND state = 'pending' \
               AND EXISTS (SELECT 1 FROM held) RETURNING 1) \
         SELECT EXISTS (SELECT 1 FROM w) FROM oncely.child_runs WHERE child_id = $1",
    )
    .bind(claim.id)
    .bind(claim.attempt)
    .bind(output)
    .fetch_optional(crate::pooler::db(pool))
    .await?;
    match row {
        None => Ok(false),
        Some((true,)) => Ok(true),
        Some((false,)) => Err(Error::LeaseLost { job_id: claim.id, attempt: claim.attempt }),
    }
}
