//! The report-generation pipeline: one job per report. Generate the report (a simulated model call
//! with a token count fixed per report), add its tokens to the user's usage for the billing period
//! exactly once per report id, mark the report ready.
//!
//! Shared by `examples/report_pipeline/main.rs` and the crash tests in `tests/`.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use oncely::{enqueue_many, handler_fn, Handler, JobArgs, NewJob, Outcome, Worker, WorkerConfig};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub const PERIOD: &str = "2026-11";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerateReport {
    pub report_id: i64,
}
impl JobArgs for GenerateReport {
    const KIND: &'static str = "generate_report";
}

/// The model's token count for a report: deterministic, so the expected total is known.
pub fn tokens_for(report_id: i64) -> i64 {
    100 + (report_id * 7919) % 900
}

pub async fn setup(pool: &PgPool) -> sqlx::Result<()> {
    oncely::migrate(pool).await.map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS reports (
            id bigint PRIMARY KEY, user_id bigint NOT NULL, period text NOT NULL,
            status text NOT NULL DEFAULT 'pending', tokens bigint)",
    )
    .execute(pool)
    .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS usage (
            user_id bigint NOT NULL, period text NOT NULL, tokens bigint NOT NULL,
            PRIMARY KEY (user_id, period))",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Insert `n` reports for `users` users and enqueue one job per report, in one transaction.
/// With `duplicate_every > 0`, every that-many-th report gets a second job (a duplicate event).
pub async fn seed(pool: &PgPool, n: i64, users: i64, duplicate_every: i64) -> oncely::Result<()> {
    let mut tx = pool.begin().await?;
    let ids: Vec<i64> = (1..=n).collect();
    let owners: Vec<i64> = ids.iter().map(|id| id % users).collect();
    sqlx::query(
        "INSERT INTO reports (id, user_id, period) SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[])",
    )
    .bind(&ids)
    .bind(&owners)
    .bind(vec![PERIOD; ids.len()])
    .execute(&mut *tx)
    .await?;
    let mut jobs = Vec::new();
    for &report_id in &ids {
        jobs.push(NewJob::new(&GenerateReport { report_id })?.queue("reports").max_attempts(100));
        if duplicate_every > 0 && report_id % duplicate_every == 0 {
            jobs.push(NewJob::new(&GenerateReport { report_id })?.queue("reports").max_attempts(100));
        }
    }
    enqueue_many(&mut *tx, &jobs).await?;
    tx.commit().await?;
    Ok(())
}

/// Failure injection for the demonstration.
#[derive(Debug, Clone, Default)]
pub struct Failures {
    /// Fail every job's first attempt right after its usage increment.
    pub fail_after_increment: bool,
    /// Abort the process (as a crash) at a step boundary with this probability.
    pub crash_probability: f64,
}

/// Counts of what the handler did in this process.
#[derive(Debug, Default)]
pub struct Calls {
    pub model_calls: AtomicU64,
    pub increments: AtomicU64,
}

fn maybe_crash(f: &Failures, at: &str) {
    if f.crash_probability > 0.0 && rand::random::<f64>() < f.crash_probability {
        tracing::warn!(at, "injected crash: aborting the process");
        std::process::abort();
    }
}

pub fn handler(failures: Failures, calls: Arc<Calls>) -> impl Handler<GenerateReport> {
    handler_fn(move |ctx, args: GenerateReport| {
        let (failures, calls) = (failures.clone(), calls.clone());
        async move {
            let id = args.report_id;
            // 1. Generate: memoized, so a retry does not pay for the model call again.
            let tokens: i64 = ctx
                .step("generate")
                .run(|| async {
                    calls.model_calls.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(2)).await; // the model "thinks"
                    Ok::<_, std::io::Error>(tokens_for(id))
                })
                .await?;
            maybe_crash(&failures, "after generate");

            // 2. Count usage: exactly once per report id, across retries, crashes and duplicate jobs.
            let counted: i64 = ctx
                .step("count_usage")
                .key(format!("usage:report:{id}"))
                // A report is billed once, ever: without this the record would expire after the
                // default 30 days, and a report re-run after that would be billed again.
                .keep_forever()
                .transactional(|tx| {
                    let (calls, failures) = (calls.clone(), failures.clone());
                    Box::pin(async move {
                        sqlx::query(
                            "INSERT INTO usage (user_id, period, tokens)
                             SELECT user_id, period, $2 FROM reports WHERE id = $1
                             ON CONFLICT (user_id, period) DO UPDATE SET tokens = usage.tokens + EXCLUDED.tokens",
                        )
                        .bind(id)
                        .bind(tokens)
                        .execute(&mut *tx)
                        .await?;
                        maybe_crash(&failures, "inside count_usage, before commit");
                        calls.increments.fetch_add(1, Ordering::Relaxed);
                        Ok::<_, sqlx::Error>(tokens)
                    })
                })
                .await?;
            maybe_crash(&failures, "after count_usage");
            if failures.fail_after_increment && ctx.attempt() == 1 {
                return Err(Outcome::retry_after(
                    "injected failure after the usage increment",
                    Duration::from_millis(50),
                ));
            }

            // 3. Mark ready.
            ctx.step("mark_ready")
                .transactional(|tx| {
                    Box::pin(async move {
                        sqlx::query("UPDATE reports SET status = 'ready', tokens = $2 WHERE id = $1")
                            .bind(id)
                            .bind(counted)
                            .execute(&mut *tx)
                            .await
                            .map(|_| ())
                    })
                })
                .await?;
            Ok(())
        }
    })
}

