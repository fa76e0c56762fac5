//! The processing engine: claim batches, run handlers concurrently, record outcomes.
//!
//! One loop claims batches from the [`Store`] while a batch slot, a handler slot and room in the
//! byte budget are free; each claimed batch runs in its own task, where the handlers of its
//! events run concurrently as futures of that task, each under a timeout and a panic guard. A
//! claim never takes more events than there are free handler slots (`concurrency` over all
//! batches), and the slots are reserved with the claim, so no claimed event waits for one; it
//! waits until a batch's share of the slots is free, so that claims stay batch-sized. When
//! all of a batch's handlers are done, its outcomes are written in one call. A full batch means
//! more work is likely, so the loop claims again at once, and lets up to
//! [`EngineConfig::claims_in_flight`] claims be on their way at once (each with its slots
//! reserved), so that the store works on the next claim while the loop takes in the last; a
//! short or empty one means the table is drained, so once every claim is back it sleeps until
//! the store's wakeup (NOTIFY) or the poll interval, whichever comes first.
//!
//! Crashes: before a batch's handlers start, the store records the claim (see
//! [`ClaimedBatch::start`]), so the events of a holder that dies mid-batch come back *suspect*.
//! When the store reports suspects, the loop lets its claims and batches in flight finish and
//! claims with [`ClaimRequest::isolate`]: one suspect at a time, run alone, each as soon as the
//! one before is done, so that a crash while it runs is its own and is counted as a failed
//! attempt (see ARCHITECTURE.md, "The claim").
//!
//! Shutdown: the loop issues no claim after the signal, and the claims on their way are driven to
//! their end and what they return released at once; no handler starts after it; running
//! handlers get `drain_timeout` to finish; outcomes of those that did are written, the rest of
//! each batch is released unchanged.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use serde_json::{Map, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{sleep, Instant};
use tracing::{debug, info, warn, Instrument};

use crate::error::ConfigError;
use crate::event::{HandlerResult, HookEvent};
use crate::handler::{Handler, HandlerRegistry};
use crate::metrics::{EventRecord, Metrics, MetricsSnapshot, Tally};
use crate::retry::RetryPolicy;
use crate::store::{ClaimRequest, ClaimedBatch, Finished, Outcome, Resolution, Store};

/// Longest error text recorded for one attempt, in bytes.
pub const MAX_ERROR_BYTES: usize = 8 * 1024;

/// The default of [`EngineConfig::max_bytes_in_flight`]: 32 MiB, two of hook-ingest's largest
/// events (16 MiB). Decoded, JSON takes from about its own size (long strings) to 8 times it
/// (objects shaped like hook payloads) and more (arrays of small numbers: 17 times); see
/// docs/configuration.md. Within the unit's `MemoryMax=512M` for all but the last kind.
pub const DEFAULT_MAX_BYTES_IN_FLIGHT: u64 = 32 * 1024 * 1024;

/// The smallest [`EngineConfig::max_bytes_in_flight`] accepted: 64 KiB.
pub const MIN_BYTES_IN_FLIGHT: u64 = 64 * 1024;

/// Engine settings. Build with struct update syntax from [`Default`]; checked by
/// [`EngineBuilder::build`].
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Events claimed at once. Default 100.
    pub batch_size: usize,
    /// Handlers running at once, over all batches. A claim takes no more events than there are
    /// free slots, so this also bounds the events claimed at once; and it waits until a batch's
    /// share of the slots (`concurrency / batches_in_flight`, at most `batch_size`) is free.
    /// Default 800, so that the eight batches of 100 in flight run at once: with 64, claims
    /// shrank to the few slots just freed and the drain halved (docs/benchmarks.md).
    pub concurrency: usize,
    /// Batches claimed and not yet finished, at most. Default 8: on two cores, eight keep the
    /// server busy while batches wait for their WAL flushes or are in the engine's hands (the
    /// shipped binary drained 0.80-0.94 of the database's limit with eight, 0.62-0.73 with four,
    /// on 3 December 2026, docs/benchmarks.md). Each holds one pooled connection.
    pub batches_in_flight: usize,
    /// Claims on their way to the store at once, at most, while full batches come back (a
    /// backlog): while one is on the server, the engine turns the last one's rows into a batch.
    /// Each holds one of the `batches_in_flight` slots and its own connection. Default 2: with
    /// one, the claims never overlapped and the shipped binary's drain was bound by one claim's
    /// round trip plus the engine's work on its rows (3.1 ms per 100 events, docs/benchmarks.md).
    /// When the table is drained, after an error, while suspects run alone, and after a claim
    /// held rows back for want of byte budget, one at a time.
    pub claims_in_flight: usize,
    /// Longest sleep when idle; the store's wakeup usually comes first. Default 1 s.
    pub poll_interval: Duration,
    /// How long a claim may go without a word from the engine before the store treats the holder as
    /// dead and releases it. Must exceed `handler_timeout`. Default 60 s.
    pub claim_timeout: Duration,
    /// Longest a handler may run; past it the attempt fails. Default 30 s.
    pub handler_timeout: Duration,
    /// On shutdown, how long running handlers may still finish. Default 25 s.
    pub drain_timeout: Duration,
    /// When to retry and when to give up.
    pub retry: RetryPolicy,
    /// How often the metrics line is logged; `None` for never (it is still logged at shutdown).
    pub metrics_interval: Option<Duration>,
    /// Bytes of JSON (payload and metadata, as the database sends them) of the events held at
    /// once, over all batches: claims stop adding events past it, and an event larger than this
    /// on its own is set aside dead without being fetched. In memory an event costs a small
    /// multiple of its JSON size (see docs/configuration.md). Default 32 MiB.
    pub max_bytes_in_flight: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            batch_size: 100,
            concurrency: 800,
            batches_in_flight: 8,
            claims_in_flight: 2,
            poll_interval: Duration::from_secs(1),
            claim_timeout: Duration::from_secs(60),
            handler_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(25),
            retry: RetryPolicy::default(),
            metrics_interval: Some(Duration::from_secs(60)),
            max_bytes_in_flight: DEFAULT_MAX_BYTES_IN_FLIGHT,
        }
    }
}

