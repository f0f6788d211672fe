//! Flow control across the fleet (issue 16): pause and resume of queues and kinds, and bulk
//! operations by filter. Real PostgreSQL; workers on separate small pools.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use oncely::bulk::{self, BulkFilter};
use oncely::pause::{self, PauseTarget};
use oncely::{enqueue, enqueue_many, handler_fn, Error, JobArgs, JobState, NewJob};
use serde::{Deserialize, Serialize};
use sqlx::{Connection, PgPool};
use tokio::sync::watch;

/// A job that runs until the test opens the gate.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Gated {
    n: u64,
}
impl JobArgs for Gated {
    const KIND: &'static str = "gated";
}

fn gated(gate: watch::Receiver<bool>, started: Arc<AtomicU64>) -> impl oncely::Handler<Gated> {
    handler_fn(move |_ctx, _args: Gated| {
        let mut gate = gate.clone();
        let started = started.clone();
        async move {
            started.fetch_add(1, Ordering::SeqCst);
            gate.wait_for(|open| *open).await.expect("the test holds the gate's sender");
            Ok(())
        }
    })
}

async fn count_state(pool: &PgPool, queue: &str, state: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM oncely.jobs WHERE queue = $1 AND state = $2")
        .bind(queue)
        .bind(state)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Sample the running count for `window`: it must stay at zero. (A watch over a window, not a
/// synchronisation: each sample is checked, and the workers are woken by enqueues meanwhile.)
async fn never_runs(pool: &PgPool, queue: &str, window: Duration, mut during: impl FnMut(u32) -> NewJob) -> i64 {
    let end = Instant::now() + window;
    let mut i = 0;
    while Instant::now() < end {
        // Every enqueue NOTIFYs the queue: the fetchers wake and try to claim.
        enqueue(pool, during(i)).await.unwrap();
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let running = count_state(pool, queue, "running").await;
        assert_eq!(running, 0, "a job started in paused queue {queue}");
    }
    i64::from(i)
}

/// Four workers (pools of 5) run 100 gated jobs of 300; the queue is paused; the 100 finish and
/// no other starts, though enqueues keep waking the workers; on resume the rest run, promptly:
/// the workers poll only once a minute, so only the resume's NOTIFY can wake them in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_queue_finishes_its_running_jobs_starts_none_and_resumes_on_notify() {
    init_tracing();
    let db = TestDb::new().await;
    let jobs: Vec<NewJob> = (0..300).map(|n| NewJob::new(&Gated { n }).unwrap().queue("reports")).collect();
    enqueue_many(db.pool(), &jobs).await.unwrap();

    let (open, gate) = watch::channel(false);
    let started = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let pool = db.new_pool(5).await;
        workers.push(
            builder(pool)
                .configure(|c| c.poll_interval = Duration::from_secs(60))
                .register(gated(gate.clone(), started.clone()))
                .queue("reports", 25)
                .build()
                .unwrap()
                .start(),
        );
    }
    let pool = db.pool();
    eventually(Duration::from_secs(30), "100 jobs running", || async {
        (count_state(pool, "reports", "running").await == 100).then_some(())
    })
    .await;

    assert!(pause::pause(pool, &PauseTarget::queue("reports"), Some("test")).await.unwrap());
    assert!(!pause::pause(pool, &PauseTarget::queue("reports"), None).await.unwrap(), "already paused");
    open.send(true).unwrap();
    eventually(Duration::from_secs(30), "the running jobs finished", || async {
        (count_state(pool, "reports", "running").await == 0).then_some(())
    })
    .await;
    assert_eq!(count_state(pool, "reports", "completed").await, 100);
    let added = never_runs(pool, "reports", Duration::from_millis(1500), |i| {
        NewJob::new(&Gated { n: 1000 + u64::from(i) }).unwrap().queue("reports")
    })
    .await;
    assert_eq!(count_state(pool, "reports", "completed").await, 100, "nothing ran while paused");
    assert_eq!(started.load(Ordering::SeqCst), 100);

    let pauses = pause::list_pauses(pool).await.unwrap();
    assert_eq!(pauses.len(), 1);
    assert_eq!(pauses[0].target, PauseTarget::queue("reports"));
    assert_eq!(pauses[0].reason.as_deref(), Some("test"));

    assert!(pause::resume(pool, &PauseTarget::queue("reports")).await.unwrap());
    assert!(!pause::resume(pool, &PauseTarget::queue("reports")).await.unwrap(), "not paused any more");
    // Well within the minute-long poll interval.
    wait_all_finished(pool, Duration::from_secs(30)).await;
    assert_eq!(count(pool, JobState::Completed).await, 300 + added);
    for w in &workers {
        w.shutdown().await;
    }
    assert!(pause::list_pauses(pool).await.unwrap().is_empty());
}

