//! Handlers: what runs a job of a kind, what it may answer, and what it is told.

use std::error::Error as StdError;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use oncely_core::step::{BoxError, Step, StepScope};
use oncely_core::{Claim, InsertOpts, JobArgs, JobId, StepError};
use tokio_util::sync::CancellationToken;

use crate::worker::AttemptFlags;

/// How a handler ends an attempt other than by success.
///
/// `?` turns any error into an `Outcome`: a standard error, oncely's own [`BoxError`], an
/// `anyhow::Error`, a `String`. The error's whole source chain (and anyhow's context chain) is
/// read, so oncely's own errors keep their meaning however deeply the handler wrapped them:
///
/// - a [`StepError::Busy`] (a step held by another job) snoozes until that job's claim ends;
/// - a [`StepError::OutcomeUnknown`] (parked for a person), [`StepError::DuplicateKey`] or
///   [`StepError::Mismatch`] fails the job: retrying cannot help;
/// - a lost database connection (`sqlx` I/O, pool timeout or closed, protocol error, a server
///   shutting down) is [`Outcome::Interrupted`]: the job runs again and the attempt does not count;
/// - anything else is [`Outcome::Retry`] with the backoff delay, and its message is the chain's.
///
/// To say it explicitly instead, use [`ResultExt`]: `.retryable()?`, `.fatal()?`, `.snooze(d)?`.
///
/// With anyhow, enable this crate's `anyhow` feature: then an oncely error returned straight
/// through `anyhow::Error` (without context) is still recognised. Without it `?` on anyhow still
/// compiles and contexts are still read, but an unwrapped anyhow error is a plain retry.
///
/// # Example
///
/// ```
/// use oncely_worker::Outcome;
/// use std::time::Duration;
///
/// fn decide(status: u16) -> Result<(), Outcome> {
///     match status {
///         200 => Ok(()),
///         404 => Err(Outcome::fail("the resource is gone; retrying will not help")),
///         429 => Err(Outcome::snooze(Duration::from_secs(60))),
///         _ => Err(Outcome::retry(format!("upstream answered {status}"))),
///     }
/// }
/// # assert!(decide(200).is_ok());
/// assert_eq!(decide(404).unwrap_err().to_string(), "fail: the resource is gone; retrying will not help");
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Outcome {
    /// A failed attempt: retry after the backoff delay (or `after`, when given) unless out of
    /// attempts, in which case the job goes to the dead letter.
    Retry {
        /// The error, kept in the job's history.
        error: String,
        /// Overrides the backoff delay.
        after: Option<Duration>,
    },
    /// Fail permanently now: the job goes to the dead letter with its error history.
    Fail(String),
    /// Run again after this delay; the attempt does not count.
    Snooze(Duration),
    /// Stop for good: the job is cancelled.
    Cancel(String),
    /// The attempt was cut short by a lost database connection, not by the job: run again after
    /// the backoff delay; the attempt does not count, and the error goes to the job's history as
    /// `interrupted`. `?` gives it for connection-level database errors.
    Interrupted(String),
}

impl Outcome {
    /// [`Outcome::Retry`] with the backoff delay.
    pub fn retry(error: impl fmt::Display) -> Self {
        Outcome::Retry { error: error.to_string(), after: None }
    }
    /// [`Outcome::Retry`] after `delay`.
    pub fn retry_after(error: impl fmt::Display, delay: Duration) -> Self {
        Outcome::Retry { error: error.to_string(), after: Some(delay) }
    }
    /// [`Outcome::Fail`].
    pub fn fail(error: impl fmt::Display) -> Self {
        Outcome::Fail(error.to_string())
    }
    /// [`Outcome::Snooze`].
    pub fn snooze(delay: Duration) -> Self {
        Outcome::Snooze(delay)
    }
    /// [`Outcome::Cancel`].
    pub fn cancel(reason: impl fmt::Display) -> Self {
        Outcome::Cancel(reason.to_string())
    }

