//! What the engine counts, and how it tells that it is alive.
//!
//! Three audiences read these numbers:
//! - the log: running totals behind the original service's metrics line ([`MetricsSnapshot`]);
//! - Prometheus: the same events by `(source, action)`, handler duration, pickup latency, batch
//!   sizes and database errors, recorded through the [`metrics`](::metrics) facade. This crate
//!   only records; the binary installs an exporter (without one, recording costs next to
//!   nothing). The names are in [`metric_names`](crate::metric_names);
//! - liveness checks (systemd's watchdog, `/readyz`): [`Metrics::is_ready`] and
//!   [`Metrics::since_progress`].
//!
//! Outcome counters change only after the outcome is committed: the engine collects a batch's
//! outcomes in a [`Tally`] and hands it over once the store has written them.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::metrics::{counter, describe_counter, describe_gauge, describe_histogram, histogram, Unit};
use ::metrics::{Counter, Histogram};
use time::OffsetDateTime;

use crate::event::HookEvent;

/// The names of the metrics hook-events records, all prefixed `hook_events_`.
///
/// Counters and histograms are recorded by the engine; the gauges are set by whoever runs the
/// queue-depth query (the `hook-processor` binary).
pub mod names {
    /// Counter, by `source`/`action`: events claimed (each attempt counts).
    pub const CLAIMED: &str = "hook_events_claimed_total";
    /// Counter, by `source`/`action`: attempts that succeeded, counted once committed.
    pub const SUCCEEDED: &str = "hook_events_succeeded_total";
    /// Counter, by `source`/`action`: attempts that failed, counted once committed
    /// (`retried + dead`).
    pub const FAILED: &str = "hook_events_failed_total";
    /// Counter, by `source`/`action`: failed attempts scheduled for another try.
    pub const RETRIED: &str = "hook_events_retried_total";
    /// Counter, by `source`/`action`: failed attempts after which the event is dead.
    pub const DEAD: &str = "hook_events_dead_total";
    /// Histogram (seconds), by `source`/`action`: how long handlers ran, every run included.
    pub const HANDLER_DURATION: &str = "hook_events_handler_duration_seconds";
    /// Histogram (seconds), by `source`/`action`: from `created_at` to the claim, first attempts
    /// only (a retry's wait is its backoff, not queue lag).
    pub const PICKUP_LATENCY: &str = "hook_events_pickup_latency_seconds";
    /// Histogram: events per claimed batch (empty claims are not recorded).
    pub const BATCH_SIZE: &str = "hook_events_batch_size";
    /// Counter: claims and completions that failed on the database side.
    pub const DATABASE_ERRORS: &str = "hook_events_database_errors_total";
    /// Counter: rows a claim set aside as dead without an attempt (undecodable, or already at
    /// the retry limit), counted once committed.
    pub const SET_ASIDE: &str = "hook_events_set_aside_total";
    /// Counter: failed attempts recorded because the processor died while the event's handler
    /// ran alone (see ARCHITECTURE.md, "The claim"); also counted in `failed_total`.
    pub const CRASHED: &str = "hook_events_crashed_attempts_total";
    /// Counter: completions whose COMMIT was sent but whose reply was lost, and whose outcome
    /// could not be found out; the next claim tells (the events are processed, or come back).
    pub const OUTCOME_UNKNOWN: &str = "hook_events_outcome_unknown_total";
    /// Gauge: events waiting to be processed (not processed, not dead), retries included.
    pub const PENDING: &str = "hook_events_pending";
    /// Gauge: pending events that have failed at least once.
    pub const RETRYING: &str = "hook_events_retrying";
    /// Gauge: events that reached the retry limit (`dead_at` set, not processed).
    pub const DEAD_EVENTS: &str = "hook_events_dead";
    /// Gauge (seconds): age of the oldest pending event; 0 when none.
    pub const OLDEST_PENDING_AGE: &str = "hook_events_oldest_pending_age_seconds";
    /// Gauge (seconds): time since the processing loop last made progress (a store round trip or
    /// a handler finishing); -1 before the first claim.
    pub const SINCE_PROGRESS: &str = "hook_events_since_progress_seconds";
    /// Gauge: 1 once the first claim query succeeded.
    pub const READY: &str = "hook_events_ready";
}

