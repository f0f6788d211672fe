//! Flow control held in PostgreSQL across workers (issue 16): concurrency keys, global queue
//! limits, rate limits and fairness across keys. Real PostgreSQL; four workers on separate pools;
//! running counts sampled from another connection; a worker process SIGKILLed while it holds slots.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use oncely::flow::{self, RateLimit};
use oncely::{enqueue, enqueue_many, handler_fn, JobArgs, JobState, NewJob};
use serde::{Deserialize, Serialize};
use sqlx::{Connection, PgPool};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Work {
    tenant: u32,
    n: u32,
}
impl JobArgs for Work {
    const KIND: &'static str = "work";
}

/// How long each job works (its handler's own duration, not a synchronisation).
const JOB_TIME: Duration = Duration::from_millis(100);

/// In-process counts: handlers running per tenant now, the most ever at once, runs per job.
#[derive(Default)]
struct Tally {
    now: Mutex<HashMap<u32, u32>>,
    max: Mutex<HashMap<u32, u32>>,
    total_now: AtomicU64,
    total_max: AtomicU64,
    runs: Mutex<HashMap<(u32, u32), u32>>,
}

fn working(tally: Arc<Tally>, time: Duration) -> impl oncely::Handler<Work> {
    handler_fn(move |_ctx, w: Work| {
        let tally = tally.clone();
        async move {
            {
                let mut now = tally.now.lock().unwrap();
                let c = now.entry(w.tenant).or_default();
                *c += 1;
                let mut max = tally.max.lock().unwrap();
                let m = max.entry(w.tenant).or_default();
                *m = (*m).max(*c);
                *tally.runs.lock().unwrap().entry((w.tenant, w.n)).or_default() += 1;
            }
            let total = tally.total_now.fetch_add(1, Ordering::SeqCst) + 1;
            tally.total_max.fetch_max(total, Ordering::SeqCst);
            tokio::time::sleep(time).await;
            tally.total_now.fetch_sub(1, Ordering::SeqCst);
            *tally.now.lock().unwrap().get_mut(&w.tenant).unwrap() -= 1;
            Ok(())
        }
    })
}

/// Sample, every 2 ms from its own connection until `stop`, the running jobs per key (and in all,
/// under the key `""`) of `queue`; returns the most seen per key and the number of samples.
fn sample(
    pool: PgPool,
    queue: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(HashMap<String, i64>, u64)> {
    tokio::spawn(async move {
        let mut max: HashMap<String, i64> = HashMap::new();
        let mut samples = 0;
        while !stop.load(Ordering::SeqCst) {
            let rows: Vec<(Option<String>, i64)> = sqlx::query_as(
                "SELECT coalesce(flow_key, ''), count(*) FROM oncely.jobs WHERE state = 'running' AND queue = $1
                 GROUP BY ROLLUP (coalesce(flow_key, ''))",
            )
            .bind(queue)
            .fetch_all(&pool)
            .await
            .unwrap();
            for (key, n) in rows {
                let m = max.entry(key.unwrap_or_else(|| "*".into())).or_default();
                *m = (*m).max(n);
            }
            samples += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        (max, samples)
    })
}

/// Limit 2 over 200 jobs of 10 tenants, four workers of 8 slots each (32 slots, 20 allowed): never
/// more than 2 running per tenant (sampled every 2 ms in the database, and counted in the
/// handlers), every job run once, and the drain as fast as the limit allows: each tenant's 20 jobs
/// need 10 rounds of `JOB_TIME` at 2 at once; the bound allows 2.5 times that plus a second. The
/// workers poll once a minute, so only the NOTIFY of a finishing keyed job can start the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_concurrency_key_holds_its_limit_across_four_workers_and_drains_at_the_limit() {
    init_tracing();
    let db = TestDb::new().await;
    let jobs: Vec<NewJob> = (0..200)
        .map(|i| {
            let tenant = i % 10;
            NewJob::new(&Work { tenant, n: i })
                .unwrap()
                .queue("reports")
                .concurrency_key(format!("tenant:{tenant}"), Some(2))
        })
        .collect();
    enqueue_many(db.pool(), &jobs).await.unwrap();
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample(db.new_pool(1).await, "reports", stop.clone());
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..4 {
        workers.push(
            builder(db.new_pool(4).await)
                .configure(|c| c.poll_interval = Duration::from_secs(60))
                .register(working(tally.clone(), JOB_TIME))
                .queue("reports", 8)
                .build()
                .unwrap()
                .start(),
        );
    }
    wait_all_finished(db.pool(), Duration::from_secs(60)).await;
    let drained = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let (max, samples) = sampler.await.unwrap();
    for w in &workers {
        w.shutdown().await;
    }
    assert_eq!(count(db.pool(), JobState::Completed).await, 200);
    let runs = tally.runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 200);
    assert!(runs.values().all(|&n| n == 1), "a job ran twice: {runs:?}");
    let in_handlers = tally.max.lock().unwrap().clone();
    assert_eq!(in_handlers.len(), 10);
    assert!(in_handlers.values().all(|&m| m <= 2), "more than 2 at once in the handlers: {in_handlers:?}");
    assert!(samples > 20, "only {samples} samples");
    for t in 0..10 {
        let seen = max.get(&format!("tenant:{t}")).copied().unwrap_or(0);
        assert!(seen <= 2, "tenant {t}: {seen} running at once");
    }
    assert!(max.get("*").copied().unwrap_or(0) <= 20);
    // The limit allows 2 per tenant at once: 10 rounds of JOB_TIME.
    let ideal = JOB_TIME * 10;
    let bound = ideal * 5 / 2 + Duration::from_secs(1);
    eprintln!("concurrency key limit 2: drained 200 jobs in {drained:?} (limit allows {ideal:?}; bound {bound:?}); max seen {max:?}, {samples} samples");
    assert!(drained <= bound, "drained in {drained:?}, the limit allows {ideal:?} (bound {bound:?})");
    // The slots were used: the handlers ran up to 2 at once for every tenant.
    assert!(in_handlers.values().all(|&m| m == 2), "a tenant never used both slots: {in_handlers:?}");
}