/// A paused kind is skipped on every queue while the other kinds run; resuming it wakes every
/// queue (`*`), again with a minute-long poll interval.
#[tokio::test(flavor = "multi_thread")]
async fn a_paused_kind_waits_while_other_kinds_run_and_resumes_on_notify() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    assert!(pause::pause(pool, &PauseTarget::kind("gated"), None).await.unwrap());
    let (_open, gate) = watch::channel(true);
    let started = Arc::new(AtomicU64::new(0));
    let w = builder(db.new_pool(4).await)
        .configure(|c| c.poll_interval = Duration::from_secs(60))
        .register(gated(gate, started.clone()))
        .register(handler_fn(|_ctx, _a: Noop| async { Ok(()) }))
        .queue("default", 4)
        .queue("other", 4)
        .build()
        .unwrap()
        .start();
    let mut jobs: Vec<NewJob> = (0..20).map(|n| NewJob::new(&Gated { n }).unwrap().queue("other")).collect();
    jobs.extend((0..20).map(|n| NewJob::new(&Noop { n }).unwrap()));
    enqueue_many(pool, &jobs).await.unwrap();
    eventually(Duration::from_secs(20), "the noop jobs done", || async {
        (count_state(pool, "default", "completed").await == 20).then_some(())
    })
    .await;
    assert_eq!(count_state(pool, "other", "available").await, 20, "the paused kind did not start");
    assert_eq!(started.load(Ordering::SeqCst), 0);

    assert!(pause::resume(pool, &PauseTarget::kind("gated")).await.unwrap());
    wait_all_finished(pool, Duration::from_secs(20)).await;
    assert_eq!(started.load(Ordering::SeqCst), 20);
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pause_names_are_checked() {
    let db = TestDb::new().await;
    let err = pause::pause(db.pool(), &PauseTarget::queue(""), None).await.unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    let err = pause::resume(db.pool(), &PauseTarget::kind("k".repeat(300))).await.unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Tenant {
    tenant: u64,
    n: u64,
}
impl JobArgs for Tenant {
    const KIND: &'static str = "tenant_job";
}

async fn tenant_jobs(pool: &PgPool, count: u64) {
    let jobs: Vec<NewJob> = (0..count).map(|n| NewJob::new(&Tenant { tenant: n % 5, n }).unwrap()).collect();
    enqueue_many(pool, &jobs).await.unwrap();
}

async fn states_of_tenant(pool: &PgPool, tenant: i64) -> Vec<(String, i64)> {
    sqlx::query_as(
        "SELECT state, count(*) FROM oncely.jobs WHERE (args ->> 'tenant')::int = $1 GROUP BY state ORDER BY state",
    )
    .bind(tenant)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Cancel by args containment in batches of 100, then retry by kind and state, then delete: the
/// counts are reported and only the matching jobs change.
#[tokio::test(flavor = "multi_thread")]
async fn bulk_cancel_retry_and_delete_by_filter_in_batches() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    tenant_jobs(pool, 2500).await;
    enqueue_many(pool, &(0..10).map(|n| NewJob::new(&Noop { n }).unwrap()).collect::<Vec<_>>()).await.unwrap();
    let mut conn = pool.acquire().await.unwrap();

    let filter = BulkFilter {
        args_contain: Some(serde_json::json!({ "tenant": 1 })),
        batch_size: Some(100),
        ..Default::default()
    };
    let report = bulk::cancel_jobs(&mut conn, &filter).await.unwrap();
    assert_eq!(report.affected, 500);
    assert_eq!(report.skipped, 0);
    assert_eq!(report.batches, 6, "five full batches and the empty one that ends the walk");
    assert_eq!(states_of_tenant(pool, 1).await, vec![("cancelled".to_string(), 500)]);
    assert_eq!(states_of_tenant(pool, 2).await, vec![("available".to_string(), 500)]);

    // Cancelling again finds nothing left to cancel.
    assert_eq!(bulk::cancel_jobs(&mut conn, &filter).await.unwrap().affected, 0);

    // A time range in the future matches nothing; one around now matches them all.
    let future = BulkFilter {
        states: vec![JobState::Cancelled],
        created_after: Some(chrono::Utc::now() + chrono::Duration::hours(1)),
        ..Default::default()
    };
    assert_eq!(bulk::retry_jobs(&mut conn, &future).await.unwrap().affected, 0);
    let retry = BulkFilter {
        states: vec![JobState::Cancelled],
        kind: Some("tenant_job".into()),
        created_after: Some(chrono::Utc::now() - chrono::Duration::hours(1)),
        created_before: Some(chrono::Utc::now() + chrono::Duration::minutes(1)),
        batch_size: Some(300),
        ..Default::default()
    };
    let report = bulk::retry_jobs(&mut conn, &retry).await.unwrap();
    assert_eq!(report.affected, 500);
    assert_eq!(states_of_tenant(pool, 1).await, vec![("available".to_string(), 500)]);

    // Delete the noop jobs on the default queue, by kind.
    let del = BulkFilter { kind: Some("noop".into()), queue: Some("default".into()), ..Default::default() };
    assert_eq!(bulk::delete_jobs(&mut conn, &del).await.unwrap().affected, 10);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM oncely.jobs").fetch_one(pool).await.unwrap();
    assert_eq!(left, 2500);
}

/// Running jobs are fenced out by a bulk cancel; a bulk delete refuses them; a retry skips a job
/// whose unique key a live job holds.
#[tokio::test(flavor = "multi_thread")]
async fn bulk_operations_respect_running_jobs_and_unique_keys() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    let mut conn = pool.acquire().await.unwrap();

    let err = bulk::delete_jobs(&mut conn, &BulkFilter { states: vec![JobState::Running], ..Default::default() })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    let err =
        bulk::cancel_jobs(&mut conn, &BulkFilter { batch_size: Some(0), ..Default::default() }).await.unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");

    // Two running jobs: cancelled in bulk, their claims are refused afterwards.
    tenant_jobs(pool, 2).await;
    let claimed = oncely::core::lease::claim_jobs(pool, "default", 2, "w1", Duration::from_secs(30)).await.unwrap();
    assert_eq!(claimed.len(), 2);
    let report = bulk::cancel_jobs(
        &mut conn,
        &BulkFilter { states: vec![JobState::Running], kind: Some("tenant_job".into()), ..Default::default() },
    )
    .await
    .unwrap();
    assert_eq!(report.affected, 2);
    let refused =
        oncely::core::lease::complete_jobs(pool, &claimed.iter().map(oncely::core::Claim::from).collect::<Vec<_>>())
            .await
            .unwrap();
    assert_eq!(refused.len(), 2, "the cancelled claims are fenced out");

    // A cancelled job with unique key "k" and a live one holding it: the retry skips it.
    let a = enqueue(pool, NewJob::new(&Noop { n: 1 }).unwrap().unique_key("k")).await.unwrap();
    oncely::cancel_job(&mut conn, a.id).await.unwrap();
    let b = enqueue(pool, NewJob::new(&Noop { n: 2 }).unwrap().unique_key("k")).await.unwrap();
    assert!(!b.existing);
    let report =
        bulk::retry_jobs(&mut conn, &BulkFilter { kind: Some("noop".into()), ..Default::default() }).await.unwrap();
    assert_eq!((report.affected, report.skipped), (0, 1));
}

