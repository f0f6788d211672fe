//! Flow control held in PostgreSQL across every worker: concurrency keys, global queue limits, rate
//! limits (GCRA) and round-robin fairness across keys.
//!
//! # Concurrency keys
//!
//! A job enqueued with [`NewJob::concurrency_key`](crate::NewJob::concurrency_key) carries a key
//! (say `tenant:7`) and the key has a limit. **Slots are running rows**: the number of the key's
//! jobs in state `running`. A worker that dies holding slots gives them back when its jobs' leases
//! expire and the rescue moves them out of `running`.
//!
//! Keyed jobs are not claimed by the plain claim (`JOB_CLAIM` reads only jobs without a key, so a
//! plain drain costs what it did); the worker claims them with [`claim_jobs`], a transaction of two
//! statements:
//!
//! 1. lock the rows (`oncely.flow_keys`, `FOR NO KEY UPDATE SKIP LOCKED`) of up to `limit` keys of
//!    the queue that have due jobs, a free slot and a free rate slot, **least recently claimed
//!    first** (the round robin that makes the claims fair across keys);
//! 2. in a **new statement** — a fresh snapshot that sees every claim committed by the key's
//!    previous holder of the lock — count each key's running jobs, claim at most the free slots
//!    (and at most an equal share of the batch per key), advance the keys' rate state and
//!    round-robin position.
//!
//! Two claimers never hold the same key's lock, and each counts after the other's claim committed,
//! so the limit holds whatever the number of workers. A keyed job leaving `running` (completed,
//! failed, snoozed, cancelled, rescued) NOTIFYs its queue from a trigger, so waiting jobs start
//! when a slot frees, not at the next poll; jobs over the limit stay `available` and are not
//! claimed meanwhile (no spinning: the claim returns fewer jobs and the fetcher waits for a
//! wake-up).
//!
//! # Global limit per queue
//!
//! [`set_queue_limit`] caps the running jobs of a queue across the fleet. The plain claim skips a
//! limited queue; [`claim_jobs`] locks the limit's row (waiting for other claimers of the queue),
//! counts the queue's running jobs in a new statement and claims at most the difference.
//!
//! # Rate limits
//!
//! [`set_rate_limit`] gives a key at most `count` starts per `period`, with bursts of up to
//! `burst`, by the generic cell rate algorithm: the key's row holds the theoretical arrival time
//! (`tat`) of its next start, updated under the key's lock by the claim. Jobs over the rate stay
//! `available` (no attempt used); the fetcher is told when the next start is allowed.

use std::time::Duration;

use sqlx::{PgPool, Row};
use tracing::instrument;

use crate::error::{Error, Result};
use crate::job::{rows_to_jobs, Job, JobRow};
use crate::queue::secs;

/// Lock (skip locked) up to `$2` keys of queue `$1` that may start a job now: not idle, a due job,
/// a free slot (as this snapshot sees it; the claim counts again), a free rate slot. Least
/// recently claimed first.
pub(crate) const FLOW_KEYS_LOCK: &str = r#"
SELECT f.key
FROM oncely.flow_keys AS f
WHERE f.queue = $1 AND NOT f.idle
  AND NOT EXISTS (SELECT 1 FROM oncely.pauses WHERE scope = 'queue' AND name = $1)
  AND (f.rate_interval_secs IS NULL OR f.tat IS NULL
       OR f.tat <= now() + make_interval(secs => (f.rate_burst - 1) * f.rate_interval_secs))
  AND (f.concurrency_limit IS NULL OR f.concurrency_limit > (
       SELECT count(*) FROM oncely.jobs AS r
       WHERE r.state = 'running' AND r.flow_key IS NOT NULL AND r.queue = $1 AND r.flow_key = f.key))
  -- A scalar subquery, not EXISTS: EXISTS may become a semi-join that reads every due keyed job
  -- of the queue (tests/it/plans.rs caught it); this is one probe per key.
  AND (SELECT true FROM oncely.jobs AS a
       WHERE a.state = 'available' AND a.flow_key IS NOT NULL AND a.queue = $1 AND a.flow_key = f.key
         AND a.run_at <= now()
       -- The index's order: without it, one key's large backlog let the planner pick a sequential
       -- scan "that stops at the first row" (36 ms behind 100,000 jobs of another key).
       ORDER BY a.priority DESC, a.run_at
       LIMIT 1)
ORDER BY f.last_claimed_at, f.key
LIMIT $2
FOR NO KEY UPDATE OF f SKIP LOCKED
"#;

