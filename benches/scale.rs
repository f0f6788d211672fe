//! Scale: the drain rate and the enqueue-to-start latency of an empty queue, then of the same queue
//! next to 10 million retained finished jobs, 1 million ledger records and 100,000 jobs scheduled
//! in the future, then while the 10 million are pruned. Each figure is reported as a ratio to the
//! empty queue's in the same run. Not a test.
//!
//! `scripts/with-postgres cargo bench --bench scale`
//!
//! Sizes come from the environment: `ONCELY_SCALE_FINISHED` (10,000,000), `ONCELY_SCALE_LEDGER`
//! (1,000,000), `ONCELY_SCALE_SCHEDULED` (100,000), `ONCELY_SCALE_JOBS` (jobs per drain, 20,000).
#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use oncely::worker::{WorkerHandle, WorkerStats};
use oncely::{handler_fn, JobArgs, NewJob, Worker};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::mpsc;

const QUEUE: &str = "scale";
const CONCURRENCY: usize = 64;
const WORKER_CONNECTIONS: u32 = 16;
const LATENCY_SAMPLES: usize = 200;
/// Rows per pruning statement: the maintenance service's batch.
const PRUNE_BATCH: i64 = 10_000;

#[derive(Serialize, Deserialize)]
struct Noop {}
impl JobArgs for Noop {
    const KIND: &'static str = "scale_noop";
}

#[derive(Serialize, Deserialize)]
struct Timed {}
impl JobArgs for Timed {
    const KIND: &'static str = "scale_timed";
}

fn size(var: &str, default: i64) -> i64 {
    std::env::var(var).ok().and_then(|v| v.replace('_', "").parse().ok()).unwrap_or(default)
}

/// A worker on `pool` running no-op jobs and reporting when each timed job starts.
fn worker(pool: &PgPool, started: mpsc::UnboundedSender<Instant>) -> WorkerHandle {
    let started = Arc::new(started);
    Worker::builder(pool.clone())
        .register(handler_fn(|_ctx, _: Noop| async { Ok(()) }))
        .register(handler_fn(move |_ctx, _: Timed| {
            let started = started.clone();
            async move {
                let _ = started.send(Instant::now());
                Ok(())
            }
        }))
        .queue(QUEUE, CONCURRENCY)
        .configure(|c| {
            c.fetch_batch = CONCURRENCY;
            // The bench prunes on its own schedule, in the third phase.
            c.maintenance = false;
        })
        .build()
        .unwrap()
        .start()
}

