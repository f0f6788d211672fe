//! The worker: a builder, the shared runtime state, and the handle that shuts it down.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oncely_core::pooler::Pooler;
use oncely_core::step::BoundaryHook;
use oncely_core::{Claim, JobArgs, JobId};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::completer::{self, CompleterMsg};
use crate::config::{QueueConfig, WorkerConfig};
use crate::error::{Error, Result};
use crate::function::{Clock, FunctionHandler};
use crate::handler::{ErasedHandler, Handler, Typed};
use crate::{fetcher, function, heartbeat, listener, maintenance};
use oncely_core::function::Function;

/// Builds a [`Worker`].
///
/// # Example
///
/// ```no_run
/// # use oncely_core::JobArgs;
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Serialize, Deserialize)] struct SendEmail { to: String }
/// # impl JobArgs for SendEmail { const KIND: &'static str = "send_email"; }
/// # async fn example(pool: sqlx::PgPool) -> oncely_worker::Result<()> {
/// use oncely_worker::{handler_fn, Worker};
/// use std::time::Duration;
///
/// let worker = Worker::builder(pool)
///     .register(handler_fn(|_ctx, args: SendEmail| async move {
///         tracing::info!(to = %args.to, "sending");
///         Ok(())
///     }))
///     .queue("default", 10)
///     .lease(Duration::from_secs(30))
///     .build()?;
/// let handle = worker.start();
/// // ... until the process is asked to stop:
/// handle.shutdown().await;
/// # Ok(()) }
/// ```
pub struct WorkerBuilder {
    pool: sqlx::PgPool,
    config: WorkerConfig,
    handlers: HashMap<String, Arc<dyn ErasedHandler>>,
    duplicate_kinds: Vec<String>,
    step_hook: Option<BoundaryHook>,
    completion_hook: Option<CompletionHook>,
    functions: Vec<Function>,
    clock: Option<Clock>,
    /// The id set with [`worker_id`](Self::worker_id), kept across [`config`](Self::config).
    worker_id: Option<String>,
}

impl std::fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field("config", &self.config)
            .field("kinds", &sorted_kinds(&self.handlers))
            .field("worker_id", &self.worker_id)
            .finish_non_exhaustive()
    }
}

/// The registered kinds, sorted (for `Debug`).
fn sorted_kinds(handlers: &HashMap<String, Arc<dyn ErasedHandler>>) -> Vec<&str> {
    let mut kinds: Vec<&str> = handlers.keys().map(String::as_str).collect();
    kinds.sort_unstable();
    kinds
}

impl WorkerBuilder {
    /// Register the handler for jobs of kind `A::KIND`.
    pub fn register<A: JobArgs, H: Handler<A>>(mut self, handler: H) -> Self {
        if self.handlers.insert(A::KIND.to_owned(), Arc::new(Typed::<A, H>::new(handler))).is_some() {
            self.duplicate_kinds.push(A::KIND.to_owned());
        }
        self
    }

    /// Register a function: `handler` runs its runs (jobs of kind `function.name()`), reading an
    /// event's payload as `T`. At start the worker stores the function's subscriptions and schedule
    /// (see [`crate::function`]).
    pub fn function<T, H>(mut self, function: Function, handler: H) -> Self
    where
        T: serde::de::DeserializeOwned + Send + 'static,
        H: FunctionHandler<T>,
    {
        let erased = crate::function::Erased::<T, H>::new(handler, &function);
        if self.handlers.insert(function.name().to_owned(), Arc::new(erased)).is_some() {
            self.duplicate_kinds.push(function.name().to_owned());
        }
        self.functions.push(function);
        self
    }

    /// The clock the cron scheduler reads instead of the database's (for tests that move time by
    /// hand; it also dates the first tick of a newly stored schedule).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Serve `queue` with up to `concurrency` jobs at once.
    pub fn queue(mut self, queue: impl Into<String>, concurrency: usize) -> Self {
        self.config.queues.push(QueueConfig { name: queue.into(), concurrency });
        self
    }

    /// A fixed prefetch (see [`WorkerConfig::prefetch`]): each queue holds up to `jobs` claimed
    /// beyond its concurrency, waiting for a free slot, whatever its jobs' length
    /// ([`WorkerConfig::adaptive_prefetch`] off). `prefetch(0)` claims only for free slots. The
    /// default is an adaptive prefetch of up to
    /// [`DEFAULT_PREFETCH`](crate::config::DEFAULT_PREFETCH).
    pub fn prefetch(mut self, jobs: usize) -> Self {
        self.config.prefetch = jobs;
        self.config.adaptive_prefetch = false;
        self
    }

