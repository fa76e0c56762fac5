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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use hook_core::{ClaimRequest, ClaimedBatch, Finished, HookEvent, Outcome, Resolution, SessionOrder, Store};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::Config;
use tracing::{debug, warn};
use uuid::Uuid;

use crate::deadline::{within, DEFAULT_CALL_TIMEOUT};
use crate::error::StoreError;
use crate::indexes;
use crate::listen;
use crate::migrate::{self, MigrationReport};
use crate::presence::Presence;
use crate::queries::{self, Claimed, CommitError, Completion, LedgerEnd, OrderRules};

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
    /// How often the store looks below its low-water mark for events the claims would not
    /// reach (see [`PgStore::rescan`]): the longest an event that became claimable out of order
    /// waits for a claim, plus the engine's poll interval. Default 10 s. While vacuum cannot
    /// remove dead index entries (a held snapshot) and a full look below the mark grows slow,
    /// the looks between full ones cover only the last two intervals below the mark (see
    /// ARCHITECTURE.md, "The low-water mark").
    pub rescan_interval: Duration,
    /// Whether claims start reading the fresh index at the store's low-water mark (default)
    /// rather than at its beginning. Off only to measure what the mark saves (`hook-bench
    /// --no-low-water-mark`).
    pub low_water_mark: bool,
    /// Which events are attempted in session order (see [`queries::claim_events_ordered`] and
    /// docs/routes.md, "Session order"). Default: none; the claim is then the same as without
    /// the feature.
    pub session_order: SessionOrder,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            pool_size: 8,
            listen: true,
            pool_timeout: Duration::from_secs(30),
            tls_root_cert: None,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            rescan_interval: Duration::from_secs(10),
            low_water_mark: true,
            session_order: SessionOrder::default(),
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
    /// Whether the latest claim saw suspects waiting (true at first, so that a processor
    /// restarted after a crash recovers first).
    suspects: Arc<AtomicBool>,
    /// The store's presence (registered by its first claim), whose key its batches' ledger rows
    /// carry.
    presence: Presence,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    /// The low-water mark of the claims on the fresh index.
    mark: Mark,
    rescan_interval: Duration,
    low_water_mark: bool,
    /// Wakes the engine (as a NOTIFY does) when a rescan lowered the mark.
    wake: Option<watch::Sender<()>>,
    /// The rules of session order, when some route is ordered.
    order: Option<Arc<OrderRules>>,
}

/// A full rescan (every event below the mark) that took `d` starts again no sooner than
/// `FULL_RESCAN_SHARE * d` after it started, so that full rescans take at most 1 % of the time
/// whatever they walk; the rescans in between are recent ones (see [`Mark`]).
const FULL_RESCAN_SHARE: u32 = 100;

/// The longest pause between full rescans, however long the last one took (one that timed out
/// after the store's call timeout would otherwise postpone the next by an hour).
const FULL_RESCAN_MAX_PAUSE: Duration = Duration::from_secs(300);

/// A recent rescan looks at the events created in the last `RECENT_RESCAN_INTERVALS` rescan
/// intervals below the mark, and at least [`RECENT_RESCAN_MIN`].
const RECENT_RESCAN_INTERVALS: u32 = 2;

/// The shortest window of a recent rescan (a `rescan_interval` of zero would make it empty).
const RECENT_RESCAN_MIN: Duration = Duration::from_secs(2);

/// Failed rescans in a row after which the store warns (once, until one succeeds): events that
/// come back below the mark wait for them.
const RESCAN_FAILURES_WARNED: u32 = 3;

/// A store's low-water mark on `hook_events_fresh_idx`: where its claims start reading events
/// never tried (see ARCHITECTURE.md, "What a claim reads"). Each claim moves it to what it saw
/// ([`Claimed::floor`]); rows that come back below it (a batch released or rolled back, rows it
/// held back) lower it again; and every `rescan_interval` a rescan looks below it, off the
/// claim's path, for rows that became claimable out of order.
///
/// That rescan is a full one (every event below the mark) when the last full one is at least an
/// interval and [`FULL_RESCAN_SHARE`] times its own duration ago (or [`FULL_RESCAN_MAX_PAUSE`]
/// ago, whichever is sooner): always, unless vacuum cannot remove what a full rescan walks (a
/// held snapshot, where it walks one dead index entry per event processed since, and took 0.9 s
/// after 10 minutes at 500 events/s). Otherwise it is a recent one, which looks only at the
/// events created in the last [`RECENT_RESCAN_INTERVALS`] intervals (at least
/// [`RECENT_RESCAN_MIN`]) below the mark, where a late commit lands.
#[derive(Debug, Clone)]
struct Mark(Arc<std::sync::Mutex<MarkState>>);

