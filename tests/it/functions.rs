//! Event-driven functions against a real PostgreSQL: runs created by publish's statement (and only
//! when it commits), event idempotency keys under concurrent publishers, cron with several workers
//! and one killed, the crash harness on a triggered function, run history and re-run from a step.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use chrono::{DateTime, TimeZone, Utc};
use oncely::core::function::{self, EventFilter, Function, Trigger};
use oncely::core::outbox::{publish, publish_many, Event};
use oncely::core::schedule::tick_due;
use oncely::{HandlerResult, JobContext, JobId, JobState};
use serde::Deserialize;
use sqlx::PgPool;

#[derive(Debug, Clone, Deserialize)]
struct Order {
    n: i64,
}

/// A handler that records `(function, n)` exactly once, in a transactional step.
fn recorder(
    name: &'static str,
) -> impl Fn(JobContext, Trigger<Order>) -> futures::future::BoxFuture<'static, HandlerResult> {
    move |ctx: JobContext, trigger: Trigger<Order>| {
        Box::pin(async move {
            let Trigger::Event(event) = trigger else { return Err(oncely::Outcome::fail("expected an event")) };
            let n = event.payload.n;
            ctx.step("record")
                .transactional(|tx| {
                    Box::pin(async move {
                        sqlx::query("INSERT INTO effects (function, n) VALUES ($1, $2)")
                            .bind(name)
                            .bind(n)
                            .execute(&mut *tx)
                            .await?;
                        Ok::<_, sqlx::Error>(())
                    })
                })
                .await?;
            Ok(())
        })
    }
}

async fn effects_table(pool: &PgPool) {
    sqlx::query("CREATE TABLE effects (function text NOT NULL, n bigint NOT NULL)").execute(pool).await.unwrap();
}

fn functions() -> [Function; 4] {
    [
        Function::new("exact").on_event("order.created"),
        Function::new("prefix").on_event("order.*"),
        Function::new("filtered").on_event_where("*", EventFilter::new().eq("kind", "order")),
        // Matches no published event: its filter never holds.
        Function::new("never").on_event_where("order.*", EventFilter::new().eq("kind", "refund")),
    ]
}

fn fan_out_worker(pool: PgPool) -> oncely::worker::WorkerBuilder {
    let [exact, prefix, filtered, never] = functions();
    builder(pool)
        .function(exact, recorder("exact"))
        .function(prefix, recorder("prefix"))
        .function(filtered, recorder("filtered"))
        .function(never, recorder("never"))
        .queue("default", 8)
}