    /// An adaptive prefetch of up to `max` jobs per queue (see
    /// [`WorkerConfig::adaptive_prefetch`]): as many as the queue's slots start within one
    /// claim's time.
    pub fn adaptive_prefetch(mut self, max: usize) -> Self {
        self.config.prefetch = max;
        self.config.adaptive_prefetch = true;
        self
    }

    /// See [`WorkerConfig::lease`]. Defaults to [`DEFAULT_LEASE`](crate::config::DEFAULT_LEASE).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.config.lease = lease;
        self
    }

    /// See [`WorkerConfig::worker_id`]. It wins over the id of a [`config`](Self::config) given
    /// before or after.
    pub fn worker_id(mut self, id: impl Into<String>) -> Self {
        let id = id.into();
        self.config.worker_id = id.clone();
        self.worker_id = Some(id);
        self
    }

    /// Replace the whole configuration except the queues and the worker id already set on this
    /// builder (queues are added to the config's; an id set with [`worker_id`](Self::worker_id) is
    /// kept).
    pub fn config(mut self, config: WorkerConfig) -> Self {
        let queues = std::mem::take(&mut self.config.queues);
        self.config = config;
        self.config.queues.extend(queues);
        if let Some(id) = &self.worker_id {
            self.config.worker_id = id.clone();
        }
        self
    }

    /// Call `hook` at every step boundary of every job (crash testing: a hook that panics with
    /// [`InjectedCrash`](oncely_core::step::InjectedCrash) makes the attempt end as if the process
    /// died there).
    pub fn step_hook(mut self, hook: BoundaryHook) -> Self {
        self.step_hook = Some(hook);
        self
    }

    /// Test support: await `hook` after each batch of completions is written and before those jobs
    /// leave the running set (the window in which the heartbeat may find them no longer running).
    #[doc(hidden)]
    pub fn completion_hook(mut self, hook: CompletionHook) -> Self {
        self.completion_hook = Some(hook);
        self
    }

    /// See [`WorkerConfig::pooler`]: with [`Pooler::Transaction`], run safely behind PgBouncer (or
    /// another pooler) in transaction pooling mode. Process-wide once the worker is built.
    pub fn pooler(mut self, pooler: Pooler) -> Self {
        self.config.pooler = pooler;
        self
    }

    /// See [`WorkerConfig::listen_url`]: a direct connection for LISTEN behind a transaction pooler.
    pub fn listen_url(mut self, url: impl Into<String>) -> Self {
        self.config.listen_url = Some(url.into());
        self
    }

    /// Change settings in place.
    pub fn configure(mut self, f: impl FnOnce(&mut WorkerConfig)) -> Self {
        f(&mut self.config);
        self
    }

    /// Check the configuration and build the worker.
    ///
    /// Besides the settings, it refuses a registered kind whose arguments declare
    /// ([`JobArgs::insert_opts`]) a queue this worker does not serve, or a timeout that is not
    /// shorter than the lease. A handler's own [`Handler::timeout`] at or past the lease is only
    /// warned about: while the worker holds the database its heartbeats keep the lease, but a
    /// worker cut off for longer than the lease may still be running the attempt when the job is
    /// rescued and run elsewhere.
    pub fn build(self) -> Result<Worker> {
        if let Some(kind) = self.duplicate_kinds.first() {
            return Err(Error::Config(format!("two handlers registered for job kind `{kind}`")));
        }
        if self.handlers.is_empty() {
            return Err(Error::Config("no handler registered".into()));
        }
        self.config.validate().map_err(Error::Config)?;
        for f in &self.functions {
            f.validate().map_err(|e| Error::Config(format!("function `{}`: {e}", f.name())))?;
        }
        let mut kinds: Vec<_> = self.handlers.iter().collect();
        kinds.sort_by(|a, b| a.0.cmp(b.0));
        for (kind, handler) in kinds {
            let opts = handler.insert_opts();
            if let Some(queue) = &opts.queue {
                if !self.config.queues.iter().any(|q| &q.name == queue) {
                    return Err(Error::Config(format!(
                        "job kind `{kind}` goes to queue `{queue}` (its JobArgs::insert_opts), which this worker does not \
                         serve: add .queue(\"{queue}\", concurrency), or register the kind on a worker that serves it"
                    )));
                }
            }
            if let Some(timeout) = opts.timeout {
                if timeout >= self.config.lease {
                    return Err(Error::Config(format!(
                        "job kind `{kind}` declares a timeout of {timeout:?} (its JobArgs::insert_opts), not shorter \
                         than the lease ({:?}): lengthen the lease or shorten the timeout",
                        self.config.lease
                    )));
                }
            }
            if let Some(timeout) = handler.timeout().filter(|t| *t >= self.config.lease) {
                tracing::warn!(
                    job.kind = %kind, ?timeout, lease = ?self.config.lease,
                    "the handler's timeout is not shorter than the lease: a worker cut off from the database may \
                     still run an attempt after its job was rescued"
                );
            }
        }
        Ok(self.into_worker())
    }
}

