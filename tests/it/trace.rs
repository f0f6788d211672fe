//! Tracing across the queue without an OpenTelemetry layer: the W3C `traceparent` given at enqueue
//! (Rust or SQL) is stored with the job and handed to its handler; a malformed one is refused on
//! every way in. The OpenTelemetry propagation itself is `tests/otel.rs` (a binary of its own: it
//! installs the process-wide subscriber).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use oncely::core::trace::TraceParent;
use oncely::{enqueue, enqueue_many, handler_fn, JobArgs, JobId, NewJob};
use serde::{Deserialize, Serialize};

const TP1: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TP2: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
const TP3: &str = "00-11111111111111111111111111111111-2222222222222222-01";

#[derive(Debug, Serialize, Deserialize)]
struct Traced {
    n: u32,
}
impl JobArgs for Traced {
    const KIND: &'static str = "traced";
}

fn tp(s: &str) -> TraceParent {
    s.parse().unwrap()
}

async fn stored(pool: &sqlx::PgPool, id: JobId) -> Option<String> {
    sqlx::query_scalar("SELECT traceparent FROM oncely.jobs WHERE id = $1").bind(id).fetch_one(pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_traceparent_given_at_enqueue_is_stored_and_handed_to_the_handler() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    let with = enqueue(pool, NewJob::new(&Traced { n: 1 }).unwrap().traceparent(tp(TP1))).await.unwrap().id;
    // No traceparent given, and no OpenTelemetry layer to take one from: none stored.
    let without = enqueue(pool, NewJob::new(&Traced { n: 2 }).unwrap()).await.unwrap().id;
    // From SQL, as another language would.
    let from_sql: i64 = sqlx::query_scalar("SELECT oncely.enqueue('traced', '{\"n\": 3}', traceparent => $1)")
        .bind(TP2)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(stored(pool, with).await.as_deref(), Some(TP1));
    assert_eq!(stored(pool, without).await, None);
    assert_eq!(stored(pool, JobId(from_sql)).await.as_deref(), Some(TP2));
    assert_eq!(oncely::get_job(pool, with).await.unwrap().traceparent, Some(tp(TP1)));
    assert_eq!(oncely::get_job(pool, without).await.unwrap().traceparent, None);

    let seen: Arc<Mutex<HashMap<u32, Option<String>>>> = Arc::default();
    let s = seen.clone();
    let builder = builder(pool.clone())
        .register(handler_fn(move |ctx, t: Traced| {
            let s = s.clone();
            async move {
                s.lock().unwrap().insert(t.n, ctx.traceparent().map(|tp| tp.to_string()));
                Ok(())
            }
        }))
        .queue("default", 2);
    let drained = oncely::testkit::run_until_idle(pool, builder, Duration::from_secs(30)).await;
    assert_eq!(drained.completed, 3);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen, HashMap::from([(1, Some(TP1.to_owned())), (2, None), (3, Some(TP2.to_owned()))]));
}