    /// Classify an error by its source chain, outermost first (see the type's docs).
    fn classify<'a>(chain: impl Iterator<Item = &'a (dyn StdError + 'static)>, message: String) -> Self {
        for e in chain {
            if let Some(outcome) = e.downcast_ref::<crate::flow::FlowError>().and_then(|f| f.outcome()) {
                return outcome;
            }
            if let Some(cancelled) = e.downcast_ref::<crate::flow::RunCancelled>() {
                return Outcome::Cancel(cancelled.reason.clone());
            }
            if let Some(step) = e.downcast_ref::<StepError>() {
                match step {
                    StepError::OutcomeUnknown { .. } | StepError::DuplicateKey(_) | StepError::Mismatch { .. } => {
                        return Outcome::Fail(message)
                    }
                    StepError::Busy { retry_after, .. } => return Outcome::Snooze((*retry_after).max(MIN_BUSY_SNOOZE)),
                    _ => {}
                }
            }
            if is_connection_error(e) {
                return Outcome::Interrupted(message);
            }
        }
        Outcome::Retry { error: message, after: None }
    }
}

/// The shortest snooze for a step busy in another job.
const MIN_BUSY_SNOOZE: Duration = Duration::from_millis(100);

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Retry { error, after: None } => write!(f, "retry: {error}"),
            Outcome::Retry { error, after: Some(d) } => write!(f, "retry after {d:?}: {error}"),
            Outcome::Fail(error) => write!(f, "fail: {error}"),
            Outcome::Snooze(d) => write!(f, "snooze for {d:?}"),
            Outcome::Cancel(reason) => write!(f, "cancel: {reason}"),
            Outcome::Interrupted(error) => write!(f, "interrupted (not counted): {error}"),
        }
    }
}

/// True for an error that says the database connection was lost or could not be had, rather than
/// that the statement was wrong: the same statement may succeed once the database is back.
fn is_connection_error(e: &(dyn StdError + 'static)) -> bool {
    let Some(e) = e.downcast_ref::<sqlx::Error>() else { return false };
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        // Class 08 (connection exception); 57P01..57P03: the server is shutting down or starting.
        sqlx::Error::Database(db) => {
            db.code().is_some_and(|c| c.starts_with("08") || matches!(&*c, "57P01" | "57P02" | "57P03"))
        }
        _ => false,
    }
}

/// The error's message followed by each source's that it does not already include.
fn chain_message<'a>(mut chain: impl Iterator<Item = &'a (dyn StdError + 'static)>) -> String {
    let mut message = chain.next().map(|e| e.to_string()).unwrap_or_default();
    for e in chain {
        let part = e.to_string();
        if !message.contains(&part) {
            message.push_str(": ");
            message.push_str(&part);
        }
    }
    message
}