async fn wait_completed(handle: &WorkerHandle, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while WorkerStats::get(&handle.stats().completed) < n {
        assert!(Instant::now() < deadline, "the worker did not complete {n} jobs in time");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Enqueue `jobs` no-op jobs with no worker running, then drain them with a fresh worker: jobs/s.
async fn drain(pool: &PgPool, worker_pool: &PgPool, jobs: i64) -> f64 {
    let batch: Vec<NewJob> = (0..jobs).map(|_| NewJob::new(&Noop {}).unwrap().queue(QUEUE)).collect();
    for chunk in batch.chunks(10_000) {
        oncely::enqueue_many(pool, chunk).await.unwrap();
    }
    let (tx, _rx) = mpsc::unbounded_channel();
    let start = Instant::now();
    let handle = worker(worker_pool, tx);
    wait_completed(&handle, jobs as u64).await;
    let rate = jobs as f64 / start.elapsed().as_secs_f64();
    handle.shutdown().await;
    rate
}

/// Enqueue-to-start latency, one job at a time to an idle worker: (p50, p99) in ms.
async fn latency(pool: &PgPool, worker_pool: &PgPool) -> (f64, f64) {
    let (tx, mut started) = mpsc::unbounded_channel();
    let handle = worker(worker_pool, tx);
    let mut samples = Vec::with_capacity(LATENCY_SAMPLES);
    for i in 0..LATENCY_SAMPLES {
        let mut tx = pool.begin().await.unwrap();
        oncely::enqueue(&mut *tx, NewJob::new(&Timed {}).unwrap().queue(QUEUE)).await.unwrap();
        let before_commit = Instant::now();
        tx.commit().await.unwrap();
        let at = tokio::time::timeout(Duration::from_secs(30), started.recv()).await.unwrap().unwrap();
        samples.push(at.saturating_duration_since(before_commit));
        wait_completed(&handle, i as u64 + 1).await;
    }
    handle.shutdown().await;
    samples.sort();
    let pct = |p: f64| {
        let rank = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
        samples[rank - 1].as_secs_f64() * 1000.0
    };
    (pct(0.5), pct(0.99))
}

#[derive(Debug, Clone, Copy)]
struct Figures {
    drain: f64,
    p50: f64,
    p99: f64,
}

async fn measure(label: &str, pool: &PgPool, worker_pool: &PgPool, jobs: i64) -> Figures {
    let drain = drain(pool, worker_pool, jobs).await;
    let (p50, p99) = latency(pool, worker_pool).await;
    println!("[{label}] drain {jobs} jobs: {drain:.0} jobs/s; enqueue -> start p50 {p50:.2} ms, p99 {p99:.2} ms");
    Figures { drain, p50, p99 }
}

async fn exec(pool: &PgPool, sql: &str) -> Duration {
    let start = Instant::now();
    sqlx::query(sql).execute(pool).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    start.elapsed()
}

#[tokio::main]
async fn main() {
    let finished = size("ONCELY_SCALE_FINISHED", 10_000_000);
    let ledger = size("ONCELY_SCALE_LEDGER", 1_000_000);
    let scheduled = size("ONCELY_SCALE_SCHEDULED", 100_000);
    let jobs = size("ONCELY_SCALE_JOBS", 20_000);
    let server = std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let name = format!("oncely_scale_bench_{}", std::process::id());
    let mut admin = PgConnection::connect(&server).await.expect("DATABASE_URL must reach PostgreSQL");
    sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&mut admin).await.unwrap();
    let url = oncely::testkit::url_with_database(&server, &name);
    let pool = PgPoolOptions::new().max_connections(4).connect(&url).await.unwrap();
    let worker_pool = PgPoolOptions::new().max_connections(WORKER_CONNECTIONS).connect(&url).await.unwrap();
    oncely::migrate(&pool).await.unwrap();
    println!(
        "scale bench: database {name}; {finished} finished jobs, {ledger} ledger records, {scheduled} scheduled \
         jobs; {jobs} jobs per drain at concurrency {CONCURRENCY}, {LATENCY_SAMPLES} latency samples"
    );

    // (1) The empty queue, analyzed.
    exec(&pool, "ANALYZE oncely.jobs").await;
    exec(&pool, "ANALYZE oncely.ledger").await;
    let empty = measure("1/3 empty", &pool, &worker_pool, jobs).await;

    // (2) Retained history: finished jobs (completed, a few dead and cancelled) spread over a week,
    // ledger records of finished steps, and jobs scheduled over the next day.
    let fill = Instant::now();
    exec(
        &pool,
        &format!(
            "INSERT INTO oncely.jobs (kind, queue, args, state, attempt, created_at, attempted_at, finished_at)
             SELECT 'scale_noop', '{QUEUE}', jsonb_build_object('n', g),
                    CASE WHEN g % 100 = 0 THEN 'dead' WHEN g % 100 = 1 THEN 'cancelled' ELSE 'completed' END,
                    1, t, t, t
             FROM generate_series(1, {finished}) AS g,
                  LATERAL (SELECT now() - interval '2 hours' - (g % 604800) * interval '1 second' AS t) AS at"
        ),
    )
    .await;
    exec(
        &pool,
        &format!(
            "INSERT INTO oncely.ledger (namespace, key, state, owner, output, expires_at)
             SELECT 'step', 'job:' || g || ':generate', 'completed', 'job:' || g || ':1', '{{\"ok\":true}}',
                    now() + interval '1 day'
             FROM generate_series(1, {ledger}) AS g"
        ),
    )
    .await;
    exec(
        &pool,
        &format!(
            "INSERT INTO oncely.jobs (kind, queue, run_at)
             SELECT 'scale_noop', '{QUEUE}', now() + interval '1 hour' + (g % 86400) * interval '1 second'
             FROM generate_series(1, {scheduled}) AS g"
        ),
    )
    .await;
    let vacuum = exec(&pool, "VACUUM ANALYZE oncely.jobs").await + exec(&pool, "VACUUM ANALYZE oncely.ledger").await;
    let table: String = sqlx::query_scalar("SELECT pg_size_pretty(pg_total_relation_size('oncely.jobs'))")
        .fetch_one(&pool)
        .await
        .unwrap();
    println!(
        "filled in {:.1?} (then VACUUM ANALYZE in {vacuum:.1?}); oncely.jobs is {table} with its indexes",
        fill.elapsed()
    );
    let full = measure("2/3 with history", &pool, &worker_pool, jobs).await;

    // (3) Pruning every finished job while the queue runs: batches of PRUNE_BATCH, as the
    // maintenance service deletes them, back to back.
    let prune_pool = PgPoolOptions::new().max_connections(1).connect(&url).await.unwrap();
    let pruning = tokio::spawn(async move {
        let start = Instant::now();
        let mut deleted = 0u64;
        loop {
            let n = oncely::core::maintenance::prune_finished(&prune_pool, Duration::ZERO, Duration::ZERO, PRUNE_BATCH)
                .await
                .unwrap();
            deleted += n;
            if n == 0 {
                return (deleted, start.elapsed());
            }
        }
    });
    let during = measure("3/3 while pruning", &pool, &worker_pool, jobs).await;
    let still_pruning = !pruning.is_finished();
    let (deleted, took) = pruning.await.unwrap();
    println!(
        "pruned {deleted} finished jobs in {took:.1?} = {:.0} rows/s{}",
        deleted as f64 / took.as_secs_f64(),
        if still_pruning {
            " (the measurement ended before the pruning did)"
        } else {
            " (it ended before the measurement)"
        }
    );

    worker_pool.close().await;
    pool.close().await;
    sqlx::query(&format!("DROP DATABASE \"{name}\" WITH (FORCE)")).execute(&mut admin).await.unwrap();

    println!("\nsummary (ratios to the empty queue of this run; latency ratios above 1 are slower)");
    for (label, f) in [("empty", empty), ("with history", full), ("while pruning", during)] {
        println!(
            "  {label:<14} drain {:>7.0} jobs/s {:>5.2}x   p50 {:>6.2} ms {:>5.2}x   p99 {:>6.2} ms {:>5.2}x",
            f.drain,
            f.drain / empty.drain,
            f.p50,
            f.p50 / empty.p50,
            f.p99,
            f.p99 / empty.p99
        );
    }
}