/// At most this many distinct `(source, action)` pairs get their own label values; events of
/// later pairs are counted under `source="other", action="other"`. Both columns are free text
/// written by producers, and a metric series per value would let one misbehaving producer
/// exhaust the scraper's memory.
pub const MAX_LABELLED_PAIRS: usize = 256;

/// The label value of events beyond [`MAX_LABELLED_PAIRS`].
pub const OTHER_LABEL: &str = "other";

/// Registers help texts and units of every metric in [`names`] with the installed recorder.
/// Call once, after installing it.
pub fn describe_metrics() {
    use names::*;
    describe_counter!(CLAIMED, "Events claimed, by source and action (each attempt counts)");
    describe_counter!(SUCCEEDED, "Attempts that succeeded, counted once committed");
    describe_counter!(FAILED, "Attempts that failed, counted once committed (retried + dead)");
    describe_counter!(RETRIED, "Failed attempts scheduled for another try");
    describe_counter!(DEAD, "Failed attempts after which the event reached the retry limit");
    describe_histogram!(HANDLER_DURATION, Unit::Seconds, "How long handlers ran");
    describe_histogram!(
        PICKUP_LATENCY,
        Unit::Seconds,
        "From created_at to the claim, first attempts only (on the processor's clock)"
    );
    describe_histogram!(BATCH_SIZE, Unit::Count, "Events per claimed batch");
    describe_counter!(DATABASE_ERRORS, "Claims and completions that failed on the database side");
    describe_counter!(
        SET_ASIDE,
        "Rows set aside as dead without an attempt (undecodable, or already at the retry limit)"
    );
    describe_counter!(
        CRASHED,
        "Failed attempts recorded because the processor died while the event's handler ran alone"
    );
    describe_counter!(
        OUTCOME_UNKNOWN,
        "Completions whose COMMIT reply was lost and whose outcome could not be found out"
    );
    describe_gauge!(PENDING, "Events not processed and not dead (retries included)");
    describe_gauge!(RETRYING, "Pending events that failed at least once");
    describe_gauge!(DEAD_EVENTS, "Events that reached the retry limit and are not processed");
    describe_gauge!(OLDEST_PENDING_AGE, Unit::Seconds, "Age of the oldest pending event, 0 when none");
    describe_gauge!(
        SINCE_PROGRESS,
        Unit::Seconds,
        "Time since the loop last made progress (store round trip or handler finished); -1 before the first claim"
    );
    describe_gauge!(READY, "1 once the first claim query succeeded");
}

/// Running totals and liveness of one engine.
///
/// The totals are updated only after outcomes are committed; the liveness facts after every
/// successful store round trip and every finished handler.
pub struct Metrics {
    started: Instant,
    processed: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    dead: AtomicU64,
    errors: AtomicU64,
    claimed: AtomicU64,
    set_aside: AtomicU64,
    crashed: AtomicU64,
    outcome_unknown: AtomicU64,
    /// Milliseconds after `started` of the last progress, plus one; 0 before any.
    last_progress: AtomicU64,
    ready: AtomicBool,
    series: Mutex<SeriesCache>,
    batch_size: Histogram,
    database_errors: Counter,
    set_aside_total: Counter,
    crashed_total: Counter,
    outcome_unknown_total: Counter,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").field("snapshot", &self.snapshot()).finish_non_exhaustive()
    }
}

