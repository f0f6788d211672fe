//! The crash harness: interrupt a job at every step boundary in turn and check that the final
//! database effects equal those of an uninterrupted run.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use oncely_core::step::{Boundary, BoundaryHook, InjectedCrash};
use oncely_worker::{Worker, WorkerBuilder};
use sqlx::PgPool;

use crate::{eventually, TestDb};

type Setup = Box<dyn Fn(PgPool) -> BoxFuture<'static, ()> + Send + Sync>;
type Register = Box<dyn Fn(WorkerBuilder) -> WorkerBuilder + Send + Sync>;
type Effects = Box<dyn Fn(PgPool) -> BoxFuture<'static, serde_json::Value> + Send + Sync>;

/// Runs a job (or a few) once without interruption, recording every step boundary it passes; then,
/// for each boundary in turn, runs it again on a fresh database and crashes the attempt right there
/// — the attempt is abandoned without another write, as a killed process would leave it, and the
/// job is rescued when its (short) lease expires. Each run's effects are compared with the clean
/// run's.
///
/// Boundaries are numbered in the order they are passed, so make that order repeatable: serve one
/// queue with concurrency 1.
///
/// # Example
///
/// ```no_run
/// # async fn example() {
/// # use oncely_core::{JobArgs, NewJob};
/// # #[derive(serde::Serialize, serde::Deserialize)] struct Bill { id: i64 }
/// # impl JobArgs for Bill { const KIND: &'static str = "bill"; }
/// # fn my_handler() -> impl oncely_worker::Handler<Bill> { oncely_worker::handler_fn(|_c, _a: Bill| async { Ok(()) }) }
/// let report = oncely_testkit::CrashHarness::new()
///     .setup(|pool| async move {
///         sqlx::query("CREATE TABLE ledger_lines (amount bigint)").execute(&pool).await.unwrap();
///         oncely_core::enqueue(&pool, NewJob::new(&Bill { id: 1 }).unwrap()).await.unwrap();
///     })
///     .register(|w| w.register(my_handler()))
///     .effects(|pool| async move {
///         let sum: Option<i64> = sqlx::query_scalar("SELECT sum(amount)::bigint FROM ledger_lines").fetch_one(&pool).await.unwrap();
///         serde_json::json!({ "sum": sum })
///     })
///     .run()
///     .await;
/// report.assert_same_effects();
/// # }
/// ```
pub struct CrashHarness {
    setup: Setup,
    register: Register,
    effects: Effects,
    queue: String,
    deadline: Duration,
}

impl std::fmt::Debug for CrashHarness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrashHarness")
            .field("queue", &self.queue)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

/// One interrupted run.
#[derive(Debug, Clone)]
pub struct CrashRun {
    /// Where the crash was injected.
    pub crashed_at: Boundary,
    /// The effects after the job finished.
    pub effects: serde_json::Value,
}

/// What [`CrashHarness::run`] found.
#[derive(Debug, Clone)]
pub struct CrashReport {
    /// The effects of the uninterrupted run.
    pub baseline: serde_json::Value,
    /// The boundaries the uninterrupted run passed, in order.
    pub boundaries: Vec<Boundary>,
    /// One run per boundary.
    pub runs: Vec<CrashRun>,
}

impl CrashReport {
    /// The runs whose effects differ from the baseline.
    pub fn mismatches(&self) -> Vec<&CrashRun> {
        self.runs.iter().filter(|r| r.effects != self.baseline).collect()
    }

    /// Panic, naming each boundary where a crash changed the effects.
    pub fn assert_same_effects(&self) {
        assert!(!self.boundaries.is_empty(), "the job passed no step boundary: nothing was tested");
        let bad = self.mismatches();
        assert!(
            bad.is_empty(),
            "crashes changed the effects (baseline {}):\n{}",
            self.baseline,
            bad.iter()
                .map(|r| format!("  crash at {:?} of step `{}`: {}", r.crashed_at.point, r.crashed_at.step, r.effects))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

impl Default for CrashHarness {
    fn default() -> Self {
        Self::new()
    }
}

impl CrashHarness {
    /// A harness with no setup, handlers or effects yet; serves queue `default`.
    pub fn new() -> Self {
        CrashHarness {
            setup: Box::new(|_| Box::pin(async {})),
            register: Box::new(|w| w),
            effects: Box::new(|_| Box::pin(async { serde_json::Value::Null })),
            queue: oncely_core::job::DEFAULT_QUEUE.to_owned(),
            deadline: Duration::from_secs(60),
        }
    }

    /// Create the tables and enqueue the job(s); runs on each fresh database.
    pub fn setup<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(PgPool) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.setup = Box::new(move |p| Box::pin(f(p)));
        self
    }

    /// Register the handlers under test.
    pub fn register(mut self, f: impl Fn(WorkerBuilder) -> WorkerBuilder + Send + Sync + 'static) -> Self {
        self.register = Box::new(f);
        self
    }

    /// Read the effects to compare (e.g. balances, counters, rows), as JSON.
    pub fn effects<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(PgPool) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = serde_json::Value> + Send + 'static,
    {
        self.effects = Box::new(move |p| Box::pin(f(p)));
        self
    }

    /// The queue to serve (with concurrency 1). Defaults to `default`.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// How long one run may take. Defaults to 60 s.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Run the clean run and one crashed run per boundary.
    pub async fn run(&self) -> CrashReport {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let baseline = self
            .run_once(Arc::new(move |b: &Boundary| record.lock().expect("boundary list lock").push(b.clone())))
            .await;
        let boundaries = seen.lock().expect("boundary list lock").clone();
        let mut runs = Vec::new();
        for (i, at) in boundaries.iter().enumerate() {
            let passed = Arc::new(AtomicUsize::new(0));
            let hook: BoundaryHook = Arc::new(move |b: &Boundary| {
                if passed.fetch_add(1, Ordering::SeqCst) == i {
                    std::panic::panic_any(InjectedCrash(b.clone()));
                }
            });
            let effects = self.run_once(hook).await;
            tracing::info!(boundary = i, step = %at.step, point = ?at.point, %effects, "crash run finished");
            runs.push(CrashRun { crashed_at: at.clone(), effects });
        }
        CrashReport { baseline, boundaries, runs }
    }

    async fn run_once(&self, hook: BoundaryHook) -> serde_json::Value {
        let db = TestDb::new().await;
        (self.setup)(db.pool().clone()).await;
        let builder = Worker::builder(db.new_pool(6).await)
            .queue(self.queue.clone(), 1)
            .lease(Duration::from_millis(500))
            .step_hook(hook)
            .configure(|c| {
                c.maintenance_interval = Duration::from_millis(100);
                c.poll_interval = Duration::from_millis(50);
                c.retry.base = Duration::from_millis(10);
                c.retry.max = Duration::from_millis(100);
            });
        let handle = (self.register)(builder).build().expect("crash harness: the worker must build").start();
        eventually(self.deadline, "the crash harness's jobs to finish", || async {
            let left: i64 =
                sqlx::query_scalar("SELECT count(*) FROM oncely.jobs WHERE state IN ('available', 'running')")
                    .fetch_one(db.pool())
                    .await
                    .ok()?;
            (left == 0).then_some(())
        })
        .await;
        handle.shutdown().await;
        (self.effects)(db.pool().clone()).await
    }
}
