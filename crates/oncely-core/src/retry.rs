//! Retry delays: a pure function of the attempt number.
//!
//! Durable retries are not an in-memory loop: when an attempt fails, the worker stores the next
//! `run_at` (the database clock plus [`RetryPolicy::delay`]) and forgets the job. Any worker may
//! run the next attempt, and a restart loses nothing.

use std::time::Duration;

/// Defaults to 1 second: the delay before the second attempt, before jitter.
pub const DEFAULT_BASE_DELAY: Duration = Duration::from_secs(1);
/// Defaults to 1 hour: no retry waits longer than this, jitter included.
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(3600);
/// Defaults to 0.2: each delay is scaled by a factor drawn from `[1 - jitter, 1]`.
pub const DEFAULT_JITTER: f64 = 0.2;

/// Exponential backoff with jitter: `base * 2^(attempt - 1)`, capped at `max`, then scaled down by
/// up to `jitter` (a fraction) so that jobs failing together do not retry together.
///
/// # Example
///
/// ```
/// use oncely_core::retry::RetryPolicy;
/// use std::time::Duration;
///
/// let policy = RetryPolicy::default();
/// assert_eq!(policy.base_delay(1), Duration::from_secs(1));
/// assert_eq!(policy.base_delay(3), Duration::from_secs(4));
/// assert!(policy.delay(3) <= Duration::from_secs(4));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// The delay after the first failed attempt, before jitter.
    pub base: Duration,
    /// The upper bound of every delay.
    pub max: Duration,
    /// The fraction of a delay that jitter may remove, in `[0, 1]`.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { base: DEFAULT_BASE_DELAY, max: DEFAULT_MAX_DELAY, jitter: DEFAULT_JITTER }
    }
}

impl RetryPolicy {
    /// The delay after failed attempt number `attempt` (1-based) before jitter: non-decreasing in
    /// `attempt` and never above `max`.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(63);
        let factor = 1u64.checked_shl(exp).unwrap_or(u64::MAX);
        let nanos = (self.base.as_nanos() as u64).saturating_mul(factor);
        Duration::from_nanos(nanos).min(self.max)
    }

    /// [`base_delay`](Self::base_delay) with jitter drawn from the thread RNG.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, rand::random::<f64>())
    }

    /// [`base_delay`](Self::base_delay) scaled by `1 - jitter * unit`, where `unit` is in `[0, 1)`.
    /// Deterministic, for tests.
    pub fn delay_with(&self, attempt: u32, unit: f64) -> Duration {
        let jitter = self.jitter.clamp(0.0, 1.0) * unit.clamp(0.0, 1.0);
        self.base_delay(attempt).mul_f64(1.0 - jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn base_delay_is_non_decreasing_and_bounded(
            base_ms in 1u64..10_000, max_s in 1u64..100_000, attempt in 1u32..200
        ) {
            let p = RetryPolicy { base: Duration::from_millis(base_ms), max: Duration::from_secs(max_s), jitter: 0.3 };
            prop_assert!(p.base_delay(attempt) <= p.base_delay(attempt + 1));
            prop_assert!(p.base_delay(attempt) <= p.max);
        }

        #[test]
        fn jittered_delay_stays_within_its_band(attempt in 1u32..100, unit in 0.0f64..1.0, jitter in 0.0f64..1.0) {
            let p = RetryPolicy { jitter, ..RetryPolicy::default() };
            let d = p.delay_with(attempt, unit);
            prop_assert!(d <= p.base_delay(attempt));
            prop_assert!(d >= p.base_delay(attempt).mul_f64(1.0 - jitter) - Duration::from_nanos(1));
        }
    }

    #[test]
    fn doubles_until_the_cap() {
        let p = RetryPolicy { base: Duration::from_secs(2), max: Duration::from_secs(60), jitter: 0.0 };
        let got: Vec<u64> = (1..=7).map(|a| p.delay(a).as_secs()).collect();
        assert_eq!(got, vec![2, 4, 8, 16, 32, 60, 60]);
    }
}