#[derive(Debug, Default)]
struct MarkState {
    /// `None`: from the beginning.
    floor: Option<OffsetDateTime>,
    /// Counts the lowerings, so that a claim that began before one never moves the mark above
    /// what it lowered.
    lowered: u64,
    /// When the last rescan began.
    rescanned: Option<tokio::time::Instant>,
    rescanning: bool,
    /// When the last full rescan began (`None`: none yet), and how long it took.
    fully_rescanned: Option<tokio::time::Instant>,
    full_rescan_took: Duration,
    /// Rescans failed in a row.
    rescan_failures: u32,
}

impl MarkState {
    /// How long after the last full rescan began the next one may begin.
    fn full_rescan_pause(&self, interval: Duration) -> Duration {
        interval.max(self.full_rescan_took.saturating_mul(FULL_RESCAN_SHARE).min(FULL_RESCAN_MAX_PAUSE))
    }
}

/// A rescan to run: below `floor`, from `from` on (`None`: a full rescan).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rescan {
    floor: OffsetDateTime,
    from: Option<OffsetDateTime>,
}

/// The earlier of two marks (`None` is the beginning).
fn earlier(a: Option<OffsetDateTime>, b: Option<OffsetDateTime>) -> Option<OffsetDateTime> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        _ => None,
    }
}

impl Mark {
    /// From the beginning; the first rescan one interval from now.
    fn new() -> Self {
        let state = MarkState { rescanned: Some(tokio::time::Instant::now()), ..MarkState::default() };
        Mark(Arc::new(std::sync::Mutex::new(state)))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MarkState> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Where a claim starts, and the lowering count it saw.
    fn begin(&self) -> (Option<OffsetDateTime>, u64) {
        let state = self.state();
        (state.floor, state.lowered)
    }

    /// Moves the mark to what a claim that began at `lowered` saw.
    fn advance(&self, lowered: u64, floor: Option<OffsetDateTime>) {
        let mut state = self.state();
        state.floor = if state.lowered == lowered { floor } else { earlier(state.floor, floor) };
    }

    /// Rows older than the mark may be claimable again: the next claims start at `floor`.
    fn lower(&self, floor: Option<OffsetDateTime>) {
        let mut state = self.state();
        state.floor = earlier(state.floor, floor);
        state.lowered += 1;
    }

    /// The rescan to run, if one is due (and none is running); marks it running.
    fn rescan_due(&self, interval: Duration) -> Option<Rescan> {
        let mut state = self.state();
        let now = tokio::time::Instant::now();
        let due = state.rescanned.is_none_or(|at| now.duration_since(at) >= interval);
        let floor = state.floor?;
        if state.rescanning || !due {
            return None;
        }
        state.rescanning = true;
        state.rescanned = Some(now);
        let pause = state.full_rescan_pause(interval);
        let full = state.fully_rescanned.is_none_or(|at| now.duration_since(at) >= pause);
        let from = if full {
            state.fully_rescanned = Some(now);
            None
        } else {
            time::Duration::try_from(interval.saturating_mul(RECENT_RESCAN_INTERVALS).max(RECENT_RESCAN_MIN))
                .ok()
                .and_then(|window| floor.checked_sub(window))
        };
        Some(Rescan { floor, from })
    }

    /// The rescan `rescan` ended, its query after `took` (`None`: it never ran), and failed or
    /// not; returns whether the failures in a row just reached [`RESCAN_FAILURES_WARNED`].
    fn rescan_done(&self, rescan: Rescan, took: Option<Duration>, failed: bool) -> bool {
        let mut state = self.state();
        state.rescanning = false;
        state.rescan_failures = if failed { state.rescan_failures.saturating_add(1) } else { 0 };
        if rescan.from.is_none() {
            match took {
                Some(took) => state.full_rescan_took = took,
                // No full rescan happened: the next one is full.
                None => state.fully_rescanned = None,
            }
        }
        state.rescan_failures == RESCAN_FAILURES_WARNED
    }
}

/// Lowers its store's mark when dropped, unless disarmed: a batch's locked rows come back
/// unchanged (released, rolled back, or held back) unless it commits with none held back.
#[derive(Debug)]
struct MarkGuard {
    mark: Mark,
    /// The mark of the claim that locked the rows (at or before each of them); `None`: disarmed.
    floor: Option<Option<OffsetDateTime>>,
}

impl Drop for MarkGuard {
    fn drop(&mut self) {
        if let Some(floor) = self.floor.take() {
            self.mark.lower(floor);
        }
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Some(listener) = self.listener.take() {
            listener.abort();
        }
        self.presence.stop();
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
        let (wakeups, listener, wake) = if options.listen {
            let (tx, rx) = watch::channel(());
            let wake = tx.clone();
            (
                Some(rx),
                Some(tokio::spawn(listen::listen_loop(config.clone(), tls.clone(), tx, call_timeout))),
                Some(wake),
            )
        } else {
            (None, None, None)
        };
        Ok(Self {
            pool,
            config,
            wakeups,
            listener,
            call_timeout,
            suspects: Arc::new(AtomicBool::new(true)),
            presence: Presence::new(),
            tls,
            mark: Mark::new(),
            rescan_interval: options.rescan_interval,
            low_water_mark: options.low_water_mark,
            wake,
            order: OrderRules::new(&options.session_order).map(Arc::new),
        })
    }

