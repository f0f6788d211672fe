//! The executor: runs one claimed job's handler under its timeout, catches panics, and records
//! the outcome with a fenced write (completions go to the batching completer).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use futures::FutureExt;
use oncely_core::step::{DeferredRecords, InjectedCrash, StepScope};
use oncely_core::{Claim, ErrorKind, Job, JobState};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::completer::CompleterMsg;
use crate::handler::{CallError, ContextInner, JobContext, Outcome};
use crate::worker::{AttemptFlags, RunningJob, Shared, WorkerStats};

/// What the attempt came to, before it is written.
enum Finish {
    Complete,
    Failed {
        kind: ErrorKind,
        message: String,
        retry_in: Option<Duration>,
    },
    Snooze(Duration),
    /// Cut short by a lost database connection: given back after the delay, not counted.
    Interrupted(String, Duration),
    Cancel(String),
    /// Given back without counting an attempt: at shutdown, or claimed ahead and never started.
    Release(&'static str),
    /// A crash injected at a step boundary: write nothing, stop heartbeating, let the lease expire.
    Crash,
    /// The lease was lost and the handler kept running past the grace period: it was dropped.
    /// Nothing to write: the job is no longer this attempt's.
    Abandoned,
    /// The handler completed the job in its own transaction, which committed: nothing to write.
    CompletedInTx,
    /// Whether the handler's own completing transaction committed could not be read back: write
    /// nothing; the lease expires and the job runs again unless it was completed.
    Unsettled,
    /// The handler suspended the run in its own transaction (`wait_for_event`), which committed:
    /// nothing to write; it runs again after the delay or when an event wakes it.
    SuspendedInTx(Duration),
}

/// With prefetch (`WorkerConfig::prefetch`): a claimed job waits for one of its queue's run slots
/// before its handler starts; if the worker stops first, it is released without running.
#[derive(Clone)]
pub(crate) struct RunGate {
    /// The queue's run slots: its concurrency.
    pub(crate) slots: Arc<Semaphore>,
    /// The worker's stop (no more claims): a job still waiting is given back.
    pub(crate) stop: CancellationToken,
    /// How long the queue's handlers hold a run slot, for an adaptive prefetch.
    pub(crate) pace: Arc<crate::prefetch::Pace>,
}

/// `permit`: the claim slot, held until the handler is done. `gate`: the run slot to wait for, with
/// prefetch. `claimed`: when the claim returned (see `DeferredRecords::with_clock`).
pub(crate) fn spawn(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    job: Job,
    permit: OwnedSemaphorePermit,
    gate: Option<RunGate>,
    claimed: std::time::Instant,
) {
    let cancel = CancellationToken::new();
    let flags = Arc::new(AttemptFlags::default());
    let earlier = shared
        .running
        .lock()
        .expect("running-jobs lock poisoned by a panic while held")
        .insert(job.id, RunningJob { attempt: job.attempt, cancel: cancel.clone(), flags: flags.clone() });
    if let Some(earlier) = earlier.filter(|e| e.attempt != job.attempt) {
        // This worker claimed the job again (it was cancelled and retried, or rescued, while an
        // earlier attempt was still here): that attempt's lease is gone, and with the entry
        // replaced no heartbeat would tell it so. Tell it now.
        earlier.cancel.cancel();
    }
    let span = tracing::info_span!(
        "job",
        job.id = %job.id,
        job.kind = %job.kind,
        queue = %job.queue,
        attempt = job.attempt,
        traceparent = tracing::field::Empty,
    );
    if let Some(tp) = &job.traceparent {
        span.record("traceparent", tp.as_str());
        #[cfg(feature = "otel")]
        continue_trace(&span, tp);
    }
    tracker.spawn(run(shared.clone(), job, cancel, flags, permit, gate, claimed).instrument(span));
}

/// With the feature `otel`: the job's span becomes a child of the enqueuing span and is linked to
/// it. The child makes one trace run from the request through the job and its steps (what a trace
/// view shows); the link is what OpenTelemetry's messaging conventions ask of a consumer span, for
/// backends that draw producer and consumer apart. It must happen before the span is first entered
/// (`tracing-opentelemetry` builds the span then; a later parent is refused).
#[cfg(feature = "otel")]
fn continue_trace(span: &tracing::Span, tp: &oncely_core::trace::TraceParent) {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let remote = tp.to_span_context();
    if let Err(e) = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote.clone())) {
        // No OpenTelemetry layer, or the span is disabled: nothing to continue.
        tracing::trace!(error = %e, "job span not parented to its enqueuing span");
        return;
    }
    span.add_link(remote);
}

