//! Unique for a period: a key that stays taken while its job is live **and for a period after it
//! finished** (Oban's unique `period`, pg-boss's singleton window), besides the "unique while live"
//! keys of [`NewJob::unique_key`](crate::NewJob::unique_key).
//!
//! [`enqueue_unique_for`] takes a transaction-scoped advisory lock on the key (so enqueuers of one
//! key queue behind each other, on any connection or machine), then, in a new statement whose
//! snapshot sees every enqueue committed before the lock was granted, looks for a job with the key
//! that is live or finished less than `period` ago; only if there is none does it insert the job
//! (carrying the key in `unique_key`, so plain unique-key enqueues dedupe against it while it is
//! live, too).
//!
//! What to know: inside the caller's transaction the lock is held until that transaction ends, so
//! a long transaction holds up other enqueuers *of the same key* (never of other keys, apart from
//! 64-bit hash collisions of the advisory lock). A finished job that was pruned (deleted) no longer
//! holds its key: keep the retention longer than the period. A person's retry of a finished job is
//! not checked against the period.

use std::time::Duration;

use sqlx::{Acquire, Postgres, Row};
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::job::sql;
use crate::job::{JobId, NewJob};
use crate::queue::{bind_job_columns, Enqueued};

/// Serialise enqueuers of one key until the transaction ends.
const UNIQUE_LOCK: &str = "SELECT pg_advisory_xact_lock(hashtextextended('oncely.unique:' || $1, 0))";

/// The job holding key `$1`: live, or finished less than `$2` seconds ago (by the clock now, not
/// the transaction's start).
const UNIQUE_HOLDER: &str = r#"
SELECT id FROM oncely.jobs
WHERE unique_key = $1
  AND (state IN ('available', 'running')
       OR finished_at > clock_timestamp() - make_interval(secs => $2))
ORDER BY id DESC
LIMIT 1
"#;

/// Enqueue `job` unless a job with `key` is live or finished less than `period` ago; then that
/// job's id is returned with `existing: true`.
///
/// Holds under concurrent enqueues on separate connections (see the module docs for how). Pass a
/// pool or connection to commit at once, or the caller's transaction (`&mut *tx`) to commit with
/// it. `job` must not carry its own unique key.
///
/// # Example
///
/// ```no_run
/// # use oncely_core::{JobArgs, NewJob};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Serialize, Deserialize)] struct Digest { user: i64 }
/// # impl JobArgs for Digest { const KIND: &'static str = "digest"; }
/// # async fn example(pool: sqlx::PgPool) -> oncely_core::Result<()> {
/// use std::time::Duration;
/// // At most one digest per user per hour, counted from when the last one finished.
/// let job = NewJob::new(&Digest { user: 7 })?;
/// let e = oncely_core::unique::enqueue_unique_for(&pool, job, "digest:7", Duration::from_secs(3600)).await?;
/// # Ok(()) }
/// ```
pub async fn enqueue_unique_for<'a, A>(conn: A, job: NewJob, key: &str, period: Duration) -> Result<Enqueued>
where
    A: Acquire<'a, Database = Postgres> + Send + 'a,
{
    let span = tracing::info_span!("enqueue_unique_for", job.kind = %job.kind, queue = %job.queue, key);
    async move {
        if job.unique_key.is_some() {
            return Err(Error::InvalidInput(
                "enqueue_unique_for takes the key as its own argument: the job must not have a unique_key".into(),
            ));
        }
        let job = job.unique_key(key);
        job.validate()?;
        #[cfg(feature = "otel")]
        let job = crate::queue::with_current_trace(job);
        if period > Duration::from_secs(100 * 365 * 24 * 3600) {
            return Err(Error::InvalidInput(format!("a unique period must be at most 100 years, got {period:?}")));
        }
        let mut tx = conn.begin().await?;
        crate::pooler::query(UNIQUE_LOCK).bind(key).execute(&mut *tx).await?;
        let holder: Option<i64> = crate::pooler::query_scalar(UNIQUE_HOLDER)
            .bind(key)
            .bind(period.as_secs_f64())
            .fetch_optional(&mut *tx)
            .await?;
        let enqueued = match holder {
            Some(id) => Enqueued { id: JobId(id), existing: true },
            None => {
                // The unique-while-live index still decides against a live holder that an enqueue
                // without this function inserted meanwhile: then the existing job comes back.
                let row = bind_job_columns(crate::pooler::query(sql::JOB_INSERT_ONE_UNIQUE), &job)
                    .bind(&job.unique_key)
                    .bind(job.traceparent_column())
                    .fetch_one(&mut *tx)
                    .await?;
                Enqueued { id: JobId(row.try_get("id")?), existing: row.try_get("existing")? }
            }
        };
        tx.commit().await?;
        Ok(enqueued)
    }
    .instrument(span)
    .await
}
