//! The job model: ids, states, typed arguments and what a job row holds.

// First: its SQL macros are used by the modules below and by the outbox, inbox and webhooks.
#[macro_use]
pub(crate) mod sql;

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::trace::TraceParent;

/// Defaults to `"default"`: the queue a job goes to unless told otherwise.
pub const DEFAULT_QUEUE: &str = "default";
/// Defaults to 20: attempts before a failing job goes to the dead letter.
pub const DEFAULT_MAX_ATTEMPTS: i32 = 20;
/// The longest accepted unique key, in bytes.
pub const MAX_UNIQUE_KEY_LEN: usize = 512;

/// A job's id (the `oncely.jobs.id` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, sqlx::Type)]
#[sqlx(transparent)]
#[serde(transparent)]
pub struct JobId(pub i64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting to be claimed once `run_at` has passed (new, retrying, snoozed or released).
    Available,
    /// Claimed by a worker that holds a lease on it.
    Running,
    /// Finished successfully.
    Completed,
    /// Failed permanently (out of attempts, or the handler said so): the dead letter.
    Dead,
    /// Cancelled by a person or by its handler.
    Cancelled,
}

impl JobState {
    /// All states, in life order.
    pub const ALL: [JobState; 5] =
        [JobState::Available, JobState::Running, JobState::Completed, JobState::Dead, JobState::Cancelled];

    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Available => "available",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Dead => "dead",
            JobState::Cancelled => "cancelled",
        }
    }

    /// True for states a job never leaves by itself.
    pub fn is_finished(self) -> bool {
        matches!(self, JobState::Completed | JobState::Dead | JobState::Cancelled)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for JobState {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        JobState::ALL.into_iter().find(|st| st.as_str() == s).ok_or_else(|| {
            Error::InvalidInput(format!(
                "unknown job state `{s}` (expected one of available, running, completed, dead, cancelled)"
            ))
        })
    }
}

/// Why an attempt ended without success.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The handler returned an error.
    Error,
    /// The handler panicked.
    Panic,
    /// The handler ran past its timeout.
    Timeout,
    /// The worker's lease expired (the worker died or lost the database) and the job was rescued.
    LeaseExpired,
    /// No handler is registered for the job's kind on the worker that claimed it.
    UnknownKind,
    /// The arguments did not deserialize into the handler's type.
    InvalidArgs,
    /// The worker shut down before the handler finished and released the job.
    Shutdown,
    /// The attempt was cut short by a lost database connection (not by the job): it was given
    /// back and does not count against the attempt limit.
    Interrupted,
}

/// One failed attempt, kept in the job's error history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptError {
    /// The attempt that failed.
    pub attempt: i32,
    /// When it failed (database clock).
    pub at: DateTime<Utc>,
    /// What kind of failure.
    pub kind: ErrorKind,
    /// The error message.
    pub message: String,
}

/// Typed job arguments: the serde type a handler receives, and the job kind it is stored under.
///
/// # Example
///
/// ```
/// use oncely_core::JobArgs;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct GenerateReport { report_id: i64 }
///
/// impl JobArgs for GenerateReport {
///     const KIND: &'static str = "generate_report";
/// }
/// ```
pub trait JobArgs: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The job kind: the name handlers are registered under. Keep it stable across deploys.
    const KIND: &'static str;

    /// This kind's defaults, declared once instead of at every enqueue site: its queue, attempt
    /// limit and priority (used by [`NewJob::new`], where a call site may still override them),
    /// and its handler's per-attempt timeout (used by the worker). Defaults to none of them:
    /// [`DEFAULT_QUEUE`], [`DEFAULT_MAX_ATTEMPTS`], priority 0 and the worker's `job_timeout`.
    ///
    /// ```
    /// use oncely_core::{InsertOpts, JobArgs, NewJob};
    /// use serde::{Deserialize, Serialize};
    /// use std::time::Duration;
    ///
    /// #[derive(Serialize, Deserialize)]
    /// struct GenerateReport { report_id: i64 }
    ///
    /// impl JobArgs for GenerateReport {
    ///     const KIND: &'static str = "generate_report";
    ///     fn insert_opts() -> InsertOpts {
    ///         InsertOpts::new().queue("reports").max_attempts(5).timeout(Duration::from_secs(120))
    ///     }
    /// }
    ///
    /// let job = NewJob::new(&GenerateReport { report_id: 7 })?;
    /// assert_eq!(job.queue_name(), "reports");
    /// let urgent = NewJob::new(&GenerateReport { report_id: 8 })?.queue("urgent");
    /// assert_eq!(urgent.queue_name(), "urgent");
    /// # Ok::<(), oncely_core::Error>(())
    /// ```
    fn insert_opts() -> InsertOpts {
        InsertOpts::new()
    }
}

