//! Child runs: [`JobContext::invoke`] starts one job and returns its result durably;
//! [`JobContext::invoke_all`] fans out to many and fans in (every result, or the first failure).
//! A child stores its result with [`JobContext::set_output`].
//!
//! The children are enqueued in the transaction that records the invoke step, keyed by (parent
//! run, step name, index): a parent re-executed after a crash anywhere finds the same children
//! and starts none again. While they run, the parent is suspended like a sleep (no slot, no
//! connection, not an attempt); the last child to finish (or the first to fail, for
//! `invoke_all`) wakes it in the transaction that finishes the child. See
//! [`oncely_core::child`] for the protocol.
//!
//! ```no_run
//! # use oncely_core::JobArgs;
//! # use oncely_worker::{HandlerResult, JobContext};
//! # #[derive(serde::Serialize, serde::Deserialize)] struct Resize { image: u32 }
//! # impl JobArgs for Resize { const KIND: &'static str = "resize"; }
//! // The child: an ordinary job handler that stores its result.
//! async fn resize(ctx: JobContext, job: Resize) -> HandlerResult {
//!     let bytes: u64 = ctx.step("resize").run(|| async { Ok::<_, std::io::Error>(1024) }).await?;
//!     ctx.set_output(&bytes).await?;
//!     Ok(())
//! }
//! // The parent: one child, then a fan-out of ten with a fan-in.
//! async fn album(ctx: JobContext, _job: Resize) -> HandlerResult {
//!     let cover: u64 = ctx.invoke("cover", &Resize { image: 0 }).await?;
//!     let sizes: Vec<u64> = ctx.invoke_all("pages", (1..=10).map(|image| Resize { image })).await?;
//!     ctx.step("publish").run(|| async move { Ok::<_, std::io::Error>(cover + sizes.iter().sum::<u64>()) }).await?;
//!     Ok(())
//! }
//! ```

use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::time::Duration;

use chrono::Utc;
use oncely_core::child::{ChildRecord, ChildrenStatus};
use oncely_core::{JobArgs, JobId, NewJob};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::flow::FlowError;
use crate::handler::JobContext;
use crate::worker::AttemptFlags;

/// The longest a parent stays suspended on its children without looking at them again: a safety
/// net only, since the finishing child wakes it.
pub const CHILD_RECHECK: Duration = Duration::from_secs(3600);

/// A child run that is dead or was cancelled: what the parent's invoke returns.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("child run {child} ({kind}) of step `{step}` #{index} is {state}: {error}")]
pub struct ChildFailure {
    /// The parent's invoke step.
    pub step: String,
    /// The child's index in the step.
    pub index: i32,
    /// The child's job id.
    pub child: JobId,
    /// Its kind.
    pub kind: String,
    /// `dead` or `cancelled`.
    pub state: String,
    /// Its last error.
    pub error: String,
}

impl From<ChildRecord> for ChildFailure {
    fn from(c: ChildRecord) -> Self {
        ChildFailure {
            error: c.error.unwrap_or_else(|| c.state.clone()),
            step: c.step,
            index: c.index,
            child: c.child,
            kind: c.kind,
            state: c.state,
        }
    }
}

fn output<R: DeserializeOwned>(c: &ChildRecord) -> Result<R, FlowError> {
    serde_json::from_value(c.output.clone().unwrap_or(serde_json::Value::Null)).map_err(|e| FlowError::ChildOutput {
        step: c.step.clone(),
        child: c.child,
        error: e.to_string(),
    })
}

fn new_jobs<A: JobArgs>(jobs: impl IntoIterator<Item = A>) -> Result<Vec<NewJob>, oncely_core::Error> {
    jobs.into_iter().map(|a| NewJob::new(&a)).collect()
}

/// A fan-out being configured ([`JobContext::invoke_all`]); `.await` it for every result, or
/// the first failure.
#[must_use = "a fan-out does nothing until awaited"]
#[derive(Debug)]
pub struct InvokeAll<'a, R> {
    ctx: &'a JobContext,
    name: String,
    jobs: Result<Vec<NewJob>, oncely_core::Error>,
    _result: PhantomData<fn() -> R>,
}

impl<'a, R> InvokeAll<'a, R> {
    /// Wait for every child, failed or not, and return each one's result (the parent is woken
    /// once, when the last child finishes).
    pub fn all_settled(self) -> InvokeAllSettled<'a, R> {
        InvokeAllSettled { inner: self }
    }
}

impl<'a, R: DeserializeOwned + Send + 'a> IntoFuture for InvokeAll<'a, R> {
    type Output = Result<Vec<R>, FlowError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let children = self.ctx.fan_out(self.name, self.jobs?, true).await?;
            children.iter().map(output).collect()
        })
    }
}

