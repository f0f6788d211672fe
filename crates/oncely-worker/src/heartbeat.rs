//! The heartbeat: extends the leases of this worker's running jobs every third of the lease, and
//! tells handlers whose claim no longer holds to stop (the executor drops those that do not stop
//! within the grace period).
//!
//! A claim that ended on purpose is not a lost lease: a job whose outcome is being written (its
//! handler returned; the write may commit between the heartbeat's read of the running set and the
//! job's removal from it), or that its handler completed in its own transaction, is skipped.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::worker::{AttemptFlags, Shared, WorkerStats};

pub(crate) async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(shared.config.heartbeat_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        // Before the running set is read: a job claimed later holds its lease from its claim.
        let began = std::time::Instant::now();
        let claims = shared.running_claims();
        if claims.is_empty() {
            continue;
        }
        let extended = oncely_core::lease::extend_leases_batched(
            oncely_core::pooler::db(&shared.pool),
            &claims,
            shared.config.lease,
        )
        .await;
        match extended {
            Ok(lost) => {
                // Every claim read above that is not in `lost` now holds its lease until at least
                // `began` plus the lease; jobs claimed since hold theirs from their claim.
                *shared.leases_confirmed.lock().expect("never poisoned") = Some(began);
                let running = shared.running.lock().expect("running-jobs lock poisoned by a panic while held");
                for c in &lost {
                    let Some(r) = running.get(&c.id).filter(|r| r.attempt == c.attempt) else { continue };
                    if AttemptFlags::get(&r.flags.finishing) {
                        // Completed (or failed, snoozed, ...) on purpose while this beat ran.
                        continue;
                    }
                    WorkerStats::add(&shared.stats.lost_while_running, 1);
                    crate::metrics::lease_lost(1);
                    tracing::warn!(job.id = %c.id, attempt = c.attempt, grace = ?shared.config.lease_lost_grace, "lease lost (rescued or cancelled): telling the handler to stop");
                    r.cancel.cancel();
                }
            }
            Err(e) => tracing::warn!(error = %e, jobs = claims.len(), "heartbeat failed; will try again"),
        }
        WorkerStats::add(&shared.stats.heartbeats, 1);
    }
}