async fn run(
    shared: Arc<Shared>,
    job: Job,
    cancel: CancellationToken,
    flags: Arc<AttemptFlags>,
    permit: OwnedSemaphorePermit,
    gate: Option<RunGate>,
    claimed: std::time::Instant,
) {
    let claim = Claim::from(&job);
    let pace = gate.as_ref().map(|g| g.pace.clone());
    // With prefetch, wait for a run slot; held, with the claim slot, until the handler is done.
    let run_permit = match gate {
        None => None,
        Some(gate) => {
            if gate.slots.available_permits() == 0 {
                WorkerStats::add(&shared.stats.claimed_ahead, 1);
                crate::metrics::claimed_ahead(&job.queue);
            }
            let waited = tokio::select! {
                biased;
                // A lost lease first: a job that is no longer this attempt's has nothing to give back.
                _ = cancel.cancelled() => None,
                _ = gate.stop.cancelled() => {
                    // Claimed ahead and never started: give it back now rather than run it during
                    // the shutdown grace period. It does not count as an attempt.
                    AttemptFlags::set(&flags.finishing);
                    drop(permit);
                    record(&shared, &job, claim, Finish::Release("worker shut down before the job started")).await;
                    shared.forget([claim]);
                    return;
                }
                p = gate.slots.acquire_owned() => Some(p.expect("a queue's run slots are never closed")),
            };
            match waited {
                Some(p) if lease_still_held(&shared, claim, claimed, &cancel).await => Some(p),
                _ => {
                    // The heartbeat found the lease lost (the job was cancelled or rescued), or it
                    // could not be confirmed: the job may be another attempt's by now. Nothing
                    // ran; nothing to write (an unconfirmed lease expires and the job is rescued).
                    tracing::info!("the lease was lost or unconfirmed while the job waited for a slot: not running it");
                    WorkerStats::add(&shared.stats.abandoned, 1);
                    shared.forget([claim]);
                    return;
                }
            }
        }
    };
    let started = std::time::Instant::now();
    let deferred = DeferredRecords::with_clock(job.attempted_at, claimed);
    let finish = attempt(&shared, &job, cancel, &flags, &deferred).await;
    let took = started.elapsed();
    crate::metrics::handler_duration(&job.kind, took);
    if let Some(pace) = &pace {
        pace.job_ran(took);
    }
    // From here on the claim ends on purpose: the heartbeat must not take the write below, once
    // committed, for a lost lease (it may still find the job in the running set).
    AttemptFlags::set(&flags.finishing);
    // The slot is free as soon as the handler is done; the write below does not hold it.
    drop(run_permit);
    drop(permit);
    let finish = match AttemptFlags::get(&flags.completed_in_tx) {
        true => settle_completed_in_tx(&shared, &job, claim, finish).await,
        false if AttemptFlags::get(&flags.suspended_in_tx) => settle_suspended_in_tx(&shared, claim, finish).await,
        false => finish,
    };
    // The step records the attempt deferred go with its outcome: a completion takes them to the
    // completer; any other outcome that is written writes them first (so the next attempt replays
    // them). A crash, an abandoned or an unsettled attempt writes nothing, as a killed process
    // would not.
    match &finish {
        Finish::Complete | Finish::Crash | Finish::Abandoned | Finish::Unsettled => {}
        _ => flush_deferred(&shared, &deferred).await,
    }
    match finish {
        Finish::CompletedInTx => {
            WorkerStats::add(&shared.stats.completed, 1);
            crate::metrics::count(crate::metrics::JOBS_COMPLETED, &job.kind);
            tracing::debug!("job completed in the handler's transaction");
            shared.forget([claim]);
            return;
        }
        Finish::Abandoned => {
            WorkerStats::add(&shared.stats.abandoned, 1);
            shared.forget([claim]);
            return;
        }
        Finish::Unsettled => {
            shared.forget([claim]);
            return;
        }
        Finish::SuspendedInTx(d) => {
            WorkerStats::add(&shared.stats.snoozed, 1);
            shared.wake_after(&job.queue, d);
            tracing::debug!(delay = ?d, "run suspended in the handler's transaction");
            shared.forget([claim]);
            return;
        }
        _ => {}
    }
    if let Finish::Complete = finish {
        tracing::debug!("job completed");
        crate::metrics::count(crate::metrics::JOBS_COMPLETED, &job.kind);
        let limited =
            shared.limited_queues.lock().expect("the limited queues' lock is never poisoned").contains(&job.queue);
        let notify = limited.then(|| job.queue.clone());
        if shared.completions.send(CompleterMsg::Complete(claim, notify, deferred.take())).is_err() {
            // The completer is gone only after shutdown finished; the lease will expire and the
            // job will run again (at least once).
            tracing::error!("completer stopped before the completion could be recorded");
        }
        return;
    }
    if !matches!(finish, Finish::Crash) {
        record(&shared, &job, claim, finish).await;
    }
    shared.forget([claim]);
}