/// Claim, for the keys `$2` of queue `$1` (locked by [`FLOW_KEYS_LOCK`] in this transaction), up to
/// `$3` jobs in all and `$6` per key, within each key's free slots and rate; lease them to worker
/// `$5` for `$4` seconds. Marks each key's round-robin position, rate state, and whether it has
/// available jobs left.
pub(crate) const FLOW_CLAIM: &str = concat!(
    r#"
WITH k AS MATERIALIZED (
    SELECT f.key, f.last_claimed_at, f.rate_interval_secs AS ri,
           greatest(coalesce(f.tat, now()), now()) AS t0,
           greatest(0, least(
               $6::int,
               f.concurrency_limit - (SELECT count(*) FROM oncely.jobs AS r
                   WHERE r.state = 'running' AND r.flow_key IS NOT NULL AND r.queue = $1 AND r.flow_key = f.key)::int,
               floor((extract(epoch FROM now() - greatest(coalesce(f.tat, now()), now()))
                      + (f.rate_burst - 1) * f.rate_interval_secs) / f.rate_interval_secs)::int + 1
           )) AS free
    FROM oncely.flow_keys AS f
    WHERE f.queue = $1 AND f.key = ANY ($2::text[])
    ORDER BY f.last_claimed_at, f.key
), next AS MATERIALIZED (
    SELECT c.id, k.key
    FROM k
    CROSS JOIN LATERAL (
        SELECT id FROM oncely.jobs
        WHERE state = 'available' AND flow_key IS NOT NULL AND queue = $1 AND flow_key = k.key AND run_at <= now()
          AND (kind || '') <> ALL (ARRAY(SELECT name FROM oncely.pauses WHERE scope = 'kind'))
        ORDER BY priority DESC, run_at, id
        LIMIT k.free
        FOR UPDATE SKIP LOCKED
    ) AS c
    LIMIT $3
), claimed AS (
    -- `attempted_at` is the time the rate limit admitted the start (`now()`, this transaction's
    -- start), not `clock_timestamp()` as in the plain claim: with the later clock, a claim that
    -- waited inside its transaction recorded starts that looked over the rate (56 in a second of a
    -- 50/s limit with a burst of 5, flow_keys::a_rate_limit_of_50…, on a loaded machine).
    UPDATE oncely.jobs AS j
    SET state = 'running', attempt = j.attempt + 1, attempted_at = now(),
        lease_expires_at = now() + make_interval(secs => $4), worker_id = $5
    WHERE j.id = ANY (ARRAY(SELECT id FROM next))
      -- The claim's commit is durable whatever the session's setting (`job/sql.rs`).
      AND "#,
    crate::job::sql::claim_commit_durable!(),
    r#"
    RETURNING j.id, j.kind, j.queue, j.args, j.priority, j.state, j.attempt, j.max_attempts, j.snoozes,
              j.run_at, j.created_at, j.attempted_at, j.finished_at, j.lease_expires_at, j.worker_id,
              j.unique_key, j.errors, j.traceparent
), keys AS (
    UPDATE oncely.flow_keys AS f
    SET last_claimed_at = CASE WHEN n.claimed > 0 THEN clock_timestamp() ELSE f.last_claimed_at END,
        tat = CASE WHEN k.ri IS NULL OR n.claimed = 0 THEN f.tat
                   ELSE k.t0 + make_interval(secs => k.ri * n.claimed) END,
        idle = NOT EXISTS (SELECT 1 FROM oncely.jobs AS a
                           WHERE a.state = 'available' AND a.flow_key IS NOT NULL AND a.queue = $1
                             AND a.flow_key = f.key AND a.id <> ALL (ARRAY(SELECT id FROM next)))
    FROM k CROSS JOIN LATERAL (SELECT count(*) AS claimed FROM next WHERE next.key = k.key) AS n
    WHERE f.queue = $1 AND f.key = k.key
)
SELECT * FROM claimed
"#
);

/// Whether queue `$1` has anything for [`claim_jobs`]: a global limit, or a key that is not idle
/// (one probe of each table's index). A queue with neither costs the worker's short claims this one
/// round trip, not a transaction of five.
const FLOW_ANY: &str = "SELECT EXISTS (SELECT 1 FROM oncely.queue_limits WHERE queue = $1) \
     OR EXISTS (SELECT 1 FROM oncely.flow_keys WHERE queue = $1 AND NOT idle)";

/// Lock queue `$1`'s global limit, if it has one.
const QUEUE_LIMIT_LOCK: &str = "SELECT max_running FROM oncely.queue_limits WHERE queue = $1 FOR NO KEY UPDATE";

/// Running jobs of queue `$1` (a scan of the running jobs' partial index).
const QUEUE_RUNNING: &str = "SELECT count(*) FROM oncely.jobs WHERE state = 'running' AND queue = $1";