impl EngineConfig {
    /// Checks every value; called by [`EngineBuilder::build`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=10_000).contains(&self.batch_size) {
            return Err(ConfigError::BatchSize(self.batch_size));
        }
        if self.concurrency == 0 {
            return Err(ConfigError::Invalid("concurrency must be at least 1".into()));
        }
        if self.batches_in_flight == 0 {
            return Err(ConfigError::Invalid("batches in flight must be at least 1".into()));
        }
        if self.claims_in_flight == 0 {
            return Err(ConfigError::Invalid("claims in flight must be at least 1".into()));
        }
        if self.max_bytes_in_flight < MIN_BYTES_IN_FLIGHT {
            return Err(ConfigError::Invalid(format!(
                "bytes in flight {} is too small: it must be at least {MIN_BYTES_IN_FLIGHT} (64 KiB)",
                self.max_bytes_in_flight
            )));
        }
        if self.poll_interval.is_zero() {
            return Err(ConfigError::Invalid("poll interval must be greater than zero".into()));
        }
        if self.handler_timeout.is_zero() {
            return Err(ConfigError::Invalid("handler timeout must be greater than zero".into()));
        }
        if self.claim_timeout <= self.handler_timeout {
            return Err(ConfigError::Invalid(format!(
                "claim timeout ({:?}) must be longer than the handler timeout ({:?})",
                self.claim_timeout, self.handler_timeout
            )));
        }
        if self.claim_timeout <= self.drain_timeout {
            return Err(ConfigError::Invalid(format!(
                "claim timeout ({:?}) must be longer than the drain timeout ({:?})",
                self.claim_timeout, self.drain_timeout
            )));
        }
        self.retry.validate()
    }
}

/// Builds an [`Engine`].
///
/// ```
/// # use hook_core::{Engine, EngineConfig, HandlerRegistry, Store};
/// # fn build<S: Store>(store: S) -> Result<(), hook_core::ConfigError> {
/// let engine = Engine::builder(store)
///     .registry(hook_core::default_registry())
///     .config(EngineConfig { batch_size: 50, ..EngineConfig::default() })
///     .build()?;
/// # Ok(()) }
/// ```
pub struct EngineBuilder<S> {
    store: S,
    registry: HandlerRegistry,
    config: EngineConfig,
}

impl<S: Store> EngineBuilder<S> {
    /// Replaces the handler registry (empty by default).
    pub fn registry(mut self, registry: HandlerRegistry) -> Self {
        self.registry = registry;
        self
    }

    /// Registers one more handler; see [`HandlerRegistry::register`].
    pub fn handler(mut self, source: &str, action: &str, handler: impl Handler) -> Self {
        self.registry.register(source, action, handler);
        self
    }

    /// Replaces the configuration.
    pub fn config(mut self, config: EngineConfig) -> Self {
        self.config = config;
        self
    }

    /// Checks the configuration and builds the engine.
    pub fn build(self) -> Result<Engine<S>, ConfigError> {
        self.config.validate()?;
        Ok(Engine {
            store: Arc::new(self.store),
            shared: Arc::new(Shared {
                registry: self.registry,
                config: self.config,
                metrics: Arc::new(Metrics::default()),
                stopping: AtomicBool::new(false),
                bytes_held: AtomicU64::new(0),
            }),
        })
    }
}

/// The processing engine. Build it with [`Engine::builder`], then drive [`Engine::run`] on your
/// own runtime.
pub struct Engine<S> {
    store: Arc<S>,
    shared: Arc<Shared>,
}

struct Shared {
    registry: HandlerRegistry,
    config: EngineConfig,
    metrics: Arc<Metrics>,
    /// Set when shutdown begins: no handler starts after it.
    stopping: AtomicBool,
    /// Bytes of JSON of the events of the batches in flight.
    bytes_held: AtomicU64,
}

impl<S: Store> Engine<S> {
    /// Starts building an engine over `store`.
    pub fn builder(store: S) -> EngineBuilder<S> {
        EngineBuilder { store, registry: HandlerRegistry::new(), config: EngineConfig::default() }
    }

