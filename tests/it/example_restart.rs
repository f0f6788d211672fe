//! The report pipeline example's worker process survives what the library survives: a PostgreSQL
//! restart (`pg_ctl restart -m immediate`) and terminated connections in the middle of a run. The
//! process must finish on its own with exit status 0, and every report must be counted once.
//!
//! It runs against a throwaway cluster of its own (initdb from the installed PostgreSQL binaries,
//! a random port), since restarting the shared server is not an option. Both disruptions happen
//! while jobs are in flight: the test holds a lock on the `usage` table until workers wait on it.

use crate::pipeline;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use sqlx::{Connection, PgConnection, PgPool};

const REPORTS: i64 = 300;

/// A PostgreSQL cluster in a temporary directory, stopped and removed on drop.
struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    as_root: bool,
}

impl Cluster {
    fn start() -> Cluster {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("the PostgreSQL server binaries under /usr/lib/postgresql")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("initdb").exists())
            .max_by_key(|p| p.to_string_lossy().split('/').nth(4).and_then(|v| v.parse::<u32>().ok()).unwrap_or(0))
            .expect("an installed PostgreSQL with initdb");
        let as_root = Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false);
        let dir = std::env::temp_dir().join(format!("oncely-restart-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        if as_root {
            assert!(Command::new("chown").arg("postgres:postgres").arg(&dir).status().unwrap().success());
        }
        // A free port: bind to port 0 and let it go (the cluster takes it a moment later).
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let cluster = Cluster { dir, bin, port, as_root };
        let data = cluster.dir.join("data");
        cluster.pg("initdb", &["-D", data.to_str().unwrap(), "-U", "postgres", "-A", "trust"]);
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=60 -c fsync=off",
            cluster.port,
            cluster.dir.display()
        );
        let log = cluster.dir.join("log");
        cluster.pg("pg_ctl", &["-D", data.to_str().unwrap(), "-l", log.to_str().unwrap(), "-w", "-o", &opts, "start"]);
        cluster
    }

    /// Run one of the server's programs (as the `postgres` user when the test runs as root).
    fn pg(&self, program: &str, args: &[&str]) {
        let program = self.bin.join(program);
        let mut cmd = if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        let out = cmd.args(args).output().unwrap_or_else(|e| panic!("{}: {e}", program.display()));
        assert!(out.status.success(), "{} {args:?}: {}", program.display(), String::from_utf8_lossy(&out.stderr));
    }

    /// A crash and a start: every backend is killed without a checkpoint, recovery runs.
    fn restart_immediate(&self) {
        let data = self.dir.join("data");
        // With a log file: without one the new server writes to (and holds open) our output pipe,
        // and waiting for pg_ctl's output never ends.
        let log = self.dir.join("log");
        self.pg(
            "pg_ctl",
            &["-D", data.to_str().unwrap(), "-l", log.to_str().unwrap(), "-m", "immediate", "-w", "restart"],
        );
    }

    fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ =
            std::panic::catch_unwind(|| self.pg("pg_ctl", &["-D", data.to_str().unwrap(), "-m", "immediate", "stop"]));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs only as the child process: the example's worker loop, until every job has finished.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "spawned by the restart test as a child process"]
async fn example_restart_child() {
    let Ok(url) = std::env::var("ONCELY_EXAMPLE_RESTART_URL") else { return };
    init_tracing();
    // Room for the poll while every worker waits on a lock (8 handlers, the fetcher, completer,
    // heartbeat and maintenance hold connections then).
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(24).connect_lazy(&url).unwrap();
    let failures = pipeline::Failures { fail_after_increment: true, crash_probability: 0.0 };
    pipeline::work_until_done(&pool, failures, Arc::new(pipeline::Calls::default()), fast)
        .await
        .expect("the worker loop rides out the restart");
}

/// Workers blocked on the lock this test holds on `usage`.
async fn waiting_on_lock(probe: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()",
    )
    .fetch_one(probe)
    .await
    .unwrap()
}

