//! Windowed claims (`oncely::core::lease::ClaimWindow`, `WorkerConfig::windowed_claims`): a claim
//! that starts each priority's read at a floor near the last job this claimer took, so that the
//! index entries of jobs claimed since the oldest open snapshot began cost nothing; and the full
//! claims that find what a window cannot see.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use oncely::core::lease::{self, ClaimWindow};
use oncely::{enqueue, handler_fn, JobId, NewJob};
use serde_json::Value;
use sqlx::{Connection, PgConnection};

const LEASE: Duration = Duration::from_secs(30);

fn ids(jobs: &[oncely::Job]) -> Vec<JobId> {
    jobs.iter().map(|j| j.id).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_window_claims_in_priority_then_age_order_and_misses_only_what_a_full_claim_then_finds() {
    let db = TestDb::new().await;
    let pool = db.pool();
    // No full claim but the first, unless asked for.
    let mut window = ClaimWindow::new().full_claims_every(Duration::from_secs(3600));
    for (n, priority) in [(0, 0), (1, 3)] {
        enqueue(pool, NewJob::new(&Noop { n }).unwrap().priority(priority)).await.unwrap();
    }
    let first = window.claim_jobs(pool, "default", 10, "w", LEASE).await.unwrap();
    assert_eq!(first.len(), 2, "the first claim is a full one");
    assert!(window.floor(0).is_some() && window.floor(3).is_some(), "it met priorities 0 and 3");

    // Due now at known priorities: the window sees them, in priority then age order.
    let mut due = Vec::new();
    for (n, priority) in [(10, 0), (11, 3), (12, 0), (13, 3)] {
        due.push((priority, enqueue(pool, NewJob::new(&Noop { n }).unwrap().priority(priority)).await.unwrap().id));
    }
    // What a window cannot see: a job whose run_at is an hour old (an enqueue that committed late,
    // or one given a past run_at), and a job of a priority this window has not met.
    let old =
        enqueue(pool, NewJob::new(&Noop { n: 20 }).unwrap().run_at(chrono::Utc::now() - chrono::Duration::hours(1)))
            .await
            .unwrap()
            .id;
    let unmet = enqueue(pool, NewJob::new(&Noop { n: 21 }).unwrap().priority(7)).await.unwrap().id;

    due.sort_by_key(|(priority, id)| (-priority, id.0));
    let expected: Vec<_> = due.iter().map(|(_, id)| *id).collect();
    let mut got = Vec::new();
    for _ in 0..expected.len() {
        got.extend(ids(&window.claim_jobs(pool, "default", 1, "w", LEASE).await.unwrap()));
    }
    assert_eq!(got, expected, "priority first, then age, within the window");
    assert!(
        window.claim_jobs(pool, "default", 10, "w", LEASE).await.unwrap().is_empty(),
        "the window does not reach the old job or the unmet priority"
    );

    // The plain claim's order on what is left: the unmet priority first, then the old job.
    window.read_all_next();
    let found = window.claim_jobs(pool, "default", 1, "w", LEASE).await.unwrap();
    assert_eq!(ids(&found), vec![unmet], "a full claim finds the unmet priority first");
    assert!(window.floor(7).is_some(), "and the window now knows priority 7");
    window.read_all_next();
    let found = window.claim_jobs(pool, "default", 10, "w", LEASE).await.unwrap();
    assert_eq!(ids(&found), vec![old], "a full claim finds the job behind the window");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_windowed_claim_steps_over_none_of_the_jobs_claimed_under_a_held_snapshot() {
    let db = TestDb::new().await;
    let pool = db.pool();
    // A reader holding a snapshot: no index entry of a job claimed from now on can be removed or
    // marked dead while it is open.
    let mut reader = PgConnection::connect(db.url()).await.unwrap();
    sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ").execute(&mut reader).await.unwrap();
    sqlx::query("SELECT count(*) FROM oncely.jobs").execute(&mut reader).await.unwrap();

    // 20,000 jobs from the last ten minutes, all claimed under that snapshot.
    sqlx::query(
        "INSERT INTO oncely.jobs (kind, queue, run_at) \
         SELECT 'noop', 'default', now() - interval '10 minutes' + g * interval '25 ms' \
         FROM generate_series(1, 20000) AS g",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE oncely.jobs").execute(pool).await.unwrap();
    let mut claimed = 0;
    loop {
        let n = lease::claim_jobs(pool, "default", 1000, "w", LEASE).await.unwrap().len();
        if n == 0 {
            break;
        }
        claimed += n;
    }
    assert_eq!(claimed, 20_000);
    let fresh = enqueue(pool, NewJob::new(&Noop { n: 1 }).unwrap()).await.unwrap().id;

    let statement =
        |name: &str| oncely::core::HOT_STATEMENTS.iter().find(|(n, _)| *n == name).map(|(_, sql)| *sql).unwrap();
    let mut conn = PgConnection::connect(db.url()).await.unwrap();
    let full = claim_buffers(&mut conn, statement("JOB_CLAIM"), "'default', 10, 30, 'w2', false").await;
    let windowed = claim_buffers(
        &mut conn,
        statement("JOB_CLAIM_WINDOWED"),
        "'default', 10, 30, 'w2', '{0}', ARRAY[now() - interval '2 seconds']",
    )
    .await;
    assert_eq!(full.1, vec![fresh.0], "the full claim finds the fresh job");
    assert_eq!(windowed.1, vec![fresh.0], "so does the windowed claim");
    assert!(
        windowed.0 * 10 < full.0,
        "the windowed claim reads a small part of what the full one reads: {} buffers against {}",
        windowed.0,
        full.0
    );
    sqlx::query("ROLLBACK").execute(&mut reader).await.unwrap();
}

/// Shared buffers a claim statement reads (`EXPLAIN (ANALYZE, BUFFERS)`, rolled back), and the ids
/// it claimed.
async fn claim_buffers(conn: &mut PgConnection, sql: &str, args: &str) -> (i64, Vec<i64>) {
    let mut tx = conn.begin().await.unwrap();
    sqlx::query(&format!("PREPARE claim AS {sql}")).execute(&mut *tx).await.unwrap();
    let explained: sqlx::types::Json<Value> =
        sqlx::query_scalar(&format!("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE claim({args})"))
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    let plan = &explained.0[0]["Plan"];
    let buffers = plan["Shared Hit Blocks"].as_i64().unwrap() + plan["Shared Read Blocks"].as_i64().unwrap();
    let claimed: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM oncely.jobs WHERE state = 'running' AND worker_id = 'w2'")
            .fetch_all(&mut *tx)
            .await
            .unwrap();
    tx.rollback().await.unwrap();
    // A prepared statement belongs to the session, not to the transaction.
    sqlx::query("DEALLOCATE claim").execute(&mut *conn).await.unwrap();
    (buffers, claimed)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_with_windowed_claims_runs_the_jobs_behind_its_window_and_at_new_priorities() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool().clone();
    let ran = Arc::new(Mutex::new(Vec::<u64>::new()));
    let seen = ran.clone();
    let worker = builder(pool.clone())
        .register(handler_fn(move |_ctx, job: Noop| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(job.n);
                Ok(())
            }
        }))
        .queue("default", 8)
        .build()
        .unwrap();
    assert!(worker.config().windowed_claims, "windowed claims are the default");
    let handle = worker.start();

    // Recent jobs at priority 0: the worker's window learns a floor near now.
    for n in 0..50 {
        enqueue(&pool, NewJob::new(&Noop { n }).unwrap()).await.unwrap();
    }
    eventually(Duration::from_secs(30), "the first 50 jobs ran", || async {
        (ran.lock().unwrap().len() == 50).then_some(())
    })
    .await;

    // A transaction that began well before it commits (its jobs' run_at is its start, an hour
    // back here), and a priority the worker has not met.
    let mut tx = pool.begin().await.unwrap();
    enqueue(&mut *tx, NewJob::new(&Noop { n: 100 }).unwrap().run_at(chrono::Utc::now() - chrono::Duration::hours(1)))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    enqueue(&pool, NewJob::new(&Noop { n: 101 }).unwrap().priority(9)).await.unwrap();
    for n in 102..110 {
        enqueue(&pool, NewJob::new(&Noop { n }).unwrap()).await.unwrap();
    }
    eventually(Duration::from_secs(30), "every job ran", || async { (ran.lock().unwrap().len() == 60).then_some(()) })
        .await;
    handle.shutdown().await;
    let ran: HashSet<u64> = ran.lock().unwrap().iter().copied().collect();
    let expected: HashSet<u64> = (0..50).chain(100..110).collect();
    assert_eq!(ran, expected, "each job ran, once");
    assert_eq!(count(&pool, oncely::JobState::Completed).await, 60);
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Other {
    n: u64,
}
impl oncely::JobArgs for Other {
    const KIND: &'static str = "other";
}

/// A resumed kind's jobs lie behind the claim window: while the kind was paused, the worker
/// claimed newer jobs past them. The resume wakes every worker with a full claim next, so they
/// run at once, not at the next scheduled full claim (an hour away here).
#[tokio::test(flavor = "multi_thread")]
async fn a_resumed_kinds_jobs_behind_the_window_run_at_once() {
    use oncely::pause::{self, PauseTarget};
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool().clone();
    let kind = PauseTarget::Kind("noop".into());
    assert!(pause::pause(&pool, &kind, None).await.unwrap());
    // Due an hour ago: far behind any window a claim of newer jobs leaves.
    let behind =
        enqueue(&pool, NewJob::new(&Noop { n: 1 }).unwrap().run_at(chrono::Utc::now() - chrono::Duration::hours(1)))
            .await
            .unwrap()
            .id;

    let ran = Arc::new(Mutex::new(Vec::<String>::new()));
    let (seen, seen_other) = (ran.clone(), ran.clone());
    let handle = builder(pool.clone())
        .configure(|c| c.full_claim_interval = Some(Duration::from_secs(3600)))
        .register(handler_fn(move |_ctx, job: Noop| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(format!("noop {}", job.n));
                Ok(())
            }
        }))
        .register(handler_fn(move |_ctx, job: Other| {
            let seen = seen_other.clone();
            async move {
                seen.lock().unwrap().push(format!("other {}", job.n));
                Ok(())
            }
        }))
        .queue("default", 4)
        .build()
        .unwrap()
        .start();
    // Newer jobs of another kind: the worker's window learns a floor near now.
    for n in 0..20 {
        enqueue(&pool, NewJob::new(&Other { n }).unwrap()).await.unwrap();
    }
    eventually(Duration::from_secs(30), "the 20 other jobs ran", || async {
        (ran.lock().unwrap().len() == 20).then_some(())
    })
    .await;
    assert_eq!(oncely::get_job(&pool, behind).await.unwrap().state, oncely::JobState::Available);

    assert!(pause::resume(&pool, &kind).await.unwrap());
    eventually(Duration::from_secs(15), "the resumed kind's job ran", || async {
        ran.lock().unwrap().contains(&"noop 1".to_owned()).then_some(())
    })
    .await;
    handle.shutdown().await;
    assert_eq!(ran.lock().unwrap().len(), 21, "each job ran once");
}