/// Seconds until the next start a rate limit of queue `$1` allows, if a key with due work waits.
const FLOW_NEXT_RATE: &str = r#"
SELECT extract(epoch FROM min(f.tat - make_interval(secs => (f.rate_burst - 1) * f.rate_interval_secs)) - now())::float8
FROM oncely.flow_keys AS f
WHERE f.queue = $1 AND NOT f.idle AND f.rate_interval_secs IS NOT NULL
  AND f.tat > now() + make_interval(secs => (f.rate_burst - 1) * f.rate_interval_secs)
"#;

/// What [`claim_jobs`] claimed, and when to try again if a rate limit held jobs back.
#[derive(Debug, Default)]
pub struct FlowClaim {
    /// The claimed jobs, in claim order.
    pub jobs: Vec<Job>,
    /// When a rate limit held back due jobs: how long until the next start is allowed.
    pub retry_in: Option<Duration>,
    /// The queue has a global limit: its completions should NOTIFY the queue (the worker does).
    pub queue_limited: bool,
}

/// Claim up to `limit` jobs of `queue` that the plain claim ([`crate::lease::claim_jobs`]) leaves:
/// jobs with concurrency keys (within their keys' limits and rates, round-robin across keys), and
/// every job of a queue with a global limit (within the limit). The worker calls it when the plain
/// claim returned fewer jobs than it asked for.
#[instrument(skip(pool), err)]
pub async fn claim_jobs(pool: &PgPool, queue: &str, limit: i32, worker_id: &str, lease: Duration) -> Result<FlowClaim> {
    let mut out = FlowClaim::default();
    if limit <= 0
        || !crate::pooler::query_scalar::<bool>(FLOW_ANY).bind(queue).fetch_one(crate::pooler::db(pool)).await?
    {
        return Ok(out);
    }
    let mut tx = pool.begin().await?;
    let mut want = limit;
    let max_running: Option<i32> =
        crate::pooler::query_scalar(QUEUE_LIMIT_LOCK).bind(queue).fetch_optional(&mut *tx).await?;
    if let Some(max) = max_running {
        out.queue_limited = true;
        // A new statement after the lock: it sees the claims of the previous holder.
        let running: i64 = crate::pooler::query_scalar(QUEUE_RUNNING).bind(queue).fetch_one(&mut *tx).await?;
        want = want.min((i64::from(max) - running).clamp(0, i64::from(i32::MAX)) as i32);
        if want > 0 {
            let rows: Vec<JobRow> = crate::pooler::query_as(crate::job::sql::JOB_CLAIM)
                .bind(queue)
                .bind(want)
                .bind(secs(lease))
                .bind(worker_id)
                .bind(true)
                .fetch_all(&mut *tx)
                .await?;
            want -= rows.len() as i32;
            out.jobs.extend(rows_to_jobs(rows)?);
        }
    }
    if want > 0 {
        let keys: Vec<String> =
            crate::pooler::query_scalar(FLOW_KEYS_LOCK).bind(queue).bind(want).fetch_all(&mut *tx).await?;
        if !keys.is_empty() {
            let share = (want / keys.len() as i32).max(1);
            let rows: Vec<JobRow> = crate::pooler::query_as(FLOW_CLAIM)
                .bind(queue)
                .bind(&keys)
                .bind(want)
                .bind(secs(lease))
                .bind(worker_id)
                .bind(share)
                .fetch_all(&mut *tx)
                .await?;
            want -= rows.len() as i32;
            out.jobs.extend(rows_to_jobs(rows)?);
        }
        if want > 0 {
            let wait: Option<f64> = crate::pooler::query_scalar(FLOW_NEXT_RATE).bind(queue).fetch_one(&mut *tx).await?;
            out.retry_in = wait.filter(|w| w.is_finite()).map(|w| Duration::from_secs_f64(w.max(0.001)));
        }
    }
    tx.commit().await?;
    Ok(out)
}

fn check_key(queue: &str, key: &str) -> Result<()> {
    crate::job::check_len("queue name", queue, 128)?;
    crate::job::check_len("concurrency key", key, crate::job::MAX_UNIQUE_KEY_LEN)
}

