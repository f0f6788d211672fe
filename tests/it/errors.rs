//! Handler errors on a real PostgreSQL and a worker: what `?` does with each error shape (std,
//! anyhow, boxed, a user's enum around oncely's own), the explicit `ResultExt` methods, per-kind
//! defaults declared on the arguments, and the builder and shutdown fixes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use anyhow::Context as _;
use oncely::core::ledger::LedgerKey;
use oncely::core::step::BoxError;
use oncely::core::{ErrorKind, InsertOpts};
use oncely::worker::ResultExt;
use oncely::{enqueue, get_job, handler_fn, Handler, Job, JobArgs, JobId, JobState, NewJob, StepError, Worker};
use serde::{Deserialize, Serialize};

/// One job kind per error shape; the handler picks its behaviour from `shape`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Shape {
    shape: String,
}
impl JobArgs for Shape {
    const KIND: &'static str = "error_shape";
}

#[derive(Debug, thiserror::Error)]
enum PaymentError {
    #[error("charging the card")]
    Charge(#[source] StepError),
}

fn busy() -> StepError {
    StepError::Busy { step: "charge".into(), key: "job:1:charge".into(), retry_after: Duration::from_millis(50) }
}

fn parked() -> StepError {
    StepError::OutcomeUnknown {
        step: "charge".into(),
        idempotency_key: "charge-1".into(),
        record: LedgerKey::new("steps", "job:1:charge"),
    }
}

fn boxed_failure() -> Result<(), BoxError> {
    Err(Box::new(std::io::Error::other("disk on fire")))
}

fn shapes() -> impl Handler<Shape> {
    handler_fn(|ctx, args: Shape| async move {
        let first = ctx.attempt() == 1;
        match args.shape.as_str() {
            // `?` on a std error: a retry, with the error's message.
            "std" => {
                let _: u32 = "x".parse()?;
            }
            // `?` on anyhow, with context: a retry whose message has the whole chain.
            "anyhow" => {
                Err::<(), _>(anyhow::anyhow!("upstream answered 503")).context("calling the upstream")?;
            }
            // A busy step inside anyhow context: snoozed, not retried.
            "anyhow_busy" if first => {
                Err::<(), _>(busy()).context("charging")?;
            }
            // The same, returned straight through anyhow (no context).
            "anyhow_bare_busy" if first => {
                let r: anyhow::Result<()> = Err(busy().into());
                r?;
            }
            // `?` on oncely's own boxed error type.
            "boxed" => boxed_failure()?,
            // A user's thiserror enum around a parked step: failed for a person, not retried.
            "thiserror_parked" => Err(PaymentError::Charge(parked()))?,
            // A dropped database connection: given back, not counted.
            "connection" if first => Err(sqlx::Error::PoolTimedOut)?,
            "fatal" => {
                let _: u32 = "x".parse().fatal()?;
            }
            "snooze" if first => {
                let _: u32 = "x".parse().snooze(Duration::from_millis(50))?;
            }
            // Explicit wins: a busy step marked retryable counts as an attempt.
            "retryable" if first => Err(busy()).retryable()?,
            _ => {}
        }
        Ok(())
    })
}

async fn run_shape(shape: &str, max_attempts: i32) -> Job {
    let db = TestDb::new().await;
    let job = NewJob::new(&Shape { shape: shape.into() }).unwrap().max_attempts(max_attempts);
    let id = enqueue(db.pool(), job).await.unwrap().id;
    let h = builder(db.new_pool(4).await).register(shapes()).queue("default", 2).build().unwrap().start();
    wait_all_finished(db.pool(), Duration::from_secs(30)).await;
    h.shutdown().await;
    get_job(db.pool(), id).await.unwrap()
}

fn messages(job: &Job) -> Vec<(ErrorKind, &str)> {
    job.errors.iter().map(|e| (e.kind, e.message.as_str())).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_std_error_is_retried_until_the_dead_letter() {
    let job = run_shape("std", 2).await;
    assert_eq!((job.state, job.attempt, job.snoozes), (JobState::Dead, 2, 0));
    assert_eq!(messages(&job), vec![(ErrorKind::Error, "invalid digit found in string"); 2]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_anyhow_error_is_retried_with_its_context_chain() {
    let job = run_shape("anyhow", 2).await;
    assert_eq!((job.state, job.attempt, job.snoozes), (JobState::Dead, 2, 0));
    assert_eq!(messages(&job), vec![(ErrorKind::Error, "calling the upstream: upstream answered 503"); 2]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_busy_step_inside_anyhow_context_snoozes_instead_of_retrying() {
    // One attempt allowed: a retry would send it to the dead letter.
    let job = run_shape("anyhow_busy", 1).await;
    assert_eq!((job.state, job.attempt, job.snoozes), (JobState::Completed, 2, 1), "{:?}", job.errors);
    assert!(job.errors.is_empty(), "a snooze is not a failure: {:?}", job.errors);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_busy_step_straight_through_anyhow_snoozes_too() {
    let job = run_shape("anyhow_bare_busy", 1).await;
    assert_eq!((job.state, job.attempt, job.snoozes), (JobState::Completed, 2, 1), "{:?}", job.errors);
    assert!(job.errors.is_empty(), "{:?}", job.errors);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_boxed_error_is_retried() {
    let job = run_shape("boxed", 2).await;
    assert_eq!((job.state, job.attempt), (JobState::Dead, 2));
    assert_eq!(messages(&job), vec![(ErrorKind::Error, "disk on fire"); 2]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_parked_step_inside_a_thiserror_enum_fails_the_job_at_once() {
    let job = run_shape("thiserror_parked", 5).await;
    assert_eq!((job.state, job.attempt), (JobState::Dead, 1), "not retried: a person must decide");
    assert_eq!(job.errors.len(), 1);
    let message = &job.errors[0].message;
    assert!(message.starts_with("charging the card: step `charge`: outcome of an earlier call"), "{message}");
    assert!(message.contains("oncely ledger resolve"), "the message says what to do: {message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_database_connection_is_given_back_without_counting() {
    let job = run_shape("connection", 1).await;
    assert_eq!((job.state, job.attempt, job.snoozes, job.max_attempts), (JobState::Completed, 2, 1, 1));
    assert_eq!(job.errors.len(), 1);
    assert_eq!(job.errors[0].kind, ErrorKind::Interrupted);
    assert!(job.errors[0].message.contains("pool timed out"), "{:?}", job.errors);
}

#[tokio::test(flavor = "multi_thread")]
async fn fatal_sends_the_job_to_the_dead_letter_now() {
    let job = run_shape("fatal", 5).await;
    assert_eq!((job.state, job.attempt), (JobState::Dead, 1));
    assert_eq!(messages(&job), vec![(ErrorKind::Error, "invalid digit found in string")]);
}

#[tokio::test(flavor = "multi_thread")]
async fn snooze_runs_again_without_counting() {
    let job = run_shape("snooze", 1).await;
    assert_eq!((job.state, job.attempt, job.snoozes), (JobState::Completed, 2, 1));
    assert!(job.errors.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn retryable_counts_the_attempt_even_for_an_error_that_would_snooze() {
    let job = run_shape("retryable", 1).await;
    assert_eq!((job.state, job.attempt, job.snoozes), (JobState::Dead, 1, 0));
    assert_eq!(job.errors.len(), 1);
    assert!(job.errors[0].message.contains("is held by another claimant"), "{:?}", job.errors);
}

// ---- per-kind defaults ----

#[derive(Debug, Serialize, Deserialize)]
struct Report {
    id: i64,
}
impl JobArgs for Report {
    const KIND: &'static str = "report";
    fn insert_opts() -> InsertOpts {
        InsertOpts::new().queue("reports").max_attempts(2).priority(5).timeout(Duration::from_millis(300))
    }
}

fn report_handler() -> impl Handler<Report> {
    handler_fn(|_ctx, args: Report| async move {
        if args.id == 0 {
            std::future::pending::<()>().await; // runs past the kind's timeout
        }
        Ok(())
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kind_declares_its_queue_attempts_priority_and_timeout_once() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let slow = enqueue(pool, NewJob::new(&Report { id: 0 }).unwrap()).await.unwrap().id;
    let moved = enqueue(pool, NewJob::new(&Report { id: 1 }).unwrap().queue("other").priority(-1).max_attempts(7))
        .await
        .unwrap()
        .id;

    let j = get_job(pool, moved).await.unwrap();
    assert_eq!((j.queue.as_str(), j.priority, j.max_attempts), ("other", -1, 7), "the call site overrides");
    let j = get_job(pool, slow).await.unwrap();
    assert_eq!((j.queue.as_str(), j.priority, j.max_attempts), ("reports", 5, 2), "the kind's defaults");

    // The worker's default timeout is 5 minutes; the kind's 300 ms applies.
    let h = builder(db.new_pool(4).await).register(report_handler()).queue("reports", 2).build().unwrap().start();
    eventually(Duration::from_secs(20), "the slow report is dead", || async {
        (get_job(pool, slow).await.ok()?.state == JobState::Dead).then_some(())
    })
    .await;
    h.shutdown().await;
    let j = get_job(pool, slow).await.unwrap();
    assert_eq!(j.attempt, 2);
    assert_eq!(messages(&j), vec![(ErrorKind::Timeout, "attempt timed out after 300ms"); 2]);
}

#[tokio::test(flavor = "multi_thread")]
async fn build_refuses_a_kind_whose_queue_the_worker_does_not_serve() {
    let db = TestDb::new().await;
    let err = builder(db.pool().clone()).register(report_handler()).queue("default", 1).build().err().unwrap();
    let message = err.to_string();
    assert!(message.contains("job kind `report` goes to queue `reports`"), "{message}");
    assert!(message.contains(".queue(\"reports\""), "it says how to fix it: {message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn build_refuses_a_kind_timeout_not_shorter_than_the_lease() {
    let db = TestDb::new().await;
    let built = builder(db.pool().clone()).register(report_handler()).queue("reports", 1);
    let err = built.lease(Duration::from_millis(300)).build().err().unwrap();
    assert!(err.to_string().contains("declares a timeout of 300ms"), "{err}");
    assert!(err.to_string().contains("not shorter than the lease (300ms)"), "{err}");
}

// ---- small fixes ----

#[tokio::test(flavor = "multi_thread")]
async fn config_keeps_a_worker_id_set_before_it() {
    let db = TestDb::new().await;
    let worker = Worker::builder(db.pool().clone())
        .worker_id("billing-1")
        .config(oncely::WorkerConfig::default())
        .register(handler_fn(|_ctx, _args: Noop| async move { Ok(()) }))
        .queue("default", 1)
        .build()
        .unwrap();
    assert_eq!(worker.config().worker_id, "billing-1");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_concurrent_shutdown_waits_for_the_first() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let started = Arc::new(AtomicBool::new(false));
    let flag = started.clone();
    let hang = handler_fn(move |_ctx, _args: Noop| {
        let flag = flag.clone();
        async move {
            flag.store(true, Ordering::SeqCst);
            std::future::pending::<()>().await;
            Ok(())
        }
    });
    let id: JobId = enqueue(pool, NewJob::new(&Noop { n: 0 }).unwrap()).await.unwrap().id;
    let h = builder(db.new_pool(4).await).register(hang).queue("default", 1).build().unwrap().start();
    eventually(Duration::from_secs(10), "the job is running", || async {
        started.load(Ordering::SeqCst).then_some(())
    })
    .await;

    // Both calls race; the handler never ends, so the one that does the work releases the job
    // after the grace period. Whichever returns first, the job must already be released.
    let (a, b) = (h.clone(), h.clone());
    let first = tokio::spawn(async move { a.shutdown_within(Duration::from_millis(500)).await });
    let second = tokio::spawn(async move { b.shutdown_within(Duration::from_millis(500)).await });
    let (done, other) = match futures::future::select(first, second).await {
        futures::future::Either::Left((done, other)) | futures::future::Either::Right((done, other)) => (done, other),
    };
    done.unwrap();
    let j = get_job(pool, id).await.unwrap();
    assert_eq!(j.state, JobState::Available, "released before either shutdown returned: {j:?}");
    assert_eq!(j.errors.last().map(|e| e.kind), Some(ErrorKind::Shutdown));
    other.await.unwrap();
}
