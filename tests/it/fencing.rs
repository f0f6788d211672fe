//! Fencing corners: zombie attempts and the ledger, handlers that outlive their lease, completing
//! in the handler's own transaction, memoized steps after a long crash, and lease-lost reports for
//! jobs that simply completed. Real PostgreSQL, separate connections.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use oncely::core::ledger::{self, ClaimOptions, Claimed, LedgerKey};
use oncely::core::step::StepScope;
use oncely::worker::WorkerStats;
use oncely::{enqueue, enqueue_many, get_job, handler_fn, JobArgs, JobId, JobState, NewJob, OnUnknown, StepError};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

fn claim_opts<'a>(owner: &'a str, supersedes: Option<&'a str>) -> ClaimOptions<'a> {
    ClaimOptions {
        owner,
        fingerprint: None,
        lease: Duration::from_secs(300),
        ttl: Some(Duration::from_secs(3600)),
        supersedes,
        now: None,
        read_first: false,
    }
}

/// A later attempt of a job supersedes an earlier attempt's live claim; an earlier (zombie) or
/// the same attempt never supersedes a later one. Attempts compare as numbers: 10 is after 9.
#[tokio::test(flavor = "multi_thread")]
async fn fencing_ledger_claims_are_superseded_only_by_later_attempts_compared_as_numbers() {
    let db = TestDb::new().await;
    let (pool_a, pool_b) = (db.new_pool(1).await, db.new_pool(1).await);
    let key = LedgerKey::new("step", "job:7:charge");
    let claim = |pool: sqlx::PgPool, owner: &'static str| {
        let key = key.clone();
        async move { ledger::claim(&mut pool.acquire().await.unwrap(), &key, &claim_opts(owner, Some("job:7:"))).await }
    };
    assert!(matches!(claim(pool_a.clone(), "job:7:10").await.unwrap(), Claimed::Run { took_over_from: None, .. }));
    // Attempt 9 is a zombie next to attempt 10 (a string comparison would put "9" after "10").
    assert!(matches!(claim(pool_b.clone(), "job:7:9").await.unwrap(), Claimed::Busy { .. }));
    // The same attempt does not take its own live claim over either.
    assert!(matches!(claim(pool_b.clone(), "job:7:10").await.unwrap(), Claimed::Busy { .. }));
    // Another job whose id starts alike is not an attempt of job 7.
    let other = ledger::claim(&mut pool_b.acquire().await.unwrap(), &key, &claim_opts("job:70:11", Some("job:70:")))
        .await
        .unwrap();
    assert!(matches!(other, Claimed::Busy { .. }), "{other:?}");
    // Attempt 11 replaces attempt 10 at once, lease or not.
    let Claimed::Run { took_over_from, .. } = claim(pool_b.clone(), "job:7:11").await.unwrap() else {
        panic!("a later attempt supersedes")
    };
    assert_eq!(took_over_from.as_deref(), Some("job:7:10"));
    // An owner that does not carry an attempt after the prefix is refused with a typed error.
    let bad = claim(pool_a.clone(), "job:7:x").await.unwrap_err();
    assert!(matches!(bad, oncely::Error::InvalidInput(ref m) if m.contains("attempt number")), "{bad}");
}

