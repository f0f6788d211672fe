//! The completer: records completions in batches, one fenced statement per batch.

use std::sync::Arc;

use backon::Retryable;
use oncely_core::{Claim, Error};
use tokio::sync::{mpsc, oneshot};

use crate::executor::persist_backoff;
use crate::worker::{Shared, WorkerStats};

/// The most completions written by one statement. Completions that arrive while a batch is being
/// written wait for the next one; a bounded batch keeps each statement (and the row locks it holds
/// until commit) short, so a slow moment does not make the next batch larger and slower still.
pub(crate) const MAX_COMPLETION_BATCH: usize = 1000;

pub(crate) enum CompleterMsg {
    Complete(Claim),
    /// Reply once everything sent before has been written.
    Flush(oneshot::Sender<()>),
}

pub(crate) async fn run(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<CompleterMsg>) {
    let mut batch = Vec::with_capacity(MAX_COMPLETION_BATCH);
    let mut flushes = Vec::new();
    while let Some(msg) = rx.recv().await {
        push(msg, &mut batch, &mut flushes);
        while batch.len() < MAX_COMPLETION_BATCH {
            match rx.try_recv() {
                Ok(msg) => push(msg, &mut batch, &mut flushes),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            write(&shared, &batch).await;
            if let Some(hook) = &shared.completion_hook {
                hook(batch.clone()).await;
            }
            shared.forget(batch.drain(..));
        }
        for f in flushes.drain(..) {
            let _ = f.send(());
        }
    }
}

fn push(msg: CompleterMsg, batch: &mut Vec<Claim>, flushes: &mut Vec<oneshot::Sender<()>>) {
    match msg {
        CompleterMsg::Complete(c) => batch.push(c),
        CompleterMsg::Flush(tx) => flushes.push(tx),
    }
}

async fn write(shared: &Shared, batch: &[Claim]) {
    let result = (|| oncely_core::lease::complete_jobs(&shared.pool, batch))
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