/// A job kind's defaults, returned by [`JobArgs::insert_opts`]. Every field left unset falls back
/// to the general default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct InsertOpts {
    /// The queue jobs of this kind go to. Unset: [`DEFAULT_QUEUE`]. A worker that registers the
    /// kind must serve this queue (its `build` refuses otherwise).
    pub queue: Option<String>,
    /// Attempts before the dead letter. Unset: [`DEFAULT_MAX_ATTEMPTS`].
    pub max_attempts: Option<i32>,
    /// Priority within the queue (higher first). Unset: 0.
    pub priority: Option<i16>,
    /// The handler's time limit for one attempt of this kind: past it the attempt is aborted and
    /// counts as failed. It is not a deadline for the job as a whole. Unset: the handler's own
    /// `Handler::timeout`, else the worker's `job_timeout`. It must be shorter than the worker's
    /// lease (the worker's `build` refuses otherwise), so that a worker cut off from the database
    /// stops the attempt before the job can be rescued and run elsewhere.
    pub timeout: Option<Duration>,
}

impl InsertOpts {
    /// No defaults declared.
    pub fn new() -> Self {
        Self::default()
    }
    /// See [`InsertOpts::queue`](#structfield.queue).
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }
    /// See [`InsertOpts::max_attempts`](#structfield.max_attempts).
    pub fn max_attempts(mut self, max_attempts: i32) -> Self {
        self.max_attempts = Some(max_attempts);
        self
    }
    /// See [`InsertOpts::priority`](#structfield.priority).
    pub fn priority(mut self, priority: i16) -> Self {
        self.priority = Some(priority);
        self
    }
    /// See [`InsertOpts::timeout`](#structfield.timeout).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

/// A job to enqueue: built from typed args, then adjusted with the builder methods.
///
/// # Example
///
/// ```
/// # use oncely_core::{JobArgs, NewJob};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Serialize, Deserialize)] struct GenerateReport { report_id: i64 }
/// # impl JobArgs for GenerateReport { const KIND: &'static str = "generate_report"; }
/// use std::time::Duration;
/// let job = NewJob::new(&GenerateReport { report_id: 7 })?
///     .queue("reports")
///     .priority(5)
///     .delay(Duration::from_secs(30))
///     .unique_key("report:7");
/// # Ok::<(), oncely_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    pub(crate) kind: String,
    pub(crate) args: serde_json::Value,
    pub(crate) queue: String,
    pub(crate) priority: i16,
    pub(crate) run_at: Option<DateTime<Utc>>,
    pub(crate) delay: Option<Duration>,
    pub(crate) max_attempts: i32,
    pub(crate) unique_key: Option<String>,
    pub(crate) flow_key: Option<String>,
    pub(crate) flow_limit: Option<i32>,
    pub(crate) traceparent: Option<TraceParent>,
}

impl NewJob {
    /// A job of kind `A::KIND` with `args` serialized to JSON, with the kind's defaults from
    /// [`JobArgs::insert_opts`] (queue, attempt limit, priority); the builder methods override them.
    pub fn new<A: JobArgs>(args: &A) -> Result<Self> {
        let args =
            serde_json::to_value(args).map_err(|source| Error::InvalidArgs { kind: A::KIND.to_owned(), source })?;
        let opts = A::insert_opts();
        let mut job = Self::from_json(A::KIND, args);
        if let Some(queue) = opts.queue {
            job.queue = queue;
        }
        if let Some(max_attempts) = opts.max_attempts {
            job.max_attempts = max_attempts;
        }
        if let Some(priority) = opts.priority {
            job.priority = priority;
        }
        Ok(job)
    }

