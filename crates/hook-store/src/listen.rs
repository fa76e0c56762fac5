//! The LISTEN connection that turns insert notifications into engine wakeups.

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;
use tokio_postgres::{AsyncMessage, Config};
use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::{debug, info, warn};

/// The channel the insert trigger notifies (see migration 0002).
pub const CHANNEL: &str = "hook_events";

/// Keeps a LISTEN connection open for as long as `wake` has receivers, and marks `wake` changed
/// for every notification and after every (re)connect, since events may have arrived while the
/// connection was down. Lost connections are retried with backoff; meanwhile the engine polls.
pub(crate) async fn listen_loop(config: Config, tls: MakeRustlsConnect, wake: watch::Sender<()>) {
    let mut delay = Duration::from_millis(100);
    let mut connected_before = false;
    // Failures in a row, logged as the engine's claim failures are (`is_loud_failure`).
    let mut failures = 0_u32;
    while !wake.is_closed() {
        match listen_once(&config, tls.clone(), &wake, &mut connected_before, &mut failures).await {
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

/// One LISTEN session: connects, listens, and marks `wake` for every notification until the
/// connection fails or `wake` has no receivers left.
///
/// The connection is driven in this task, and a notification marks `wake` straight from the
/// connection's message stream: no channel or second task between the socket and the engine, as
/// every hop is a scheduling delay on a busy machine.
async fn listen_once(
    config: &Config,
    tls: MakeRustlsConnect,
    wake: &watch::Sender<()>,
    connected_before: &mut bool,
    failures: &mut u32,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(tls).await?;
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    let statement = format!("LISTEN {CHANNEL}");
    let listen = client.batch_execute(&statement);
    tokio::pin!(listen);
    // The connection must be polled for LISTEN to complete.
    loop {
        tokio::select! {
            done = &mut listen => {
                done?;
                break;
            }
            message = messages.next() => match message {
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(error),
                None => return Ok(()),
            },
        }
    }
    if *connected_before {
        info!(failures = *failures, "LISTEN connection re-established");
    }
    *connected_before = true;
    *failures = 0;
    // Events may have arrived while we were not listening.
    wake.send_replace(());
    loop {
        tokio::select! {
            message = messages.next() => match message {
                Some(Ok(AsyncMessage::Notification(_))) => {
                    debug!("notification");
                    wake.send_replace(());
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(error),
                None => return Ok(()),
            },
            () = wake.closed() => return Ok(()),
        }
    }
}
