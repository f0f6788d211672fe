//! Durable waits inside a run: [`JobContext::sleep`], [`JobContext::sleep_until`] and
//! [`JobContext::wait_for_event`], and the cancellation of runs by an event
//! ([`Function::cancel_on`](oncely_core::function::Function::cancel_on)).
//!
//! A run that must wait does not hold its worker slot, a connection or a task: the call returns
//! [`FlowError::Suspended`], which `?` turns into a snooze of the run until its wake time (not
//! counted as an attempt). When the run is claimed again, its handler runs from the top: completed
//! steps return their recorded outputs, the sleep finds its recorded wake time passed, the wait
//! finds its resolution, and the handler goes on past them.
//!
//! ```no_run
//! # use oncely_core::function::Trigger;
//! # use oncely_worker::{flow::EventMatch, HandlerResult, JobContext};
//! # use std::time::Duration;
//! async fn onboard(ctx: JobContext, trigger: Trigger) -> HandlerResult {
//!     ctx.step("welcome").run(|| async { Ok::<_, std::io::Error>(()) }).await?;
//!     ctx.sleep("three-days", Duration::from_secs(3 * 24 * 3600)).await?; // suspends the run
//!     let paid = ctx
//!         .wait_for_event("payment", "invoice.paid", EventMatch::field("user_id"), Duration::from_secs(86400))
//!         .await?;
//!     if paid.is_none() { /* timed out */ }
//!     Ok(())
//! }
//! ```

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::time::Duration;

use chrono::{DateTime, Utc};
use oncely_core::function::CancelOn;
use oncely_core::outbox::StoredEvent;
use oncely_core::step::{BoxError, StepGuard};
use oncely_core::wait::{WaitKind, WaitSpec, WaitStatus};
use oncely_core::{JobId, StepError};
use serde::{Deserialize, Serialize};

use crate::handler::{JobContext, Outcome};
use crate::worker::AttemptFlags;

/// Why a durable call did not return a value: the run must stop here for now (or for good).
///
/// `?` in a handler turns it into the right [`Outcome`]: `Suspended` into a snooze until the wake
/// time (not counted as an attempt), `Cancelled` into a cancellation, the others as errors are.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FlowError {
    /// The run is suspended until `until`: return at once (with `?`).
    #[error("run suspended until {until}")]
    Suspended {
        /// When it wakes (database clock).
        until: DateTime<Utc>,
        /// How long from now.
        delay: Duration,
    },
    /// The run was cancelled by an event ([`Function::cancel_on`](oncely_core::function::Function::cancel_on)).
    #[error("run cancelled: {0}")]
    Cancelled(String),
    /// A step failed (the sleep's or the wait's record).
    #[error("{0}")]
    Step(#[source] StepError),
    /// The database failed, or the request was invalid.
    #[error("{0}")]
    Database(#[source] oncely_core::Error),
    /// A child run ([`JobContext::invoke`], [`JobContext::invoke_all`]) is dead or was cancelled.
    /// `?` fails the parent for good (retrying cannot revive the child).
    #[error("{0}")]
    ChildFailed(#[source] crate::child::ChildFailure),
    /// A child run's output does not deserialize into the type asked for. `?` fails the parent.
    #[error("child run {child} of step `{step}`: its output does not deserialize: {error}")]
    ChildOutput {
        /// The invoke step.
        step: String,
        /// The child's job id.
        child: JobId,
        /// The deserialization error.
        error: String,
    },
}

impl From<StepError> for FlowError {
    fn from(e: StepError) -> Self {
        FlowError::Step(e)
    }
}

impl From<oncely_core::Error> for FlowError {
    fn from(e: oncely_core::Error) -> Self {
        FlowError::Database(e)
    }
}

impl FlowError {
    /// The outcome it stands for, when it is not an ordinary error.
    pub(crate) fn outcome(&self) -> Option<Outcome> {
        match self {
            FlowError::Suspended { delay, .. } => Some(Outcome::Snooze(*delay)),
            FlowError::Cancelled(reason) => Some(Outcome::Cancel(reason.clone())),
            FlowError::Database(oncely_core::Error::InvalidInput(m)) => Some(Outcome::Fail(m.clone())),
            FlowError::ChildFailed(_) | FlowError::ChildOutput { .. } => Some(Outcome::Fail(self.to_string())),
            _ => None,
        }
    }
}

/// The error a step's guard returns once its run was cancelled by an event: the step does not
/// run, and `?` cancels the run.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct RunCancelled {
    /// Why (which event).
    pub reason: String,
}

/// What a sleep records: its wake time, fixed by the first attempt that reached it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SleepRecord {
    sleep_until: DateTime<Utc>,
}

