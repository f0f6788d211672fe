//! Enqueueing jobs and managing them: insert one or many, inspect, cancel, retry.
//!
//! Every function takes any [`PgExecutor`]: a pool, a connection, or the caller's own
//! transaction — so a job can commit or roll back together with the business writes that caused it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use sqlx::{Acquire, PgExecutor, Postgres, Row};
use tracing::{instrument, Instrument};

use crate::error::{Error, Result};
use crate::job::{rows_to_jobs, Job, JobId, JobRow, JobState, NewJob};

/// What an enqueue did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    /// The job's id: the new job, or the live job that already held the unique key.
    pub id: JobId,
    /// True when a live job with the same unique key existed and no job was created.
    pub existing: bool,
}

/// Enqueue one job.
///
/// With a unique key that a live (available or running) job already holds, nothing is inserted and
/// that job's id is returned with `existing: true`. This holds under concurrent enqueues on separate
/// connections: the unique index decides, and the losers wait for the winner's transaction.
///
/// # Example
///
/// ```no_run
/// # use oncely_core::{JobArgs, NewJob};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Serialize, Deserialize)] struct GenerateReport { report_id: i64 }
/// # impl JobArgs for GenerateReport { const KIND: &'static str = "generate_report"; }
/// # async fn example(pool: sqlx::PgPool) -> oncely_core::Result<()> {
/// let mut tx = pool.begin().await?;
/// // ... business writes in `tx` ...
/// let job = oncely_core::enqueue(&mut *tx, NewJob::new(&GenerateReport { report_id: 7 })?).await?;
/// tx.commit().await?; // the job exists if and only if this commits
/// # Ok(()) }
/// ```
#[instrument(skip_all, fields(job.kind = %job.kind, queue = %job.queue), err)]
pub async fn enqueue<'e>(executor: impl PgExecutor<'e>, job: NewJob) -> Result<Enqueued> {
    job.validate()?;
    #[cfg(feature = "otel")]
    let job = with_current_trace(job);
    let row = if job.flow_key.is_some() {
        bind_job_columns(crate::pooler::query(crate::job::sql::JOB_INSERT_ONE_FLOW), &job)
            .bind(&job.unique_key)
            .bind(job.traceparent_column())
            .bind(&job.flow_key)
            .bind(job.flow_limit)
            .fetch_one(executor)
            .await?
    } else {
        let sql = if job.unique_key.is_some() {
            crate::job::sql::JOB_INSERT_ONE_UNIQUE
        } else {
            crate::job::sql::JOB_INSERT_ONE
        };
        bind_job_columns(crate::pooler::query(sql), &job)
            .bind(&job.unique_key)
            .bind(job.traceparent_column())
            .fetch_one(executor)
            .await?
    };
    Ok(Enqueued { id: JobId(row.try_get("id")?), existing: row.try_get("existing")? })
}

/// With the feature `otel`: a job without a `traceparent` takes the current span's (the enqueue's
/// own span, a child of the caller's), when an OpenTelemetry layer gives it one.
#[cfg(feature = "otel")]
pub(crate) fn with_current_trace(mut job: NewJob) -> NewJob {
    if job.traceparent.is_none() {
        job.traceparent = crate::trace::TraceParent::from_current_span();
    }
    job
}

/// Bind a job's kind, queue, args, priority, run_at, delay (seconds) and max attempts, in that
/// order: the parameters every single-job insert takes.
pub(crate) fn bind_job_columns<'q>(
    query: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    job: &'q NewJob,
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    query
        .bind(&job.kind)
        .bind(&job.queue)
        .bind(&job.args)
        .bind(job.priority)
        .bind(job.run_at)
        .bind(job.delay.map(|d| d.as_secs_f64()))
        .bind(job.max_attempts)
}

/// Batches of at least this many jobs, none with a unique key, a `run_at` or a delay, are written
/// with COPY (see [`enqueue_many`]).
pub const COPY_THRESHOLD: usize = 256;

