//! Debounce (issue 16): many enqueues for a key give one run with the latest arguments, a maximum
//! wait bounds the delay, an enqueue during the run is not lost, and concurrent enqueuers on
//! separate connections leave one waiting job. Real PostgreSQL.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use oncely::debounce::{enqueue_debounced, Debounce};
use oncely::{handler_fn, Error, JobArgs, NewJob};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::sync::watch;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Reindex {
    tenant: i64,
    version: i64,
}
impl JobArgs for Reindex {
    const KIND: &'static str = "reindex";
}

fn job(tenant: i64, version: i64) -> NewJob {
    NewJob::new(&Reindex { tenant, version }).unwrap()
}

/// A handler that records the arguments of every run, in order.
fn recording(runs: Arc<Mutex<Vec<Reindex>>>) -> impl oncely::Handler<Reindex> {
    handler_fn(move |_ctx, args: Reindex| {
        let runs = runs.clone();
        async move {
            runs.lock().unwrap().push(args);
            Ok(())
        }
    })
}

async fn jobs_of(pool: &PgPool, kind: &str) -> Vec<(i64, String, serde_json::Value)> {
    sqlx::query_as("SELECT id, state, args FROM oncely.jobs WHERE kind = $1 ORDER BY id")
        .bind(kind)
        .fetch_all(pool)
        .await
        .unwrap()
}

/// The case: 100 enqueues for one key over about 2 s give one run, with the last
/// arguments. A worker polls all along; the period (3 s) is longer than any gap between enqueues.
#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_enqueues_in_two_seconds_give_one_run_with_the_last_arguments() {
    init_tracing();
    let db = TestDb::new().await;
    let runs = Arc::new(Mutex::new(Vec::new()));
    let worker = builder(db.new_pool(4).await).register(recording(runs.clone())).queue("default", 4).build().unwrap();
    let handle = worker.start();
    let pool = db.pool();
    let debounce = Debounce::new(Duration::from_secs(3)).max_wait(Duration::from_secs(60));

    let mut ids = Vec::new();
    for version in 0..100 {
        let d = enqueue_debounced(pool, job(7, version), "tenant:7", debounce).await.unwrap();
        assert_eq!(d.merged, version > 0, "only the first enqueue creates a job");
        ids.push(d.id);
        // The pace of the burst (the workload), not a synchronisation.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ids.iter().all(|id| *id == ids[0]), "every enqueue merged into the first job");
    assert!(runs.lock().unwrap().is_empty(), "nothing ran during the burst");

    wait_all_finished(pool, Duration::from_secs(30)).await;
    let jobs = jobs_of(pool, "reindex").await;
    assert_eq!(jobs.len(), 1, "one job: {jobs:?}");
    assert_eq!(jobs[0].1, "completed");
    assert_eq!(*runs.lock().unwrap(), vec![Reindex { tenant: 7, version: 99 }], "one run, the last arguments");
    handle.shutdown().await;
}

/// Keys are independent: two tenants debounced at once give one run each.
#[tokio::test(flavor = "multi_thread")]
async fn two_keys_debounce_independently() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    let debounce = Debounce::new(Duration::from_millis(300));
    for version in 0..10 {
        for tenant in [1, 2] {
            enqueue_debounced(pool, job(tenant, version), &format!("tenant:{tenant}"), debounce).await.unwrap();
        }
    }
    let runs = Arc::new(Mutex::new(Vec::new()));
    let handle =
        builder(db.new_pool(3).await).register(recording(runs.clone())).queue("default", 2).build().unwrap().start();
    wait_all_finished(pool, Duration::from_secs(30)).await;
    let mut got = runs.lock().unwrap().clone();
    got.sort_by_key(|r| r.tenant);
    assert_eq!(got, vec![Reindex { tenant: 1, version: 9 }, Reindex { tenant: 2, version: 9 }]);
    handle.shutdown().await;
}

/// A steady stream, one enqueue every 50 ms with a 1 s period, never falls quiet: without the
/// maximum wait the run would never start. With a 2 s maximum it starts while the stream goes on,
/// and every due time the merges set stays within the maximum after the job's creation.
#[tokio::test(flavor = "multi_thread")]
async fn a_maximum_wait_starts_the_run_while_the_stream_goes_on() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    let runs = Arc::new(Mutex::new(Vec::new()));
    let handle =
        builder(db.new_pool(3).await).register(recording(runs.clone())).queue("default", 2).build().unwrap().start();
    let debounce = Debounce::new(Duration::from_secs(1)).max_wait(Duration::from_secs(2));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut version = 0;
    let mut first_id = None;
    while runs.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no run started within 30 s: the maximum wait did not hold");
        let d = enqueue_debounced(pool, job(3, version), "tenant:3", debounce).await.unwrap();
        let first = *first_id.get_or_insert(d.id);
        if d.id == first {
            let (created_at,): (chrono::DateTime<chrono::Utc>,) =
                sqlx::query_as("SELECT created_at FROM oncely.jobs WHERE id = $1")
                    .bind(d.id.0)
                    .fetch_one(pool)
                    .await
                    .unwrap();
            assert!(d.run_at <= created_at + chrono::Duration::seconds(2), "run_at {} past the maximum wait", d.run_at);
        }
        version += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first_run = runs.lock().unwrap()[0].clone();
    assert!(first_run.version < version, "the run saw arguments enqueued before it started");
    handle.shutdown().await;
}