/// Which events a [`wait_for_event`](JobContext::wait_for_event) accepts: a field of the awaited
/// event's payload must equal a field of this run's trigger (or a given value).
#[derive(Debug, Clone, PartialEq)]
pub struct EventMatch {
    event_field: String,
    source: MatchSource,
}

#[derive(Debug, Clone, PartialEq)]
enum MatchSource {
    Trigger(String),
    Value(serde_json::Value),
}

impl EventMatch {
    /// The awaited event's payload field `field` (dotted path) equals the same field of the run's
    /// trigger event payload: `EventMatch::field("order_id")`.
    pub fn field(field: impl Into<String>) -> Self {
        let field = field.into();
        EventMatch { event_field: field.clone(), source: MatchSource::Trigger(field) }
    }

    /// The awaited event's `event_field` equals the trigger's `trigger_field`.
    pub fn fields(event_field: impl Into<String>, trigger_field: impl Into<String>) -> Self {
        EventMatch { event_field: event_field.into(), source: MatchSource::Trigger(trigger_field.into()) }
    }

    /// The awaited event's `event_field` equals `value` (compared as text: `7` and `"7"` match).
    pub fn value(event_field: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        EventMatch { event_field: event_field.into(), source: MatchSource::Value(value.into()) }
    }
}

fn path(field: &str) -> Vec<String> {
    field.split('.').map(str::to_owned).collect()
}

/// The value at the dotted `field` of the run's trigger event payload.
fn trigger_value(args: &serde_json::Value, field: &str) -> Option<String> {
    let mut v = args.pointer("/trigger/event/payload")?;
    for part in field.split('.') {
        v = v.get(part)?;
    }
    oncely_core::wait::match_text(v)
}

/// A [`wait_for_event`](JobContext::wait_for_event) being configured; `.await` it.
#[must_use = "a wait does nothing until awaited"]
#[derive(Debug)]
pub struct WaitForEvent<'a> {
    ctx: &'a JobContext,
    name: String,
    topic: String,
    matching: EventMatch,
    timeout: Duration,
    look_back: Duration,
}

impl WaitForEvent<'_> {
    /// Also accept matching events published up to `look_back` before the wait was first
    /// registered (default: none, only events committed after the registration, or published
    /// after the registering transaction began).
    pub fn look_back(mut self, look_back: Duration) -> Self {
        self.look_back = look_back;
        self
    }

    async fn run(self) -> Result<Option<StoredEvent>, FlowError> {
        let ctx = self.ctx;
        let value = match &self.matching.source {
            MatchSource::Value(v) => oncely_core::wait::match_text(v),
            MatchSource::Trigger(field) => trigger_value(&ctx.inner.args, field),
        }
        .ok_or_else(|| {
            oncely_core::Error::InvalidInput(format!(
                "wait `{}`: no value to match on {:?} (the run's trigger has no such field, or it is null)",
                self.name, self.matching
            ))
        })?;
        let spec = WaitSpec {
            step: self.name,
            kind: WaitKind::Event,
            topic: self.topic,
            path: path(&self.matching.event_field),
            value,
            look_back: self.look_back,
            timeout: Some(self.timeout),
        };
        if let Some(guard) = ctx.guard() {
            guard().await.map_err(|e| FlowError::Cancelled(e.to_string()))?;
        }
        // The registration may suspend the run in its own transaction: the steps' deferred records
        // must be written first, or a resumed run would find them missing.
        ctx.inner.steps.flush_deferred(oncely_core::pooler::db(ctx.pool())).await?;
        let flags = ctx.inner.flags.clone();
        let status = oncely_core::wait::wait_for_event(ctx.pool(), ctx.claim(), &spec, move || {
            // The run's claim ends with this commit: the heartbeat must not take it for a lost lease,
            // and the executor must not write the outcome again.
            AttemptFlags::set(&flags.finishing);
            AttemptFlags::set(&flags.suspended_in_tx);
        })
        .await?;
        match status {
            WaitStatus::Matched(event) => Ok(Some(event)),
            WaitStatus::TimedOut => Ok(None),
            WaitStatus::Pending { until } => {
                let until = until.unwrap_or_else(Utc::now);
                let delay = (until - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                tracing::debug!(step = %spec.step, %until, "run suspended waiting for an event");
                Err(FlowError::Suspended { until, delay })
            }
        }
    }
}

impl<'a> IntoFuture for WaitForEvent<'a> {
    type Output = Result<Option<StoredEvent>, FlowError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}