    /// Looks below the store's low-water mark, now, for an event never tried that no claim
    /// holds, and lowers the mark to it so that the next claim takes it; returns whether it
    /// found one. The store does this by itself every [`StoreOptions::rescan_interval`], in the
    /// background, while it claims: it catches events that became claimable out of order (a
    /// producer's transaction that ran longer than [`LATE_COMMIT_MARGIN`](crate::LATE_COMMIT_MARGIN)
    /// before it committed, a producer's clock behind the database's, a batch another process
    /// released, the original's reset SQL or hook-replay on old events).
    pub async fn rescan(&self) -> Result<bool, StoreError> {
        let Some(floor) = self.mark.begin().0 else { return Ok(false) };
        let client = self.pool.get().await?;
        let found =
            within(self.call_timeout, "rescan", queries::rescan(&client, floor, None, self.order.as_deref()))
                .await?;
        if let Some(at) = found {
            self.mark.lower(at);
            if let Some(wake) = &self.wake {
                wake.send_replace(());
            }
        }
        Ok(found.is_some())
    }

    /// Starts a background rescan when one is due.
    fn rescan_if_due(&self) {
        let Some(rescan) = self.mark.rescan_due(self.rescan_interval) else { return };
        let (pool, mark, call_timeout) = (self.pool.clone(), self.mark.clone(), self.call_timeout);
        let (wake, order) = (self.wake.clone(), self.order.clone());
        tokio::spawn(async move {
            // Only the query's own time counts (not the wait for a connection): `None` when it
            // never ran (no connection), so that the next rescan is a full one again.
            let mut queried = None;
            let found = within(call_timeout, "rescan", async {
                let client = pool.get().await?;
                queried = Some(tokio::time::Instant::now());
                queries::rescan(&client, rescan.floor, rescan.from, order.as_deref()).await
            })
            .await;
            let report = mark.rescan_done(rescan, queried.map(|at| at.elapsed()), found.is_err());
            match found {
                Ok(Some(at)) => {
                    debug!(below = %rescan.floor, full = rescan.from.is_none(), "the rescan found a claimable event below the low-water mark");
                    mark.lower(at);
                    if let Some(wake) = &wake {
                        wake.send_replace(());
                    }
                }
                Ok(None) => {}
                Err(error) if report => warn!(
                    error = %error,
                    "the rescan below the low-water mark failed {RESCAN_FAILURES_WARNED} times in a row: \
                     events that come back below it (replays, the reset SQL, late commits) wait until it succeeds"
                ),
                Err(error) => {
                    debug!(error = %error, "the rescan below the low-water mark failed; it is tried again later")
                }
            }
        });
    }

