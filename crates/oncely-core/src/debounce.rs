//! Debounce: many enqueues for one key within a quiet period give **one** run, with the **latest**
//! arguments (Inngest's `debounce`, a trailing-edge debounce with a maximum wait).
//!
//! [`enqueue_debounced`] takes a transaction-scoped advisory lock on the key (so the enqueuers of
//! one key queue behind each other, on any connection or machine). Then, in a new statement that
//! sees every enqueue committed before the lock was granted, it looks for the job of that key and
//! kind that is *waiting*: available and never started. If there is one, its arguments are replaced
//! and its `run_at` moves to `period` from now; otherwise a new job is inserted, due in `period`.
//! A [maximum wait](Debounce::max_wait) caps `run_at` at the waiting job's `created_at` plus the
//! maximum, so a steady stream of enqueues cannot postpone the run forever.
//!
//! Once a worker has claimed the job, it no longer waits: the next enqueue for the key starts a new
//! waiting job, so an enqueue that arrives while the run runs is never lost (its arguments get a run
//! of their own). A claim and a merge racing for the same row are decided by the row lock: either
//! the merge lands before the claim (the run sees the new arguments), or the claim wins and the
//! merge inserts a new job.
//!
//! What to know:
//! - The run starts at `run_at`, found by the worker's next poll (`WorkerConfig::poll_interval`):
//!   a job due later is not announced by `NOTIFY`.
//! - Inside the caller's transaction the lock is held until that transaction ends, so a long
//!   transaction holds up the other enqueuers *of the same key*; the merge becomes visible to
//!   workers when it commits.
//! - The key is scoped by job kind: two kinds may use the same key independently.
//! - A waiting job keeps the queue, priority and attempt limit of the enqueue that created it; only
//!   the arguments and the due time change.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{Acquire, Postgres, Row};
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::job::sql;
use crate::job::{check_len, JobId, NewJob};

/// Serialise the debounced enqueuers of one key until the transaction ends.
const DEBOUNCE_LOCK: &str = "SELECT pg_advisory_xact_lock(hashtextextended('oncely.debounce:' || $1 || ':' || $2, 0))";

/// The longest period or maximum wait accepted.
const MAX_PERIOD: Duration = Duration::from_secs(365 * 24 * 3600);

/// How long a debounced job waits for quiet: the `period` after the latest enqueue, capped by an
/// optional maximum wait after the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Debounce {
    period: Duration,
    max_wait: Option<Duration>,
}

impl Debounce {
    /// Run `period` after the latest enqueue for the key, with no maximum wait.
    pub fn new(period: Duration) -> Self {
        Self { period, max_wait: None }
    }

    /// Run at the latest `max_wait` after the enqueue that created the waiting job, however many
    /// enqueues follow. It must be at least the period.
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = Some(max_wait);
        self
    }

    /// The quiet period.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// The maximum wait, if any.
    pub fn max_wait_limit(&self) -> Option<Duration> {
        self.max_wait
    }

    fn validate(&self) -> Result<()> {
        if self.period.is_zero() || self.period > MAX_PERIOD {
            return Err(Error::InvalidInput(format!(
                "a debounce period must be more than zero and at most a year, got {:?}",
                self.period
            )));
        }
        if let Some(max_wait) = self.max_wait {
            if max_wait < self.period || max_wait > MAX_PERIOD {
                return Err(Error::InvalidInput(format!(
                    "a debounce max_wait must be at least the period ({:?}) and at most a year, got {max_wait:?}",
                    self.period
                )));
            }
        }
        Ok(())
    }
}

/// What a debounced enqueue did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Debounced {
    /// The waiting job: the new one, or the one this enqueue merged into.
    pub id: JobId,
    /// True when a waiting job existed: its arguments were replaced and no job was created.
    pub merged: bool,
    /// When the waiting job is now due.
    pub run_at: DateTime<Utc>,
}

/// Enqueue `job` debounced by `key`: merge it into the waiting job of the same key and kind
/// (replacing its arguments, pushing its due time to `period` from now, capped by the maximum
/// wait), or insert a new waiting job.
///
/// Holds under concurrent enqueues on separate connections: the enqueuers of a key are serialised
/// by an advisory lock, so they leave one waiting job, with the arguments of the last to commit.
/// Pass a pool or connection to commit at once, or the caller's transaction (`&mut *tx`) to commit
/// with it. `job` must not carry a unique key, a concurrency key, a `run_at` or a delay (the
/// debounce sets the due time).
///
/// # Example
///
/// ```no_run
/// # use oncely_core::{JobArgs, NewJob};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Serialize, Deserialize)] struct Reindex { tenant: i64, version: i64 }
/// # impl JobArgs for Reindex { const KIND: &'static str = "reindex"; }
/// # async fn example(pool: sqlx::PgPool) -> oncely_core::Result<()> {
/// use std::time::Duration;
/// use oncely_core::debounce::{enqueue_debounced, Debounce};
/// // Reindex a tenant 5 s after its last change, and at most a minute after the first.
/// let every_change = Debounce::new(Duration::from_secs(5)).max_wait(Duration::from_secs(60));
/// let job = NewJob::new(&Reindex { tenant: 7, version: 42 })?;
/// let d = enqueue_debounced(&pool, job, "tenant:7", every_change).await?;
/// # Ok(()) }
/// ```
pub async fn enqueue_debounced<'a, A>(conn: A, job: NewJob, key: &str, debounce: Debounce) -> Result<Debounced>
where
    A: Acquire<'a, Database = Postgres> + Send + 'a,
{
    let span = tracing::info_span!("enqueue_debounced", job.kind = %job.kind, queue = %job.queue, key);
    async move {
        job.validate()?;
        check_len("debounce key", key, 512)?;
        debounce.validate()?;
        if job.unique_key.is_some() || job.run_at.is_some() || job.delay.is_some() || job.flow_key.is_some() {
            return Err(Error::InvalidInput(
                "a debounced job must not carry a unique key, a run_at or a delay: the debounce decides when it runs"
                    .into(),
            ));
        }
        #[cfg(feature = "otel")]
        let job = crate::queue::with_current_trace(job);
        let period = debounce.period.as_secs_f64();
        let max_wait = debounce.max_wait.map(|d| d.as_secs_f64());
        let mut tx = conn.begin().await?;
        crate::pooler::query(DEBOUNCE_LOCK).bind(key).bind(&job.kind).execute(&mut *tx).await?;
        let merged = crate::pooler::query(sql::JOB_DEBOUNCE_MERGE)
            .bind(key)
            .bind(&job.kind)
            .bind(&job.args)
            .bind(period)
            .bind(max_wait)
            .fetch_optional(&mut *tx)
            .await?;
        let (row, merged) = match merged {
            Some(row) => (row, true),
            None => {
                let row = crate::pooler::query(sql::JOB_DEBOUNCE_INSERT)
                    .bind(&job.kind)
                    .bind(&job.queue)
                    .bind(&job.args)
                    .bind(job.priority)
                    .bind(period)
                    .bind(job.max_attempts)
                    .bind(max_wait)
                    .bind(key)
                    .bind(job.traceparent_column())
                    .fetch_one(&mut *tx)
                    .await?;
                (row, false)
            }
        };
        let debounced = Debounced { id: JobId(row.try_get("id")?), merged, run_at: row.try_get("run_at")? };
        tx.commit().await?;
        tracing::debug!(id = debounced.id.0, merged, run_at = %debounced.run_at, "debounced");
        Ok(debounced)
    }
    .instrument(span)
    .await
}