impl Default for Metrics {
    /// New counters; the `metrics` handles come from the recorder installed at this moment.
    fn default() -> Self {
        Self {
            started: Instant::now(),
            processed: AtomicU64::new(0),
            succeeded: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            dead: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            claimed: AtomicU64::new(0),
            set_aside: AtomicU64::new(0),
            crashed: AtomicU64::new(0),
            outcome_unknown: AtomicU64::new(0),
            last_progress: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            series: Mutex::new(SeriesCache::default()),
            batch_size: histogram!(names::BATCH_SIZE),
            database_errors: counter!(names::DATABASE_ERRORS),
            set_aside_total: counter!(names::SET_ASIDE),
            crashed_total: counter!(names::CRASHED),
            outcome_unknown_total: counter!(names::OUTCOME_UNKNOWN),
        }
    }
}

/// A copy of [`Metrics`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MetricsSnapshot {
    /// Attempts whose outcome was recorded.
    pub processed: u64,
    /// Attempts that succeeded.
    pub succeeded: u64,
    /// Attempts that failed (error, failure result, panic or timeout).
    pub failed: u64,
    /// Failed attempts that were scheduled for another try.
    pub retried: u64,
    /// Failed attempts after which the event reached the retry limit.
    pub dead: u64,
    /// Database errors (claims or completions that failed).
    pub errors: u64,
    /// Events claimed.
    pub claimed: u64,
    /// Rows set aside as dead without an attempt (undecodable, or already at the retry limit).
    pub set_aside: u64,
    /// Failed attempts recorded because the processor died while the event's handler ran alone.
    pub crashed: u64,
    /// Completions whose COMMIT reply was lost and whose outcome could not be found out.
    pub outcome_unknown: u64,
    /// Time since the engine was built.
    pub uptime: Duration,
}

impl fmt::Display for MetricsSnapshot {
    /// The original service's line, so existing log searches keep working.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Metrics: Processed={}, Succeeded={}, Failed={}, Retried={}, Errors={}, Uptime={}s",
            self.processed,
            self.succeeded,
            self.failed,
            self.retried,
            self.errors,
            self.uptime.as_secs()
        )
    }
}

