//! `oncely bench`: enqueue and processing throughput and enqueue-to-start latency, with throughput
//! reported as a ratio to raw single-row INSERT commits measured in the same run on the same
//! server, so the figures mean something on any machine. Everything runs in a scratch database that
//! is created for the run and dropped afterwards.

use std::sync::Arc;
use std::time::{Duration, Instant};

use oncely_core::{JobArgs, NewJob};
use oncely_worker::{handler_fn, Worker, WorkerHandle, WorkerStats};
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection};
use tokio::sync::mpsc;

use crate::Fail;

/// Rounds of the one-by-one phase, each a run of baseline INSERTs then a run of enqueues.
const PAIRED_ROUNDS: usize = 10;
/// Jobs per `enqueue_many` call in the batched phase.
const ENQUEUE_BATCH: usize = 10_000;
/// The queue the worker serves.
const QUEUE: &str = "bench";
/// The queue of the one-by-one phase's jobs: not served, so the drain sees exactly `--jobs` jobs.
const UNSERVED_QUEUE: &str = "bench_unserved";

/// Options of `oncely bench`.
#[derive(clap::Args, Debug)]
pub(crate) struct BenchArgs {
    /// Jobs enqueued in batches and drained by the worker (N). The one-by-one enqueue phase uses N/4.
    #[arg(long, default_value_t = 20_000)]
    jobs: usize,
    /// Worker slots (jobs running at once) on the benchmark queue.
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
    /// Most jobs per claim. Defaults to --concurrency.
    #[arg(long)]
    fetch_batch: Option<usize>,
    /// Samples of the latency phase.
    #[arg(long, default_value_t = 500)]
    latency_samples: usize,
    /// Connections of the concurrent INSERT baseline.
    #[arg(long, default_value_t = 16)]
    baseline_connections: usize,
    /// How long each INSERT baseline runs (30s, 1500ms, ...).
    #[arg(long, default_value = "3s", value_parser = crate::duration::parse)]
    baseline_time: Duration,
    /// Size of the worker's connection pool.
    #[arg(long, default_value_t = 8)]
    worker_connections: u32,
    /// Keep the scratch database instead of dropping it.
    #[arg(long)]
    keep_db: bool,
}

#[derive(Serialize, Deserialize)]
struct BenchNoop {}
impl JobArgs for BenchNoop {
    const KIND: &'static str = "bench_noop";
}

#[derive(Serialize, Deserialize)]
struct BenchLatency {
    seq: u64,
}
impl JobArgs for BenchLatency {
    const KIND: &'static str = "bench_latency";
}

#[derive(Serialize, Deserialize)]
struct BenchPlainStep {}
impl JobArgs for BenchPlainStep {
    const KIND: &'static str = "bench_plain_step";
}

#[derive(Serialize, Deserialize)]
struct BenchTxStep {}
impl JobArgs for BenchTxStep {
    const KIND: &'static str = "bench_tx_step";
}

/// Every figure of one run.
#[derive(Debug)]
struct Report {
    base_one: f64,
    /// The 1-connection baseline measured interleaved with the one-by-one enqueues.
    base_one_paired: f64,
    base_many: f64,
    one_by_one: f64,
    batched: f64,
    processing: f64,
    p50: Duration,
    p99: Duration,
    max: Duration,
    plain_step: f64,
    tx_step: f64,
}