/// Any error, boxed or not, anyhow's included: classified by its source chain (see [`Outcome`]).
impl<E> From<E> for Outcome
where
    E: Into<BoxError> + 'static,
{
    fn from(e: E) -> Self {
        #[cfg(feature = "anyhow")]
        if let Some(e) = (&e as &dyn std::any::Any).downcast_ref::<anyhow::Error>() {
            return Outcome::classify(e.chain(), format!("{e:#}"));
        }
        let boxed: BoxError = e.into();
        let top: &(dyn StdError + 'static) = &*boxed;
        let chain = || std::iter::successors(Some(top), source_of);
        Outcome::classify(chain(), chain_message(chain()))
    }
}

/// The next error of a source chain.
fn source_of<'a>(e: &&'a (dyn StdError + 'static)) -> Option<&'a (dyn StdError + 'static)> {
    (*e).source()
}

/// Say what an error means for the job, explicitly, instead of letting `?` classify it.
///
/// ```
/// use oncely_worker::{HandlerResult, ResultExt};
/// use std::time::Duration;
///
/// fn parse(input: &str) -> HandlerResult {
///     let n: u32 = input.parse().fatal()?; // bad input: retrying will not help
///     let _ = std::fs::read_to_string(format!("/tmp/{n}")).snooze(Duration::from_secs(5))?;
///     Ok(())
/// }
/// assert_eq!(parse("x").unwrap_err().to_string(), "fail: invalid digit found in string");
/// ```
pub trait ResultExt<T> {
    /// On error, [`Outcome::Retry`] with the backoff delay: the attempt counts.
    fn retryable(self) -> Result<T, Outcome>;
    /// On error, [`Outcome::Fail`]: the job goes to the dead letter now.
    fn fatal(self) -> Result<T, Outcome>;
    /// On error, [`Outcome::Snooze`]: run again after `delay`; the attempt does not count.
    fn snooze(self, delay: Duration) -> Result<T, Outcome>;
}

/// The message is the error's alternate form (`{:#}`), which for anyhow includes its contexts.
impl<T, E: fmt::Display> ResultExt<T> for Result<T, E> {
    fn retryable(self) -> Result<T, Outcome> {
        self.map_err(|e| Outcome::retry(format_args!("{e:#}")))
    }
    fn fatal(self) -> Result<T, Outcome> {
        self.map_err(|e| Outcome::fail(format_args!("{e:#}")))
    }
    fn snooze(self, delay: Duration) -> Result<T, Outcome> {
        if let Err(e) = &self {
            tracing::debug!(error = %format_args!("{e:#}"), ?delay, "snoozing on error");
        }
        self.map_err(|_| Outcome::snooze(delay))
    }
}

/// What a handler returns.
pub type HandlerResult = Result<(), Outcome>;

/// What a handler is told about the job it runs.
#[derive(Debug, Clone)]
pub struct JobContext {
    pub(crate) inner: Arc<ContextInner>,
}

#[derive(Debug)]
pub(crate) struct ContextInner {
    pub(crate) id: JobId,
    pub(crate) kind: String,
    pub(crate) queue: String,
    pub(crate) attempt: i32,
    pub(crate) max_attempts: i32,
    pub(crate) snoozes: i32,
    pub(crate) pool: sqlx::PgPool,
    pub(crate) cancel: CancellationToken,
    pub(crate) steps: StepScope,
    pub(crate) flags: Arc<AttemptFlags>,
    /// The job's arguments (a run's trigger, for `wait_for_event`'s match).
    pub(crate) args: serde_json::Value,
    /// The check before every step (a run's cancellation by an event), if any.
    pub(crate) guard: GuardSlot,
    /// The enqueuing span's W3C trace context, if stored with the job.
    pub(crate) traceparent: Option<oncely_core::trace::TraceParent>,
}

/// A step guard, debuggable.
#[derive(Clone, Default)]
pub(crate) struct GuardSlot(pub(crate) Option<oncely_core::step::StepGuard>);

impl fmt::Debug for GuardSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() { "GuardSlot(Some(..))" } else { "GuardSlot(None)" })
    }
}

