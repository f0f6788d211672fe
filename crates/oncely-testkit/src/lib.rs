//! oncely-testkit: what tests of oncely — and of services built on it — need.
//!
//! - [`TestDb`]: a fresh, migrated PostgreSQL database per test, dropped afterwards. The server is
//!   the one `DATABASE_URL` names, else the local server at `127.0.0.1:5432` as user `postgres`.
//!   (`scripts/with-postgres` in the repository starts a throwaway cluster when neither answers.)
//! - [`eventually`]: wait for a condition with a deadline, instead of sleeping.
//! - [`run_until_idle`]: run a worker until no job is left to run, then count the outcomes.
//! - [`CrashHarness`]: run a job cleanly, then once more per step boundary with a crash injected
//!   there, and check that the database effects are the same every time.

use std::future::Future;
use std::str::FromStr;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

mod crash;
pub use crash::{CrashHarness, CrashReport, CrashRun};

/// Used when `DATABASE_URL` is unset.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The server URL tests use: `DATABASE_URL`, else [`DEFAULT_DATABASE_URL`].
pub fn server_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned())
}

/// `url` with its database name replaced by `db`.
pub fn url_with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let after_scheme = base.find("://").map(|i| i + 3).unwrap_or(0);
    let root = match base[after_scheme..].find('/') {
        Some(i) => &base[..after_scheme + i],
        None => base,
    };
    match query {
        Some(q) => format!("{root}/{db}?{q}"),
        None => format!("{root}/{db}"),
    }
}

/// A fresh database with the oncely schema migrated, dropped (with its connections) on drop.
///
/// Set `ONCELY_KEEP_TEST_DB=1` to keep it for a look after a failure.
///
/// # Example
///
/// ```no_run
/// # async fn example() {
/// let db = oncely_testkit::TestDb::new().await;
/// let n: i64 = sqlx::query_scalar("SELECT count(*) FROM oncely.jobs").fetch_one(db.pool()).await.unwrap();
/// assert_eq!(n, 0);
/// # }
/// ```
#[derive(Debug)]
pub struct TestDb {
    pool: PgPool,
    url: String,
    name: String,
    admin_url: String,
}

impl TestDb {
    /// Create and migrate a fresh database. Panics with a clear message when no server answers:
    /// this is a test helper.
    pub async fn new() -> TestDb {
        let admin_url = server_url();
        let name = format!("oncely_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(&admin_url).await.unwrap_or_else(|e| {
            panic!(
                "oncely-testkit: cannot connect to PostgreSQL at {admin_url}: {e}\n\
                 set DATABASE_URL, or run the tests through scripts/with-postgres"
            )
        });
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await
            .unwrap_or_else(|e| panic!("oncely-testkit: CREATE DATABASE {name} failed: {e}"));
        let _ = admin.close().await;
        let url = url_with_database(&admin_url, &name);
        let pool = Self::pool_for(&url, 10).await;
        oncely_core::migrate(&pool).await.expect("oncely-testkit: migrations must apply to a fresh database");
        TestDb { pool, url, name, admin_url }
    }

    async fn pool_for(url: &str, max: u32) -> PgPool {
        let opts = PgConnectOptions::from_str(url)
            .expect("oncely-testkit: the database URL must parse")
            .disable_statement_logging();
        PgPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(opts)
            .await
            .unwrap_or_else(|e| panic!("oncely-testkit: cannot connect to {url}: {e}"))
    }

    /// The shared pool (10 connections).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A new, separate pool of up to `max` connections (e.g. one per simulated worker process).
    pub async fn new_pool(&self, max: u32) -> PgPool {
        Self::pool_for(&self.url, max).await
    }

    /// The database URL, for child processes.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Terminate every other connection to this database (`pg_terminate_backend`), as a restarting
    /// or failing-over server would. Returns how many were terminated.
    pub async fn terminate_connections(&self) -> i64 {
        let mut admin = sqlx::PgConnection::connect(&self.admin_url).await.expect("oncely-testkit: admin connection");
        let n: i64 = sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&self.name)
        .fetch_one(&mut admin)
        .await
        .expect("oncely-testkit: pg_terminate_backend");
        let _ = admin.close().await;
        n
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if std::env::var_os("ONCELY_KEEP_TEST_DB").is_some() {
            tracing::info!(db = %self.name, "keeping test database");
            return;
        }
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs inside the test's runtime: do the async work on a thread with its own runtime.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            rt.block_on(async {
                let mut admin = sqlx::PgConnection::connect(&admin_url).await.ok()?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).execute(&mut admin).await.ok()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(_))) {
            tracing::warn!(db = %self.name, "could not drop test database");
        }
    }
}

/// Poll `check` until it returns `Some`, or panic after `deadline` naming `what`. Polls every 10 ms:
/// this is waiting on a condition, not sleeping for a guessed duration.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The finished jobs [`run_until_idle`] found, by state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Jobs completed.
    pub completed: i64,
    /// Jobs in the dead letter.
    pub dead: i64,
    /// Jobs cancelled.
    pub cancelled: i64,
}

/// Run the worker `builder` describes until the database has no job left to run — none available
/// (also none scheduled for later, such as a retry after its backoff) and none running — then shut
/// it down gracefully and count the finished jobs. Panics after `deadline`, naming how many jobs
/// were still pending: a job on a queue the worker does not serve never finishes.
///
/// ```no_run
/// # async fn example(pool: sqlx::PgPool, worker: oncely_worker::WorkerBuilder) {
/// let drained = oncely_testkit::run_until_idle(&pool, worker, std::time::Duration::from_secs(30)).await;
/// assert_eq!(drained.dead, 0);
/// # }
/// ```
pub async fn run_until_idle(pool: &PgPool, builder: oncely_worker::WorkerBuilder, deadline: Duration) -> Drained {
    let handle = builder.build().expect("oncely-testkit: the worker configuration is valid").start();
    let start = Instant::now();
    loop {
        let pending = count_pending(pool).await.expect("oncely-testkit: count pending jobs");
        if pending == 0 {
            break;
        }
        if start.elapsed() > deadline {
            handle.shutdown().await;
            panic!("timed out after {deadline:?} waiting for the queues to go idle: {pending} jobs still available or running");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    handle.shutdown().await;
    let count = |state| count_in_state(pool, state);
    Drained {
        completed: count(oncely_core::JobState::Completed).await,
        dead: count(oncely_core::JobState::Dead).await,
        cancelled: count(oncely_core::JobState::Cancelled).await,
    }
}

/// Count jobs not finished yet: available (due now or later) or running, on all queues.
pub async fn count_pending(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM oncely.jobs WHERE state IN ('available', 'running')").fetch_one(pool).await
}

/// Count jobs in `state` (all queues).
pub async fn count_in_state(pool: &PgPool, state: oncely_core::JobState) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM oncely.jobs WHERE state = $1")
        .bind(state.as_str())
        .fetch_one(pool)
        .await
        .expect("oncely-testkit: count jobs")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_database_name() {
        assert_eq!(url_with_database("postgres://u@h:5432/postgres", "x"), "postgres://u@h:5432/x");
        assert_eq!(url_with_database("postgres://u@h/db?sslmode=disable", "x"), "postgres://u@h/x?sslmode=disable");
        assert_eq!(url_with_database("postgres://u@h:5432", "x"), "postgres://u@h:5432/x");
    }
}