/// Attempt N lost its lease but its handler still runs (a zombie) while attempt N+1 runs the same
/// `run` or `external` step: the zombie must not take N+1's claim over and call again. It finds
/// the key busy while N+1 calls, and N+1's stored output once N+1 recorded it: one call in all.
#[tokio::test(flavor = "multi_thread")]
async fn fencing_a_zombie_attempt_never_takes_a_step_over_from_the_attempt_that_replaced_it() {
    let db = TestDb::new().await;
    let job = JobId(42);
    for form in ["run", "external"] {
        let calls = Arc::new(AtomicU32::new(0));
        let (started, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        // Each attempt on its own pool: separate connections, as separate workers would have.
        let current = StepScope::new(db.new_pool(2).await, job, 3);
        let zombie = StepScope::new(db.new_pool(2).await, job, 2);
        let late_zombie = StepScope::new(db.new_pool(2).await, job, 2);
        let gate = Gate { calls: calls.clone(), started: started.clone(), release: release.clone() };
        let step = |scope, who| zombie_step(scope, form, who, gate.clone());
        // Attempt N+1 calls; while its call is in flight, the zombie reaches the same step.
        let (current_out, busy) = tokio::join!(step(&current, "current"), async {
            started.notified().await;
            let busy = step(&zombie, "zombie").await;
            release.notify_one();
            busy
        });
        assert!(matches!(busy, Err(StepError::Busy { .. })), "{form}: the zombie finds the key busy: {busy:?}");
        assert_eq!(current_out.unwrap(), "charged by current", "{form}: N+1 records its call");
        let replay = step(&late_zombie, "zombie").await.unwrap();
        assert_eq!(replay, "charged by current", "{form}: the zombie gets the stored output");
        assert_eq!(calls.load(Ordering::SeqCst), 1, "{form}: exactly one call");
    }
}

#[derive(Clone)]
struct Gate {
    calls: Arc<AtomicU32>,
    started: Arc<Notify>,
    release: Arc<Notify>,
}

/// Run step `form` (`run` or `external`) as attempt `who`: it counts its call, and the current
/// attempt's call waits for `release` once `started`.
async fn zombie_step(scope: &StepScope, form: &str, who: &'static str, gate: Gate) -> Result<String, StepError> {
    let f = move || async move {
        gate.calls.fetch_add(1, Ordering::SeqCst);
        if who == "current" {
            gate.started.notify_one();
            gate.release.notified().await;
        }
        Ok::<_, std::io::Error>(format!("charged by {who}"))
    };
    let step = scope.step(form);
    match form {
        "run" => step.run(f).await,
        _ => step.external(OnUnknown::RetrySameKey, |_key| f()).await,
    }
}

/// `Step::run` hands its closure no key, so an earlier attempt that crashed mid-step, however long
/// ago, is simply run again: it never parks the job asking about a key nobody received.
#[tokio::test(flavor = "multi_thread")]
async fn fencing_a_memoized_step_runs_again_after_a_crash_more_than_a_day_old() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let job = JobId(5);
    // Two intents whose holders died 25 hours ago, with no result: one under the job's default
    // step key, one under a business key.
    let own = claim_record(pool, "step", "job:5:generate", Duration::ZERO, Some(Duration::from_secs(86400 * 30))).await;
    let shared = claim_record(pool, "step", "memo:report:9", Duration::ZERO, None).await;
    for record in [&own, &shared] {
        sqlx::query("UPDATE oncely.ledger SET created_at = now() - interval '25 hours', updated_at = now() - interval '25 hours' WHERE key = $1")
            .bind(&record.key)
            .execute(pool)
            .await
            .unwrap();
    }
    let runs = Arc::new(AtomicU32::new(0));
    let scope = StepScope::new(pool.clone(), job, 2);
    let work = |n: i64| {
        let runs = runs.clone();
        move || async move {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(n)
        }
    };
    let generated = scope.step("generate").run(work(1200)).await;
    assert_eq!(generated.unwrap(), 1200, "the job's own step ran again");
    let memo = scope.step("memo").key("memo:report:9").run(work(7)).await;
    assert_eq!(memo.unwrap(), 7, "the business-keyed step ran again");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    let states: Vec<String> =
        sqlx::query_scalar("SELECT state::text FROM oncely.ledger ORDER BY key").fetch_all(pool).await.unwrap();
    assert_eq!(states, ["completed", "completed"], "both recorded, neither parked");
}

#[derive(Debug, Serialize, Deserialize)]
struct Stubborn;
impl JobArgs for Stubborn {
    const KIND: &'static str = "stubborn";
}

/// Sets `dropped` and keeps the counter's value when the handler's future is dropped.
struct DropGuard {
    dropped: Arc<AtomicBool>,
    counter: Arc<AtomicU64>,
    at_drop: Arc<AtomicU64>,
}
impl Drop for DropGuard {
    fn drop(&mut self) {
        self.at_drop.store(self.counter.load(Ordering::SeqCst), Ordering::SeqCst);
        self.dropped.store(true, Ordering::SeqCst);
    }
}

