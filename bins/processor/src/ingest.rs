//! The ingest socket (`HOOK_INGEST_SOCKET`): `hook-ingest`'s fast path into the database. The
//! server is `hook_ingest::server`; here it gets its socket, a connection pool of its own (so
//! hooks never wait behind claims, nor claims behind hooks) and its stop signal.

use std::time::Duration;

use anyhow::Context;
use hook_ingest::server::{self, Listener, ServerConfig};
use hook_store::tokio_postgres::Config;
use hook_store::{PgStore, StoreOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

use crate::config::IngestSocket;

/// Binds the socket and serves it until `stop` turns true. Fails when the socket cannot be made
/// or another processor serves it.
pub(crate) async fn start(
    pg_config: &Config,
    options: &StoreOptions,
    socket: &IngestSocket,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<JoinHandle<()>> {
    let listener = Listener::bind(&socket.path, socket.mode).context("setting up the ingest socket")?;
    // One insert runs at a time; the second connection replaces a broken one without a wait.
    let pool_options =
        StoreOptions { pool_size: 2, listen: false, pool_timeout: Duration::from_secs(5), ..options.clone() };
    let store = PgStore::connect(pg_config.clone(), pool_options)
        .await
        .context("connecting the ingest socket's pool")?;
    #[allow(unused_mut)]
    let mut config =
        ServerConfig { synchronous_commit: socket.synchronous_commit, ..ServerConfig::default() };
    // Only in debug builds: the tests that kill a processor between a commit and its answer.
    #[cfg(debug_assertions)]
    if let Some(ms) = std::env::var("HOOK_INGEST_TEST_ANSWER_DELAY").ok().and_then(|v| v.parse().ok()) {
        config.answer_delay = Duration::from_millis(ms);
    }
    info!(socket = %socket.path.display(), mode = %format!("{:04o}", socket.mode), "accepting events from hook-ingest");
    Ok(tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
        };
        server::serve(listener, store.pool().clone(), config, shutdown).await;
        drop(store);
    }))
}