impl Metrics {
    /// The current values.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            processed: get(&self.processed),
            succeeded: get(&self.succeeded),
            failed: get(&self.failed),
            retried: get(&self.retried),
            dead: get(&self.dead),
            errors: get(&self.errors),
            claimed: get(&self.claimed),
            set_aside: get(&self.set_aside),
            crashed: get(&self.crashed),
            outcome_unknown: get(&self.outcome_unknown),
            uptime: self.started.elapsed(),
        }
    }

    /// Whether a claim query has succeeded since the engine was built: the store is reachable
    /// and the schema is what the claim expects.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// How long ago the processing loop last made progress: a store round trip that succeeded
    /// (a claim, even an empty one, a claim's keep-alive, or a completion) or a handler that
    /// finished. `None` before the first.
    ///
    /// An idle engine claims at least every poll interval, and a busy one finishes a handler at
    /// least every handler timeout, so a value well above both means the loop is stuck (most
    /// often on a database it cannot reach).
    pub fn since_progress(&self) -> Option<Duration> {
        match self.last_progress.load(Ordering::Relaxed) {
            0 => None,
            at => Some(self.started.elapsed().saturating_sub(Duration::from_millis(at - 1))),
        }
    }

    fn record_progress(&self) {
        let at = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1;
        self.last_progress.fetch_max(at, Ordering::Relaxed);
    }

    /// A claim query that found nothing: the store answered.
    pub(crate) fn add_empty_claim(&self) {
        self.ready.store(true, Ordering::Relaxed);
        self.record_progress();
    }

    /// A claim that returned `n` events.
    pub(crate) fn add_claimed(&self, n: usize) {
        self.ready.store(true, Ordering::Relaxed);
        self.record_progress();
        self.claimed.fetch_add(n as u64, Ordering::Relaxed);
        self.batch_size.record(n as f64);
    }

    /// A claim's keep-alive round trip succeeded (long handlers are running).
    pub(crate) fn add_keep_alive(&self) {
        self.record_progress();
    }

    pub(crate) fn add_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.database_errors.increment(1);
    }

    pub(crate) fn add_crashed(&self, n: u64) {
        self.crashed.fetch_add(n, Ordering::Relaxed);
        self.crashed_total.increment(n);
    }

    pub(crate) fn add_outcome_unknown(&self) {
        self.outcome_unknown.fetch_add(1, Ordering::Relaxed);
        self.outcome_unknown_total.increment(1);
    }

    pub(crate) fn add_committed(&self, succeeded: u64, retried: u64, dead: u64, set_aside: u64) {
        self.record_progress();
        self.set_aside.fetch_add(set_aside, Ordering::Relaxed);
        self.set_aside_total.increment(set_aside);
        let failed = retried + dead;
        self.processed.fetch_add(succeeded + failed, Ordering::Relaxed);
        self.succeeded.fetch_add(succeeded, Ordering::Relaxed);
        self.failed.fetch_add(failed, Ordering::Relaxed);
        self.retried.fetch_add(retried, Ordering::Relaxed);
        self.dead.fetch_add(dead, Ordering::Relaxed);
    }

    /// Called for each claimed event: counts the claim by route and records the pickup latency
    /// of a first attempt. The returned timer measures the handler from
    /// [`EventTimer::handler_started`] to [`EventTimer::finish`].
    pub(crate) fn event_claimed(self: &Arc<Self>, event: &HookEvent) -> EventTimer {
        let series = self.series(&event.source, &event.action);
        series.claimed.increment(1);
        if event.retry_count == 0 {
            let waited = (OffsetDateTime::now_utc() - event.created_at).as_seconds_f64();
            series.pickup_latency.record(waited.max(0.0));
        }
        EventTimer {
            metrics: Arc::clone(self),
            series,
            source: event.source.clone(),
            action: event.action.clone(),
            started: Instant::now(),
        }
    }

    fn series(&self, source: &str, action: &str) -> Arc<Series> {
        let mut cache = self.series.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        cache.get(source, action)
    }
}

/// The metric handles of one `(source, action)` pair.
struct Series {
    claimed: Counter,
    succeeded: Counter,
    failed: Counter,
    retried: Counter,
    dead: Counter,
    handler_duration: Histogram,
    pickup_latency: Histogram,
}

impl Series {
    fn new(source: &str, action: &str) -> Self {
        let labels = [("source", source.to_owned()), ("action", action.to_owned())];
        Self {
            claimed: counter!(names::CLAIMED, &labels),
            succeeded: counter!(names::SUCCEEDED, &labels),
            failed: counter!(names::FAILED, &labels),
            retried: counter!(names::RETRIED, &labels),
            dead: counter!(names::DEAD, &labels),
            handler_duration: histogram!(names::HANDLER_DURATION, &labels),
            pickup_latency: histogram!(names::PICKUP_LATENCY, &labels),
        }
    }
}

/// Handles per `(source, action)`, created on first sight, at most [`MAX_LABELLED_PAIRS`].
#[derive(Default)]
struct SeriesCache {
    by_source: HashMap<String, HashMap<String, Arc<Series>>>,
    pairs: usize,
    other: Option<Arc<Series>>,
}

impl SeriesCache {
    fn get(&mut self, source: &str, action: &str) -> Arc<Series> {
        if let Some(series) = self.by_source.get(source).and_then(|actions| actions.get(action)) {
            return Arc::clone(series);
        }
        if self.pairs >= MAX_LABELLED_PAIRS {
            return Arc::clone(self.other.get_or_insert_with(|| {
                tracing::warn!(
                    limit = MAX_LABELLED_PAIRS,
                    "too many distinct (source, action) pairs; counting further ones as other/other"
                );
                Arc::new(Series::new(OTHER_LABEL, OTHER_LABEL))
            }));
        }
        self.pairs += 1;
        let series = Arc::new(Series::new(source, action));
        self.by_source.entry(source.to_owned()).or_default().insert(action.to_owned(), Arc::clone(&series));
        series
    }
}