/// A handler that ignores cancellation and keeps counting is dropped once its lease is lost (here:
/// a person cancels the job) and the grace period has passed: its counter stops growing, and
/// nothing is written for the job.
#[tokio::test(flavor = "multi_thread")]
async fn fencing_a_handler_that_ignores_a_lost_lease_is_dropped_after_the_grace_period() {
    init_tracing();
    const GRACE: Duration = Duration::from_millis(500);
    let db = TestDb::new().await;
    let pool = db.pool();
    let (counter, at_drop, dropped) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
    let (c, a, d) = (counter.clone(), at_drop.clone(), dropped.clone());
    let h = builder(db.new_pool(4).await)
        .register(handler_fn(move |_ctx, _: Stubborn| {
            let guard = DropGuard { dropped: d.clone(), counter: c.clone(), at_drop: a.clone() };
            async move {
                // Busy with something other than its cancellation token, for ever.
                while guard.counter.fetch_add(1, Ordering::SeqCst) < u64::MAX {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Ok(())
            }
        }))
        .queue("default", 1)
        .lease(Duration::from_millis(600))
        .configure(|c| {
            c.lease_lost_grace = GRACE;
            c.job_timeout = Duration::from_secs(3600);
        })
        .build()
        .unwrap()
        .start();
    let id = enqueue(pool, NewJob::new(&Stubborn).unwrap()).await.unwrap().id;
    eventually(Duration::from_secs(10), "the handler to be counting", || async {
        (counter.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    oncely::cancel_job(&mut pool.acquire().await.unwrap(), id).await.unwrap();
    // A heartbeat (every 200 ms) finds the lease lost, then the grace period runs; the margin is
    // for a loaded machine.
    eventually(GRACE + Duration::from_secs(5), "the handler's future to be dropped", || async {
        dropped.load(Ordering::SeqCst).then_some(())
    })
    .await;
    let frozen = at_drop.load(Ordering::SeqCst);
    assert!(frozen > 0);
    assert_eq!(counter.load(Ordering::SeqCst), frozen, "nothing counts once the future is dropped");
    let stats = h.stats();
    assert_eq!(WorkerStats::get(&stats.lost_while_running), 1);
    assert_eq!(WorkerStats::get(&stats.abandoned), 1);
    h.shutdown().await;
    assert_eq!(counter.load(Ordering::SeqCst), frozen, "still not counting after shutdown");
    let job = get_job(pool, id).await.unwrap();
    assert_eq!((job.state, job.errors.len()), (JobState::Cancelled, 0), "the abandoned attempt wrote nothing");
}

/// A handler that stops when told to is not dropped: it returns within the grace period, and its
/// write is refused (fenced) as the lease is lost.
#[tokio::test(flavor = "multi_thread")]
async fn fencing_a_handler_that_stops_when_told_is_not_abandoned() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let h = builder(db.new_pool(4).await)
        .register(handler_fn(|ctx, _: Stubborn| async move {
            ctx.cancelled().await;
            Err(oncely::Outcome::retry("stopped: lease lost"))
        }))
        .queue("default", 1)
        .lease(Duration::from_millis(600))
        .configure(|c| c.lease_lost_grace = Duration::from_secs(3600))
        .build()
        .unwrap()
        .start();
    let id = enqueue(pool, NewJob::new(&Stubborn).unwrap()).await.unwrap().id;
    eventually(Duration::from_secs(10), "the job to run", || async {
        (get_job(pool, id).await.unwrap().state == JobState::Running).then_some(())
    })
    .await;
    oncely::cancel_job(&mut pool.acquire().await.unwrap(), id).await.unwrap();
    eventually(Duration::from_secs(10), "the handler's refused write", || async {
        (WorkerStats::get(&h.stats().lease_lost) == 1).then_some(())
    })
    .await;
    assert_eq!(WorkerStats::get(&h.stats().abandoned), 0);
    h.shutdown().await;
    assert_eq!(get_job(pool, id).await.unwrap().state, JobState::Cancelled);
}

#[derive(Debug, Serialize, Deserialize)]
struct Pay {
    order: i64,
    /// `commit`, `rollback_once`, `hold` (commit, then keep running until told), `lost` (wait for
    /// the lease to be lost, then try).
    mode: String,
}
impl JobArgs for Pay {
    const KIND: &'static str = "pay";
}

/// `complete_in`: the effect and the job's completion commit together. The worker does not
/// complete the job again, and no lost lease is reported — not even while the handler keeps
/// running after its commit and heartbeats go by. A rolled back transaction leaves the job running
/// under its claim, and the attempt is retried. A lost lease is refused with `LeaseLost`.
#[tokio::test(flavor = "multi_thread")]
async fn fencing_complete_in_commits_the_effect_and_the_completion_together() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    sqlx::query("CREATE TABLE payments (job_id bigint, attempt int)").execute(pool).await.unwrap();
    let hold = Arc::new(Notify::new());
    let (lost_tx, mut lost_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let h = {
        let hold = hold.clone();
        builder(db.new_pool(6).await)
            .register(handler_fn(move |ctx, p: Pay| {
                let (hold, lost_tx) = (hold.clone(), lost_tx.clone());
                async move {
                    if p.mode == "lost" {
                        ctx.cancelled().await;
                    }
                    let mut tx = oncely::core::txn::begin(ctx.pool()).await?;
                    sqlx::query("INSERT INTO payments VALUES ($1, $2)")
                        .bind(ctx.id().0)
                        .bind(ctx.attempt())
                        .execute(&mut *tx)
                        .await?;
                    match ctx.complete_in(&mut tx).await {
                        Ok(()) => {}
                        Err(e) => {
                            let _ = lost_tx.send(e.to_string());
                            return Err(e.into());
                        }
                    }
                    if p.mode == "rollback_once" && ctx.attempt() == 1 {
                        tx.rollback().await?;
                        return Ok(());
                    }
                    tx.commit().await?;
                    if p.mode == "hold" {
                        hold.notified().await;
                    }
                    Ok(())
                }
            }))
            .queue("default", 4)
            .lease(Duration::from_millis(600))
            .configure(|c| c.lease_lost_grace = Duration::from_secs(60))
            .build()
            .unwrap()
            .start()
    };
    let jobs = [("hold", 1), ("commit", 2), ("rollback_once", 3)]
        .map(|(mode, order)| NewJob::new(&Pay { order, mode: mode.into() }).unwrap());
    let ids: Vec<JobId> = enqueue_many(pool, &jobs).await.unwrap().iter().map(|e| e.id).collect();
    let (held, committed, rolled_back) = (ids[0], ids[1], ids[2]);

    // The held job is completed in the database while its handler still runs. Let heartbeats go
    // by (every 200 ms): they must not take it for a lost lease.
    eventually(Duration::from_secs(10), "the held job completed by its handler", || async {
        (get_job(pool, held).await.unwrap().state == JobState::Completed).then_some(())
    })
    .await;
    let lost_id = enqueue(pool, NewJob::new(&Pay { order: 4, mode: "lost".into() }).unwrap()).await.unwrap().id;
    let leases = || async {
        sqlx::query_scalar::<_, Option<chrono::DateTime<chrono::Utc>>>(
            "SELECT lease_expires_at FROM oncely.jobs WHERE id = $1 AND state = 'running'",
        )
        .bind(lost_id.0)
        .fetch_optional(pool)
        .await
        .unwrap()
        .flatten()
    };
    let first = eventually(Duration::from_secs(10), "the lost job running", leases).await;
    let second =
        eventually(Duration::from_secs(10), "a heartbeat", || async { leases().await.filter(|l| *l > first) }).await;
    eventually(Duration::from_secs(10), "another heartbeat", || async { leases().await.filter(|l| *l > second) }).await;
    assert_eq!(WorkerStats::get(&h.stats().lost_while_running), 0, "no lost lease reported for the held job");
    hold.notify_one();

    // A person cancels the last job: its handler's complete_in is refused with LeaseLost.
    oncely::cancel_job(&mut pool.acquire().await.unwrap(), lost_id).await.unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(10), lost_rx.recv()).await.unwrap().unwrap();
    assert!(refused.contains("lease lost"), "{refused}");
    wait_all_finished(pool, Duration::from_secs(20)).await;
    // Shutdown waits for the handlers and their writes.
    h.shutdown().await;
    let stats = h.stats();
    let (completed, lease_lost, lost_running) = (
        WorkerStats::get(&stats.completed),
        WorkerStats::get(&stats.lease_lost),
        WorkerStats::get(&stats.lost_while_running),
    );

    let payments: Vec<(i64, i32)> =
        sqlx::query_as("SELECT job_id, attempt FROM payments ORDER BY job_id, attempt").fetch_all(pool).await.unwrap();
    assert_eq!(
        payments,
        [(held.0, 1), (committed.0, 1), (rolled_back.0, 2)],
        "one effect per job, with its completion"
    );
    for id in [held, committed] {
        let j = get_job(pool, id).await.unwrap();
        assert_eq!((j.state, j.attempt, j.errors.len()), (JobState::Completed, 1, 0));
    }
    let j = get_job(pool, rolled_back).await.unwrap();
    assert_eq!((j.state, j.attempt), (JobState::Completed, 2), "the rolled back attempt was retried");
    assert!(j.errors[0].message.contains("did not commit"), "{:?}", j.errors);
    assert_eq!(get_job(pool, lost_id).await.unwrap().state, JobState::Cancelled);
    assert_eq!(completed, 3, "each completion counted once");
    // The cancelled job is the only real loss: its handler's own error write was refused once,
    // and the heartbeat reported it once.
    assert_eq!((lease_lost, lost_running), (1, 1), "no false lease-lost report");
}

/// Many short jobs with a heartbeat every 100 ms: completions commit while the heartbeat is reading
/// the running set, and none of them is reported as a lost lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fencing_jobs_that_just_completed_are_never_reported_as_lost_leases() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    let jobs: Vec<_> = (0..3000).map(|n| NewJob::new(&Noop { n }).unwrap()).collect();
    enqueue_many(pool, &jobs).await.unwrap();
    let h = builder(db.new_pool(6).await)
        .register(handler_fn(|_ctx, _: Noop| async move { Ok(()) }))
        .queue("default", 32)
        .lease(Duration::from_millis(300))
        .build()
        .unwrap()
        .start();
    wait_all_finished(pool, Duration::from_secs(120)).await;
    h.shutdown().await;
    let stats = h.stats();
    let (completed, lease_lost, lost_running) = (
        WorkerStats::get(&stats.completed),
        WorkerStats::get(&stats.lease_lost),
        WorkerStats::get(&stats.lost_while_running),
    );
    assert_eq!(count(pool, JobState::Completed).await, 3000);
    assert_eq!(completed, 3000);
    assert_eq!((lease_lost, lost_running), (0, 0), "no false lease-lost report");
}

/// The race made to happen every time: the completion of a job is written, and before the job
/// leaves the worker's running set two heartbeat rounds run, each finding the job no longer
/// running. It completed on purpose: no lease-lost report, and its handler is not told to stop.
#[tokio::test(flavor = "multi_thread")]
async fn fencing_a_heartbeat_between_a_completion_and_its_removal_reports_nothing() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    let written = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let (w, r) = (written.clone(), release.clone());
    let hook: oncely::worker::CompletionHook = Arc::new(move |_claims| {
        let (w, r) = (w.clone(), r.clone());
        Box::pin(async move {
            w.notify_one();
            r.notified().await;
        })
    });
    let id = enqueue(pool, NewJob::new(&Noop { n: 1 }).unwrap()).await.unwrap().id;
    let h = builder(db.new_pool(4).await)
        .register(handler_fn(|_ctx, _: Noop| async move { Ok(()) }))
        .queue("default", 4)
        .lease(Duration::from_millis(600))
        .completion_hook(hook)
        .build()
        .unwrap()
        .start();
    tokio::time::timeout(Duration::from_secs(20), written.notified()).await.expect("the completion is written");
    assert_eq!(get_job(pool, id).await.unwrap().state, JobState::Completed, "committed before the hook");
    let stats = h.stats();
    let beats = WorkerStats::get(&stats.heartbeats);
    // Two rounds while the job is still in the running set (or a false report, which ends the
    // rounds: a job reported lost is no longer heartbeated).
    eventually(Duration::from_secs(20), "two heartbeat rounds, or a lease-lost report", || async {
        (WorkerStats::get(&stats.heartbeats) >= beats + 2 || WorkerStats::get(&stats.lost_while_running) > 0)
            .then_some(())
    })
    .await;
    release.notify_one();
    h.shutdown().await;
    assert_eq!(WorkerStats::get(&stats.completed), 1);
    assert_eq!(
        (WorkerStats::get(&stats.lease_lost), WorkerStats::get(&stats.lost_while_running)),
        (0, 0),
        "a job that completed is not a lost lease"
    );
}