/// Enqueue many jobs, in input order, from a pool, a connection or the caller's transaction.
///
/// A batch of at least [`COPY_THRESHOLD`] jobs in which *every* job is due now (no `run_at`, no
/// delay) and has no unique key is written with `COPY` (ids are reserved from the sequence first):
/// three round trips, the fastest way in. Jobs with unique keys never take that path — one such job
/// sends its whole batch to the other — because `COPY` cannot skip a duplicate key. Every other
/// batch is one `INSERT ... SELECT FROM unnest(...)` statement. Jobs that share a unique key within `jobs` are
/// inserted once; the later ones report the first's id with `existing: true`, as a later call would.
///
/// Outside a transaction, a COPY batch commits as a whole; pass a transaction to make it commit or
/// roll back with your own writes.
///
/// (The future is boxed and `Send` so that callers can await it inside their own boxed futures;
/// an `async fn` generic over `Acquire` trips a limit of the compiler's `Send` inference there.)
pub fn enqueue_many<'a, A>(conn: A, jobs: &'a [NewJob]) -> BoxFuture<'a, Result<Vec<Enqueued>>>
where
    A: Acquire<'a, Database = Postgres> + Send + 'a,
{
    Box::pin(async move {
        // Made at the first poll, as an `async fn`'s span is: a child of the span the caller awaits
        // in (what `otel` stores as the jobs' traceparent), not of the one it was called in.
        let span = tracing::info_span!("enqueue_many", count = jobs.len());
        async move {
            if jobs.is_empty() {
                return Ok(Vec::new());
            }
            for job in jobs {
                job.validate()?;
            }
            // The traceparent of jobs that carry none: the current span's, with the feature `otel`.
            #[cfg(feature = "otel")]
            let current = crate::trace::TraceParent::from_current_span();
            #[cfg(not(feature = "otel"))]
            let current: Option<crate::trace::TraceParent> = None;
            let current = current.as_ref().map(crate::trace::TraceParent::as_str);
            let simple = jobs
                .iter()
                .all(|j| j.unique_key.is_none() && j.flow_key.is_none() && j.run_at.is_none() && j.delay.is_none());
            if crate::pooler::transaction_pooling() {
                // Behind a transaction pooler: every statement inside a transaction (a savepoint in
                // the caller's own).
                let mut tx = conn.begin().await?;
                let enqueued = match simple && jobs.len() >= COPY_THRESHOLD {
                    true => enqueue_copy(&mut tx, jobs, current).await?,
                    false => enqueue_unnest(&mut tx, jobs, current).await?,
                };
                tx.commit().await?;
                return Ok(enqueued);
            }
            let mut conn = conn.acquire().await?;
            if simple && jobs.len() >= COPY_THRESHOLD {
                return enqueue_copy(&mut conn, jobs, current).await;
            }
            enqueue_unnest(&mut conn, jobs, current).await
        }
        .instrument(span)
        .await
    })
}

/// One field of a COPY text row: `\N` for NULL, backslash escapes for the rest.
fn copy_field(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
}

async fn enqueue_copy(conn: &mut sqlx::PgConnection, jobs: &[NewJob], current: Option<&str>) -> Result<Vec<Enqueued>> {
    let ids: Vec<i64> = crate::pooler::query_scalar(crate::job::sql::JOB_RESERVE_IDS)
        .bind(jobs.len() as i64)
        .fetch_all(&mut *conn)
        .await?;
    let mut buf = String::with_capacity(jobs.len() * 64);
    for (id, job) in ids.iter().zip(jobs) {
        let args =
            serde_json::to_string(&job.args).map_err(|source| Error::InvalidArgs { kind: job.kind.clone(), source })?;
        buf.push_str(&id.to_string());
        for field in [job.kind.as_str(), job.queue.as_str(), args.as_str()] {
            buf.push('\t');
            copy_field(&mut buf, field);
        }
        buf.push_str(&format!("\t{}\t{}\t", job.priority, job.max_attempts));
        // A traceparent is lowercase hex and dashes (parsed): nothing to escape.
        buf.push_str(job.traceparent_column().or(current).unwrap_or("\\N"));
        buf.push('\n');
    }
    let mut copy = conn.copy_in_raw(crate::job::sql::JOB_COPY_IN).await?;
    copy.send(buf.into_bytes()).await?;
    copy.finish().await?;
    let mut queues: Vec<&str> = jobs.iter().map(|j| j.queue.as_str()).collect();
    queues.sort_unstable();
    queues.dedup();
    crate::pooler::query(crate::job::sql::QUEUE_NOTIFY_MANY).bind(&queues).execute(&mut *conn).await?;
    Ok(ids.into_iter().map(|id| Enqueued { id: JobId(id), existing: false }).collect())
}