impl WorkerBuilder {
    /// The checked builder as a worker. A worker configured for a transaction pooler switches the
    /// process to that mode here, before it sends any statement.
    fn into_worker(self) -> Worker {
        if self.config.pooler == Pooler::Transaction {
            oncely_core::pooler::set_pooler(Pooler::Transaction);
        }
        Worker {
            pool: self.pool,
            config: self.config,
            handlers: self.handlers,
            step_hook: self.step_hook,
            completion_hook: self.completion_hook,
            functions: self.functions,
            clock: self.clock,
        }
    }

    /// Build a worker that claims no jobs and runs only the services: the maintenance leader
    /// election with rescue, pruning and ledger cleanup (`oncely serve` without `--webhooks`).
    /// Refused when handlers or queues were added, or maintenance is switched off.
    pub fn build_maintenance_only(self) -> Result<Worker> {
        if !self.handlers.is_empty() || !self.config.queues.is_empty() || !self.functions.is_empty() {
            return Err(Error::Config("a maintenance-only worker takes no handlers, functions or queues".into()));
        }
        if !self.config.maintenance {
            return Err(Error::Config("a maintenance-only worker needs maintenance switched on".into()));
        }
        self.config.validate_services().map_err(Error::Config)?;
        Ok(self.into_worker())
    }
}

/// A configured worker, ready to [`start`](Worker::start).
pub struct Worker {
    pool: sqlx::PgPool,
    config: WorkerConfig,
    handlers: HashMap<String, Arc<dyn ErasedHandler>>,
    step_hook: Option<BoundaryHook>,
    completion_hook: Option<CompletionHook>,
    functions: Vec<Function>,
    clock: Option<Clock>,
}

/// Test support: see [`WorkerBuilder::completion_hook`].
#[doc(hidden)]
pub type CompletionHook =
    Arc<dyn Fn(Vec<Claim>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send + Sync>;

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("config", &self.config)
            .field("kinds", &sorted_kinds(&self.handlers))
            .finish_non_exhaustive()
    }
}

/// Counters of what a worker did since it started.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Jobs claimed.
    pub claimed: AtomicU64,
    /// Completions recorded.
    pub completed: AtomicU64,
    /// Failed attempts recorded (retry or dead).
    pub failed: AtomicU64,
    /// Snoozes recorded.
    pub snoozed: AtomicU64,
    /// Jobs cancelled by their handler.
    pub cancelled: AtomicU64,
    /// Jobs released at shutdown (with [`WorkerConfig::prefetch`], jobs claimed ahead and not
    /// started count here too).
    pub released: AtomicU64,
    /// Writes refused because the lease was lost.
    pub lease_lost: AtomicU64,
    /// Running jobs whose lease the heartbeat found lost (rescued, cancelled by a person, claimed
    /// by another worker) while their handler ran: each handler was told to stop. A job whose
    /// outcome is being written, or that its handler completed in its own transaction, is not
    /// counted: its claim ended on purpose.
    pub lost_while_running: AtomicU64,
    /// Heartbeat rounds that extended this worker's leases (rounds with no running job are not
    /// counted).
    pub heartbeats: AtomicU64,
    /// Handlers dropped because they kept running for the grace period
    /// ([`WorkerConfig::lease_lost_grace`](crate::WorkerConfig::lease_lost_grace)) after their lease
    /// was lost; with [`WorkerConfig::prefetch`], also jobs claimed ahead that were dropped unrun
    /// because their lease was lost (or could not be confirmed) before they started.
    pub abandoned: AtomicU64,
    /// Claim statements the fetchers ran (windowed, full and flow-control claims, including those
    /// that found nothing or failed).
    pub claims: AtomicU64,
    /// Their total wall time as the fetchers saw it (the round trip and waiting for a pooled
    /// connection included), in microseconds. With [`claims`](Self::claims): the mean time of a
    /// claim, which a held snapshot or a bloated claim index makes grow.
    pub claim_micros: AtomicU64,
    /// Jobs that found every run slot of their queue taken when their claim handed them out, and
    /// so waited on this worker, claimed ahead ([`WorkerConfig::prefetch`]).
    pub claimed_ahead: AtomicU64,
}

