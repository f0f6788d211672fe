//! Pausing a queue or a job kind, fleet-wide and persisted.
//!
//! A pause is a row in `oncely.pauses`. The claim statement (`JOB_CLAIM`) reads that table on every
//! claim, so a pause holds across every worker process and machine from the moment it commits, and
//! survives restarts. A paused queue (or kind) **finishes its running jobs** — nothing touches
//! them; they complete, fail or are rescued as usual — and **claims no new ones**. Enqueueing into
//! a paused queue still works: the jobs wait.
//!
//! [`resume`] deletes the row and sends a NOTIFY in the same statement (delivered when it
//! commits), so listening workers claim again at once instead of after their poll interval:
//! the queue's own name for a queue, `*` (wake every queue) for a kind.
//!
//! What it costs: every claim reads the (tiny) pauses table twice through init plans, whether or
//! not anything is paused. A paused *kind* is a filter on the claim's index scan, so a queue whose
//! head is a large backlog of a paused kind scans past that backlog on every claim; pause the queue
//! instead, or give that kind its own queue, when the backlog is large.

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, Row};
use tracing::instrument;

use crate::error::{Error, Result};

/// What a pause applies to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PauseTarget {
    /// Every job of a queue.
    Queue(String),
    /// Every job of a kind, on whichever queue.
    Kind(String),
}

impl PauseTarget {
    /// A queue.
    pub fn queue(name: impl Into<String>) -> Self {
        PauseTarget::Queue(name.into())
    }

    /// A job kind.
    pub fn kind(name: impl Into<String>) -> Self {
        PauseTarget::Kind(name.into())
    }

    /// `queue` or `kind`: the `scope` column.
    pub fn scope(&self) -> &'static str {
        match self {
            PauseTarget::Queue(_) => "queue",
            PauseTarget::Kind(_) => "kind",
        }
    }

    /// The queue's or the kind's name.
    pub fn name(&self) -> &str {
        match self {
            PauseTarget::Queue(n) | PauseTarget::Kind(n) => n,
        }
    }

    fn validate(&self) -> Result<()> {
        let n = self.name();
        // The limits of the jobs table's `queue` and `kind` columns.
        let max = match self {
            PauseTarget::Queue(_) => 128,
            PauseTarget::Kind(_) => 255,
        };
        if n.is_empty() || n.len() > max {
            return Err(Error::InvalidInput(format!(
                "a {} name to pause must be 1 to {max} bytes long, got {}",
                self.scope(),
                n.len()
            )));
        }
        Ok(())
    }
}

impl std::fmt::Display for PauseTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.scope(), self.name())
    }
}

/// A pause in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pause {
    /// What is paused.
    pub target: PauseTarget,
    /// Since when.
    pub paused_at: DateTime<Utc>,
    /// Why, as the operator said.
    pub reason: Option<String>,
}

/// Insert a pause; returns a row only when it is new.
const PAUSE_INSERT: &str = r#"
INSERT INTO oncely.pauses (scope, name, reason) VALUES ($1, $2, $3)
ON CONFLICT (scope, name) DO NOTHING
RETURNING paused_at
"#;

/// Delete a pause and wake the workers: the queue's fetchers for a queue, every fetcher (`*`) for
/// a kind. The notification is sent when the transaction commits.
const PAUSE_DELETE: &str = concat!(
    r#"
WITH resumed AS (
    DELETE FROM oncely.pauses WHERE scope = $1 AND name = $2 RETURNING scope, name
)
SELECT pg_notify("#,
    jobs_channel!(),
    r#", CASE WHEN scope = 'queue' THEN name ELSE '*' END) IS NULL AS notified FROM resumed
"#
);

const PAUSE_LIST: &str = "SELECT scope, name, paused_at, reason FROM oncely.pauses ORDER BY scope DESC, name";

/// Pause a queue or a kind across the fleet. Returns `false` when it was already paused (the
/// first pause's time and reason are kept).
///
/// Takes effect for every claim that starts after the caller's transaction commits; running jobs
/// finish.
///
/// # Example
///
/// ```no_run
/// # async fn example(pool: sqlx::PgPool) -> oncely_core::Result<()> {
/// use oncely_core::pause::{pause, resume, PauseTarget};
/// pause(&pool, &PauseTarget::queue("reports"), Some("provider outage")).await?;
/// // ... later: the workers claim again at once.
/// resume(&pool, &PauseTarget::queue("reports")).await?;
/// # Ok(()) }
/// ```
#[instrument(skip(executor), fields(target = %target), err)]
pub async fn pause<'e>(executor: impl PgExecutor<'e>, target: &PauseTarget, reason: Option<&str>) -> Result<bool> {
    target.validate()?;
    if reason.is_some_and(|r| r.len() > 1000) {
        return Err(Error::InvalidInput("a pause reason must be at most 1000 bytes long".into()));
    }
    let row = crate::pooler::query(PAUSE_INSERT)
        .bind(target.scope())
        .bind(target.name())
        .bind(reason)
        .fetch_optional(executor)
        .await?;
    Ok(row.is_some())
}

/// Resume a paused queue or kind, and wake the workers. Returns `false` when it was not paused.
#[instrument(skip(executor), fields(target = %target), err)]
pub async fn resume<'e>(executor: impl PgExecutor<'e>, target: &PauseTarget) -> Result<bool> {
    target.validate()?;
    let row =
        crate::pooler::query(PAUSE_DELETE).bind(target.scope()).bind(target.name()).fetch_optional(executor).await?;
    Ok(row.is_some())
}

/// Every pause in force: queues first, then kinds, by name.
pub async fn list_pauses<'e>(executor: impl PgExecutor<'e>) -> Result<Vec<Pause>> {
    let rows = crate::pooler::query(PAUSE_LIST).fetch_all(executor).await?;
    rows.iter()
        .map(|r| {
            let scope: String = r.try_get("scope")?;
            let name: String = r.try_get("name")?;
            let target = match scope.as_str() {
                "queue" => PauseTarget::Queue(name),
                "kind" => PauseTarget::Kind(name),
                other => return Err(Error::InvalidInput(format!("unknown pause scope `{other}` in oncely.pauses"))),
            };
            Ok(Pause { target, paused_at: r.try_get("paused_at")?, reason: r.try_get("reason")? })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(PauseTarget::queue("").validate().is_err());
        assert!(PauseTarget::kind("x".repeat(256)).validate().is_err());
        assert!(PauseTarget::kind("report").validate().is_ok());
        assert_eq!(PauseTarget::queue("q").to_string(), "queue q");
    }

    #[test]
    fn resuming_a_kind_wakes_every_queue() {
        assert!(PAUSE_DELETE.contains("'oncely_jobs'"));
        assert!(PAUSE_DELETE.contains("ELSE '*'"));
    }
}
