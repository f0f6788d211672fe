//! oncely adapter for the `postgresql-job-queue-benchmarking` long-horizon harness.
//!
//! One long-running process: a producer that enqueues through `oncely_core::enqueue_many` inside a
//! transaction, an `oncely_worker::Worker` with one `handler_fn` handler, a depth observer and a
//! sampler that writes the harness's JSONL records on stdout (logs go to stderr).
//!
//! Env (set by the harness): DATABASE_URL, SCENARIO (only `long_horizon` and `migrate_only`),
//! PRODUCER_MODE (`fixed` | `depth-target`), PRODUCER_RATE, PRODUCER_BATCH_MAX, PRODUCER_BATCH_MS,
//! PRODUCER_PACING (`harness`: read `ENQUEUE <n>` tokens on stdin; anything else: pace locally on
//! wall-clock elapsed time), PRODUCER_RATE_CONTROL_FILE (re-read every tick; the high-load phase
//! writes its rate there), TARGET_DEPTH, WORKER_COUNT, JOB_PAYLOAD_BYTES, JOB_WORK_MS,
//! SAMPLE_EVERY_S, BENCH_INSTANCE_ID, MAX_CONNECTIONS, LATENCY_WINDOW_MS.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use oncely_core::{JobArgs, NewJob};
use oncely_worker::{handler_fn, Worker, WorkerStats};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

/// The system name in every record: `oncely`, or `oncely-headclaim` for the variant that claims
/// from the head of the index every time (`ONCELY_WINDOWED_CLAIMS=0`).
fn system() -> &'static str {
    if windowed_claims() {
        "oncely"
    } else {
        "oncely-headclaim"
    }
}

/// `ONCELY_WINDOWED_CLAIMS=0` turns off oncely's windowed claims (`WorkerConfig::windowed_claims`).
fn windowed_claims() -> bool {
    std::env::var("ONCELY_WINDOWED_CLAIMS").map_or(true, |v| v.trim() != "0")
}
const QUEUE: &str = "oncely_longhorizon_bench";

/// The benchmark job: when it was produced (for pickup latency) and a padding string sized by
/// JOB_PAYLOAD_BYTES.
#[derive(Debug, Serialize, Deserialize)]
struct BenchJob {
    seq: i64,
    produced_at_ms: i64,
    padding: String,
}

impl JobArgs for BenchJob {
    const KIND: &'static str = "long_horizon_job";
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.trim().parse::<f64>().ok()).map(|v| v.max(0.0) as u64).unwrap_or(default)
}

fn env_string(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn epoch_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as i64
}

fn now_iso_ms() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

fn emit(record: serde_json::Value) {
    // One println per record: the harness tails stdout line by line.
    println!("{record}");
}

/// Latency over a trailing window with bounded memory: one HDR histogram per wall-clock second,
/// merged at sample time. Values are recorded in microseconds, 3 significant figures.
struct RollingHdr {
    window_s: u64,
    buckets: VecDeque<(u64, Histogram<u64>)>,
    merged: Histogram<u64>,
}

impl RollingHdr {
    fn new(window: Duration) -> Self {
        RollingHdr { window_s: window.as_secs().max(1), buckets: VecDeque::new(), merged: Self::histogram() }
    }

    fn histogram() -> Histogram<u64> {
        // 1 us .. 1 hour, 3 significant figures; larger values saturate.
        Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
    }

    fn now_s() -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
    }

    fn expire(&mut self, now_s: u64) {
        while let Some((s, _)) = self.buckets.front() {
            if *s + self.window_s <= now_s {
                self.buckets.pop_front();
            } else {
                break;
            }
        }
    }

    fn record_ms(&mut self, ms: f64) {
        let now_s = Self::now_s();
        if self.buckets.back().map(|(s, _)| *s != now_s).unwrap_or(true) {
            self.buckets.push_back((now_s, Self::histogram()));
            self.expire(now_s);
        }
        let us = (ms * 1000.0).round().max(1.0) as u64;
        if let Some((_, h)) = self.buckets.back_mut() {
            h.saturating_record(us);
        }
    }

    /// (p50, p95, p99) in milliseconds over the window, or None when nothing was recorded in it.
    fn snapshot(&mut self) -> Option<(f64, f64, f64)> {
        self.expire(Self::now_s());
        self.merged.reset();
        for (_, h) in &self.buckets {
            let _ = self.merged.add(h);
        }
        if self.merged.is_empty() {
            return None;
        }
        let q = |p: f64| self.merged.value_at_quantile(p) as f64 / 1000.0;
        Some((q(0.50), q(0.95), q(0.99)))
    }
}

fn read_rate(control_file: Option<&str>, default: u64) -> u64 {
    control_file
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .map(|v| v.max(0.0) as u64)
        .unwrap_or(default)
}

