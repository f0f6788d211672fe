//! The effect ledger and steps on a real PostgreSQL: retries, duplicate jobs and concurrent
//! claimants never repeat an effect.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use oncely::core::ledger::{self, ClaimOptions, Claimed, LedgerKey};
use oncely::core::step::{DeferredRecords, StepScope};
use oncely::core::{with_idempotency, with_idempotency_transactional, StepError};
use oncely::{enqueue, enqueue_many, get_job, handler_fn, JobArgs, JobId, JobState, NewJob, Outcome};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

async fn usage_table(pool: &PgPool) {
    sqlx::query("CREATE TABLE usage (user_id bigint PRIMARY KEY, tokens bigint NOT NULL)").execute(pool).await.unwrap();
    sqlx::query("INSERT INTO usage VALUES (1, 0)").execute(pool).await.unwrap();
    sqlx::query("CREATE TABLE seen (job_id bigint, output bigint)").execute(pool).await.unwrap();
}

async fn usage(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT tokens FROM usage WHERE user_id = 1").fetch_one(pool).await.unwrap()
}

#[derive(Debug, Serialize, Deserialize)]
struct Report {
    report_id: i64,
    fail_until: i32,
}
impl JobArgs for Report {
    const KIND: &'static str = "report";
}

/// Generate (memoized), count usage once per report, then fail until `fail_until`.
fn report_handler(model_calls: Arc<AtomicU32>) -> impl oncely::Handler<Report> {
    handler_fn(move |ctx, r: Report| {
        let model_calls = model_calls.clone();
        async move {
            let tokens: i64 = ctx
                .step("generate")
                .run(|| async {
                    model_calls.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, std::io::Error>(1000 + r.report_id)
                })
                .await?;
            let counted: i64 = ctx
                .step("count_usage")
                .key(format!("usage:report:{}", r.report_id))
                .transactional(|tx| {
                    Box::pin(async move {
                        sqlx::query("UPDATE usage SET tokens = tokens + $1 WHERE user_id = 1")
                            .bind(tokens)
                            .execute(&mut *tx)
                            .await?;
                        Ok::<_, sqlx::Error>(tokens)
                    })
                })
                .await?;
            sqlx::query("INSERT INTO seen VALUES ($1, $2)").bind(ctx.id()).bind(counted).execute(ctx.pool()).await?;
            if ctx.attempt() < r.fail_until {
                return Err(Outcome::retry("failing after the increment"));
            }
            Ok(())
        }
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_failing_after_its_increment_retries_and_counts_usage_once() {
    init_tracing();
    let db = TestDb::new().await;
    usage_table(db.pool()).await;
    let id = enqueue(db.pool(), NewJob::new(&Report { report_id: 7, fail_until: 5 }).unwrap()).await.unwrap().id;
    let calls = Arc::new(AtomicU32::new(0));
    let h = builder(db.new_pool(5).await)
        .register(report_handler(calls.clone()))
        .queue("default", 2)
        .build()
        .unwrap()
        .start();
    wait_all_finished(db.pool(), Duration::from_secs(30)).await;
    h.shutdown().await;

    let job = get_job(db.pool(), id).await.unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Completed, 5), "failed 4 times after the increment");
    assert_eq!(usage(db.pool()).await, 1007, "counted once, not five times");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the memoized model call ran once");
    let outputs: Vec<i64> = sqlx::query_scalar("SELECT output FROM seen").fetch_all(db.pool()).await.unwrap();
    assert_eq!(outputs, vec![1007; 5], "every attempt saw the stored output");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_jobs_for_the_same_report_increment_once_and_see_the_same_output() {
    let db = TestDb::new().await;
    usage_table(db.pool()).await;
    let jobs = vec![
        NewJob::new(&Report { report_id: 9, fail_until: 0 }).unwrap(),
        NewJob::new(&Report { report_id: 9, fail_until: 0 }).unwrap(),
    ];
    let ids = enqueue_many(db.pool(), &jobs).await.unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let h = builder(db.new_pool(5).await)
        .register(report_handler(calls.clone()))
        .queue("default", 2)
        .build()
        .unwrap()
        .start();
    wait_all_finished(db.pool(), Duration::from_secs(30)).await;
    h.shutdown().await;

    assert_eq!(usage(db.pool()).await, 1009, "one increment for one report");
    let seen: Vec<(i64, i64)> =
        sqlx::query_as("SELECT job_id, output FROM seen ORDER BY job_id").fetch_all(db.pool()).await.unwrap();
    assert_eq!(seen, vec![(ids[0].id.0, 1009), (ids[1].id.0, 1009)]);
    for e in ids {
        assert_eq!(get_job(db.pool(), e.id).await.unwrap().state, JobState::Completed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_step_key_claimed_from_ten_connections_makes_one_effect_and_ten_identical_outputs() {
    let db = TestDb::new().await;
    usage_table(db.pool()).await;
    let pool = db.new_pool(12).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(10));
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let (pool, barrier) = (pool.clone(), barrier.clone());
            tokio::spawn(async move {
                // Ten different jobs, one business key.
                let scope = StepScope::new(pool, JobId(100 + i), 1);
                barrier.wait().await;
                scope
                    .step("count_usage")
                    .key("usage:report:42")
                    .transactional(|tx| {
                        Box::pin(async move {
                            let total: i64 = sqlx::query_scalar(
                                "UPDATE usage SET tokens = tokens + 500 WHERE user_id = 1 RETURNING tokens",
                            )
                            .fetch_one(&mut *tx)
                            .await?;
                            // Hold the transaction open a moment so the others pile up on the key.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            Ok::<_, sqlx::Error>(format!("counted:{total}:by:{}", 100 + i))
                        })
                    })
                    .await
                    .unwrap()
            })
        })
        .collect();
    let outputs: Vec<String> = futures::future::join_all(tasks).await.into_iter().map(Result::unwrap).collect();
    assert_eq!(usage(db.pool()).await, 500, "one effect");
    assert!(outputs.iter().all(|o| o == &outputs[0]), "ten identical outputs: {outputs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_plain_claims_run_once_and_the_rest_are_busy_or_replayed() {
    let db = TestDb::new().await;
    let pool = db.new_pool(12).await;
    let runs = Arc::new(AtomicU32::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(10));
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (pool, barrier, runs) = (pool.clone(), barrier.clone(), runs.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                with_idempotency(&pool, "checkout:user-7:req-1", Duration::from_secs(3600), || async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok::<_, std::io::Error>("cs_1".to_string())
                })
                .await
            })
        })
        .collect();
    let results: Vec<_> = futures::future::join_all(tasks).await.into_iter().map(Result::unwrap).collect();
    assert_eq!(runs.load(Ordering::SeqCst), 1, "one claimant ran");
    assert!(results.iter().all(|r| matches!(r, Ok(s) if s == "cs_1") || matches!(r, Err(StepError::Busy { .. }))));
    assert!(results.iter().any(|r| r.is_ok()));
    // Once finished, every later call replays.
    let later = with_idempotency(&pool, "checkout:user-7:req-1", Duration::from_secs(3600), || async {
        Ok::<_, std::io::Error>("cs_2".to_string())
    })
    .await
    .unwrap();
    assert_eq!(later, "cs_1");
}

