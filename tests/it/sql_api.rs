//! `oncely.enqueue(...)` and `oncely.publish(...)` from plain SQL: what other languages call inside
//! their own transaction.

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

/// `oncely.publish_many` is the Rust publish statement word for word: one definition of the
/// fan-out. When the Rust statement changes, this fails until a new migration replaces the
/// function with the same text.
#[tokio::test(flavor = "multi_thread")]
async fn the_sql_publish_runs_the_rust_publish_statement_word_for_word() {
    let db = TestDb::new().await;
    let body: String = sqlx::query_scalar(
        "SELECT prosrc FROM pg_proc \
         WHERE oid = 'oncely.publish_many(text[], jsonb[], text[], text[], integer[], text, text, text[], float8[])'::regprocedure",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    let (_, rust) = oncely::core::HOT_STATEMENTS.iter().find(|(name, _)| *name == "EVENT_PUBLISH").unwrap();
    assert_eq!(body.trim(), rust.trim(), "migrate a new oncely.publish_many with the Rust statement's text");
}

/// What one publish wrote: its counts, and its jobs and deliveries without the ids.
async fn fan_out(
    pool: &sqlx::PgPool,
    event: i64,
) -> (i64, i64, Vec<(String, String, i32, Option<i64>)>, Vec<(i64, Option<String>)>) {
    let jobs: Vec<(String, String, i32, Option<i64>)> = sqlx::query_as(
        "SELECT kind, queue, max_attempts, (args->>'endpoint_id')::bigint FROM oncely.jobs \
         WHERE (args->>'event_id')::bigint = $1 OR (args #>> '{trigger,event,id}')::bigint = $1 ORDER BY 1, 2, 4",
    )
    .bind(event)
    .fetch_all(pool)
    .await
    .unwrap();
    let deliveries: Vec<(i64, Option<String>)> = sqlx::query_as(
        "SELECT endpoint_id, ordering_key FROM oncely.webhook_deliveries WHERE event_id = $1 ORDER BY 1",
    )
    .bind(event)
    .fetch_all(pool)
    .await
    .unwrap();
    let runs = jobs.iter().filter(|j| j.3.is_none()).count() as i64;
    (deliveries.len() as i64, runs, jobs, deliveries)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_published_from_sql_fans_out_exactly_as_one_published_from_rust() {
    use oncely::core::webhook::{create_endpoint, EndpointPolicy, NewEndpoint};
    use oncely::function::{register_functions, EventFilter, Function};
    let db = TestDb::new().await;
    let pool = db.pool();
    let policy = EndpointPolicy::default().allow_private_networks(true);
    for (topics, ordered) in
        [(vec!["*"], false), (vec!["invoice.paid"], true), (vec!["oncely.endpoint.disabled"], false)]
    {
        create_endpoint(pool, &NewEndpoint::new("http://127.0.0.1:9/", topics).ordered(ordered).policy(policy.clone()))
            .await
            .unwrap();
    }
    let functions = [
        Function::new("on-pro-invoice").on_event_where("invoice.*", EventFilter::new().eq("plan", "pro")),
        Function::new("on-everything").on_event("*").queue("all").max_attempts(3),
    ];
    register_functions(&mut pool.acquire().await.unwrap(), &functions, chrono::Utc::now()).await.unwrap();

    // (topic, payload, ordering key, expected deliveries, expected runs): '*' and the endpoint
    // naming the topic; the two functions where they match. The operational topic reaches only the
    // endpoint naming it, and no function. So parity is not two empty sets.
    let cases = [
        ("invoice.paid", serde_json::json!({"plan": "pro"}), Some("customer:1"), 2, 2),
        ("invoice.paid", serde_json::json!({"plan": "free"}), None, 2, 1),
        ("invoice.voided", serde_json::json!({"plan": "pro"}), Some("customer:2"), 1, 2),
        ("oncely.endpoint.disabled", serde_json::json!({}), None, 1, 0),
        ("nobody.listens", serde_json::json!([1, 2]), None, 1, 1),
    ];
    for (topic, payload, ordering_key, want_deliveries, want_runs) in cases {
        let mut event = oncely::outbox::Event::from_json(topic, payload.clone());
        if let Some(k) = ordering_key {
            event = event.ordering_key(k);
        }
        let rust = oncely::outbox::publish(pool, &event).await.unwrap();
        let (id, message_id, deliveries, runs, duplicate): (i64, String, i64, i64, bool) = sqlx::query_as(
            "SELECT id, message_id, deliveries, runs, duplicate FROM oncely.publish($1, $2, ordering_key => $3)",
        )
        .bind(topic)
        .bind(&payload)
        .bind(ordering_key)
        .fetch_one(pool)
        .await
        .unwrap();
        assert!(!duplicate && !rust.duplicate);
        assert!(message_id.starts_with("msg_") && message_id.len() == 36 && message_id != rust.message_id);
        assert_eq!((deliveries, runs), (rust.deliveries, rust.runs), "{topic} {payload}");
        assert_eq!((deliveries, runs), (want_deliveries, want_runs), "{topic} {payload}");
        let from_rust = fan_out(pool, rust.id.0).await;
        let from_sql = fan_out(pool, id).await;
        assert_eq!(from_sql, from_rust, "{topic} {payload}");
        assert_eq!((from_sql.0, from_sql.1), (deliveries, runs));
        let stored = oncely::outbox::get_event(pool, oncely::outbox::EventId(id)).await.unwrap();
        assert_eq!((stored.topic.as_str(), &stored.payload, stored.message_id), (topic, &payload, message_id));
        assert_eq!(stored.ordering_key.as_deref(), ordering_key);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn event_keys_are_shared_by_the_sql_and_the_rust_publish() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let sql = "SELECT id, message_id, duplicate FROM oncely.publish('order.placed', '{\"n\": 1}', key => 'order:1')";
    let (first, msg, dup): (i64, String, bool) = sqlx::query_as(sql).fetch_one(pool).await.unwrap();
    assert!(!dup);
    let (again, again_msg, dup): (i64, String, bool) = sqlx::query_as(sql).fetch_one(pool).await.unwrap();
    assert_eq!((again, again_msg.as_str(), dup), (first, msg.as_str(), true));
    let rust = oncely::outbox::publish(
        pool,
        &oncely::outbox::Event::from_json("order.placed", serde_json::json!({"n": 2})).key("order:1"),
    )
    .await
    .unwrap();
    assert_eq!((rust.id.0, rust.message_id.as_str(), rust.duplicate), (first, msg.as_str(), true));
    // A short window expires (the key is taken over by the next publish).
    let (a, _, _): (i64, String, bool) = sqlx::query_as(
        "SELECT id, message_id, duplicate FROM oncely.publish('order.placed', '{}', key => 'order:2', \
         key_window => interval '1 microsecond')",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    // The next statement's now() is later than the first's by more than a microsecond.
    let (b, _, dup): (i64, String, bool) =
        sqlx::query_as("SELECT id, message_id, duplicate FROM oncely.publish('order.placed', '{}', key => 'order:2')")
            .fetch_one(pool)
            .await
            .unwrap();
    assert!(b != a && !dup);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM oncely.events").fetch_one(pool).await.unwrap();
    assert_eq!(n, 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolled_back_sql_publish_leaves_no_event_no_delivery_no_run_and_no_key() {
    use oncely::core::webhook::{create_endpoint, EndpointPolicy, NewEndpoint};
    use oncely::function::{register_functions, Function};
    let db = TestDb::new().await;
    let pool = db.pool();
    create_endpoint(
        pool,
        &NewEndpoint::new("http://127.0.0.1:9/", ["*"]).policy(EndpointPolicy::default().allow_private_networks(true)),
    )
    .await
    .unwrap();
    register_functions(&mut pool.acquire().await.unwrap(), &[Function::new("f").on_event("a.b")], chrono::Utc::now())
        .await
        .unwrap();
    let mut listener = PgListener::connect(db.url()).await.unwrap();
    listener.listen(oncely::core::JOBS_CHANNEL).await.unwrap();

    let mut tx = pool.begin().await.unwrap();
    let (deliveries, runs): (i64, i64) = sqlx::query_as(
        "SELECT deliveries, runs FROM oncely.publish('a.b', '{}', key => 'once', queue => 'rolled_back')",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!((deliveries, runs), (1, 1));
    tx.rollback().await.unwrap();
    let left: (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM oncely.events), (SELECT count(*) FROM oncely.jobs), \
                (SELECT count(*) FROM oncely.webhook_deliveries), (SELECT count(*) FROM oncely.event_keys)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(left, (0, 0, 0, 0));

    // The key is free: a committed publish with it stores its event; the first wake-up is its own.
    let dup: bool = sqlx::query_scalar("SELECT duplicate FROM oncely.publish('a.b', '{}', key => 'once')")
        .fetch_one(pool)
        .await
        .unwrap();
    assert!(!dup);
    let n = tokio::time::timeout(Duration::from_secs(10), listener.recv()).await.expect("a notification").unwrap();
    assert_ne!(n.payload(), "rolled_back");
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM oncely.jobs").fetch_one(pool).await.unwrap();
    assert_eq!(jobs, 2, "one delivery, one run");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_sql_publish_is_refused_with_the_rust_message_and_writes_nothing() {
    let db = TestDb::new().await;
    let cases = [
        ("SELECT oncely.publish('')", "topic must be 1..=255 printable ASCII characters without spaces"),
        ("SELECT oncely.publish('has space')", "topic must be 1..=255 printable ASCII"),
        ("SELECT oncely.publish(repeat('t', 256))", "topic must be 1..=255 printable ASCII"),
        ("SELECT oncely.publish(NULL)", "topic must be"),
        ("SELECT oncely.publish('t', NULL)", "payload must be JSON"),
        ("SELECT oncely.publish('t', ordering_key => '')", "ordering key must be 1..=255 bytes, got 0"),
        ("SELECT oncely.publish('t', key => repeat('k', 1025))", "event key must be 1..=1024 bytes, got 1025"),
        ("SELECT oncely.publish('t', key_window => interval '0')", "event key window must be positive"),
        ("SELECT oncely.publish('t', queue => '')", "queue name must be 1..=128 bytes, got 0"),
        ("SELECT oncely.publish('t', max_attempts => 0)", "max_attempts must be at least 1, got 0"),
    ];
    for (sql, message) in cases {
        let err = sqlx::query(sql).execute(db.pool()).await.expect_err(sql);
        let db_err = err.as_database_error().expect("a database error");
        assert_eq!(db_err.code().as_deref(), Some("22023"), "{sql}");
        assert!(db_err.message().contains(message), "{sql}: {}", db_err.message());
    }
    // The Rust API refuses the same inputs with the same words.
    for (topic, message) in [("has space", "topic must be 1..=255 printable ASCII"), ("", "topic must be")] {
        let err = oncely::outbox::publish(db.pool(), &oncely::outbox::Event::from_json(topic, serde_json::json!({})))
            .await
            .unwrap_err();
        assert!(err.to_string().contains(message), "{err}");
    }
    let n: (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM oncely.events), (SELECT count(*) FROM oncely.jobs)")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(n, (0, 0));
}