async fn kind_counts(pool: &PgPool) -> Vec<(String, i64, i64)> {
    sqlx::query_as(
        "SELECT kind, count(*), count(*) FILTER (WHERE state = 'completed') FROM oncely.jobs GROUP BY kind ORDER BY kind",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_events_fan_out_to_three_functions_and_rolled_back_ones_start_nothing() {
    init_tracing();
    let db = TestDb::new().await;
    effects_table(db.pool()).await;
    // Three workers, each on its own pool, store the same definitions at start.
    let mut workers = Vec::new();
    for _ in 0..3 {
        let w = fan_out_worker(db.new_pool(4).await).build().unwrap();
        w.register_functions().await.unwrap();
        workers.push(w.start());
    }
    // 4 publishers on separate pools; 400 transactions of 50 events, every other one rolled back.
    const TXS: i64 = 400;
    const PER_TX: i64 = 50;
    let mut publishers = Vec::new();
    for p in 0..4_i64 {
        let pool = db.new_pool(1).await;
        publishers.push(tokio::spawn(async move {
            for t in (p..TXS).step_by(4) {
                let events: Vec<Event> = (0..PER_TX)
                    .map(|i| {
                        Event::from_json("order.created", serde_json::json!({ "n": t * PER_TX + i, "kind": "order" }))
                    })
                    .collect();
                let mut tx = pool.begin().await.unwrap();
                if t % 3 == 0 {
                    publish_many(&mut *tx, &events).await.unwrap();
                } else {
                    for e in &events {
                        let p = publish(&mut *tx, e).await.unwrap();
                        assert_eq!((p.runs, p.duplicate), (3, false));
                    }
                }
                if t % 2 == 0 {
                    tx.commit().await.unwrap();
                } else {
                    tx.rollback().await.unwrap();
                }
            }
        }));
    }
    for p in publishers {
        p.await.unwrap();
    }
    wait_all_finished(db.pool(), Duration::from_secs(300)).await;
    for w in &workers {
        w.shutdown().await;
    }
    let committed = TXS / 2 * PER_TX;
    assert_eq!(committed, 10_000);
    let counts = kind_counts(db.pool()).await;
    assert_eq!(
        counts,
        vec![
            ("exact".to_owned(), committed, committed),
            ("filtered".to_owned(), committed, committed),
            ("prefix".to_owned(), committed, committed)
        ],
        "one completed run per committed event and function, none for `never`"
    );
    let (rows, distinct, from_rolled_back): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT (function, n)), count(*) FILTER (WHERE (n / $1) % 2 = 1) FROM effects",
    )
    .bind(PER_TX)
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!((rows, distinct, from_rolled_back), (3 * committed, 3 * committed, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_key_under_twenty_concurrent_publishers_stores_one_event() {
    init_tracing();
    let db = TestDb::new().await;
    let mut conn = db.pool().acquire().await.unwrap();
    let defs = [Function::new("a").on_event("invoice.paid"), Function::new("b").on_event("invoice.*")];
    function::register_functions(&mut conn, &defs, Utc::now()).await.unwrap();
    for url in ["https://one.example.invalid/hook", "https://two.example.invalid/hook"] {
        sqlx::query("INSERT INTO oncely.webhook_endpoints (url, topics, secret) VALUES ($1, '{*}', 'whsec_x')")
            .bind(url)
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    // The first holder of the key rolls back: the key is free again, and nothing of it remains.
    let mut tx = db.pool().begin().await.unwrap();
    let p =
        publish(&mut *tx, &Event::from_json("invoice.paid", serde_json::json!({"i": -1})).key("in_1")).await.unwrap();
    assert!(!p.duplicate);
    tx.rollback().await.unwrap();

    let barrier = Arc::new(tokio::sync::Barrier::new(20));
    let mut tasks = Vec::new();
    for i in 0..20 {
        let pool = db.new_pool(1).await;
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut tx = pool.begin().await.unwrap();
            barrier.wait().await;
            let event = Event::from_json("invoice.paid", serde_json::json!({ "i": i })).key("in_1");
            let p = publish(&mut *tx, &event).await.unwrap();
            tx.commit().await.unwrap();
            p
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let first: Vec<_> = results.iter().filter(|p| !p.duplicate).collect();
    assert_eq!(first.len(), 1, "exactly one publisher stored the event: {results:?}");
    assert_eq!((first[0].runs, first[0].deliveries), (2, 2));
    for p in &results {
        assert_eq!((p.id, &p.message_id), (first[0].id, &first[0].message_id), "every publisher got the first event");
        if p.duplicate {
            assert_eq!((p.runs, p.deliveries), (0, 0));
        }
    }
    let pool = db.pool().clone();
    let count = |sql: &'static str| {
        let pool = pool.clone();
        async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await.unwrap() }
    };
    assert_eq!(count("SELECT count(*) FROM oncely.events").await, 1);
    assert_eq!(count("SELECT count(*) FROM oncely.jobs WHERE kind = 'a'").await, 1);
    assert_eq!(count("SELECT count(*) FROM oncely.jobs WHERE kind = 'b'").await, 1);
    assert_eq!(count("SELECT count(*) FROM oncely.webhook_deliveries").await, 2);
    // In one batch too: the second occurrence of a key is the first's duplicate.
    let batch = [
        Event::from_json("invoice.paid", serde_json::json!({})).key("in_2"),
        Event::from_json("invoice.paid", serde_json::json!({})).key("in_2"),
        Event::from_json("invoice.paid", serde_json::json!({})).key("in_1"),
    ];
    let published = publish_many(db.pool(), &batch).await.unwrap();
    assert_eq!(published.iter().map(|p| p.duplicate).collect::<Vec<_>>(), [false, true, true]);
    assert_eq!(published[0].id, published[1].id);
    assert_eq!(published[2].id, first[0].id);
    // An expired key is taken over by the next publish.
    sqlx::query("UPDATE oncely.event_keys SET expires_at = now() - interval '1 second' WHERE key = 'in_1'")
        .execute(db.pool())
        .await
        .unwrap();
    let again = publish(db.pool(), &Event::from_json("invoice.paid", serde_json::json!({})).key("in_1")).await.unwrap();
    assert!(!again.duplicate && again.id != first[0].id);
}

/// A clock the test moves by hand, shared by every worker's scheduler.
fn manual_clock(start: DateTime<Utc>) -> (Arc<AtomicI64>, oncely::worker::Clock) {
    let millis = Arc::new(AtomicI64::new(start.timestamp_millis()));
    let read = millis.clone();
    let clock: oncely::worker::Clock =
        Arc::new(move || Utc.timestamp_millis_opt(read.load(Ordering::SeqCst)).single().expect("a valid instant"));
    (millis, clock)
}

fn cron_worker(pool: PgPool, clock: oncely::worker::Clock) -> oncely::worker::WorkerBuilder {
    let f = Function::new("every-minute").cron("* * * * *", "UTC");
    builder(pool)
        .function(f, |ctx: JobContext, trigger: Trigger| async move {
            let tick = trigger.tick().expect("a cron run").clone();
            ctx.step("record")
                .transactional(|tx| {
                    Box::pin(async move {
                        sqlx::query("INSERT INTO ticks (at, missed) VALUES ($1, $2)")
                            .bind(tick.at)
                            .bind(tick.missed)
                            .execute(&mut *tx)
                            .await?;
                        Ok::<_, sqlx::Error>(())
                    })
                })
                .await?;
            Ok(())
        })
        .queue("default", 2)
        .clock(clock)
        .configure(|c| c.scheduler_interval = Duration::from_millis(20))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cron_with_three_workers_gives_one_run_per_tick_with_a_worker_killed_midway() {
    init_tracing();
    let db = TestDb::new().await;
    sqlx::query("CREATE TABLE ticks (at timestamptz NOT NULL, missed bigint NOT NULL)")
        .execute(db.pool())
        .await
        .unwrap();
    let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    let (millis, clock) = manual_clock(t0);
    // Worker 0 runs on a runtime of its own, so that dropping that runtime kills it mid-flight: its
    // tasks stop where they stand, with no shutdown, as in a killed process.
    let victim_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let victim_clock = clock.clone();
    let url = db.url().to_owned();
    let victim = victim_rt.block_on_in_thread(async move {
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(&url).await.unwrap();
        let w = cron_worker(pool, victim_clock).build().unwrap();
        w.register_functions().await.unwrap();
        w.start()
    });
    let mut survivors = Vec::new();
    for _ in 0..2 {
        let w = cron_worker(db.new_pool(4).await, clock.clone()).build().unwrap();
        w.register_functions().await.unwrap();
        survivors.push(w.start());
    }
    let runs = |pool: PgPool| async move {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM oncely.jobs WHERE kind = 'every-minute'")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    for i in 1..=50_i64 {
        millis.store((t0 + chrono::Duration::minutes(i)).timestamp_millis(), Ordering::SeqCst);
        eventually(Duration::from_secs(30), &format!("the run of tick {i}"), || {
            let pool = db.pool().clone();
            async move { (runs(pool).await >= i).then_some(()) }
        })
        .await;
        if i == 25 {
            drop(victim);
            victim_rt.shutdown_background();
            break;
        }
    }
    for i in 26..=50_i64 {
        millis.store((t0 + chrono::Duration::minutes(i)).timestamp_millis(), Ordering::SeqCst);
        eventually(Duration::from_secs(30), &format!("the run of tick {i}"), || {
            let pool = db.pool().clone();
            async move { (runs(pool).await >= i).then_some(()) }
        })
        .await;
    }
    wait_all_finished(db.pool(), Duration::from_secs(60)).await;
    for w in &survivors {
        w.shutdown().await;
    }
    assert_eq!(runs(db.pool().clone()).await, 50, "exactly one run per tick");
    let ticks: Vec<(DateTime<Utc>, i64)> =
        sqlx::query_as("SELECT at, missed FROM ticks ORDER BY at").fetch_all(db.pool()).await.unwrap();
    let expected: Vec<(DateTime<Utc>, i64)> = (1..=50).map(|i| (t0 + chrono::Duration::minutes(i), 0)).collect();
    assert_eq!(ticks, expected, "each tick's effect once, none missed");
}

/// Run a future to completion on a runtime from outside it, on a plain thread (the runtime keeps
/// running the tasks it spawned on its own threads until it is shut down).
trait BlockOnInThread {
    fn block_on_in_thread<T: Send + 'static>(&self, f: impl std::future::Future<Output = T> + Send + 'static) -> T;
}

impl BlockOnInThread for tokio::runtime::Runtime {
    fn block_on_in_thread<T: Send + 'static>(&self, f: impl std::future::Future<Output = T> + Send + 'static) -> T {
        let handle = self.handle().clone();
        std::thread::spawn(move || handle.block_on(f)).join().expect("the victim worker starts")
    }
}

#[tokio::test]
async fn ticks_missed_while_no_worker_ran_give_one_run_and_the_schedule_resumes_after_now() {
    init_tracing();
    let db = TestDb::new().await;
    let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    let mut conn = db.pool().acquire().await.unwrap();
    let def = Function::new("nightly").cron("0 2 * * *", "Europe/Paris");
    function::register_functions(&mut conn, std::slice::from_ref(&def), t0).await.unwrap();
    assert!(tick_due(db.pool(), Some(t0)).await.unwrap().is_empty(), "nothing due yet");
    // Eleven nights due (Jan 1 to Jan 11), with no worker in between.
    let later = t0 + chrono::Duration::days(10) + chrono::Duration::hours(3);
    let runs = tick_due(db.pool(), Some(later)).await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].tick.missed, 10);
    assert_eq!(runs[0].tick.at, Utc.with_ymd_and_hms(2026, 1, 11, 1, 0, 0).unwrap(), "02:00 Paris is 01:00 UTC");
    assert!(tick_due(db.pool(), Some(later)).await.unwrap().is_empty(), "one run, not one per call");
    // Re-registering the same schedule (a restart) keeps its next tick; changing it restarts it.
    function::register_functions(&mut conn, std::slice::from_ref(&def), later).await.unwrap();
    let next: DateTime<Utc> =
        sqlx::query_scalar("SELECT next_tick FROM oncely.schedules").fetch_one(&mut *conn).await.unwrap();
    assert_eq!(next, Utc.with_ymd_and_hms(2026, 1, 12, 1, 0, 0).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_triggered_function_gives_the_same_effects_with_a_crash_at_every_step_boundary() {
    init_tracing();
    let report = oncely_testkit::CrashHarness::new()
        .setup(|pool| async move {
            sqlx::query("CREATE TABLE lines (what text NOT NULL, amount bigint NOT NULL)")
                .execute(&pool)
                .await
                .unwrap();
            let mut conn = pool.acquire().await.unwrap();
            function::register_functions(&mut conn, &[bill_def()], Utc::now()).await.unwrap();
            let mut tx = pool.begin().await.unwrap();
            sqlx::query("INSERT INTO lines VALUES ('order', 0)").execute(&mut *tx).await.unwrap();
            publish(&mut *tx, &Event::from_json("order.placed", serde_json::json!({ "n": 7 }))).await.unwrap();
            tx.commit().await.unwrap();
        })
        .register(|w| w.function(bill_def(), bill))
        .effects(|pool| async move {
            let rows: Vec<(String, i64)> =
                sqlx::query_as("SELECT what, amount FROM lines ORDER BY what, amount").fetch_all(&pool).await.unwrap();
            serde_json::json!(rows)
        })
        .run()
        .await;
    assert!(report.boundaries.len() >= 9, "three steps, three boundaries each: {:?}", report.boundaries);
    report.assert_same_effects();
}

fn bill_def() -> Function {
    Function::new("bill").on_event("order.placed")
}

async fn bill(ctx: JobContext, trigger: Trigger<Order>) -> HandlerResult {
    let n = trigger.event().expect("an event").payload.n;
    let price: i64 = ctx.step("price").run(|| async move { Ok::<_, std::io::Error>(n * 100) }).await?;
    for (step, key, what) in [("charge", None, "charge"), ("usage", Some(format!("usage:order:{n}")), "usage")] {
        let mut s = ctx.step(step);
        if let Some(key) = key {
            s = s.key(key);
        }
        s.transactional(|tx| {
            Box::pin(async move {
                sqlx::query("INSERT INTO lines VALUES ($1, $2)").bind(what).bind(price).execute(&mut *tx).await?;
                Ok::<_, sqlx::Error>(())
            })
        })
        .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_history_shows_the_steps_and_a_rerun_from_a_step_keeps_business_key_steps() {
    init_tracing();
    let db = TestDb::new().await;
    sqlx::query("CREATE TABLE lines (what text NOT NULL, amount bigint NOT NULL)").execute(db.pool()).await.unwrap();
    let worker = || builder(db.pool().clone()).function(bill_def(), bill).queue("default", 1);
    worker().build().unwrap().register_functions().await.unwrap();
    let published = publish(db.pool(), &Event::from_json("order.placed", serde_json::json!({ "n": 3 }))).await.unwrap();
    assert_eq!(published.runs, 1);
    oncely_testkit::run_until_idle(db.pool(), worker(), Duration::from_secs(30)).await;

    let runs = function::list_runs(db.pool(), Some("bill"), 10).await.unwrap();
    assert_eq!(runs.len(), 1);
    let run = &runs[0];
    assert_eq!(run.state, "completed");
    assert_eq!(run.trigger.event().map(|e| e.id), Some(published.id));
    let mut conn = db.pool().acquire().await.unwrap();
    let detail = function::run_history(&mut conn, run.id).await.unwrap();
    let names: Vec<(&str, bool)> = detail.steps.iter().map(|s| (s.name.as_str(), s.business_key)).collect();
    assert_eq!(names, [("price", false), ("charge", false), ("usage:order:3", true)]);
    assert_eq!(detail.steps[0].output, Some(serde_json::json!(300)));
    assert!(detail.steps.iter().all(|s| s.state == "completed" && s.attempt == Some(1)));

    // Not finished yet: refused. Unknown step: refused.
    assert!(function::rerun_from_step(&mut conn, JobId(run.id.0 + 1000), "price").await.is_err());
    assert!(function::rerun_from_step(&mut conn, run.id, "nope").await.is_err());
    let rerun = function::rerun_from_step(&mut conn, run.id, "charge").await.unwrap();
    assert_eq!(rerun.invalidated, ["charge"], "the business-key step is never invalidated");
    assert!(function::rerun_from_step(&mut conn, run.id, "charge").await.is_err(), "it is queued, not finished");
    oncely_testkit::run_until_idle(db.pool(), worker(), Duration::from_secs(30)).await;
    let lines: Vec<(String, i64)> =
        sqlx::query_as("SELECT what, amount FROM lines ORDER BY what").fetch_all(db.pool()).await.unwrap();
    assert_eq!(
        lines,
        [("charge".to_owned(), 300), ("charge".to_owned(), 300), ("usage".to_owned(), 300)],
        "the re-run charged again from `charge`; usage (business key) stayed once"
    );
    assert_eq!(oncely::get_job(db.pool(), run.id).await.unwrap().state, JobState::Completed);
}

#[tokio::test]
async fn subscriptions_are_not_retroactive_and_expired_event_keys_are_pruned() {
    init_tracing();
    let db = TestDb::new().await;
    let early = publish(db.pool(), &Event::from_json("invoice.paid", serde_json::json!({})).key("k")).await.unwrap();
    assert_eq!(early.runs, 0, "no subscription stored yet: no run");
    let mut conn = db.pool().acquire().await.unwrap();
    let def = Function::new("a").on_event("invoice.*");
    function::register_functions(&mut conn, std::slice::from_ref(&def), Utc::now()).await.unwrap();
    let later = publish(db.pool(), &Event::from_json("invoice.paid", serde_json::json!({}))).await.unwrap();
    assert_eq!(later.runs, 1);
    let runs: i64 =
        sqlx::query_scalar("SELECT count(*) FROM oncely.jobs WHERE kind = 'a'").fetch_one(db.pool()).await.unwrap();
    assert_eq!(runs, 1, "the earlier event got no run when the subscription appeared");
    // A worker whose function goes to a queue it does not serve is refused at build.
    let refused = builder(db.pool().clone())
        .function(Function::new("b").on_event("x").queue("elsewhere"), |_c: JobContext, _t: Trigger| async { Ok(()) })
        .queue("default", 1)
        .build();
    assert!(refused.is_err());
    // Maintenance prunes expired keys only.
    sqlx::query("UPDATE oncely.event_keys SET expires_at = now() - interval '1 second'")
        .execute(db.pool())
        .await
        .unwrap();
    publish(db.pool(), &Event::from_json("invoice.paid", serde_json::json!({})).key("live")).await.unwrap();
    assert_eq!(oncely::schedule::prune_event_keys(db.pool(), 100).await.unwrap(), 1);
    let keys: Vec<String> = sqlx::query_scalar("SELECT key FROM oncely.event_keys").fetch_all(db.pool()).await.unwrap();
    assert_eq!(keys, ["live"]);
}