/// A fan-out that waits for every child ([`InvokeAll::all_settled`]); `.await` it.
#[must_use = "a fan-out does nothing until awaited"]
#[derive(Debug)]
pub struct InvokeAllSettled<'a, R> {
    inner: InvokeAll<'a, R>,
}

impl<'a, R: DeserializeOwned + Send + 'a> IntoFuture for InvokeAllSettled<'a, R> {
    /// Per child, by index: its output, or why it failed.
    type Output = Result<Vec<Result<R, ChildFailure>>, FlowError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        let inner = self.inner;
        Box::pin(async move {
            let children = inner.ctx.fan_out(inner.name, inner.jobs?, false).await?;
            children
                .into_iter()
                .map(|c| match c.failed() {
                    true => Ok(Err(ChildFailure::from(c))),
                    false => output(&c).map(Ok),
                })
                .collect()
        })
    }
}

impl JobContext {
    /// Start `job` as a child run and return its result (what its handler stored with
    /// [`set_output`](Self::set_output), read as `R`) once it completed. The child is enqueued
    /// with the step `name`'s record, once for this run whatever crashes; until it finishes the
    /// call returns [`FlowError::Suspended`] and `?` suspends this run (no slot, not an attempt)
    /// until the child's completion wakes it. A dead or cancelled child gives
    /// [`FlowError::ChildFailed`] (which `?` turns into this run's failure).
    pub async fn invoke<A, R>(&self, name: impl Into<String>, job: &A) -> Result<R, FlowError>
    where
        A: JobArgs,
        R: DeserializeOwned,
    {
        let job = NewJob::new(job)?;
        let children = self.fan_out(name.into(), vec![job], true).await?;
        output(&children[0])
    }

    /// Fan out: start every job of `jobs` as a child run of the step `name` (indexed in order),
    /// then fan in. Awaited as is, it returns every child's result in order, or the first
    /// failure as soon as a child is dead or cancelled (the others keep running);
    /// [`all_settled`](InvokeAll::all_settled) waits for all and returns each one's result or
    /// failure. Same guarantees as [`invoke`](Self::invoke): no child is started twice.
    pub fn invoke_all<A, R>(&self, name: impl Into<String>, jobs: impl IntoIterator<Item = A>) -> InvokeAll<'_, R>
    where
        A: JobArgs,
    {
        InvokeAll { ctx: self, name: name.into(), jobs: new_jobs(jobs), _result: PhantomData }
    }

    /// Store this job's result, for the parent run that invoked it: the value stored by the last
    /// attempt before the job completed is the result. Fenced (refused once this attempt no longer
    /// holds the job). A job that is not a child run stores nothing.
    pub async fn set_output<T: Serialize + ?Sized>(&self, output: &T) -> Result<(), FlowError> {
        let value = serde_json::to_value(output)
            .map_err(|e| oncely_core::Error::InvalidInput(format!("the output does not serialize: {e}")))?;
        if !oncely_core::child::set_output(self.pool(), self.claim(), &value).await? {
            tracing::debug!(job.id = %self.id(), "not a child run: its output is not stored");
        }
        Ok(())
    }

    async fn fan_out(&self, name: String, jobs: Vec<NewJob>, fail_fast: bool) -> Result<Vec<ChildRecord>, FlowError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        // Before the step: bad input fails the run (`InvalidInput`) rather than retrying the step.
        oncely_core::child::check_children(&name, &jobs)?;
        let parent = self.id();
        let step = name.clone();
        let count = jobs.len();
        let _ids: Vec<JobId> = self
            .step(name.clone())
            .transactional(move |tx| {
                Box::pin(async move { oncely_core::child::start_children(tx, parent, &step, &jobs, fail_fast).await })
            })
            .await?;
        let flags = self.inner.flags.clone();
        let status = oncely_core::child::settle_children(
            self.pool(),
            self.claim(),
            &name,
            fail_fast,
            CHILD_RECHECK,
            move || {
                // The run's claim ends with this commit (see `wait_for_event`).
                AttemptFlags::set(&flags.finishing);
                AttemptFlags::set(&flags.suspended_in_tx);
            },
        )
        .await?;
        match status {
            ChildrenStatus::Done(children) => {
                if children.len() != count {
                    return Err(FlowError::Database(oncely_core::Error::InvalidInput(format!(
                        "step `{name}` of run {parent} recorded {} children; this attempt asks for {count}",
                        children.len()
                    ))));
                }
                Ok(children)
            }
            ChildrenStatus::Failed(child) => Err(FlowError::ChildFailed(child.into())),
            ChildrenStatus::Pending { open } => {
                tracing::debug!(step = %name, open, "run suspended until its children finish");
                Err(FlowError::Suspended { until: Utc::now() + CHILD_RECHECK, delay: CHILD_RECHECK })
            }
        }
    }
}
