//! A claiming store's presence: a connection of its own that holds a session advisory lock on
//! the store's key, registered in `hook_events_processors` (migration 0012), for as long as the
//! process runs. When the process dies, the server ends that session and frees the lock, and
//! the next claim of any processor sees it (`processor_gone` in queries.rs): only then do claims
//! read the rows of batches in flight, until the recovery has turned the dead processor's batches
//! into suspects. See ARCHITECTURE.md, "The claim".
//!
//! The key is published only while the session holds the lock and the row is written; meanwhile
//! (before the first registration, or while the connection is being replaced) batches are
//! recorded without a key, and every claim reads their rows, as it reads a suspect's: safe, and
//! as costly as before migration 0012. A connection that was lost is replaced under a new key:
//! the old one's row is left to the recovery, which strikes it off once no ledger row names it.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::Config;
use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::{debug, warn};

use crate::deadline::within;
use crate::error::StoreError;

/// How often the presence connection asks the server something, so that a connection gone
/// silent is noticed and replaced (as the LISTEN connection's ping).
const PING_EVERY: Duration = Duration::from_secs(10);

/// How long the presence waits before asking again after the server refused its registration.
const REFUSED_RETRY: Duration = Duration::from_secs(30);

/// A store's presence, started by its first claim. [`PgStore::presence`](crate::PgStore::presence)
/// hands out a clone, so that a process can [`leave`](Presence::leave) cleanly after its engine
/// (which owns the store) has stopped.
#[derive(Debug, Clone)]
pub struct Presence {
    /// The registered key; 0 while there is none.
    key: Arc<AtomicI64>,
    started: Arc<AtomicBool>,
    /// Dropped with the store: the task then strikes its row off and ends.
    stop: Arc<watch::Sender<()>>,
    task: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl Presence {
    pub(crate) fn new() -> Self {
        let (stop, _) = watch::channel(());
        Self {
            key: Arc::new(AtomicI64::new(0)),
            started: Arc::new(AtomicBool::new(false)),
            stop: Arc::new(stop),
            task: Arc::default(),
        }
    }

    /// The key to record a batch under, if the presence is registered now.
    pub(crate) fn key(&self) -> Option<i64> {
        Some(self.key.load(Ordering::Acquire)).filter(|key| *key != 0)
    }

    /// Starts the presence task, once.
    pub(crate) fn start(&self, config: &Config, tls: &MakeRustlsConnect, call_timeout: Duration) {
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let (config, tls, key) = (config.clone(), tls.clone(), Arc::clone(&self.key));
        let stop = self.stop.subscribe();
        let task = tokio::spawn(presence_loop(config, tls, key, stop, call_timeout));
        *self.task.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(task);
    }

    /// Strikes the store's row off `hook_events_processors` and closes the presence connection,
    /// waiting up to 2 s: a process that exits without it leaves a row whose lock is free, which
    /// the other processors take for a crash (one needless recovery each).
    pub async fn leave(self) {
        self.stop();
        let task = self.task.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(task) = task {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
    }

    /// Ends the presence task (it strikes its row off first), as dropping the store does.
    pub(crate) fn stop(&self) {
        self.stop.send_replace(());
    }
}

/// Keeps a presence session registered until `stop` changes or its sender is dropped.
async fn presence_loop(
    config: Config,
    tls: MakeRustlsConnect,
    key: Arc<AtomicI64>,
    mut stop: watch::Receiver<()>,
    call_timeout: Duration,
) {
    let mut delay = Duration::from_millis(100);
    let mut failures = 0_u32;
    loop {
        let ended = session(&config, tls.clone(), &key, &mut stop, call_timeout).await;
        key.store(0, Ordering::Release);
        let mut wait = delay;
        match ended {
            Ok(true) => return,
            Ok(false) => delay = Duration::from_millis(100),
            Err(error) => {
                failures = failures.saturating_add(1);
                // The server refused a statement (no right on hook_events_processors, a table
                // that is not there): asking again every second changes nothing.
                let refused = matches!(&error, StoreError::Db(db) if db.as_db_error().is_some());
                if refused {
                    wait = REFUSED_RETRY;
                }
                if refused && hook_core::is_loud_failure(failures) {
                    warn!(error = %error, failures, retry_in_s = REFUSED_RETRY.as_secs(), "the processor's presence cannot be registered (see docs/roles.sql for the rights it needs); batches are recorded for every claim to read until it is");
                } else if hook_core::is_loud_failure(failures) {
                    warn!(error = %error, failures, "the processor's presence connection is lost; batches are recorded for every claim to read until it is back");
                } else {
                    debug!(error = %error, failures, "the processor's presence connection is lost; reconnecting");
                }
            }
        }
        if stop.has_changed().unwrap_or(true) {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

/// One presence session: connects, takes the lock on a new key, registers it, publishes it and
/// pings until the connection fails (`Err`) or `stop` changes (`Ok(true)`, after striking the row
/// off). `Ok(false)`: the connection ended cleanly.
async fn session(
    config: &Config,
    tls: MakeRustlsConnect,
    key: &AtomicI64,
    stop: &mut watch::Receiver<()>,
    call_timeout: Duration,
) -> Result<bool, StoreError> {
    let (client, connection) = within(call_timeout, "presence connect", config.connect(tls)).await?;
    let driver = tokio::spawn(connection);
    let ours = loop {
        let candidate = rand_key();
        if candidate != 0 {
            break candidate;
        }
    };
    let register = format!(
        "SELECT pg_advisory_lock({ours}); \
         INSERT INTO hook_events_processors (key, name) VALUES ({ours}, current_setting('application_name'))"
    );
    within(call_timeout, "presence registration", client.batch_execute(&register)).await?;
    key.store(ours, Ordering::Release);
    debug!(key = ours, "the processor's presence is registered");
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ping.tick() => {
                within(call_timeout, "presence ping", client.batch_execute("SELECT 1")).await?;
            }
            _ = stop.changed() => {
                key.store(0, Ordering::Release);
                // Batches recorded under the key may still be in flight; the recovery strikes
                // the row off if this fails, once they have ended.
                let leave = format!("DELETE FROM hook_events_processors WHERE key = {ours}");
                let _ = within(call_timeout, "presence exit", client.batch_execute(&leave)).await;
                drop(client);
                let _ = driver.await;
                return Ok(true);
            }
        }
        if driver.is_finished() {
            return Ok(false);
        }
    }
}

/// A random non-negative key (so its text needs no sign); 0 means none.
fn rand_key() -> i64 {
    let bytes = *uuid::Uuid::new_v4().as_bytes();
    let mut first = [0_u8; 8];
    first.copy_from_slice(&bytes[..8]);
    i64::from_le_bytes(first) & i64::MAX
}
