//! `oncely.enqueue(...)` from plain SQL: what other languages call inside their own transaction.

use std::time::Duration;

use crate::common::*;
use oncely::{handler_fn, JobArgs};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgListener;

#[derive(Debug, Serialize, Deserialize)]
struct Email {
    to: String,
}
impl JobArgs for Email {
    const KIND: &'static str = "send_email";
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_enqueued_from_sql_is_run_by_a_rust_worker() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    let id: i64 = sqlx::query_scalar(
        "SELECT oncely.enqueue('send_email', '{\"to\": \"a@example.com\"}', queue => 'mail', priority => 3, \
         max_attempts => 4)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let job = oncely::get_job(pool, oncely::JobId(id)).await.unwrap();
    assert_eq!((job.kind.as_str(), job.queue.as_str(), job.priority, job.max_attempts), ("send_email", "mail", 3, 4));
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    let builder = builder(pool.clone())
        .register(handler_fn(move |_ctx, e: Email| {
            let s = s.clone();
            async move {
                s.lock().unwrap().push(e.to);
                Ok(())
            }
        }))
        .queue("mail", 1);
    oncely::testkit::run_until_idle(pool, builder, Duration::from_secs(30)).await;
    assert_eq!(*seen.lock().unwrap(), vec!["a@example.com".to_owned()]);
    assert_eq!(count(pool, oncely::JobState::Completed).await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolled_back_transaction_leaves_no_job_and_no_notification() {
    let db = TestDb::new().await;
    let mut listener = PgListener::connect(db.url()).await.unwrap();
    listener.listen(oncely::core::JOBS_CHANNEL).await.unwrap();

    let mut tx = db.pool().begin().await.unwrap();
    let id: i64 = sqlx::query_scalar("SELECT oncely.enqueue('send_email', '{}', queue => 'rolled_back')")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert!(id > 0);
    tx.rollback().await.unwrap();

    let mut tx = db.pool().begin().await.unwrap();
    sqlx::query("SELECT oncely.enqueue('send_email', '{}', queue => 'committed')").execute(&mut *tx).await.unwrap();
    // Not due yet: no wake-up for it.
    sqlx::query("SELECT oncely.enqueue('send_email', '{}', queue => 'later', delay => interval '1 hour')")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    // Notifications arrive in commit order: the first one must be the committed queue's.
    let n = tokio::time::timeout(Duration::from_secs(10), listener.recv()).await.expect("a notification").unwrap();
    assert_eq!(n.payload(), "committed");
    let queues: Vec<String> =
        sqlx::query_scalar("SELECT queue FROM oncely.jobs ORDER BY id").fetch_all(db.pool()).await.unwrap();
    assert_eq!(queues, ["committed", "later"]);
    let later: bool =
        sqlx::query_scalar("SELECT run_at > now() + interval '50 minutes' FROM oncely.jobs WHERE queue = 'later'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert!(later);
    // Nothing else is pending on the channel (the rolled-back and the delayed job sent nothing).
    sqlx::query("NOTIFY oncely_jobs, 'marker'").execute(db.pool()).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(10), listener.recv()).await.expect("the marker").unwrap();
    assert_eq!(n.payload(), "marker");
}

#[tokio::test(flavor = "multi_thread")]
async fn unique_keys_dedupe_like_the_rust_enqueue() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let sql = "SELECT oncely.enqueue('report', '{\"id\": 7}', unique_key => 'report:7')";
    let first: i64 = sqlx::query_scalar(sql).fetch_one(pool).await.unwrap();
    let again: i64 = sqlx::query_scalar(sql).fetch_one(pool).await.unwrap();
    assert_eq!(first, again, "a live job holds the key");
    // The Rust enqueue sees the same key.
    let rust = oncely::enqueue(pool, oncely::NewJob::new(&Email { to: "x".into() }).unwrap().unique_key("report:7"))
        .await
        .unwrap();
    assert_eq!((rust.id.0, rust.existing), (first, true));
    // Once the holder is finished, the key is free again.
    sqlx::query("UPDATE oncely.jobs SET state = 'completed', finished_at = now() WHERE id = $1")
        .bind(first)
        .execute(pool)
        .await
        .unwrap();
    let next: i64 = sqlx::query_scalar(sql).fetch_one(pool).await.unwrap();
    assert_ne!(next, first);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_with_a_clear_error_and_inserts_nothing() {
    let db = TestDb::new().await;
    let cases = [
        ("SELECT oncely.enqueue('')", "job kind must be 1..=255 bytes, got 0"),
        ("SELECT oncely.enqueue(repeat('k', 256))", "job kind must be 1..=255 bytes, got 256"),
        ("SELECT oncely.enqueue('k', queue => '')", "queue name must be 1..=128 bytes"),
        ("SELECT oncely.enqueue('k', max_attempts => 0)", "max_attempts must be at least 1, got 0"),
        ("SELECT oncely.enqueue('k', unique_key => repeat('u', 513))", "unique key must be 1..=512 bytes"),
        ("SELECT oncely.enqueue('k', priority => 40000)", "priority must fit in a smallint"),
        ("SELECT oncely.enqueue('k', NULL)", "args must be JSON"),
        ("SELECT oncely.enqueue('k', run_at => now(), delay => interval '1 s')", "run_at or delay, not both"),
    ];
    for (sql, message) in cases {
        let err = sqlx::query(sql).execute(db.pool()).await.expect_err(sql);
        let db_err = err.as_database_error().expect("a database error");
        assert_eq!(db_err.code().as_deref(), Some("22023"), "{sql}");
        assert!(db_err.message().contains(message), "{sql}: {}", db_err.message());
    }
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM oncely.jobs").fetch_one(db.pool()).await.unwrap();
    assert_eq!(n, 0);
}