/// Whether a job claimed ahead (claim returned at `claimed`) still holds its lease as it is about
/// to start. A heartbeat that extended every lease since the claim (or the claim itself) less than
/// two thirds of a lease ago says so; if heartbeats have been failing for longer, the lease is
/// extended now, and a lease that cannot be extended is not taken as held.
async fn lease_still_held(
    shared: &Arc<Shared>,
    claim: Claim,
    claimed: std::time::Instant,
    cancel: &CancellationToken,
) -> bool {
    if cancel.is_cancelled() {
        return false;
    }
    let confirmed = shared.leases_confirmed.lock().expect("never poisoned").map_or(claimed, |c| c.max(claimed));
    if confirmed.elapsed() < shared.config.lease * 2 / 3 {
        return true;
    }
    let db = oncely_core::pooler::db(&shared.pool);
    match oncely_core::lease::extend_leases_batched(db, &[claim], shared.config.lease).await {
        Ok(lost) => lost.is_empty() && !cancel.is_cancelled(),
        Err(e) => {
            tracing::warn!(error = %e, "could not confirm the lease of a job claimed ahead");
            false
        }
    }
}

async fn attempt(
    shared: &Arc<Shared>,
    job: &Job,
    cancel: CancellationToken,
    flags: &Arc<AttemptFlags>,
    deferred: &DeferredRecords,
) -> Finish {
    let Some(handler) = shared.handlers.get(&job.kind) else {
        let message = format!(
            "no handler for job kind `{}` on worker {}; it will be retried (a worker that knows it may take it)",
            job.kind, shared.config.worker_id
        );
        tracing::error!(%message);
        return Finish::Failed { kind: ErrorKind::UnknownKind, message, retry_in: Some(backoff(shared, job)) };
    };
    let timeout = handler.timeout().unwrap_or(shared.config.job_timeout);
    let guard = (!handler.cancel_rules().is_empty()).then(|| crate::flow::cancel_guard(shared.pool.clone(), job.id));
    let ctx = JobContext {
        inner: Arc::new(ContextInner {
            id: job.id,
            kind: job.kind.clone(),
            queue: job.queue.clone(),
            attempt: job.attempt,
            max_attempts: job.max_attempts,
            snoozes: job.snoozes,
            pool: shared.pool.clone(),
            cancel: cancel.clone(),
            steps: StepScope::new(shared.pool.clone(), job.id, job.attempt)
                .with_hook(shared.step_hook.clone())
                .with_guard(guard.clone())
                .with_deferred_records(Some(deferred.clone())),
            flags: flags.clone(),
            args: job.args.clone(),
            guard: crate::handler::GuardSlot(guard),
            traceparent: job.traceparent.clone(),
        }),
    };
    let call = AssertUnwindSafe(handler.call(ctx, job.args.clone())).catch_unwind();
    // Told to stop (the heartbeat found the lease lost), a handler gets the grace period to return;
    // then its future is dropped, so a zombie attempt cannot go on calling other systems.
    let grace = shared.config.lease_lost_grace;
    let lost = async {
        cancel.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    let result = tokio::select! {
        r = tokio::time::timeout(timeout, call) => r,
        _ = shared.hard_stop.cancelled() => {
            cancel.cancel();
            return Finish::Release("worker shut down before the attempt finished");
        }
        _ = lost => {
            tracing::warn!(?grace, "the lease was lost and the handler did not stop within the grace period: dropping it");
            return Finish::Abandoned;
        }
    };
    match result {
        Err(_) => Finish::Failed {
            kind: ErrorKind::Timeout,
            message: format!("attempt timed out after {timeout:?}"),
            retry_in: Some(backoff(shared, job)),
        },
        Ok(Err(panic)) if panic.is::<InjectedCrash>() => {
            tracing::warn!(boundary = ?panic.downcast_ref::<InjectedCrash>().map(|c| &c.0), "crash injected: abandoning the attempt without a write");
            Finish::Crash
        }
        Ok(Err(panic)) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "handler panicked".into());
            tracing::error!(panic = %message, "handler panicked");
            Finish::Failed { kind: ErrorKind::Panic, message, retry_in: Some(backoff(shared, job)) }
        }
        Ok(Ok(Ok(()))) => Finish::Complete,
        Ok(Ok(Err(CallError::InvalidArgs(message)))) => {
            tracing::error!(%message, "job arguments are invalid; sending to the dead letter");
            Finish::Failed { kind: ErrorKind::InvalidArgs, message, retry_in: None }
        }
        Ok(Ok(Err(CallError::Outcome(outcome)))) => match outcome {
            Outcome::Retry { error, after } => Finish::Failed {
                kind: ErrorKind::Error,
                message: error,
                retry_in: Some(after.unwrap_or_else(|| backoff(shared, job))),
            },
            Outcome::Fail(message) => Finish::Failed { kind: ErrorKind::Error, message, retry_in: None },
            Outcome::Snooze(d) => Finish::Snooze(d),
            Outcome::Cancel(reason) => Finish::Cancel(reason),
            Outcome::Interrupted(error) => Finish::Interrupted(error, backoff(shared, job)),
        },
    }
}

