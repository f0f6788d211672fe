//! Durable waits of function runs against a real PostgreSQL: a sleep across a SIGKILLed worker,
//! wait_for_event racing its event 1,000 times on separate pools, cancel_on while a step runs, and the
//! crash harness over a function with a sleep, a wait and a child run.

use std::time::Duration;

use crate::common::*;
use chrono::{DateTime, Utc};
use oncely::core::function::{self, Function, Trigger};
use oncely::core::outbox::{publish, Event};
use oncely::worker::flow::EventMatch;
use oncely::{HandlerResult, JobContext, JobId};
use rand::Rng;
use sqlx::PgPool;

fn effect_step<'a>(
    ctx: &'a JobContext,
    step: &'a str,
    what: String,
) -> impl std::future::Future<Output = Result<(), oncely::StepError>> + 'a {
    let run = ctx.id();
    ctx.step(step).transactional(move |tx| {
        Box::pin(async move {
            sqlx::query("INSERT INTO effects (run_id, what) VALUES ($1, $2)")
                .bind(run)
                .bind(what)
                .execute(&mut *tx)
                .await?;
            Ok::<_, sqlx::Error>(())
        })
    })
}

async fn effects_table(pool: &PgPool) {
    sqlx::query("CREATE TABLE effects (run_id bigint NOT NULL, what text NOT NULL)").execute(pool).await.unwrap();
}

// ---- durable sleep -------------------------------------------------------------------------

const NAP: Duration = Duration::from_secs(3);

fn sleeper() -> Function {
    Function::new("sleeper").on_event("nap.start")
}