impl WorkerStats {
    /// Read a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

pub(crate) struct RunningJob {
    pub(crate) attempt: i32,
    pub(crate) cancel: CancellationToken,
    pub(crate) flags: Arc<AttemptFlags>,
}

/// How one attempt is ending, shared by its executor, its handler's context and the heartbeat.
#[derive(Debug, Default)]
pub(crate) struct AttemptFlags {
    /// The attempt's outcome is being written (the handler returned), or the handler completed the
    /// job in its own transaction: the heartbeat finding the claim no longer running is expected,
    /// not a lost lease.
    pub(crate) finishing: AtomicBool,
    /// The handler completed the job in its own transaction
    /// ([`JobContext::complete_in`](crate::JobContext::complete_in)); whether that transaction
    /// committed is read back once the handler returns. The heartbeat no longer extends the lease:
    /// the job's row is locked by that transaction until it ends.
    pub(crate) completed_in_tx: AtomicBool,
    /// The handler suspended the run in its own transaction (`wait_for_event`): once that
    /// committed, the claim is over and the executor writes nothing.
    pub(crate) suspended_in_tx: AtomicBool,
}

impl AttemptFlags {
    pub(crate) fn get(flag: &AtomicBool) -> bool {
        flag.load(Ordering::SeqCst)
    }
    pub(crate) fn set(flag: &AtomicBool) {
        flag.store(true, Ordering::SeqCst);
    }
}

/// State shared by the worker's tasks.
pub(crate) struct Shared {
    pub(crate) pool: sqlx::PgPool,
    pub(crate) config: WorkerConfig,
    pub(crate) handlers: HashMap<String, Arc<dyn ErasedHandler>>,
    /// Jobs claimed and not yet finished in the database: the heartbeat extends their leases.
    pub(crate) running: Mutex<HashMap<JobId, RunningJob>>,
    pub(crate) completions: mpsc::UnboundedSender<CompleterMsg>,
    /// Fires when the shutdown grace period is over: handlers are aborted and their jobs released.
    pub(crate) hard_stop: CancellationToken,
    pub(crate) stats: Arc<WorkerStats>,
    pub(crate) step_hook: Option<BoundaryHook>,
    pub(crate) completion_hook: Option<CompletionHook>,
    /// Each served queue's fetcher wake-up.
    pub(crate) wakers: HashMap<String, Arc<Notify>>,
    /// The registered functions' definitions.
    pub(crate) functions: Vec<Function>,
    /// The scheduler's clock; `None`: the database's.
    pub(crate) clock: Option<Clock>,
    /// Queues seen with a global limit (`oncely_core::flow`): their completions NOTIFY the queue,
    /// so that every worker's fetcher claims the freed slots at once.
    pub(crate) limited_queues: Mutex<std::collections::HashSet<String>>,
    /// When the last heartbeat that extended every lease this worker held began (`None`: none
    /// yet): a job claimed before then holds its lease until at least then plus the lease.
    pub(crate) leases_confirmed: Mutex<Option<std::time::Instant>>,
    /// Bumped by the listener when every fetcher must read its whole queue again (a kind was
    /// resumed, whose jobs a claim window has moved past; or notifications may have been missed):
    /// each fetcher's next claim is then a full one.
    pub(crate) read_all: AtomicU64,
}

/// Store `functions`' definitions, dating new schedules by `clock` (else the database clock).
pub(crate) async fn register_functions(
    pool: &sqlx::PgPool,
    functions: &[Function],
    clock: &Option<Clock>,
) -> Result<()> {
    if functions.is_empty() {
        return Ok(());
    }
    // One transaction: safe behind a transaction pooler, and the definitions land together.
    let mut tx = oncely_core::txn::begin(pool).await.map_err(oncely_core::Error::from)?;
    let now = match clock {
        Some(c) => c(),
        None => sqlx::query_scalar("SELECT now()")
            .persistent(oncely_core::pooler::persistent())
            .fetch_one(&mut *tx)
            .await
            .map_err(oncely_core::Error::from)?,
    };
    oncely_core::function::register_functions(&mut tx, functions, now).await?;
    tx.commit().await.map_err(oncely_core::Error::from)?;
    Ok(())
}

impl Shared {
    /// Wake `queue`'s fetcher after `delay`, when that is sooner than its next poll: a job retried
    /// or snoozed for less than the poll interval then runs on time, not at the next poll. Work
    /// from other workers still relies on NOTIFY and polling.
    pub(crate) fn wake_after(&self, queue: &str, delay: Duration) {
        if delay >= self.config.poll_interval {
            return;
        }
        if let Some(wake) = self.wakers.get(queue).cloned() {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                wake.notify_one();
            });
        }
    }

    pub(crate) fn running_claims(&self) -> Vec<Claim> {
        let running = self.running.lock().expect("running-jobs lock poisoned by a panic while held");
        running
            .iter()
            // Neither a job its handler completed in its own transaction (the row is locked until
            // that ends), nor one whose handler was already told its lease is lost.
            .filter(|(_, r)| !AttemptFlags::get(&r.flags.completed_in_tx) && !r.cancel.is_cancelled())
            .map(|(id, r)| Claim { id: *id, attempt: r.attempt })
            .collect()
    }

    pub(crate) fn forget(&self, claims: impl IntoIterator<Item = Claim>) {
        let mut running = self.running.lock().expect("running-jobs lock poisoned by a panic while held");
        for c in claims {
            if running.get(&c.id).is_some_and(|r| r.attempt == c.attempt) {
                running.remove(&c.id);
            }
        }
    }
}