/// Seed 001: "fire 10 concurrent requests, assert 1 result". With `.wait(..)` the duplicates of a
/// double-click wait for the first call and all get its result; none is refused.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_duplicates_that_wait_all_get_the_first_calls_result() {
    let db = TestDb::new().await;
    let pool = db.new_pool(12).await;
    let runs = Arc::new(AtomicU32::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(10));
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let (pool, barrier, runs) = (pool.clone(), barrier.clone(), runs.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                oncely::core::idempotent(&pool, "checkout:user-7:req-9")
                    .wait(Duration::from_secs(10))
                    .run(|| async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        Ok::<_, std::io::Error>(format!("cs_{i}"))
                    })
                    .await
            })
        })
        .collect();
    let results: Vec<String> =
        futures::future::join_all(tasks).await.into_iter().map(|r| r.unwrap().unwrap()).collect();
    assert_eq!(runs.load(Ordering::SeqCst), 1, "one call ran");
    assert!(results.iter().all(|r| r == &results[0]), "every caller got the first call's result: {results:?}");
}

/// `with_idempotency` hands `f` no key, so no callee's key window applies to it: a call that died
/// without a result a day ago runs again on the next call (it does not park).
#[tokio::test(flavor = "multi_thread")]
async fn with_idempotency_runs_again_after_a_crashed_call_however_old() {
    let db = TestDb::new().await;
    let pool = db.pool();
    claim_record(
        pool,
        oncely::core::IDEMPOTENCY_NAMESPACE,
        "export:7",
        Duration::ZERO,
        Some(Duration::from_secs(7 * 24 * 3600)),
    )
    .await;
    sqlx::query("UPDATE oncely.ledger SET created_at = now() - interval '25 hours'").execute(pool).await.unwrap();
    let out =
        with_idempotency(pool, "export:7", Duration::from_secs(3600), || async { Ok::<_, std::io::Error>(7) }).await;
    assert_eq!(out.unwrap(), 7);
}

