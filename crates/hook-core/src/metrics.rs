//! Counters the engine keeps, and the seed's metrics line.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Running totals of one engine, updated only after outcomes are committed.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    processed: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    dead: AtomicU64,
    errors: AtomicU64,
    claimed: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            processed: AtomicU64::new(0),
            succeeded: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            dead: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            claimed: AtomicU64::new(0),
        }
    }
}

/// A copy of [`Metrics`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MetricsSnapshot {
    /// Attempts whose outcome was recorded.
    pub processed: u64,
    /// Attempts that succeeded.
    pub succeeded: u64,
    /// Attempts that failed (error, failure result, panic or timeout).
    pub failed: u64,
    /// Failed attempts that were scheduled for another try.
    pub retried: u64,
    /// Failed attempts after which the event reached the retry limit.
    pub dead: u64,
    /// Database errors (claims or completions that failed).
    pub errors: u64,
    /// Events claimed.
    pub claimed: u64,
    /// Time since the engine was built.
    pub uptime: Duration,
}

impl fmt::Display for MetricsSnapshot {
    /// The original service's line, so existing log searches keep working.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Metrics: Processed={}, Succeeded={}, Failed={}, Retried={}, Errors={}, Uptime={}s",
            self.processed,
            self.succeeded,
            self.failed,
            self.retried,
            self.errors,
            self.uptime.as_secs()
        )
    }
}

impl Metrics {
    /// The current values.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            processed: get(&self.processed),
            succeeded: get(&self.succeeded),
            failed: get(&self.failed),
            retried: get(&self.retried),
            dead: get(&self.dead),
            errors: get(&self.errors),
            claimed: get(&self.claimed),
            uptime: self.started.elapsed(),
        }
    }

    pub(crate) fn add_claimed(&self, n: usize) {
        self.claimed.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn add_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_committed(&self, succeeded: u64, retried: u64, dead: u64) {
        let failed = retried + dead;
        self.processed.fetch_add(succeeded + failed, Ordering::Relaxed);
        self.succeeded.fetch_add(succeeded, Ordering::Relaxed);
        self.failed.fetch_add(failed, Ordering::Relaxed);
        self.retried.fetch_add(retried, Ordering::Relaxed);
        self.dead.fetch_add(dead, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_line_format() {
        let m = Metrics::default();
        m.add_committed(415, 2, 2);
        m.add_error();
        let line = MetricsSnapshot { uptime: Duration::from_secs(120), ..m.snapshot() }.to_string();
        assert_eq!(line, "Metrics: Processed=419, Succeeded=415, Failed=4, Retried=2, Errors=1, Uptime=120s");
    }
}
