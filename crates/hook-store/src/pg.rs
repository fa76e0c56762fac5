//! [`PgStore`]: the PostgreSQL implementation of hook-core's [`Store`].
//!
//! A claim is a transaction holding row locks (`FOR UPDATE SKIP LOCKED`) on the claimed events
//! while their handlers run; the outcomes are written and committed in that same transaction.
//! Why this design rather than a lease column is recorded in ARCHITECTURE.md; in short: one write
//! per event, a dead holder's claims are released the instant its session ends, and fencing is
//! free because only the lock holder can write the rows. `idle_in_transaction_session_timeout`
//! (the engine's claim timeout) bounds how long a wedged but connected holder keeps its claims.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use hook_core::{ClaimRequest, ClaimedBatch, HookEvent, Outcome, Store};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::Config;
use tracing::warn;

use crate::deadline::{within, DEFAULT_CALL_TIMEOUT};
use crate::error::StoreError;
use crate::listen;
use crate::migrate::{self, MigrationReport};
use crate::queries::{self, Claimed, Completion};

/// How a [`PgStore`] connects.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Pooled connections, at most. Each batch in flight holds one. Default 8.
    pub pool_size: usize,
    /// Whether to LISTEN for insert notifications (wakeups). Default true.
    pub listen: bool,
    /// How long to wait for a pooled connection. Default 30 s.
    pub pool_timeout: Duration,
    /// Extra trusted root certificates (PEM) for `sslmode=require`; see [`crate::tls`].
    pub tls_root_cert: Option<std::path::PathBuf>,
    /// Longest one claim, keep-alive or completion, one new pooled connection, and the LISTEN
    /// connection's connect and pings may wait for the database. Past it the call fails with
    /// [`StoreError::Timeout`] and its connection is closed, never reused. This catches what
    /// TCP keepalives cannot: a peer that acknowledges packets but never answers. Default
    /// [`DEFAULT_CALL_TIMEOUT`](crate::DEFAULT_CALL_TIMEOUT), 20 s.
    pub call_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            pool_size: 8,
            listen: true,
            pool_timeout: Duration::from_secs(30),
            tls_root_cert: None,
            call_timeout: DEFAULT_CALL_TIMEOUT,
        }
    }
}

/// The PostgreSQL store.
pub struct PgStore {
    pool: Pool,
    config: Config,
    wakeups: Option<watch::Receiver<()>>,
    listener: Option<JoinHandle<()>>,
    call_timeout: Duration,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Some(listener) = self.listener.take() {
            listener.abort();
        }
    }
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("database", &crate::redacted(&self.config)).finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects (checking one connection right away, so bad settings fail here) and, when
    /// `options.listen`, starts the LISTEN task. TCP keepalives and `tcp_user_timeout` are set
    /// where `config` leaves them unset ([`crate::apply_network_defaults`]).
    pub async fn connect(mut config: Config, options: StoreOptions) -> Result<Self, StoreError> {
        crate::apply_network_defaults(&mut config);
        let call_timeout = options.call_timeout;
        let tls = crate::tls::make_tls(&config, options.tls_root_cert.as_deref())?;
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(options.pool_timeout))
            // connect_timeout covers only the TCP connect; this bounds TLS, startup and auth.
            .create_timeout(Some(call_timeout))
            .recycle_timeout(Some(call_timeout))
            .build()
            .map_err(|e| StoreError::Pool(e.to_string()))?;
        drop(pool.get().await?);
        let (wakeups, listener) = if options.listen {
            let (tx, rx) = watch::channel(());
            (Some(rx), Some(tokio::spawn(listen::listen_loop(config.clone(), tls, tx, call_timeout))))
        } else {
            (None, None)
        };
        Ok(Self { pool, config, wakeups, listener, call_timeout })
    }

    /// The connection pool, for queries outside the claim path.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The connection settings (log them with [`redacted`](crate::redacted)).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Applies pending migrations (see [`migrate::migrate`]).
    pub async fn migrate(&self) -> Result<MigrationReport, StoreError> {
        let client = self.pool.get().await?;
        migrate::migrate(&client).await
    }
}