    /// The engine's counters; keep the `Arc` to read them while and after it runs.
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.shared.metrics)
    }

    /// The configuration in force.
    pub fn config(&self) -> &EngineConfig {
        &self.shared.config
    }

    /// Processes events until `shutdown` completes, then drains and returns the final counts.
    ///
    /// Store errors never end the run: they are logged, counted and retried with backoff, and the
    /// events involved stay claimable.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> MetricsSnapshot {
        let Engine { store, shared } = self;
        let config = &shared.config;
        let batch_slots = Arc::new(Semaphore::new(config.batches_in_flight));
        let handler_slots = Arc::new(Semaphore::new(config.concurrency));
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut wakeups = store.wakeups();
        let mut batches = JoinSet::new();
        // The claims on their way, each with the batch slot and handler slots reserved for it.
        let mut claims = FuturesUnordered::new();
        let mut looper = ClaimLoop::new(config);
        let mut metrics_tick = config.metrics_interval.map(|every| {
            let mut tick = tokio::time::interval_at(Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick
        });
        // Takes in a claim that came back (see `ClaimLoop::settle`).
        macro_rules! settle {
            ($claim:expr) => {
                looper
                    .settle($claim, !claims.is_empty(), &mut batches, &shared, &handler_slots, &stop_rx)
                    .await
            };
        }
        tokio::pin!(shutdown);
        info!(
            batch_size = config.batch_size,
            concurrency = config.concurrency,
            claims_in_flight = config.claims_in_flight,
            max_bytes_in_flight = config.max_bytes_in_flight,
            routes = shared.registry.len(),
            "engine started"
        );

        loop {
            while batches.try_join_next().is_some() {}
            if batches.is_empty() && claims.is_empty() {
                looper.exclusive = false;
                looper.budget_wait = false;
            }
            let suspects = store.suspects_waiting();
            let alone = looper.exclusive || suspects || looper.budget_wait;
            let room = config
                .max_bytes_in_flight
                .saturating_sub(shared.bytes_held.load(Ordering::Relaxed))
                .saturating_sub(looper.claiming_bytes);
            let depth = looper.depth(config, alone, room, claims.len());
            if alone && (!batches.is_empty() || !claims.is_empty()) || claims.len() >= depth {
                // Suspects run alone: let the claims and batches in flight finish first.
                // Likewise after an isolated batch, and when the byte budget is spent. Or as
                // many claims as may be are on their way: wait for one.
                tokio::select! {
                    biased;
                    () = &mut shutdown => break,
                    Some(claim) = claims.next(), if !claims.is_empty() => {
                        settle!(claim);
                    }
                    _ = batches.join_next(), if !batches.is_empty() => looper.budget_wait = false,
                    _ = tick(&mut metrics_tick) => log_metrics(&shared.metrics),
                }
                continue;
            }
            if looper.drained || looper.retry_at.is_some() {
                if !claims.is_empty() {
                    // The last claim came back short (or failed): no new one until the others are back.
                    tokio::select! {
                        biased;
                        () = &mut shutdown => break,
                        Some(claim) = claims.next() => settle!(claim),
                        _ = tick(&mut metrics_tick) => log_metrics(&shared.metrics),
                    }
                    continue;
                }
                if let Some(at) = looper.retry_at {
                    tokio::select! {
                        biased;
                        () = &mut shutdown => break,
                        () = tokio::time::sleep_until(at) => looper.retry_at = None,
                        _ = tick(&mut metrics_tick) => log_metrics(&shared.metrics),
                    }
                    continue;
                }
                // Drained: wait for a wakeup, the poll interval or shutdown.
                tokio::select! {
                    biased;
                    () = &mut shutdown => break,
                    _ = changed(&mut wakeups) => looper.drained = false,
                    () = sleep(config.poll_interval) => looper.drained = false,
                    _ = tick(&mut metrics_tick) => log_metrics(&shared.metrics),
                }
                continue;
            }
            let permit = tokio::select! {
                biased;
                () = &mut shutdown => break,
                Some(claim) = claims.next(), if !claims.is_empty() => {
                    settle!(claim);
                    continue;
                }
                permit = Arc::clone(&batch_slots).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
                _ = tick(&mut metrics_tick) => {
                    log_metrics(&shared.metrics);
                    continue;
                }
            };
            // A claim takes no more events than the handler slots it reserved, so that none of
            // them waits for one; and it waits for a share of the slots (`claim_slots`) to be
            // free, so that handlers finishing one by one do not turn into claims of one event
            // each, every one paying a batch's round trips and commit.
            let mut slots = tokio::select! {
                biased;
                () = &mut shutdown => break,
                Some(claim) = claims.next(), if !claims.is_empty() => {
                    settle!(claim);
                    continue;
                }
                slots = Arc::clone(&handler_slots).acquire_many_owned(claim_slots(config)) => match slots {
                    Ok(slots) => slots,
                    Err(_) => break,
                },
            };
            // Overlapping claims split what is left of the byte budget between them: this one
            // and those still to be issued (`room` already excludes those on their way).
            let max_bytes = room / depth.saturating_sub(claims.len()).max(1) as u64;
            let limit = looper.claim_cap.min(fitting(max_bytes, looper.event_bytes));
            let extra = limit.saturating_sub(slots.num_permits()).min(handler_slots.available_permits());
            if let Ok(more) = Arc::clone(&handler_slots).try_acquire_many_owned(extra as u32) {
                slots.merge(more);
            }
            let request = ClaimRequest {
                limit: limit.min(slots.num_permits()),
                max_retry_count: config.retry.max_retry_count,
                claim_timeout: config.claim_timeout,
                max_bytes,
                max_event_bytes: config.max_bytes_in_flight,
                isolate: suspects,
            };
            if let Some(rx) = wakeups.as_mut() {
                rx.borrow_and_update();
            }
            // A claim is not cancelled by shutdown (dropping it halfway could strand a
            // connection inside a transaction): it is driven to its end, and what it returns
            // after the signal is released at once, unstarted.
            looper.claiming_bytes += max_bytes;
            let (split, epoch) = (depth > 1, looper.epoch);
            let claimer = &*store;
            claims.push(async move {
                Claim { claimed: claimer.claim(request).await, request, split, epoch, permit, slots }
            });
        }

        shared.stopping.store(true, Ordering::SeqCst);
        if !claims.is_empty() {
            info!(
                claims = claims.len(),
                "shutdown began during a claim: releasing the claimed events unstarted"
            );
        }
        while let Some(claim) = claims.next().await {
            if let Ok(Some(batch)) = claim.claimed {
                batch.release().await;
            }
        }
        info!(
            in_flight = batches.len(),
            drain_timeout_s = config.drain_timeout.as_secs_f64(),
            "shutting down"
        );
        let _ = stop_tx.send(true);
        while batches.join_next().await.is_some() {}
        let snapshot = shared.metrics.snapshot();
        info!(dead = snapshot.dead, claimed = snapshot.claimed, set_aside = snapshot.set_aside, "{snapshot}");
        snapshot
    }
}