impl Worker {
    /// Start a builder on `pool`. The worker takes one connection for LISTEN, and short-lived ones
    /// for claims, completions, heartbeats and maintenance; size the pool for those plus what the
    /// handlers use.
    pub fn builder(pool: sqlx::PgPool) -> WorkerBuilder {
        WorkerBuilder {
            pool,
            config: WorkerConfig::default(),
            handlers: HashMap::new(),
            duplicate_kinds: Vec::new(),
            step_hook: None,
            completion_hook: None,
            functions: Vec::new(),
            clock: None,
            worker_id: None,
        }
    }

    /// Store the registered functions' subscriptions and schedules now. [`start`](Self::start) does
    /// it too (retrying in the background); call this first when events must start runs as soon as
    /// the worker is up (e.g. publishing right after, in a test).
    pub async fn register_functions(&self) -> Result<()> {
        register_functions(&self.pool, &self.functions, &self.clock).await
    }

    /// The configuration.
    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    /// Start claiming and running jobs on the current Tokio runtime.
    pub fn start(self) -> WorkerHandle {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(WorkerStats::default());
        let wakers: HashMap<String, Arc<Notify>> =
            self.config.queues.iter().map(|q| (q.name.clone(), Arc::new(Notify::new()))).collect();
        let shared = Arc::new(Shared {
            pool: self.pool,
            config: self.config,
            handlers: self.handlers,
            running: Mutex::new(HashMap::new()),
            completions: tx,
            hard_stop: CancellationToken::new(),
            stats: stats.clone(),
            step_hook: self.step_hook,
            completion_hook: self.completion_hook,
            wakers: wakers.clone(),
            functions: self.functions,
            clock: self.clock,
            limited_queues: Mutex::new(std::collections::HashSet::new()),
            leases_confirmed: Mutex::new(None),
            read_all: AtomicU64::new(0),
        });
        let stop = CancellationToken::new();
        let jobs = TaskTracker::new();
        tracing::info!(worker.id = %shared.config.worker_id, queues = ?shared.config.queues, "worker starting");

        let mut fetchers = Vec::new();
        for q in &shared.config.queues {
            let wake = wakers[&q.name].clone();
            fetchers.push(tokio::spawn(fetcher::run(shared.clone(), q.clone(), wake, stop.clone(), jobs.clone())));
        }
        let services_stop = CancellationToken::new();
        let mut services = vec![tokio::spawn(heartbeat::run(shared.clone(), services_stop.clone()))];
        // A maintenance-only worker has no fetcher to wake: it holds no LISTEN connection. Behind a
        // transaction pooler it listens only over a direct URL of its own, else it polls.
        let listens = match shared.config.pooler {
            Pooler::Session => true,
            Pooler::Transaction => shared.config.listen_url.is_some(),
        };
        if !wakers.is_empty() && listens {
            services.push(tokio::spawn(listener::run(shared.clone(), wakers, stop.clone())));
        }
        if shared.config.maintenance {
            services.push(tokio::spawn(maintenance::run(shared.clone(), services_stop.clone())));
        }
        services.push(tokio::spawn(function::register(shared.clone(), services_stop.clone())));
        if shared.config.scheduler {
            services.push(tokio::spawn(function::run_scheduler(shared.clone(), services_stop.clone())));
        }
        let completer = tokio::spawn(completer::run(shared.clone(), rx));
        WorkerHandle {
            inner: Arc::new(tokio::sync::Mutex::new(Some(Running {
                shared: shared.clone(),
                stop,
                services_stop,
                jobs,
                fetchers,
                services,
                completer,
            }))),
            stats,
            worker_id: shared.config.worker_id.clone(),
        }
    }
}