/// The `p`-th quantile (`0.0..=1.0`) of `sorted` by nearest rank: the smallest sample with at least
/// a fraction `p` of the samples at or below it. Zero for no samples.
pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// `1234567.8` → `"1,234,568"`.
fn thousands(n: f64) -> String {
    let s = format!("{:.0}", n.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub(crate) async fn run(server_url: &str, args: BenchArgs) -> Result<(), Fail> {
    if args.jobs < 4 || args.concurrency == 0 || args.baseline_connections == 0 || args.worker_connections < 4 {
        return Err(Fail(
            "bench needs --jobs >= 4, --concurrency >= 1, --baseline-connections >= 1, --worker-connections >= 4".into(),
        ));
    }
    if args.fetch_batch == Some(0) {
        return Err(Fail("--fetch-batch must be at least 1".into()));
    }
    let server: PgConnectOptions = server_url.parse().map_err(|e| Fail(format!("bad database URL: {e}")))?;
    let server = server.disable_statement_logging();
    let mut admin =
        PgConnection::connect_with(&server).await.map_err(|e| Fail(format!("cannot connect to the database: {e}")))?;
    let name = format!("oncely_bench_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&mut admin).await?;
    println!("oncely bench: scratch database {name} (dropped at the end)");
    let db = server.clone().database(&name);

    let result = tokio::select! {
        r = phases(&db, &args) => r,
        _ = tokio::signal::ctrl_c() => Err(Fail("interrupted".into())),
    };

    if args.keep_db {
        println!("kept database {name}");
    } else {
        match sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).execute(&mut admin).await {
            Ok(_) => println!("dropped database {name}"),
            Err(e) => eprintln!("oncely: could not drop the scratch database {name}: {e}"),
        }
    }
    let _ = admin.close().await;
    let report = result?;
    print_summary(&args, &report);
    Ok(())
}

async fn phases(db: &PgConnectOptions, a: &BenchArgs) -> Result<Report, Fail> {
    let n = a.jobs;
    let quarter = n / 4;
    let fetch_batch = a.fetch_batch.unwrap_or(a.concurrency);
    println!(
        "jobs {n}, one-by-one jobs {quarter}, concurrency {}, fetch batch {fetch_batch}, baseline connections {}, \
         baseline time {:.1} s, worker connections {}, latency samples {}",
        a.concurrency,
        a.baseline_connections,
        a.baseline_time.as_secs_f64(),
        a.worker_connections,
        a.latency_samples
    );

    let mut conn = PgConnection::connect_with(db).await?;
    let migrate_pool = PgPoolOptions::new().max_connections(1).connect_with(db.clone()).await?;
    oncely_core::migrate(&migrate_pool).await?;
    migrate_pool.close().await;
    sqlx::query("CREATE TABLE bench_baseline (id bigserial PRIMARY KEY, payload jsonb NOT NULL)")
        .execute(&mut conn)
        .await?;
    sqlx::query("CREATE TABLE bench_effects (job_id bigint PRIMARY KEY)").execute(&mut conn).await?;

    // 1. and 2. Raw single-row INSERT commits.
    let (rows, elapsed) = insert_baseline(db, 1, a.baseline_time).await?;
    let base_one = rows as f64 / elapsed.as_secs_f64();
    println!("[1/7] baseline, 1 connection: {rows} INSERT commits in {:.2} s = {}/s", elapsed.as_secs_f64(), thousands(base_one));
    let (rows, elapsed) = insert_baseline(db, a.baseline_connections, a.baseline_time).await?;
    let base_many = rows as f64 / elapsed.as_secs_f64();
    println!(
        "[2/7] baseline, {} connections: {rows} INSERT commits in {:.2} s = {}/s",
        a.baseline_connections,
        elapsed.as_secs_f64(),
        thousands(base_many)
    );

    // 3. One-by-one enqueue, autocommitted, on one connection, in rounds that alternate with the
    // same number of baseline INSERTs on the same connection: both see the same server state
    // (autovacuum after phase 2's inserts, checkpoints), so their ratio is fair.
    let rounds = PAIRED_ROUNDS.min(quarter.max(1));
    let per_round = quarter / rounds;
    let payload = serde_json::json!({});
    let (mut enqueue_time, mut insert_time) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..per_round {
            sqlx::query("INSERT INTO bench_baseline (payload) VALUES ($1)").bind(&payload).execute(&mut conn).await?;
        }
        insert_time += t.elapsed();
        let t = Instant::now();
        for _ in 0..per_round {
            oncely_core::enqueue(&mut conn, NewJob::new(&BenchNoop {})?.queue(UNSERVED_QUEUE)).await?;
        }
        enqueue_time += t.elapsed();
    }
    let done = (rounds * per_round) as f64;
    let one_by_one = done / enqueue_time.as_secs_f64();
    let base_one_paired = done / insert_time.as_secs_f64();
    println!(
        "[3/7] enqueue one by one: {done} jobs in {:.2} s = {} jobs/s; interleaved with {done} baseline INSERTs = {}/s",
        enqueue_time.as_secs_f64(),
        thousands(one_by_one),
        thousands(base_one_paired)
    );

    // 4. Batched enqueue of the jobs the worker drains.
    let jobs: Vec<NewJob> = (0..n).map(|_| NewJob::new(&BenchNoop {}).map(|j| j.queue(QUEUE))).collect::<Result<_, _>>()?;
    let t = Instant::now();
    for chunk in jobs.chunks(ENQUEUE_BATCH) {
        oncely_core::enqueue_many(&mut conn, chunk).await?;
    }
    let elapsed = t.elapsed();
    drop(jobs);
    let batched = n as f64 / elapsed.as_secs_f64();
    println!(
        "[4/7] enqueue batched ({ENQUEUE_BATCH} per call): {n} jobs in {:.3} s = {} jobs/s",
        elapsed.as_secs_f64(),
        thousands(batched)
    );

    // 5. One worker drains them.
    let worker_pool = PgPoolOptions::new()
        .max_connections(a.worker_connections)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(db.clone())
        .await?;
    // Open every pool connection up front, as in a worker that has been running a while.
    let mut warm = Vec::new();
    for _ in 0..a.worker_connections {
        warm.push(worker_pool.acquire().await?);
    }
    drop(warm);
    let (started_tx, mut started_rx) = mpsc::unbounded_channel::<(u64, Instant)>();
    let worker = Worker::builder(worker_pool.clone())
        .register(handler_fn(|_ctx, _args: BenchNoop| async { Ok(()) }))
        .register(handler_fn(|ctx, _args: BenchPlainStep| async move {
            let _n: u32 = ctx.step("compute").run(|| async { Ok::<_, std::io::Error>(42) }).await?;
            Ok(())
        }))
        .register(handler_fn(|ctx, _args: BenchTxStep| async move {
            let id = ctx.id();
            ctx.step("effect")
                .transactional(|tx| {
                    Box::pin(async move {
                        sqlx::query("INSERT INTO bench_effects VALUES ($1)").bind(id).execute(&mut *tx).await.map(|_| ())
                    })
                })
                .await?;
            Ok(())
        }))
        .register(handler_fn(move |_ctx, args: BenchLatency| {
            let at = Instant::now();
            let tx = started_tx.clone();
            async move {
                let _ = tx.send((args.seq, at));
                Ok(())
            }
        }))
        .queue(QUEUE, a.concurrency)
        .configure(|c| c.fetch_batch = fetch_batch)
        .build()?;
    let t = Instant::now();
    let handle = worker.start();
    let drained = wait_completed(&handle, n as u64).await;
    let elapsed = t.elapsed();
    let result = match drained {
        Ok(()) => after_drain(&mut conn, &handle, &mut started_rx, n, elapsed, a.latency_samples).await,
        Err(e) => Err(e),
    };
    handle.shutdown_within(Duration::from_secs(5)).await;
    worker_pool.close().await;
    let _ = conn.close().await;
    let (processing, (p50, p99, max), (plain_step, tx_step)) = result?;
    Ok(Report { base_one, base_one_paired, base_many, one_by_one, batched, processing, p50, p99, max, plain_step, tx_step })
}

/// Phase 5's check and figure, then phase 6.
async fn after_drain(
    conn: &mut PgConnection,
    handle: &WorkerHandle,
    started_rx: &mut mpsc::UnboundedReceiver<(u64, Instant)>,
    n: usize,
    elapsed: Duration,
    samples: usize,
) -> Result<(f64, (Duration, Duration, Duration), (f64, f64)), Fail> {
    let (completed, total): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state = 'completed'), count(*) FROM oncely.jobs WHERE queue = $1",
    )
    .bind(QUEUE)
    .fetch_one(&mut *conn)
    .await?;
    if completed != n as i64 || total != n as i64 {
        return Err(Fail(format!("after the drain {completed} of {total} jobs on queue {QUEUE} are completed; expected {n} of {n}")));
    }
    let processing = n as f64 / elapsed.as_secs_f64();
    println!(
        "[5/7] processing: {n} jobs completed in {:.3} s = {} jobs/s (checked in SQL: {completed} completed)",
        elapsed.as_secs_f64(),
        thousands(processing)
    );
    let lat = latency(conn, handle, started_rx, n as u64, samples).await?;
    println!(
        "[6/7] latency, idle worker, {samples} samples: p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        ms(lat.0),
        ms(lat.1),
        ms(lat.2)
    );
    let steps = step_costs(conn, handle, n / 2).await?;
    Ok((processing, lat, steps))
}