impl JobContext {
    /// The job's id.
    pub fn id(&self) -> JobId {
        self.inner.id
    }
    /// The job's kind.
    pub fn kind(&self) -> &str {
        &self.inner.kind
    }
    /// The job's queue.
    pub fn queue(&self) -> &str {
        &self.inner.queue
    }
    /// The W3C `traceparent` of the span that enqueued the job, if one was stored with it (see
    /// `oncely_core::trace`): to pass on to another system, e.g. as the `traceparent` header of an
    /// HTTP call. The job's span already continues this trace with the feature `otel`.
    pub fn traceparent(&self) -> Option<&oncely_core::trace::TraceParent> {
        self.inner.traceparent.as_ref()
    }
    /// This attempt's number (1 for the first claim; snoozes and releases count here too): the
    /// claim's fencing token. [`JobContext::counted_attempt`] leaves out the claims given back.
    pub fn attempt(&self) -> i32 {
        self.inner.attempt
    }
    /// This attempt's number against the budget: claims so far, this one included, less those that
    /// were given back (snoozes, releases, lone lease expiries). When it reaches
    /// [`max_attempts`](JobContext::max_attempts), a failure of this attempt is the last.
    pub fn counted_attempt(&self) -> i32 {
        self.inner.attempt - self.inner.snoozes
    }
    /// Attempts allowed (counted as in [`JobContext::counted_attempt`]).
    pub fn max_attempts(&self) -> i32 {
        self.inner.max_attempts
    }
    /// This attempt's claim: the fencing token for writes that must only succeed while the worker
    /// still holds the job.
    pub fn claim(&self) -> Claim {
        Claim { id: self.inner.id, attempt: self.inner.attempt }
    }
    /// The worker's pool.
    pub fn pool(&self) -> &sqlx::PgPool {
        &self.inner.pool
    }
    /// Complete this job in `tx`, the handler's own transaction, so that the handler's effect and
    /// the job's completion commit together or not at all (River's `JobCompleteTx`).
    ///
    /// The write is fenced like every other state write (job id, this attempt, `state =
    /// 'running'`): when this attempt no longer holds the job it is refused with
    /// [`Error::LeaseLost`](oncely_core::Error::LeaseLost) and nothing changes — roll the
    /// transaction back. Once the transaction commits the job is completed: the worker does not
    /// complete it again, and the heartbeat does not report it as a lost lease. If the transaction
    /// rolls back instead, the job is still running under this attempt and the attempt counts as
    /// failed (retried after the backoff), whatever the handler returns: its effect did not happen.
    ///
    /// Commit soon after, then return: until the transaction ends it holds the job's row lock, and
    /// the job's lease is no longer extended.
    ///
    /// ```no_run
    /// # async fn example(ctx: oncely_worker::JobContext) -> oncely_worker::HandlerResult {
    /// let mut tx = oncely_core::txn::begin(ctx.pool()).await?;
    /// sqlx::query("UPDATE usage SET tokens = tokens + 1200 WHERE user_id = 7").execute(&mut *tx).await?;
    /// ctx.complete_in(&mut tx).await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn complete_in(&self, tx: &mut sqlx::PgConnection) -> Result<(), oncely_core::Error> {
        // The steps' deferred records commit with the completion.
        self.inner.steps.flush_deferred(&mut *tx).await?;
        oncely_core::lease::complete_job(&mut *tx, self.claim()).await?;
        // Before the commit: the heartbeat can only see the job completed once both are set.
        AttemptFlags::set(&self.inner.flags.finishing);
        AttemptFlags::set(&self.inner.flags.completed_in_tx);
        Ok(())
    }

    /// True once this worker no longer holds the job (lease lost, job cancelled by a person) or the
    /// worker is shutting down past its deadline. Long handlers should check it and stop: whatever
    /// they write to the job afterwards is refused, and a handler still running
    /// [`lease_lost_grace`](crate::WorkerConfig::lease_lost_grace) after its lease was lost is
    /// dropped where it stands.
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancel.is_cancelled()
    }
    /// Resolves when [`is_cancelled`](Self::is_cancelled) becomes true.
    pub async fn cancelled(&self) {
        self.inner.cancel.cancelled().await
    }

    /// A step of this job: memoized in the effect ledger under `job:{id}:{name}` (or the key given
    /// with [`Step::key`]). See [`oncely_core::step`] for its three forms and what each guarantees.
    ///
    /// ```no_run
    /// # async fn example(ctx: oncely_worker::JobContext) -> oncely_worker::HandlerResult {
    /// let n: u32 = ctx.step("compute").run(|| async { Ok::<_, std::io::Error>(42) }).await?;
    /// # Ok(()) }
    /// ```
    pub fn step(&self, name: impl Into<String>) -> Step<'_> {
        self.inner.steps.step(name)
    }
}