/// The options of `idempotent`: a fingerprint refuses the key's reuse for another call, and a
/// record can be kept forever.
#[tokio::test(flavor = "multi_thread")]
async fn idempotent_checks_fingerprints_and_can_keep_a_record_forever() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let call = |fp: &'static str, out: &'static str| {
        // `Duration::MAX`: wait as long as it takes (nothing else holds the key here).
        oncely::core::idempotent(pool, "settle:req-1")
            .fingerprint(fp)
            .keep_forever()
            .wait(Duration::MAX)
            .run(move || async move { Ok::<_, std::io::Error>(out.to_string()) })
    };
    assert_eq!(call("units=5", "first").await.unwrap(), "first");
    assert_eq!(call("units=5", "second").await.unwrap(), "first", "same call: replayed");
    assert!(
        matches!(call("units=50", "third").await, Err(StepError::Mismatch { .. })),
        "same key, other call: refused"
    );
    let expires: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT expires_at FROM oncely.ledger WHERE key = 'settle:req-1'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(expires, None, "kept forever");
    // The same in a transaction, with the default TTL of a day.
    let tx_call = |fp: &'static str| {
        oncely::core::idempotent(pool, "settle:req-2").fingerprint(fp).transactional(|tx| {
            Box::pin(async move { sqlx::query_scalar::<_, i32>("SELECT 7").fetch_one(&mut *tx).await })
        })
    };
    assert_eq!(tx_call("a").await.unwrap(), 7);
    assert!(matches!(tx_call("b").await, Err(StepError::Mismatch { .. })));
    let ttl_hours: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM expires_at - created_at)::float8 / 3600 FROM oncely.ledger WHERE key = 'settle:req-2'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert!((23.9..24.1).contains(&ttl_hours), "{ttl_hours}");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_idempotency_runs_first_replays_second_and_runs_again_after_expiry() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let runs = AtomicU32::new(0);
    let call = || {
        with_idempotency(pool, "provision:project-1", Duration::from_secs(3600), || async {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            Ok::<_, std::io::Error>(format!("project-1 v{n}"))
        })
    };
    assert_eq!(call().await.unwrap(), "project-1 v1");
    assert_eq!(call().await.unwrap(), "project-1 v1", "replayed, not run");
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // An hour passes.
    sqlx::query("UPDATE oncely.ledger SET expires_at = now() - interval '1 second'").execute(pool).await.unwrap();
    assert_eq!(call().await.unwrap(), "project-1 v2", "expired: runs again");
    assert_eq!(runs.load(Ordering::SeqCst), 2);

    // A failed call stores nothing: the next call runs.
    let failed = with_idempotency(pool, "create_key:req-9", Duration::from_secs(300), || async {
        Err::<String, _>(std::io::Error::other("provider down"))
    })
    .await;
    assert!(matches!(failed, Err(StepError::Failed { .. })));
    let ok = with_idempotency(pool, "create_key:req-9", Duration::from_secs(300), || async {
        Ok::<_, std::io::Error>("key_1".to_string())
    })
    .await
    .unwrap();
    assert_eq!(ok, "key_1");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_idempotency_transactional_commits_effect_and_record_together() {
    let db = TestDb::new().await;
    let pool = db.pool();
    usage_table(pool).await;
    let add = |fail: bool| {
        with_idempotency_transactional(pool, "settle:invoice-3", Duration::from_secs(3600), move |tx| {
            Box::pin(async move {
                let t: i64 =
                    sqlx::query_scalar("UPDATE usage SET tokens = tokens + 10 WHERE user_id = 1 RETURNING tokens")
                        .fetch_one(&mut *tx)
                        .await?;
                if fail {
                    return Err(sqlx::Error::Protocol("failed after the write".into()));
                }
                Ok(t)
            })
        })
    };
    assert!(add(true).await.is_err());
    assert_eq!(usage(pool).await, 0, "a failed closure rolls its effect back");
    assert_eq!(add(false).await.unwrap(), 10);
    assert_eq!(add(false).await.unwrap(), 10);
    assert_eq!(usage(pool).await, 10);
}

