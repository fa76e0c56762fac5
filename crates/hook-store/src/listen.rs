//! The LISTEN connection that turns insert notifications into engine wakeups.

use std::future::Future;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tokio_postgres::{AsyncMessage, Config};
use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::{debug, info, warn};

use crate::deadline::within;
use crate::error::StoreError;

/// The channel the insert trigger notifies (see migration 0002).
pub const CHANNEL: &str = "hook_events";

/// How often, at most, the LISTEN connection (otherwise only ever read from) asks the server
/// something, so that a connection gone silent (which TCP keepalives miss when something between
/// us and the server still acknowledges) is noticed within the ping interval plus the call
/// timeout, and replaced. The interval is half the call timeout when that is shorter: with the
/// default 20 s, a ping every 10 s and a silent LISTEN connection replaced within 30 s.
const PING_EVERY_MAX: Duration = Duration::from_secs(10);

/// Keeps a LISTEN connection open for as long as `wake` has receivers, and marks `wake` changed
/// for every notification and after every (re)connect, since events may have arrived while the
/// connection was down. Lost connections are retried with backoff; meanwhile the engine polls.
/// Connecting, `LISTEN` and each ping must each answer within `call_timeout`.
pub(crate) async fn listen_loop(
    config: Config,
    tls: MakeRustlsConnect,
    wake: watch::Sender<()>,
    call_timeout: Duration,
) {
    let mut delay = Duration::from_millis(100);
    let mut connected_before = false;
    // Failures in a row, logged as the engine's claim failures are (`is_loud_failure`).
    let mut failures = 0_u32;
    while !wake.is_closed() {
        let session = Session { config: &config, call_timeout, wake: &wake };
        match session.run(tls.clone(), &mut connected_before, &mut failures).await {
            Ok(()) => delay = Duration::from_millis(100),
            Err(error) => {
                failures = failures.saturating_add(1);
                let retry_in_ms = delay.as_millis() as u64;
                if hook_core::is_loud_failure(failures) {
                    warn!(error = %error, retry_in_ms, failures, "LISTEN connection lost; polling until it is back");
                } else {
                    debug!(error = %error, retry_in_ms, failures, "LISTEN connection lost; polling until it is back");
                }
            }
        }
        tokio::time::sleep(delay).await;
        // As the engine's claim retries: back within a second of the database.
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

/// One LISTEN session's settings.
struct Session<'a> {
    config: &'a Config,
    call_timeout: Duration,
    wake: &'a watch::Sender<()>,
}

impl Session<'_> {
    /// Connects, listens, and marks `wake` for every notification until the connection fails
    /// (or stops answering pings) or `wake` has no receivers left.
    ///
    /// The connection is driven in this task, and a notification marks `wake` straight from the
    /// connection's message stream: no channel or second task between the socket and the engine,
    /// as every hop is a scheduling delay on a busy machine.
    async fn run(
        &self,
        tls: MakeRustlsConnect,
        connected_before: &mut bool,
        failures: &mut u32,
    ) -> Result<(), StoreError> {
        let (client, mut connection) =
            within(self.call_timeout, "LISTEN connect", self.config.connect(tls)).await?;
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        let statement = format!("LISTEN {CHANNEL}");
        // The connection must be polled for LISTEN to complete.
        if !self.drive(client.batch_execute(&statement), &mut messages, "LISTEN").await? {
            return Ok(());
        }
        if *connected_before {
            info!(failures = *failures, "LISTEN connection re-established");
        }
        *connected_before = true;
        *failures = 0;
        // Events may have arrived while we were not listening.
        self.wake.send_replace(());
        let every = (self.call_timeout / 2).clamp(Duration::from_millis(10), PING_EVERY_MAX);
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                message = messages.next() => {
                    if !self.on_message(message)? {
                        return Ok(());
                    }
                }
                _ = ping.tick() => {
                    // The ping repeats the LISTEN (a no-op on a channel already listened to), so
                    // pg_stat_activity keeps showing this session as the listener it is.
                    if !self.drive(client.batch_execute(&statement), &mut messages, "LISTEN ping").await? {
                        return Ok(());
                    }
                }
                () = self.wake.closed() => return Ok(()),
            }
        }
    }

    /// Runs `call` on the session's client within the call timeout while polling the connection
    /// (notifications that arrive meanwhile still wake the engine). `Ok(false)`: the connection
    /// ended cleanly first.
    async fn drive(
        &self,
        call: impl Future<Output = Result<(), tokio_postgres::Error>>,
        messages: &mut (impl Stream<Item = Result<AsyncMessage, tokio_postgres::Error>> + Unpin),
        what: &'static str,
    ) -> Result<bool, StoreError> {
        let driven = async {
            tokio::pin!(call);
            loop {
                tokio::select! {
                    done = &mut call => return done.map(|()| true).map_err(StoreError::from),
                    message = messages.next() => {
                        if !self.on_message(message)? {
                            return Ok(false);
                        }
                    }
                }
            }
        };
        within(self.call_timeout, what, driven).await
    }

    /// Handles one item of the connection's stream; `Ok(false)` when it ended.
    fn on_message(
        &self,
        message: Option<Result<AsyncMessage, tokio_postgres::Error>>,
    ) -> Result<bool, StoreError> {
        match message {
            Some(Ok(AsyncMessage::Notification(_))) => {
                debug!("notification");
                self.wake.send_replace(());
                Ok(true)
            }
            Some(Ok(_)) => Ok(true),
            Some(Err(error)) => Err(error.into()),
            None => Ok(false),
        }
    }
}