async fn enqueue_unnest(
    conn: &mut sqlx::PgConnection,
    jobs: &[NewJob],
    current: Option<&str>,
) -> Result<Vec<Enqueued>> {
    let n = jobs.len();
    let mut kinds = Vec::with_capacity(n);
    let mut queues = Vec::with_capacity(n);
    let mut args = Vec::with_capacity(n);
    let mut priorities = Vec::with_capacity(n);
    let mut run_ats: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(n);
    let mut delays: Vec<Option<f64>> = Vec::with_capacity(n);
    let mut max_attempts = Vec::with_capacity(n);
    let mut unique_keys: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut flow_keys: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut flow_limits: Vec<Option<i32>> = Vec::with_capacity(n);
    let mut traceparents: Vec<Option<&str>> = Vec::with_capacity(n);
    // For each input: the index of the row that carries it (itself, or an earlier row with its key).
    let mut source = Vec::with_capacity(n);
    let mut seen_keys = std::collections::HashMap::new();
    for job in jobs {
        if let Some(key) = job.unique_key.as_deref() {
            if let Some(&row) = seen_keys.get(key) {
                source.push((row, true));
                continue;
            }
            seen_keys.insert(key, kinds.len());
        }
        source.push((kinds.len(), false));
        kinds.push(job.kind.as_str());
        queues.push(job.queue.as_str());
        args.push(&job.args);
        priorities.push(job.priority);
        run_ats.push(job.run_at);
        delays.push(job.delay.map(|d| d.as_secs_f64()));
        max_attempts.push(job.max_attempts);
        unique_keys.push(job.unique_key.as_deref());
        flow_keys.push(job.flow_key.as_deref());
        flow_limits.push(job.flow_limit);
        traceparents.push(job.traceparent_column().or(current));
    }
    let flow = flow_keys.iter().any(Option::is_some);
    let sql = if flow {
        crate::job::sql::JOB_INSERT_MANY_FLOW
    } else if seen_keys.is_empty() {
        crate::job::sql::JOB_INSERT_MANY
    } else {
        crate::job::sql::JOB_INSERT_MANY_UNIQUE
    };
    let mut query = crate::pooler::query(sql)
        .bind(&kinds)
        .bind(&queues)
        .bind(&args)
        .bind(&priorities)
        .bind(&run_ats)
        .bind(&delays)
        .bind(&max_attempts)
        .bind(&unique_keys)
        .bind(&traceparents);
    if flow {
        query = query.bind(&flow_keys).bind(&flow_limits);
    }
    let rows = query.fetch_all(&mut *conn).await?;
    // INSERT ... SELECT returns rows in the order it inserts them, which is the order of the input.
    if rows.len() != kinds.len() {
        return Err(Error::InvalidInput(format!(
            "enqueue_many: inserted {} rows for {} jobs",
            rows.len(),
            kinds.len()
        )));
    }
    let inserted = rows
        .iter()
        .map(|r| Ok(Enqueued { id: JobId(r.try_get("id")?), existing: r.try_get("existing")? }))
        .collect::<Result<Vec<_>>>()?;
    Ok(source
        .into_iter()
        .map(|(row, dup)| Enqueued { id: inserted[row].id, existing: inserted[row].existing || dup })
        .collect())
}

/// Fetch one job.
pub async fn get_job<'e>(executor: impl PgExecutor<'e>, id: JobId) -> Result<Job> {
    let sql = format!("SELECT {} FROM oncely.jobs WHERE id = $1", crate::job::sql::JOB_COLUMNS);
    let row: Option<JobRow> = crate::pooler::query_as(&sql).bind(id).fetch_optional(executor).await?;
    row.ok_or(Error::JobNotFound(id))?.try_into()
}

/// Which jobs [`list_jobs`] returns.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    /// Only jobs in this state.
    pub state: Option<JobState>,
    /// Only jobs on this queue.
    pub queue: Option<String>,
    /// Only jobs of this kind.
    pub kind: Option<String>,
    /// Only jobs with an id above this (for paging).
    pub after: Option<JobId>,
    /// At most this many. Defaults to 100.
    pub limit: Option<i64>,
}

/// List jobs, oldest id first.
pub async fn list_jobs<'e>(executor: impl PgExecutor<'e>, filter: &JobFilter) -> Result<Vec<Job>> {
    let sql = format!(
        "SELECT {} FROM oncely.jobs \
         WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR queue = $2) \
           AND ($3::text IS NULL OR kind = $3) AND id > coalesce($4, 0) \
         ORDER BY id LIMIT $5",
        crate::job::sql::JOB_COLUMNS
    );
    let rows: Vec<JobRow> = crate::pooler::query_as(&sql)
        .bind(filter.state.map(JobState::as_str))
        .bind(&filter.queue)
        .bind(&filter.kind)
        .bind(filter.after)
        .bind(filter.limit.unwrap_or(100))
        .fetch_all(executor)
        .await?;
    rows_to_jobs(rows)
}

/// Number of jobs per (queue, state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueCount {
    /// The queue.
    pub queue: String,
    /// The state.
    pub state: JobState,
    /// How many jobs.
    pub count: i64,
}