const LEASE: Duration = Duration::from_secs(2);

/// Runs only as the child process of the slot-recovery test: a worker that takes the slots of key
/// `tenant:1` and hangs in its jobs until killed.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "spawned by flow_keys tests as a child process"]
async fn child_slot_holder() {
    let Ok(url) = std::env::var("ONCELY_FLOW_CHILD_URL") else { return };
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    run_child_worker(
        oncely::Worker::builder(pool)
            .register(handler_fn(|ctx, _w: Work| async move {
                sqlx::query("INSERT INTO started (job_id) VALUES ($1)").bind(ctx.id()).execute(ctx.pool()).await?;
                std::future::pending::<()>().await;
                Ok(())
            }))
            .queue("reports", 4)
            .lease(LEASE),
    )
    .await;
}

/// A worker process holds both slots of a key (limit 2) and is SIGKILLed: nothing else of the key
/// starts while its leases run; then the slots come back with the leases (the rescue), and the
/// key's other jobs run on another worker, never more than 2 at once.
#[tokio::test(flavor = "multi_thread")]
async fn the_slots_of_a_killed_worker_come_back_with_its_lease() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    sqlx::query("CREATE TABLE started (job_id bigint)").execute(pool).await.unwrap();
    let jobs: Vec<NewJob> = (0..6)
        .map(|n| NewJob::new(&Work { tenant: 1, n }).unwrap().queue("reports").concurrency_key("tenant:1", Some(2)))
        .collect();
    enqueue_many(pool, &jobs).await.unwrap();
    let mut child = spawn_child(concat!(module_path!(), "::child_slot_holder"), &[("ONCELY_FLOW_CHILD_URL", db.url())]);
    eventually(Duration::from_secs(30), "the child to hold both slots", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM started").fetch_one(pool).await.unwrap();
        (n == 2).then_some(())
    })
    .await;
    // The child has 4 free slots of its own, but the key's limit holds the rest back.
    assert_eq!(count(pool, JobState::Running).await, 2);
    child.start_kill().unwrap();
    assert!(!child.wait().await.unwrap().success());
    let killed_at = Instant::now();

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample(db.new_pool(1).await, "reports", stop.clone());
    let w = builder(db.new_pool(4).await)
        .register(working(tally.clone(), Duration::from_millis(20)))
        .queue("reports", 4)
        .lease(LEASE)
        .build()
        .unwrap()
        .start();
    // The first run in this worker is a job the child held or one it could not start; either way
    // a slot came back.
    eventually(Duration::from_secs(30), "a job of the key to start again", || async {
        (!tally.runs.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    let back_in = killed_at.elapsed();
    wait_all_finished(pool, Duration::from_secs(30)).await;
    stop.store(true, Ordering::SeqCst);
    let (max, _) = sampler.await.unwrap();
    w.shutdown().await;
    assert_eq!(count(pool, JobState::Completed).await, 6);
    assert!(max.get("tenant:1").copied().unwrap_or(0) <= 2, "{max:?}");
    assert!(tally.max.lock().unwrap()[&1] <= 2);
    let rescued: i64 =
        sqlx::query_scalar("SELECT count(*) FROM oncely.jobs WHERE errors @> '[{\"kind\": \"lease_expired\"}]'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(rescued, 2, "the two jobs the killed worker held were rescued");
    // The leases were extended at most LEASE before the kill; the rescuer runs every 200 ms once
    // elected; the rescue's state change NOTIFYs the queue.
    let bound = LEASE + Duration::from_secs(2);
    eprintln!("slots back {back_in:?} after SIGKILL (lease {LEASE:?}, bound {bound:?})");
    assert!(back_in <= bound, "slots came back after {back_in:?}, bound {bound:?}");
}

/// A global limit of 5 on a queue served by four workers of 8 slots: never more than 5 running
/// (sampled and counted in the handlers), and 5 at once reached. Removing the limit lets the
/// remaining jobs use every slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_global_queue_limit_holds_across_four_workers() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    flow::set_queue_limit(pool, "reports", Some(5)).await.unwrap();
    assert_eq!(flow::list_queue_limits(pool).await.unwrap(), vec![("reports".to_owned(), 5)]);
    assert!(matches!(flow::set_queue_limit(pool, "reports", Some(0)).await, Err(oncely::Error::InvalidInput(_))));
    let jobs: Vec<NewJob> =
        (0..60).map(|n| NewJob::new(&Work { tenant: n % 3, n }).unwrap().queue("reports")).collect();
    enqueue_many(pool, &jobs).await.unwrap();
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample(db.new_pool(1).await, "reports", stop.clone());
    let mut workers = Vec::new();
    for _ in 0..4 {
        workers.push(
            builder(db.new_pool(4).await)
                .configure(|c| c.poll_interval = Duration::from_secs(60))
                .register(working(tally.clone(), Duration::from_millis(30)))
                .queue("reports", 8)
                .build()
                .unwrap()
                .start(),
        );
    }
    wait_all_finished(pool, Duration::from_secs(60)).await;
    stop.store(true, Ordering::SeqCst);
    let (max, samples) = sampler.await.unwrap();
    assert_eq!(count(pool, JobState::Completed).await, 60);
    assert!(samples > 10);
    let seen = max.get("*").copied().unwrap_or(0);
    let in_handlers = tally.total_max.load(Ordering::SeqCst);
    eprintln!("queue limit 5: max running seen {seen}, in handlers {in_handlers}");
    assert!(seen <= 5 && in_handlers <= 5, "seen {seen}, handlers {in_handlers}");
    assert_eq!(in_handlers, 5, "the limit's 5 slots were used at once");

    // Without the limit, the 32 slots are used.
    flow::set_queue_limit(pool, "reports", None).await.unwrap();
    let tally2 = Arc::new(Tally::default());
    for w in &workers {
        w.shutdown().await;
    }
    let (open, gate) = tokio::sync::watch::channel(false);
    let jobs: Vec<NewJob> = (0..40).map(|n| NewJob::new(&Work { tenant: 0, n }).unwrap().queue("reports")).collect();
    enqueue_many(pool, &jobs).await.unwrap();
    let mut workers = Vec::new();
    for _ in 0..4 {
        let gate = gate.clone();
        let tally2 = tally2.clone();
        workers.push(
            builder(db.new_pool(4).await)
                .register(handler_fn(move |_ctx, _w: Work| {
                    let mut gate = gate.clone();
                    let tally2 = tally2.clone();
                    async move {
                        tally2.total_now.fetch_add(1, Ordering::SeqCst);
                        gate.wait_for(|o| *o).await.unwrap();
                        Ok(())
                    }
                }))
                .queue("reports", 8)
                .build()
                .unwrap()
                .start(),
        );
    }
    eventually(Duration::from_secs(30), "32 running without the limit", || async {
        (tally2.total_now.load(Ordering::SeqCst) == 32).then_some(())
    })
    .await;
    open.send(true).unwrap();
    wait_all_finished(pool, Duration::from_secs(30)).await;
    for w in &workers {
        w.shutdown().await;
    }
}

/// Rate limit 50 per second (burst 5) on a key shared by two kinds... of one handler here, for 10
/// seconds of work (500 jobs, more than 4 workers could start at once): count starts per second
/// from `attempted_at`, and over every sliding one-second window: never above 50 + burst (GCRA's
/// bound). Nothing failed or used an extra attempt. The achieved rate is reported and must be at
/// least 80% of the configured one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_limit_of_50_per_second_holds_over_10_seconds() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    const BURST: u32 = 5;
    flow::set_rate_limit(
        pool,
        "calls",
        "provider:llm",
        Some(RateLimit { count: 50, period: Duration::from_secs(1), burst: BURST }),
    )
    .await
    .unwrap();
    let jobs: Vec<NewJob> = (0..500)
        .map(|n| NewJob::new(&Work { tenant: n % 7, n }).unwrap().queue("calls").concurrency_key("provider:llm", None))
        .collect();
    enqueue_many(pool, &jobs).await.unwrap();
    let tally = Arc::new(Tally::default());
    let mut workers = Vec::new();
    for _ in 0..4 {
        workers.push(
            builder(db.new_pool(4).await)
                .configure(|c| c.poll_interval = Duration::from_secs(60))
                .register(working(tally.clone(), Duration::from_millis(1)))
                .queue("calls", 16)
                .build()
                .unwrap()
                .start(),
        );
    }
    wait_all_finished(pool, Duration::from_secs(40)).await;
    for w in &workers {
        w.shutdown().await;
    }
    assert_eq!(count(pool, JobState::Completed).await, 500);
    let attempts: i32 = sqlx::query_scalar("SELECT max(attempt) FROM oncely.jobs").fetch_one(pool).await.unwrap();
    assert_eq!(attempts, 1, "a job over the rate used an attempt");
    let per_second: Vec<(f64, i64)> = sqlx::query_as(
        "SELECT floor(extract(epoch FROM attempted_at))::float8 AS s, count(*) FROM oncely.jobs GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let starts: Vec<f64> =
        sqlx::query_scalar("SELECT extract(epoch FROM attempted_at)::float8 FROM oncely.jobs ORDER BY attempted_at")
            .fetch_all(pool)
            .await
            .unwrap();
    let mut worst = 0;
    let mut j = 0;
    for i in 0..starts.len() {
        while starts[j] < starts[i] - 1.0 + 1e-9 {
            j += 1;
        }
        // Starts in (starts[i] - 1 s, starts[i]].
        worst = worst.max(i - j + 1);
    }
    let span = starts.last().unwrap() - starts.first().unwrap();
    let achieved = (starts.len() - BURST as usize) as f64 / span;
    eprintln!(
        "rate limit 50/s burst {BURST}: per second {:?}; worst sliding second {worst}; achieved {achieved:.1}/s over {span:.2} s",
        per_second.iter().map(|(_, n)| *n).collect::<Vec<_>>()
    );
    assert!(per_second.iter().all(|(_, n)| *n <= 50 + i64::from(BURST)), "{per_second:?}");
    assert!(worst <= 50 + BURST as usize, "{worst} starts in one second");
    assert!(achieved <= 50.0 * 1.01, "achieved {achieved}");
    assert!(achieved >= 40.0, "achieved only {achieved}/s of 50/s");
}

/// Fairness: a tenant's 20,000-job backlog (the issue says 100,000; 20,000 keeps the test short)
/// is draining on two workers when another tenant enqueues 10 jobs. Count the big tenant's claims
/// between the small tenant's enqueue and its first start: round robin across keys bounds it by a
/// claim or two per worker (batches of at most the fetch batch), not by the backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_big_backlog_does_not_starve_a_small_tenant() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    let big: Vec<NewJob> = (0..20_000)
        .map(|n| NewJob::new(&Work { tenant: 1, n }).unwrap().queue("reports").concurrency_key("tenant:1", None))
        .collect();
    for chunk in big.chunks(5000) {
        enqueue_many(pool, chunk).await.unwrap();
    }
    let tally = Arc::new(Tally::default());
    let mut workers = Vec::new();
    for _ in 0..2 {
        workers.push(
            builder(db.new_pool(4).await)
                .register(working(tally.clone(), Duration::from_millis(1)))
                .queue("reports", 10)
                .build()
                .unwrap()
                .start(),
        );
    }
    eventually(Duration::from_secs(30), "the backlog to drain a while", || async {
        (count(pool, JobState::Completed).await >= 500).then_some(())
    })
    .await;
    let small: Vec<NewJob> = (0..10)
        .map(|n| NewJob::new(&Work { tenant: 2, n }).unwrap().queue("reports").concurrency_key("tenant:2", None))
        .collect();
    enqueue_many(pool, &small).await.unwrap();
    wait_all_finished(pool, Duration::from_secs(120)).await;
    for w in &workers {
        w.shutdown().await;
    }
    let (before_first, before_last): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE b.attempted_at > s.created_at AND b.attempted_at < s.first),
                count(*) FILTER (WHERE b.attempted_at > s.created_at AND b.attempted_at < s.last)
         FROM oncely.jobs AS b,
              (SELECT min(created_at) AS created_at, min(attempted_at) AS first, max(attempted_at) AS last
               FROM oncely.jobs WHERE flow_key = 'tenant:2') AS s
         WHERE b.flow_key = 'tenant:1'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let remaining_at_enqueue: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM oncely.jobs WHERE flow_key = 'tenant:1'
           AND attempted_at > (SELECT min(created_at) FROM oncely.jobs WHERE flow_key = 'tenant:2')",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    eprintln!(
        "fairness: {before_first} claims of the 20,000-job tenant passed between the small tenant's enqueue and its \
         first start, {before_last} before its last ({remaining_at_enqueue} of the backlog were left at its enqueue)"
    );
    assert!(remaining_at_enqueue > 10_000, "the backlog was not there to starve anyone");
    // Two workers, batches of at most 10 (their slots): one claim each at most in flight.
    assert!(before_first <= 40, "{before_first} claims of the big tenant passed first");
    assert!(before_last <= 200, "{before_last} claims of the big tenant passed before the small tenant finished");
}