/// The handler completed its job in its own transaction ([`JobContext::complete_in`]): read back
/// whether that transaction committed. Committed: the job is done whatever the handler returned,
/// and nothing more is written. Rolled back (the job still runs under this claim): the effect did
/// not happen, so a success is a failed attempt to retry. Anything else (the claim is gone) keeps
/// `finish`, whose fenced write is then refused and reported.
async fn settle_completed_in_tx(shared: &Arc<Shared>, job: &Job, claim: Claim, finish: Finish) -> Finish {
    if matches!(finish, Finish::Crash | Finish::Abandoned) {
        return finish;
    }
    let read = (|| oncely_core::get_job(oncely_core::pooler::db(&shared.pool), claim.id))
        .retry(persist_backoff())
        .when(|e| e.is_transient());
    let now = match read.await {
        Ok(now) => now,
        Err(e) => {
            tracing::error!(error = %e, "could not read back whether the handler's completing transaction committed; writing nothing (the lease will expire)");
            return Finish::Unsettled;
        }
    };
    match (now.state, now.attempt == claim.attempt) {
        (JobState::Completed, true) => {
            if !matches!(finish, Finish::Complete) {
                tracing::warn!(
                    "the handler completed its job in its transaction, then returned an error; the completion stands"
                );
            }
            Finish::CompletedInTx
        }
        (JobState::Running, true) => match finish {
            Finish::Complete => {
                let message = "the handler completed the job in a transaction that did not commit".to_owned();
                tracing::warn!(%message, "retrying the attempt");
                Finish::Failed { kind: ErrorKind::Error, message, retry_in: Some(backoff(shared, job)) }
            }
            other => other,
        },
        _ => finish,
    }
}

/// The handler suspended its run in its own transaction (`wait_for_event`): when the claim no
/// longer runs, that transaction committed and there is nothing to write. If it still runs under
/// this claim, the suspension did not commit and `finish` (the handler's error) is written.
async fn settle_suspended_in_tx(shared: &Arc<Shared>, claim: Claim, finish: Finish) -> Finish {
    if let Finish::Snooze(d) = finish {
        return Finish::SuspendedInTx(d);
    }
    if matches!(finish, Finish::Crash | Finish::Abandoned) {
        return finish;
    }
    let read = (|| oncely_core::get_job(oncely_core::pooler::db(&shared.pool), claim.id))
        .retry(persist_backoff())
        .when(|e| e.is_transient());
    match read.await {
        Ok(now) if now.state == JobState::Running && now.attempt == claim.attempt => finish,
        Ok(_) => Finish::SuspendedInTx(Duration::ZERO),
        Err(e) => {
            tracing::error!(error = %e, "could not read back whether the run's suspension committed; writing nothing (the lease will expire)");
            Finish::Unsettled
        }
    }
}

