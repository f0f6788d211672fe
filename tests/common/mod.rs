//! Shared helpers for the cross-crate scenarios.
#![allow(dead_code, unused_imports, unreachable_pub, missing_docs)]

use std::time::Duration;

use oncely::core::retry::RetryPolicy;
use oncely::{JobArgs, JobState, Worker, WorkerConfig};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

pub use oncely_testkit::{eventually, TestDb};

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

/// Settings that make leases, polling and retries fast enough for tests.
pub fn fast(c: &mut WorkerConfig) {
    c.lease = Duration::from_secs(2);
    c.poll_interval = Duration::from_millis(100);
    c.maintenance_interval = Duration::from_millis(200);
    c.retry = RetryPolicy { base: Duration::from_millis(20), max: Duration::from_millis(200), jitter: 0.2 };
    c.shutdown_timeout = Duration::from_secs(5);
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Noop {
    pub n: u64,
}
impl JobArgs for Noop {
    const KIND: &'static str = "noop";
}

pub async fn state_counts(pool: &PgPool) -> Vec<(String, i64)> {
    sqlx::query_as("SELECT state, count(*) FROM oncely.jobs GROUP BY state ORDER BY state")
        .fetch_all(pool)
        .await
        .unwrap()
}

pub async fn count(pool: &PgPool, state: JobState) -> i64 {
    oncely_testkit::count_in_state(pool, state).await
}

/// Wait until every job is in one of the finished states.
pub async fn wait_all_finished(pool: &PgPool, deadline: Duration) {
    eventually(deadline, "all jobs finished", || async {
        (oncely_testkit::count_pending(pool).await.ok()? == 0).then_some(())
    })
    .await
}

pub fn builder(pool: PgPool) -> oncely::worker::WorkerBuilder {
    Worker::builder(pool).configure(fast)
}

/// The body of a child worker process: start a worker without maintenance (the parent rescues)
/// and run until killed.
pub async fn run_child_worker(builder: oncely::worker::WorkerBuilder) {
    let _h = builder.configure(|c| c.maintenance = false).build().unwrap().start();
    std::future::pending::<()>().await;
}

/// Run the ignored test `name` of this test binary as a child process (a worker to kill), with
/// `env` set. It is killed if dropped. `name` is the test's path, as
/// `concat!(module_path!(), "::the_test")` gives it; the crate's own name is dropped, since test
/// names start below it.
pub fn spawn_child(name: &str, env: &[(&str, &str)]) -> tokio::process::Child {
    let name = name.split_once("::").map_or(name, |(_, test)| test);
    let mut cmd = tokio::process::Command::new(std::env::current_exe().expect("the test binary's path"));
    cmd.args(["--ignored", "--exact", name, "--nocapture"]).stdout(std::process::Stdio::null()).kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("the test binary runs again as a child")
}
pub mod receiver;

/// A ledger record claimed by someone else for `lease` (zero: a holder that died), with no output
/// yet: what a crash between intent and record leaves behind.
pub async fn claim_record(
    pool: &PgPool,
    namespace: &str,
    key: &str,
    lease: Duration,
    ttl: Option<Duration>,
) -> oncely::core::ledger::LedgerKey {
    use oncely::core::ledger::{self, LedgerKey};
    let record = LedgerKey::new(namespace, key);
    let opts = ledger::ClaimOptions {
        owner: "job:0:1",
        fingerprint: None,
        lease,
        ttl,
        supersedes: None,
        now: None,
        read_first: false,
    };
    ledger::claim(&mut pool.acquire().await.unwrap(), &record, &opts).await.unwrap();
    record
}
