//! Prefetch (`WorkerConfig::prefetch`): a queue's fetcher holds jobs claimed beyond its
//! concurrency, waiting for a slot. They never run beyond the concurrency, their leases are kept
//! while they wait, a stop gives them back without running them, one whose lease is lost while it
//! waits never runs, and jobs under flow control are not claimed ahead.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use oncely::worker::{WorkerHandle, WorkerStats};
use oncely::{cancel_job, enqueue_many, handler_fn, JobArgs, JobId, JobState, NewJob};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::sync::Semaphore;

#[derive(Debug, Serialize, Deserialize)]
struct Gated {
    n: u64,
}
impl JobArgs for Gated {
    const KIND: &'static str = "gated";
}

/// What the handlers saw: how many are inside at once (and the most ever), and how often each job
/// ran. A handler waits for one permit of `gate`, which the test hands out.
#[derive(Default)]
struct Probe {
    inside: AtomicUsize,
    most_inside: AtomicUsize,
    runs: Mutex<HashMap<u64, u32>>,
}

impl Probe {
    fn started(&self) -> usize {
        self.runs.lock().unwrap().values().map(|&n| n as usize).sum()
    }
}

fn gated(probe: Arc<Probe>, gate: Arc<Semaphore>) -> impl oncely::Handler<Gated> {
    handler_fn(move |_ctx, a: Gated| {
        let (probe, gate) = (probe.clone(), gate.clone());
        async move {
            *probe.runs.lock().unwrap().entry(a.n).or_default() += 1;
            let now = probe.inside.fetch_add(1, Ordering::SeqCst) + 1;
            probe.most_inside.fetch_max(now, Ordering::SeqCst);
            gate.acquire().await.expect("the test never closes the gate").forget();
            probe.inside.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        }
    })
}

async fn enqueue_gated(pool: &PgPool, n: u64) -> Vec<JobId> {
    let jobs: Vec<_> = (0..n).map(|n| NewJob::new(&Gated { n }).unwrap()).collect();
    enqueue_many(pool, &jobs).await.unwrap().iter().map(|j| j.id).collect()
}

/// A worker serving `default` with `concurrency` slots and `prefetch`, its handlers behind a gate
/// the test opens; `lease` overrides the tests' short one.
async fn start(
    db: &TestDb,
    concurrency: usize,
    prefetch: usize,
    lease: Option<Duration>,
) -> (Arc<Probe>, Arc<Semaphore>, WorkerHandle) {
    init_tracing();
    let (probe, gate) = (Arc::new(Probe::default()), Arc::new(Semaphore::new(0)));
    let mut b = builder(db.new_pool(5).await)
        .register(gated(probe.clone(), gate.clone()))
        .queue("default", concurrency)
        .prefetch(prefetch);
    if let Some(lease) = lease {
        b = b.lease(lease);
    }
    (probe, gate, b.build().unwrap().start())
}