    /// The store's presence, to [`leave`](Presence::leave) when the process stops.
    pub fn presence(&self) -> Presence {
        self.presence.clone()
    }

    /// The connection pool, for queries outside the claim path.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The connection settings (log them with [`redacted`](crate::redacted)).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Applies pending migrations (see [`migrate::migrate`]). When some route is in session
    /// order ([`StoreOptions::session_order`]) and its index ([`indexes::SESSION_ORDER`]) is
    /// missing, it also starts building it in a task of its own, on one of the pool's
    /// connections, and returns without waiting: a build waits for every older transaction (a
    /// `pg_dump`, a long report) and takes minutes on a large table, and the claims, ordered ones
    /// included, are right without it (an ordered one then reads every pending event). The task
    /// logs `index built`, or a warning when it cannot build (a role that does not own the
    /// table).
    pub async fn migrate(&self) -> Result<MigrationReport, StoreError> {
        let client = self.pool.get().await?;
        let report = migrate::migrate(&client).await?;
        if self.order.is_some() && !indexes::missing(&client, indexes::SESSION_ORDER).await?.is_empty() {
            let pool = self.pool.clone();
            tokio::spawn(async move {
                indexes::build_logged(
                    &pool,
                    indexes::SESSION_ORDER,
                    "ordered claims read every pending event until it is",
                )
                .await
            });
        }
        Ok(report)
    }

    /// Builds the indexes of `set` that are missing (see [`indexes::ensure`]), e.g.
    /// [`indexes::CONSOLE`] before serving the console, and returns their names.
    pub async fn ensure_indexes(
        &self,
        set: &[indexes::OptionalIndex],
    ) -> Result<Vec<&'static str>, StoreError> {
        let client = self.pool.get().await?;
        indexes::ensure(&client, set).await
    }
}

impl Store for PgStore {
    type Error = StoreError;
    type Batch = PgBatch;

    /// Bounded by the call timeout: a silent database fails the claim, and its connection is
    /// closed (`TxConn`), instead of holding up the engine's loop.
    async fn claim(&self, request: ClaimRequest) -> Result<Option<PgBatch>, StoreError> {
        match within(self.call_timeout, "claim", self.claim_unbounded(request)).await {
            Err(error) => Err(self.explain(error).await),
            claimed => claimed,
        }
    }

    fn wakeups(&self) -> Option<watch::Receiver<()>> {
        self.wakeups.clone()
    }

    fn suspects_waiting(&self) -> bool {
        self.suspects.load(Ordering::Relaxed)
    }
}

impl PgStore {
    /// A claim the server refused for a reason the table's shape explains (a column whose changed
    /// type lacks an operator the claim uses, a missing column): the schema check's error, which
    /// names the column and the fix, instead of the server's. Any other error is returned as it is.
    async fn explain(&self, error: StoreError) -> StoreError {
        let StoreError::Db(db) = &error else { return error };
        let shape = db
            .code()
            .is_some_and(|code| matches!(code.code(), "42883" | "42804" | "42703" | "42P01" | "42846"));
        if !shape {
            return error;
        }
        let Ok(client) = self.pool.get().await else { return error };
        match crate::schema::check(&client, crate::schema::Scope::QUEUE).await {
            Err(mismatch) if mismatch.is_schema_mismatch() => mismatch,
            _ => error,
        }
    }