#[tokio::test(flavor = "multi_thread")]
async fn every_enqueue_path_stores_the_traceparent() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let job = |n: u32| NewJob::new(&Traced { n }).unwrap();
    // One statement per batch (unnest), with and without unique keys and concurrency keys.
    let batch = [job(1).traceparent(tp(TP1)), job(2), job(3).traceparent(tp(TP2)).unique_key("u3")];
    let ids: Vec<JobId> = enqueue_many(pool, &batch).await.unwrap().into_iter().map(|e| e.id).collect();
    assert_eq!(stored(pool, ids[0]).await.as_deref(), Some(TP1));
    assert_eq!(stored(pool, ids[1]).await, None);
    assert_eq!(stored(pool, ids[2]).await.as_deref(), Some(TP2));
    let flow = [job(4).concurrency_key("tenant:1", Some(2)).traceparent(tp(TP3)), job(5).concurrency_key("t:2", None)];
    let ids: Vec<JobId> = enqueue_many(pool, &flow).await.unwrap().into_iter().map(|e| e.id).collect();
    assert_eq!(stored(pool, ids[0]).await.as_deref(), Some(TP3));
    assert_eq!(stored(pool, ids[1]).await, None);
    // One job: plain, unique, with a concurrency key.
    for j in [job(6), job(7).unique_key("u7"), job(8).concurrency_key("tenant:1", None)] {
        let id = enqueue(pool, j.traceparent(tp(TP1))).await.unwrap().id;
        assert_eq!(stored(pool, id).await.as_deref(), Some(TP1));
    }
    // Unique for a period, and debounced.
    let id = oncely::unique::enqueue_unique_for(pool, job(9).traceparent(tp(TP2)), "u9", Duration::from_secs(60))
        .await
        .unwrap()
        .id;
    assert_eq!(stored(pool, id).await.as_deref(), Some(TP2));
    let d = oncely::debounce::Debounce::new(Duration::from_secs(60));
    let id = oncely::debounce::enqueue_debounced(pool, job(10).traceparent(tp(TP3)), "d10", d).await.unwrap().id;
    assert_eq!(stored(pool, id).await.as_deref(), Some(TP3));

    // COPY (a large batch of plain jobs): every other job carries one.
    let many: Vec<NewJob> = (0..oncely::core::queue::COPY_THRESHOLD as u32)
        .map(|n| if n % 2 == 0 { job(1000 + n).traceparent(tp(TP3)) } else { job(1000 + n) })
        .collect();
    enqueue_many(pool, &many).await.unwrap();
    let (with, without): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE traceparent = $1), count(*) FILTER (WHERE traceparent IS NULL) \
         FROM oncely.jobs WHERE (args->>'n')::int >= 1000",
    )
    .bind(TP3)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!((with, without), (128, 128));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_traceparent_is_refused_on_every_way_in() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let bad = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01";
    // Rust: a typed error where the header is parsed, so no job can carry it.
    match bad.parse::<TraceParent>() {
        Err(oncely::Error::InvalidInput(m)) => assert!(m.contains("traceparent must be a W3C trace context"), "{m}"),
        other => panic!("not refused: {other:?}"),
    }
    // SQL: SQLSTATE 22023 with the Rust message, for each malformed shape.
    for value in [
        bad,
        "",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
    ] {
        let err = sqlx::query("SELECT oncely.enqueue('traced', traceparent => $1)")
            .bind(value)
            .execute(pool)
            .await
            .expect_err(value);
        let db_err = err.as_database_error().expect("a database error");
        assert_eq!(db_err.code().as_deref(), Some("22023"), "{value}");
        assert!(db_err.message().starts_with("traceparent must be a W3C trace context"), "{}", db_err.message());
    }
    // Written around the API: the column's check constraint refuses it.
    let err = sqlx::query("INSERT INTO oncely.jobs (kind, traceparent) VALUES ('traced', $1)")
        .bind(bad)
        .execute(pool)
        .await
        .expect_err("the check constraint");
    assert_eq!(err.as_database_error().unwrap().code().as_deref(), Some("23514"));
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM oncely.jobs").fetch_one(pool).await.unwrap();
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sql_enqueue_keeps_its_old_calls_and_drops_a_later_versions_extra_fields() {
    let db = TestDb::new().await;
    let pool = db.pool();
    // The eight positional arguments of the first signature still resolve.
    let old: i64 = sqlx::query_scalar("SELECT oncely.enqueue('traced', '{}', 'default', 0, NULL, NULL, 20, 'u1')")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(stored(pool, JobId(old)).await, None);
    // Version 01 with a field this format does not know: the first four fields are kept.
    let later: i64 = sqlx::query_scalar("SELECT oncely.enqueue('traced', traceparent => $1)")
        .bind("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-abcd")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(
        stored(pool, JobId(later)).await.as_deref(),
        Some("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    // And the Rust parser agrees.
    let rust = TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-abcd").unwrap();
    assert_eq!(Some(rust.as_str().to_owned()), stored(pool, JobId(later)).await);
}
