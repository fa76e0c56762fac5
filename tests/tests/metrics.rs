//! The engine's Prometheus metrics, recorded in-process through a real Prometheus recorder:
//! outcome counters by route with the right values, histograms that count what they claim, and
//! no outcome counted before the store has written it.
//!
//! The recorder is global to this test binary, so each test uses sources of its own.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hook_core::{
    ClaimRequest, ClaimedBatch, Engine, HandlerRegistry, HandlerResult, HookEvent, Outcome, Store,
};
use hook_store::testing::TestDb;
use hook_store::{PgBatch, PgStore, StoreError, StoreOptions};
use hook_tests::{insert_events, test_config, wait_for_count, Invocations, Running};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// The recorder, installed once per test binary before any engine is built.
fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let handle = PrometheusBuilder::new().install_recorder().expect("install the Prometheus recorder");
        hook_core::describe_metrics();
        handle
    })
}

/// The value of `name{source="..",action=".."}` in a fresh scrape; 0 when absent.
fn value(name: &str, source: &str, action: &str) -> f64 {
    let series = format!("{name}{{source=\"{source}\",action=\"{action}\"}} ");
    recorder()
        .render()
        .lines()
        .find_map(|line| line.strip_prefix(&series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// `(claimed, succeeded, failed, retried, dead)` of one route.
fn outcomes(source: &str, action: &str) -> (f64, f64, f64, f64, f64) {
    (
        value("hook_events_claimed_total", source, action),
        value("hook_events_succeeded_total", source, action),
        value("hook_events_failed_total", source, action),
        value("hook_events_retried_total", source, action),
        value("hook_events_dead_total", source, action),
    )
}

/// Summaries (no buckets configured here) render `_count` like histograms do.
fn observations(name: &str, source: &str, action: &str) -> f64 {
    value(&format!("{name}_count"), source, action)
}

#[tokio::test]
async fn outcomes_are_counted_by_route() {
    recorder();
    let db = TestDb::migrated("metrics_by_route").await;
    let client = db.client().await;
    insert_events(&client, 2, "mx-ok", "a").await;
    insert_events(&client, 1, "mx-fail", "b").await;
    let mut registry = HandlerRegistry::new();
    registry.register("mx-ok", "*", |_: Arc<HookEvent>| async { HandlerResult::ok("fine") });
    registry.register("mx-fail", "*", |_: Arc<HookEvent>| async { HandlerResult::failed("always") });
    let engine = Engine::builder(db.store(StoreOptions::default()).await)
        .registry(registry)
        .config(test_config())
        .build()
        .unwrap();
    let running = Running::start(engine);
    wait_for_count(
        &client,
        "SELECT count(*) FROM hook_events WHERE processed OR dead_at IS NOT NULL",
        3,
        Duration::from_secs(30),
    )
    .await;
    let totals = running.stop().await;

    assert_eq!(outcomes("mx-ok", "a"), (2.0, 2.0, 0.0, 0.0, 0.0));
    // Three attempts (the default retry limit): two retried, the last one dead.
    assert_eq!(outcomes("mx-fail", "b"), (3.0, 0.0, 3.0, 2.0, 1.0));
    assert_eq!((totals.succeeded, totals.failed, totals.retried, totals.dead), (2, 3, 2, 1));
    assert_eq!(observations("hook_events_handler_duration_seconds", "mx-fail", "b"), 3.0);
    // Pickup latency is queue lag: first attempts only, not the backoff of retries.
    assert_eq!(observations("hook_events_pickup_latency_seconds", "mx-fail", "b"), 1.0);
    assert_eq!(observations("hook_events_pickup_latency_seconds", "mx-ok", "a"), 2.0);
    let scrape = recorder().render();
    assert!(scrape.contains("hook_events_batch_size_count"), "{scrape}");
    assert!(scrape.contains("# HELP hook_events_dead_total "), "{scrape}");
}

/// A store whose next `fail` completions fail without writing anything (the batch is dropped,
/// so its transaction rolls back), as when the connection is lost at the worst moment.
struct LosingStore {
    inner: PgStore,
    fail: Arc<AtomicU32>,
    /// Instead of failing, commit and then report the outcome as unknown (a lost COMMIT reply).
    unknown: bool,
}

struct LosingBatch {
    inner: PgBatch,
    fail: Arc<AtomicU32>,
    unknown: bool,
}

impl Store for LosingStore {
    type Error = StoreError;
    type Batch = LosingBatch;

    async fn claim(&self, request: ClaimRequest) -> Result<Option<LosingBatch>, StoreError> {
        let batch = self.inner.claim(request).await?;
        Ok(batch.map(|inner| LosingBatch { inner, fail: Arc::clone(&self.fail), unknown: self.unknown }))
    }

    fn wakeups(&self) -> Option<tokio::sync::watch::Receiver<()>> {
        self.inner.wakeups()
    }
}

impl ClaimedBatch for LosingBatch {
    type Error = StoreError;

    fn take_events(&mut self) -> Vec<HookEvent> {
        self.inner.take_events()
    }

    async fn keep_alive(&self) -> Result<(), StoreError> {
        self.inner.keep_alive().await
    }

    fn is_outcome_unknown(error: &StoreError) -> bool {
        PgBatch::is_outcome_unknown(error)
    }

    async fn start(&mut self) -> Result<(), StoreError> {
        self.inner.start().await
    }

    async fn finish(self, outcomes: Vec<Outcome>) -> Result<hook_core::Finished, StoreError> {
        if self.fail.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            if self.unknown {
                self.inner.finish(outcomes).await?;
                return Err(StoreError::OutcomeUnknown("injected: the COMMIT reply was lost".into()));
            }
            self.inner.release().await;
            return Err(StoreError::Pool("injected: the completion was lost".into()));
        }
        self.inner.finish(outcomes).await
    }
}

#[tokio::test]
async fn an_outcome_that_was_not_written_is_not_counted() {
    recorder();
    let db = TestDb::migrated("metrics_lost_outcome").await;
    let client = db.client().await;
    insert_events(&client, 1, "mx-lost", "c").await;
    let invocations = Invocations::default();
    let mut registry = HandlerRegistry::new();
    registry.register("mx-lost", "*", invocations.handler());
    let store = LosingStore {
        inner: db.store(StoreOptions::default()).await,
        fail: Arc::new(AtomicU32::new(1)),
        unknown: false,
    };
    let engine = Engine::builder(store).registry(registry).config(test_config()).build().unwrap();
    let running = Running::start(engine);
    wait_for_count(&client, "SELECT count(*) FROM hook_events WHERE processed", 1, Duration::from_secs(30))
        .await;
    let totals = running.stop().await;

    assert_eq!(invocations.total(), 2, "handled twice: the first outcome was lost");
    // Claimed and timed twice, succeeded once: the lost outcome was never counted.
    assert_eq!(outcomes("mx-lost", "c"), (2.0, 1.0, 0.0, 0.0, 0.0));
    assert_eq!(observations("hook_events_handler_duration_seconds", "mx-lost", "c"), 2.0);
    assert_eq!((totals.succeeded, totals.processed), (1, 1));
    assert!(totals.errors >= 1);
    let errors: f64 = recorder()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix("hook_events_database_errors_total ")?.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(errors >= 1.0, "the lost completion is a database error");
}

#[tokio::test]
async fn a_commit_whose_reply_was_lost_is_counted_as_unknown_not_as_an_error_or_an_outcome() {
    recorder();
    let db = TestDb::migrated("metrics_unknown_outcome").await;
    let client = db.client().await;
    insert_events(&client, 1, "mx-unknown", "c").await;
    let invocations = Invocations::default();
    let mut registry = HandlerRegistry::new();
    registry.register("mx-unknown", "*", invocations.handler());
    let store = LosingStore {
        inner: db.store(StoreOptions::default()).await,
        fail: Arc::new(AtomicU32::new(1)),
        unknown: true,
    };
    let engine = Engine::builder(store).registry(registry).config(test_config()).build().unwrap();
    let metrics = engine.metrics();
    let running = Running::start(engine);
    wait_for_count(&client, "SELECT count(*) FROM hook_events WHERE processed", 1, Duration::from_secs(30))
        .await;
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while metrics.snapshot().outcome_unknown == 0 {
        assert!(std::time::Instant::now() < until, "the unknown outcome was never counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let totals = running.stop().await;
    assert_eq!(invocations.total(), 1, "it did commit: the event was not handled again");
    assert_eq!((totals.outcome_unknown, totals.errors, totals.succeeded), (1, 0, 0));
    let unknown: f64 = recorder()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix("hook_events_outcome_unknown_total ")?.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(unknown >= 1.0, "counted in hook_events_outcome_unknown_total");
}

#[tokio::test]
async fn liveness_follows_the_loop() {
    let db = TestDb::migrated("metrics_liveness").await;
    let engine = Engine::builder(db.store(StoreOptions::default()).await)
        .registry(HandlerRegistry::new())
        .config(test_config())
        .build()
        .unwrap();
    let metrics = engine.metrics();
    assert!(!metrics.is_ready());
    assert_eq!(metrics.since_progress(), None);
    let running = Running::start(engine);
    // An idle engine claims every poll interval (50 ms here): ready, and progress stays fresh.
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while !metrics.is_ready() {
        assert!(std::time::Instant::now() < until, "never ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let since = metrics.since_progress().expect("progress recorded");
        assert!(since < Duration::from_millis(500), "idle loop looks stalled: {since:?}");
    }
    running.stop().await;
}
