//! The inbox: an inbound event is accepted once per (source, event id), with exactly one job.

use std::time::Duration;

use crate::common::*;
use oncely::core::inbox::{accept, Accepted};
use oncely::{handler_fn, JobArgs, NewJob};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct HandleStripeEvent {
    id: String,
}
impl JobArgs for HandleStripeEvent {
    const KIND: &'static str = "handle_stripe_event";
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_concurrent_deliveries_of_one_event_are_accepted_once_with_one_job() {
    init_tracing();
    let db = TestDb::new().await;
    let body = serde_json::json!({"id": "evt_1NG8Du2eZvKYlo2CUI79vXWy", "type": "invoice.paid"});
    let mut tasks = Vec::new();
    for _ in 0..20 {
        // Separate connections, all started together.
        let pool = db.new_pool(1).await;
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let job = NewJob::new(&HandleStripeEvent { id: "evt_1NG8Du2eZvKYlo2CUI79vXWy".into() }).unwrap();
            accept(&pool, "stripe", "evt_1NG8Du2eZvKYlo2CUI79vXWy", &body, job).await.unwrap()
        }));
    }
    let results: Vec<Accepted> = futures::future::join_all(tasks).await.into_iter().map(Result::unwrap).collect();
    let new: Vec<_> = results.iter().filter(|a| a.is_new()).collect();
    assert_eq!(new.len(), 1, "{results:?}");
    assert!(results.iter().all(|a| a.job() == new[0].job()), "duplicates name the one job");
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM oncely.jobs").fetch_one(db.pool()).await.unwrap();
    assert_eq!(jobs, 1);
    let (payload, job_id): (serde_json::Value, i64) =
        sqlx::query_as("SELECT payload, job_id FROM oncely.inbox WHERE source = 'stripe'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!((payload, job_id), (body, new[0].job().0));

    // The job runs once; a later resend is still a duplicate and enqueues nothing.
    let (tx, mut runs) = tokio::sync::mpsc::unbounded_channel();
    let h = builder(db.new_pool(4).await)
        .register(handler_fn(move |_ctx, a: HandleStripeEvent| {
            let tx = tx.clone();
            async move {
                tx.send(a.id).unwrap();
                Ok(())
            }
        }))
        .queue("default", 4)
        .build()
        .unwrap()
        .start();
    wait_all_finished(db.pool(), Duration::from_secs(20)).await;
    let again = accept(
        db.pool(),
        "stripe",
        "evt_1NG8Du2eZvKYlo2CUI79vXWy",
        &serde_json::json!({}),
        NewJob::new(&HandleStripeEvent { id: "x".into() }).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(again, Accepted::Duplicate { job: new[0].job() });
    wait_all_finished(db.pool(), Duration::from_secs(5)).await;
    h.shutdown().await;
    let mut ran = Vec::new();
    while let Ok(id) = runs.try_recv() {
        ran.push(id);
    }
    assert_eq!(ran, vec!["evt_1NG8Du2eZvKYlo2CUI79vXWy".to_owned()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn acceptance_rolls_back_with_the_callers_transaction_and_sources_are_separate() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let job = || NewJob::new(&HandleStripeEvent { id: "e1".into() }).unwrap();
    let mut tx = pool.begin().await.unwrap();
    assert!(accept(&mut *tx, "stripe", "e1", &serde_json::json!({}), job()).await.unwrap().is_new());
    tx.rollback().await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT (SELECT count(*) FROM oncely.inbox) + (SELECT count(*) FROM oncely.jobs)")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(n, 0, "nothing survives a rollback");

    let mut tx = pool.begin().await.unwrap();
    assert!(accept(&mut *tx, "stripe", "e1", &serde_json::json!({}), job()).await.unwrap().is_new());
    tx.commit().await.unwrap();
    assert!(!accept(pool, "stripe", "e1", &serde_json::json!({}), job()).await.unwrap().is_new());
    assert!(accept(pool, "github", "e1", &serde_json::json!({}), job()).await.unwrap().is_new(), "another source");

    for (source, id) in [("", "e2"), ("stripe", "")] {
        assert!(matches!(
            accept(pool, source, id, &serde_json::json!({}), job()).await,
            Err(oncely::Error::InvalidInput(_))
        ));
    }
    assert!(matches!(
        accept(pool, "stripe", "e3", &serde_json::json!({}), job().unique_key("k")).await,
        Err(oncely::Error::InvalidInput(_))
    ));
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM oncely.jobs").fetch_one(pool).await.unwrap();
    assert_eq!(jobs, 2);
}

/// An accepted event whose processing failed for good stays a duplicate on resend; `status` says
/// it failed, the job is retried after the fix, and `status` follows it to success, then to
/// "forgotten" once its job is pruned.
#[tokio::test(flavor = "multi_thread")]
async fn status_follows_an_accepted_events_processing() {
    use oncely::core::inbox::{status, Processing};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    assert_eq!(status(pool, "stripe", "evt_2").await.unwrap(), None);
    let job = NewJob::new(&HandleStripeEvent { id: "evt_2".into() }).unwrap().max_attempts(1);
    let accepted = accept(pool, "stripe", "evt_2", &serde_json::json!({"id": "evt_2"}), job).await.unwrap();
    let entry = status(pool, "stripe", "evt_2").await.unwrap().unwrap();
    assert_eq!((entry.job, entry.processing), (accepted.job(), Processing::Pending));

    let broken = Arc::new(AtomicBool::new(true));
    let b = broken.clone();
    let h = builder(db.new_pool(4).await)
        .register(handler_fn(move |_ctx, _: HandleStripeEvent| {
            let b = b.clone();
            async move {
                if b.load(Ordering::SeqCst) {
                    return Err(oncely::Outcome::fail("the ledger service is down"));
                }
                Ok(())
            }
        }))
        .queue("default", 1)
        .build()
        .unwrap()
        .start();
    wait_all_finished(pool, Duration::from_secs(20)).await;
    assert_eq!(status(pool, "stripe", "evt_2").await.unwrap().unwrap().processing, Processing::Failed);
    let resend = NewJob::new(&HandleStripeEvent { id: "evt_2".into() }).unwrap();
    let again = accept(pool, "stripe", "evt_2", &serde_json::json!({"id": "evt_2"}), resend).await.unwrap();
    assert_eq!(again, Accepted::Duplicate { job: accepted.job() }, "still a duplicate");

    broken.store(false, Ordering::SeqCst);
    oncely::retry_job(&mut pool.acquire().await.unwrap(), accepted.job()).await.unwrap();
    eventually(Duration::from_secs(20), "the retried job to succeed", || async {
        (status(pool, "stripe", "evt_2").await.unwrap().unwrap().processing == Processing::Succeeded).then_some(())
    })
    .await;
    h.shutdown().await;
    sqlx::query("DELETE FROM oncely.jobs WHERE id = $1").bind(accepted.job().0).execute(pool).await.unwrap();
    assert_eq!(status(pool, "stripe", "evt_2").await.unwrap().unwrap().processing, Processing::Forgotten);
}