/// Phase 7: the same worker drains `m` jobs with one memoized step each, then `m` with one
/// transactional step each (its effect: one INSERT).
async fn step_costs(conn: &mut PgConnection, handle: &WorkerHandle, m: usize) -> Result<(f64, f64), Fail> {
    let mut rates = Vec::new();
    for (what, job) in [("memoized step", NewJob::new(&BenchPlainStep {})?), ("transactional step", NewJob::new(&BenchTxStep {})?)] {
        let jobs = vec![job.queue(QUEUE); m];
        let before = WorkerStats::get(&handle.stats().completed);
        let t = Instant::now();
        for chunk in jobs.chunks(ENQUEUE_BATCH) {
            oncely_core::enqueue_many(&mut *conn, chunk).await?;
        }
        wait_completed(handle, before + m as u64).await?;
        let elapsed = t.elapsed();
        let rate = m as f64 / elapsed.as_secs_f64();
        println!("[7/7] 1 {what} per job: {m} jobs in {:.3} s = {} jobs/s", elapsed.as_secs_f64(), thousands(rate));
        rates.push(rate);
    }
    let effects: i64 = sqlx::query_scalar("SELECT count(*) FROM bench_effects").fetch_one(&mut *conn).await?;
    if effects != m as i64 {
        return Err(Fail(format!("the transactional step made {effects} effects for {m} jobs")));
    }
    Ok((rates[0], rates[1]))
}

