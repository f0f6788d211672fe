//! The inbox: accept an inbound event (a Stripe webhook, a message from another service) at most
//! once per `(source, event id)`, in the same statement that enqueues the job that processes it.
//!
//! A sender that retries, a receiver that crashes after accepting, twenty copies arriving at once on
//! twenty connections: the event is accepted once and processed by one job. The record and the job
//! are written by one statement, so there is no moment where one exists without the other. If the
//! caller passes its own transaction, both also commit or roll back with the caller's writes.

use sqlx::{Acquire, Postgres, Row};
use tracing::instrument;

use crate::error::{Error, Result};
use crate::job::{JobId, NewJob};

/// The longest source or event id, in bytes.
pub const MAX_INBOX_ID_LEN: usize = 255;

/// What [`accept`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// First time: the event was recorded and its job enqueued.
    New {
        /// The processing job.
        job: JobId,
    },
    /// Already accepted earlier: nothing was done.
    Duplicate {
        /// The job that processes (or processed) it.
        job: JobId,
    },
}

impl Accepted {
    /// The processing job, new or earlier.
    pub fn job(self) -> JobId {
        match self {
            Accepted::New { job } | Accepted::Duplicate { job } => job,
        }
    }

    /// True for the first acceptance.
    pub fn is_new(self) -> bool {
        matches!(self, Accepted::New { .. })
    }
}

/// Record and enqueue in one statement. The job id is drawn first so the inbox row can name it; on
/// a duplicate that id is simply unused. `ON CONFLICT DO NOTHING` waits for a concurrent insert of
/// the same key to commit or roll back, so exactly one of many concurrent calls inserts.
const INBOX_ACCEPT: &str = concat!(
    r#"
WITH jid AS (
    SELECT nextval(pg_get_serial_sequence('oncely.jobs', 'id')) AS id
), accepted AS (
    INSERT INTO oncely.inbox (source, event_id, payload, job_id)
    SELECT $1, $2, $3, jid.id FROM jid
    ON CONFLICT (source, event_id) DO NOTHING
    RETURNING job_id
), job AS (
    INSERT INTO oncely.jobs (id, kind, queue, args, priority, run_at, max_attempts)
    SELECT accepted.job_id, $4, $5, $6, $7, coalesce($8, now() + make_interval(secs => coalesce($9, 0))), $10
    FROM accepted
    "#,
    job_insert_returning!("false"),
    r#"
)
SELECT id FROM job
"#
);

/// Accept an inbound event once: record `(source, event_id)` with its payload and enqueue `job` to
/// process it, or — when that pair was accepted before — do nothing and return the earlier job.
///
/// Pass your transaction to make acceptance commit with your own writes; on a pool it commits by
/// itself. `job` must not carry a unique key (the inbox already deduplicates).
///
/// A resend of an event whose processing failed for good is still a duplicate (accepting it again
/// would process it twice if the failure came after its effect): [`status`] tells how an accepted
/// event's processing stands, and its job can be retried.
///
/// # Example
///
/// ```no_run
/// # use oncely_core::{JobArgs, NewJob};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Serialize, Deserialize)] struct HandleStripeEvent { id: String }
/// # impl JobArgs for HandleStripeEvent { const KIND: &'static str = "handle_stripe_event"; }
/// # async fn example(pool: sqlx::PgPool, body: serde_json::Value) -> oncely_core::Result<()> {
/// use oncely_core::inbox::{accept, Accepted};
/// let id = body["id"].as_str().unwrap_or_default().to_owned();
/// let job = NewJob::new(&HandleStripeEvent { id: id.clone() })?;
/// match accept(&pool, "stripe", &id, &body, job).await? {
///     Accepted::New { job } => tracing::info!(%job, "accepted"),
///     Accepted::Duplicate { .. } => tracing::info!("already accepted; answering 200 again"),
/// }
/// # Ok(()) }
/// ```
#[instrument(skip(conn, payload, job), fields(job.kind = %job.kind), err)]
pub async fn accept<'a, A>(
    conn: A,
    source: &str,
    event_id: &str,
    payload: &serde_json::Value,
    job: NewJob,
) -> Result<Accepted>
where
    A: Acquire<'a, Database = Postgres>,
{
    validate(source, event_id, &job)?;
    let mut conn = conn.acquire().await?;
    let query = crate::pooler::query(INBOX_ACCEPT).bind(source).bind(event_id).bind(payload);
    let inserted = crate::queue::bind_job_columns(query, &job).fetch_optional(&mut *conn).await?;
    if let Some(row) = inserted {
        let id: i64 = row.try_get("id")?;
        return Ok(Accepted::New { job: JobId(id) });
    }
    // The conflicting row committed before our insert returned, so a new statement sees it.
    let row = crate::pooler::query("SELECT job_id FROM oncely.inbox WHERE source = $1 AND event_id = $2")
        .bind(source)
        .bind(event_id)
        .fetch_one(&mut *conn)
        .await?;
    Ok(Accepted::Duplicate { job: JobId(row.try_get("job_id")?) })
}

