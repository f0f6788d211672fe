//! Handlers: what runs a job of a kind, what it may answer, and what it is told.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use oncely_core::step::{Step, StepScope};
use oncely_core::{Claim, JobArgs, JobId, StepError};
use tokio_util::sync::CancellationToken;

use crate::worker::AttemptFlags;

/// How a handler ends an attempt other than by success. `?` on any standard error gives
/// [`Outcome::Retry`].
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
}

/// Any error is a failed attempt to retry, except a [`StepError`] that says otherwise: a step
/// parked for a person fails the job; a step busy in another job snoozes until its lease ends.
impl<E: std::error::Error + Send + Sync + 'static> From<E> for Outcome {
    fn from(e: E) -> Self {
        match (&e as &dyn std::any::Any).downcast_ref::<StepError>() {
            Some(StepError::OutcomeUnknown { .. } | StepError::DuplicateKey(_) | StepError::Mismatch { .. }) => {
                Outcome::fail(e)
            }
            Some(StepError::Busy { retry_after, .. }) => {
                Outcome::snooze((*retry_after).max(Duration::from_millis(100)))
            }
            _ => Outcome::retry(e),
        }
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
    pub(crate) pool: sqlx::PgPool,
    pub(crate) cancel: CancellationToken,
    pub(crate) steps: StepScope,
    pub(crate) flags: Arc<AttemptFlags>,
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
    /// This attempt's number (1 for the first claim; snoozes and releases count here too).
    pub fn attempt(&self) -> i32 {
        self.inner.attempt
    }
    /// Attempts allowed.
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

    /// This kind's per-attempt timeout; `None` uses the worker's default.
    fn timeout(&self) -> Option<Duration> {
        None
    }
}

/// A handler made from an async closure; see [`handler_fn`].
pub struct FnHandler<A, F> {
    f: F,
    _args: PhantomData<fn() -> A>,
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
    fn timeout(&self) -> Option<Duration>;
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
        self.handler.timeout()
    }
}
