//! Prefetch (`WorkerConfig::prefetch`, `WorkerConfig::adaptive_prefetch`): how many jobs a
//! queue's fetcher may hold claimed beyond its run slots, and the claim slots it holds back
//! while it may hold fewer than the ceiling.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{QueueConfig, WorkerConfig};

/// The measured pace of one queue on this worker, for an adaptive prefetch
/// (`WorkerConfig::adaptive_prefetch`): moving averages of how long a handler holds a run slot and
/// how long a claim takes, in nanoseconds (0: nothing measured yet).
#[derive(Debug, Default)]
pub(crate) struct Pace {
    run: AtomicU64,
    claim: AtomicU64,
}

impl Pace {
    /// A handler held a run slot for `took`.
    pub(crate) fn job_ran(&self, took: Duration) {
        Self::average(&self.run, took);
    }

    /// A claim took `took`.
    pub(crate) fn claimed(&self, took: Duration) {
        Self::average(&self.claim, took);
    }

    /// Jobs to hold claimed ahead: what `concurrency` slots start within one claim's time (the
    /// concurrency times the claim time over the run time), rounded down, at most `max`; none
    /// before both times are measured.
    pub(crate) fn ahead(&self, concurrency: usize, max: usize) -> usize {
        let (run, claim) = (self.run.load(Ordering::Relaxed), self.claim.load(Ordering::Relaxed));
        if run == 0 || claim == 0 {
            return 0;
        }
        let jobs = concurrency as u128 * u128::from(claim) / u128::from(run);
        jobs.min(max as u128) as usize
    }

    /// A moving average weighing the newest sample 1/8.
    fn average(cell: &AtomicU64, sample: Duration) {
        let sample = u64::try_from(sample.as_nanos()).unwrap_or(u64::MAX).max(1);
        let _ = cell.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
            Some(if old == 0 { sample } else { old - old / 8 + sample / 8 })
        });
    }
}

/// What a queue's fetcher may hold claimed ahead now. Its claim slots are the concurrency plus the
/// ceiling (`WorkerConfig::prefetch`); the slots beyond the current allowance are held here, so
/// that the fetcher can only claim within it.
pub(crate) struct Allowance {
    ceiling: usize,
    adaptive: bool,
    pace: Arc<Pace>,
    held_back: Vec<OwnedSemaphorePermit>,
    /// The allowance of the last [`update`](Self::update), as reported to the metrics (`None`
    /// before the first).
    current: Option<usize>,
}

impl Allowance {
    pub(crate) fn new(config: &WorkerConfig, pace: Arc<Pace>) -> Self {
        Allowance {
            ceiling: config.prefetch,
            adaptive: config.adaptive_prefetch,
            pace,
            held_back: Vec::new(),
            current: None,
        }
    }

    /// The jobs `queue` may hold claimed ahead now (with an adaptive prefetch, what its slots
    /// start within one claim's time): gives back the held slots it now allows, and holds back
    /// free ones it does not.
    pub(crate) fn update(&mut self, queue: &QueueConfig, slots: &Arc<Semaphore>) -> usize {
        let ahead = match self.adaptive {
            true => self.pace.ahead(queue.concurrency, self.ceiling),
            false => self.ceiling,
        };
        if self.current != Some(ahead) {
            crate::metrics::prefetch_allowance(&queue.name, ahead);
            self.current = Some(ahead);
        }
        let hold = self.ceiling - ahead;
        self.held_back.truncate(hold);
        crate::fetcher::take_free(slots, &mut self.held_back, hold);
        ahead
    }

    /// Hold `permit` back if fewer slots are held than the last [`update`](Self::update) asked
    /// for (it freed after that update); else hand it back for a claim.
    pub(crate) fn hold_back(&mut self, permit: OwnedSemaphorePermit) -> Option<OwnedSemaphorePermit> {
        if self.held_back.len() < self.ceiling - self.current.unwrap_or(0) {
            self.held_back.push(permit);
            return None;
        }
        Some(permit)
    }
}