/// A claim's commit is durable even in a session that commits asynchronously. With
/// `synchronous_commit = off`, a claim lost in a database crash would put its job back at the
/// previous attempt number and the next claim would hand that number (the fencing token) out
/// again, so the worker that started the job before the crash could write over the second
/// worker's claim. Each claim statement sets `on` for its own transaction when the session has
/// `off`, and leaves a stronger or local setting as it is.
#[tokio::test(flavor = "multi_thread")]
async fn every_claim_commits_durably_even_in_a_session_that_commits_asynchronously() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    enqueue_many(pool, &[NewJob::new(&Noop { n: 1 }).unwrap(), NewJob::new(&Noop { n: 2 }).unwrap()]).await.unwrap();
    let claims = [
        ("JOB_CLAIM", "'default', 1, 30, 'w', false"),
        ("JOB_CLAIM_WINDOWED", "'default', 1, 30, 'w', '{0}', ARRAY[now() - interval '1 hour']"),
        // No key has jobs: the statement claims nothing, and its commit is still made durable.
        ("FLOW_CLAIM", "'default', '{tenant:1}', 1, 30, 'w', 1"),
    ];
    let mut conn = sqlx::Connection::connect(db.url()).await.unwrap();
    let conn: &mut sqlx::PgConnection = &mut conn;
    for (name, args) in claims {
        let sql = oncely::core::HOT_STATEMENTS.iter().find(|(n, _)| *n == name).map(|(_, sql)| *sql).unwrap();
        for (session, at_commit) in [("off", "on"), ("local", "local"), ("remote_write", "remote_write"), ("on", "on")]
        {
            sqlx::query("BEGIN").execute(&mut *conn).await.unwrap();
            sqlx::query(&format!("SET LOCAL synchronous_commit = {session}")).execute(&mut *conn).await.unwrap();
            sqlx::query(&format!("PREPARE claim AS {sql}")).execute(&mut *conn).await.unwrap();
            let claimed = sqlx::query(&format!("EXECUTE claim({args})")).fetch_all(&mut *conn).await.unwrap().len();
            let shown: String = sqlx::query_scalar("SHOW synchronous_commit").fetch_one(&mut *conn).await.unwrap();
            sqlx::query("ROLLBACK").execute(&mut *conn).await.unwrap();
            sqlx::query("DEALLOCATE claim").execute(&mut *conn).await.unwrap();
            assert_eq!(shown, at_commit, "{name} in a session with synchronous_commit = {session}");
            assert_eq!(claimed, usize::from(name != "FLOW_CLAIM"), "{name} claimed {claimed}");
        }
    }
    // And through the Rust API, on a transaction of the caller's.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL synchronous_commit = off").execute(&mut *tx).await.unwrap();
    let jobs = oncely::core::lease::claim_jobs(&mut *tx, "default", 2, "w", Duration::from_secs(30)).await.unwrap();
    let shown: String = sqlx::query_scalar("SHOW synchronous_commit").fetch_one(&mut *tx).await.unwrap();
    assert_eq!((jobs.len(), shown.as_str()), (2, "on"));
}