#[tokio::test(flavor = "multi_thread")]
async fn ledger_claims_take_over_expired_leases_and_fence_the_old_holder() {
    let db = TestDb::new().await;
    let mut conn = db.pool().acquire().await.unwrap();
    let key = LedgerKey::new("test", "k");
    let opts = |owner: &'static str, fp: Option<&'static str>| ClaimOptions {
        owner,
        fingerprint: fp,
        lease: Duration::from_secs(30),
        ttl: Some(Duration::from_secs(3600)),
        supersedes: None,
        now: None,
        read_first: false,
    };
    let Claimed::Run { attempt: a1, took_over_from: None, .. } =
        ledger::claim(&mut conn, &key, &opts("a", Some("fp"))).await.unwrap()
    else {
        panic!("first claim runs")
    };
    assert!(
        matches!(ledger::claim(&mut conn, &key, &opts("b", Some("fp"))).await.unwrap(), Claimed::Busy { retry_after } if retry_after > Duration::from_secs(25))
    );
    assert_eq!(ledger::claim(&mut conn, &key, &opts("b", Some("other"))).await.unwrap(), Claimed::Mismatch);

    // A's lease runs out (injected clock: 31 s later); B takes over; A's late write is refused.
    let later = opts("b", Some("fp"));
    let later = ClaimOptions { now: Some(chrono::Utc::now() + chrono::Duration::seconds(31)), ..later };
    let Claimed::Run { attempt: a2, took_over_from, intent_age } =
        ledger::claim(&mut conn, &key, &later).await.unwrap()
    else {
        panic!("takeover")
    };
    assert_eq!((a2, took_over_from.as_deref()), (a1 + 1, Some("a")));
    assert!((30..40).contains(&intent_age.as_secs()), "the intent dates from A's claim, 31 s earlier: {intent_age:?}");
    let late = ledger::complete(&mut *conn, &key, a1, &serde_json::json!("from a"), None).await;
    assert!(matches!(late, Err(oncely::Error::LedgerClaimLost { .. })));
    ledger::complete(&mut *conn, &key, a2, &serde_json::json!("from b"), None).await.unwrap();
    assert_eq!(
        ledger::claim(&mut conn, &key, &opts("c", Some("fp"))).await.unwrap(),
        Claimed::Completed(serde_json::json!("from b"))
    );
}

#[derive(Debug, Serialize, Deserialize)]
struct Looper;
impl JobArgs for Looper {
    const KIND: &'static str = "looper";
}