async fn sleep_handler(ctx: JobContext, _t: Trigger) -> HandlerResult {
    effect_step(&ctx, "before", "before".into()).await?;
    ctx.sleep("nap", NAP).await?;
    effect_step(&ctx, "after", "after".into()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "spawned by waits::a_sleep_survives_a_sigkilled_worker as a child process"]
async fn sleep_child_worker() {
    let Ok(url) = std::env::var("ONCELY_WAITS_CHILD_URL") else { return };
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    run_child_worker(builder(pool).function(sleeper(), sleep_handler).queue("default", 2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleep_survives_a_sigkilled_worker_and_resumes_on_another() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    effects_table(pool).await;
    let mut conn = pool.acquire().await.unwrap();
    function::register_functions(&mut conn, &[sleeper()], Utc::now()).await.unwrap();
    drop(conn);
    let mut child =
        spawn_child(concat!(module_path!(), "::sleep_child_worker"), &[("ONCELY_WAITS_CHILD_URL", db.url())]);
    publish(pool, &Event::from_json("nap.start", serde_json::json!({}))).await.unwrap();
    let id: i64 =
        sqlx::query_scalar("SELECT id FROM oncely.jobs WHERE kind = 'sleeper'").fetch_one(pool).await.unwrap();
    // The child ran the first step and suspended the run: available, due at the recorded wake time,
    // one claim given back (not an attempt), no worker holding it.
    let (wake, run_at): (DateTime<Utc>, DateTime<Utc>) =
        eventually(Duration::from_secs(30), "the run to be suspended in its sleep", || async {
            sqlx::query_as::<_, (DateTime<Utc>, DateTime<Utc>)>(
                "SELECT (l.output->>'sleep_until')::timestamptz, j.run_at FROM oncely.jobs j \
                 JOIN oncely.ledger l ON l.namespace = 'step' AND l.key = 'job:' || j.id || ':nap' AND l.state = 'completed' \
                 WHERE j.id = $1 AND j.state = 'available' AND j.snoozes = 1",
            )
            .bind(id)
            .fetch_optional(pool)
            .await
            .unwrap()
        })
        .await;
    assert!((run_at - wake).num_milliseconds().abs() < 1000, "suspended until its wake time: {run_at} vs {wake}");
    let (worker, lease): (Option<String>, Option<DateTime<Utc>>) =
        sqlx::query_as("SELECT worker_id, lease_expires_at FROM oncely.jobs WHERE id = $1")
            .bind(id)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(lease, None, "a sleeping run holds no lease (worker {worker:?})");
    child.start_kill().unwrap();
    assert!(!child.wait().await.unwrap().success());
    let w =
        builder(db.new_pool(3).await).function(sleeper(), sleep_handler).queue("default", 2).build().unwrap().start();
    wait_all_finished(pool, Duration::from_secs(60)).await;
    w.shutdown().await;
    let (state, attempt, snoozes, attempted_at): (String, i32, i32, DateTime<Utc>) =
        sqlx::query_as("SELECT state, attempt, snoozes, attempted_at FROM oncely.jobs WHERE id = $1")
            .bind(id)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(state, "completed");
    assert_eq!(attempt - snoozes, 1, "the sleep is not counted as an attempt");
    assert!(attempted_at >= wake, "resumed only after the wake time ({attempted_at} < {wake})");
    let effects: Vec<(String, i64)> =
        sqlx::query_as("SELECT what, count(*) FROM effects GROUP BY what ORDER BY what").fetch_all(pool).await.unwrap();
    assert_eq!(effects, vec![("after".to_owned(), 1), ("before".to_owned(), 1)], "the step before the sleep ran once");
    let detail = function::run_history(&mut pool.acquire().await.unwrap(), JobId(id)).await.unwrap();
    let nap = detail.steps.iter().find(|s| s.name == "nap").expect("the sleep is in the run's history");
    assert!(nap.output.as_ref().and_then(|o| o.get("sleep_until")).is_some());
}

// ---- wait_for_event racing its event ---------------------------------------------------------

fn waiter() -> Function {
    Function::new("waiter").on_event("order.placed")
}

async fn wait_handler(ctx: JobContext, trigger: Trigger) -> HandlerResult {
    let order = trigger.event().map(|e| e.payload["order_id"].clone()).unwrap_or_default();
    let paid = ctx
        .wait_for_event("paid", "order.paid", EventMatch::field("order_id"), Duration::from_secs(120))
        .look_back(Duration::from_secs(3600))
        .await?;
    // Outside any step: counts every time the run gets past its wait.
    sqlx::query("INSERT INTO resumes (run_id, event_id) VALUES ($1, $2)")
        .bind(ctx.id())
        .bind(paid.as_ref().map(|e| e.id.0))
        .execute(ctx.pool())
        .await?;
    let what = format!("{order}:{}", paid.map(|e| e.id.0.to_string()).unwrap_or_else(|| "timeout".into()));
    effect_step(&ctx, "record", what).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wait_for_event_racing_its_event_a_thousand_times_is_never_lost_nor_resumed_twice() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    effects_table(pool).await;
    sqlx::query("CREATE TABLE resumes (run_id bigint NOT NULL, event_id bigint)").execute(pool).await.unwrap();
    let mut workers = Vec::new();
    for _ in 0..3 {
        let w = builder(db.new_pool(4).await).function(waiter(), wait_handler).queue("default", 8).build().unwrap();
        w.register_functions().await.unwrap();
        workers.push(w.start());
    }
    const TRIALS: i64 = 1000;
    const PUBLISHERS: i64 = 8;
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let placer = db.new_pool(1).await;
        let payer = db.new_pool(1).await;
        tasks.push(tokio::spawn(async move {
            let mut paid = Vec::new();
            for order in (p..TRIALS).step_by(PUBLISHERS as usize) {
                publish(&placer, &Event::from_json("order.placed", serde_json::json!({ "order_id": order })))
                    .await
                    .unwrap();
                // A random offset around the run's registration (claimed within milliseconds), and a
                // publishing transaction that stays open a random while: the two race.
                let (before, open) = {
                    let mut rng = rand::rng();
                    (rng.random_range(0..25), rng.random_range(0..6))
                };
                tokio::time::sleep(Duration::from_millis(before)).await;
                let mut tx = payer.begin().await.unwrap();
                let e = publish(&mut *tx, &Event::from_json("order.paid", serde_json::json!({ "order_id": order })))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(open)).await;
                tx.commit().await.unwrap();
                paid.push((order, e.id.0));
            }
            paid
        }));
    }
    let mut paid = Vec::new();
    for t in tasks {
        paid.extend(t.await.unwrap());
    }
    wait_all_finished(pool, Duration::from_secs(300)).await;
    for w in &workers {
        w.shutdown().await;
    }
    paid.sort();
    let mut recorded: Vec<(i64, i64)> = sqlx::query_as::<_, (String,)>("SELECT what FROM effects")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .map(|(w,)| {
            let (o, e) = w.split_once(':').unwrap();
            (o.parse().unwrap(), e.parse().unwrap_or_else(|_| panic!("order {o} timed out: its event was lost")))
        })
        .collect();
    recorded.sort();
    assert_eq!(recorded.len() as i64, TRIALS);
    assert_eq!(recorded, paid, "every run got its own order's event");
    let (resumes, runs, max_per_run): (i64, i64, i64) = sqlx::query_as(
        "SELECT coalesce(sum(n), 0)::bigint, count(*), coalesce(max(n), 0) FROM \
         (SELECT run_id, count(*) AS n FROM resumes GROUP BY run_id) r",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!((resumes, runs, max_per_run), (TRIALS, TRIALS, 1), "each run got past its wait exactly once");
    // Both sides of the race happened: some waits found their event at registration, others were
    // resolved by the publisher and woke a suspended run.
    let (at_registration, by_publisher): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE resolved_at = registered_at), count(*) FILTER (WHERE resolved_at <> registered_at) \
         FROM oncely.event_waits WHERE event_id IS NOT NULL",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    tracing::info!(at_registration, by_publisher, "how the waits were resolved");
    assert_eq!(at_registration + by_publisher, TRIALS);
    assert!(at_registration > 0 && by_publisher > 0, "the race was exercised: {at_registration} / {by_publisher}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_times_out_with_none_and_ignores_earlier_events_without_a_look_back() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    effects_table(pool).await;
    let f = Function::new("approval").on_event("report.ready");
    let handler = |ctx: JobContext, _t: Trigger| async move {
        let approved = ctx
            .wait_for_event("approved", "report.approved", EventMatch::field("report_id"), Duration::from_secs(2))
            .await?;
        effect_step(&ctx, "record", approved.map_or("timeout".to_owned(), |e| e.id.0.to_string())).await?;
        Ok(())
    };
    // An approval published before the run exists does not count (no look-back)...
    publish(pool, &Event::from_json("report.approved", serde_json::json!({ "report_id": 1 }))).await.unwrap();
    let w = builder(db.new_pool(3).await).function(f, handler).queue("default", 2).build().unwrap();
    w.register_functions().await.unwrap();
    let w = w.start();
    publish(pool, &Event::from_json("report.ready", serde_json::json!({ "report_id": 1 }))).await.unwrap();
    // ...nor does one for another report.
    eventually(Duration::from_secs(30), "the run to wait", || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM oncely.event_waits")
            .fetch_one(pool)
            .await
            .unwrap()
            .eq(&1)
            .then_some(())
    })
    .await;
    publish(pool, &Event::from_json("report.approved", serde_json::json!({ "report_id": 2 }))).await.unwrap();
    wait_all_finished(pool, Duration::from_secs(30)).await;
    w.shutdown().await;
    let what: Vec<String> = sqlx::query_scalar("SELECT what FROM effects").fetch_all(pool).await.unwrap();
    assert_eq!(what, vec!["timeout".to_owned()]);
    let (resolved, event): (bool, Option<i64>) =
        sqlx::query_as("SELECT resolved_at >= timeout_at, event_id FROM oncely.event_waits")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!((resolved, event), (true, None));
}

// ---- cancel_on -------------------------------------------------------------------------------

fn cancellable() -> Function {
    Function::new("onboarding").on_event("user.signup").cancel_on("user.deleted", "user_id")
}

async fn onboarding(ctx: JobContext, trigger: Trigger) -> HandlerResult {
    let payload = trigger.event().map(|e| e.payload.clone()).unwrap_or_default();
    let user = payload["user_id"].as_i64().unwrap_or_default();
    let pool = ctx.pool().clone();
    let run = ctx.id();
    let gate = payload["gate"].as_bool() == Some(true);
    ctx.step("slow")
        .run(|| async move {
            sqlx::query("INSERT INTO started (run_id, user_id) VALUES ($1, $2)")
                .bind(run)
                .bind(user)
                .execute(&pool)
                .await?;
            if gate {
                // Runs until the test opens the gate (a condition, polled).
                while !sqlx::query_scalar::<_, bool>("SELECT open FROM gate").fetch_one(&pool).await? {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            Ok::<_, sqlx::Error>(())
        })
        .await?;
    if payload["nap"].as_bool() == Some(true) {
        ctx.sleep("nap", Duration::from_secs(600)).await?;
    }
    effect_step(&ctx, "after", user.to_string()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_on_stops_a_running_step_at_its_boundary_and_cancels_a_sleeping_run() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    effects_table(pool).await;
    sqlx::raw_sql("CREATE TABLE started (run_id bigint, user_id bigint); CREATE TABLE gate (open bool NOT NULL); INSERT INTO gate VALUES (false)")
        .execute(pool)
        .await
        .unwrap();
    let w = builder(db.new_pool(4).await).function(cancellable(), onboarding).queue("default", 4).build().unwrap();
    w.register_functions().await.unwrap();
    let w = w.start();
    let signup = |user: i64, gate: bool, nap: bool| {
        Event::from_json("user.signup", serde_json::json!({ "user_id": user, "gate": gate, "nap": nap }))
    };
    publish(pool, &signup(1, true, false)).await.unwrap(); // cancelled while its step runs
    publish(pool, &signup(2, true, false)).await.unwrap(); // another user: not cancelled
    publish(pool, &signup(3, false, true)).await.unwrap(); // cancelled while it sleeps
    eventually(Duration::from_secs(30), "users 1 and 2 mid-step, user 3 asleep", || async {
        let started: i64 = sqlx::query_scalar("SELECT count(*) FROM started").fetch_one(pool).await.unwrap();
        let asleep: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM oncely.jobs WHERE state = 'available' AND args #>> '{trigger,event,payload,user_id}' = '3'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        (started == 3 && asleep == 1).then_some(())
    })
    .await;
    for user in [1, 3] {
        publish(pool, &Event::from_json("user.deleted", serde_json::json!({ "user_id": user }))).await.unwrap();
    }
    // The sleeping run is cancelled by the publishing statement itself.
    let state: String =
        sqlx::query_scalar("SELECT state FROM oncely.jobs WHERE args #>> '{trigger,event,payload,user_id}' = '3'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(state, "cancelled");
    sqlx::query("UPDATE gate SET open = true").execute(pool).await.unwrap();
    // A deletion published after the run was created but before it first ran (here: in the same
    // transaction) cancels it before its first step...
    let mut tx = pool.begin().await.unwrap();
    publish(&mut *tx, &signup(4, false, false)).await.unwrap();
    publish(&mut *tx, &Event::from_json("user.deleted", serde_json::json!({ "user_id": 4 }))).await.unwrap();
    tx.commit().await.unwrap();
    // ...while one published before the run was created does not count.
    publish(pool, &signup(1, false, false)).await.unwrap();
    wait_all_finished(pool, Duration::from_secs(60)).await;
    w.shutdown().await;
    let runs: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT args #>> '{trigger,event,payload,user_id}', state, \
                (SELECT count(*) FROM started s WHERE s.run_id = j.id) \
         FROM oncely.jobs j WHERE kind = 'onboarding' ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(
        runs,
        vec![
            ("1".to_owned(), "cancelled".to_owned(), 1),
            ("2".to_owned(), "completed".to_owned(), 1),
            ("3".to_owned(), "cancelled".to_owned(), 1),
            ("4".to_owned(), "cancelled".to_owned(), 0),
            ("1".to_owned(), "completed".to_owned(), 1),
        ]
    );
    let effects: Vec<String> =
        sqlx::query_scalar("SELECT what FROM effects ORDER BY what").fetch_all(pool).await.unwrap();
    assert_eq!(effects, vec!["1".to_owned(), "2".to_owned()], "no step after a cancellation ran");
    // The state says why: the error history names the event.
    let reasons: Vec<String> =
        sqlx::query_scalar("SELECT errors -> -1 ->> 'message' FROM oncely.jobs WHERE state = 'cancelled' ORDER BY id")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(reasons.len(), 3);
    for r in &reasons {
        assert!(r.contains("cancelled by event") && r.contains("user.deleted"), "{r}");
    }
    // The running step itself finished and was recorded: the run stopped at the next boundary.
    let first = runs_first(pool).await;
    let detail = function::run_history(&mut pool.acquire().await.unwrap(), first).await.unwrap();
    assert_eq!(
        detail.steps.iter().map(|s| (s.name.as_str(), s.state.as_str())).collect::<Vec<_>>(),
        [("slow", "completed")]
    );
    assert_eq!(detail.waits.len(), 1);
    assert_eq!((detail.waits[0].kind.as_str(), detail.waits[0].matching.as_str()), ("cancel", "user_id=1"));
}

async fn runs_first(pool: &PgPool) -> JobId {
    JobId(
        sqlx::query_scalar("SELECT min(id) FROM oncely.jobs WHERE kind = 'onboarding'").fetch_one(pool).await.unwrap(),
    )
}

// ---- the crash harness over a sleep, a wait and a child run ------------------------------------

fn approval_flow() -> [Function; 2] {
    [Function::new("flow").on_event("flow.start"), Function::new("approver").on_event("approval.requested")]
}

async fn line(
    ctx: &JobContext,
    step: &str,
    what: &'static str,
    publish_after: Option<Event>,
) -> Result<(), oncely::StepError> {
    ctx.step(step)
        .transactional(move |tx| {
            Box::pin(async move {
                sqlx::query("INSERT INTO lines (what) VALUES ($1)").bind(what).execute(&mut *tx).await?;
                if let Some(e) = publish_after {
                    publish(&mut *tx, &e).await.map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
                }
                Ok::<_, sqlx::Error>(())
            })
        })
        .await
}

async fn flow(ctx: JobContext, trigger: Trigger) -> HandlerResult {
    let id = trigger.event().map(|e| e.payload["id"].clone()).unwrap_or_default();
    line(&ctx, "start", "start", None).await?;
    ctx.sleep("pause", Duration::from_millis(300)).await?;
    let ask = Event::from_json("approval.requested", serde_json::json!({ "id": id }));
    line(&ctx, "ask", "asked", Some(ask)).await?;
    // Crashes may delay this registration past the approval: the look-back counts it.
    let granted = ctx
        .wait_for_event("granted", "approval.granted", EventMatch::field("id"), Duration::from_secs(60))
        .look_back(Duration::from_secs(600))
        .await?;
    // A child run: enqueued with the step's record, its result returned durably.
    let receipt: String = ctx.invoke("receipt", &Receipt { id: id.to_string() }).await?;
    line(
        &ctx,
        "finish",
        if granted.is_some() && receipt == format!("receipt {id}") { "billed" } else { "expired" },
        None,
    )
    .await?;
    Ok(())
}

/// The flow's child run: one line, and its result.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Receipt {
    id: String,
}
impl oncely::JobArgs for Receipt {
    const KIND: &'static str = "receipt";
}

async fn receipt(ctx: JobContext, r: Receipt) -> HandlerResult {
    line(&ctx, "write", "receipt", None).await?;
    ctx.set_output(&format!("receipt {}", r.id)).await?;
    Ok(())
}

async fn approver(ctx: JobContext, trigger: Trigger) -> HandlerResult {
    let id = trigger.event().map(|e| e.payload["id"].clone()).unwrap_or_default();
    let grant = Event::from_json("approval.granted", serde_json::json!({ "id": id }));
    line(&ctx, "grant", "granted", Some(grant)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_with_a_sleep_a_wait_and_a_child_run_gives_the_same_effects_with_a_crash_at_every_step_boundary() {
    init_tracing();
    let report = oncely_testkit::CrashHarness::new()
        .setup(|pool| async move {
            sqlx::query("CREATE TABLE lines (what text NOT NULL)").execute(&pool).await.unwrap();
            let mut conn = pool.acquire().await.unwrap();
            function::register_functions(&mut conn, &approval_flow(), Utc::now()).await.unwrap();
            publish(&pool, &Event::from_json("flow.start", serde_json::json!({ "id": 7 }))).await.unwrap();
        })
        // One slot: the approver can only run while the flow is suspended in its wait.
        .register(|w| {
            let [f, a] = approval_flow();
            w.function(f, flow).function(a, approver).register(oncely::handler_fn(receipt))
        })
        .effects(|pool| async move {
            let rows: Vec<(String, i64)> =
                sqlx::query_as("SELECT what, count(*) FROM lines GROUP BY what ORDER BY what")
                    .fetch_all(&pool)
                    .await
                    .unwrap();
            let woken: i64 = sqlx::query_scalar("SELECT count(*) FROM oncely.event_waits WHERE event_id IS NOT NULL")
                .fetch_one(&pool)
                .await
                .unwrap();
            let children: (i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM oncely.jobs WHERE kind = 'receipt'), \
                        (SELECT count(*) FROM oncely.child_runs WHERE state = 'completed')",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            serde_json::json!({ "lines": rows, "waits_resolved_by_an_event": woken, "child_jobs_and_completed": children })
        })
        .run()
        .await;
    assert_eq!(
        report.baseline,
        serde_json::json!({ "lines": [["asked", 1], ["billed", 1], ["granted", 1], ["receipt", 1], ["start", 1]],
            "waits_resolved_by_an_event": 1, "child_jobs_and_completed": [1, 1] })
    );
    assert!(report.boundaries.len() >= 21, "seven steps, three boundaries each: {:?}", report.boundaries);
    report.assert_same_effects();
}

// ---- deferred step records across a suspension ---------------------------------------------------

static PREPARED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

async fn prepare_then_wait(ctx: JobContext, _trigger: Trigger) -> HandlerResult {
    // On the first attempt this memoized step's record is deferred: it must be written before the
    // run suspends in wait_for_event's own transaction, or the resumed run would prepare again.
    let n: u32 = ctx
        .step("prepare")
        .run(|| async { Ok::<_, std::io::Error>(PREPARED.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1) })
        .await?;
    let paid = ctx.wait_for_event("paid", "order.paid", EventMatch::field("order_id"), Duration::from_secs(60)).await?;
    ctx.sleep("nap", Duration::from_millis(300)).await?;
    effect_step(&ctx, "record", format!("prepared {n}, paid {}", paid.is_some())).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memoized_step_before_a_sleep_and_a_wait_is_not_run_again_when_the_run_resumes() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    effects_table(pool).await;
    let w = builder(db.new_pool(4).await)
        .function(Function::new("prepare_then_wait").on_event("order.placed"), prepare_then_wait)
        .queue("default", 4)
        .build()
        .unwrap();
    w.register_functions().await.unwrap();
    let h = w.start();
    publish(pool, &Event::from_json("order.placed", serde_json::json!({ "order_id": 5 }))).await.unwrap();
    oncely_testkit::eventually(Duration::from_secs(30), "the run waits for its event", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM oncely.event_waits WHERE resolved_at IS NULL")
            .fetch_one(pool)
            .await
            .unwrap();
        (n == 1).then_some(())
    })
    .await;
    publish(pool, &Event::from_json("order.paid", serde_json::json!({ "order_id": 5 }))).await.unwrap();
    wait_all_finished(pool, Duration::from_secs(30)).await;
    h.shutdown().await;
    let effects: Vec<String> = sqlx::query_scalar("SELECT what FROM effects").fetch_all(pool).await.unwrap();
    assert_eq!(effects, ["prepared 1, paid true"]);
    assert_eq!(PREPARED.load(std::sync::atomic::Ordering::SeqCst), 1, "prepared once across the attempts");
    let attempts: i32 = sqlx::query_scalar("SELECT attempt FROM oncely.jobs WHERE kind = 'prepare_then_wait'")
        .fetch_one(pool)
        .await
        .unwrap();
    assert!(attempts >= 3, "the run was resumed after the sleep and after the wait: {attempts} attempts");
    // The retention prune deletes the finished run's wait rows with it.
    let waits: i64 = sqlx::query_scalar("SELECT count(*) FROM oncely.event_waits").fetch_one(pool).await.unwrap();
    assert_eq!(waits, 1, "the resolved wait is kept while its run is");
    let pruned = oncely::core::maintenance::prune_finished(pool, Duration::ZERO, Duration::ZERO, 1000).await.unwrap();
    assert_eq!(pruned, 1);
    let waits: i64 = sqlx::query_scalar("SELECT count(*) FROM oncely.event_waits").fetch_one(pool).await.unwrap();
    assert_eq!(waits, 0, "no wait rows left behind");
}
