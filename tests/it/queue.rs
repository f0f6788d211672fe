//! The queue on a real PostgreSQL: transactional enqueue, unique keys under concurrency, batches,
//! fencing, cancel and retry, bad input.

use std::time::Duration;

use crate::common::*;
use oncely::core::lease::{self, Claim};
use oncely::core::maintenance::rescue_expired;
use oncely::core::ErrorKind;
use oncely::{enqueue, enqueue_many, get_job, Error, JobState, NewJob};
use sqlx::Connection;

#[tokio::test(flavor = "multi_thread")]
async fn a_rolled_back_enqueue_leaves_no_job_and_a_committed_one_does() {
    let db = TestDb::new().await;
    let pool = db.pool();
    sqlx::query("CREATE TABLE orders (id bigint PRIMARY KEY)").execute(pool).await.unwrap();

    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO orders VALUES (1)").execute(&mut *tx).await.unwrap();
    let rolled_back = enqueue(&mut *tx, NewJob::new(&Noop { n: 1 }).unwrap()).await.unwrap();
    tx.rollback().await.unwrap();

    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO orders VALUES (2)").execute(&mut *tx).await.unwrap();
    let committed = enqueue(&mut *tx, NewJob::new(&Noop { n: 2 }).unwrap()).await.unwrap();
    tx.commit().await.unwrap();

    assert!(matches!(get_job(pool, rolled_back.id).await, Err(Error::JobNotFound(_))));
    let job = get_job(pool, committed.id).await.unwrap();
    assert_eq!(job.state, JobState::Available);
    assert_eq!(job.args::<Noop>().unwrap().n, 2);
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM oncely.jobs").fetch_one(pool).await.unwrap();
    assert_eq!(jobs, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_enqueues_with_one_unique_key_make_one_job() {
    let db = TestDb::new().await;
    // 50 separate connections, released together.
    let mut conns = Vec::new();
    for _ in 0..50 {
        conns.push(sqlx::PgConnection::connect_with(&db.url().parse().unwrap()).await.unwrap());
    }
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(50));
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut conn)| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                let job = NewJob::new(&Noop { n: i as u64 }).unwrap().unique_key("report:42");
                enqueue(&mut conn, job).await.unwrap()
            })
        })
        .collect();
    let results: Vec<_> = futures::future::join_all(tasks).await.into_iter().map(Result::unwrap).collect();

    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM oncely.jobs").fetch_one(db.pool()).await.unwrap();
    assert_eq!(jobs, 1, "exactly one job for the unique key");
    let first = results[0].id;
    assert!(results.iter().all(|r| r.id == first), "every enqueue returns the same job");
    assert_eq!(results.iter().filter(|r| !r.existing).count(), 1, "exactly one enqueue created it");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_unique_key_is_free_again_once_its_job_finished() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let job = || NewJob::new(&Noop { n: 0 }).unwrap().unique_key("k");
    let first = enqueue(pool, job()).await.unwrap();
    let again = enqueue(pool, job()).await.unwrap();
    assert_eq!((again.id, again.existing), (first.id, true));

    let claimed = lease::claim_jobs(pool, "default", 1, "w", Duration::from_secs(30)).await.unwrap();
    let still = enqueue(pool, job()).await.unwrap();
    assert_eq!((still.id, still.existing), (first.id, true), "a running job still holds its key");

    lease::complete_job(pool, Claim::from(&claimed[0])).await.unwrap();
    let after = enqueue(pool, job()).await.unwrap();
    assert!(!after.existing);
    assert_ne!(after.id, first.id);
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_jobs_in_one_call_keep_their_order() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let mut jobs: Vec<NewJob> = (0..10_000).map(|n| NewJob::new(&Noop { n }).unwrap()).collect();
    // Duplicate unique keys inside the batch collapse onto the first.
    jobs[10] = jobs[10].clone().unique_key("dup");
    jobs[20] = jobs[20].clone().unique_key("dup");
    let out = enqueue_many(pool, &jobs).await.unwrap();
    assert_eq!(out.len(), 10_000);
    assert_eq!(out[20].id, out[10].id);
    assert!(out[20].existing && !out[10].existing);

    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM oncely.jobs").fetch_one(pool).await.unwrap();
    assert_eq!(total, 9_999);
    for i in [0usize, 1, 4_999, 9_999] {
        let job = get_job(pool, out[i].id).await.unwrap();
        assert_eq!(job.args::<Noop>().unwrap().n, i as u64, "result {i} names the job made from input {i}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_worker_cannot_complete_or_fail_a_job_taken_over_by_another() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let id = enqueue(pool, NewJob::new(&Noop { n: 0 }).unwrap()).await.unwrap().id;

    let a = lease::claim_jobs(pool, "default", 10, "worker-a", Duration::from_secs(30)).await.unwrap();
    let stale = Claim::from(&a[0]);
    // Worker A stalls past its lease; the rescuer hands the job back and worker B claims it.
    sqlx::query("UPDATE oncely.jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await
        .unwrap();
    let rescued = rescue_expired(&mut pool.acquire().await.unwrap(), 100).await.unwrap();
    assert_eq!(rescued.requeued, vec![id]);
    let b = lease::claim_jobs(pool, "default", 10, "worker-b", Duration::from_secs(30)).await.unwrap();
    let fresh = Claim::from(&b[0]);
    assert_eq!(fresh.attempt, stale.attempt + 1);

    let lost = |r: oncely::Result<_>| matches!(r, Err(Error::LeaseLost { job_id, attempt }) if job_id == id && attempt == stale.attempt);
    assert!(lost(lease::complete_job(pool, stale).await.map(|_| ())));
    assert!(lost(lease::fail_job(pool, stale, ErrorKind::Error, "late", None).await.map(|_| ())));
    assert!(lost(lease::snooze_job(pool, stale, Duration::ZERO).await));
    assert!(lost(lease::release_job(pool, stale, "late").await));
    assert_eq!(lease::extend_leases(pool, &[stale, fresh], Duration::from_secs(30)).await.unwrap(), vec![stale]);

    let job = get_job(pool, id).await.unwrap();
    assert_eq!((job.state, job.worker_id.as_deref()), (JobState::Running, Some("worker-b")), "B still owns it");
    lease::complete_job(pool, fresh).await.unwrap();
    let job = get_job(pool, id).await.unwrap();
    assert_eq!(job.state, JobState::Completed);
    assert_eq!(job.errors.len(), 1);
    assert_eq!(job.errors[0].kind, ErrorKind::LeaseExpired);
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_and_retry_move_jobs_between_states_and_refuse_the_rest() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let mut conn = pool.acquire().await.unwrap();
    let id = enqueue(pool, NewJob::new(&Noop { n: 0 }).unwrap()).await.unwrap().id;

    // A running job that a person cancels: the worker's completion is refused.
    let claim = Claim::from(&lease::claim_jobs(pool, "default", 1, "w", Duration::from_secs(30)).await.unwrap()[0]);
    oncely::cancel_job(&mut conn, id).await.unwrap();
    assert!(matches!(lease::complete_job(pool, claim).await, Err(Error::LeaseLost { .. })));
    assert_eq!(get_job(pool, id).await.unwrap().state, JobState::Cancelled);
    assert!(matches!(oncely::cancel_job(&mut conn, id).await, Err(Error::InvalidState { .. })));

    // Retry puts it back with one more attempt allowed; retrying an available job is refused.
    oncely::retry_job(&mut conn, id).await.unwrap();
    let job = get_job(pool, id).await.unwrap();
    assert_eq!(job.state, JobState::Available);
    assert!(job.max_attempts > job.attempt);
    assert!(matches!(oncely::retry_job(&mut conn, id).await, Err(Error::InvalidState { .. })));
    assert!(matches!(oncely::cancel_job(&mut conn, oncely::JobId(999_999)).await, Err(Error::JobNotFound(_))));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_job_goes_back_to_its_queue_with_its_history() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let id = enqueue(pool, NewJob::new(&Noop { n: 0 }).unwrap().max_attempts(1)).await.unwrap().id;
    let claim = Claim::from(&lease::claim_jobs(pool, "default", 1, "w", Duration::from_secs(30)).await.unwrap()[0]);
    let state = lease::fail_job(pool, claim, ErrorKind::Error, "boom", Some(Duration::from_secs(1))).await.unwrap();
    assert_eq!(state, JobState::Dead, "out of attempts: dead even though retry was asked");

    oncely::retry_job(&mut pool.acquire().await.unwrap(), id).await.unwrap();
    let job = get_job(pool, id).await.unwrap();
    assert_eq!(job.state, JobState::Available);
    assert_eq!(job.errors.len(), 1);
    assert_eq!(job.errors[0].message, "boom");
    let again = lease::claim_jobs(pool, "default", 1, "w", Duration::from_secs(30)).await.unwrap();
    assert_eq!(again[0].attempt, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn dismissing_and_deleting_touch_only_the_dead_letter() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let dead = enqueue(pool, NewJob::new(&Noop { n: 1 }).unwrap().max_attempts(1)).await.unwrap().id;
    let claim = Claim::from(&lease::claim_jobs(pool, "default", 1, "w", Duration::from_secs(30)).await.unwrap()[0]);
    assert_eq!(lease::fail_job(pool, claim, ErrorKind::Error, "boom", None).await.unwrap(), JobState::Dead);
    let running = enqueue(pool, NewJob::new(&Noop { n: 2 }).unwrap()).await.unwrap().id;
    lease::claim_jobs(pool, "default", 1, "w", Duration::from_secs(30)).await.unwrap();
    let available = enqueue(pool, NewJob::new(&Noop { n: 3 }).unwrap()).await.unwrap().id;
    let all = [dead, running, available, oncely::JobId(999_999)];

    // Dismiss: only the dead job becomes cancelled; a second dismiss finds nothing to do.
    assert_eq!(oncely::core::dismiss_dead_jobs(pool, &all).await.unwrap(), vec![dead]);
    assert_eq!(get_job(pool, dead).await.unwrap().state, JobState::Cancelled);
    assert_eq!(get_job(pool, running).await.unwrap().state, JobState::Running);
    assert_eq!(get_job(pool, available).await.unwrap().state, JobState::Available);
    assert!(oncely::core::dismiss_dead_jobs(pool, &all).await.unwrap().is_empty());

    // Delete: only the dismissed (finished) job goes; live jobs stay.
    assert_eq!(oncely::core::delete_finished_jobs(pool, &all).await.unwrap(), vec![dead]);
    assert!(matches!(get_job(pool, dead).await, Err(Error::JobNotFound(_))));
    assert_eq!(get_job(pool, running).await.unwrap().state, JobState::Running);
    assert_eq!(get_job(pool, available).await.unwrap().state, JobState::Available);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_with_a_typed_error_and_nothing_is_written() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let bad = [
        NewJob::from_json("", serde_json::json!({})),
        NewJob::new(&Noop { n: 0 }).unwrap().queue(""),
        NewJob::new(&Noop { n: 0 }).unwrap().max_attempts(0),
        NewJob::new(&Noop { n: 0 }).unwrap().unique_key("x".repeat(513)),
    ];
    for job in bad.clone() {
        assert!(matches!(enqueue(pool, job).await, Err(Error::InvalidInput(_))));
    }
    let mut batch = vec![NewJob::new(&Noop { n: 0 }).unwrap()];
    batch.push(bad[0].clone());
    assert!(matches!(enqueue_many(pool, &batch).await, Err(Error::InvalidInput(_))));
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM oncely.jobs").fetch_one(pool).await.unwrap();
    assert_eq!(jobs, 0, "a batch with one bad job inserts nothing");
}

#[tokio::test(flavor = "multi_thread")]
async fn claims_follow_priority_then_run_at_and_skip_future_jobs() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let low = enqueue(pool, NewJob::new(&Noop { n: 1 }).unwrap()).await.unwrap().id;
    let high = enqueue(pool, NewJob::new(&Noop { n: 2 }).unwrap().priority(10)).await.unwrap().id;
    let _later = enqueue(pool, NewJob::new(&Noop { n: 3 }).unwrap().priority(99).delay(Duration::from_secs(3600)))
        .await
        .unwrap();
    let _other_queue = enqueue(pool, NewJob::new(&Noop { n: 4 }).unwrap().queue("other")).await.unwrap();
    let got = lease::claim_jobs(pool, "default", 10, "w", Duration::from_secs(30)).await.unwrap();
    assert_eq!(got.iter().map(|j| j.id).collect::<Vec<_>>(), vec![high, low]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_batch_goes_through_copy_in_order_with_awkward_arguments_intact() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let awkward =
        serde_json::json!({"text": "tab\there\nnew line\\back\\slash \"quoted\" caf\u{e9} \u{1F600}", "n": null});
    let jobs: Vec<NewJob> = (0..5_000)
        .map(|n| {
            NewJob::from_json("copy_me", serde_json::json!({"n": n, "awkward": awkward}))
                .queue(if n % 2 == 0 { "even" } else { "odd" })
                .priority((n % 3) as i16)
        })
        .collect();
    let mut tx = pool.begin().await.unwrap();
    let out = enqueue_many(&mut *tx, &jobs).await.unwrap();
    tx.rollback().await.unwrap();
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM oncely.jobs").fetch_one(pool).await.unwrap();
    assert_eq!(total, 0, "the COPY batch rolled back with the caller's transaction");

    let out2 = enqueue_many(pool, &jobs).await.unwrap();
    assert_eq!((out.len(), out2.len()), (5_000, 5_000));
    assert!(out2.iter().all(|e| !e.existing));
    for i in [0usize, 1, 2_500, 4_999] {
        let job = get_job(pool, out2[i].id).await.unwrap();
        assert_eq!(job.args["n"], i as u64, "result {i} names the job made from input {i}");
        assert_eq!(job.args["awkward"], awkward);
        assert_eq!(job.queue, if i % 2 == 0 { "even" } else { "odd" });
        assert_eq!((job.priority, job.state, job.max_attempts), ((i % 3) as i16, JobState::Available, 20));
    }
    // Ids come from the same sequence as single enqueues: no collision afterwards.
    let next = enqueue(pool, NewJob::new(&Noop { n: 1 }).unwrap()).await.unwrap();
    assert!(next.id > out2[4_999].id);
}

/// Calls of several statements take `impl Acquire`: given the caller's transaction they run inside
/// it, and roll back with it; given the pool they commit on their own.
#[tokio::test(flavor = "multi_thread")]
async fn cancel_and_retry_join_the_callers_transaction_or_run_on_the_pool() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let id = enqueue(pool, NewJob::new(&Noop { n: 0 }).unwrap()).await.unwrap().id;
    let mut tx = pool.begin().await.unwrap();
    oncely::cancel_job(&mut *tx, id).await.unwrap();
    assert_eq!(get_job(&mut *tx, id).await.unwrap().state, JobState::Cancelled, "inside the transaction");
    tx.rollback().await.unwrap();
    assert_eq!(get_job(pool, id).await.unwrap().state, JobState::Available, "rolled back with it");
    oncely::cancel_job(pool, id).await.unwrap();
    assert_eq!(get_job(pool, id).await.unwrap().state, JobState::Cancelled);
    let mut tx = pool.begin().await.unwrap();
    oncely::retry_job(&mut *tx, id).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(get_job(pool, id).await.unwrap().state, JobState::Cancelled, "the retry rolled back");
    oncely::retry_job(pool, id).await.unwrap();
    assert_eq!(get_job(pool, id).await.unwrap().state, JobState::Available);
}

/// The calls that take `impl Acquire` make `Send` futures with every form of connection a service
/// passes, so they can run in spawned tasks and axum handlers (checked at compile time).
#[allow(dead_code)]
fn acquire_taking_calls_are_send(pool: sqlx::PgPool, mut conn: sqlx::pool::PoolConnection<sqlx::Postgres>) {
    fn is_send<T: Send>(_: T) {}
    let p = pool.clone();
    is_send(async move {
        let mut tx = p.begin().await.unwrap();
        oncely::cancel_job(&mut *tx, oncely::JobId(1)).await
    });
    is_send(async move { oncely::retry_job(&mut *conn, oncely::JobId(1)).await });
    is_send(async move { oncely::retry_job(&pool, oncely::JobId(1)).await });
}

/// Claims take due jobs highest priority first, then oldest, across priorities; jobs scheduled for
/// later are never claimed, whatever their priority, and a claim that finds fewer due jobs than it
/// asked for does not need to read them (docs/benchmarks.md, "Scale").
#[tokio::test(flavor = "multi_thread")]
async fn claims_go_by_priority_then_age_and_skip_jobs_not_yet_due() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let later = Duration::from_secs(3600);
    let mut due = Vec::new();
    for (n, priority) in [(0, 1), (1, 3), (2, -2), (3, 3), (4, 1)] {
        due.push((priority, enqueue(pool, NewJob::new(&Noop { n }).unwrap().priority(priority)).await.unwrap().id));
    }
    for (n, priority) in [(10, 9), (11, 3), (12, -5)] {
        enqueue(pool, NewJob::new(&Noop { n }).unwrap().priority(priority).delay(later)).await.unwrap();
    }
    // Expected: by priority descending, then in enqueue order (run_at, then id).
    due.sort_by_key(|(priority, id)| (-priority, id.0));
    let expected: Vec<_> = due.iter().map(|(_, id)| *id).collect();
    // One claim at a time, so each claim's choice is checked (a batch's rows come back unordered).
    let mut got = Vec::new();
    for _ in 0..expected.len() {
        let claimed = lease::claim_jobs(pool, "default", 1, "w", Duration::from_secs(30)).await.unwrap();
        got.extend(claimed.iter().map(|j| j.id));
    }
    assert_eq!(got, expected, "priority first, then age; nothing scheduled for later");
    assert!(lease::claim_jobs(pool, "default", 100, "w", Duration::from_secs(30)).await.unwrap().is_empty());
}
