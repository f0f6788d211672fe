//! The worker on a real PostgreSQL: many workers, every handler outcome, bad input, shutdown,
//! a database that goes away, wake-ups, heartbeats.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use oncely::core::retry::RetryPolicy;
use oncely::core::ErrorKind;
use oncely::worker::WorkerStats;
use oncely::{enqueue, enqueue_many, get_job, handler_fn, JobArgs, JobState, NewJob, Outcome};
use serde::{Deserialize, Serialize};

type Seen = Arc<Mutex<HashMap<u64, u32>>>;

fn seen_handler(seen: Seen) -> impl oncely::Handler<Noop> {
    handler_fn(move |_ctx, args: Noop| {
        let seen = seen.clone();
        async move {
            *seen.lock().unwrap().entry(args.n).or_default() += 1;
            Ok(())
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_workers_drain_two_thousand_jobs_each_exactly_once() {
    init_tracing();
    let db = TestDb::new().await;
    let jobs: Vec<_> = (0..2000).map(|n| NewJob::new(&Noop { n }).unwrap()).collect();
    enqueue_many(db.pool(), &jobs).await.unwrap();

    let seen: Seen = Default::default();
    let mut handles = Vec::new();
    for _ in 0..4 {
        let pool = db.new_pool(5).await;
        handles.push(builder(pool).register(seen_handler(seen.clone())).queue("default", 8).build().unwrap().start());
    }
    wait_all_finished(db.pool(), Duration::from_secs(60)).await;
    for h in &handles {
        h.shutdown().await;
    }

    assert_eq!(count(db.pool(), JobState::Completed).await, 2000);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2000, "every job handled");
    assert!(seen.values().all(|&n| n == 1), "no job handled twice");
    let per_worker: Vec<u64> = handles.iter().map(|h| WorkerStats::get(&h.stats().completed)).collect();
    assert_eq!(per_worker.iter().sum::<u64>(), 2000);
    assert!(per_worker.iter().filter(|&&n| n > 0).count() >= 2, "the work was shared: {per_worker:?}");
}

#[derive(Debug, Serialize, Deserialize)]
struct Flaky {
    fail_until: i32,
}
impl JobArgs for Flaky {
    const KIND: &'static str = "flaky";
}

fn flaky() -> impl oncely::Handler<Flaky> {
    handler_fn(|ctx, args: Flaky| async move {
        if ctx.attempt() < args.fail_until {
            return Err(Outcome::retry(format!("boom {}", ctx.attempt())));
        }
        Ok(())
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_job_retries_then_completes_and_keeps_its_errors() {
    let db = TestDb::new().await;
    let id = enqueue(db.pool(), NewJob::new(&Flaky { fail_until: 3 }).unwrap()).await.unwrap().id;
    let h = builder(db.new_pool(5).await).register(flaky()).queue("default", 2).build().unwrap().start();
    wait_all_finished(db.pool(), Duration::from_secs(20)).await;
    h.shutdown().await;

    let job = get_job(db.pool(), id).await.unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Completed, 3));
    let messages: Vec<_> = job.errors.iter().map(|e| e.message.as_str()).collect();
    assert_eq!(messages, ["boom 1", "boom 2"]);
    assert!(job.errors.iter().all(|e| e.kind == ErrorKind::Error));
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_attempts_goes_to_the_dead_letter_with_every_error() {
    let db = TestDb::new().await;
    let id = enqueue(db.pool(), NewJob::new(&Flaky { fail_until: 100 }).unwrap().max_attempts(3)).await.unwrap().id;
    let h = builder(db.new_pool(5).await).register(flaky()).queue("default", 2).build().unwrap().start();
    wait_all_finished(db.pool(), Duration::from_secs(20)).await;
    h.shutdown().await;

    let job = get_job(db.pool(), id).await.unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Dead, 3));
    assert!(job.finished_at.is_some());
    let messages: Vec<_> = job.errors.iter().map(|e| e.message.as_str()).collect();
    assert_eq!(messages, ["boom 1", "boom 2", "boom 3"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_retry_delay_is_stored_as_run_at_from_the_database_clock() {
    let db = TestDb::new().await;
    let id = enqueue(db.pool(), NewJob::new(&Flaky { fail_until: 100 }).unwrap()).await.unwrap().id;
    let policy = RetryPolicy { base: Duration::from_secs(100), max: Duration::from_secs(1000), jitter: 0.2 };
    let h = builder(db.new_pool(5).await)
        .register(flaky())
        .queue("default", 1)
        .configure(|c| c.retry = policy)
        .build()
        .unwrap()
        .start();
    let delay: f64 = eventually(Duration::from_secs(10), "first failure recorded", || async {
        sqlx::query_scalar::<_, f64>(
            "SELECT extract(epoch FROM run_at - (errors->0->>'at')::timestamptz)::float8 \
             FROM oncely.jobs WHERE id = $1 AND state = 'available' AND jsonb_array_length(errors) = 1",
        )
        .bind(id)
        .fetch_optional(db.pool())
        .await
        .unwrap()
    })
    .await;
    h.shutdown().await;
    assert!((80.0..=100.0).contains(&delay), "delay after attempt 1 is base minus up to 20% jitter: {delay}");
}

#[derive(Debug, Serialize, Deserialize)]
struct Moody {
    mood: String,
}
impl JobArgs for Moody {
    const KIND: &'static str = "moody";
}

#[tokio::test(flavor = "multi_thread")]
async fn snooze_cancel_timeout_and_panic_each_end_as_documented() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    let job = |mood: &str, max: i32| NewJob::new(&Moody { mood: mood.into() }).unwrap().max_attempts(max);
    let snooze = enqueue(pool, job("snooze_once", 1)).await.unwrap().id;
    let cancel = enqueue(pool, job("cancel", 5)).await.unwrap().id;
    let timeout = enqueue(pool, job("hang", 2)).await.unwrap().id;
    let panic = enqueue(pool, job("panic_once", 5)).await.unwrap().id;

    struct MoodyHandler;
    #[async_trait::async_trait]
    impl oncely::Handler<Moody> for MoodyHandler {
        async fn handle(&self, ctx: oncely::JobContext, args: Moody) -> oncely::HandlerResult {
            match (args.mood.as_str(), ctx.attempt()) {
                ("snooze_once", 1) => Err(Outcome::snooze(Duration::from_millis(50))),
                ("cancel", _) => Err(Outcome::cancel("the order was refunded")),
                ("hang", _) => {
                    std::future::pending::<()>().await;
                    Ok(())
                }
                ("panic_once", 1) => panic!("handler bug on attempt 1"),
                _ => Ok(()),
            }
        }
        fn timeout(&self) -> Option<Duration> {
            Some(Duration::from_millis(300))
        }
    }

    let h = builder(db.new_pool(5).await).register(MoodyHandler).queue("default", 4).build().unwrap().start();
    wait_all_finished(pool, Duration::from_secs(20)).await;
    h.shutdown().await;

    let j = get_job(pool, snooze).await.unwrap();
    assert_eq!(
        (j.state, j.attempt, j.snoozes, j.max_attempts),
        (JobState::Completed, 2, 1, 1),
        "a snooze is not an attempt"
    );
    assert!(j.errors.is_empty());

    let j = get_job(pool, cancel).await.unwrap();
    assert_eq!((j.state, j.attempt), (JobState::Cancelled, 1));
    assert!(j.errors[0].message.contains("the order was refunded"));

    let j = get_job(pool, timeout).await.unwrap();
    assert_eq!((j.state, j.attempt), (JobState::Dead, 2));
    assert!(j.errors.iter().all(|e| e.kind == ErrorKind::Timeout), "{:?}", j.errors);

    let j = get_job(pool, panic).await.unwrap();
    assert_eq!((j.state, j.attempt), (JobState::Completed, 2), "the worker survived the panic and retried");
    assert_eq!(j.errors[0].kind, ErrorKind::Panic);
    assert!(j.errors[0].message.contains("handler bug on attempt 1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_kinds_and_bad_args_fail_clearly_while_other_jobs_run() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    let unknown = enqueue(pool, NewJob::from_json("nobody_handles_this", serde_json::json!({})).max_attempts(2))
        .await
        .unwrap()
        .id;
    let bad_args =
        enqueue(pool, NewJob::from_json(Noop::KIND, serde_json::json!({"n": "not a number"}))).await.unwrap().id;
    let good: Vec<_> = (0..20).map(|n| NewJob::new(&Noop { n }).unwrap()).collect();
    enqueue_many(pool, &good).await.unwrap();

    let seen: Seen = Default::default();
    let h =
        builder(db.new_pool(5).await).register(seen_handler(seen.clone())).queue("default", 4).build().unwrap().start();
    wait_all_finished(pool, Duration::from_secs(20)).await;
    h.shutdown().await;

    assert_eq!(seen.lock().unwrap().len(), 20, "good jobs all ran");
    let j = get_job(pool, unknown).await.unwrap();
    assert_eq!((j.state, j.attempt), (JobState::Dead, 2), "retried in case another worker knows the kind, then dead");
    assert!(j.errors.iter().all(|e| e.kind == ErrorKind::UnknownKind && e.message.contains("nobody_handles_this")));
    let j = get_job(pool, bad_args).await.unwrap();
    assert_eq!((j.state, j.attempt), (JobState::Dead, 1), "bad args do not get better by retrying");
    assert_eq!(j.errors[0].kind, ErrorKind::InvalidArgs);
    assert!(j.errors[0].message.contains("noop"), "{}", j.errors[0].message);
}

#[derive(Debug, Serialize, Deserialize)]
struct Sleepy {
    n: u64,
    ms: u64,
}
impl JobArgs for Sleepy {
    const KIND: &'static str = "sleepy";
}

#[tokio::test(flavor = "multi_thread")]
async fn graceful_shutdown_finishes_or_releases_everything_and_loses_nothing() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    // Short jobs, and a few that outlive the grace period.
    let jobs: Vec<_> =
        (0..40u64).map(|n| NewJob::new(&Sleepy { n, ms: if n % 10 == 0 { 60_000 } else { 20 } }).unwrap()).collect();
    enqueue_many(pool, &jobs).await.unwrap();

    let started = Arc::new(AtomicU32::new(0));
    let finished: Seen = Default::default();
    let handler = |started: Arc<AtomicU32>, finished: Seen| {
        handler_fn(move |_ctx, a: Sleepy| {
            let (started, finished) = (started.clone(), finished.clone());
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(a.ms)).await;
                *finished.lock().unwrap().entry(a.n).or_default() += 1;
                Ok(())
            }
        })
    };
    let h = builder(db.new_pool(5).await)
        .register(handler(started.clone(), finished.clone()))
        .queue("default", 8)
        .build()
        .unwrap()
        .start();
    eventually(Duration::from_secs(20), "the long jobs to be running", || async {
        let running: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM oncely.jobs WHERE state = 'running' AND (args->>'ms')::int = 60000",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        (running >= 2).then_some(())
    })
    .await;
    h.shutdown_within(Duration::from_millis(300)).await;

    assert_eq!(count(pool, JobState::Running).await, 0, "nothing left running after shutdown");
    let completed = count(pool, JobState::Completed).await;
    let available = count(pool, JobState::Available).await;
    assert_eq!(completed + available, 40, "every job is completed or back in the queue");
    assert_eq!(completed as usize, finished.lock().unwrap().len(), "every finished handler was recorded");
    let released: Vec<(i32, i32, i32)> = sqlx::query_as(
        "SELECT attempt, snoozes, max_attempts FROM oncely.jobs WHERE errors @> '[{\"kind\":\"shutdown\"}]'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(!released.is_empty(), "the long jobs were released");
    assert!(
        released.iter().all(|&(a, s, m)| a - s == 0 && m == 20),
        "a release is not an attempt (nor raises the budget): {released:?}"
    );

    // A new worker with short sleeps finishes the rest.
    let h = builder(db.new_pool(5).await)
        .register(handler_fn(|_ctx, _a: Sleepy| async move { Ok(()) }))
        .queue("default", 8)
        .build()
        .unwrap()
        .start();
    wait_all_finished(pool, Duration::from_secs(20)).await;
    h.shutdown().await;
    assert_eq!(count(pool, JobState::Completed).await, 40);
    assert!(finished.lock().unwrap().values().all(|&n| n == 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_recovers_when_its_connections_are_terminated_and_loses_no_job() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    let jobs: Vec<_> = (0..300u64).map(|n| NewJob::new(&Sleepy { n, ms: 5 }).unwrap()).collect();
    enqueue_many(pool, &jobs).await.unwrap();

    let finished: Seen = Default::default();
    let f = finished.clone();
    let h = builder(db.new_pool(6).await)
        .register(handler_fn(move |_ctx, a: Sleepy| {
            let f = f.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(a.ms)).await;
                *f.lock().unwrap().entry(a.n).or_default() += 1;
                Ok(())
            }
        }))
        .queue("default", 4)
        .build()
        .unwrap()
        .start();

    let mut terminated = 0;
    for round in 1..=3 {
        eventually(Duration::from_secs(30), "more jobs done", || async {
            (finished.lock().unwrap().len() >= round * 50).then_some(())
        })
        .await;
        terminated += db.terminate_connections().await;
    }
    assert!(terminated > 0, "the worker's connections were terminated");
    // A job enqueued after the outage is picked up too (LISTEN reconnected, or polling).
    let late = enqueue(pool, NewJob::new(&Sleepy { n: 1000, ms: 0 }).unwrap()).await.unwrap().id;
    wait_all_finished(pool, Duration::from_secs(60)).await;
    h.shutdown().await;

    assert_eq!(count(pool, JobState::Completed).await, 301, "no job lost: {:?}", state_counts(pool).await);
    assert_eq!(get_job(pool, late).await.unwrap().state, JobState::Completed);
    assert_eq!(finished.lock().unwrap().len(), 301);
}

#[derive(Debug, Serialize, Deserialize)]
struct Ping {
    sent: u64,
}
impl JobArgs for Ping {
    const KIND: &'static str = "ping";
}

fn ping_handler(tx: tokio::sync::mpsc::UnboundedSender<u64>) -> impl oncely::Handler<Ping> {
    handler_fn(move |_ctx, p: Ping| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(p.sent);
            Ok(())
        }
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn notify_wakes_an_idle_worker_long_before_its_poll_interval() {
    let db = TestDb::new().await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let h = builder(db.new_pool(5).await)
        .register(ping_handler(tx))
        .queue("default", 2)
        .configure(|c| c.poll_interval = Duration::from_secs(3600))
        .build()
        .unwrap()
        .start();
    // Let the listener subscribe: a first job may be found by the startup poll.
    enqueue(db.pool(), NewJob::new(&Ping { sent: 0 }).unwrap()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap();
    for i in 1..=5 {
        let t = Instant::now();
        enqueue(db.pool(), NewJob::new(&Ping { sent: i }).unwrap()).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("an hour-long poll interval: only NOTIFY can have woken the worker");
        assert_eq!(got, Some(i));
        tracing::info!(elapsed = ?t.elapsed(), "woken");
    }
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn polling_finds_jobs_whose_notify_never_arrived() {
    let db = TestDb::new().await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let h = builder(db.new_pool(5).await)
        .register(ping_handler(tx))
        .queue("default", 2)
        .configure(|c| c.poll_interval = Duration::from_millis(200))
        .build()
        .unwrap()
        .start();
    // Insert with plain SQL, as another program might: no NOTIFY is ever sent for this job.
    sqlx::query("INSERT INTO oncely.jobs (kind, args) VALUES ('ping', '{\"sent\": 7}')")
        .execute(db.pool())
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("polling picks the job up");
    assert_eq!(got, Some(7));
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn heartbeats_keep_a_long_job_from_being_rescued() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let id = enqueue(pool, NewJob::new(&Sleepy { n: 0, ms: 2500 }).unwrap()).await.unwrap().id;
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let h = builder(db.new_pool(5).await)
        .register(handler_fn(move |_ctx, a: Sleepy| {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(a.ms)).await;
                Ok(())
            }
        }))
        .queue("default", 1)
        .lease(Duration::from_millis(600))
        .build()
        .unwrap()
        .start();
    wait_all_finished(pool, Duration::from_secs(20)).await;
    h.shutdown().await;
    let j = get_job(pool, id).await.unwrap();
    assert_eq!(
        (j.state, j.attempt),
        (JobState::Completed, 1),
        "ran 4 leases long without being rescued: {:?}",
        j.errors
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_builder_refuses_bad_configurations() {
    let db = TestDb::new().await;
    let no_queue = oncely::Worker::builder(db.pool().clone()).register(seen_handler(Default::default())).build();
    assert!(matches!(no_queue, Err(oncely::worker::Error::Config(m)) if m.contains("no queue")));
    let twice = oncely::Worker::builder(db.pool().clone())
        .register(seen_handler(Default::default()))
        .register(seen_handler(Default::default()))
        .queue("default", 1)
        .build();
    assert!(matches!(twice, Err(oncely::worker::Error::Config(m)) if m.contains("noop")));
    let zero =
        oncely::Worker::builder(db.pool().clone()).register(seen_handler(Default::default())).queue("q", 0).build();
    assert!(matches!(zero, Err(oncely::worker::Error::Config(m)) if m.contains("concurrency 0")));
    let huge = oncely::Worker::builder(db.pool().clone())
        .register(seen_handler(Default::default()))
        .queue("q", 1)
        .prefetch(usize::MAX)
        .build();
    assert!(matches!(huge, Err(oncely::worker::Error::Config(m)) if m.contains("prefetch")));
    let never = oncely::Worker::builder(db.pool().clone())
        .register(seen_handler(Default::default()))
        .queue("q", 1)
        .configure(|c| c.full_claim_interval = Some(Duration::ZERO))
        .build();
    assert!(matches!(never, Err(oncely::worker::Error::Config(m)) if m.contains("full_claim_interval")));
}

/// A retry or snooze shorter than the poll interval runs on time: the worker wakes its own fetcher
/// instead of waiting for the next poll (NOTIFY only announces jobs due at once).
#[tokio::test(flavor = "multi_thread")]
async fn a_retry_or_snooze_shorter_than_the_poll_interval_does_not_wait_for_the_next_poll() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    let h = builder(db.new_pool(4).await)
        .register(handler_fn(|ctx, _a: Noop| async move {
            match ctx.attempt() {
                1 => Err(Outcome::retry_after("once more", Duration::from_millis(50))),
                2 => Err(Outcome::snooze(Duration::from_millis(50))),
                _ => Ok(()),
            }
        }))
        .queue("default", 2)
        .configure(|c| c.poll_interval = Duration::from_secs(60))
        .build()
        .unwrap()
        .start();
    let id = enqueue(pool, NewJob::new(&Noop { n: 1 }).unwrap()).await.unwrap().id;
    // Well under one poll interval: only the worker's own wake-ups can make this.
    wait_all_finished(pool, Duration::from_secs(10)).await;
    h.shutdown().await;
    let job = get_job(pool, id).await.unwrap();
    assert_eq!((job.state, job.attempt, job.snoozes), (JobState::Completed, 3, 1));
}

/// The test kit's `run_until_idle`: a worker runs until no job is left, retries after their
/// backoff included, and the outcomes are counted.
#[tokio::test(flavor = "multi_thread")]
async fn run_until_idle_drains_retries_included_and_counts_the_outcomes() {
    #[derive(Debug, Serialize, Deserialize)]
    struct Flaky {
        n: u32,
    }
    impl JobArgs for Flaky {
        const KIND: &'static str = "flaky";
    }
    let db = TestDb::new().await;
    let pool = db.pool();
    let jobs: Vec<NewJob> = (0..30).map(|n| NewJob::new(&Flaky { n }).unwrap()).collect();
    enqueue_many(pool, &jobs).await.unwrap();
    let worker = builder(db.new_pool(5).await)
        .register(handler_fn(|ctx, f: Flaky| async move {
            match f.n % 10 {
                // Fails once, then succeeds after its backoff.
                1 | 2 if ctx.attempt() == 1 => Err(Outcome::retry("not yet")),
                3 => Err(Outcome::fail("bad input")),
                4 => Err(Outcome::cancel("not wanted")),
                _ => Ok(()),
            }
        }))
        .queue("default", 4);
    let drained = oncely_testkit::run_until_idle(pool, worker, Duration::from_secs(30)).await;
    assert_eq!(drained, oncely_testkit::Drained { completed: 24, dead: 3, cancelled: 3 });
}