struct Shared {
    shutdown: AtomicBool,
    enqueued: AtomicU64,
    handled: AtomicU64,
    enqueue_errors: AtomicU64,
    queue_depth: AtomicU64,
    running_depth: AtomicU64,
    target_rate: AtomicU64,
    claim: Mutex<RollingHdr>,
    end_to_end: Mutex<RollingHdr>,
    producer_call: Mutex<RollingHdr>,
}

async fn enqueue_batch(pool: &PgPool, jobs: &[NewJob]) -> oncely_core::Result<()> {
    // A producer batch commits as one transaction, as an application enqueuing with its own writes would.
    let mut tx = pool.begin().await?;
    oncely_core::enqueue_many(&mut *tx, jobs).await?;
    tx.commit().await?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn producer(
    pool: PgPool,
    shared: Arc<Shared>,
    mut tokens: Option<tokio::sync::mpsc::Receiver<usize>>,
    mode: String,
    base_rate: u64,
    control_file: Option<String>,
    batch_max: usize,
    batch_ms: u64,
    target_depth: u64,
    payload_bytes: usize,
) {
    let padding = "x".repeat(payload_bytes.saturating_sub(48));
    let mut seq: i64 = 0;
    let mut credit = 0.0_f64;
    let mut last_credit = Instant::now();
    let period = Duration::from_millis(batch_ms.max(1));
    let mut next_tick = tokio::time::Instant::now();
    while !shared.shutdown.load(Ordering::Relaxed) {
        let n = if mode == "depth-target" {
            shared.target_rate.store(0, Ordering::Relaxed);
            let depth = shared.queue_depth.load(Ordering::Relaxed);
            if depth >= target_depth {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            ((target_depth - depth) as usize).clamp(1, batch_max)
        } else if let Some(rx) = tokens.as_mut() {
            shared.target_rate.store(read_rate(control_file.as_deref(), base_rate), Ordering::Relaxed);
            match tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
                Ok(Some(n)) => n.min(batch_max),
                Ok(None) => {
                    // stdin closed: fall back to local pacing.
                    tokens = None;
                    last_credit = Instant::now();
                    continue;
                }
                Err(_) => continue,
            }
        } else {
            let rate = read_rate(control_file.as_deref(), base_rate);
            shared.target_rate.store(rate, Ordering::Relaxed);
            next_tick = std::cmp::max(next_tick + period, tokio::time::Instant::now());
            tokio::time::sleep_until(next_tick).await;
            // Credit offered load on real elapsed time, not on the nominal period.
            let now = Instant::now();
            credit += rate as f64 * now.saturating_duration_since(last_credit).as_secs_f64();
            last_credit = now;
            let whole = credit.floor();
            if whole < 1.0 {
                continue;
            }
            credit -= whole;
            (whole as usize).min(batch_max)
        };
        let produced_at_ms = epoch_ms();
        let jobs: Vec<NewJob> = (0..n)
            .map(|i| {
                NewJob::new(&BenchJob { seq: seq + i as i64, produced_at_ms, padding: padding.clone() })
                    .expect("bench args serialize")
                    .queue(QUEUE)
            })
            .collect();
        let started = Instant::now();
        match enqueue_batch(&pool, &jobs).await {
            Ok(()) => {
                shared.producer_call.lock().unwrap().record_ms(started.elapsed().as_secs_f64() * 1000.0);
                shared.enqueued.fetch_add(n as u64, Ordering::Relaxed);
                seq += n as i64;
            }
            Err(e) => {
                shared.enqueue_errors.fetch_add(1, Ordering::Relaxed);
                eprintln!("[oncely] producer enqueue failed ({n} jobs): {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Queue depth from the table the worker claims from: available (not yet claimed) and running jobs.
async fn depth_poller(pool: PgPool, shared: Arc<Shared>) {
    while !shared.shutdown.load(Ordering::Relaxed) {
        let row: Result<(i64, i64), sqlx::Error> = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE state = 'available'), count(*) FILTER (WHERE state = 'running') \
             FROM oncely.jobs WHERE queue = $1 AND state IN ('available', 'running')",
        )
        .bind(QUEUE)
        .fetch_one(&pool)
        .await;
        match row {
            Ok((available, running)) => {
                shared.queue_depth.store(available.max(0) as u64, Ordering::Relaxed);
                shared.running_depth.store(running.max(0) as u64, Ordering::Relaxed);
            }
            Err(e) => eprintln!("[oncely] depth poll failed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
}

async fn sampler(shared: Arc<Shared>, stats_completed: impl Fn() -> u64, every_s: u64, instance: u64, window_s: f64) {
    // First tick on the next wall-clock multiple of SAMPLE_EVERY_S.
    let now_ms = epoch_ms() as u64;
    let period_ms = every_s * 1000;
    let wait_ms = period_ms - (now_ms % period_ms);
    tokio::time::sleep(Duration::from_millis(wait_ms)).await;
    let mut ticker = tokio::time::interval(Duration::from_secs(every_s));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let mut last = Instant::now();
    let mut last_enq = shared.enqueued.load(Ordering::Relaxed);
    let mut last_cmp = stats_completed();
    let mut last_handled = shared.handled.load(Ordering::Relaxed);
    while !shared.shutdown.load(Ordering::Relaxed) {
        ticker.tick().await;
        let now = Instant::now();
        let dt = now.duration_since(last).as_secs_f64().max(0.001);
        last = now;
        let enq = shared.enqueued.load(Ordering::Relaxed);
        let cmp = stats_completed();
        let handled = shared.handled.load(Ordering::Relaxed);
        let t = now_iso_ms();
        let rec = |metric: &str, value: f64, window: f64, subject: &str| {
            emit(json!({
                "t": t, "system": system(), "instance_id": instance, "kind": "adapter",
                "subject_kind": "adapter", "subject": subject, "metric": metric,
                "value": value, "window_s": window,
            }));
        };
        let claim = shared.claim.lock().unwrap().snapshot();
        if let Some((p50, p95, p99)) = claim {
            rec("claim_p50_ms", p50, window_s, "");
            rec("claim_p95_ms", p95, window_s, "");
            rec("claim_p99_ms", p99, window_s, "");
        }
        let e2e = shared.end_to_end.lock().unwrap().snapshot();
        if let Some((p50, p95, p99)) = e2e {
            rec("end_to_end_p50_ms", p50, window_s, "");
            rec("end_to_end_p95_ms", p95, window_s, "");
            rec("end_to_end_p99_ms", p99, window_s, "");
        }
        let call = shared.producer_call.lock().unwrap().snapshot();
        if let Some((p50, p95, p99)) = call {
            rec("producer_call_p50_ms", p50, window_s, "");
            rec("producer_call_p95_ms", p95, window_s, "");
            rec("producer_call_p99_ms", p99, window_s, "");
        }
        let w = every_s as f64;
        rec("enqueue_rate", enq.saturating_sub(last_enq) as f64 / dt, w, "");
        // Completions the worker committed (WorkerStats), not handler returns.
        rec("completion_rate", cmp.saturating_sub(last_cmp) as f64 / dt, w, "");
        rec("handler_return_rate", handled.saturating_sub(last_handled) as f64 / dt, w, "");
        let depth = shared.queue_depth.load(Ordering::Relaxed) as f64;
        let running = shared.running_depth.load(Ordering::Relaxed) as f64;
        rec("queue_depth", depth, 0.0, system());
        rec("running_depth", running, 0.0, system());
        rec("total_backlog", depth + running, 0.0, system());
        rec("producer_target_rate", shared.target_rate.load(Ordering::Relaxed) as f64, 0.0, system());
        rec("enqueue_error_count", shared.enqueue_errors.load(Ordering::Relaxed) as f64, 0.0, system());
        last_enq = enq;
        last_cmp = cmp;
        last_handled = handled;
    }
}

async fn connect(url: &str, max_connections: u32) -> PgPool {
    let mut attempt = 0;
    loop {
        match PgPoolOptions::new().max_connections(max_connections).connect(url).await {
            Ok(pool) => return pool,
            Err(e) if attempt < 30 => {
                attempt += 1;
                eprintln!("[oncely] connect failed (attempt {attempt}): {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => panic!("cannot connect to {url}: {e}"),
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let url = std::env::var("DATABASE_URL").expect("DATABASE_URL must be set");
    let scenario = env_string("SCENARIO", "long_horizon");
    let worker_count = env_u64("WORKER_COUNT", 32).max(1);
    let default_conns = (worker_count * 4 + 48).max(80);
    let max_connections = env_u64("MAX_CONNECTIONS", default_conns) as u32;
    let pool = connect(&url, max_connections).await;
    oncely_core::migrate(&pool).await.expect("oncely migrations");
    if scenario == "migrate_only" {
        eprintln!("[oncely] migrations applied");
        return;
    }
    if scenario != "long_horizon" {
        eprintln!("[oncely] unsupported SCENARIO={scenario}; this adapter implements long_horizon and migrate_only");
        std::process::exit(2);
    }

    let db_name = url.rsplit('/').next().unwrap_or("oncely_bench").split('?').next().unwrap_or("").to_string();
    let schema_version: Option<i64> =
        sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations").fetch_one(&pool).await.ok().flatten();
    emit(json!({
        "kind": "descriptor",
        "system": system(),
        "event_tables": ["oncely.jobs"],
        "event_indexes": ["oncely.jobs_fetch_idx", "oncely.jobs_lease_idx", "oncely.jobs_finished_idx"],
        "extensions": [],
        "version": concat!("oncely-bench ", env!("CARGO_PKG_VERSION"), " (oncely crates by path)"),
        "schema_version": schema_version.map(|v| v.to_string()).unwrap_or_default(),
        "db_name": db_name,
        "started_at": now_iso_ms(),
    }));

    let window = Duration::from_millis(env_u64("LATENCY_WINDOW_MS", 30_000).max(1000));
    let work_ms = env_u64("JOB_WORK_MS", 1);
    let base_rate = env_u64("PRODUCER_RATE", 800);
    let shared = Arc::new(Shared {
        shutdown: AtomicBool::new(false),
        enqueued: AtomicU64::new(0),
        handled: AtomicU64::new(0),
        enqueue_errors: AtomicU64::new(0),
        queue_depth: AtomicU64::new(0),
        running_depth: AtomicU64::new(0),
        target_rate: AtomicU64::new(base_rate),
        claim: Mutex::new(RollingHdr::new(window)),
        end_to_end: Mutex::new(RollingHdr::new(window)),
        producer_call: Mutex::new(RollingHdr::new(window)),
    });

    // The worker, with oncely's default configuration apart from the queue's concurrency (and the
    // windowed claims, with ONCELY_WINDOWED_CLAIMS=0).
    let h = Arc::clone(&shared);
    let worker = Worker::builder(pool.clone())
        .register(handler_fn(move |_ctx, args: BenchJob| {
            let h = Arc::clone(&h);
            async move {
                let picked = (epoch_ms() - args.produced_at_ms).max(0) as f64;
                h.claim.lock().unwrap().record_ms(picked);
                if work_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(work_ms)).await;
                }
                h.end_to_end.lock().unwrap().record_ms((epoch_ms() - args.produced_at_ms).max(0) as f64);
                h.handled.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        }))
        .queue(QUEUE, worker_count as usize)
        .configure(|c| c.windowed_claims = windowed_claims())
        .build()
        .expect("worker config");
    let handle = Arc::new(worker.start());

    // Producer pacing: harness tokens on stdin, or local wall-clock pacing.
    let mode = env_string("PRODUCER_MODE", "fixed");
    let pacing = env_string("PRODUCER_PACING", "adapter");
    let tokens = if pacing == "harness" && mode == "fixed" {
        let (tx, rx) = tokio::sync::mpsc::channel::<usize>(1024);
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { return };
                if let Some(n) = line.trim().strip_prefix("ENQUEUE ").and_then(|r| r.parse::<usize>().ok()) {
                    if n > 0 && tx.blocking_send(n).is_err() {
                        return;
                    }
                }
            }
        });
        Some(rx)
    } else {
        None
    };
    let producer_task = tokio::spawn(producer(
        pool.clone(),
        Arc::clone(&shared),
        tokens,
        mode,
        base_rate,
        std::env::var("PRODUCER_RATE_CONTROL_FILE").ok(),
        env_u64("PRODUCER_BATCH_MAX", 128).max(1) as usize,
        env_u64("PRODUCER_BATCH_MS", 25),
        env_u64("TARGET_DEPTH", 1000),
        env_u64("JOB_PAYLOAD_BYTES", 256) as usize,
    ));
    let depth_task = tokio::spawn(depth_poller(pool.clone(), Arc::clone(&shared)));
    let stats_handle = Arc::clone(&handle);
    let sampler_task = tokio::spawn(sampler(
        Arc::clone(&shared),
        move || WorkerStats::get(&stats_handle.stats().completed),
        env_u64("SAMPLE_EVERY_S", 5).max(1),
        env_u64("BENCH_INSTANCE_ID", 0),
        window.as_secs_f64(),
    ));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    eprintln!("[oncely] shutdown signal received");
    shared.shutdown.store(true, Ordering::Relaxed);
    sampler_task.abort();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = producer_task.await;
    })
    .await;
    depth_task.abort();
    // In-flight jobs get a short grace; the rest are released for another worker.
    let _ = tokio::time::timeout(Duration::from_secs(3), handle.shutdown_within(Duration::from_secs(2))).await;
    let s = handle.stats();
    eprintln!(
        "[oncely] exit: enqueued={} completed={} claimed={} failed={} released={} lease_lost={}",
        shared.enqueued.load(Ordering::Relaxed),
        WorkerStats::get(&s.completed),
        WorkerStats::get(&s.claimed),
        WorkerStats::get(&s.failed),
        WorkerStats::get(&s.released),
        WorkerStats::get(&s.lease_lost),
    );
}
