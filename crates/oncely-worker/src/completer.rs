//! The completer: records completions in batches, one fenced statement per batch.

use std::sync::Arc;

use backon::Retryable;
use oncely_core::ledger::DeferredRecord;
use oncely_core::{Claim, Error};
use tokio::sync::{mpsc, oneshot};

use crate::executor::persist_backoff;
use crate::worker::{Shared, WorkerStats};

/// The most completions written by one statement. Completions that arrive while a batch is being
/// written wait for the next one; a bounded batch keeps each statement (and the row locks it holds
/// until commit) short, so a slow moment does not make the next batch larger and slower still.
pub(crate) const MAX_COMPLETION_BATCH: usize = 1000;

pub(crate) enum CompleterMsg {
    /// A completion, the queue to NOTIFY once it is written (a queue with a global limit), and the
    /// step records the attempt deferred, written in the same statement.
    Complete(Claim, Option<String>, Vec<DeferredRecord>),
    /// Reply once everything sent before has been written.
    Flush(oneshot::Sender<()>),
}

pub(crate) async fn run(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<CompleterMsg>) {
    let mut batch = Vec::with_capacity(MAX_COMPLETION_BATCH);
    let mut flushes = Vec::new();
    let mut notify = Vec::new();
    let mut records = Vec::new();
    while let Some(msg) = rx.recv().await {
        push(msg, &mut batch, &mut flushes, &mut notify, &mut records);
        while batch.len() < MAX_COMPLETION_BATCH {
            match rx.try_recv() {
                Ok(msg) => push(msg, &mut batch, &mut flushes, &mut notify, &mut records),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            write(&shared, &batch, &records).await;
            records.clear();
            if let Some(hook) = &shared.completion_hook {
                hook(batch.clone()).await;
            }
            shared.forget(batch.drain(..));
        }
        if !notify.is_empty() {
            // Slots of a queue with a global limit are free: wake every worker's fetcher.
            if let Err(e) = oncely_core::flow::notify_queues(oncely_core::pooler::db(&shared.pool), &notify).await {
                tracing::warn!(error = %e, "could not wake the workers of limited queues; they claim at their next poll");
            }
            notify.clear();
        }
        for f in flushes.drain(..) {
            let _ = f.send(());
        }
    }
}

fn push(
    msg: CompleterMsg,
    batch: &mut Vec<Claim>,
    flushes: &mut Vec<oneshot::Sender<()>>,
    notify: &mut Vec<String>,
    records: &mut Vec<DeferredRecord>,
) {
    match msg {
        CompleterMsg::Complete(c, queue, mut deferred) => {
            batch.push(c);
            records.append(&mut deferred);
            if let Some(q) = queue {
                if !notify.contains(&q) {
                    notify.push(q);
                }
            }
        }
        CompleterMsg::Flush(tx) => flushes.push(tx),
    }
}

async fn write(shared: &Shared, batch: &[Claim], records: &[DeferredRecord]) {
    let result =
        (|| oncely_core::lease::complete_jobs_recording(oncely_core::pooler::db(&shared.pool), batch, records))
            .retry(persist_backoff())
            .when(Error::is_transient)
            .await;
    match result {
        Ok(lost) => {
            WorkerStats::add(&shared.stats.completed, (batch.len() - lost.len()) as u64);
            WorkerStats::add(&shared.stats.lease_lost, lost.len() as u64);
            crate::metrics::lease_lost(lost.len() as u64);
            for c in lost {
                let e = Error::LeaseLost { job_id: c.id, attempt: c.attempt };
                tracing::warn!(job.id = %c.id, attempt = c.attempt, error = %e, "completion refused");
            }
        }
        Err(e) => tracing::error!(
            error = %e, count = batch.len(),
            "could not record completions; their leases will expire and the jobs will run again"
        ),
    }
}