/// A claim that came back, with what was reserved for it.
struct Claim<B, E> {
    claimed: Result<Option<B>, E>,
    request: ClaimRequest,
    /// Whether its `max_bytes` was a share of the byte budget left (claims overlapped).
    split: bool,
    /// [`ClaimLoop::epoch`] when it was issued.
    epoch: u64,
    /// Its batch slot.
    permit: OwnedSemaphorePermit,
    /// Its handler slots: at least `request.limit`.
    slots: OwnedSemaphorePermit,
}

/// What the claim loop remembers between claims.
struct ClaimLoop {
    /// A batch that must run alone (an isolated suspect, or a crash being counted) is in flight.
    exclusive: bool,
    /// The last claim held rows back for want of byte budget: wait for a batch to finish.
    budget_wait: bool,
    /// Bytes of JSON per event in the last claim that returned events (see `fitting`).
    event_bytes: u64,
    /// Halved by each failed claim, back to a batch by one that returns events: a claim that
    /// fails because it took too long (rows of megabytes, measured as the server renders them,
    /// on a busy server) is not tried again as large as it was.
    claim_cap: usize,
    error_backoff: Backoff,
    /// The last claim came back full: more work is likely, so claims may overlap.
    streaming: bool,
    /// A claim held rows back for want of byte budget: claims do not overlap (each gets all
    /// the budget left) until one that did not overlap holds none back, so that an event larger
    /// than a share of the budget is not held back again and again.
    held_back: bool,
    /// Failed claims so far: what a claim issued before the last failure reports does not undo
    /// the failure's backoff and smaller claims.
    epoch: u64,
    /// The last claim came back short: the table is drained; wait for a wakeup.
    drained: bool,
    /// After a failed claim: the next is issued no sooner than this.
    retry_at: Option<Instant>,
    /// The byte budget (`max_bytes`) of the claims on their way.
    claiming_bytes: u64,
}

impl ClaimLoop {
    fn new(config: &EngineConfig) -> Self {
        Self {
            exclusive: false,
            budget_wait: false,
            event_bytes: 0,
            claim_cap: config.batch_size,
            error_backoff: Backoff::new(Duration::from_millis(100), STORE_RETRY_MAX),
            streaming: false,
            held_back: false,
            epoch: 0,
            drained: false,
            retry_at: None,
            claiming_bytes: 0,
        }
    }

    /// How many claims may be on their way at once: `claims_in_flight` while full batches come
    /// back, no claim held rows back for budget, and `room` (the byte budget left, less what the
    /// `in_flight` claims on their way reserved) holds a full claim of the last events' size for
    /// each still to be issued; otherwise one, which then gets all of `room`.
    fn depth(&self, config: &EngineConfig, alone: bool, room: u64, in_flight: usize) -> usize {
        let depth = config.claims_in_flight.max(1);
        if alone || !self.streaming || self.held_back || depth == 1 {
            return 1;
        }
        let share = room / depth.saturating_sub(in_flight).max(1) as u64;
        if fitting(share, self.event_bytes) <= self.claim_cap {
            return 1;
        }
        depth
    }

