//! The processing engine: claim batches, run handlers concurrently, record outcomes.
//!
//! One loop claims batches from the [`Store`] while a batch slot is free; each claimed batch runs
//! in its own task, where the handlers of its events run concurrently as futures of that task
//! (bounded by `concurrency` over all batches), each under a timeout and a panic guard. When all
//! of a batch's handlers are done, its outcomes are written in one call. A full batch means more
//! work is likely, so the loop claims again at once; a short or empty one means the table is
//! drained, so it sleeps until the store's wakeup (NOTIFY) or the poll interval, whichever comes
//! first.
//!
//! Shutdown: the loop stops claiming; running handlers get `drain_timeout` to finish; outcomes of
//! those that did are written, the rest of each batch is released unchanged.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use serde_json::{Map, Value};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{sleep, Instant};
use tracing::{debug, info, warn, Instrument};

use crate::error::ConfigError;
use crate::event::{HandlerResult, HookEvent};
use crate::handler::{Handler, HandlerRegistry};
use crate::metrics::{EventRecord, Metrics, MetricsSnapshot, Tally};
use crate::retry::RetryPolicy;
use crate::store::{ClaimRequest, ClaimedBatch, Outcome, Resolution, Store};

/// Longest error text recorded for one attempt, in bytes.
pub const MAX_ERROR_BYTES: usize = 8 * 1024;