/// A plain job starts without waiting for the flow claim that follows a short plain claim: with
/// `oncely.flow_keys` locked from another connection, that flow claim cannot proceed, and the
/// job claimed by the plain claim just before it must still run and complete. (The fetcher used
/// to hand a claim's plain jobs out only after the flow claim, a round trip later on a healthy
/// database, and never while the flow claim waited.)
#[tokio::test(flavor = "multi_thread")]
async fn a_plain_job_starts_before_the_flow_claim_beside_it_returns() {
    init_tracing();
    let db = TestDb::new().await;
    let ran = Arc::new(AtomicU64::new(0));
    let counted = ran.clone();
    let worker = builder(db.new_pool(6).await)
        .configure(|c| {
            c.maintenance = false;
            c.scheduler = false;
            // Only a NOTIFY wakes the fetcher once it is idle: no poll may start a flow claim
            // that the lock below would hold before the job exists.
            c.poll_interval = Duration::from_secs(60);
        })
        .register(handler_fn(move |_ctx, _n: Noop| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        }))
        .queue("default", 4)
        .build()
        .unwrap();
    let handle = worker.start();
    // The fetcher's claims at its start and after the listener's wake-up on connecting (plain,
    // then flow, each time) find the queue empty; then it waits for a NOTIFY.
    let stats = handle.stats();
    eventually(Duration::from_secs(10), "the fetcher's two rounds of plain and flow claims", || async {
        (oncely::worker::WorkerStats::get(&stats.claims) >= 4).then_some(())
    })
    .await;

    let mut locker = sqlx::PgConnection::connect(db.url()).await.unwrap();
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query("LOCK TABLE oncely.flow_keys IN ACCESS EXCLUSIVE MODE").execute(&mut locker).await.unwrap();
    let id = enqueue(db.pool(), NewJob::new(&Noop { n: 1 }).unwrap()).await.unwrap().id;
    eventually(Duration::from_secs(10), "the plain job completed while the flow claim waits", || async {
        let state: String = sqlx::query_scalar("SELECT state::text FROM oncely.jobs WHERE id = $1")
            .bind(id)
            .fetch_one(db.pool())
            .await
            .ok()?;
        (state == "completed").then_some(())
    })
    .await;
    assert_eq!(ran.load(Ordering::SeqCst), 1, "the job ran once");
    // The flow claim is still waiting on the lock: the plain job did not wait for it.
    let waiting: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
         WHERE c.relname = 'flow_keys' AND NOT l.granted \
         AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(waiting, 1, "the worker's flow claim waits for oncely.flow_keys");
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    handle.shutdown_within(Duration::from_secs(5)).await;
}