/// Single-row INSERTs, each its own transaction, from `connections` connections at once for
/// `time`. Returns the rows inserted and the wall time from the common start until the last
/// connection finished its last commit.
async fn insert_baseline(db: &PgConnectOptions, connections: usize, time: Duration) -> Result<(u64, Duration), Fail> {
    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections {
        conns.push(PgConnection::connect_with(db).await?);
    }
    let go = Arc::new(tokio::sync::Barrier::new(connections + 1));
    let mut tasks = Vec::with_capacity(connections);
    for mut conn in conns {
        let go = go.clone();
        tasks.push(tokio::spawn(async move {
            go.wait().await;
            let deadline = Instant::now() + time;
            let payload = serde_json::json!({});
            let mut rows = 0u64;
            while Instant::now() < deadline {
                sqlx::query("INSERT INTO bench_baseline (payload) VALUES ($1)").bind(&payload).execute(&mut conn).await?;
                rows += 1;
            }
            Ok::<_, sqlx::Error>((rows, conn))
        }));
    }
    go.wait().await;
    let t = Instant::now();
    let mut total = 0;
    let mut done = Vec::with_capacity(connections);
    for task in tasks {
        let (rows, conn) = task.await.map_err(|e| Fail(format!("baseline task failed: {e}")))??;
        total += rows;
        done.push(conn);
    }
    let elapsed = t.elapsed();
    for conn in done {
        let _ = conn.close().await;
    }
    Ok((total, elapsed))
}

