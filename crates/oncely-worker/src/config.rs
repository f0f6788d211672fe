//! Worker settings, with their defaults as named constants.

use oncely_core::pooler::Pooler;
use std::time::Duration;

use oncely_core::retry::RetryPolicy;

/// Defaults to 30 s: how long a claim holds without a heartbeat. A worker that dies has its jobs
/// rescued within about this long plus [`DEFAULT_MAINTENANCE_INTERVAL`].
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Defaults to 1 s: how often an idle queue is polled when no NOTIFY arrives.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Defaults to 256: the most jobs one claim takes. A claim of 256 took about 4.5 ms on the
/// benchmark machine and a claim of 16 about 1 ms, so large claims are what make short jobs fast
/// (docs/benchmarks.md, "Adaptive prefetch, on by default").
pub const DEFAULT_FETCH_BATCH: usize = 256;
/// The most jobs [`WorkerConfig::prefetch`] may hold per queue.
pub const MAX_PREFETCH: usize = 10_000;
/// Defaults to 256: the most jobs each queue's fetcher may hold claimed ahead
/// ([`WorkerConfig::prefetch`]); with [`WorkerConfig::adaptive_prefetch`] (the default) it holds
/// only as many as its slots start within one claim's time, up to this.
pub const DEFAULT_PREFETCH: usize = 256;
/// Defaults to 2 ms: while a queue is busy, how long the fetcher waits for more free slots so that
/// one claim fills several of them.
pub const DEFAULT_FETCH_COOLDOWN: Duration = Duration::from_millis(2);
/// Defaults to 5 minutes: a handler attempt running longer is aborted and retried.
pub const DEFAULT_JOB_TIMEOUT: Duration = Duration::from_secs(300);
/// Defaults to 5 s: how long a handler whose lease was lost (its job rescued, cancelled by a
/// person, or claimed by another worker) may go on running after it was told to stop
/// ([`JobContext::cancelled`](crate::JobContext::cancelled)); then its future is dropped, so a
/// zombie attempt cannot keep calling other systems.
pub const DEFAULT_LEASE_LOST_GRACE: Duration = Duration::from_secs(5);
/// Defaults to 30 s: at shutdown, how long in-flight jobs may run before they are released.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Defaults to 1 s: how often the elected maintenance leader renews its lease and rescues
/// expired claims.
pub const DEFAULT_MAINTENANCE_INTERVAL: Duration = Duration::from_secs(1);
/// Defaults to 1 s: how often every worker looks for due cron ticks (a tick's run is enqueued up to
/// this late).
pub const DEFAULT_SCHEDULER_INTERVAL: Duration = Duration::from_secs(1);
/// Defaults to 60 s: how often finished jobs past retention are pruned.
pub const DEFAULT_PRUNE_INTERVAL: Duration = Duration::from_secs(60);
/// Defaults to 1 hour: how often expired ledger records (step records, idempotency keys) are
/// deleted. Expired records already count as absent; this only bounds the table's size.
pub const DEFAULT_LEDGER_CLEANUP_INTERVAL: Duration = Duration::from_secs(3600);
/// Defaults to 24 hours: how long completed and cancelled jobs are kept.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// Defaults to 7 days: how long dead jobs are kept for a person to look at.
pub const DEFAULT_DEAD_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Defaults to 30 days: how long published events are kept once nothing needs them (all their
/// deliveries delivered, or their jobs pruned).
pub const DEFAULT_EVENT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// Defaults to 30 days: how long inbox records are kept. A sender resending an event after that has
/// it accepted again, so keep this longer than any sender retries.
pub const DEFAULT_INBOX_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// One queue a worker serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    /// The queue's name.
    pub name: String,
    /// Jobs of this queue that run at once on this worker.
    pub concurrency: usize,
}