    /// Takes in a claim that came back: spawns its batch, or notes why there is none. `others`:
    /// other claims are still on their way.
    async fn settle<B: ClaimedBatch>(
        &mut self,
        claim: Claim<B, B::Error>,
        others: bool,
        batches: &mut JoinSet<()>,
        shared: &Arc<Shared>,
        handler_slots: &Arc<Semaphore>,
        stop_rx: &watch::Receiver<bool>,
    ) {
        let Claim { claimed, request, split, epoch, permit, slots } = claim;
        self.claiming_bytes = self.claiming_bytes.saturating_sub(request.max_bytes);
        // Issued before a failure that came back first: its events are taken in, but it does
        // not speak for the store's state now.
        let current = epoch == self.epoch;
        let full = match claimed {
            Err(error) if !current => {
                // Issued before a failure already counted: the same outage, once.
                shared.metrics.add_error();
                debug!(error = %error, "claim failed (issued before the last failure)");
                return;
            }
            Err(error) => {
                shared.metrics.add_error();
                self.epoch += 1;
                self.drained = false;
                self.claim_cap = (request.limit / 2).max(1);
                let delay = self.error_backoff.next();
                let failures = self.error_backoff.failures;
                if is_loud_failure(failures) {
                    warn!(error = %error, retry_in_ms = delay.as_millis() as u64, failures, next_limit = self.claim_cap, "claim failed");
                } else {
                    debug!(error = %error, retry_in_ms = delay.as_millis() as u64, failures, next_limit = self.claim_cap, "claim failed");
                }
                self.retry_at = Some(Instant::now() + delay);
                self.streaming = false;
                return;
            }
            Ok(None) => {
                if current {
                    self.error_backoff.reset();
                }
                shared.metrics.add_empty_claim();
                false
            }
            Ok(Some(mut batch)) => {
                if current {
                    self.error_backoff.reset();
                }
                let events = batch.take_events();
                let crashed = batch.take_crashed();
                let (set_aside, held_back) = (batch.set_aside(), batch.held_back());
                if held_back > 0 {
                    self.held_back = true;
                } else if !split {
                    self.held_back = false;
                }
                if !events.is_empty() {
                    self.event_bytes = batch.bytes() / events.len() as u64;
                    if current {
                        self.claim_cap = shared.config.batch_size;
                    }
                }
                if events.is_empty() && crashed.is_empty() && set_aside == 0 {
                    // Nothing fitted in what is left of the byte budget (rows were held
                    // back): let a batch in flight finish first.
                    shared.metrics.add_empty_claim();
                    batch.release().await;
                    let wait = held_back > 0 && (!batches.is_empty() || others);
                    self.budget_wait |= wait;
                    // Waiting for a batch to finish; or its share of the budget was too small
                    // (claim again at once, with all of it); or (nothing held back) drained.
                    wait || (held_back > 0 && split)
                } else {
                    self.budget_wait |= held_back > 0;
                    self.exclusive = batch.isolated() || !crashed.is_empty();
                    // A suspect run alone is one event, never a full batch, but more suspects
                    // may be waiting: claim again as soon as it is done, not at the next wakeup
                    // (with no NOTIFY coming, that was one suspect per poll interval, while
                    // every other event waited behind them).
                    let full = self.exclusive
                        || events.len() + crashed.len() + set_aside + held_back >= request.limit;
                    // One slot per event, reserved with the claim; each is released when its
                    // handler ends.
                    let mut taken = Vec::with_capacity(events.len());
                    let mut reserved = Some(slots);
                    for _ in 0..events.len() {
                        let slot = match reserved.as_mut() {
                            Some(left) if left.num_permits() > 1 => left.split(1),
                            _ => reserved.take(),
                        };
                        let slot = match slot {
                            Some(slot) => slot,
                            // The store returned more than the limit: wait for a slot.
                            None => match Arc::clone(handler_slots).acquire_owned().await {
                                Ok(slot) => slot,
                                Err(_) => break,
                            },
                        };
                        taken.push(slot);
                    }
                    // Slots reserved beyond the events claimed are freed here.
                    drop(reserved);
                    let bytes = BytesHeld::new(shared, batch.bytes());
                    shared.metrics.add_claimed(events.len() + crashed.len());
                    debug!(
                        events = events.len(),
                        crashed = crashed.len(),
                        isolated = batch.isolated(),
                        "claimed batch"
                    );
                    let task = run_batch(
                        batch,
                        BatchWork { events, crashed, slots: taken, bytes },
                        permit,
                        Arc::clone(shared),
                        stop_rx.clone(),
                    );
                    batches.spawn(task.instrument(tracing::debug_span!("batch")));
                    full
                }
            }
        };
        if current {
            self.streaming = full;
            self.drained = !full;
        }
    }
}

/// Bytes of JSON a batch in flight holds, counted in [`Shared::bytes_held`] until dropped.
struct BytesHeld {
    shared: Arc<Shared>,
    bytes: u64,
}

impl BytesHeld {
    fn new(shared: &Arc<Shared>, bytes: u64) -> Self {
        shared.bytes_held.fetch_add(bytes, Ordering::Relaxed);
        Self { shared: Arc::clone(shared), bytes }
    }
}