#[tokio::test(flavor = "multi_thread")]
async fn a_step_name_used_twice_fails_the_job_and_explicit_keys_make_loops_work() {
    let db = TestDb::new().await;
    let bad =
        enqueue(db.pool(), NewJob::from_json(Looper::KIND, serde_json::json!(null)).queue("bad")).await.unwrap().id;
    let good =
        enqueue(db.pool(), NewJob::from_json(Looper::KIND, serde_json::json!(null)).queue("good")).await.unwrap().id;
    let h = builder(db.new_pool(5).await)
        .register(handler_fn(|ctx, _: Looper| async move {
            let explicit = ctx.queue() == "good";
            let mut sum = 0u32;
            for item in 0..3u32 {
                let step = ctx.step("charge_item");
                let step = if explicit { step.key(format!("job:{}:charge_item:{item}", ctx.id())) } else { step };
                sum += step.run(|| async move { Ok::<_, std::io::Error>(item) }).await?;
            }
            assert_eq!(sum, 3);
            Ok(())
        }))
        .queue("bad", 1)
        .queue("good", 1)
        .build()
        .unwrap()
        .start();
    wait_all_finished(db.pool(), Duration::from_secs(20)).await;
    h.shutdown().await;
    let j = get_job(db.pool(), bad).await.unwrap();
    assert_eq!((j.state, j.attempt), (JobState::Dead, 1), "a programming error is not retried");
    assert!(j.errors[0].message.contains("used twice"), "{}", j.errors[0].message);
    assert_eq!(get_job(db.pool(), good).await.unwrap().state, JobState::Completed);
}

#[tokio::test(flavor = "multi_thread")]
async fn ledger_cleanup_deletes_expired_records_keeps_live_ones_and_audits_the_run() {
    let db = TestDb::new().await;
    let pool = db.pool();
    for i in 0..25 {
        let ttl = if i < 20 { Duration::from_secs(1) } else { Duration::from_secs(3600) };
        with_idempotency(pool, &format!("k{i}"), ttl, || async { Ok::<_, std::io::Error>(i) }).await.unwrap();
    }
    sqlx::query("UPDATE oncely.ledger SET expires_at = now() - interval '1 second' WHERE expires_at < now() + interval '1 minute'")
        .execute(pool)
        .await
        .unwrap();
    let removed = ledger::cleanup_expired(pool, 7, Some("test")).await.unwrap();
    assert_eq!(removed, 20, "deleted in batches of 7 until none were left");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM oncely.ledger").fetch_one(pool).await.unwrap();
    assert_eq!(left, 5);
    let audit: Vec<(String, i64)> =
        sqlx::query_as("SELECT task, deleted FROM oncely.maintenance_runs").fetch_all(pool).await.unwrap();
    assert_eq!(audit, vec![("ledger_cleanup".to_string(), 20)]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_maintenance_leader_deletes_expired_keys_and_audits_each_run() {
    let db = TestDb::new().await;
    let pool = db.pool();
    for i in 0..3 {
        with_idempotency(pool, &format!("old{i}"), Duration::from_secs(3600), || async { Ok::<_, std::io::Error>(i) })
            .await
            .unwrap();
    }
    with_idempotency(pool, "live", Duration::from_secs(3600), || async { Ok::<_, std::io::Error>(9) }).await.unwrap();
    sqlx::query("UPDATE oncely.ledger SET expires_at = now() - interval '1 second' WHERE key LIKE 'old%'")
        .execute(pool)
        .await
        .unwrap();
    let h = builder(db.new_pool(5).await)
        .register(handler_fn(|_ctx, _: Looper| async move { Ok(()) }))
        .queue("default", 1)
        .configure(|c| c.ledger_cleanup_interval = Duration::from_millis(300))
        .build()
        .unwrap()
        .start();
    let deleted: i64 = eventually(Duration::from_secs(10), "an audited cleanup run", || async {
        sqlx::query_scalar("SELECT deleted FROM oncely.maintenance_runs WHERE task = 'ledger_cleanup' AND deleted > 0")
            .fetch_optional(pool)
            .await
            .unwrap()
    })
    .await;
    h.shutdown().await;
    assert_eq!(deleted, 3);
    let keys: Vec<String> = sqlx::query_scalar("SELECT key FROM oncely.ledger").fetch_all(pool).await.unwrap();
    assert_eq!(keys, vec!["live".to_string()]);
}

/// The maintenance schedule lives in `oncely.maintenance_runs`, not in a process: a worker that
/// starts long after the last cleanup (a fleet redeployed more often than the interval) cleans up
/// at once, and the next one to start, seconds later, does not clean up again.
#[tokio::test(flavor = "multi_thread")]
async fn cleanup_is_scheduled_from_the_last_audited_run_not_from_process_start() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    for i in 0..3 {
        with_idempotency(pool, &format!("old{i}"), Duration::from_secs(3600), || async { Ok::<_, std::io::Error>(i) })
            .await
            .unwrap();
    }
    sqlx::query("UPDATE oncely.ledger SET expires_at = now() - interval '1 second'").execute(pool).await.unwrap();
    sqlx::query(
        "INSERT INTO oncely.maintenance_runs (task, worker_id, started_at, deleted) \
         VALUES ('ledger_cleanup', 'gone', now() - interval '2 hours', 0)",
    )
    .execute(pool)
    .await
    .unwrap();
    let worker = |id: &'static str| {
        builder(pool.clone())
            .register(handler_fn(|_ctx, _: Looper| async move { Ok(()) }))
            .queue("default", 1)
            .configure(move |c| {
                c.worker_id = id.into();
                // The default: an hour. Without the audit table this worker would wait that long.
                c.ledger_cleanup_interval = Duration::from_secs(3600);
                c.prune_interval = Duration::from_millis(100);
            })
            .build()
            .unwrap()
            .start()
    };
    let first = worker("first");
    let deleted: i64 = eventually(Duration::from_secs(10), "a cleanup run by the new worker", || async {
        sqlx::query_scalar(
            "SELECT deleted FROM oncely.maintenance_runs WHERE task = 'ledger_cleanup' AND worker_id = 'first'",
        )
        .fetch_optional(pool)
        .await
        .unwrap()
    })
    .await;
    assert_eq!(deleted, 3);
    first.shutdown().await;

    let second = worker("second");
    // Wait for the second worker to lead maintenance (it records prune runs), then check that it
    // did not clean up again.
    eventually(Duration::from_secs(10), "the second worker's maintenance runs", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM oncely.maintenance_runs WHERE task = 'prune' AND worker_id = 'second'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        (n >= 2).then_some(())
    })
    .await;
    second.shutdown().await;
    let cleanups: Vec<String> =
        sqlx::query_scalar("SELECT worker_id FROM oncely.maintenance_runs WHERE task = 'ledger_cleanup' ORDER BY id")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(cleanups, vec!["gone".to_string(), "first".to_string()]);
}