    /// A job from a kind name and raw JSON arguments (for tools and other languages).
    pub fn from_json(kind: impl Into<String>, args: serde_json::Value) -> Self {
        Self {
            kind: kind.into(),
            args,
            queue: DEFAULT_QUEUE.to_owned(),
            priority: 0,
            run_at: None,
            delay: None,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            unique_key: None,
            flow_key: None,
            flow_limit: None,
            traceparent: None,
        }
    }

    /// The queue to put the job on. Defaults to [`DEFAULT_QUEUE`].
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// Higher runs first within a queue. Defaults to 0.
    pub fn priority(mut self, priority: i16) -> Self {
        self.priority = priority;
        self
    }

    /// Do not run before this time.
    pub fn run_at(mut self, at: DateTime<Utc>) -> Self {
        self.run_at = Some(at);
        self.delay = None;
        self
    }

    /// Do not run before this long after the enqueue commits' statement (database clock).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self.run_at = None;
        self
    }

    /// Attempts before the job goes to the dead letter. Defaults to [`DEFAULT_MAX_ATTEMPTS`].
    pub fn max_attempts(mut self, max_attempts: i32) -> Self {
        self.max_attempts = max_attempts;
        self
    }

    /// While a job with this key is available or running, enqueueing another job with the same key
    /// returns the existing job instead of creating one.
    pub fn unique_key(mut self, key: impl Into<String>) -> Self {
        self.unique_key = Some(key.into());
        self
    }

    /// A concurrency key (e.g. `format!("tenant:{id}")`) with a fleet-wide limit: at most `limit`
    /// jobs with this key run at once in the job's queue, across every worker, and claims go
    /// round-robin across the keys of a queue (fairness). `limit` becomes the key's limit for every
    /// job of the key (the latest enqueued job's limit wins); `None` keeps the key's current
    /// limit (none, or one set by [`crate::flow::set_concurrency_limit`]) and still gives the job
    /// fair, round-robin claims. See `docs/flow-control.md`.
    pub fn concurrency_key(mut self, key: impl Into<String>, limit: Option<u32>) -> Self {
        self.flow_key = Some(key.into());
        self.flow_limit = limit.map(|l| l.min(i32::MAX as u32) as i32);
        self
    }

    /// The W3C `traceparent` of the span that enqueued the job, stored with it (see
    /// [`crate::trace`]): the worker's span for the job continues that trace. Unset, and with the
    /// cargo feature `otel`, the enqueue takes the current span's; without `otel` the job has none.
    /// A malformed header is refused when it is parsed ([`TraceParent::parse`]), so a job cannot
    /// carry one.
    ///
    /// ```
    /// # use oncely_core::NewJob;
    /// use oncely_core::trace::TraceParent;
    /// // e.g. the `traceparent` header of the HTTP request that asked for the job
    /// let tp: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse()?;
    /// let job = NewJob::from_json("send_email", serde_json::json!({})).traceparent(tp);
    /// assert_eq!(job.traceparent_value().unwrap().trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
    /// # Ok::<(), oncely_core::Error>(())
    /// ```
    pub fn traceparent(mut self, traceparent: TraceParent) -> Self {
        self.traceparent = Some(traceparent);
        self
    }

    /// The `traceparent` set with [`NewJob::traceparent`], if any.
    pub fn traceparent_value(&self) -> Option<&TraceParent> {
        self.traceparent.as_ref()
    }

    /// The `traceparent` column's value.
    pub(crate) fn traceparent_column(&self) -> Option<&str> {
        self.traceparent.as_ref().map(TraceParent::as_str)
    }

    /// The job kind.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The queue the job goes to.
    pub fn queue_name(&self) -> &str {
        &self.queue
    }

    /// The attempt limit.
    pub fn max_attempts_limit(&self) -> i32 {
        self.max_attempts
    }

    /// The priority.
    pub fn priority_value(&self) -> i16 {
        self.priority
    }

    pub(crate) fn validate(&self) -> Result<()> {
        check_len("job kind", &self.kind, 255)?;
        check_delivery(&self.queue, self.max_attempts)?;
        if let Some(key) = &self.unique_key {
            check_len("unique key", key, MAX_UNIQUE_KEY_LEN)?;
        }
        if let Some(key) = &self.flow_key {
            check_len("concurrency key", key, MAX_UNIQUE_KEY_LEN)?;
        }
        if self.flow_limit == Some(0) {
            return Err(Error::InvalidInput("a concurrency limit must be at least 1, got 0".into()));
        }
        Ok(())
    }
}