impl Drop for BytesHeld {
    fn drop(&mut self) {
        self.shared.bytes_held.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// What a batch task works on: the claimed events with a handler slot each, the events whose
/// crash is to be counted, and the batch's share of the byte budget.
struct BatchWork {
    events: Vec<HookEvent>,
    crashed: Vec<HookEvent>,
    slots: Vec<OwnedSemaphorePermit>,
    bytes: BytesHeld,
}

/// The free handler slots a claim waits for: a batch's share of them (`concurrency` over
/// `batches_in_flight`, rounded up), and no more than a batch. With the defaults, a full batch.
fn claim_slots(config: &EngineConfig) -> u32 {
    let share = config.concurrency.div_ceil(config.batches_in_flight.max(1));
    u32::try_from(share.min(config.batch_size).clamp(1, config.concurrency.max(1))).unwrap_or(u32::MAX)
}

/// How many events of `event_bytes` each (the average of the last claim's) fit in `max_bytes`,
/// plus one: the claim measures every row it locks (the server renders large values as JSON text
/// to count them), so a claim of 100 rows of 16 MiB, of which two fit, would render 1.6 GB to
/// return 32 MiB. At least one.
fn fitting(max_bytes: u64, event_bytes: u64) -> usize {
    usize::try_from(max_bytes / event_bytes.max(1)).unwrap_or(usize::MAX).saturating_add(1)
}

async fn tick(interval: &mut Option<tokio::time::Interval>) -> Instant {
    match interval {
        Some(interval) => interval.tick().await,
        None => std::future::pending().await,
    }
}

async fn changed(rx: &mut Option<watch::Receiver<()>>) {
    match rx {
        Some(rx) => {
            if rx.changed().await.is_err() {
                // The sender is gone: no more wakeups; fall back to polling.
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

fn log_metrics(metrics: &Metrics) {
    let snapshot = metrics.snapshot();
    info!(dead = snapshot.dead, claimed = snapshot.claimed, set_aside = snapshot.set_aside, "{snapshot}");
}

/// What one handler's attempt reports back.
struct Attempt {
    id: uuid::Uuid,
    retry_count: i32,
    result: HandlerResult,
    record: EventRecord,
}

/// How an attempt's outcome is counted once committed.
#[derive(Clone, Copy)]
enum Class {
    Succeeded,
    Retried,
    Dead,
}

/// What becomes of an event after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Dead now, for this reason.
    Dead(Death),
    /// Retried after this delay.
    Retry(Duration),
}

/// Why a failed attempt leaves its event dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Death {
    /// The handler said retrying cannot help ([`RetryHint::Never`](crate::RetryHint::Never):
    /// a sink's 4xx, a "permanent" exit code), whatever retries were left.
    Permanent,
    /// The retry policy's limit was reached.
    RetryLimit,
}

impl Death {
    /// The log line's message; the error (the handler's reason) is a field beside it.
    fn message(self) -> &'static str {
        match self {
            Death::Permanent => "attempt failed permanently (the handler ruled out a retry); event is dead",
            Death::RetryLimit => "attempt failed; retry limit reached, event is dead",
        }
    }
}

/// The verdict on a failed attempt `attempt` (0 for the first): a permanent failure is dead at
/// once, one that used up the policy's retries is dead, any other is retried after the policy's
/// delay or the handler's longer [`RetryHint::After`](crate::RetryHint::After).
fn failure_verdict(result: &HandlerResult, attempt: u32, policy: &RetryPolicy, salt: u64) -> Verdict {
    if result.retry.is_permanent() {
        Verdict::Dead(Death::Permanent)
    } else if policy.is_dead(attempt + 1) {
        Verdict::Dead(Death::RetryLimit)
    } else {
        Verdict::Retry(result.retry.delay(policy.delay(attempt, salt), policy.max_delay))
    }
}

/// The error recorded for an attempt whose processor died while the handler ran.
fn crash_error(retry_count: i32) -> String {
    format!("processor died while this event was being handled (attempt {})", i64::from(retry_count) + 1)
}

async fn run_batch<B: ClaimedBatch>(
    mut batch: B,
    work: BatchWork,
    _permit: OwnedSemaphorePermit,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let config = &shared.config;
    let BatchWork { events, crashed, slots, bytes: _bytes } = work;
    let total = events.len() + crashed.len();
    if !events.is_empty() {
        if shared.stopping.load(Ordering::SeqCst) {
            debug!(events = events.len(), "shutdown began before the batch started: releasing it unstarted");
            batch.release().await;
            return;
        }
        if let Err(error) = batch.start().await {
            shared.metrics.add_error();
            warn!(error = %error, events = events.len(), "recording the claim failed; releasing the batch without starting its handlers");
            batch.release().await;
            return;
        }
    }
    // The batch's handlers run as futures of this task, not as tasks of their own: for the
    // cheap handlers events usually get, a spawn per event (an allocation, a trip through the
    // scheduler, a wakeup to join it) costs more than the handler. `attempt` already turns
    // panics and timeouts into failed attempts, so a task boundary adds no safety; handlers that
    // block a thread for long should use `spawn_blocking`, as on any async runtime.
    let mut running: FuturesUnordered<_> = events
        .into_iter()
        .zip(slots)
        .map(|(event, slot)| {
            let handler = shared.registry.resolve(&event.source, &event.action);
            let timer = shared.metrics.event_claimed(&event);
            let timeout = config.handler_timeout;
            let shared = &shared;
            let span = tracing::info_span!(
                "event",
                event_id = %event.id,
                source = %event.source,
                action = %event.action,
                attempt = event.retry_count + 1
            );
            async move {
                if shared.stopping.load(Ordering::SeqCst) {
                    // The drain began before this handler could start: it does not start.
                    return (None, slot);
                }
                let timer = timer.handler_started();
                let id = event.id;
                let retry_count = event.retry_count;
                let mut result = attempt(handler, Arc::new(event), timeout).await;
                if !result.success {
                    // Bound the error now: a batch's results are held until all of it is done,
                    // and a handler may return megabytes.
                    let error = bound_text(&result.error_text());
                    result.error = Some(error);
                    result.message = String::new();
                }
                (Some(Attempt { id, retry_count, result, record: timer.finish() }), slot)
            }
            .instrument(span)
        })
        .collect();

    let mut attempts = Vec::with_capacity(total);
    for event in crashed {
        let error = crash_error(event.retry_count);
        warn!(event_id = %event.id, source = %event.source, action = %event.action, attempt = event.retry_count + 1, "{error}: counting a failed attempt");
        let record = shared.metrics.event_claimed(&event).finish();
        attempts.push(Attempt {
            id: event.id,
            retry_count: event.retry_count,
            result: HandlerResult::failed(error),
            record,
        });
    }
    let crashes = attempts.iter().map(|a| a.id).collect::<Vec<_>>();
    let mut deadline = None;
    let every = config.claim_timeout / 3;
    let mut keep_alive = tokio::time::interval_at(Instant::now() + every, every);
    keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if deadline.is_none() && *stop.borrow() {
            deadline = Some(Instant::now() + config.drain_timeout);
        }
        tokio::select! {
            done = running.next() => match done {
                None => break,
                Some(first) => {
                    // Every other handler that is done by now too, and their slots freed at
                    // once: the claim loop, woken by the first free slot, then sees them all and
                    // claims a full batch instead of a sliver (a claim takes no more events than
                    // there are free slots).
                    let mut freed: Option<OwnedSemaphorePermit> = None;
                    let mut next = Some(first);
                    while let Some((attempt, slot)) = next {
                        attempts.extend(attempt);
                        match freed.as_mut() {
                            Some(freed) => freed.merge(slot),
                            None => freed = Some(slot),
                        }
                        next = running.next().now_or_never().flatten();
                    }
                    drop(freed);
                }
            },
            _ = stop.changed(), if deadline.is_none() => {}
            _ = keep_alive.tick() => {
                if let Err(error) = batch.keep_alive().await {
                    // The claim is lost and another processor may hold the events now: stop
                    // their handlers here rather than run them twice at once.
                    shared.metrics.add_error();
                    warn!(error = %error, unfinished = running.len(), "claim lost while handlers ran; cancelling them, the events will be retried");
                    drop(running);
                    batch.release().await;
                    return;
                }
                shared.metrics.add_keep_alive();
            }
            () = sleep_until(deadline) => {
                warn!(unfinished = running.len(), "drain timeout: releasing events whose handlers did not finish");
                // Dropping the futures cancels the handlers; their events get no outcome and
                // are released unchanged.
                break;
            }
        }
    }
    drop(running);

    let mut outcomes = Vec::with_capacity(attempts.len());
    let mut classes = Vec::with_capacity(attempts.len());
    for Attempt { id, retry_count, mut result, record } in attempts {
        let metadata = sanitize_map(std::mem::take(&mut result.metadata));
        let (class, resolution) = if result.success {
            debug!(event_id = %id, source = %record.source, action = %record.action, attempt = retry_count + 1, "handled");
            (Class::Succeeded, Resolution::Succeeded)
        } else {
            let attempt = u32::try_from(retry_count).unwrap_or(0);
            let error = bound_text(&result.error_text());
            match failure_verdict(&result, attempt, &config.retry, id.as_u64_pair().1) {
                Verdict::Dead(why) => {
                    warn!(event_id = %id, source = %record.source, action = %record.action, attempt = attempt + 1, error = %error, "{}", why.message());
                    (Class::Dead, Resolution::Failed { error, retry_after: None })
                }
                Verdict::Retry(delay) => {
                    warn!(event_id = %id, source = %record.source, action = %record.action, attempt = attempt + 1, error = %error, retry_in_s = delay.as_secs_f64(), "attempt failed; will retry");
                    (Class::Retried, Resolution::Failed { error, retry_after: Some(delay) })
                }
            }
        };
        outcomes.push(Outcome { id, resolution, metadata });
        classes.push((id, class, record));
    }
    let set_aside = batch.set_aside() as u64;
    match batch.finish(outcomes).await {
        Ok(Finished { set_aside: unwritable }) => {
            let (mut succeeded, mut retried, mut dead, mut crashed) = (0u64, 0u64, 0u64, 0u64);
            let mut tally = Tally::default();
            for (id, class, record) in &classes {
                if let Some((_, reason)) = unwritable.iter().find(|(u, _)| u == id) {
                    warn!(event_id = %id, source = %record.source, action = %record.action, reason = %reason, "the outcome could not be written; the event was set aside");
                    continue;
                }
                if crashes.contains(id) {
                    crashed += 1;
                }
                match class {
                    Class::Succeeded => {
                        succeeded += 1;
                        tally.succeeded(record);
                    }
                    Class::Retried => {
                        retried += 1;
                        tally.retried(record);
                    }
                    Class::Dead => {
                        dead += 1;
                        tally.dead(record);
                    }
                }
            }
            shared.metrics.add_committed(succeeded, retried, dead, set_aside + unwritable.len() as u64);
            shared.metrics.add_crashed(crashed);
            tally.commit();
        }
        Err(error) if B::is_outcome_unknown(&error) => {
            shared.metrics.add_outcome_unknown();
            warn!(error = %error, outcomes = classes.len(), "the connection was lost after COMMIT was sent: outcome unknown; the next claim will tell");
        }
        Err(error) => {
            shared.metrics.add_error();
            warn!(error = %error, "recording outcomes failed; nothing was written, the events stay claimable and will be retried");
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Runs one handler under the timeout and a panic guard; every way it can go wrong becomes a
/// failed [`HandlerResult`].
async fn attempt(
    handler: Option<Arc<dyn Handler>>,
    event: Arc<HookEvent>,
    timeout: Duration,
) -> HandlerResult {
    let Some(handler) = handler else {
        return HandlerResult::failed(format!(
            "no handler registered for ({}, {}) and no wildcard",
            event.source, event.action
        ));
    };
    let future = match std::panic::catch_unwind(AssertUnwindSafe(|| handler.handle(event))) {
        Ok(future) => future,
        Err(panic) => return HandlerResult::failed(format!("handler panicked: {}", panic_text(&*panic))),
    };
    match tokio::time::timeout(timeout, AssertUnwindSafe(future).catch_unwind()).await {
        Ok(Ok(result)) => result,
        Ok(Err(panic)) => HandlerResult::failed(format!("handler panicked: {}", panic_text(&*panic))),
        Err(_) => HandlerResult::failed(format!("handler timed out after {:.3}s", timeout.as_secs_f64())),
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}

/// Makes text storable: no NUL characters (PostgreSQL text cannot hold them) and at most
/// [`MAX_ERROR_BYTES`] bytes, cut on a character boundary with a note of the original size.
pub fn bound_text(text: &str) -> String {
    let clean: std::borrow::Cow<'_, str> =
        if text.contains('\0') { text.replace('\0', "\u{FFFD}").into() } else { text.into() };
    if clean.len() <= MAX_ERROR_BYTES {
        return clean.into_owned();
    }
    let mut cut = MAX_ERROR_BYTES - 64;
    while !clean.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}... [truncated, {} bytes in all]", &clean[..cut], clean.len())
}

/// Replaces NUL characters in every string and key (jsonb cannot hold `\u0000`). A map without
/// any (the usual case) is returned as it is, without rebuilding it.
fn sanitize_map(map: Map<String, Value>) -> Map<String, Value> {
    if !map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)) {
        return map;
    }
    map.into_iter().map(|(k, v)| (k.replace('\0', "\u{FFFD}"), sanitize_value(v))).collect()
}

/// Whether a string or key anywhere in `value` holds a NUL character.
fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}

fn sanitize_value(value: Value) -> Value {
    match value {
        Value::String(s) if s.contains('\0') => Value::String(s.replace('\0', "\u{FFFD}")),
        Value::Array(items) => Value::Array(items.into_iter().map(sanitize_value).collect()),
        Value::Object(map) => Value::Object(sanitize_map(map)),
        other => other,
    }
}

/// The longest wait between two claims while the store fails. No longer than the original's
/// 1 s poll: when the database comes back, the processor is back within a second, as a poller
/// would be; while it is down, that is one connection attempt a second.
const STORE_RETRY_MAX: Duration = Duration::from_secs(1);

/// Exponential backoff for store errors, and a count of the failures in a row.
struct Backoff {
    first: Duration,
    max: Duration,
    current: Option<Duration>,
    failures: u32,
}

impl Backoff {
    fn new(first: Duration, max: Duration) -> Self {
        Self { first, max, current: None, failures: 0 }
    }

    fn next(&mut self) -> Duration {
        let next = self.current.map_or(self.first, |d| (d * 2).min(self.max));
        self.current = Some(next);
        self.failures = self.failures.saturating_add(1);
        next
    }

    /// After a success; logs when it ends a streak of failures.
    fn reset(&mut self) {
        if self.failures > 0 {
            info!(failures = self.failures, "claims succeed again");
        }
        self.current = None;
        self.failures = 0;
    }
}

/// Whether the `failures`-th store failure in a row is worth a warning: the first, then one in
/// 30 (about every half minute at the 1 s retry cap), so an hour-long outage logs a few hundred
/// lines, not thousands; log the others at debug. Shared by the engine's claims and the store's
/// LISTEN connection.
pub fn is_loud_failure(failures: u32) -> bool {
    failures <= 1 || failures.is_multiple_of(30)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::RetryHint;

    #[test]
    fn claims_wait_for_a_batch_share_of_the_slots() {
        let defaults = EngineConfig::default();
        assert_eq!(claim_slots(&defaults), 100, "eight batches of 100 in 800 slots");
        let narrow = EngineConfig { concurrency: 64, ..EngineConfig::default() };
        assert_eq!(claim_slots(&narrow), 8);
        let one = EngineConfig { concurrency: 1, ..EngineConfig::default() };
        assert_eq!(claim_slots(&one), 1);
        let small_batches = EngineConfig { batch_size: 10, ..EngineConfig::default() };
        assert_eq!(claim_slots(&small_batches), 10);
    }

    #[test]
    fn claims_of_large_events_ask_for_what_fits() {
        let mib = 1024 * 1024;
        assert_eq!(fitting(32 * mib, 16 * mib), 3, "two fit, one more to learn the next one's size");
        assert_eq!(fitting(0, 16 * mib), 1, "a spent budget still claims one row");
        assert!(fitting(32 * mib, 0) > 1_000_000, "no estimate yet: no bound");
        assert_eq!(fitting(32 * mib, 400), 32 * mib as usize / 400 + 1);
    }

    #[test]
    fn bound_text_cuts_on_char_boundary_and_strips_nul() {
        assert_eq!(bound_text("a\0b"), "a\u{FFFD}b");
        let long = "é".repeat(10_000);
        let bounded = bound_text(&long);
        assert!(bounded.len() <= MAX_ERROR_BYTES, "{}", bounded.len());
        assert!(bounded.ends_with("[truncated, 20000 bytes in all]"), "{bounded}");
    }

    #[test]
    fn sanitize_nested_metadata() {
        let map = serde_json::json!({"a\0": ["x\0", {"b": "\0"}], "n": 1});
        let Value::Object(map) = map else { unreachable!() };
        let clean = Value::Object(sanitize_map(map));
        assert!(!clean.to_string().contains("\\u0000"), "{clean}");
    }

    #[test]
    fn backoff_doubles_to_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let seen: Vec<_> = (0..4).map(|_| b.next().as_millis()).collect();
        assert_eq!(seen, [100, 200, 350, 350]);
        assert_eq!(b.failures, 4);
        b.reset();
        assert_eq!((b.next().as_millis(), b.failures), (100, 1));
    }

    #[test]
    fn a_streak_of_store_failures_warns_on_the_first_and_every_thirtieth() {
        let loud: Vec<u32> = (1..=95).filter(|&n| is_loud_failure(n)).collect();
        assert_eq!(loud, [1, 30, 60, 90]);
    }

    #[test]
    fn a_permanent_failure_is_dead_at_once_for_its_own_reason() {
        let policy = RetryPolicy::default();
        let limit = policy.max_retry_count;
        let permanent = HandlerResult::permanent("sink refuse: exited with 65 (permanent)");
        for attempt in [0, limit - 1] {
            let verdict = failure_verdict(&permanent, attempt, &policy, 7);
            assert_eq!(verdict, Verdict::Dead(Death::Permanent), "attempt {attempt}");
        }
        let message = Death::Permanent.message();
        assert!(message.contains("permanently") && !message.contains("retry limit"), "{message}");
        let failed = HandlerResult::failed("busy");
        assert!(matches!(failure_verdict(&failed, 0, &policy, 7), Verdict::Retry(_)));
        assert_eq!(failure_verdict(&failed, limit - 1, &policy, 7), Verdict::Dead(Death::RetryLimit));
        assert!(Death::RetryLimit.message().contains("retry limit reached"));
        // A server's Retry-After moves the retry later, never past the policy's cap.
        let after = HandlerResult::failed("429").with_retry(RetryHint::After(Duration::from_secs(3600)));
        assert_eq!(failure_verdict(&after, 0, &policy, 7), Verdict::Retry(policy.max_delay));
    }

    #[test]
    fn config_validation() {
        let bad = |c: EngineConfig| c.validate().unwrap_err().to_string();
        assert!(bad(EngineConfig { batch_size: 0, ..Default::default() }).contains("batch size 0"));
        assert!(bad(EngineConfig { claim_timeout: Duration::from_secs(10), ..Default::default() })
            .contains("claim timeout"));
        assert!(EngineConfig::default().validate().is_ok());
    }
}