    async fn claim_unbounded(&self, request: ClaimRequest) -> Result<Option<PgBatch>, StoreError> {
        self.presence.start(&self.config, &self.tls, self.call_timeout);
        let conn = TxConn::new(self.pool.get().await?);
        let client = conn.client()?;
        let begin = format!(
            "BEGIN; SET LOCAL idle_in_transaction_session_timeout = {}; {}",
            request.claim_timeout.as_millis().max(1),
            queries::CLAIM_SAVEPOINT
        );
        let mut ledger = Ledger::Ordinary { id: Uuid::nil(), recorded: false };
        if self.low_water_mark {
            self.rescan_if_due();
        }
        let (floor, lowered) = self.mark.begin();
        // Whether the claim read the fresh index (and so moves the mark).
        let mut marked = self.low_water_mark;
        // Lowers the mark again if the rows this claim locks come back. Until the claim is done
        // they are at or above `floor`: if it fails (or is dropped at the call timeout), they
        // come back unlocked, while another claim of this store may have moved the mark past
        // them meanwhile. Once it is done, at or above `claimed.floor` (its batch's rows).
        let mut guard = MarkGuard { mark: self.mark.clone(), floor: marked.then_some(floor) };
        let claimed = if request.isolate {
            // Recover what dead holders left, then one crash to count or one suspect to run
            // alone; if there is neither, an ordinary claim in the same transaction.
            queries::recover_and_begin(client, &begin).await?;
            if let Some((event, id, xid)) = queries::claim_crashed(client).await? {
                guard.floor = None;
                self.suspects.store(true, Ordering::Relaxed);
                let ledger = Ledger::Crashed { id, event: event.id };
                return Ok(Some(PgBatch::new(
                    conn,
                    self,
                    Claimed { xid, ..Claimed::default() },
                    ledger,
                    vec![event],
                )));
            }
            match queries::claim_suspect(client, &request).await? {
                Some((claimed, id)) => {
                    let event = claimed.events.first().map(|e| e.id);
                    if let Some(event) = event {
                        ledger = Ledger::Isolated { id, event, recorded: false };
                    }
                    self.suspects.store(true, Ordering::Relaxed);
                    marked = false;
                    claimed
                }
                None => {
                    let claimed =
                        queries::claim_events_ordered(client, &request, None, floor, self.order.as_deref())
                            .await?;
                    // What is left is locked by other claimers, which handle it.
                    self.suspects.store(false, Ordering::Relaxed);
                    claimed
                }
            }
        } else {
            // BEGIN and the claim are pipelined: one round trip.
            let claimed =
                queries::claim_events_ordered(client, &request, Some(&begin), floor, self.order.as_deref())
                    .await?;
            self.suspects.store(claimed.suspects, Ordering::Relaxed);
            claimed
        };
        // The rows this claim locked come back below the mark it leaves if its batch does not
        // commit them: the guard lowers the mark again then.
        guard.floor = marked.then_some(claimed.floor);
        if marked {
            self.mark.advance(lowered, claimed.floor);
        }
        if claimed.events.is_empty() && claimed.set_aside == 0 && claimed.held_back == 0 {
            client.batch_execute("COMMIT").await?;
            conn.release();
            // Nothing was locked: nothing comes back.
            guard.floor = None;
            return Ok(None);
        }
        // With rows set aside and no events, the batch still goes to the engine: finishing it
        // commits the set-asides, and its size tells the engine to claim again at once.
        let mut batch = PgBatch::new(conn, self, claimed, ledger, Vec::new());
        batch.returned = Some(guard);
        Ok(Some(batch))
    }
}

/// How long a batch that ended in this process keeps trying to clear its ledger row.
const FORGET_PATIENCE: Duration = Duration::from_secs(60);

/// A batch's row in the claim ledger, `hook_events_claims` (see ARCHITECTURE.md, "The claim").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ledger {
    /// An ordinary batch: its row, written by `start` and deleted when the batch ends, names the
    /// events handed to handlers.
    Ordinary { id: Uuid, recorded: bool },
    /// One suspect run alone: its queued row, taken over by `start`.
    Isolated { id: Uuid, event: Uuid, recorded: bool },
    /// A crash being counted: the row of the isolated attempt that died.
    Crashed { id: Uuid, event: Uuid },
}

impl Ledger {
    /// What becomes of the row when the batch commits `outcomes`.
    fn at_commit(self, outcomes: &[Outcome]) -> LedgerEnd {
        let outcome = |event: Uuid| outcomes.iter().find(|o| o.id == event);
        match self {
            Ledger::Ordinary { id, recorded: true } => LedgerEnd::Forget(id),
            Ledger::Isolated { id, event, recorded: true } => match outcome(event) {
                Some(_) => LedgerEnd::Forget(id),
                // Its handler did not finish (drain timeout): still a suspect.
                None => LedgerEnd::Requeue(id),
            },
            Ledger::Crashed { id, event } => match outcome(event).map(|o| &o.resolution) {
                Some(Resolution::Failed { retry_after: None, .. }) => LedgerEnd::Forget(id),
                // Its next attempt is handled alone too.
                Some(_) => LedgerEnd::Requeue(id),
                None => LedgerEnd::Keep,
            },
            Ledger::Ordinary { recorded: false, .. } | Ledger::Isolated { recorded: false, .. } => {
                LedgerEnd::Keep
            }
        }
    }