/// Open a connection holding `LOCK TABLE usage`, and wait until workers queue behind it: jobs are
/// then in flight, mid-step.
async fn block_usage_until_workers_wait(url: &str) -> PgConnection {
    let mut conn = eventually(Duration::from_secs(60), "the server to accept connections", || async {
        PgConnection::connect(url).await.ok()
    })
    .await;
    sqlx::raw_sql("BEGIN; LOCK TABLE usage IN EXCLUSIVE MODE").execute(&mut conn).await.unwrap();
    let probe = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(url).await.unwrap();
    eventually(Duration::from_secs(60), "workers waiting on the usage lock", || async {
        (waiting_on_lock(&probe).await > 0).then_some(())
    })
    .await;
    probe.close().await;
    conn
}

#[tokio::test(flavor = "multi_thread")]
async fn the_example_worker_rides_out_a_restart_and_terminated_connections() {
    init_tracing();
    let cluster = Cluster::start();
    let mut admin = PgConnection::connect(&cluster.url("postgres")).await.unwrap();
    sqlx::query("CREATE DATABASE pipeline").execute(&mut admin).await.unwrap();
    admin.close().await.unwrap();
    let url = cluster.url("pipeline");
    let pool = PgPool::connect(&url).await.unwrap();
    pipeline::setup(&pool).await.unwrap();
    pipeline::seed(&pool, REPORTS, 12, 7).await.unwrap();

    let mut child =
        spawn_child(concat!(module_path!(), "::example_restart_child"), &[("ONCELY_EXAMPLE_RESTART_URL", &url)]);

    // 1. The server crashes and restarts while workers are mid-step.
    let _lock = block_usage_until_workers_wait(&url).await;
    cluster.restart_immediate();
    assert!(child.try_wait().unwrap().is_none(), "the worker process is still running after the restart");

    // 2. After it, every connection to the database is terminated while workers are mid-step.
    let mut lock = block_usage_until_workers_wait(&url).await;
    let terminated: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_one(&mut lock)
    .await
    .unwrap();
    assert!(terminated > 0, "the worker's connections were terminated");

    // 3. The process's own "anything left?" query is cut off mid-flight (what made the example exit
    //    with status 2): it is held behind a lock on the jobs table, then its backend terminated.
    //    The usage lock still holds the workers, so jobs are left to wait for.
    let mut jobs_lock = PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql("BEGIN; LOCK TABLE oncely.jobs IN ACCESS EXCLUSIVE MODE").execute(&mut jobs_lock).await.unwrap();
    let probe = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&url).await.unwrap();
    let poll: i32 = eventually(Duration::from_secs(60), "the process's poll waiting on the jobs lock", || async {
        sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'
               AND query LIKE 'SELECT count(*) FROM oncely.jobs WHERE state IN%'
             LIMIT 1",
        )
        .fetch_optional(&probe)
        .await
        .unwrap()
    })
    .await;
    let cut: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)").bind(poll).fetch_one(&probe).await.unwrap();
    assert!(cut, "the poll's backend was terminated");
    probe.close().await;
    jobs_lock.close().await.unwrap();
    lock.close().await.unwrap();

    let status = tokio::time::timeout(Duration::from_secs(180), child.wait())
        .await
        .expect("the worker process finishes on its own")
        .unwrap();
    assert!(status.success(), "the worker process exits with status 0, got {status}");

    let summary = pipeline::summary(&pool).await.unwrap();
    eprintln!("{summary}");
    assert_eq!(pipeline::unfinished(&pool).await.unwrap(), 0, "no job left to run");
    assert_eq!(summary.reports, REPORTS);
    assert_eq!(summary.ready, REPORTS, "every report is ready");
    assert_eq!(summary.counted_tokens, summary.expected_tokens, "usage total is exact");
    assert_eq!(summary.users_off, 0, "every user's usage is exact");
    assert_eq!(summary.reports_uncounted, 0, "every report counted once");
    assert_eq!(count(&pool, oncely::JobState::Completed).await, REPORTS + REPORTS / 7, "duplicate jobs completed too");
    pool.close().await;
}