/// A handler's clock, from [`handler_started`](EventTimer::handler_started) to
/// [`finish`](EventTimer::finish).
pub(crate) struct EventTimer {
    metrics: Arc<Metrics>,
    series: Arc<Series>,
    source: String,
    action: String,
    started: Instant,
}

impl EventTimer {
    /// The handler got its concurrency slot and starts now.
    pub(crate) fn handler_started(mut self) -> Self {
        self.started = Instant::now();
        self
    }

    /// The handler is done: records its duration and the loop's progress.
    pub(crate) fn finish(self) -> EventRecord {
        self.series.handler_duration.record(self.started.elapsed().as_secs_f64());
        self.metrics.record_progress();
        EventRecord { series: self.series, source: self.source, action: self.action }
    }
}

/// One handled event, waiting for its outcome to be committed.
pub(crate) struct EventRecord {
    series: Arc<Series>,
    /// The event's source, for log lines.
    pub(crate) source: String,
    /// The event's action, for log lines.
    pub(crate) action: String,
}

/// How an attempt ended, for the outcome counters.
#[derive(Clone, Copy)]
enum Kind {
    Succeeded,
    Retried,
    Dead,
}

/// The outcomes of one batch, counted by route once [`commit`](Tally::commit) is called (after
/// the store wrote them).
#[derive(Default)]
pub(crate) struct Tally(Vec<(Arc<Series>, Kind)>);

impl Tally {
    pub(crate) fn succeeded(&mut self, record: &EventRecord) {
        self.0.push((Arc::clone(&record.series), Kind::Succeeded));
    }

    pub(crate) fn retried(&mut self, record: &EventRecord) {
        self.0.push((Arc::clone(&record.series), Kind::Retried));
    }

    pub(crate) fn dead(&mut self, record: &EventRecord) {
        self.0.push((Arc::clone(&record.series), Kind::Dead));
    }

    /// The outcomes are committed: count them.
    pub(crate) fn commit(self) {
        for (series, kind) in self.0 {
            match kind {
                Kind::Succeeded => series.succeeded.increment(1),
                Kind::Retried => {
                    series.failed.increment(1);
                    series.retried.increment(1);
                }
                Kind::Dead => {
                    series.failed.increment(1);
                    series.dead.increment(1);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_line_format() {
        let m = Metrics::default();
        m.add_committed(415, 2, 2, 0);
        m.add_error();
        let line = MetricsSnapshot { uptime: Duration::from_secs(120), ..m.snapshot() }.to_string();
        assert_eq!(line, "Metrics: Processed=419, Succeeded=415, Failed=4, Retried=2, Errors=1, Uptime=120s");
    }

    #[test]
    fn ready_and_progress_start_at_the_first_claim() {
        let m = Metrics::default();
        assert!(!m.is_ready());
        assert_eq!(m.since_progress(), None);
        m.add_error();
        assert!(!m.is_ready(), "a failed claim is no progress");
        assert_eq!(m.since_progress(), None);
        m.add_empty_claim();
        assert!(m.is_ready());
        assert!(m.since_progress().is_some_and(|d| d < Duration::from_secs(1)));
    }

    #[test]
    fn label_pairs_are_capped() {
        let mut cache = SeriesCache::default();
        for i in 0..MAX_LABELLED_PAIRS {
            cache.get("s", &i.to_string());
        }
        assert_eq!(cache.pairs, MAX_LABELLED_PAIRS);
        cache.get("s", "0");
        assert!(cache.other.is_none(), "a known pair is not 'other'");
        cache.get("s", "one too many");
        cache.get("t", "and another");
        assert_eq!(cache.pairs, MAX_LABELLED_PAIRS);
        assert!(cache.other.is_some());
    }
}