/// Set (or, with `None`, remove) the global limit of running jobs of `queue`, across every worker.
/// Persisted; holds from the moment it commits (claims already made are not undone: a queue over a
/// new limit claims nothing until it is under it).
#[instrument(skip(executor), err)]
pub async fn set_queue_limit<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    queue: &str,
    max_running: Option<u32>,
) -> Result<()> {
    crate::job::check_len("queue name", queue, 128)?;
    match max_running {
        Some(0) => Err(Error::InvalidInput("a queue limit must be at least 1, got 0".into())),
        Some(n) => {
            crate::pooler::query(
                "WITH s AS (INSERT INTO oncely.queue_limits (queue, max_running) VALUES ($1, $2)
                            ON CONFLICT (queue) DO UPDATE SET max_running = EXCLUDED.max_running)
                 SELECT pg_notify('oncely_jobs', $1)",
            )
            .bind(queue)
            .bind(n.min(i32::MAX as u32) as i32)
            .execute(executor)
            .await?;
            Ok(())
        }
        None => {
            crate::pooler::query(
                "WITH d AS (DELETE FROM oncely.queue_limits WHERE queue = $1) SELECT pg_notify('oncely_jobs', $1)",
            )
            .bind(queue)
            .execute(executor)
            .await?;
            Ok(())
        }
    }
}

/// The global queue limits in force: (queue, max running), by queue.
pub async fn list_queue_limits<'e>(executor: impl sqlx::PgExecutor<'e>) -> Result<Vec<(String, i32)>> {
    let rows = crate::pooler::query("SELECT queue, max_running FROM oncely.queue_limits ORDER BY queue")
        .fetch_all(executor)
        .await?;
    rows.iter().map(|r| Ok((r.try_get("queue")?, r.try_get("max_running")?))).collect()
}

/// Set (or remove) the concurrency limit of `key` in `queue` without enqueueing a job. A job
/// enqueued later with a limit replaces it.
#[instrument(skip(executor), err)]
pub async fn set_concurrency_limit<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    queue: &str,
    key: &str,
    limit: Option<u32>,
) -> Result<()> {
    check_key(queue, key)?;
    if limit == Some(0) {
        return Err(Error::InvalidInput("a concurrency limit must be at least 1, got 0".into()));
    }
    crate::pooler::query(
        "WITH s AS (INSERT INTO oncely.flow_keys (queue, key, concurrency_limit, idle) VALUES ($1, $2, $3, true)
                    ON CONFLICT (queue, key) DO UPDATE SET concurrency_limit = EXCLUDED.concurrency_limit)
         SELECT pg_notify('oncely_jobs', $1)",
    )
    .bind(queue)
    .bind(key)
    .bind(limit.map(|l| l.min(i32::MAX as u32) as i32))
    .execute(executor)
    .await?;
    Ok(())
}

/// A rate limit: at most `count` starts per `period`, in bursts of at most `burst` (GCRA: one start
/// every `period / count`, and up to `burst` at once after an idle spell).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Starts allowed per period.
    pub count: u32,
    /// The period.
    pub period: Duration,
    /// The most starts at once (at least 1).
    pub burst: u32,
}

/// Set (or, with `None`, remove) the rate limit of `key` in `queue`: every job of the queue with
/// that concurrency key (of any kind: a provider shared by several kinds is one key) starts at most
/// at that rate. Jobs over the rate wait, `available`, and use no attempt.
#[instrument(skip(executor), err)]
pub async fn set_rate_limit<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    queue: &str,
    key: &str,
    rate: Option<RateLimit>,
) -> Result<()> {
    check_key(queue, key)?;
    let (interval, burst) = match rate {
        Some(r) => {
            if r.count == 0 || r.period.is_zero() || r.burst == 0 {
                return Err(Error::InvalidInput(format!(
                    "a rate limit needs count, period and burst above zero, got {r:?}"
                )));
            }
            (Some(r.period.as_secs_f64() / f64::from(r.count)), r.burst.min(i32::MAX as u32) as i32)
        }
        None => (None, 1),
    };
    crate::pooler::query(
        "WITH s AS (INSERT INTO oncely.flow_keys (queue, key, rate_interval_secs, rate_burst, idle)
                    VALUES ($1, $2, $3, $4, true)
                    ON CONFLICT (queue, key) DO UPDATE
                    SET rate_interval_secs = EXCLUDED.rate_interval_secs, rate_burst = EXCLUDED.rate_burst)
         SELECT pg_notify('oncely_jobs', $1)",
    )
    .bind(queue)
    .bind(key)
    .bind(interval)
    .bind(burst)
    .execute(executor)
    .await?;
    Ok(())
}

/// Wake the workers of `queues` (one NOTIFY each, delivered when the executor's transaction
/// commits): a worker calls it after completing jobs of a queue with a global limit.
pub async fn notify_queues<'e>(executor: impl sqlx::PgExecutor<'e>, queues: &[String]) -> Result<()> {
    crate::pooler::query(crate::job::sql::QUEUE_NOTIFY_MANY).bind(queues).execute(executor).await?;
    Ok(())
}