async fn wait_running(pool: &PgPool, n: i64, probe: &Probe, started: usize) {
    eventually(Duration::from_secs(20), "the jobs claimed ahead", || async {
        (count(pool, JobState::Running).await == n && probe.started() == started).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn prefetched_jobs_are_claimed_ahead_but_never_run_beyond_the_concurrency() {
    let db = TestDb::new().await;
    let pool = db.pool();
    enqueue_gated(pool, 12).await;
    let (probe, gate, h) = start(&db, 2, 3, None).await;

    // Five claimed (two slots and three ahead), two started.
    wait_running(pool, 5, &probe, 2).await;
    assert_eq!(WorkerStats::get(&h.stats().claimed), 5, "the worker claimed its slots and three ahead");
    // The waiting jobs outlive their first lease (2 s; maintenance rescues every 200 ms): the
    // heartbeat must extend theirs too.
    let beats = WorkerStats::get(&h.stats().heartbeats);
    eventually(Duration::from_secs(20), "four heartbeats (more than a lease)", || async {
        (WorkerStats::get(&h.stats().heartbeats) >= beats + 4).then_some(())
    })
    .await;
    assert_eq!(count(pool, JobState::Running).await, 5, "no lease lapsed while the jobs waited");
    assert_eq!(WorkerStats::get(&h.stats().lost_while_running), 0);
    gate.add_permits(12);
    wait_all_finished(pool, Duration::from_secs(30)).await;
    h.shutdown().await;

    assert_eq!(count(pool, JobState::Completed).await, 12);
    let runs = probe.runs.lock().unwrap();
    assert_eq!(runs.len(), 12, "every job ran");
    assert!(runs.values().all(|&n| n == 1), "no job ran twice: {runs:?}");
    assert_eq!(probe.most_inside.load(Ordering::SeqCst), 2, "never more handlers at once than the concurrency");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stop_gives_prefetched_jobs_back_at_once_without_running_them() {
    let db = TestDb::new().await;
    let pool = db.pool();
    enqueue_gated(pool, 4).await;
    let (probe, gate, h) = start(&db, 1, 3, None).await;
    wait_running(pool, 4, &probe, 1).await;

    // A long grace period: the running job may use it; the three waiting must not.
    let stopping = tokio::spawn({
        let h = h.clone();
        async move { h.shutdown_within(Duration::from_secs(60)).await }
    });
    eventually(Duration::from_secs(20), "the three waiting jobs given back", || async {
        (count(pool, JobState::Available).await == 3).then_some(())
    })
    .await;
    assert_eq!(probe.started(), 1, "the waiting jobs were given back, not run");
    let released: Vec<(i32, i32)> = sqlx::query_as(
        "SELECT attempt, snoozes FROM oncely.jobs WHERE state = 'available' AND errors @> '[{\"kind\":\"shutdown\"}]'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(released.len(), 3, "each carries a shutdown note");
    assert!(released.iter().all(|&(a, s)| a - s == 0), "a job given back did not use an attempt: {released:?}");

    // The running job finishes within the grace period and is recorded.
    gate.add_permits(1);
    tokio::time::timeout(Duration::from_secs(30), stopping).await.expect("shutdown returns").unwrap();
    assert_eq!(count(pool, JobState::Completed).await, 1);
    assert_eq!(count(pool, JobState::Available).await, 3);
    assert_eq!(WorkerStats::get(&h.stats().released), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prefetched_job_cancelled_while_it_waits_never_runs() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let ids = enqueue_gated(pool, 2).await;
    let (probe, gate, h) = start(&db, 1, 1, None).await;
    wait_running(pool, 2, &probe, 1).await;

    // Cancel the one that waits (the other one's handler holds the only slot).
    let waiting = {
        let runs = probe.runs.lock().unwrap();
        let started = *runs.keys().next().unwrap();
        ids[if started == 0 { 1 } else { 0 }]
    };
    cancel_job(pool, waiting).await.unwrap();
    // The heartbeat (a third of the 2 s lease) finds its lease gone and drops it.
    eventually(Duration::from_secs(20), "the cancelled job dropped by its worker", || async {
        (WorkerStats::get(&h.stats().abandoned) == 1).then_some(())
    })
    .await;
    gate.add_permits(2);
    wait_all_finished(pool, Duration::from_secs(20)).await;
    h.shutdown().await;

    assert_eq!(probe.started(), 1, "the cancelled job never ran");
    assert_eq!(count(pool, JobState::Completed).await, 1);
    assert_eq!(oncely::get_job(pool, waiting).await.unwrap().state, JobState::Cancelled);
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_under_flow_control_are_not_claimed_ahead() {
    let db = TestDb::new().await;
    let pool = db.pool();
    // Four keyed jobs, each its own key (no key limit holds them back): only the one that can
    // start is claimed; a plain queue would claim all four.
    let jobs: Vec<_> =
        (0..4u64).map(|n| NewJob::new(&Gated { n }).unwrap().concurrency_key(format!("tenant:{n}"), Some(1))).collect();
    enqueue_many(pool, &jobs).await.unwrap();
    let (probe, gate, h) = start(&db, 1, 3, None).await;
    // The first claim had four claim slots and one run slot: it took one keyed job, not four.
    wait_running(pool, 1, &probe, 1).await;
    assert_eq!(count(pool, JobState::Running).await, 1, "no keyed job was claimed ahead");
    assert_eq!(WorkerStats::get(&h.stats().claimed), 1);

    gate.add_permits(4);
    wait_all_finished(pool, Duration::from_secs(20)).await;
    h.shutdown().await;
    assert_eq!(count(pool, JobState::Completed).await, 4);
    assert_eq!(probe.most_inside.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_claimed_again_while_its_earlier_attempt_waits_runs_once() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let ids = enqueue_gated(pool, 2).await;
    // A long lease: no heartbeat comes between the cancel and the new claim below.
    let (probe, gate, h) = start(&db, 1, 2, Some(Duration::from_secs(60))).await;
    wait_running(pool, 2, &probe, 1).await;
    let waiting = {
        let runs = probe.runs.lock().unwrap();
        ids[if runs.contains_key(&0) { 1 } else { 0 }]
    };
    // Cancel the waiting job and retry it: this worker, with a claim slot free, claims it again
    // while the earlier attempt still waits for the run slot.
    cancel_job(pool, waiting).await.unwrap();
    oncely::retry_job(pool, waiting).await.unwrap();
    eventually(Duration::from_secs(20), "the job claimed again", || async {
        let j = oncely::get_job(pool, waiting).await.unwrap();
        (j.state == JobState::Running && j.attempt == 2).then_some(())
    })
    .await;
    gate.add_permits(3);
    wait_all_finished(pool, Duration::from_secs(20)).await;
    h.shutdown().await;

    assert_eq!(count(pool, JobState::Completed).await, 2);
    let runs = probe.runs.lock().unwrap();
    assert_eq!(runs.values().sum::<u32>(), 2, "each job ran once: the earlier attempt did not run: {runs:?}");
}

/// A worker serving `default` with `concurrency` slots and an adaptive prefetch of up to 64, whose
/// handlers each take `time` (their own duration, not a synchronisation) and are counted.
async fn start_adaptive(db: &TestDb, concurrency: usize, time: Duration) -> (Arc<Probe>, WorkerHandle) {
    init_tracing();
    let probe = Arc::new(Probe::default());
    let seen = probe.clone();
    let h = builder(db.new_pool(5).await)
        .register(handler_fn(move |_ctx, a: Noop| {
            let probe = seen.clone();
            async move {
                *probe.runs.lock().unwrap().entry(a.n).or_default() += 1;
                let now = probe.inside.fetch_add(1, Ordering::SeqCst) + 1;
                probe.most_inside.fetch_max(now, Ordering::SeqCst);
                match time.is_zero() {
                    // Yield once, so that jobs handed out together overlap.
                    true => tokio::task::yield_now().await,
                    false => tokio::time::sleep(time).await,
                }
                probe.inside.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            }
        }))
        .queue("default", concurrency)
        .adaptive_prefetch(64)
        .build()
        .unwrap()
        .start();
    (probe, h)
}

/// Drain `jobs` such jobs, check each ran once and never beyond the concurrency, and return how
/// many were claimed ahead (`WorkerStats::claimed_ahead`).
async fn drain_adaptive(db: &TestDb, jobs: u64, concurrency: usize, time: Duration) -> u64 {
    let pool = db.pool();
    let news: Vec<_> = (0..jobs).map(|n| NewJob::new(&Noop { n }).unwrap()).collect();
    enqueue_many(pool, &news).await.unwrap();
    let (probe, h) = start_adaptive(db, concurrency, time).await;
    wait_all_finished(pool, Duration::from_secs(60)).await;
    let ahead = WorkerStats::get(&h.stats().claimed_ahead);
    h.shutdown().await;
    assert_eq!(count(pool, JobState::Completed).await, jobs as i64);
    let runs = probe.runs.lock().unwrap();
    assert_eq!(runs.len() as u64, jobs, "every job ran");
    assert!(runs.values().all(|&n| n == 1), "no job ran twice");
    drop(runs);
    assert!(
        probe.most_inside.load(Ordering::SeqCst) <= concurrency,
        "never more handlers at once than the concurrency"
    );
    ahead
}

/// The default, adaptive prefetch claims short jobs ahead: a handler of microseconds next to a
/// claim of a millisecond or more, so jobs wait claimed ahead for the two slots (and still never
/// run beyond them, each once).
#[tokio::test(flavor = "multi_thread")]
async fn an_adaptive_prefetch_claims_short_jobs_ahead() {
    let db = TestDb::new().await;
    let ahead = drain_adaptive(&db, 2000, 2, Duration::ZERO).await;
    assert!(ahead > 0, "no job was claimed ahead of the two slots");
}

/// ... and claims no long job ahead: with handlers of half a second, what two slots start within
/// one claim's time rounds down to none, so no job ever waits on this worker for a slot.
#[tokio::test(flavor = "multi_thread")]
async fn an_adaptive_prefetch_claims_no_long_job_ahead() {
    let db = TestDb::new().await;
    let ahead = drain_adaptive(&db, 8, 2, Duration::from_millis(500)).await;
    assert_eq!(ahead, 0, "jobs of half a second were claimed ahead");
}