    /// What becomes of the row when the batch ends without outcomes for a reason the engine
    /// knows (released, claim lost, completion refused): nothing crashed.
    fn at_release(self) -> LedgerEnd {
        match self {
            Ledger::Ordinary { id, recorded: true } => LedgerEnd::Forget(id),
            Ledger::Isolated { id, recorded: true, .. } => LedgerEnd::Requeue(id),
            _ => LedgerEnd::Keep,
        }
    }
}

/// Events claimed by one transaction; see [`PgStore`].
pub struct PgBatch {
    conn: TxConn,
    pool: Pool,
    /// The presence key the batch's ledger row was written under, if any.
    processor: Option<i64>,
    presence: Presence,
    events: Vec<HookEvent>,
    event_ids: Vec<Uuid>,
    crashed: Vec<HookEvent>,
    set_aside: usize,
    call_timeout: Duration,
    held_back: usize,
    bytes: u64,
    xid: Option<String>,
    ledger: Ledger,
    /// Lowers the store's mark unless the batch commits with nothing held back.
    returned: Option<MarkGuard>,
    /// The batch holds heads of sessions in order: its commit notifies every processor, since it
    /// may make the next event of each session claimable.
    notify: bool,
}

impl PgBatch {
    fn new(conn: TxConn, store: &PgStore, claimed: Claimed, ledger: Ledger, crashed: Vec<HookEvent>) -> Self {
        let event_ids = claimed.events.iter().map(|e| e.id).collect();
        let notify = claimed.heads > 0;
        Self {
            conn,
            pool: store.pool.clone(),
            processor: None,
            presence: store.presence.clone(),
            events: claimed.events,
            event_ids,
            crashed,
            set_aside: claimed.set_aside,
            held_back: claimed.held_back,
            bytes: claimed.bytes,
            xid: claimed.xid,
            ledger,
            call_timeout: store.call_timeout,
            returned: None,
            notify,
        }
    }

    /// Applies `end` to the ledger row on a pooled connection, in the background: the batch
    /// ended in this process, for a reason it knows, so its events are not suspects. Retried
    /// for up to a minute (the database may be restarting); a row left behind only makes its
    /// events suspect: handled once more each, alone.
    fn forget_in_background(&self, end: LedgerEnd) {
        if end == LedgerEnd::Keep {
            return;
        }
        let pool = self.pool.clone();
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let mut pause = Duration::from_millis(100);
            loop {
                match async { queries::end_claim(&pool.get().await?, end).await }.await {
                    Ok(()) => return,
                    Err(error) if started.elapsed() > FORGET_PATIENCE => {
                        debug!(error = %error, ?end, "could not clear the claim's ledger row; its events will be retried alone");
                        return;
                    }
                    Err(_) => {}
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        });
    }

