//! The retry policy: when a failed event is tried again, and when it is given up on.
//!
//! A pure function of the attempt number and a salt (the event id), so every schedule is
//! reproducible in tests. The store adds the delay to the database's clock, not ours, so clock
//! skew between processor and database cannot move retries.

use std::time::Duration;

use time::OffsetDateTime;

use crate::error::ConfigError;

/// The `hook_events` table's CHECK constraint caps `retry_count` at this value.
pub const RETRY_COUNT_LIMIT: u32 = 10;

/// Exponential backoff with jitter and a cap, plus the number of failed attempts after which an
/// event is dead.
///
/// The delay after the failure of attempt `n` (0-based: `n` is the event's `retry_count` before
/// this failure) is `base_delay * 2^n`, capped at `max_delay`, then moved by up to `jitter`
/// (a fraction) either way, never above `max_delay`.
///
/// ```
/// use std::time::Duration;
/// use hook_core::RetryPolicy;
///
/// let policy = RetryPolicy { jitter: 0.0, ..RetryPolicy::default() };
/// assert_eq!(policy.delay(0, 7), Duration::from_secs(2));
/// assert_eq!(policy.delay(2, 7), Duration::from_secs(8));
/// assert_eq!(policy.delay(20, 7), Duration::from_secs(300));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Delay after the first failure; doubles with each further one. Default 2 s.
    pub base_delay: Duration,
    /// Upper bound of any delay. Default 5 min.
    pub max_delay: Duration,
    /// Fraction of the delay by which it is randomly moved either way, in `0.0..=1.0`. Default 0.1.
    pub jitter: f64,
    /// Failed attempts after which the event is dead (left unprocessed and marked). Default 3,
    /// at most [`RETRY_COUNT_LIMIT`].
    pub max_retry_count: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base_delay: Duration::from_secs(2),
            max_delay: Duration::from_secs(300),
            jitter: 0.1,
            max_retry_count: 3,
        }
    }
}

impl RetryPolicy {
    /// Checks the policy; the engine builder calls this.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_retry_count == 0 || self.max_retry_count > RETRY_COUNT_LIMIT {
            return Err(ConfigError::MaxRetryCount(self.max_retry_count));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(ConfigError::Invalid(format!(
                "retry jitter {} is not within 0.0..=1.0",
                self.jitter
            )));
        }
        if self.base_delay > self.max_delay {
            return Err(ConfigError::Invalid(format!(
                "retry base delay {:?} is longer than the max delay {:?}",
                self.base_delay, self.max_delay
            )));
        }
        Ok(())
    }

    /// Whether an event that has now failed `retry_count` times is dead.
    pub fn is_dead(&self, retry_count: u32) -> bool {
        retry_count >= self.max_retry_count
    }

    /// The delay before the next attempt after attempt `attempt` (0-based) failed. `salt` picks
    /// the jitter (the engine passes bits of the event id), so the result is deterministic.
    pub fn delay(&self, attempt: u32, salt: u64) -> Duration {
        let factor = 2u32.checked_pow(attempt.min(31)).unwrap_or(u32::MAX);
        let raw = self.base_delay.checked_mul(factor).unwrap_or(self.max_delay).min(self.max_delay);
        if self.jitter == 0.0 {
            return raw;
        }
        // A value in [-1, 1) from the salt and the attempt.
        let unit = (splitmix64(salt ^ u64::from(attempt).rotate_left(32)) >> 11) as f64 / (1u64 << 53) as f64;
        let moved = raw.as_secs_f64() * (1.0 + self.jitter * (2.0 * unit - 1.0));
        Duration::from_secs_f64(moved.max(0.0)).min(self.max_delay)
    }

    /// When the next attempt is due, given the time of the failure.
    pub fn next_attempt_at(&self, now: OffsetDateTime, attempt: u32, salt: u64) -> OffsetDateTime {
        now + self.delay(attempt, salt)
    }
}

/// A fast, well-mixed 64-bit hash step (Steele, Lea and Flood's SplitMix64).
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(policy: RetryPolicy, attempt: u32, expected_secs: (f64, f64)) {
        for salt in 0..200u64 {
            let d = policy.delay(attempt, salt).as_secs_f64();
            assert!(
                d >= expected_secs.0 && d <= expected_secs.1,
                "attempt {attempt} salt {salt}: {d}s not within {expected_secs:?}"
            );
        }
    }

    #[test]
    fn exponential_schedule_without_jitter() {
        let p = RetryPolicy { jitter: 0.0, ..RetryPolicy::default() };
        for (attempt, secs) in [(0, 2.0), (1, 4.0), (2, 8.0), (3, 16.0), (7, 256.0), (8, 300.0), (40, 300.0)]
        {
            check(p, attempt, (secs, secs));
        }
    }

    #[test]
    fn jitter_stays_within_bounds_and_cap() {
        let p = RetryPolicy::default();
        check(p, 0, (1.8, 2.2));
        check(p, 3, (14.4, 17.6));
        check(p, 9, (270.0, 300.0));
        // Jitter actually varies with the salt.
        let distinct: std::collections::HashSet<u128> = (0..50).map(|s| p.delay(1, s).as_micros()).collect();
        assert!(distinct.len() > 40, "jitter produced only {} distinct delays", distinct.len());
        // And is deterministic.
        assert_eq!(p.delay(2, 99), p.delay(2, 99));
    }

    #[test]
    fn configurable_base() {
        let p = RetryPolicy { base_delay: Duration::from_millis(100), jitter: 0.0, ..RetryPolicy::default() };
        check(p, 0, (0.1, 0.1));
        check(p, 4, (1.6, 1.6));
    }

    #[test]
    fn next_attempt_adds_delay() {
        let p = RetryPolicy { jitter: 0.0, ..RetryPolicy::default() };
        let now = OffsetDateTime::UNIX_EPOCH;
        assert_eq!(p.next_attempt_at(now, 1, 0), now + Duration::from_secs(4));
    }

    #[test]
    fn validation() {
        let ok = |n| RetryPolicy { max_retry_count: n, ..RetryPolicy::default() }.validate();
        assert!(ok(1).is_ok());
        assert!(ok(10).is_ok());
        let err = ok(11).unwrap_err().to_string();
        assert!(err.contains("11") && err.contains("10"), "{err}");
        assert!(ok(0).is_err());
        assert!(RetryPolicy { jitter: 1.5, ..RetryPolicy::default() }.validate().is_err());
        assert!(RetryPolicy { base_delay: Duration::from_secs(600), ..RetryPolicy::default() }
            .validate()
            .is_err());
    }

    #[test]
    fn dead_at_the_limit() {
        let p = RetryPolicy::default();
        assert!(!p.is_dead(2));
        assert!(p.is_dead(3));
    }
}