/// How long this process's own queries ride out a database that is away (a restart, a failover,
/// terminated connections): retried with backoff up to about a minute, like the library's worker.
fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(2))
        .with_total_delay(Some(Duration::from_secs(60)))
        .with_max_times(usize::MAX)
        .with_jitter()
}

/// Run `query` again while it fails for a reason that passes (the server restarting, a connection
/// terminated); other errors return at once.
pub async fn retrying<T, F, Fut>(what: &str, query: F) -> sqlx::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = sqlx::Result<T>>,
{
    query
        .retry(backoff())
        .when(|e: &sqlx::Error| transient(e))
        .notify(|e, after| tracing::warn!(what, error = %e, ?after, "database unavailable; retrying"))
        .await
}

/// The errors of a database that is away rather than of a wrong query.
fn transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db.code().is_some_and(|c| c.starts_with("57P") || c.starts_with("08")),
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

/// Jobs not finished yet (available or running).
pub async fn unfinished(pool: &PgPool) -> sqlx::Result<i64> {
    retrying("count unfinished jobs", || {
        sqlx::query_scalar("SELECT count(*) FROM oncely.jobs WHERE state IN ('available', 'running')").fetch_one(pool)
    })
    .await
}

/// A worker process's life: run the pipeline's handler on the `reports` queue until no job is left
/// to run, then shut the worker down — also when waiting fails, so in-flight jobs are released
/// rather than left to their leases. Rides out a database restart like the worker does.
pub async fn work_until_done(
    pool: &PgPool,
    failures: Failures,
    calls: Arc<Calls>,
    configure: impl FnOnce(&mut WorkerConfig),
) -> Result<(), BoxError> {
    let handle = Worker::builder(pool.clone())
        .register(handler(failures, calls))
        .queue("reports", 8)
        .configure(configure)
        .build()?
        .start();
    let waited = async {
        while unfinished(pool).await? > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok::<_, sqlx::Error>(())
    }
    .await;
    handle.shutdown().await;
    Ok(waited?)
}

/// What a person checks after a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub reports: i64,
    pub ready: i64,
    pub expected_tokens: i64,
    pub counted_tokens: i64,
    /// Users whose usage differs from the sum of their reports' tokens.
    pub users_off: i64,
    /// Reports whose usage record is missing or not completed.
    pub reports_uncounted: i64,
}

/// The [`Summary`], retried while the database is away.
pub async fn summary(pool: &PgPool) -> sqlx::Result<Summary> {
    retrying("summary", || summary_once(pool)).await
}

async fn summary_once(pool: &PgPool) -> sqlx::Result<Summary> {
    let (reports, ready): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(*) FILTER (WHERE status = 'ready') FROM reports")
            .fetch_one(pool)
            .await?;
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM reports").fetch_all(pool).await?;
    let expected_tokens = ids.iter().map(|&id| tokens_for(id)).sum();
    let counted_tokens: i64 =
        sqlx::query_scalar("SELECT coalesce(sum(tokens), 0)::bigint FROM usage").fetch_one(pool).await?;
    let users_off: i64 = sqlx::query_scalar(
        "WITH expected AS (
             SELECT user_id, sum(100 + (id * 7919) % 900)::bigint AS tokens FROM reports GROUP BY user_id)
         SELECT count(*) FROM expected e FULL JOIN usage u USING (user_id)
         WHERE e.tokens IS DISTINCT FROM u.tokens",
    )
    .fetch_one(pool)
    .await?;
    let reports_uncounted: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM reports r WHERE NOT EXISTS (
             SELECT 1 FROM oncely.ledger l
             WHERE l.namespace = 'step' AND l.key = 'usage:report:' || r.id AND l.state = 'completed'
               AND (l.output #>> '{}')::bigint = r.tokens)",
    )
    .fetch_one(pool)
    .await?;
    Ok(Summary { reports, ready, expected_tokens, counted_tokens, users_off, reports_uncounted })
}

impl Summary {
    pub fn is_exact(&self) -> bool {
        self.ready == self.reports
            && self.expected_tokens == self.counted_tokens
            && self.users_off == 0
            && self.reports_uncounted == 0
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "reports:          {} ({} ready)", self.reports, self.ready)?;
        writeln!(f, "expected tokens:  {}", self.expected_tokens)?;
        writeln!(f, "counted tokens:   {}", self.counted_tokens)?;
        writeln!(f, "users off:        {}", self.users_off)?;
        write!(f, "reports counted other than once: {}", self.reports_uncounted)
    }
}