/// How a worker runs. Build it through [`WorkerBuilder`](crate::WorkerBuilder); every field has a
/// default (see the `DEFAULT_*` constants).
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// This worker's id, recorded on the jobs it claims. Defaults to `hostname-pid-random`.
    pub worker_id: String,
    /// Queues served, with their concurrency.
    pub queues: Vec<QueueConfig>,
    /// Lease per claim. Heartbeats extend it every third of it.
    pub lease: Duration,
    /// Poll interval of an idle queue.
    pub poll_interval: Duration,
    /// Jobs per claim, at most.
    pub fetch_batch: usize,
    /// Wait for more free slots while a queue is busy.
    pub fetch_cooldown: Duration,
    /// Default per-attempt timeout.
    pub job_timeout: Duration,
    /// Grace period for in-flight jobs at shutdown.
    pub shutdown_timeout: Duration,
    /// How long a handler whose lease was lost may go on running once told to stop, before its
    /// future is dropped. Defaults to [`DEFAULT_LEASE_LOST_GRACE`].
    pub lease_lost_grace: Duration,
    /// Retry delays.
    pub retry: RetryPolicy,
    /// Run maintenance (rescue, pruning) when elected. Defaults to true.
    pub maintenance: bool,
    /// Maintenance tick.
    pub maintenance_interval: Duration,
    /// Pruning interval.
    pub prune_interval: Duration,
    /// Expired-ledger cleanup interval; each run writes a row to `oncely.maintenance_runs`.
    pub ledger_cleanup_interval: Duration,
    /// Retention of completed and cancelled jobs.
    pub retention: Duration,
    /// Retention of dead jobs.
    pub dead_retention: Duration,
    /// Retention of published events nothing needs any more. Defaults to [`DEFAULT_EVENT_RETENTION`].
    pub event_retention: Duration,
    /// Retention of inbox records. Defaults to [`DEFAULT_INBOX_RETENTION`].
    pub inbox_retention: Duration,
    /// Enqueue the runs of due cron ticks (every worker may; a tick still gets one run). Defaults to
    /// true.
    pub scheduler: bool,
    /// How often the scheduler looks for due ticks. Defaults to [`DEFAULT_SCHEDULER_INTERVAL`].
    pub scheduler_interval: Duration,
    /// How the worker reaches PostgreSQL: [`Pooler::Session`] (directly, or through a pooler in
    /// session mode; the default) or [`Pooler::Transaction`] (through PgBouncer or another
    /// pooler in transaction pooling mode: no named prepared statements, every statement inside
    /// an explicit transaction, no LISTEN through the pool). The mode is process-wide: starting
    /// a worker with [`Pooler::Transaction`] sets it for the whole process (see
    /// [`oncely_core::pooler`]).
    pub pooler: Pooler,
    /// With [`Pooler::Transaction`]: a direct (or session-pooled) connection URL for the worker's
    /// one `LISTEN` connection, for millisecond wake-ups. Without it, the worker does not listen
    /// and finds work by polling every [`poll_interval`](Self::poll_interval). Ignored in
    /// [`Pooler::Session`] mode, where the listener uses the pool.
    pub listen_url: Option<String>,
    /// Claim through a [`ClaimWindow`](oncely_core::lease::ClaimWindow): each claim starts reading
    /// the claim index where this worker's last claim of the queue left off (less two seconds),
    /// instead of at its head, so that the entries of jobs claimed since the oldest open snapshot
    /// began (a session idle in a transaction, a long report) cost nothing; a full claim every so
    /// often finds the jobs a window cannot see. Defaults to true; false claims from the head of
    /// the index every time.
    pub windowed_claims: bool,
    /// With [`windowed_claims`](Self::windowed_claims): the shortest time between two full claims
    /// (from the head of the claim index) of a queue. `None` (the default): 250 ms, longer while
    /// full claims are slow (a held snapshot), at most a minute. A full claim also follows at once
    /// when a paused kind is resumed (every fetcher is woken) and after the listener reconnects.
    pub full_claim_interval: Option<Duration>,
    /// Jobs each queue's fetcher may hold claimed beyond the queue's concurrency, waiting on this
    /// worker for a free slot (a local buffer; at most [`MAX_PREFETCH`]). With it a claim runs
    /// while the queue's slots are busy, so short jobs do not leave slots idle for a claim's
    /// round trip, and claims can be larger (up to [`fetch_batch`](Self::fetch_batch)). The jobs
    /// waiting are leased and heartbeated like running ones. At shutdown they are released at
    /// once, not run. One whose lease is lost while it waits is dropped without running, and one
    /// whose lease this worker has not confirmed for two thirds of the lease (heartbeats failing)
    /// is confirmed with a lease extension before it starts. Jobs under flow control (keys,
    /// global limits, rate limits) are not claimed ahead. The cost: a job waiting here waits for
    /// this worker's slots even when another worker is idle.
    ///
    /// With [`adaptive_prefetch`](Self::adaptive_prefetch) (the default) this is a ceiling, and
    /// the fetcher holds only what its slots would start within one claim's time; without it, it
    /// holds up to this many whatever the jobs' length, so keep it small for long jobs. 0 claims
    /// only for free slots. Defaults to [`DEFAULT_PREFETCH`].
    pub prefetch: usize,
    /// Hold claimed ahead only as many jobs as the queue's slots start within one claim's time,
    /// measured on this worker: the queue's concurrency times the mean claim time over the mean
    /// time a handler holds a slot (both moving averages), rounded down, at most
    /// [`prefetch`](Self::prefetch). Before a job of the queue has finished it holds none.
    /// Handlers as long as a claim get about one job ahead per slot, handlers a concurrency's
    /// worth of claims long none, and handlers of microseconds the ceiling, so that idle slots
    /// never wait for a claim. Defaults to true; false makes `prefetch` a fixed buffer.
    pub adaptive_prefetch: bool,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            worker_id: default_worker_id(),
            queues: Vec::new(),
            lease: DEFAULT_LEASE,
            poll_interval: DEFAULT_POLL_INTERVAL,
            fetch_batch: DEFAULT_FETCH_BATCH,
            fetch_cooldown: DEFAULT_FETCH_COOLDOWN,
            job_timeout: DEFAULT_JOB_TIMEOUT,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            lease_lost_grace: DEFAULT_LEASE_LOST_GRACE,
            retry: RetryPolicy::default(),
            maintenance: true,
            maintenance_interval: DEFAULT_MAINTENANCE_INTERVAL,
            prune_interval: DEFAULT_PRUNE_INTERVAL,
            ledger_cleanup_interval: DEFAULT_LEDGER_CLEANUP_INTERVAL,
            retention: DEFAULT_RETENTION,
            dead_retention: DEFAULT_DEAD_RETENTION,
            event_retention: DEFAULT_EVENT_RETENTION,
            inbox_retention: DEFAULT_INBOX_RETENTION,
            scheduler: true,
            scheduler_interval: DEFAULT_SCHEDULER_INTERVAL,
            pooler: Pooler::Session,
            listen_url: None,
            windowed_claims: true,
            full_claim_interval: None,
            prefetch: DEFAULT_PREFETCH,
            adaptive_prefetch: true,
        }
    }
}