/// Write the step records an attempt deferred, retrying while the database is away. Failing
/// that, the steps run again on the next attempt (as after a crash between a step and its record).
async fn flush_deferred(shared: &Arc<Shared>, deferred: &DeferredRecords) {
    if deferred.is_empty() {
        return;
    }
    let write = || deferred.flush(oncely_core::pooler::db(&shared.pool));
    if let Err(e) = write.retry(persist_backoff()).when(|e| e.is_transient()).await {
        tracing::warn!(error = %e, lost = deferred.len(), "could not write the attempt's step records; those steps run again on the next attempt");
    }
}

/// The backoff delay after this attempt: snoozes and releases do not count.
fn backoff(shared: &Shared, job: &Job) -> Duration {
    let counted = (job.attempt - job.snoozes).max(1) as u32;
    shared.config.retry.delay(counted)
}

/// Write a non-success outcome, retrying while the database is away; a lost lease is reported,
/// never retried.
async fn record(shared: &Arc<Shared>, job: &Job, claim: Claim, finish: Finish) {
    let pool = oncely_core::pooler::db(&shared.pool);
    let write = || async {
        match &finish {
            Finish::Failed { kind, message, retry_in } => {
                oncely_core::lease::fail_job(pool, claim, *kind, message, *retry_in).await.map(Some)
            }
            Finish::Snooze(d) => oncely_core::lease::snooze_job(pool, claim, *d).await.map(|_| None),
            Finish::Interrupted(message, d) => {
                oncely_core::lease::interrupt_job(pool, claim, *d, message).await.map(|_| None)
            }
            Finish::Cancel(reason) => oncely_core::lease::cancel_running_job(pool, claim, reason).await.map(|_| None),
            Finish::Release(why) => oncely_core::lease::release_job(pool, claim, why).await.map(|_| None),
            Finish::Complete
            | Finish::Crash
            | Finish::Abandoned
            | Finish::CompletedInTx
            | Finish::Unsettled
            | Finish::SuspendedInTx(_) => {
                unreachable!("completions go to the completer; crashes, abandoned and settled attempts write nothing")
            }
        }
    };
    let result = write.retry(persist_backoff()).when(|e| e.is_transient()).await;
    let stats = &shared.stats;
    match (result, &finish) {
        (Ok(state), Finish::Failed { message, retry_in, .. }) => {
            WorkerStats::add(&stats.failed, 1);
            crate::metrics::count(crate::metrics::JOBS_FAILED, &job.kind);
            match state {
                Some(JobState::Dead) => crate::metrics::count(crate::metrics::JOBS_DEAD, &job.kind),
                Some(JobState::Available) => crate::metrics::count(crate::metrics::JOBS_RETRIED, &job.kind),
                _ => {}
            }
            if let (Some(JobState::Available), Some(d)) = (state, retry_in) {
                shared.wake_after(&job.queue, *d);
            }
            tracing::warn!(error = %message, new_state = ?state, max_attempts = job.max_attempts, "attempt failed");
        }
        (Ok(_), Finish::Snooze(d)) => {
            WorkerStats::add(&stats.snoozed, 1);
            shared.wake_after(&job.queue, *d);
            tracing::debug!(delay = ?d, "job snoozed");
        }
        (Ok(_), Finish::Interrupted(message, d)) => {
            WorkerStats::add(&stats.snoozed, 1);
            shared.wake_after(&job.queue, *d);
            tracing::warn!(error = %message, delay = ?d, "attempt cut short by a lost database connection; not counted");
        }
        (Ok(_), Finish::Cancel(reason)) => {
            WorkerStats::add(&stats.cancelled, 1);
            tracing::info!(%reason, "job cancelled by its handler");
        }
        (Ok(_), Finish::Release(_)) => {
            WorkerStats::add(&stats.released, 1);
            tracing::info!("job released at shutdown");
        }
        (
            Ok(_),
            Finish::Complete
            | Finish::Crash
            | Finish::Abandoned
            | Finish::CompletedInTx
            | Finish::Unsettled
            | Finish::SuspendedInTx(_),
        ) => {}
        (Err(e @ oncely_core::Error::LeaseLost { .. }), _) => {
            WorkerStats::add(&stats.lease_lost, 1);
            crate::metrics::lease_lost(1);
            tracing::warn!(error = %e, "outcome discarded");
        }
        (Err(e), _) => {
            tracing::error!(error = %e, "could not record the outcome; the lease will expire and the job will run again");
        }
    }
}

/// Retry a write for about half a minute while the database is away.
pub(crate) fn persist_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(20)
        .with_jitter()
}