/// An enqueue that arrives while the debounced run is running is not merged into it (it would be
/// lost: the run has its arguments already) but waits as a new job, and runs with its arguments.
#[tokio::test(flavor = "multi_thread")]
async fn an_enqueue_during_the_run_gets_a_run_of_its_own() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    let debounce = Debounce::new(Duration::from_millis(200));
    let (open, gate) = watch::channel(false);
    let runs = Arc::new(Mutex::new(Vec::new()));
    let recorded = runs.clone();
    let handle = builder(db.new_pool(3).await)
        .register(handler_fn(move |_ctx, args: Reindex| {
            let mut gate = gate.clone();
            let runs = recorded.clone();
            async move {
                runs.lock().unwrap().push(args.clone());
                if args.version == 1 {
                    gate.wait_for(|open| *open).await.expect("the test holds the gate");
                }
                Ok(())
            }
        }))
        .queue("default", 2)
        .build()
        .unwrap()
        .start();

    let first = enqueue_debounced(pool, job(5, 1), "tenant:5", debounce).await.unwrap();
    eventually(Duration::from_secs(30), "the first run started", || async {
        (!runs.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    let second = enqueue_debounced(pool, job(5, 2), "tenant:5", debounce).await.unwrap();
    assert!(!second.merged, "a running job is not merged into");
    assert_ne!(second.id, first.id);
    open.send(true).unwrap();
    wait_all_finished(pool, Duration::from_secs(30)).await;
    assert_eq!(*runs.lock().unwrap(), vec![Reindex { tenant: 5, version: 1 }, Reindex { tenant: 5, version: 2 }]);
    handle.shutdown().await;
}

/// 50 enqueues at once for one key, from 25 separate connections: one waiting job, whose
/// arguments are those of the enqueue that committed last.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_enqueues_on_separate_connections_leave_one_job_with_the_last_arguments() {
    init_tracing();
    let db = TestDb::new().await;
    let pools: Vec<PgPool> = futures::future::join_all((0..25).map(|_| db.new_pool(2))).await;
    let debounce = Debounce::new(Duration::from_secs(600));
    let start = Arc::new(tokio::sync::Barrier::new(50));
    let mut tasks = Vec::new();
    for version in 0..50 {
        let pool = pools[version % 25].clone();
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let d = enqueue_debounced(&pool, job(9, version as i64), "tenant:9", debounce).await.unwrap();
            // The commit order of a key's enqueuers is their lock order: read it back as the
            // transaction id order is not observable; the due time strictly grows with it.
            (d, version as i64)
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let created: Vec<_> = results.iter().filter(|(d, _)| !d.merged).collect();
    assert_eq!(created.len(), 1, "exactly one enqueue created the job");
    let id = created[0].0.id;
    assert!(results.iter().all(|(d, _)| d.id == id), "all merged into one job");
    let jobs = jobs_of(db.pool(), "reindex").await;
    assert_eq!(jobs.len(), 1);
    // The last to commit set the latest due time, and its arguments are the job's.
    let (_, last_version) = results.iter().max_by_key(|(d, _)| d.run_at).unwrap();
    assert_eq!(jobs[0].2, serde_json::json!({ "tenant": 9, "version": last_version }));
}

/// Bad input is refused with a typed error, and nothing is written.
#[tokio::test]
async fn bad_debounce_input_is_refused() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let ok = Debounce::new(Duration::from_secs(1));
    let long_key = "k".repeat(513);
    let cases: Vec<(NewJob, &str, Debounce)> = vec![
        (job(1, 1), "", ok),
        (job(1, 1), &long_key, ok),
        (job(1, 1), "k", Debounce::new(Duration::ZERO)),
        (job(1, 1), "k", Debounce::new(Duration::from_secs(10)).max_wait(Duration::from_secs(5))),
        (job(1, 1).unique_key("u"), "k", ok),
        (job(1, 1).delay(Duration::from_secs(1)), "k", ok),
    ];
    for (job, key, debounce) in cases {
        let err = enqueue_debounced(pool, job, key, debounce).await.unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
    }
    assert!(jobs_of(pool, "reindex").await.is_empty());
}
