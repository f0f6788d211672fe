//! The fetcher: one per queue. It claims jobs in batches while slots are free and hands each to
//! the executor; when the queue is empty it waits for a NOTIFY hint or the poll interval.

use std::sync::Arc;
use std::time::Duration;

use oncely_core::lease::ClaimWindow;
use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::QueueConfig;
use crate::executor;
use crate::metrics::ClaimKind;
use crate::prefetch::{Allowance, Pace};
use crate::worker::{Shared, WorkerStats};

/// How long to back off after a failed claim (the database is away).
const CLAIM_ERROR_BACKOFF: Duration = Duration::from_millis(500);

pub(crate) async fn run(
    shared: Arc<Shared>,
    queue: QueueConfig,
    wake: Arc<Notify>,
    stop: CancellationToken,
    jobs: TaskTracker,
) {
    // Claim slots: the queue's concurrency plus the jobs it may hold waiting for one of its run
    // slots (`WorkerConfig::prefetch`). Without prefetch a claim slot is a run slot.
    let prefetch = shared.config.prefetch;
    let slots = Arc::new(Semaphore::new(queue.concurrency + prefetch));
    let pace = Arc::new(Pace::default());
    let gate = (prefetch > 0).then(|| executor::RunGate {
        slots: Arc::new(Semaphore::new(queue.concurrency)),
        stop: stop.clone(),
        pace: pace.clone(),
    });
    let mut allowance = Allowance::new(&shared.config, pace.clone());
    let mut busy = false;
    let mut window = match shared.config.full_claim_interval {
        Some(every) => ClaimWindow::new().full_claims_every(every),
        None => ClaimWindow::new(),
    };
    // The listener's read-all requests this fetcher has honoured.
    let mut read_all = 0;
    // The full claim running beside the windowed ones, if any: it reports what it claimed.
    let mut sweep: Option<oneshot::Receiver<Sweep>> = None;
    loop {
        let asked = shared.read_all.load(std::sync::atomic::Ordering::Relaxed);
        if asked != read_all {
            read_all = asked;
            window.read_all_next();
        }
        let ahead = allowance.update(&queue, &slots);
        let batch = shared.config.fetch_batch.min(queue.concurrency + ahead);
        // Wait for one free slot, then take every other free slot up to a batch.
        // A stop first: jobs given back at a stop free claim slots at the same moment, and must not
        // be claimed again.
        let first = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            p = slots.clone().acquire_owned() => p.expect("the fetcher's semaphore is never closed"),
        };
        // A slot the prefetch may not use now is held back.
        let Some(first) = allowance.hold_back(first) else { continue };
        let mut permits = vec![first];
        take_free(&slots, &mut permits, batch);
        if busy && permits.len() < batch.div_ceil(2) {
            // The queue is busy: wait a moment for more slots so one claim fills several.
            let until = tokio::time::Instant::now() + shared.config.fetch_cooldown;
            while permits.len() < batch {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => return,
                    p = slots.clone().acquire_owned() => permits.push(p.expect("the fetcher's semaphore is never closed")),
                    _ = tokio::time::sleep_until(until) => break,
                }
                take_free(&slots, &mut permits, batch);
            }
        }
        if let Some(rx) = sweep.as_mut() {
            match rx.try_recv() {
                Ok(done) => {
                    window.full_claim_done(&done.jobs, done.limit, done.cost);
                    sweep = None;
                }
                Err(oneshot::error::TryRecvError::Empty) => {}
                Err(oneshot::error::TryRecvError::Closed) => {
                    window.read_all_next();
                    sweep = None;
                }
            }
        }
        if stop.is_cancelled() {
            return;
        }
        let db = oncely_core::pooler::db(&shared.pool);
        let (worker_id, lease) = (&shared.config.worker_id, shared.config.lease);
        let started = std::time::Instant::now();
        // Each branch says which statement it ran in the foreground (a full claim beside a
        // windowed one is timed where it runs, in `spawn_sweep`).
        let (kind, claimed) = if !shared.config.windowed_claims {
            (
                ClaimKind::Full,
                oncely_core::lease::claim_jobs(db, &queue.name, permits.len() as i32, worker_id, lease).await,
            )
        } else if window.has_floors() && window.full_claim_due() && sweep.is_none() && permits.len() >= 2 {
            // A full claim reads the whole claim index, which a held snapshot can make slow: it
            // runs beside this windowed claim on half of the free slots, so that the jobs the
            // window sees do not wait for it.
            let half = permits.split_off(permits.len() / 2);
            window.full_claim_started();
            sweep = Some(spawn_sweep(&shared, &jobs, &queue.name, half, &wake, gate.clone()));
            (ClaimKind::Window, window.claim_in_window(db, &queue.name, permits.len() as i32, worker_id, lease).await)
        } else if sweep.is_some() {
            (ClaimKind::Window, window.claim_in_window(db, &queue.name, permits.len() as i32, worker_id, lease).await)
        } else {
            let kind = if window.full_claim_due() { ClaimKind::Full } else { ClaimKind::Window };
            (kind, window.claim_jobs(db, &queue.name, permits.len() as i32, worker_id, lease).await)
        };
        let took = started.elapsed();
        crate::metrics::claim_timed(&shared.stats, &queue.name, kind, took);
        pace.claimed(took);
        let want = permits.len();
        let plain = match claimed {
            Ok(plain) => plain,
            Err(e) => {
                tracing::warn!(queue = %queue.name, error = %e, "claim failed; backing off");
                drop(permits);
                if !back_off(&stop).await {
                    return;
                }
                continue;
            }
        };
        // Then what the plain claim leaves: keyed jobs, or a queue with a global limit. Jobs under
        // flow control are not claimed ahead (`WorkerConfig::prefetch`): a rate limit admits a
        // start when it admits the claim, and a key's or a queue's slot is taken from the whole
        // fleet while the job waits. With prefetch, only as many as will start at once (counted
        // before the plain jobs are handed out and take run slots).
        let room = match &gate {
            None => want - plain.len(),
            Some(g) => (want - plain.len()).min(g.slots.available_permits().saturating_sub(plain.len())),
        };
        let mut got = plain.len();
        // The plain jobs start now: they do not wait for the flow claim's round trip.
        hand_out(&shared, &jobs, &queue.name, plain, &mut permits, &gate);
        let mut retry_in = None;
        if room > 0 {
            let started = std::time::Instant::now();
            let flow = oncely_core::flow::claim_jobs(
                &shared.pool,
                &queue.name,
                room as i32,
                &shared.config.worker_id,
                shared.config.lease,
            )
            .await;
            crate::metrics::claim_timed(&shared.stats, &queue.name, ClaimKind::Flow, started.elapsed());
            match flow {
                Ok(flow) => {
                    if flow.queue_limited {
                        shared.limited_queues.lock().expect("never poisoned").insert(queue.name.clone());
                    }
                    retry_in = flow.retry_in;
                    got += flow.jobs.len();
                    hand_out(&shared, &jobs, &queue.name, flow.jobs, &mut permits, &gate);
                }
                Err(e) if got == 0 => {
                    tracing::warn!(queue = %queue.name, error = %e, "claim failed; backing off");
                    drop(permits);
                    if !back_off(&stop).await {
                        return;
                    }
                    continue;
                }
                Err(e) => tracing::warn!(queue = %queue.name, error = %e, "flow claim failed"),
            }
        }
        busy = got == want;
        drop(permits);
        if !busy {
            tokio::select! {
                _ = wake.notified() => {}
                // A rate limit tells when its next start is allowed: no later than that.
                _ = tokio::time::sleep(retry_in.map_or(shared.config.poll_interval, |r| r.min(shared.config.poll_interval))) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}

/// What a full claim beside the windowed ones took, for the fetcher's window.
struct Sweep {
    jobs: Vec<oncely_core::Job>,
    limit: i32,
    cost: Duration,
}

/// Run a full claim (from the head of the claim index) on `permits`, hand what it claims to the
/// executor, report it, and wake the fetcher.
fn spawn_sweep(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    queue: &str,
    mut permits: Vec<OwnedSemaphorePermit>,
    wake: &Arc<Notify>,
    gate: Option<executor::RunGate>,
) -> oneshot::Receiver<Sweep> {
    let (tx, rx) = oneshot::channel();
    let (shared, jobs, queue, wake) = (shared.clone(), tracker.clone(), queue.to_owned(), wake.clone());
    tracker.spawn(async move {
        let limit = permits.len() as i32;
        let started = std::time::Instant::now();
        let db = oncely_core::pooler::db(&shared.pool);
        let claimed =
            oncely_core::lease::claim_jobs(db, &queue, limit, &shared.config.worker_id, shared.config.lease).await;
        let cost = started.elapsed();
        crate::metrics::claim_timed(&shared.stats, &queue, ClaimKind::Full, cost);
        let claimed = claimed.unwrap_or_else(|e| {
            tracing::warn!(queue = %queue, error = %e, "full claim failed");
            Vec::new()
        });
        let _ = tx.send(Sweep { jobs: claimed.clone(), limit, cost });
        hand_out(&shared, &jobs, &queue, claimed, &mut permits, &gate);
        drop(permits);
        wake.notify_one();
    });
    rx
}

/// Wait [`CLAIM_ERROR_BACKOFF`] after a failed claim; false when the worker stops meanwhile.
async fn back_off(stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(CLAIM_ERROR_BACKOFF) => true,
        _ = stop.cancelled() => false,
    }
}

/// Count `claimed` and hand each job to the executor on one of `permits`. A job's `attempted_at`
/// (the database clock as the claim wrote the row) plus the time since now is at most a round
/// trip behind the database clock; the times of deferred step records are taken so.
fn hand_out(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    queue: &str,
    claimed: Vec<oncely_core::Job>,
    permits: &mut Vec<OwnedSemaphorePermit>,
    gate: &Option<executor::RunGate>,
) {
    WorkerStats::add(&shared.stats.claimed, claimed.len() as u64);
    crate::metrics::claimed(queue, &claimed);
    let received = std::time::Instant::now();
    for job in claimed {
        let permit = permits.pop().expect("one permit was taken per claimed job");
        executor::spawn(shared, tracker, job, permit, gate.clone(), received);
    }
}

/// Take free slots into `permits` until it holds `batch`, without waiting.
pub(crate) fn take_free(slots: &Arc<Semaphore>, permits: &mut Vec<OwnedSemaphorePermit>, batch: usize) {
    while permits.len() < batch {
        match slots.clone().try_acquire_owned() {
            Ok(p) => permits.push(p),
            Err(_) => break,
        }
    }
}