/// Refuse `value` unless it is 1 to `max` bytes long (the schema's domains say the same).
pub(crate) fn check_len(what: &str, value: &str, max: usize) -> Result<()> {
    if value.is_empty() || value.len() > max {
        return Err(Error::InvalidInput(format!("{what} must be 1..={max} bytes, got {}", value.len())));
    }
    Ok(())
}

/// Refuse a queue name or an attempt limit the jobs table would not take.
pub(crate) fn check_delivery(queue: &str, max_attempts: i32) -> Result<()> {
    check_len("queue name", queue, 128)?;
    if max_attempts < 1 {
        return Err(Error::InvalidInput(format!("max_attempts must be at least 1, got {max_attempts}")));
    }
    Ok(())
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// Its id.
    pub id: JobId,
    /// Its kind.
    pub kind: String,
    /// Its queue.
    pub queue: String,
    /// Its JSON arguments.
    pub args: serde_json::Value,
    /// Higher runs first.
    pub priority: i16,
    /// Its state.
    pub state: JobState,
    /// Claims so far (the fencing token of the current claim while running). Claims given back
    /// (snoozes, releases) are included; [`Job::counted_attempts`] leaves them out.
    pub attempt: i32,
    /// Attempts allowed: claims that count (`attempt - snoozes`) up to this many.
    pub max_attempts: i32,
    /// Claims that ended in a snooze, a release or a lone lease expiry: given back, they do not
    /// count against `max_attempts`.
    pub snoozes: i32,
    /// Not claimed before this time.
    pub run_at: DateTime<Utc>,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
    /// When it was last claimed.
    pub attempted_at: Option<DateTime<Utc>>,
    /// When it reached a finished state.
    pub finished_at: Option<DateTime<Utc>>,
    /// While running: when the current claim's lease runs out unless extended.
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// While running: the worker holding the lease.
    pub worker_id: Option<String>,
    /// Its unique key, if any.
    pub unique_key: Option<String>,
    /// Every failed attempt, oldest first.
    pub errors: Vec<AttemptError>,
    /// The W3C `traceparent` of the span that enqueued it, if one was stored (see [`crate::trace`]).
    pub traceparent: Option<TraceParent>,
}

impl Job {
    /// Attempts that counted against `max_attempts`: claims less those given back (`snoozes`).
    pub fn counted_attempts(&self) -> i32 {
        self.attempt - self.snoozes
    }

    /// Deserialize the arguments into `A`.
    pub fn args<A: JobArgs>(&self) -> Result<A> {
        serde_json::from_value(self.args.clone())
            .map_err(|source| Error::InvalidArgs { kind: self.kind.clone(), source })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct JobRow {
    id: i64,
    kind: String,
    queue: String,
    args: serde_json::Value,
    priority: i16,
    state: String,
    attempt: i32,
    max_attempts: i32,
    snoozes: i32,
    run_at: DateTime<Utc>,
    created_at: DateTime<Utc>,
    attempted_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    lease_expires_at: Option<DateTime<Utc>>,
    worker_id: Option<String>,
    unique_key: Option<String>,
    errors: sqlx::types::Json<Vec<AttemptError>>,
    traceparent: Option<String>,
}

impl TryFrom<JobRow> for Job {
    type Error = Error;
    fn try_from(r: JobRow) -> Result<Job> {
        Ok(Job {
            id: JobId(r.id),
            kind: r.kind,
            queue: r.queue,
            args: r.args,
            priority: r.priority,
            state: r.state.parse()?,
            attempt: r.attempt,
            max_attempts: r.max_attempts,
            snoozes: r.snoozes,
            run_at: r.run_at,
            created_at: r.created_at,
            attempted_at: r.attempted_at,
            finished_at: r.finished_at,
            lease_expires_at: r.lease_expires_at,
            worker_id: r.worker_id,
            unique_key: r.unique_key,
            errors: r.errors.0,
            traceparent: TraceParent::from_column(r.traceparent),
        })
    }
}

pub(crate) fn rows_to_jobs(rows: Vec<JobRow>) -> Result<Vec<Job>> {
    rows.into_iter().map(Job::try_from).collect()
}
