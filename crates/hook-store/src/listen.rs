//! The LISTEN connection that turns insert notifications into engine wakeups.

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_postgres::{AsyncMessage, Config, NoTls};
use tracing::{debug, info, warn};

/// The channel the insert trigger notifies (see migration 0002).
pub const CHANNEL: &str = "hook_events";

/// Keeps a LISTEN connection open for as long as `wake` has receivers, and marks `wake` changed
/// for every notification and after every (re)connect, since events may have arrived while the
/// connection was down. Lost connections are retried with backoff; meanwhile the engine polls.
pub(crate) async fn listen_loop(config: Config, wake: watch::Sender<()>) {
    let mut delay = Duration::from_millis(100);
    let mut connected_before = false;
    while !wake.is_closed() {
        match listen_once(&config, &wake, &mut connected_before).await {
            Ok(()) => delay = Duration::from_millis(100),
            Err(error) => {
                warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "LISTEN connection lost; polling until it is back");
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

async fn listen_once(
    config: &Config,
    wake: &watch::Sender<()>,
    connected_before: &mut bool,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(NoTls).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(_)) => {
                    if tx.send(()).is_err() {
                        return Ok(());
                    }
                }
                Ok(_) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    if *connected_before {
        info!("LISTEN connection re-established");
    }
    *connected_before = true;
    wake.send_replace(());
    loop {
        tokio::select! {
            got = rx.recv() => match got {
                Some(()) => {
                    debug!("notification");
                    wake.send_replace(());
                }
                None => break,
            },
            () = wake.closed() => break,
        }
    }
    drop(client);
    match driver.await {
        Ok(result) => result,
        Err(_) => Ok(()),
    }
}
