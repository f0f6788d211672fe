//! Child runs against a real PostgreSQL: `invoke` returns its child's result, and a parent crashed
//! right after its invoke step, or re-executed after it returned, starts no second child; a fan-out of 100 children through repeated SIGKILLs of worker
//! processes; fan-in at the first error and all-settled; a suspended parent holds nothing and is
//! woken by its last child; a cancelled parent cancels its children that have not started.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use chrono::{DateTime, Utc};
use oncely::core::function::{self, Function, Trigger};
use oncely::core::outbox::{publish, Event};
use oncely::step::{Boundary, BoundaryPoint, InjectedCrash};
use oncely::worker::flow::FlowError;
use oncely::{HandlerResult, InsertOpts, JobArgs, JobContext, JobId, Outcome};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

/// A child: records its effect once (a transactional step), and returns `2 n`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Kid {
    n: i64,
}
impl JobArgs for Kid {
    const KIND: &'static str = "kid";
}

/// A child that refuses `n == 3`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Picky {
    n: i64,
}
impl JobArgs for Picky {
    const KIND: &'static str = "picky";
}

/// A child on a queue that no worker serves until the test says so.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Late {
    n: i64,
}
impl JobArgs for Late {
    const KIND: &'static str = "late";
    fn insert_opts() -> InsertOpts {
        InsertOpts::new().queue("late")
    }
}

async fn record(ctx: &JobContext, step: &str, table: &'static str, what: String) -> Result<(), oncely::StepError> {
    let run = ctx.id();
    ctx.step(step)
        .transactional(move |tx| {
            Box::pin(async move {
                sqlx::query(&format!("INSERT INTO {table} (job_id, what) VALUES ($1, $2)"))
                    .bind(run)
                    .bind(what)
                    .execute(&mut *tx)
                    .await?;
                Ok::<_, sqlx::Error>(())
            })
        })
        .await
}

async fn kid(ctx: JobContext, k: Kid) -> HandlerResult {
    // Some work, so that the workers are killed while children run (not a synchronization).
    tokio::time::sleep(Duration::from_millis(50)).await;
    record(&ctx, "effect", "kid_effects", k.n.to_string()).await?;
    ctx.set_output(&(k.n * 2)).await?;
    Ok(())
}

async fn picky(ctx: JobContext, k: Picky) -> HandlerResult {
    record(&ctx, "effect", "kid_effects", format!("picky {}", k.n)).await?;
    if k.n == 3 {
        return Err(Outcome::fail("three is not allowed"));
    }
    ctx.set_output(&(k.n * 2)).await?;
    Ok(())
}

async fn late(ctx: JobContext, k: Late) -> HandlerResult {
    ctx.set_output(&k.n).await?;
    Ok(())
}

async fn tables(pool: &PgPool) {
    for t in ["kid_effects", "parent_effects"] {
        sqlx::query(&format!("CREATE TABLE {t} (job_id bigint NOT NULL, what text NOT NULL)"))
            .execute(pool)
            .await
            .unwrap();
    }
}

async fn register(pool: &PgPool, functions: &[Function]) {
    function::register_functions(&mut pool.acquire().await.unwrap(), functions, Utc::now()).await.unwrap();
}