impl Store for PgStore {
    type Error = StoreError;
    type Batch = PgBatch;

    /// Bounded by the call timeout: a silent database fails the claim, and its connection is
    /// closed (`TxConn`), instead of holding up the engine's loop.
    async fn claim(&self, request: ClaimRequest) -> Result<Option<PgBatch>, StoreError> {
        within(self.call_timeout, "claim", self.claim_unbounded(request)).await
    }

    fn wakeups(&self) -> Option<watch::Receiver<()>> {
        self.wakeups.clone()
    }
}

impl PgStore {
    async fn claim_unbounded(&self, request: ClaimRequest) -> Result<Option<PgBatch>, StoreError> {
        let conn = TxConn::new(self.pool.get().await?);
        let client = conn.client()?;
        let begin = format!(
            "BEGIN; SET LOCAL idle_in_transaction_session_timeout = {}",
            request.claim_timeout.as_millis().max(1)
        );
        // BEGIN and the claim are pipelined: one round trip.
        let (begun, claimed) = futures::join!(
            client.batch_execute(&begin),
            queries::claim_events(client, request.limit, request.max_retry_count)
        );
        begun?;
        let Claimed { events, set_aside } = claimed?;
        if events.is_empty() && set_aside == 0 {
            client.batch_execute("COMMIT").await?;
            conn.release();
            return Ok(None);
        }
        // With rows set aside and no events, the batch still goes to the engine: finishing it
        // commits the set-asides, and its size tells the engine to claim again at once.
        Ok(Some(PgBatch { conn, events, set_aside, call_timeout: self.call_timeout }))
    }
}

/// Events claimed by one transaction; see [`PgStore`].
pub struct PgBatch {
    conn: TxConn,
    events: Vec<HookEvent>,
    set_aside: usize,
    call_timeout: Duration,
}

impl ClaimedBatch for PgBatch {
    type Error = StoreError;

    fn take_events(&mut self) -> Vec<HookEvent> {
        std::mem::take(&mut self.events)
    }

    fn set_aside(&self) -> usize {
        self.set_aside
    }

    /// A trivial statement in the claim's transaction: it restarts the server's
    /// `idle_in_transaction_session_timeout`, so the claim lives on while handlers run, and fails
    /// if the session is gone or silent for the call timeout.
    async fn keep_alive(&self) -> Result<(), StoreError> {
        within(self.call_timeout, "keep-alive", self.conn.client()?.batch_execute("SELECT 1")).await
    }

    /// Bounded by the call timeout; past it the connection is closed with the batch, and
    /// whether a `COMMIT` already sent took effect is unknown ([`StoreError::Timeout`]).
    async fn finish(self, outcomes: Vec<Outcome>) -> Result<(), StoreError> {
        within(self.call_timeout, "recording outcomes", self.finish_unbounded(outcomes)).await
    }
}

impl PgBatch {
    async fn finish_unbounded(self, outcomes: Vec<Outcome>) -> Result<(), StoreError> {
        let client = self.conn.client()?;
        let completion = Completion::new(outcomes);
        let written = queries::record_outcomes_and_commit(client, &completion).await?;
        if written != completion.len() as u64 {
            warn!(expected = completion.len(), written, "some outcomes matched no unprocessed row");
        }
        self.conn.release();
        Ok(())
    }
}

/// A pooled connection inside a transaction. Dropped without [`release`](TxConn::release) (a
/// cancelled or failed claim), it is detached from the pool and closed, so the server rolls the
/// transaction back and no later user of the pool inherits it.
struct TxConn(Option<Object>);

impl TxConn {
    fn new(conn: Object) -> Self {
        Self(Some(conn))
    }

    fn client(&self) -> Result<&Object, StoreError> {
        self.0.as_ref().ok_or_else(|| StoreError::Pool("connection already released".into()))
    }

    /// Returns the connection to the pool; the transaction must be over.
    fn release(mut self) {
        self.0.take();
    }
}

impl Drop for TxConn {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            drop(Object::take(conn));
        }
    }
}