impl JobContext {
    /// Sleep durably for `duration`: the first attempt to reach this call records the wake time
    /// (database clock) as the step `name`; until then the call returns
    /// [`FlowError::Suspended`], and `?` suspends the run (a snooze: no slot, no connection, not an
    /// attempt). Any worker resumes it after the wake time; completed steps replay.
    pub async fn sleep(&self, name: impl Into<String>, duration: Duration) -> Result<(), FlowError> {
        let secs = duration.as_secs_f64();
        let record: SleepRecord = self
            .step(name)
            .transactional(move |tx| {
                Box::pin(async move {
                    let until: DateTime<Utc> = sqlx::query_scalar("SELECT now() + make_interval(secs => $1)")
                        .persistent(oncely_core::pooler::persistent())
                        .bind(secs)
                        .fetch_one(&mut *tx)
                        .await?;
                    Ok::<_, sqlx::Error>(SleepRecord { sleep_until: until })
                })
            })
            .await?;
        self.suspend_until(record.sleep_until).await
    }

    /// Sleep durably until `until` (see [`sleep`](Self::sleep)).
    pub async fn sleep_until(&self, name: impl Into<String>, until: DateTime<Utc>) -> Result<(), FlowError> {
        let record: SleepRecord = self
            .step(name)
            .transactional(move |_tx| Box::pin(async move { Ok::<_, sqlx::Error>(SleepRecord { sleep_until: until }) }))
            .await?;
        self.suspend_until(record.sleep_until).await
    }

    async fn suspend_until(&self, until: DateTime<Utc>) -> Result<(), FlowError> {
        let left: f64 = sqlx::query_scalar("SELECT extract(epoch FROM $1 - clock_timestamp())::float8")
            .persistent(oncely_core::pooler::persistent())
            .bind(until)
            .fetch_one(oncely_core::pooler::db(self.pool()))
            .await
            .map_err(oncely_core::Error::from)?;
        if left <= 0.0 {
            return Ok(());
        }
        Err(FlowError::Suspended { until, delay: Duration::from_secs_f64(left) })
    }

    /// Wait durably for an event on `topic` matching `matching`, for at most `timeout` from the
    /// first registration: `Some(event)`, or `None` once the deadline passed. While waiting the run
    /// is suspended (the call returns [`FlowError::Suspended`]; `?` returns it) and holds nothing;
    /// a matching publish wakes it. See [`oncely_core::wait`] for which events count and why one
    /// committed concurrently with the registration is neither lost nor delivered twice.
    pub fn wait_for_event(
        &self,
        name: impl Into<String>,
        topic: impl Into<String>,
        matching: EventMatch,
        timeout: Duration,
    ) -> WaitForEvent<'_> {
        WaitForEvent { ctx: self, name: name.into(), topic: topic.into(), matching, timeout, look_back: Duration::ZERO }
    }

    fn guard(&self) -> Option<&StepGuard> {
        self.inner.guard.0.as_ref()
    }
}

/// The guard of a run of a function with cancellation rules: a step finds the run cancelled.
pub(crate) fn cancel_guard(pool: sqlx::PgPool, run: JobId) -> StepGuard {
    std::sync::Arc::new(move || {
        let pool = pool.clone();
        Box::pin(async move {
            match oncely_core::wait::cancellation(&pool, run).await? {
                Some((event, topic)) => Err(Box::new(RunCancelled {
                    reason: format!("cancelled by event {event} on topic {topic} (cancel_on)"),
                }) as BoxError),
                None => Ok(()),
            }
        })
    })
}

/// Register a starting run's cancellation rules; `Err` with the reason when a matching event was
/// published since the run was created.
pub(crate) async fn register_cancels(ctx: &JobContext, rules: &[CancelOn]) -> Result<(), Outcome> {
    for rule in rules {
        let Some(value) = trigger_value(&ctx.inner.args, &rule.trigger_field) else {
            tracing::debug!(topic = %rule.topic, field = %rule.trigger_field, "the trigger has no such field: no cancellation to register");
            continue;
        };
        let spec = WaitSpec {
            step: format!("cancel_on:{}:{}", rule.topic, rule.event_field),
            kind: WaitKind::Cancel,
            topic: rule.topic.clone(),
            path: path(&rule.event_field),
            value,
            look_back: Duration::ZERO,
            timeout: None,
        };
        match oncely_core::wait::register_cancel(ctx.pool(), ctx.claim(), &spec).await? {
            WaitStatus::Matched(event) => {
                return Err(Outcome::Cancel(format!(
                    "cancelled by event {} on topic {} (cancel_on)",
                    event.id, event.topic
                )))
            }
            WaitStatus::TimedOut | WaitStatus::Pending { .. } => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_values_read_dotted_paths_as_text() {
        let args =
            serde_json::json!({"trigger": {"event": {"payload": {"order_id": 7, "user": {"id": "u1"}, "n": null}}}});
        assert_eq!(trigger_value(&args, "order_id").as_deref(), Some("7"));
        assert_eq!(trigger_value(&args, "user.id").as_deref(), Some("u1"));
        assert_eq!(trigger_value(&args, "n"), None);
        assert_eq!(trigger_value(&args, "missing"), None);
        assert_eq!(path("a.b"), vec!["a".to_owned(), "b".to_owned()]);
    }
}