/// 50 enqueues of one key with a period, at once from 25 separate connections (two each): one job;
/// every other enqueue gets its id. After it finished, the key stays taken within the period and
/// is free for a period that has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unique_for_a_period_holds_under_50_concurrent_enqueues_and_after_the_job_finished() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    let hour = Duration::from_secs(3600);
    let start = Arc::new(tokio::sync::Barrier::new(25));
    let mut tasks = Vec::new();
    for c in 0..25u64 {
        let mut conn = sqlx::PgConnection::connect(db.url()).await.unwrap();
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let mut out = Vec::new();
            for i in 0..2 {
                let job = NewJob::new(&Noop { n: c * 2 + i }).unwrap();
                out.push(oncely::unique::enqueue_unique_for(&mut conn, job, "digest:7", hour).await.unwrap());
            }
            out
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.extend(t.await.unwrap());
    }
    assert_eq!(results.len(), 50);
    let new: Vec<_> = results.iter().filter(|e| !e.existing).collect();
    assert_eq!(new.len(), 1, "exactly one enqueue created a job: {results:?}");
    let id = new[0].id;
    assert!(results.iter().all(|e| e.id == id), "every enqueue reports the one job");
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM oncely.jobs").fetch_one(pool).await.unwrap();
    assert_eq!(jobs, 1);

    // Finish it: within the period the key is still taken; with a period already over it is free.
    let claimed = oncely::core::lease::claim_jobs(pool, "default", 1, "w1", Duration::from_secs(30)).await.unwrap();
    oncely::core::lease::complete_jobs(pool, &[oncely::core::Claim::from(&claimed[0])]).await.unwrap();
    let again = oncely::unique::enqueue_unique_for(pool, NewJob::new(&Noop { n: 99 }).unwrap(), "digest:7", hour)
        .await
        .unwrap();
    assert_eq!((again.id, again.existing), (id, true), "finished less than an hour ago: still taken");
    let after =
        oncely::unique::enqueue_unique_for(pool, NewJob::new(&Noop { n: 100 }).unwrap(), "digest:7", Duration::ZERO)
            .await
            .unwrap();
    assert!(!after.existing, "a zero period ends when the job finishes");
    assert_ne!(after.id, id);

    let err = oncely::unique::enqueue_unique_for(pool, NewJob::new(&Noop { n: 1 }).unwrap().unique_key("x"), "y", hour)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
}