    /// Finds out, on another connection, whether the transaction whose COMMIT reply was lost
    /// committed: `Some(true)`, `Some(false)` (aborted) or `None` (unknown). Asks for up to 2 s,
    /// since the server may not have noticed the lost connection yet.
    async fn committed(&self) -> Option<bool> {
        let xid = self.xid.as_deref()?;
        let ask = async {
            loop {
                match async { queries::xact_committed(&self.pool.get().await?, xid).await }.await {
                    Ok(Some(committed)) => return Some(committed),
                    Ok(None) => {}
                    Err(error) => debug!(error = %error, "asking whether the batch committed failed"),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(2), ask).await.ok().flatten()
    }
}

impl ClaimedBatch for PgBatch {
    type Error = StoreError;

    fn take_events(&mut self) -> Vec<HookEvent> {
        std::mem::take(&mut self.events)
    }

    fn take_crashed(&mut self) -> Vec<HookEvent> {
        std::mem::take(&mut self.crashed)
    }

    fn isolated(&self) -> bool {
        matches!(self.ledger, Ledger::Isolated { .. })
    }

    fn set_aside(&self) -> usize {
        self.set_aside
    }

    fn held_back(&self) -> usize {
        self.held_back
    }

    fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Writes the batch's row in the claim ledger, on another pooled connection, autocommitted:
    /// from then on, if the claim's transaction dies, its events are suspects.
    async fn start(&mut self) -> Result<(), StoreError> {
        let lost =
            || StoreError::ClaimLost("the claim's transaction ended before its handlers started".into());
        match &mut self.ledger {
            Ledger::Ordinary { id, recorded } if !self.event_ids.is_empty() => {
                let xid = self.xid.as_deref().ok_or_else(lost)?;
                let client = self.pool.get().await?;
                let (row, processor) = (Uuid::new_v4(), self.presence.key());
                if !queries::record_claim(&client, row, xid, &self.event_ids, processor).await? {
                    return Err(lost());
                }
                *id = row;
                self.processor = processor;
                *recorded = true;
            }
            Ledger::Isolated { id, recorded, .. } => {
                let xid = self.xid.as_deref().ok_or_else(lost)?;
                let client = self.pool.get().await?;
                if !queries::record_isolated(&client, *id, xid).await? {
                    return Err(lost());
                }
                *recorded = true;
            }
            _ => {}
        }
        Ok(())
    }

    /// Rolls back, and drops the ledger row (or puts an isolated suspect back in the queue) in
    /// the same round trip.
    async fn release(self) {
        let end = self.ledger.at_release();
        let sql = match queries::ledger_sql(end) {
            None => "ROLLBACK".to_owned(),
            Some(sql) => format!("ROLLBACK; {sql}"),
        };
        let done = match self.conn.client() {
            Ok(client) => client.batch_execute(&sql).await.is_ok(),
            Err(_) => false,
        };
        if done {
            self.conn.release();
        } else {
            self.forget_in_background(end);
        }
    }

    /// A trivial statement in the claim's transaction: it restarts the server's
    /// `idle_in_transaction_session_timeout`, so the claim lives on while handlers run, and fails
    /// if the session is gone or silent for the call timeout.
    async fn keep_alive(&self) -> Result<(), StoreError> {
        within(self.call_timeout, "keep-alive", self.conn.client()?.batch_execute("SELECT 1")).await
    }

    /// Bounded by the call timeout; past it the connection is closed with the batch, and
    /// whether a `COMMIT` already sent took effect is unknown ([`StoreError::Timeout`]).
    async fn finish(self, outcomes: Vec<Outcome>) -> Result<Finished, StoreError> {
        within(self.call_timeout, "recording outcomes", self.finish_unbounded(outcomes)).await
    }

    fn is_outcome_unknown(error: &StoreError) -> bool {
        matches!(error, StoreError::OutcomeUnknown(_) | StoreError::Timeout { .. })
    }
}

impl PgBatch {
    async fn finish_unbounded(mut self, outcomes: Vec<Outcome>) -> Result<Finished, StoreError> {
        let client = self.conn.client()?;
        let end = self.ledger.at_commit(&outcomes);
        let commit = queries::commit_sql(end);
        // Before the ledger statement: it fails like it when an outcome was refused.
        let commit = if self.notify { format!("NOTIFY {}; {commit}", listen::CHANNEL) } else { commit };
        let completion = Completion::new(outcomes);
        let guard = match self.ledger {
            Ledger::Ordinary { id, recorded: true } if self.processor.is_some() => {
                Some(queries::Guard { pool: &self.pool, ledger: id })
            }
            _ => None,
        };
        match queries::record_outcomes_and_commit(client, &completion, &commit, guard).await {
            Ok(written) => {
                let expected = completion.len() - written.set_aside.len();
                if written.rows != expected as u64 {
                    warn!(expected, written = written.rows, "some outcomes matched no unprocessed row");
                }
                if self.held_back == 0 && completion.len() >= self.event_ids.len() {
                    // Every locked row was decided and committed: nothing comes back. (Events
                    // without an outcome, cut off by the drain, come back unchanged.)
                    if let Some(guard) = self.returned.as_mut() {
                        guard.floor = None;
                    }
                }
                self.conn.release();
                Ok(Finished { set_aside: written.set_aside })
            }
            Err(CommitError { error, maybe_committed: false, .. }) => {
                // Nothing was written, for a reason we know: the events are not suspects.
                self.forget_in_background(self.ledger.at_release());
                Err(error)
            }
            Err(CommitError { error, maybe_committed: true, set_aside }) => match self.committed().await {
                Some(true) => {
                    warn!(error = %error, "the connection was lost after COMMIT was sent, but the transaction committed");
                    Ok(Finished { set_aside })
                }
                Some(false) => {
                    self.forget_in_background(self.ledger.at_release());
                    Err(error)
                }
                None => {
                    // If it committed, the row is gone with it; if not, this process is alive
                    // and its events need not be suspects.
                    self.forget_in_background(self.ledger.at_release());
                    Err(StoreError::OutcomeUnknown(error.to_string()))
                }
            },
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn mark_at(floor: OffsetDateTime) -> Mark {
        let mark = Mark::new();
        mark.advance(0, Some(floor));
        mark
    }

    #[test]
    fn a_full_rescan_waits_a_hundred_times_its_duration_and_recent_ones_fill_the_gap() {
        let floor = OffsetDateTime::now_utc();
        let mark = mark_at(floor);
        let interval = Duration::ZERO;
        let first = mark.rescan_due(interval).expect("due");
        assert_eq!(first, Rescan { floor, from: None }, "the first rescan is a full one");
        assert_eq!(mark.rescan_due(interval), None, "one at a time");
        // A full rescan of 50 ms: the next full one no sooner than 5 s after it began.
        mark.rescan_done(first, Some(Duration::from_millis(50)), false);
        std::thread::sleep(Duration::from_millis(2));
        let second = mark.rescan_due(Duration::from_millis(1)).expect("due");
        assert_eq!(
            second.from,
            floor.checked_sub(time::Duration::seconds(2)),
            "a recent rescan, of at least 2 s"
        );
        // However long a recent rescan takes, it does not postpone the full one further.
        mark.rescan_done(second, Some(Duration::from_secs(60)), false);
        let third = mark.rescan_due(interval).expect("due");
        assert!(third.from.is_some(), "still recent");
        let took = |took| MarkState { full_rescan_took: took, ..MarkState::default() };
        let ten = Duration::from_secs(10);
        assert_eq!(took(Duration::from_millis(1)).full_rescan_pause(ten), ten);
        assert_eq!(took(Duration::from_millis(900)).full_rescan_pause(ten), Duration::from_secs(90));
        // One that timed out postpones the next by at most FULL_RESCAN_MAX_PAUSE, not an hour.
        assert_eq!(took(Duration::from_secs(20)).full_rescan_pause(ten), FULL_RESCAN_MAX_PAUSE);
        // A quick full rescan (no dead entries to walk) makes every rescan a full one again.
        mark.rescan_done(third, Some(Duration::ZERO), false);
        let mark = mark_at(floor);
        let quick = mark.rescan_due(interval).expect("due");
        mark.rescan_done(quick, Some(Duration::ZERO), false);
        assert_eq!(mark.rescan_due(interval).map(|r| r.from), Some(None));
    }

    #[test]
    fn the_third_failed_rescan_in_a_row_is_reported_once() {
        let mark = mark_at(OffsetDateTime::now_utc());
        let mut reported = Vec::new();
        for failed in [true, true, true, true, false, true, true, true] {
            let rescan = mark.rescan_due(Duration::ZERO).expect("due");
            reported.push(mark.rescan_done(rescan, None, failed));
        }
        assert_eq!(reported, [false, false, true, false, false, false, false, true]);
    }

    #[test]
    fn no_rescan_is_due_before_its_interval_or_from_the_beginning() {
        let mark = Mark::new();
        assert_eq!(mark.rescan_due(Duration::ZERO), None, "from the beginning, nothing is below");
        let mark = mark_at(OffsetDateTime::now_utc());
        assert_eq!(
            mark.rescan_due(Duration::from_secs(3600)),
            None,
            "the first one an interval after the start"
        );
    }
}