async fn rows(pool: &PgPool, table: &str) -> Vec<(String, i64)> {
    sqlx::query_as(&format!("SELECT what, count(*) FROM {table} GROUP BY what ORDER BY what"))
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn run_of(pool: &PgPool, function: &str) -> JobId {
    JobId(
        sqlx::query_scalar("SELECT id FROM oncely.jobs WHERE kind = $1").bind(function).fetch_one(pool).await.unwrap(),
    )
}

// ---- invoke: one child, its result, and a re-executed parent ---------------------------------

static SINGLE_REEXECUTED: AtomicBool = AtomicBool::new(false);

fn single() -> Function {
    Function::new("single").on_event("single.start")
}

async fn single_handler(ctx: JobContext, _t: Trigger) -> HandlerResult {
    let doubled: i64 = ctx.invoke("double", &Kid { n: 21 }).await?;
    // The parent fails once after its invoke returned: its re-execution must find the same child.
    if !SINGLE_REEXECUTED.swap(true, Ordering::SeqCst) {
        return Err(Outcome::retry("injected failure after the invoke returned"));
    }
    record(&ctx, "after", "parent_effects", format!("got {doubled}")).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoke_returns_the_childs_result_and_a_crashed_or_re_executed_parent_starts_no_second_child() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    tables(pool).await;
    register(pool, &[single()]).await;
    publish(pool, &Event::from_json("single.start", serde_json::json!({}))).await.unwrap();
    // A crash right after the invoke step's record (the child enqueued with it): the attempt is
    // abandoned without another write, and the run is rescued when its lease expires.
    let crashed = Arc::new(AtomicBool::new(false));
    let hook_crashed = crashed.clone();
    let hook: oncely::step::BoundaryHook = Arc::new(move |b: &Boundary| {
        if b.step == "double" && b.point == BoundaryPoint::AfterRecord && !hook_crashed.swap(true, Ordering::SeqCst) {
            std::panic::panic_any(InjectedCrash(b.clone()));
        }
    });
    let w = builder(db.new_pool(4).await)
        .step_hook(hook)
        .function(single(), single_handler)
        .register(handler_fn_kid())
        .queue("default", 2)
        .build()
        .unwrap()
        .start();
    wait_all_finished(pool, Duration::from_secs(60)).await;
    w.shutdown().await;
    assert!(crashed.load(Ordering::SeqCst), "the parent crashed right after its invoke step's record");
    assert!(SINGLE_REEXECUTED.load(Ordering::SeqCst), "the parent was re-executed after its invoke returned");
    assert_eq!(rows(pool, "parent_effects").await, vec![("got 42".to_owned(), 1)], "the child's result, once");
    assert_eq!(rows(pool, "kid_effects").await, vec![("21".to_owned(), 1)], "one child ran, once");
    let kids: i64 =
        sqlx::query_scalar("SELECT count(*) FROM oncely.jobs WHERE kind = 'kid'").fetch_one(pool).await.unwrap();
    assert_eq!(kids, 1, "the crashed and re-executed parent started no second child");
    let parent = run_of(pool, "single").await;
    let (state, attempt, snoozes): (String, i32, i32) =
        sqlx::query_as("SELECT state, attempt, snoozes FROM oncely.jobs WHERE id = $1")
            .bind(parent)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(state, "completed");
    assert_eq!(attempt - snoozes, 2, "the wait for the child is not an attempt; the injected failure is");
    let detail = function::run_history(&mut pool.acquire().await.unwrap(), parent).await.unwrap();
    assert_eq!(detail.children.len(), 1, "the child is in the run's history");
    let c = &detail.children[0];
    assert_eq!((c.step.as_str(), c.index, c.state.as_str()), ("double", 0, "completed"));
    assert_eq!(c.output, Some(serde_json::json!(42)));
    let child_parent: Option<i64> = sqlx::query_scalar("SELECT parent_id FROM oncely.jobs WHERE id = $1")
        .bind(c.child)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(child_parent, Some(parent.0));
    assert!(detail.steps.iter().any(|s| s.name == "double"), "the invoke step is recorded");
}

fn handler_fn_kid() -> impl oncely::Handler<Kid> {
    oncely::handler_fn(kid)
}

// ---- a fan-out of 100 through SIGKILLs -------------------------------------------------------

const FAN: i64 = 100;

fn fan() -> Function {
    Function::new("fan").on_event("fan.start")
}

async fn fan_handler(ctx: JobContext, _t: Trigger) -> HandlerResult {
    let doubled: Vec<i64> = ctx.invoke_all("kids", (0..FAN).map(|n| Kid { n })).await?;
    let in_order = doubled.iter().enumerate().all(|(i, d)| *d == 2 * i as i64);
    let sum: i64 = doubled.iter().sum();
    record(&ctx, "fan-in", "parent_effects", format!("{} results, sum {sum}, in order {in_order}", doubled.len()))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "spawned by children::a_fan_out_of_100 as a child process"]
async fn fan_child_worker() {
    let Ok(url) = std::env::var("ONCELY_FAN_CHILD_URL") else { return };
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(5).connect(&url).await.unwrap();
    run_child_worker(builder(pool).function(fan(), fan_handler).register(handler_fn_kid()).queue("default", 2)).await;
}

async fn unfinished(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM oncely.jobs WHERE state IN ('available', 'running')")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn progress(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM kid_effects").fetch_one(pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_of_100_children_through_repeated_sigkills_runs_each_child_once_and_resumes_the_parent_once() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    tables(pool).await;
    register(pool, &[fan()]).await;
    // The rescuer: maintenance only (it serves a queue nothing uses), so that killed workers'
    // leases expire and their jobs run again.
    let rescuer = builder(db.new_pool(2).await)
        .register(oncely::handler_fn(|_ctx, _n: Noop| async { Ok(()) }))
        .queue("nothing", 1)
        .build()
        .unwrap()
        .start();
    publish(pool, &Event::from_json("fan.start", serde_json::json!({}))).await.unwrap();
    let env = [("ONCELY_FAN_CHILD_URL", db.url())];
    let name = concat!(module_path!(), "::fan_child_worker");
    let mut rng = rand::rng();
    let mut kills = 0;
    let mut workers = vec![spawn_child(name, &env), spawn_child(name, &env)];
    while kills < 8 && unfinished(pool).await > 0 {
        let before = progress(pool).await;
        eventually(Duration::from_secs(60), "the workers to make progress", || async {
            (progress(pool).await > before || unfinished(pool).await == 0).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
        let victim = rng.random_range(0..workers.len());
        workers[victim].start_kill().unwrap();
        workers[victim].wait().await.unwrap();
        kills += 1;
        workers[victim] = spawn_child(name, &env);
    }
    eventually(Duration::from_secs(120), "every job to finish", || async {
        (unfinished(pool).await == 0).then_some(())
    })
    .await;
    for mut w in workers {
        w.start_kill().unwrap();
        w.wait().await.unwrap();
    }
    rescuer.shutdown().await;

    let effects = rows(pool, "kid_effects").await;
    assert_eq!(effects.len(), FAN as usize, "every child's effect happened");
    assert!(effects.iter().all(|(_, n)| *n == 1), "each child's effect happened once: {effects:?}");
    let (kids, distinct_keys, rows_children): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM oncely.jobs WHERE kind = 'kid'), \
                (SELECT count(DISTINCT args) FROM oncely.jobs WHERE kind = 'kid'), \
                (SELECT count(*) FROM oncely.child_runs WHERE state = 'completed')",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!((kids, distinct_keys, rows_children), (FAN, FAN, FAN), "every child job exists once, and completed");
    let sum: i64 = (0..FAN).map(|n| 2 * n).sum();
    assert_eq!(
        rows(pool, "parent_effects").await,
        vec![(format!("{FAN} results, sum {sum}, in order true"), 1)],
        "the parent resumed once past its fan-in and saw all 100 results"
    );
    let parent = run_of(pool, "fan").await;
    let (state, attempt, snoozes, lease_expired): (String, i32, i32, i64) = sqlx::query_as(
        "SELECT state, attempt, snoozes, jsonb_array_length(jsonb_path_query_array(errors, '$[*] ? (@.kind == \"lease_expired\")'))::bigint \
         FROM oncely.jobs WHERE id = $1",
    )
    .bind(parent)
    .fetch_one(pool)
    .await
    .unwrap();
    eprintln!("{kills} SIGKILLs; parent: {attempt} claims, {snoozes} given back, {lease_expired} rescued");
    assert_eq!(state, "completed");
    assert!(kills >= 3, "workers were killed repeatedly");
    // Claims: the fan-out (suspends), the wake by the last child, and one more per rescue. No polling.
    assert!(
        attempt as i64 <= 2 + 2 * lease_expired + 2,
        "the parent was woken by its children, not by polling: {attempt} claims, {lease_expired} rescues"
    );
}

// ---- fan-in: the first error, and all settled ------------------------------------------------

fn picky_fan() -> Function {
    Function::new("picky-fan").on_event("picky.start")
}

async fn picky_fan_handler(ctx: JobContext, _t: Trigger) -> HandlerResult {
    let first = ctx.invoke_all::<_, i64>("first-error", (0..5).map(|n| Picky { n })).await;
    let what = match first {
        Ok(v) => format!("ok {v:?}"),
        Err(FlowError::ChildFailed(f)) => format!("failed #{} {}: {}", f.index, f.state, f.error),
        Err(e) => return Err(e.into()),
    };
    record(&ctx, "saw-first-error", "parent_effects", what).await?;
    let settled = ctx.invoke_all::<_, i64>("settled", (0..5).map(|n| Picky { n })).all_settled().await?;
    let what: Vec<String> = settled
        .iter()
        .map(|r| match r {
            Ok(v) => v.to_string(),
            Err(f) => format!("#{} {}", f.index, f.state),
        })
        .collect();
    record(&ctx, "saw-all", "parent_effects", what.join(",")).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_in_returns_the_first_dead_child_once_and_all_settled_returns_every_result() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    tables(pool).await;
    register(pool, &[picky_fan()]).await;
    publish(pool, &Event::from_json("picky.start", serde_json::json!({}))).await.unwrap();
    let w = builder(db.new_pool(4).await)
        .function(picky_fan(), picky_fan_handler)
        .register(oncely::handler_fn(picky))
        .queue("default", 3)
        .build()
        .unwrap()
        .start();
    wait_all_finished(pool, Duration::from_secs(60)).await;
    w.shutdown().await;
    assert_eq!(
        rows(pool, "parent_effects").await,
        vec![("0,2,4,#3 dead,8".to_owned(), 1), ("failed #3 dead: three is not allowed".to_owned(), 1),],
        "the parent got the dead child's error once, then every settled result"
    );
    let parent = run_of(pool, "picky-fan").await;
    let state: String =
        sqlx::query_scalar("SELECT state FROM oncely.jobs WHERE id = $1").bind(parent).fetch_one(pool).await.unwrap();
    assert_eq!(state, "completed");
    let picky_jobs: i64 =
        sqlx::query_scalar("SELECT count(*) FROM oncely.jobs WHERE kind = 'picky'").fetch_one(pool).await.unwrap();
    assert_eq!(picky_jobs, 10, "five children per step, started once");
    // The retention prune deletes the parent's child-run rows with it.
    let pruned = oncely::core::maintenance::prune_finished(pool, Duration::ZERO, Duration::ZERO, 1000).await.unwrap();
    assert_eq!(pruned, 11, "the parent and its ten children");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM oncely.child_runs").fetch_one(pool).await.unwrap();
    assert_eq!(rows, 0, "no child-run rows left behind");
}

/// A parent whose own `?` meets the dead child fails for good (retrying cannot revive it).
fn strict_fan() -> Function {
    Function::new("strict-fan").on_event("strict.start")
}

async fn strict_fan_handler(ctx: JobContext, _t: Trigger) -> HandlerResult {
    let _: Vec<i64> = ctx.invoke_all("kids", (2..5).map(|n| Picky { n })).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_child_fails_its_parent_through_question_mark_at_once() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    tables(pool).await;
    register(pool, &[strict_fan()]).await;
    publish(pool, &Event::from_json("strict.start", serde_json::json!({}))).await.unwrap();
    let w = builder(db.new_pool(4).await)
        .function(strict_fan(), strict_fan_handler)
        .register(oncely::handler_fn(picky))
        .queue("default", 2)
        .build()
        .unwrap()
        .start();
    wait_all_finished(pool, Duration::from_secs(60)).await;
    w.shutdown().await;
    let parent = run_of(pool, "strict-fan").await;
    let detail = function::run_history(&mut pool.acquire().await.unwrap(), parent).await.unwrap();
    assert_eq!(detail.run.state, "dead");
    assert_eq!(detail.errors.len(), 1, "one failed attempt: {:?}", detail.errors);
    assert!(detail.errors[0].message.contains("three is not allowed"), "{:?}", detail.errors);
    assert_eq!(detail.children.iter().filter(|c| c.state == "dead").count(), 1);
}

// ---- a suspended parent: holds nothing, woken by its last child; cancelled with its children ---

fn waiting() -> Function {
    Function::new("waiting").on_event("waiting.start")
}

async fn waiting_handler(ctx: JobContext, _t: Trigger) -> HandlerResult {
    let got: Vec<i64> = ctx.invoke_all("late", (0..3).map(|n| Late { n })).await?;
    record(&ctx, "after", "parent_effects", format!("{got:?}")).await?;
    Ok(())
}

async fn suspended_parent(pool: &PgPool) -> JobId {
    eventually(Duration::from_secs(30), "the parent to suspend on its children", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT id FROM oncely.jobs WHERE kind = 'waiting' AND state = 'available' AND snoozes = 1 \
             AND lease_expires_at IS NULL AND run_at > now() + interval '30 minutes'",
        )
        .fetch_optional(pool)
        .await
        .unwrap()
        .map(JobId)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_parent_holds_nothing_and_its_last_child_wakes_it_at_once() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    tables(pool).await;
    register(pool, &[waiting()]).await;
    publish(pool, &Event::from_json("waiting.start", serde_json::json!({}))).await.unwrap();
    let w =
        builder(db.new_pool(3).await).function(waiting(), waiting_handler).queue("default", 1).build().unwrap().start();
    let parent = suspended_parent(pool).await;
    assert_eq!(rows(pool, "parent_effects").await, vec![], "not resumed while its children wait");
    // The children's queue gets a worker: the last child's completion wakes the parent, which
    // would otherwise sleep for an hour.
    let kids =
        builder(db.new_pool(3).await).register(oncely::handler_fn(late)).queue("late", 1).build().unwrap().start();
    wait_all_finished(pool, Duration::from_secs(20)).await;
    kids.shutdown().await;
    w.shutdown().await;
    assert_eq!(rows(pool, "parent_effects").await, vec![("[0, 1, 2]".to_owned(), 1)]);
    let (last_child, resumed): (DateTime<Utc>, DateTime<Utc>) = sqlx::query_as(
        "SELECT (SELECT max(finished_at) FROM oncely.child_runs WHERE parent_id = $1), attempted_at \
         FROM oncely.jobs WHERE id = $1",
    )
    .bind(parent)
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(
        (resumed - last_child).num_milliseconds() < 3000,
        "woken by its last child: resumed {resumed}, last child {last_child}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_parent_cancels_its_children_that_have_not_started() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    tables(pool).await;
    register(pool, &[waiting()]).await;
    publish(pool, &Event::from_json("waiting.start", serde_json::json!({}))).await.unwrap();
    let w =
        builder(db.new_pool(3).await).function(waiting(), waiting_handler).queue("default", 1).build().unwrap().start();
    let parent = suspended_parent(pool).await;
    w.shutdown().await;
    oncely::core::cancel_job(pool, parent).await.unwrap();
    let states: Vec<(String, String)> = sqlx::query_as(
        "SELECT j.state, c.state FROM oncely.child_runs c JOIN oncely.jobs j ON j.id = c.child_id \
         WHERE c.parent_id = $1 ORDER BY c.idx",
    )
    .bind(parent)
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(states, vec![("cancelled".to_owned(), "cancelled".to_owned()); 3], "the children were cancelled too");
    let detail = function::run_history(&mut pool.acquire().await.unwrap(), parent).await.unwrap();
    assert_eq!(detail.run.state, "cancelled");
    assert!(detail.children.iter().all(|c| c.error.as_deref().is_some_and(|e| e.contains("parent run"))));
}