/// Two runners of one maintenance task (a new leader while the old one still runs it, several
/// replicas) never run it at once: while another holds the task, `run_if_due` does not run it, and
/// once that one has recorded its run, the task is not due again until its interval has passed.
#[tokio::test(flavor = "multi_thread")]
async fn a_maintenance_task_running_elsewhere_is_not_run_again() {
    use oncely::core::maintenance::run_if_due;
    let db = TestDb::new().await;
    let pool = db.pool();
    let runs = AtomicU32::new(0);
    let work = || async {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok(0)
    };
    // Another runner holds the task.
    let mut other = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('oncely.maintenance/' || 'ledger_cleanup', 0))")
        .execute(&mut *other)
        .await
        .unwrap();
    let wait = run_if_due(pool, "ledger_cleanup", Duration::from_secs(3600), Some("me"), work).await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 0, "not run while held elsewhere");
    assert!(wait > Duration::ZERO && wait <= Duration::from_secs(60), "{wait:?}");
    // The other runner records its run and lets go: now it is not due for an hour.
    sqlx::query(
        "INSERT INTO oncely.maintenance_runs (task, worker_id, started_at) VALUES ('ledger_cleanup', 'other', now())",
    )
    .execute(&mut *other)
    .await
    .unwrap();
    other.commit().await.unwrap();
    let wait = run_if_due(pool, "ledger_cleanup", Duration::from_secs(3600), Some("me"), work).await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 0, "just run elsewhere");
    assert!(wait > Duration::from_secs(3500), "{wait:?}");
    // With a short interval it is due, runs once and is recorded.
    let wait = run_if_due(pool, "ledger_cleanup", Duration::ZERO, Some("me"), work).await.unwrap();
    assert_eq!((runs.load(Ordering::SeqCst), wait), (1, Duration::ZERO));
    let mine: i64 = sqlx::query_scalar("SELECT count(*) FROM oncely.maintenance_runs WHERE worker_id = 'me'")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(mine, 1);
}

