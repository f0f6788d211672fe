//! Maintenance: on the one worker elected leader, rescue jobs whose lease expired, prune
//! finished jobs, published events and inbox records past their retention, and delete expired ledger records (hourly by default,
//! writing an audit row to `oncely.maintenance_runs` for each run). Every worker campaigns; the leader renews its lease each
//! tick, and another takes over within a few ticks of its death.

use std::sync::Arc;

use oncely_core::maintenance::{elect_leader, prune_finished, rescue_expired, resign_leader};
use tokio_util::sync::CancellationToken;

use crate::worker::Shared;

/// The leadership name maintenance runs under.
pub const LEADER_NAME: &str = "maintenance";
/// Jobs rescued per statement.
const RESCUE_BATCH: i64 = 1000;
/// Ledger records deleted per statement.
const LEDGER_BATCH: i64 = 5_000;
/// Jobs deleted per statement.
const PRUNE_BATCH: i64 = 10_000;

pub(crate) async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let cfg = &shared.config;
    let me = cfg.worker_id.as_str();
    let ttl = cfg.maintenance_interval * 5;
    let mut tick = tokio::time::interval(cfg.maintenance_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leader = false;
    let mut last_prune = tokio::time::Instant::now();
    let mut last_cleanup = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        match elect_leader(&shared.pool, LEADER_NAME, me, ttl).await {
            Ok(now_leader) => {
                if now_leader != leader {
                    tracing::info!(worker.id = me, leader = now_leader, "maintenance leadership changed");
                }
                leader = now_leader;
            }
            Err(e) => {
                tracing::warn!(error = %e, "leader election failed");
                leader = false;
                continue;
            }
        }
        if !leader {
            continue;
        }
        if let Err(e) = rescue(&shared).await {
            tracing::warn!(error = %e, "rescue failed");
        }
        if last_prune.elapsed() >= cfg.prune_interval {
            last_prune = tokio::time::Instant::now();
            if let Err(e) = prune(&shared).await {
                tracing::warn!(error = %e, "prune failed");
            }
        }
        if last_cleanup.elapsed() >= cfg.ledger_cleanup_interval {
            last_cleanup = tokio::time::Instant::now();
            match oncely_core::ledger::cleanup_expired(&shared.pool, LEDGER_BATCH, Some(me)).await {
                Ok(n) => tracing::info!(deleted = n, "deleted expired ledger records"),
                Err(e) => tracing::warn!(error = %e, "ledger cleanup failed"),
            }
        }
    }
    if leader {
        if let Err(e) = resign_leader(&shared.pool, LEADER_NAME, me).await {
            tracing::warn!(error = %e, "could not resign maintenance leadership; it expires by itself");
        }
    }
}

async fn rescue(shared: &Shared) -> oncely_core::Result<()> {
    let mut conn = shared.pool.acquire().await?;
    loop {
        let r = rescue_expired(&mut conn, RESCUE_BATCH).await?;
        let n = r.requeued.len() + r.dead.len();
        if n > 0 {
            tracing::warn!(requeued = ?r.requeued, dead = ?r.dead, "rescued jobs whose lease expired");
        }
        if (n as i64) < RESCUE_BATCH {
            return Ok(());
        }
    }
}

async fn prune(shared: &Shared) -> oncely_core::Result<()> {
    let cfg = &shared.config;
    let pool = &shared.pool;
    in_batches("finished jobs", || prune_finished(pool, cfg.retention, cfg.dead_retention, PRUNE_BATCH)).await?;
    in_batches("events", || oncely_core::outbox::prune_events(pool, cfg.event_retention, PRUNE_BATCH)).await?;
    in_batches("inbox records", || oncely_core::inbox::prune_inbox(pool, cfg.inbox_retention, PRUNE_BATCH)).await
}

/// Run a batch delete until it deletes less than a full batch.
async fn in_batches<F, Fut>(what: &str, mut batch: F) -> oncely_core::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = oncely_core::Result<u64>>,
{
    loop {
        let n = batch().await?;
        if n > 0 {
            tracing::info!(deleted = n, "pruned {what}");
        }
        if (n as i64) < PRUNE_BATCH {
            return Ok(());
        }
    }
}
