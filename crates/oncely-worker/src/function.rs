//! Functions on the worker: typed handlers for runs, the registration of their definitions, and
//! the scheduler service that turns cron ticks into runs.
//!
//! Register a function with [`WorkerBuilder::function`](crate::WorkerBuilder::function). At start
//! the worker stores its functions' subscriptions and schedules
//! ([`register_functions`](oncely_core::function::register_functions)), retrying until it succeeds;
//! call [`Worker::register_functions`](crate::Worker::register_functions) first when something must
//! be published right after the worker starts. Every worker runs the scheduler
//! ([`tick_due`](oncely_core::schedule::tick_due) every
//! [`scheduler_interval`](crate::WorkerConfig::scheduler_interval)): the schedule rows' locks, not a
//! leader, make one run per tick.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use oncely_core::function::{RunArgs, Trigger};
use oncely_core::InsertOpts;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::handler::{CallError, ErasedHandler, HandlerResult, JobContext};
use crate::worker::Shared;

/// The clock the scheduler reads (tests inject one that they move by hand).
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// Runs a function: given the run's context and its trigger, with an event's payload read as `T`.
///
/// Implemented by every `Fn(JobContext, Trigger<T>) -> impl Future<Output = HandlerResult>`.
/// Like any job, a run is delivered at least once; put effects in steps (`ctx.step(..)`).
///
/// # Example
///
/// ```
/// use oncely_core::function::{Function, Trigger};
/// use oncely_worker::{HandlerResult, JobContext, Worker};
///
/// #[derive(serde::Deserialize)]
/// struct ReportRequested { report_id: i64 }
///
/// async fn generate(ctx: JobContext, trigger: Trigger<ReportRequested>) -> HandlerResult {
///     let Trigger::Event(event) = trigger else { return Ok(()) };
///     let id = event.payload.report_id;
///     ctx.step("render").run(|| async move { Ok::<_, std::io::Error>(id) }).await?;
///     Ok(())
/// }
/// # fn build(pool: sqlx::PgPool) -> oncely_worker::Result<Worker> {
/// Worker::builder(pool).function(Function::new("generate-report").on_event("report.requested"), generate).queue("default", 4).build()
/// # }
/// ```
#[async_trait]
pub trait FunctionHandler<T>: Send + Sync + 'static {
    /// Run one attempt of a run.
    async fn handle(&self, ctx: JobContext, trigger: Trigger<T>) -> HandlerResult;
}

#[async_trait]
impl<T, F, Fut> FunctionHandler<T> for F
where
    T: Send + 'static,
    F: Fn(JobContext, Trigger<T>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = HandlerResult> + Send + 'static,
{
    async fn handle(&self, ctx: JobContext, trigger: Trigger<T>) -> HandlerResult {
        (self)(ctx, trigger).await
    }
}

pub(crate) struct Erased<T, H> {
    handler: Arc<H>,
    name: String,
    queue: String,
    cancel_rules: Arc<[oncely_core::function::CancelOn]>,
    _payload: PhantomData<fn() -> T>,
}

impl<T, H> Erased<T, H> {
    pub(crate) fn new(handler: H, function: &oncely_core::function::Function) -> Self {
        Erased {
            handler: Arc::new(handler),
            name: function.name().to_owned(),
            queue: function.queue_name().to_owned(),
            cancel_rules: function.cancel_rules().into(),
            _payload: PhantomData,
        }
    }
}

impl<T, H> ErasedHandler for Erased<T, H>
where
    T: DeserializeOwned + Send + 'static,
    H: FunctionHandler<T>,
{
    fn call(&self, ctx: JobContext, args: serde_json::Value) -> BoxFuture<'static, Result<(), CallError>> {
        let handler = self.handler.clone();
        let name = self.name.clone();
        let rules = self.cancel_rules.clone();
        Box::pin(async move {
            let run: RunArgs<T> = serde_json::from_value(args).map_err(|e| {
                CallError::InvalidArgs(format!("the trigger does not deserialize for function `{name}`: {e}"))
            })?;
            if !rules.is_empty() {
                crate::flow::register_cancels(&ctx, &rules).await.map_err(CallError::Outcome)?;
            }
            handler.handle(ctx, run.trigger).await.map_err(CallError::Outcome)
        })
    }

    fn timeout(&self) -> Option<Duration> {
        None
    }

    fn insert_opts(&self) -> InsertOpts {
        InsertOpts::new().queue(self.queue.clone())
    }

    fn cancel_rules(&self) -> &[oncely_core::function::CancelOn] {
        &self.cancel_rules
    }
}

/// Store the functions' definitions, retrying until it works or the worker stops.
pub(crate) async fn register(shared: Arc<Shared>, stop: CancellationToken) {
    if shared.functions.is_empty() {
        return;
    }
    let mut delay = Duration::from_millis(100);
    loop {
        match crate::worker::register_functions(&shared.pool, &shared.functions, &shared.clock).await {
            Ok(()) => return,
            Err(e) => tracing::warn!(error = %e, ?delay, "could not store the functions' definitions; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return,
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// The scheduler service: every interval, enqueue the runs of due cron ticks.
pub(crate) async fn run_scheduler(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(shared.config.scheduler_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        let now = shared.clock.as_ref().map(|c| c());
        match oncely_core::schedule::tick_due(&shared.pool, now).await {
            Ok(runs) if !runs.is_empty() => tracing::debug!(runs = runs.len(), "cron runs enqueued"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cron tick failed; trying again next interval"),
        }
    }
}