#[derive(Debug, Serialize, Deserialize)]
struct SlowCall {
    n: i64,
}
impl JobArgs for SlowCall {
    const KIND: &'static str = "slow_call";
}

/// A step that runs longer than its lease keeps its key: a duplicate job waits instead of taking it
/// over and running the call a second time.
#[tokio::test(flavor = "multi_thread")]
async fn a_step_running_longer_than_its_lease_is_not_taken_over_by_a_duplicate() {
    const LEASE: Duration = Duration::from_millis(300);
    let db = TestDb::new().await;
    let jobs = vec![NewJob::new(&SlowCall { n: 1 }).unwrap(), NewJob::new(&SlowCall { n: 2 }).unwrap()];
    enqueue_many(db.pool(), &jobs).await.unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let h = builder(db.new_pool(6).await)
        .register(handler_fn(move |ctx, a: SlowCall| {
            let c = c.clone();
            async move {
                let out: i64 = ctx
                    .step("call")
                    .key("shared:slow-call")
                    .lease(LEASE)
                    .run(|| async {
                        c.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(LEASE * 4).await; // the call's own slowness
                        Ok::<_, std::io::Error>(a.n)
                    })
                    .await?;
                sqlx::query("CREATE TABLE IF NOT EXISTS outputs (n bigint)").execute(ctx.pool()).await?;
                sqlx::query("INSERT INTO outputs VALUES ($1)").bind(out).execute(ctx.pool()).await?;
                Ok(())
            }
        }))
        .queue("default", 2)
        .build()
        .unwrap()
        .start();
    wait_all_finished(db.pool(), Duration::from_secs(30)).await;
    h.shutdown().await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the slow call ran once");
    let outputs: Vec<i64> = sqlx::query_scalar("SELECT n FROM outputs").fetch_all(db.pool()).await.unwrap();
    assert_eq!(outputs.len(), 2);
    assert_eq!(outputs[0], outputs[1], "both jobs got the one call's output");
    let snoozed: i64 =
        sqlx::query_scalar("SELECT max(snoozes)::bigint FROM oncely.jobs").fetch_one(db.pool()).await.unwrap();
    assert!(snoozed >= 1, "the duplicate waited while the call ran");
}

// ---- deferred records: a job's first attempt writes its steps' records with its outcome ----------

async fn step_records(pool: &PgPool) -> Vec<(String, Option<serde_json::Value>)> {
    sqlx::query_as("SELECT key::text, output FROM oncely.ledger WHERE namespace = 'step' ORDER BY created_at, key")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// On a job's first attempt a memoized step runs without a claim and its record waits for the
/// attempt's outcome: no record exists until it is written, a business-key step still claims first,
/// and a later attempt replays what was written without calling again.
#[tokio::test(flavor = "multi_thread")]
async fn a_first_attempts_memoized_step_is_recorded_with_the_attempts_outcome_and_replayed_after() {
    let db = TestDb::new().await;
    let job = JobId(9);
    let calls = Arc::new(AtomicU32::new(0));
    let call = |n: u32| {
        let calls = calls.clone();
        move || async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(n)
        }
    };
    let deferred = DeferredRecords::default();
    let first = StepScope::new(db.pool().clone(), job, 1).with_deferred_records(Some(deferred.clone()));
    assert_eq!(first.step("a").run(call(7)).await.unwrap(), 7);
    assert!(step_records(db.pool()).await.is_empty(), "deferred: nothing written yet");
    assert_eq!(deferred.len(), 1);
    let biz: u32 = first.step("b").key("biz:1").run(call(8)).await.unwrap();
    assert_eq!(biz, 8);
    assert_eq!(step_records(db.pool()).await, [("biz:1".to_owned(), Some(serde_json::json!(8)))], "claimed first");
    assert_eq!(deferred.len(), 1, "a business key is never deferred");
    deferred.flush(db.pool()).await.unwrap();
    assert!(deferred.is_empty());
    let keys: Vec<String> = step_records(db.pool()).await.into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["job:9:a", "biz:1"], "ordered by when each step started, not when it was written");

    let second_deferred = DeferredRecords::default();
    let second = StepScope::new(db.pool().clone(), job, 2).with_deferred_records(Some(second_deferred.clone()));
    assert_eq!(second.step("a").run(call(99)).await.unwrap(), 7, "replayed");
    assert_eq!(calls.load(Ordering::SeqCst), 2, "a and b called once each");
    assert_eq!(second.step("c").run(call(3)).await.unwrap(), 3);
    assert!(second_deferred.is_empty(), "a later attempt claims and records at once");
    assert_eq!(step_records(db.pool()).await.len(), 3);
}

