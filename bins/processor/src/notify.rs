//! systemd's notification protocol (`sd_notify(3)`): `READY=1` once the engine's first claim
//! succeeded, `WATCHDOG=1` only while the processing loop makes progress, `STATUS=` with the
//! metrics line, `EXTEND_TIMEOUT_USEC=` while starting, `STOPPING=1` on shutdown.
//!
//! The protocol is one datagram per message to the socket named by `NOTIFY_SOCKET`. The variables
//! (`NOTIFY_SOCKET`, `WATCHDOG_USEC`, `WATCHDOG_PID`) are read once at start and then removed
//! from the environment, so that child processes (the embedded cluster's `pg_ctl` and
//! `postgres`, which speak the protocol too) do not send on our behalf. Outside systemd (no
//! `NOTIFY_SOCKET`) every call does nothing.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::health::{Health, LoopState};

/// Where notifications go, and the watchdog interval systemd asked for.
#[derive(Debug)]
pub(crate) struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads the protocol's variables and removes them from the environment. Call before any
    /// thread is started (the environment is process-wide).
    pub(crate) fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET");
        let usec = std::env::var("WATCHDOG_USEC").ok().and_then(|v| v.parse::<u64>().ok());
        let pid = std::env::var("WATCHDOG_PID").ok().and_then(|v| v.parse::<u32>().ok());
        for name in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
            std::env::remove_var(name);
        }
        let watchdog = usec
            .filter(|&usec| usec > 0 && pid.is_none_or(|pid| pid == std::process::id()))
            .map(Duration::from_micros);
        let target = socket.and_then(|path| {
            let bytes = path.as_encoded_bytes();
            // '@' names a socket in the abstract namespace.
            let address = match bytes.strip_prefix(b"@") {
                Some(name) => SocketAddr::from_abstract_name(name),
                None => SocketAddr::from_pathname(&path),
            };
            match (UnixDatagram::unbound(), address) {
                (Ok(socket), Ok(address)) => Some((socket, address)),
                (Err(error), _) | (_, Err(error)) => {
                    warn!(%error, "NOTIFY_SOCKET is set but unusable; systemd will not hear from us");
                    None
                }
            }
        });
        Notifier { target, watchdog }
    }

    /// A notifier that sends nothing (for code paths that need one without systemd).
    #[cfg(test)]
    pub(crate) fn disabled() -> Notifier {
        Notifier { target: None, watchdog: None }
    }

    /// Whether systemd is listening.
    pub(crate) fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// The watchdog interval (`WatchdogSec=`), when systemd asked for pings.
    pub(crate) fn watchdog(&self) -> Option<Duration> {
        self.watchdog.filter(|_| self.enabled())
    }

    /// Sends one message (`KEY=value` lines); failures are logged, never fatal.
    pub(crate) fn send(&self, message: &str) {
        let Some((socket, address)) = &self.target else { return };
        if let Err(error) = socket.send_to_addr(message.as_bytes(), address) {
            debug!(%error, message, "sd_notify failed");
        }
    }

    /// `STATUS=`: one line shown by `systemctl status`.
    pub(crate) fn status(&self, text: &str) {
        self.send(&format!("STATUS={}", text.replace('\n', " ")));
    }

    /// Asks for `timeout` more time to start (or stop), counted from now.
    pub(crate) fn extend_timeout(&self, timeout: Duration) {
        self.send(&format!("EXTEND_TIMEOUT_USEC={}", timeout.as_micros()));
    }

    /// `STOPPING=1` with a status line.
    pub(crate) fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping: draining running handlers");
    }
}

/// While the processor starts (waiting for the database, migrating), asks systemd every 10 s for
/// 30 s more, so that a long migration is not killed by `TimeoutStartSec=` while a hung start
/// still is. Abort the task once started.
pub(crate) async fn extend_while_starting(notifier: Arc<Notifier>) {
    if !notifier.enabled() {
        return;
    }
    loop {
        notifier.extend_timeout(Duration::from_secs(30));
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

/// Sends `READY=1` once the engine's first claim succeeded, then keeps `STATUS=` current and,
/// when systemd asked for a watchdog, pings it while the loop makes progress. Runs until aborted.
pub(crate) async fn supervise(notifier: Arc<Notifier>, health: Health) {
    if !notifier.enabled() {
        return;
    }
    while matches!(health.loop_state(), LoopState::Starting) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    notifier.send(&format!("READY=1\nSTATUS={}", health.metrics_line()));
    info!("ready: the first claim succeeded");

    let watchdog = notifier.watchdog();
    // Ping at a quarter of the interval, so a late tick still lands inside it.
    let period = watchdog
        .map_or(Duration::from_secs(5), |w| (w / 4).clamp(Duration::from_millis(20), Duration::from_secs(5)));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stalled = false;
    let mut last_status = (String::new(), Instant::now());
    loop {
        ticker.tick().await;
        let status = match health.loop_state() {
            LoopState::Starting => continue,
            LoopState::Running { .. } => {
                if watchdog.is_some() {
                    notifier.send("WATCHDOG=1");
                }
                if stalled {
                    info!("the processing loop makes progress again");
                    stalled = false;
                }
                health.metrics_line()
            }
            LoopState::Stalled { since_progress } => {
                if !stalled {
                    warn!(
                        since_progress_s = since_progress.as_secs_f64(),
                        watchdog = watchdog.is_some(),
                        "the processing loop made no progress (no database round trip, no handler finished); \
                         withholding watchdog pings"
                    );
                    stalled = true;
                }
                format!(
                    "stalled: no progress for {}s (database unreachable?); {}",
                    since_progress.as_secs(),
                    health.metrics_line()
                )
            }
        };
        // The line's uptime changes every second; otherwise send it when it says something new.
        if status_changed(&last_status.0, &status) || last_status.1.elapsed() >= Duration::from_secs(30) {
            notifier.status(&status);
            last_status = (status, Instant::now());
        }
    }
}

/// Whether two status lines differ in more than the uptime.
fn status_changed(old: &str, new: &str) -> bool {
    let strip = |s: &str| s.rsplit_once(", Uptime=").map_or(s.to_owned(), |(head, _)| head.to_owned());
    strip(old) != strip(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_differing_only_in_uptime_are_the_same() {
        let a = "Metrics: Processed=1, Succeeded=1, Failed=0, Retried=0, Errors=0, Uptime=3s";
        let b = "Metrics: Processed=1, Succeeded=1, Failed=0, Retried=0, Errors=0, Uptime=4s";
        let c = "Metrics: Processed=2, Succeeded=2, Failed=0, Retried=0, Errors=0, Uptime=4s";
        assert!(!status_changed(a, b));
        assert!(status_changed(b, c));
        assert!(status_changed("", a));
    }

    #[test]
    fn a_disabled_notifier_sends_nothing() {
        let notifier = Notifier::disabled();
        assert!(!notifier.enabled());
        assert_eq!(notifier.watchdog(), None);
        notifier.send("READY=1");
    }
}