impl WorkerConfig {
    /// How often heartbeats extend leases: a third of the lease.
    pub fn heartbeat_interval(&self) -> Duration {
        self.lease / 3
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.queues.is_empty() {
            return Err("no queue to serve: add one with .queue(name, concurrency)".into());
        }
        self.validate_services()
    }

    /// Everything [`validate`](Self::validate) checks but the queues.
    pub(crate) fn validate_services(&self) -> Result<(), String> {
        let mut names = std::collections::HashSet::new();
        for q in &self.queues {
            if q.name.is_empty() || q.name.len() > 128 {
                return Err(format!("queue name must be 1..=128 bytes: {:?}", q.name));
            }
            if q.concurrency == 0 {
                return Err(format!("queue `{}` has concurrency 0", q.name));
            }
            if !names.insert(&q.name) {
                return Err(format!("queue `{}` configured twice", q.name));
            }
        }
        if self.lease < Duration::from_millis(300) {
            return Err(format!("lease {:?} is too short (at least 300ms)", self.lease));
        }
        if self.fetch_batch == 0 {
            return Err("fetch_batch must be at least 1".into());
        }
        if self.full_claim_interval.is_some_and(|d| d.is_zero()) {
            return Err("full_claim_interval must be positive".into());
        }
        if self.prefetch > MAX_PREFETCH {
            return Err(format!("prefetch {} is too large (at most {MAX_PREFETCH})", self.prefetch));
        }
        for (what, d) in [
            ("poll_interval", self.poll_interval),
            ("job_timeout", self.job_timeout),
            ("maintenance_interval", self.maintenance_interval),
            ("prune_interval", self.prune_interval),
            ("ledger_cleanup_interval", self.ledger_cleanup_interval),
            ("scheduler_interval", self.scheduler_interval),
        ] {
            if d.is_zero() {
                return Err(format!("{what} must be positive"));
            }
        }
        if self.worker_id.is_empty() {
            return Err("worker_id must not be empty".into());
        }
        Ok(())
    }
}

fn default_worker_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|s| s.trim().to_owned()))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into());
    let short = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &short[..8])
}