/// A zombie first attempt runs a transactional step without a claim (its record is inserted at
/// the end of its transaction) next to the attempt that replaced it, in the three orders: the
/// replacement committed first; the zombie inserts while the replacement's claim is uncommitted
/// (it waits on the row); the zombie commits first. One effect commits every time, and both
/// attempts return the output of the one that committed.
#[tokio::test(flavor = "multi_thread")]
async fn a_zombie_first_attempts_unclaimed_transactional_step_never_doubles_its_effect() {
    let db = TestDb::new().await;
    sqlx::query("CREATE TABLE effects (job_id bigint NOT NULL, who text NOT NULL)").execute(db.pool()).await.unwrap();
    type Gate = Option<(Arc<tokio::sync::Notify>, Arc<tokio::sync::Notify>)>;
    async fn charge(scope: &StepScope, job: JobId, who: &'static str, gate: Gate) -> Result<String, StepError> {
        scope
            .step("charge")
            .transactional(move |tx| {
                Box::pin(async move {
                    sqlx::query("INSERT INTO effects VALUES ($1, $2)").bind(job).bind(who).execute(&mut *tx).await?;
                    if let Some((inside, go)) = gate {
                        inside.notify_one();
                        go.notified().await;
                    }
                    Ok::<_, sqlx::Error>(format!("charged by {who}"))
                })
            })
            .await
    }
    for (n, order) in ["current commits first", "zombie waits on current", "zombie commits first"].iter().enumerate() {
        let job = JobId(100 + n as i64);
        let zombie =
            StepScope::new(db.new_pool(2).await, job, 1).with_deferred_records(Some(DeferredRecords::default()));
        let current = StepScope::new(db.new_pool(2).await, job, 2);
        let (zombie_out, current_out) = match n {
            0 => {
                let c = charge(&current, job, "current", None).await;
                (charge(&zombie, job, "zombie", None).await, c)
            }
            1 => {
                let (inside, go) = (Arc::new(tokio::sync::Notify::new()), Arc::new(tokio::sync::Notify::new()));
                let pool = db.pool().clone();
                let release = async {
                    // The zombie's insert waits on the current attempt's uncommitted claim.
                    oncely_testkit::eventually(Duration::from_secs(10), "the zombie waits on the claim", || {
                        let pool = pool.clone();
                        async move {
                            let waiting: i64 = sqlx::query_scalar(
                                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE '%INSERT INTO oncely.ledger%'",
                            )
                            .fetch_one(&pool)
                            .await
                            .unwrap();
                            (waiting > 0).then_some(())
                        }
                    })
                    .await;
                    go.notify_one();
                };
                let current_run = charge(&current, job, "current", Some((inside.clone(), go.clone())));
                let zombie_run = async {
                    inside.notified().await;
                    charge(&zombie, job, "zombie", None).await
                };
                let (c, z, ()) = tokio::join!(current_run, zombie_run, release);
                (z, c)
            }
            _ => {
                let z = charge(&zombie, job, "zombie", None).await;
                (z, charge(&current, job, "current", None).await)
            }
        };
        let effects: Vec<String> = sqlx::query_scalar("SELECT who FROM effects WHERE job_id = $1")
            .bind(job)
            .fetch_all(db.pool())
            .await
            .unwrap();
        assert_eq!(effects.len(), 1, "{order}: one effect, got {effects:?}");
        let winner = format!("charged by {}", effects[0]);
        assert_eq!(zombie_out.unwrap(), winner, "{order}");
        assert_eq!(current_out.unwrap(), winner, "{order}");
        let expected = if n == 2 { "zombie" } else { "current" };
        assert_eq!(effects[0], expected, "{order}");
    }
}