/// Count jobs by queue and state.
pub async fn count_jobs<'e>(executor: impl PgExecutor<'e>) -> Result<Vec<QueueCount>> {
    let rows = crate::pooler::query(crate::job::sql::JOB_COUNT_BY_QUEUE_AND_STATE).fetch_all(executor).await?;
    rows.iter()
        .map(|r| {
            Ok(QueueCount {
                queue: r.try_get("queue")?,
                state: r.try_get::<String, _>("state")?.parse()?,
                count: r.try_get("n")?,
            })
        })
        .collect()
}

/// Cancel a job that has not finished. A running job's worker is fenced out: its completion is
/// refused, and its heartbeat tells the handler (through `JobContext::cancelled`) to stop.
pub fn cancel_job<'a, A>(db: A, id: JobId) -> futures::future::BoxFuture<'a, Result<()>>
where
    A: sqlx::Acquire<'a, Database = sqlx::Postgres> + Send + 'a,
{
    // A boxed `Send` future: an `async fn` generic over `Acquire` is not `Send` for a
    // `&mut PgConnection` argument (the bound is higher-ranked), which spawned tasks and
    // axum handlers need.
    Box::pin(async move {
        let result: Result<()> = async move {
            let mut conn = db.acquire().await?;
            if crate::pooler::query(crate::job::sql::JOB_CANCEL).bind(id).fetch_optional(&mut *conn).await?.is_some() {
                return Ok(());
            }
            let job = get_job(&mut *conn, id).await?;
            Err(Error::InvalidState {
                job_id: id,
                state: job.state.to_string(),
                action: "cancel",
                expected: "available or running",
            })
        }
        .await;
        result
    })
}

/// Put a dead (or cancelled) job back in its queue, with its error history kept and one more
/// attempt allowed.
pub fn retry_job<'a, A>(db: A, id: JobId) -> futures::future::BoxFuture<'a, Result<()>>
where
    A: sqlx::Acquire<'a, Database = sqlx::Postgres> + Send + 'a,
{
    // A boxed `Send` future: an `async fn` generic over `Acquire` is not `Send` for a
    // `&mut PgConnection` argument (the bound is higher-ranked), which spawned tasks and
    // axum handlers need.
    Box::pin(async move {
        let result: Result<()> = async move {
            let mut conn = db.acquire().await?;
            let res =
                crate::pooler::query(crate::job::sql::JOB_RETRY_FINISHED).bind(id).fetch_optional(&mut *conn).await;
            match res {
                Ok(Some(row)) => {
                    let queue: String = row.try_get("queue")?;
                    crate::pooler::query(crate::job::sql::QUEUE_NOTIFY_MANY)
                        .bind(vec![queue])
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                }
                Ok(None) => {
                    let job = get_job(&mut *conn, id).await?;
                    Err(Error::InvalidState {
                        job_id: id,
                        state: job.state.to_string(),
                        action: "retry",
                        expected: "dead or cancelled",
                    })
                }
                Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("23505") => Err(Error::InvalidInput(
                    format!("job {id} cannot be retried: another live job holds its unique key"),
                )),
                Err(e) => Err(e.into()),
            }
        }
        .await;
        result
    })
}

/// Dismiss dead jobs (the dead letter's "cancel"): each of `ids` that is dead becomes `cancelled`
/// and leaves the dead letter without running again; ids in any other state, or unknown, are left
/// alone. Returns the ids dismissed. [`retry_job`] still puts a dismissed job back.
#[tracing::instrument(skip(executor), err)]
pub async fn dismiss_dead_jobs<'e>(executor: impl PgExecutor<'e>, ids: &[JobId]) -> Result<Vec<JobId>> {
    let ids: Vec<i64> = ids.iter().map(|id| id.0).collect();
    let done: Vec<i64> =
        crate::pooler::query_scalar(crate::job::sql::JOB_DISMISS_DEAD_MANY).bind(&ids).fetch_all(executor).await?;
    Ok(done.into_iter().map(JobId).collect())
}

/// Delete finished jobs from the dead letter: each of `ids` that is dead or cancelled is deleted
/// (with its error history); ids in any other state, or unknown, are left alone. Returns the ids
/// deleted. For deletes by filter, in batches, see [`bulk::delete_jobs`](crate::bulk::delete_jobs).
#[tracing::instrument(skip(executor), err)]
pub async fn delete_finished_jobs<'e>(executor: impl PgExecutor<'e>, ids: &[JobId]) -> Result<Vec<JobId>> {
    let ids: Vec<i64> = ids.iter().map(|id| id.0).collect();
    let done: Vec<i64> =
        crate::pooler::query_scalar(crate::job::sql::JOB_DELETE_FINISHED_MANY).bind(&ids).fetch_all(executor).await?;
    Ok(done.into_iter().map(JobId).collect())
}

pub(crate) fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}
