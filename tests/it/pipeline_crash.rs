//! The acceptance test of the whole project: a worker process running the report pipeline over
//! 240 reports (with duplicate jobs) is killed with SIGKILL at random moments and restarted until
//! every job has finished. The usage total must equal the expected total exactly, and every report
//! must be counted once.

use crate::pipeline;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use rand::Rng;

const REPORTS: i64 = 240;
const KILLS: usize = 8;

/// Runs only as the child process: the pipeline worker, until killed.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "spawned by the pipeline crash test as a child process"]
async fn pipeline_child_worker() {
    let Ok(url) = std::env::var("ONCELY_PIPELINE_CHILD_URL") else { return };
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(12).connect(&url).await.unwrap();
    let _h = oncely::Worker::builder(pool)
        .register(pipeline::handler(pipeline::Failures::default(), Arc::new(pipeline::Calls::default())))
        .queue("reports", 8)
        .lease(Duration::from_secs(1))
        .configure(|c| {
            c.maintenance_interval = Duration::from_millis(100);
            c.poll_interval = Duration::from_millis(100);
            c.retry.base = Duration::from_millis(20);
        })
        .build()
        .unwrap()
        .start();
    std::future::pending::<()>().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pipeline_counts_usage_exactly_once_through_repeated_sigkills() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    pipeline::setup(pool).await.unwrap();
    pipeline::seed(pool, REPORTS, 12, 7).await.unwrap();

    let started = Instant::now();
    let mut kills = 0;
    let mut rng = rand::rng();
    loop {
        let mut child =
            spawn_child(concat!(module_path!(), "::pipeline_child_worker"), &[("ONCELY_PIPELINE_CHILD_URL", db.url())]);
        if kills < KILLS {
            // Kill at a random moment once the child has made some progress.
            let before = ready(pool).await;
            eventually(Duration::from_secs(60), "the child to make progress", || async {
                (ready(pool).await > before || unfinished(pool).await == 0).then_some(())
            })
            .await;
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..150))).await;
            child.start_kill().unwrap();
            child.wait().await.unwrap();
            kills += 1;
            if unfinished(pool).await == 0 {
                break;
            }
            continue;
        }
        eventually(Duration::from_secs(120), "every job to finish", || async {
            (unfinished(pool).await == 0).then_some(())
        })
        .await;
        child.start_kill().unwrap();
        child.wait().await.unwrap();
        break;
    }

    let summary = pipeline::summary(pool).await.unwrap();
    let (attempts, rescued): (i64, i64) = sqlx::query_as(
        "SELECT sum(attempt)::bigint, count(*) FILTER (WHERE errors @> '[{\"kind\":\"lease_expired\"}]') FROM oncely.jobs",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    eprintln!("{kills} SIGKILLs in {:?}; {attempts} attempts; {rescued} jobs rescued\n{summary}", started.elapsed());
    assert!(kills >= 3, "the worker was killed repeatedly");
    assert!(rescued > 0, "some jobs were interrupted mid-run and rescued");
    assert_eq!(summary.reports, REPORTS);
    assert_eq!(summary.ready, REPORTS, "every report is ready");
    assert_eq!(summary.counted_tokens, summary.expected_tokens, "usage total is exact");
    assert_eq!(summary.users_off, 0, "every user's usage is exact");
    assert_eq!(summary.reports_uncounted, 0, "every report counted once");
    assert_eq!(count(pool, oncely::JobState::Completed).await, REPORTS + REPORTS / 7, "duplicate jobs completed too");
}

async fn ready(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM reports WHERE status = 'ready'").fetch_one(pool).await.unwrap()
}

async fn unfinished(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM oncely.jobs WHERE state IN ('available', 'running')")
        .fetch_one(pool)
        .await
        .unwrap()
}