struct Running {
    shared: Arc<Shared>,
    stop: CancellationToken,
    services_stop: CancellationToken,
    jobs: TaskTracker,
    fetchers: Vec<JoinHandle<()>>,
    services: Vec<JoinHandle<()>>,
    completer: JoinHandle<()>,
}

/// A running worker. Dropping it does not stop the worker; call [`shutdown`](Self::shutdown).
#[derive(Clone)]
pub struct WorkerHandle {
    inner: Arc<tokio::sync::Mutex<Option<Running>>>,
    stats: Arc<WorkerStats>,
    worker_id: String,
}

impl std::fmt::Debug for WorkerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerHandle")
            .field("worker_id", &self.worker_id)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl WorkerHandle {
    /// What the worker did so far.
    pub fn stats(&self) -> &WorkerStats {
        &self.stats
    }

    /// The worker's id.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// Shut down gracefully with the configured grace period; see
    /// [`shutdown_within`](Self::shutdown_within).
    pub async fn shutdown(&self) {
        let timeout = match self.inner.lock().await.as_ref() {
            Some(r) => r.shared.config.shutdown_timeout,
            None => return,
        };
        self.shutdown_within(timeout).await
    }

    /// Wait for SIGTERM or SIGINT (Ctrl-C; only Ctrl-C on platforms without Unix signals), then
    /// [`shutdown`](Self::shutdown). Needs this crate's `signal` feature.
    ///
    /// ```no_run
    /// # async fn example(worker: oncely_worker::Worker) {
    /// let handle = worker.start();
    /// handle.shutdown_on_signal().await; // returns once the worker has stopped
    /// # }
    /// ```
    #[cfg(feature = "signal")]
    pub async fn shutdown_on_signal(&self) {
        wait_for_signal().await;
        tracing::info!(worker.id = %self.worker_id, "stop signal received");
        self.shutdown().await
    }

    /// Stop claiming; let in-flight jobs finish for up to `grace`; then abort the rest and release
    /// their jobs to the queue (not counted as attempts); record every completion; give up the
    /// maintenance leadership. Idempotent: a call made while another is in progress returns when
    /// that one has finished; later calls return at once.
    pub async fn shutdown_within(&self, grace: Duration) {
        // Held to the end, so that a concurrent call waits for this one to finish.
        let mut running = self.inner.lock().await;
        let Some(r) = running.take() else { return };
        tracing::info!(worker.id = %self.worker_id, ?grace, "worker shutting down");
        r.stop.cancel();
        for f in r.fetchers {
            let _ = f.await;
        }
        r.jobs.close();
        if tokio::time::timeout(grace, r.jobs.wait()).await.is_err() {
            tracing::warn!(worker.id = %self.worker_id, "grace period over: aborting and releasing in-flight jobs");
            r.shared.hard_stop.cancel();
            r.jobs.wait().await;
        }
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        if r.shared.completions.send(CompleterMsg::Flush(done_tx)).is_ok() {
            let _ = done_rx.await;
        }
        r.services_stop.cancel();
        for s in r.services {
            let _ = s.await;
        }
        r.completer.abort();
        tracing::info!(worker.id = %self.worker_id, "worker stopped");
    }
}

#[cfg(all(feature = "signal", unix))]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler can be installed in a Tokio runtime");
    let mut int = signal(SignalKind::interrupt()).expect("a SIGINT handler can be installed in a Tokio runtime");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(all(feature = "signal", not(unix)))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
