//! The crash harness on the report pipeline: a crash at every step boundary leaves the same effects
//! as a clean run. And on a handler with a deliberate bug, it finds the boundaries that expose it.

use crate::pipeline;

use std::sync::Arc;

use crate::common::*;
use oncely::core::step::BoundaryPoint;
use oncely::{enqueue, handler_fn, JobArgs, NewJob};
use oncely_testkit::CrashHarness;
use serde::{Deserialize, Serialize};

async fn pipeline_effects(pool: sqlx::PgPool) -> serde_json::Value {
    let usage: Vec<(i64, String, i64)> =
        sqlx::query_as("SELECT user_id, period, tokens FROM usage ORDER BY user_id").fetch_all(&pool).await.unwrap();
    let reports: Vec<(i64, String, Option<i64>)> =
        sqlx::query_as("SELECT id, status, tokens FROM reports ORDER BY id").fetch_all(&pool).await.unwrap();
    serde_json::json!({ "usage": usage, "reports": reports })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_at_any_step_boundary_of_the_pipeline_leaves_the_same_effects() {
    init_tracing();
    let report = CrashHarness::new()
        .queue("reports")
        .setup(|pool| async move {
            pipeline::setup(&pool).await.unwrap();
            // One report, and a duplicate job for it.
            pipeline::seed(&pool, 1, 1, 1).await.unwrap();
        })
        .register(|w| {
            w.register(pipeline::handler(pipeline::Failures::default(), Arc::new(pipeline::Calls::default())))
        })
        .effects(pipeline_effects)
        .run()
        .await;
    // generate, count_usage and mark_ready: three points each for the first job.
    assert!(report.boundaries.len() >= 9, "{:?}", report.boundaries);
    assert!(report.boundaries.iter().any(|b| b.step == "count_usage" && b.point == BoundaryPoint::BeforeRecord));
    assert_eq!(report.baseline["usage"][0][2], pipeline::tokens_for(1));
    report.assert_same_effects();
}

#[derive(Debug, Serialize, Deserialize)]
struct Buggy;
impl JobArgs for Buggy {
    const KIND: &'static str = "buggy";
}

#[tokio::test(flavor = "multi_thread")]
async fn the_harness_finds_an_increment_made_outside_a_step() {
    let report = CrashHarness::new()
        .setup(|pool| async move {
            sqlx::query("CREATE TABLE counter (n bigint)").execute(&pool).await.unwrap();
            sqlx::query("INSERT INTO counter VALUES (0)").execute(&pool).await.unwrap();
            enqueue(&pool, NewJob::new(&Buggy).unwrap()).await.unwrap();
        })
        .register(|w| {
            w.register(handler_fn(|ctx, _: Buggy| async move {
                // The bug: an effect outside any step runs again on every attempt.
                sqlx::query("UPDATE counter SET n = n + 1").execute(ctx.pool()).await?;
                ctx.step("notify").run(|| async { Ok::<_, std::io::Error>(()) }).await?;
                Ok(())
            }))
        })
        .effects(|pool| async move {
            let n: i64 = sqlx::query_scalar("SELECT n FROM counter").fetch_one(&pool).await.unwrap();
            serde_json::json!(n)
        })
        .run()
        .await;
    assert_eq!(report.baseline, serde_json::json!(1));
    let bad = report.mismatches();
    assert!(!bad.is_empty(), "the double increment must be found");
    assert!(bad.iter().all(|r| r.effects == serde_json::json!(2)));
    assert!(std::panic::catch_unwind(|| report.assert_same_effects()).is_err());
}
