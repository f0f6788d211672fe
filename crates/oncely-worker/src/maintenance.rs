//! Maintenance: on the one worker elected leader, rescue jobs whose lease expired, prune
//! finished jobs, published events and inbox records past their retention (every minute by default), and delete expired ledger
//! records (hourly by default), writing an audit row to `oncely.maintenance_runs` for each run. Those schedules are kept in
//! that table, so restarts and leader changes neither skip nor repeat runs. Every worker campaigns; the leader renews its lease each
//! tick, and another takes over within a few ticks of its death.

use std::sync::Arc;

use oncely_core::maintenance::{
    elect_leader, prune_finished, prune_runs, rescue_expired, resign_leader, run_if_due, LEDGER_CLEANUP_TASK,
    PRUNE_TASK,
};
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
/// How long the records of prune runs are kept (they are written every `prune_interval`).
const PRUNE_RUNS_KEPT: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

pub(crate) async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let cfg = &shared.config;
    let me = cfg.worker_id.as_str();
    let ttl = cfg.maintenance_interval * 5;
    let mut tick = tokio::time::interval(cfg.maintenance_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leader = false;
    // When to look at the periodic tasks' schedules next. They are kept in the database (the last
    // audited run of each), not from this process's start: a fleet restarted more often than a
    // task's interval still runs it, and a new leader does not run one its predecessor just ran.
    let mut next_prune = tokio::time::Instant::now();
    let mut next_cleanup = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        match elect_leader(oncely_core::pooler::db(&shared.pool), LEADER_NAME, me, ttl).await {
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
        if tokio::time::Instant::now() >= next_prune {
            next_prune = periodic(&shared, PRUNE_TASK, cfg.prune_interval, || prune(&shared)).await;
        }
        if tokio::time::Instant::now() >= next_cleanup {
            next_cleanup = periodic(&shared, LEDGER_CLEANUP_TASK, cfg.ledger_cleanup_interval, || async {
                let n = oncely_core::ledger::delete_all_expired(&shared.pool, LEDGER_BATCH).await?;
                tracing::info!(deleted = n, "deleted expired ledger records");
                Ok(n)
            })
            .await;
        }
    }
    if leader {
        if let Err(e) = resign_leader(oncely_core::pooler::db(&shared.pool), LEADER_NAME, me).await {
            tracing::warn!(error = %e, "could not resign maintenance leadership; it expires by itself");
        }
    }
}

/// Run `task` when due ([`run_if_due`]); returns when to look again. A failure is logged and
/// tried again one interval later.
async fn periodic<F, Fut>(shared: &Shared, task: &str, interval: std::time::Duration, work: F) -> tokio::time::Instant
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = oncely_core::Result<u64>>,
{
    let now = tokio::time::Instant::now();
    match run_if_due(&shared.pool, task, interval, Some(shared.config.worker_id.as_str()), work).await {
        Ok(next) => {
            tracing::debug!(task, ?next, "maintenance task scheduled");
            now + next
        }
        Err(e) => {
            tracing::warn!(error = %e, task, "maintenance task failed; next try in one interval");
            now + interval.max(shared.config.maintenance_interval)
        }
    }
}

async fn rescue(shared: &Shared) -> oncely_core::Result<()> {
    let pooled = oncely_core::pooler::pooler() == oncely_core::pooler::Pooler::Transaction;
    let mut conn = shared.pool.acquire().await?;
    loop {
        // Behind a transaction pooler each batch runs in a transaction of its own.
        let r = match pooled {
            true => {
                let mut tx = sqlx::Acquire::begin(&mut *conn).await?;
                let r = rescue_expired(&mut tx, RESCUE_BATCH).await?;
                tx.commit().await?;
                r
            }
            false => rescue_expired(&mut conn, RESCUE_BATCH).await?,
        };
        let n = r.requeued.len() + r.dead.len();
        if n > 0 {
            metrics::counter!(crate::metrics::JOBS_RESCUED).increment(r.requeued.len() as u64);
            metrics::counter!(crate::metrics::JOBS_DEAD, "kind" => "rescued").increment(r.dead.len() as u64);
            tracing::warn!(requeued = ?r.requeued, dead = ?r.dead, "rescued jobs whose lease expired");
        }
        if (n as i64) < RESCUE_BATCH {
            return Ok(());
        }
    }
}

/// Prune finished jobs, events and inbox records past their retention; returns how many rows.
async fn prune(shared: &Shared) -> oncely_core::Result<u64> {
    let cfg = &shared.config;
    let pool = oncely_core::pooler::db(&shared.pool);
    let jobs =
        in_batches("finished jobs", || prune_finished(pool, cfg.retention, cfg.dead_retention, PRUNE_BATCH)).await?;
    let events =
        in_batches("events", || oncely_core::outbox::prune_events(pool, cfg.event_retention, PRUNE_BATCH)).await?;
    let inbox =
        in_batches("inbox records", || oncely_core::inbox::prune_inbox(pool, cfg.inbox_retention, PRUNE_BATCH)).await?;
    let keys = in_batches("event keys", || oncely_core::schedule::prune_event_keys(pool, PRUNE_BATCH)).await?;
    // This task records a run every minute or so: keep a week of those.
    in_batches("prune run records", || prune_runs(pool, PRUNE_TASK, PRUNE_RUNS_KEPT, PRUNE_BATCH)).await?;
    Ok(jobs + events + inbox + keys)
}

/// Run a batch delete until it deletes less than a full batch; returns how many in all.
async fn in_batches<F, Fut>(what: &str, mut batch: F) -> oncely_core::Result<u64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = oncely_core::Result<u64>>,
{
    let mut total = 0;
    loop {
        let n = batch().await?;
        total += n;
        if n > 0 {
            tracing::info!(deleted = n, "pruned {what}");
        }
        if (n as i64) < PRUNE_BATCH {
            return Ok(total);
        }
    }
}
