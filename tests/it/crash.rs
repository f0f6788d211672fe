//! Crash recovery: a worker process killed with SIGKILL in the middle of a job. Another worker
//! completes the job once the lease expires, and the time to recovery is bounded by the lease.
//!
//! The child worker is this test binary run again with `--ignored --exact child_worker_process`.

use std::time::{Duration, Instant};

use crate::common::*;
use oncely::core::ErrorKind;
use oncely::{enqueue, get_job, handler_fn, JobArgs, JobState, NewJob};
use serde::{Deserialize, Serialize};

const LEASE: Duration = Duration::from_secs(2);
const MAINTENANCE_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Debug, Serialize, Deserialize)]
struct Slow {
    label: String,
}
impl JobArgs for Slow {
    const KIND: &'static str = "slow";
}

/// Runs only as the child process of the crash test: a worker whose handler marks that it started
/// and then hangs until killed.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "spawned by the crash tests as a child process"]
async fn child_worker_process() {
    let Ok(url) = std::env::var("ONCELY_CHILD_DATABASE_URL") else { return };
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let h = oncely::Worker::builder(pool)
        .register(handler_fn(|ctx, _a: Slow| async move {
            sqlx::query("INSERT INTO started (job_id, pid) VALUES ($1, $2)")
                .bind(ctx.id())
                .bind(std::process::id() as i32)
                .execute(ctx.pool())
                .await?;
            std::future::pending::<()>().await;
            Ok(())
        }))
        .queue("default", 1)
        .lease(LEASE)
        .configure(|c| c.maintenance = false)
        .build()
        .unwrap()
        .start();
    std::future::pending::<()>().await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_of_a_worker_killed_mid_job_is_completed_by_another_within_the_lease() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    sqlx::query("CREATE TABLE started (job_id bigint, pid int)").execute(pool).await.unwrap();
    let id = enqueue(pool, NewJob::new(&Slow { label: "report".into() }).unwrap()).await.unwrap().id;

    let mut child =
        spawn_child(concat!(module_path!(), "::child_worker_process"), &[("ONCELY_CHILD_DATABASE_URL", db.url())]);
    let pid: i32 = eventually(Duration::from_secs(30), "the child to start the job", || async {
        sqlx::query_scalar("SELECT pid FROM started WHERE job_id = $1").bind(id).fetch_optional(pool).await.unwrap()
    })
    .await;
    assert_eq!(pid as u32, child.id().unwrap());
    let running = get_job(pool, id).await.unwrap();
    assert_eq!((running.state, running.attempt), (JobState::Running, 1));

    // SIGKILL: no shutdown, no release, no last write.
    child.start_kill().unwrap();
    let status = child.wait().await.unwrap();
    assert!(!status.success());
    let killed_at = Instant::now();

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let h = builder(db.new_pool(5).await)
        .register(handler_fn(move |ctx, _a: Slow| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(ctx.attempt());
                Ok(())
            }
        }))
        .queue("default", 1)
        .lease(LEASE)
        .configure(|c| c.maintenance_interval = MAINTENANCE_INTERVAL)
        .build()
        .unwrap()
        .start();
    let attempt = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await.unwrap().unwrap();
    let recovered_in = killed_at.elapsed();
    wait_all_finished(pool, Duration::from_secs(10)).await;
    h.shutdown().await;

    let job = get_job(pool, id).await.unwrap();
    assert_eq!((job.state, job.attempt, attempt), (JobState::Completed, 2, 2));
    assert_eq!(job.errors.len(), 1);
    assert_eq!(job.errors[0].kind, ErrorKind::LeaseExpired);
    // The lease was last extended at most LEASE before the kill; the rescuer runs every
    // MAINTENANCE_INTERVAL (after winning the election on its first ticks); NOTIFY wakes the fetcher.
    let bound = LEASE + MAINTENANCE_INTERVAL * 5 + Duration::from_secs(1);
    eprintln!("crash recovery: lease {LEASE:?}, recovered {recovered_in:?} after SIGKILL (bound {bound:?})");
    assert!(recovered_in <= bound, "recovered in {recovered_in:?}, bound {bound:?}");
}