/// Runs jobs whose arguments are `A`. Register it with
/// [`WorkerBuilder::register`](crate::WorkerBuilder::register).
///
/// Delivery is at least once: an attempt may be cut short by a crash and run again, so code outside
/// steps must be safe to repeat.
///
/// # Example
///
/// ```
/// use oncely_core::JobArgs;
/// use oncely_worker::{Handler, HandlerResult, JobContext};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct SendEmail { to: String }
/// impl JobArgs for SendEmail { const KIND: &'static str = "send_email"; }
///
/// struct Mailer;
///
/// #[async_trait::async_trait]
/// impl Handler<SendEmail> for Mailer {
///     async fn handle(&self, ctx: JobContext, args: SendEmail) -> HandlerResult {
///         tracing::info!(job.id = %ctx.id(), to = %args.to, "sending");
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait Handler<A: JobArgs>: Send + Sync + 'static {
    /// Run one attempt.
    async fn handle(&self, ctx: JobContext, args: A) -> HandlerResult;

    /// This kind's per-attempt timeout; `None` uses the one the arguments declare
    /// (`InsertOpts::timeout`), else the worker's `job_timeout`.
    fn timeout(&self) -> Option<Duration> {
        None
    }
}

/// A handler made from an async closure; see [`handler_fn`].
pub struct FnHandler<A, F> {
    f: F,
    _args: PhantomData<fn() -> A>,
}

impl<A, F> fmt::Debug for FnHandler<A, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnHandler").field("args", &std::any::type_name::<A>()).finish_non_exhaustive()
    }
}

/// Make a [`Handler`] from an async closure.
///
/// ```
/// # use oncely_core::JobArgs;
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Serialize, Deserialize)] struct Ping;
/// # impl JobArgs for Ping { const KIND: &'static str = "ping"; }
/// let handler = oncely_worker::handler_fn(|_ctx, _args: Ping| async move { Ok(()) });
/// ```
pub fn handler_fn<A, F, Fut>(f: F) -> FnHandler<A, F>
where
    A: JobArgs,
    F: Fn(JobContext, A) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = HandlerResult> + Send + 'static,
{
    FnHandler { f, _args: PhantomData }
}

#[async_trait]
impl<A, F, Fut> Handler<A> for FnHandler<A, F>
where
    A: JobArgs,
    F: Fn(JobContext, A) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = HandlerResult> + Send + 'static,
{
    async fn handle(&self, ctx: JobContext, args: A) -> HandlerResult {
        (self.f)(ctx, args).await
    }
}

/// Why an erased call did not succeed.
#[derive(Debug)]
pub(crate) enum CallError {
    /// The JSON arguments did not deserialize.
    InvalidArgs(String),
    /// The handler's own outcome.
    Outcome(Outcome),
}

/// A handler with its argument type erased, for the registry.
pub(crate) trait ErasedHandler: Send + Sync + 'static {
    fn call(&self, ctx: JobContext, args: serde_json::Value) -> BoxFuture<'static, Result<(), CallError>>;
    /// The kind's per-attempt timeout: the handler's, else the one its arguments declare.
    fn timeout(&self) -> Option<Duration>;
    /// The kind's declared defaults.
    fn insert_opts(&self) -> InsertOpts;
    /// A function's cancellation rules (none for other kinds).
    fn cancel_rules(&self) -> &[oncely_core::function::CancelOn] {
        &[]
    }
}

pub(crate) struct Typed<A, H> {
    handler: Arc<H>,
    _args: PhantomData<fn() -> A>,
}

impl<A, H> Typed<A, H> {
    pub(crate) fn new(handler: H) -> Self {
        Typed { handler: Arc::new(handler), _args: PhantomData }
    }
}

impl<A: JobArgs, H: Handler<A>> ErasedHandler for Typed<A, H> {
    fn call(&self, ctx: JobContext, args: serde_json::Value) -> BoxFuture<'static, Result<(), CallError>> {
        let handler = self.handler.clone();
        Box::pin(async move {
            let args: A = serde_json::from_value(args).map_err(|e| {
                CallError::InvalidArgs(format!("arguments do not deserialize into kind `{}`: {e}", A::KIND))
            })?;
            handler.handle(ctx, args).await.map_err(CallError::Outcome)
        })
    }

    fn timeout(&self) -> Option<Duration> {
        self.handler.timeout().or(A::insert_opts().timeout)
    }

    fn insert_opts(&self) -> InsertOpts {
        A::insert_opts()
    }
}