/// Poll the worker's completed counter every millisecond until it reaches `n`. Gives up when it
/// has not moved for a minute.
async fn wait_completed(handle: &WorkerHandle, n: u64) -> Result<(), Fail> {
    let mut last = (0, Instant::now());
    loop {
        let done = WorkerStats::get(&handle.stats().completed);
        if done >= n {
            return Ok(());
        }
        if done != last.0 {
            last = (done, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(60) {
            return Err(Fail(format!("the worker is stuck at {done} of {n} completed jobs")));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Enqueue one job at a time on `conn` to the idle worker and time until its handler starts.
/// `done` jobs have completed before. Returns p50, p99 and max.
async fn latency(
    conn: &mut PgConnection,
    handle: &WorkerHandle,
    started_rx: &mut mpsc::UnboundedReceiver<(u64, Instant)>,
    done: u64,
    samples: usize,
) -> Result<(Duration, Duration, Duration), Fail> {
    let mut lat = Vec::with_capacity(samples);
    for seq in 0..samples as u64 {
        let job = NewJob::new(&BenchLatency { seq })?.queue(QUEUE);
        let t = Instant::now();
        oncely_core::enqueue(&mut *conn, job).await?;
        let started = loop {
            match tokio::time::timeout(Duration::from_secs(10), started_rx.recv()).await {
                Ok(Some((s, at))) if s == seq => break at,
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return Err(Fail(format!("latency job {seq} did not start within 10 s"))),
            }
        };
        lat.push(started.saturating_duration_since(t));
        // Let its completion be written, so the next sample finds the worker idle.
        let deadline = Instant::now() + Duration::from_secs(10);
        while WorkerStats::get(&handle.stats().completed) < done + seq + 1 {
            if Instant::now() > deadline {
                return Err(Fail(format!("latency job {seq} did not complete within 10 s")));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    lat.sort();
    Ok((percentile(&lat, 0.5), percentile(&lat, 0.99), lat.last().copied().unwrap_or_default()))
}

fn print_summary(a: &BenchArgs, r: &Report) {
    let k = a.baseline_connections;
    let one_ratio = r.one_by_one / r.base_one_paired;
    let proc_ratio = r.processing / r.base_many;
    let latency_ok = r.p50 < Duration::from_millis(2) && r.p99 < Duration::from_millis(5);
    let line = |figure: String, target: &str, ok: bool| println!("{figure:<68}{target:<32}{}", verdict(ok));
    println!();
    println!("summary");
    println!("baseline insert commits/s: 1 conn {}  {k} conn {}", thousands(r.base_one), thousands(r.base_many));
    line(
        format!("enqueue one-by-one:     {:>9} jobs/s ({one_ratio:.2}x interleaved 1-conn)", thousands(r.one_by_one)),
        "target >= 0.90x",
        one_ratio >= 0.9,
    );
    line(format!("enqueue batched:        {:>9} jobs/s", thousands(r.batched)), "target >= 100,000 jobs/s", r.batched >= 100_000.0);
    line(
        format!("processing:             {:>9} jobs/s ({proc_ratio:.2}x {k}-conn baseline)", thousands(r.processing)),
        "target >= 1.50x",
        proc_ratio >= 1.5,
    );
    line(
        format!("enqueue->start latency: p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms", ms(r.p50), ms(r.p99), ms(r.max)),
        "target p50 < 2 ms, p99 < 5 ms",
        latency_ok,
    );
    println!(
        "1 memoized step per job:      {:>9} jobs/s ({:.2}x no-op jobs)",
        thousands(r.plain_step),
        r.plain_step / r.processing
    );
    println!(
        "1 transactional step per job: {:>9} jobs/s ({:.2}x no-op jobs)",
        thousands(r.tx_step),
        r.tx_step / r.processing
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 0.5), Duration::from_millis(50));
        assert_eq!(percentile(&v, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&v, 1.0), Duration::from_millis(100));
        assert_eq!(percentile(&v, 0.0), Duration::from_millis(1));
        let few = [Duration::from_millis(3), Duration::from_millis(9)];
        assert_eq!(percentile(&few, 0.5), Duration::from_millis(3));
        assert_eq!(percentile(&few, 0.99), Duration::from_millis(9));
        assert_eq!(percentile(&[Duration::from_millis(4)], 0.99), Duration::from_millis(4));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }

    #[test]
    fn formats_thousands() {
        assert_eq!(thousands(1_234_567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(0.2), "0");
    }
}