/// Engine settings. Build with struct update syntax from [`Default`]; checked by
/// [`EngineBuilder::build`].
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Events claimed at once. Default 100.
    pub batch_size: usize,
    /// Handlers running at once, over all batches. Default 64.
    pub concurrency: usize,
    /// Batches claimed and not yet finished, at most. Default 4: on two cores, four keep the
    /// server busy while batches are in the engine's hands (hook-bench drains ~1.3x faster than
    /// with two; eight is no faster). Each holds one pooled connection.
    pub batches_in_flight: usize,
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
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            batch_size: 100,
            concurrency: 64,
            batches_in_flight: 4,
            poll_interval: Duration::from_secs(1),
            claim_timeout: Duration::from_secs(60),
            handler_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(25),
            retry: RetryPolicy::default(),
            metrics_interval: Some(Duration::from_secs(60)),
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
        let mut error_backoff = Backoff::new(Duration::from_millis(100), STORE_RETRY_MAX);
        let mut metrics_tick = config.metrics_interval.map(|every| {
            let mut tick = tokio::time::interval_at(Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick
        });
        let request = ClaimRequest {
            limit: config.batch_size,
            max_retry_count: config.retry.max_retry_count,
            claim_timeout: config.claim_timeout,
        };
        tokio::pin!(shutdown);
        info!(
            batch_size = config.batch_size,
            concurrency = config.concurrency,
            routes = shared.registry.len(),
            "engine started"
        );

        loop {
            while batches.try_join_next().is_some() {}
            let permit = tokio::select! {
                biased;
                () = &mut shutdown => break,
                permit = Arc::clone(&batch_slots).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
                _ = tick(&mut metrics_tick) => {
                    log_metrics(&shared.metrics);
                    continue;
                }
            };
            if let Some(rx) = wakeups.as_mut() {
                rx.borrow_and_update();
            }
            // The claim is not raced against shutdown: dropping it halfway could strand a
            // connection inside a transaction. It is one short statement.
            let full = match store.claim(request).await {
                Err(error) => {
                    shared.metrics.add_error();
                    let delay = error_backoff.next();
                    let failures = error_backoff.failures;
                    if is_loud_failure(failures) {
                        warn!(error = %error, retry_in_ms = delay.as_millis() as u64, failures, "claim failed");
                    } else {
                        debug!(error = %error, retry_in_ms = delay.as_millis() as u64, failures, "claim failed");
                    }
                    drop(permit);
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = sleep(delay) => continue,
                    }
                }
                Ok(None) => {
                    error_backoff.reset();
                    shared.metrics.add_empty_claim();
                    false
                }
                Ok(Some(mut batch)) => {
                    error_backoff.reset();
                    let events = batch.take_events();
                    let full = events.len() + batch.set_aside() >= config.batch_size;
                    shared.metrics.add_claimed(events.len());
                    debug!(events = events.len(), "claimed batch");
                    let task = run_batch(
                        batch,
                        events,
                        permit,
                        Arc::clone(&shared),
                        Arc::clone(&handler_slots),
                        stop_rx.clone(),
                    );
                    batches.spawn(task.instrument(tracing::debug_span!("batch")));
                    full
                }
            };
            if full {
                continue;
            }
            // Drained: wait for a wakeup, the poll interval or shutdown.
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                _ = changed(&mut wakeups) => {}
                () = sleep(config.poll_interval) => {}
                _ = tick(&mut metrics_tick) => log_metrics(&shared.metrics),
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

async fn run_batch<B: ClaimedBatch>(
    batch: B,
    events: Vec<HookEvent>,
    _permit: OwnedSemaphorePermit,
    shared: Arc<Shared>,
    handler_slots: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let config = &shared.config;
    let total = events.len();
    // The batch's handlers run as futures of this task, not as tasks of their own: for the
    // cheap handlers events usually get, a spawn per event (an allocation, a trip through the
    // scheduler, a wakeup to join it) costs more than the handler. `attempt` already turns
    // panics and timeouts into failed attempts, so a task boundary adds no safety; handlers that
    // block a thread for long should use `spawn_blocking`, as on any async runtime.
    let mut running: FuturesUnordered<_> = events
        .into_iter()
        .map(|event| {
            let handler = shared.registry.resolve(&event.source, &event.action);
            let timer = shared.metrics.event_claimed(&event);
            let slots = &handler_slots;
            let timeout = config.handler_timeout;
            let span = tracing::info_span!(
                "event",
                event_id = %event.id,
                source = %event.source,
                action = %event.action,
                attempt = event.retry_count + 1
            );
            async move {
                let _slot = slots.acquire().await;
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
                Attempt { id, retry_count, result, record: timer.finish() }
            }
            .instrument(span)
        })
        .collect();

    let mut attempts = Vec::with_capacity(total);
    let mut deadline = None;
    let every = config.claim_timeout / 3;
    let mut keep_alive = tokio::time::interval_at(Instant::now() + every, every);
    keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if deadline.is_none() && *stop.borrow() {
            deadline = Some(Instant::now() + config.drain_timeout);
        }
        tokio::select! {
            attempt = running.next() => match attempt {
                None => break,
                Some(attempt) => attempts.push(attempt),
            },
            _ = stop.changed(), if deadline.is_none() => {}
            _ = keep_alive.tick() => {
                if let Err(error) = batch.keep_alive().await {
                    // The claim is lost and another processor may hold the events now: stop
                    // their handlers here rather than run them twice at once.
                    shared.metrics.add_error();
                    warn!(error = %error, unfinished = running.len(), "claim lost while handlers ran; cancelling them, the events will be retried");
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
    let (mut succeeded, mut retried, mut dead) = (0u64, 0u64, 0u64);
    let mut tally = Tally::default();
    for Attempt { id, retry_count, result, record } in attempts {
        let metadata = sanitize_map(result.metadata.clone());
        let resolution = if result.success {
            succeeded += 1;
            tally.succeeded(&record);
            debug!(event_id = %id, source = %record.source, action = %record.action, attempt = retry_count + 1, "handled");
            Resolution::Succeeded
        } else {
            let attempt = u32::try_from(retry_count).unwrap_or(0);
            let error = bound_text(&result.error_text());
            let retry_after = if result.retry.is_permanent() || config.retry.is_dead(attempt + 1) {
                dead += 1;
                tally.dead(&record);
                warn!(event_id = %id, source = %record.source, action = %record.action, attempt = attempt + 1, error = %error, "attempt failed; retry limit reached, event is dead");
                None
            } else {
                retried += 1;
                tally.retried(&record);
                let delay = result
                    .retry
                    .delay(config.retry.delay(attempt, id.as_u64_pair().1), config.retry.max_delay);
                warn!(event_id = %id, source = %record.source, action = %record.action, attempt = attempt + 1, error = %error, retry_in_s = delay.as_secs_f64(), "attempt failed; will retry");
                Some(delay)
            };
            Resolution::Failed { error, retry_after }
        };
        outcomes.push(Outcome { id, resolution, metadata });
    }
    let set_aside = batch.set_aside() as u64;
    match batch.finish(outcomes).await {
        Ok(()) => {
            shared.metrics.add_committed(succeeded, retried, dead, set_aside);
            tally.commit();
        }
        Err(error) => {
            shared.metrics.add_error();
            warn!(error = %error, "recording outcomes failed; the events stay claimable and will be retried");
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

/// Replaces NUL characters in every string and key (jsonb cannot hold `\u0000`).
fn sanitize_map(map: Map<String, Value>) -> Map<String, Value> {
    map.into_iter().map(|(k, v)| (k.replace('\0', "\u{FFFD}"), sanitize_value(v))).collect()
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
    fn config_validation() {
        let bad = |c: EngineConfig| c.validate().unwrap_err().to_string();
        assert!(bad(EngineConfig { batch_size: 0, ..Default::default() }).contains("batch size 0"));
        assert!(bad(EngineConfig { claim_timeout: Duration::from_secs(10), ..Default::default() })
            .contains("claim timeout"));
        assert!(EngineConfig::default().validate().is_ok());
    }
}
