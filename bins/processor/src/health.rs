//! Is the processor healthy? One answer for `/readyz` and for systemd's watchdog.
//!
//! - **Starting**: the engine has not completed a claim yet (connecting, migrating).
//! - **Running**: the loop made progress (a database round trip or a finished handler) within
//!   the stall timeout. An idle loop claims every poll interval and a busy one finishes a handler
//!   at least every handler timeout, and the stall timeout exceeds both, so a healthy loop is
//!   never taken for a stalled one.
//! - **Stalled**: no progress for longer: most often the database is unreachable, or a
//!   connection hangs.
//!
//! `/readyz` additionally asks the database (`SELECT 1`, 2 s at most) on a pool of its own, so a
//! probe never waits behind the engine's claims.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hook_core::Metrics;
use hook_store::deadpool_postgres::Pool;

/// How long `/readyz` waits for the database.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The loop's state; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LoopState {
    /// No claim has succeeded yet.
    Starting,
    /// Progress within the stall timeout.
    Running {
        /// Time since the last progress.
        since_progress: Duration,
    },
    /// No progress for longer than the stall timeout.
    Stalled {
        /// Time since the last progress.
        since_progress: Duration,
    },
}

/// Shared view of the processor's health; cheap to clone.
#[derive(Clone)]
pub(crate) struct Health {
    inner: Arc<Inner>,
}

struct Inner {
    stall_timeout: Duration,
    metrics: OnceLock<Arc<Metrics>>,
    probe_pool: OnceLock<Pool>,
    stopping: AtomicBool,
}

impl Health {
    pub(crate) fn new(stall_timeout: Duration) -> Health {
        Health {
            inner: Arc::new(Inner {
                stall_timeout,
                metrics: OnceLock::new(),
                probe_pool: OnceLock::new(),
                stopping: AtomicBool::new(false),
            }),
        }
    }

    /// The engine exists: its counters tell the loop's state from now on.
    pub(crate) fn attach_engine(&self, metrics: Arc<Metrics>) {
        let _ = self.inner.metrics.set(metrics);
    }

    /// The pool `/readyz` and the gauges query through.
    pub(crate) fn attach_probe_pool(&self, pool: Pool) {
        let _ = self.inner.probe_pool.set(pool);
    }

    pub(crate) fn probe_pool(&self) -> Option<&Pool> {
        self.inner.probe_pool.get()
    }

    pub(crate) fn metrics(&self) -> Option<&Arc<Metrics>> {
        self.inner.metrics.get()
    }

    /// Shutdown began: no longer ready.
    pub(crate) fn set_stopping(&self) {
        self.inner.stopping.store(true, Ordering::Relaxed);
    }

    pub(crate) fn loop_state(&self) -> LoopState {
        let Some(metrics) = self.inner.metrics.get() else { return LoopState::Starting };
        match (metrics.is_ready(), metrics.since_progress()) {
            (true, Some(since_progress)) if since_progress <= self.inner.stall_timeout => {
                LoopState::Running { since_progress }
            }
            (true, Some(since_progress)) => LoopState::Stalled { since_progress },
            _ => LoopState::Starting,
        }
    }

    /// The original's metrics line, or what the processor is doing before it has one.
    pub(crate) fn metrics_line(&self) -> String {
        match self.inner.metrics.get() {
            Some(metrics) => metrics.snapshot().to_string(),
            None => "starting".to_owned(),
        }
    }

    /// `Ok` when ready to process: started, not stopping, the loop not stalled, and the database
    /// answering within [`PROBE_TIMEOUT`]. Otherwise, why not.
    pub(crate) async fn readiness(&self) -> Result<String, String> {
        if self.inner.stopping.load(Ordering::Relaxed) {
            return Err("stopping".into());
        }
        let since_progress = match self.loop_state() {
            LoopState::Starting => return Err("starting: no claim has succeeded yet".into()),
            LoopState::Stalled { since_progress } => {
                return Err(format!(
                    "processing loop stalled: no progress for {:.1}s (stall timeout {:.1}s)",
                    since_progress.as_secs_f64(),
                    self.inner.stall_timeout.as_secs_f64()
                ))
            }
            LoopState::Running { since_progress } => since_progress,
        };
        let Some(pool) = self.inner.probe_pool.get() else { return Err("starting".into()) };
        let probe = async {
            let client = pool.get().await.map_err(|e| e.to_string())?;
            hook_store::stats::ping(&client).await.map_err(|e| e.to_string())
        };
        match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
            Ok(Ok(())) => {
                Ok(format!("ready: database answers, last progress {:.1}s ago", since_progress.as_secs_f64()))
            }
            Ok(Err(error)) => Err(format!("database unreachable: {error}")),
            Err(_) => Err(format!("database did not answer within {}s", PROBE_TIMEOUT.as_secs())),
        }
    }
}