/// How the processing of an accepted event stands: the state of its job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Processing {
    /// Waiting to run, or waiting to retry.
    Pending,
    /// Running now.
    Running,
    /// Processed.
    Succeeded,
    /// Failed for good: its job is in the dead letter. A resend is still a duplicate; retry the
    /// job (`oncely jobs retry ID`, [`crate::retry_job`]) once the cause is fixed.
    Failed,
    /// Its job was cancelled.
    Cancelled,
    /// Its job is gone (pruned after its retention): it finished long ago, its outcome no longer
    /// known.
    Forgotten,
}

/// One accepted event, as [`status`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxEntry {
    /// The job that processes it.
    pub job: JobId,
    /// When it was accepted.
    pub received_at: chrono::DateTime<chrono::Utc>,
    /// Where its processing stands.
    pub processing: Processing,
}

/// Whether `(source, event_id)` was accepted, and how its processing stands; `None` when it was
/// never accepted (or its record was pruned).
pub async fn status<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    source: &str,
    event_id: &str,
) -> Result<Option<InboxEntry>> {
    let row = crate::pooler::query(
        "SELECT i.job_id, i.received_at, j.state::text AS state FROM oncely.inbox i \
         LEFT JOIN oncely.jobs j ON j.id = i.job_id WHERE i.source = $1 AND i.event_id = $2",
    )
    .bind(source)
    .bind(event_id)
    .fetch_optional(executor)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let state: Option<String> = row.try_get("state")?;
    let processing = match state.as_deref().map(str::parse::<crate::JobState>).transpose()? {
        None => Processing::Forgotten,
        Some(crate::JobState::Available) => Processing::Pending,
        Some(crate::JobState::Running) => Processing::Running,
        Some(crate::JobState::Completed) => Processing::Succeeded,
        Some(crate::JobState::Dead) => Processing::Failed,
        Some(crate::JobState::Cancelled) => Processing::Cancelled,
    };
    Ok(Some(InboxEntry { job: JobId(row.try_get("job_id")?), received_at: row.try_get("received_at")?, processing }))
}

/// Delete up to `limit` inbox records received longer ago than `older_than`. A sender that resends
/// an event after its record is gone has it accepted again, so keep records longer than any sender
/// retries (Stripe: 3 days). Returns how many were deleted.
pub async fn prune_inbox<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    older_than: std::time::Duration,
    limit: i64,
) -> Result<u64> {
    let res = crate::pooler::query(
        "DELETE FROM oncely.inbox WHERE (source, event_id) IN ( \
             SELECT source, event_id FROM oncely.inbox WHERE received_at < now() - make_interval(secs => $1) LIMIT $2)",
    )
    .bind(older_than.as_secs_f64())
    .bind(limit)
    .execute(executor)
    .await?;
    Ok(res.rows_affected())
}

fn validate(source: &str, event_id: &str, job: &NewJob) -> Result<()> {
    crate::job::check_len("inbox source", source, MAX_INBOX_ID_LEN)?;
    crate::job::check_len("inbox event id", event_id, MAX_INBOX_ID_LEN)?;
    if job.unique_key.is_some() {
        return Err(Error::InvalidInput("an inbox job takes no unique key: the inbox already deduplicates".into()));
    }
    job.validate()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_ids_and_unique_keys_are_refused() {
        let job = NewJob::from_json("k", serde_json::json!({}));
        assert!(validate("stripe", "evt_1", &job).is_ok());
        assert!(validate("", "evt_1", &job).is_err());
        assert!(validate("stripe", "", &job).is_err());
        assert!(validate("stripe", &"x".repeat(256), &job).is_err());
        assert!(validate("stripe", "evt_1", &job.unique_key("u")).is_err());
    }
}
