//! The engine end to end on a real PostgreSQL: routing, retries, failures of every kind,
//! concurrency between processors, shutdown, and a database that goes away.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hook_core::{Engine, EngineConfig, HandlerRegistry, HandlerResult, HookEvent, RetryPolicy};
use hook_store::testing::TestDb;
use hook_store::{ClusterOptions, EmbeddedCluster, PgStore, StoreOptions};
use hook_tests::{count, insert_event, insert_events, test_config, wait_for_count, Invocations, Running};
use serde_json::json;

const ALL_PROCESSED: &str = "SELECT count(*) FROM hook_events WHERE NOT processed";
/// Counts to 0 once every event is processed or dead.
const ALL_DECIDED: &str = "SELECT count(*) FROM hook_events WHERE NOT processed AND dead_at IS NULL";

fn engine<S: hook_core::Store>(store: S, registry: HandlerRegistry, config: EngineConfig) -> Engine<S> {
    Engine::builder(store).registry(registry).config(config).build().expect("valid config")
}

/// A registry whose one handler, for every event, counts the invocations it records.
fn counting() -> (Invocations, HandlerRegistry) {
    let invocations = Invocations::default();
    let mut registry = HandlerRegistry::new();
    registry.register("*", "*", invocations.handler());
    (invocations, registry)
}

fn tagged(tag: &'static str) -> impl Fn(Arc<HookEvent>) -> std::future::Ready<HandlerResult> + Send + Sync {
    move |_| std::future::ready(HandlerResult::ok(tag).with("handler", tag))
}

#[tokio::test]
async fn routes_by_exact_then_source_then_global() {
    let db = TestDb::migrated("routes").await;
    let client = db.client().await;
    let exact = insert_event(&client, "PreToolUse", "tool_invocation", json!({})).await;
    let by_source = insert_event(&client, "PreToolUse", "other", json!({})).await;
    let global = insert_event(&client, "Custom", "thing", json!({})).await;
    let mut registry = HandlerRegistry::new();
    registry
        .register("PreToolUse", "tool_invocation", tagged("exact"))
        .register("PreToolUse", "*", tagged("source"))
        .register("*", "*", tagged("global"));
    let running = Running::start(engine(db.store(StoreOptions::default()).await, registry, test_config()));
    wait_for_count(&client, ALL_PROCESSED, 0, Duration::from_secs(30)).await;
    running.stop().await;
    for (id, tag) in [(exact, "exact"), (by_source, "source"), (global, "global")] {
        let got: serde_json::Value = client
            .query_one("SELECT result_metadata->'handler' FROM hook_events WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        assert_eq!(got, json!(tag));
    }
}

#[tokio::test]
async fn default_handlers_process_seed_events_and_keep_their_metadata() {
    let db = TestDb::migrated("default_handlers").await;
    let client = db.client().await;
    let pre = insert_event(
        &client,
        "PreToolUse",
        "tool_invocation",
        json!({"tool_name": "Edit", "tool_input": {"file_path": "/a.rs"}}),
    )
    .await;
    let prompt =
        insert_event(&client, "UserPromptSubmit", "prompt_submitted", json!({"prompt": "héllo"})).await;
    let odd = insert_event(&client, "SessionEnd", "session_ended", json!(null)).await;
    let unknown = insert_event(&client, "Mystery", "whatever", json!([1, 2])).await;
    let running = Running::start(engine(
        db.store(StoreOptions::default()).await,
        hook_core::default_registry(),
        test_config(),
    ));
    wait_for_count(&client, ALL_PROCESSED, 0, Duration::from_secs(30)).await;
    let metrics = running.stop().await;
    assert_eq!((metrics.succeeded, metrics.failed), (4, 0));
    let meta = |id| {
        let client = &client;
        async move {
            client
                .query_one("SELECT result_metadata FROM hook_events WHERE id = $1", &[&id])
                .await
                .unwrap()
                .get::<_, serde_json::Value>(0)
        }
    };
    assert_eq!(meta(pre).await["tool_name"], "Edit");
    assert_eq!(meta(pre).await["file_path"], "/a.rs");
    assert_eq!(meta(prompt).await["prompt_length"], 5);
    assert!(meta(odd).await.is_object());
    assert_eq!(meta(unknown).await["unknown"], true);
}

#[tokio::test]
async fn fails_twice_then_succeeds_with_backoff_between_attempts() {
    let db = TestDb::migrated("fails_twice").await;
    let client = db.client().await;
    let id = insert_event(&client, "Flaky", "op", json!({})).await;
    let attempts: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let seen = Arc::clone(&attempts);
    let mut registry = HandlerRegistry::new();
    registry.register("Flaky", "op", move |_event: Arc<HookEvent>| {
        let seen = Arc::clone(&seen);
        async move {
            let mut seen = seen.lock().unwrap();
            seen.push(Instant::now());
            if seen.len() <= 2 {
                Err(format!("transient failure {}", seen.len()))
            } else {
                Ok(HandlerResult::ok("finally"))
            }
        }
    });
    let config = EngineConfig {
        retry: RetryPolicy { base_delay: Duration::from_millis(300), jitter: 0.0, ..RetryPolicy::default() },
        ..test_config()
    };
    let running = Running::start(engine(db.store(StoreOptions::default()).await, registry, config));
    wait_for_count(&client, ALL_PROCESSED, 0, Duration::from_secs(30)).await;
    let metrics = running.stop().await;

    let row = client
        .query_one("SELECT retry_count, processing_errors, processed, dead_at IS NULL FROM hook_events WHERE id = $1", &[&id])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);
    assert_eq!(row.get::<_, Vec<String>>(1), ["transient failure 1", "transient failure 2"]);
    assert!(row.get::<_, bool>(2));
    assert!(row.get::<_, bool>(3));
    let at = attempts.lock().unwrap().clone();
    assert_eq!(at.len(), 3);
    // The policy says 300 ms after the first failure, 600 ms after the second.
    let (first, second) = (at[1] - at[0], at[2] - at[1]);
    assert!(first >= Duration::from_millis(300), "first retry after {first:?}");
    assert!(second >= Duration::from_millis(600), "second retry after {second:?}");
    assert!(second > first, "backoff grows: {first:?} then {second:?}");
    assert_eq!((metrics.succeeded, metrics.failed, metrics.retried, metrics.dead), (1, 2, 2, 0));
}

#[tokio::test]
async fn panics_timeouts_and_errors_are_failed_attempts_and_the_processor_carries_on() {
    let db = TestDb::migrated("handler_faults").await;
    let client = db.client().await;
    let panics = insert_event(&client, "Bad", "panic", json!({})).await;
    let hangs = insert_event(&client, "Bad", "hang", json!({})).await;
    let huge = insert_event(&client, "Bad", "huge", json!({})).await;
    let result = insert_event(&client, "Bad", "result", json!({})).await;
    let fine = insert_event(&client, "Good", "ok", json!({})).await;
    let mut registry = HandlerRegistry::new();
    registry
        .register("Bad", "panic", |_e: Arc<HookEvent>| async move {
            if true {
                panic!("handler exploded");
            }
            HandlerResult::ok("unreachable")
        })
        .register("Bad", "hang", |_e: Arc<HookEvent>| async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            HandlerResult::ok("too late")
        })
        .register("Bad", "huge", |_e: Arc<HookEvent>| async move {
            Err::<HandlerResult, _>("x\0y".repeat(1_000_000))
        })
        .register("Bad", "result", |_e: Arc<HookEvent>| async move {
            HandlerResult::failed("said no").with("why", "because")
        })
        .register("Good", "ok", tagged("ok"));
    let config = EngineConfig {
        handler_timeout: Duration::from_millis(300),
        retry: RetryPolicy { max_retry_count: 1, ..test_config().retry },
        ..test_config()
    };
    let running = Running::start(engine(db.store(StoreOptions::default()).await, registry, config));
    wait_for_count(&client, ALL_DECIDED, 0, Duration::from_secs(30)).await;
    let metrics = running.stop().await;

    let errors = |id| {
        let client = &client;
        async move {
            let row = client
                .query_one("SELECT processing_errors, retry_count, dead_at IS NOT NULL FROM hook_events WHERE id = $1", &[&id])
                .await
                .unwrap();
            assert_eq!(row.get::<_, i32>(1), 1);
            assert!(row.get::<_, bool>(2), "one failure with max_retry_count 1 is dead");
            row.get::<_, Vec<String>>(0).remove(0)
        }
    };
    assert!(errors(panics).await.contains("handler panicked: handler exploded"));
    assert!(errors(hangs).await.contains("timed out after 0.300s"));
    let huge_error = errors(huge).await;
    assert!(huge_error.len() <= hook_core::MAX_ERROR_BYTES, "bounded: {} bytes", huge_error.len());
    assert!(huge_error.contains("truncated, 5000000 bytes"));
    assert_eq!(errors(result).await, "said no");
    let why: serde_json::Value = client
        .query_one("SELECT result_metadata->'why' FROM hook_events WHERE id = $1", &[&result])
        .await
        .unwrap()
        .get(0);
    assert_eq!(why, "because", "a failed attempt's metadata is kept too");
    let processed: bool =
        client.query_one("SELECT processed FROM hook_events WHERE id = $1", &[&fine]).await.unwrap().get(0);
    assert!(processed);
    assert_eq!((metrics.succeeded, metrics.failed, metrics.dead, metrics.errors), (1, 4, 4, 0));
}

#[tokio::test]
async fn two_processors_handle_each_of_10000_events_exactly_once() {
    let db = TestDb::migrated("two_processors").await;
    let client = db.client().await;
    let ids = insert_events(&client, 10_000, "PreToolUse", "tool_invocation").await;
    let invocations = Invocations::default();
    let mut runs = Vec::new();
    for _ in 0..2 {
        let mut registry = HandlerRegistry::new();
        registry.register("*", "*", invocations.handler());
        runs.push(Running::start(engine(db.store(StoreOptions::default()).await, registry, test_config())));
    }
    wait_for_count(&client, ALL_PROCESSED, 0, Duration::from_secs(120)).await;
    let mut per_engine = Vec::new();
    for run in runs {
        per_engine.push(run.stop().await.succeeded);
    }
    let seen = invocations.snapshot();
    assert_eq!(seen.len(), ids.len(), "every event handled");
    let twice: Vec<_> = seen.iter().filter(|(_, &n)| n != 1).collect();
    assert!(twice.is_empty(), "{} events handled more than once", twice.len());
    assert_eq!(per_engine.iter().sum::<u64>(), 10_000, "{per_engine:?}");
}

#[tokio::test]
async fn shutdown_finishes_running_handlers_and_releases_the_rest() {
    let db = TestDb::migrated("shutdown").await;
    let client = db.client().await;
    let quick = insert_event(&client, "S", "quick", json!({})).await;
    let stuck = insert_event(&client, "S", "stuck", json!({})).await;
    let started = Arc::new(AtomicU32::new(0));
    let (s1, s2) = (Arc::clone(&started), Arc::clone(&started));
    let mut registry = HandlerRegistry::new();
    registry
        .register("S", "quick", move |_e: Arc<HookEvent>| {
            let started = Arc::clone(&s1);
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(500)).await;
                HandlerResult::ok("finished during the drain")
            }
        })
        .register("S", "stuck", move |_e: Arc<HookEvent>| {
            let started = Arc::clone(&s2);
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(60)).await;
                HandlerResult::ok("never")
            }
        });
    let config = EngineConfig {
        drain_timeout: Duration::from_secs(2),
        handler_timeout: Duration::from_secs(120),
        claim_timeout: Duration::from_secs(180),
        ..test_config()
    };
    let running = Running::start(engine(db.store(StoreOptions::default()).await, registry, config));
    while started.load(Ordering::SeqCst) < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let begun = Instant::now();
    let metrics = running.stop().await;
    let took = begun.elapsed();
    assert!(took >= Duration::from_millis(400) && took < Duration::from_secs(10), "drain took {took:?}");
    assert_eq!((metrics.succeeded, metrics.failed), (1, 0));
    let state = |id| {
        let client = &client;
        async move {
            let row = client
                .query_one("SELECT processed, retry_count FROM hook_events WHERE id = $1", &[&id])
                .await
                .unwrap();
            (row.get::<_, bool>(0), row.get::<_, i32>(1))
        }
    };
    assert_eq!(state(quick).await, (true, 0));
    assert_eq!(state(stuck).await, (false, 0), "released unchanged, not counted as a failure");
    // Released means claimable right away.
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM (SELECT 1 FROM hook_events WHERE NOT processed FOR UPDATE SKIP LOCKED) s"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn a_database_outage_is_survived_and_nothing_is_lost() {
    let dir = std::env::temp_dir().join(format!("hook-events-outage-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cluster = EmbeddedCluster::start(ClusterOptions {
        data_dir: dir.clone(),
        database: "outage".into(),
        durable: false,
        max_connections: 50,
    })
    .await
    .unwrap();
    let config = cluster.config("outage");
    let connect = || async {
        let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client
    };
    let store = PgStore::connect(config.clone(), StoreOptions::default()).await.unwrap();
    store.migrate().await.unwrap();
    let (invocations, registry) = counting();
    let running = Running::start(engine(store, registry, test_config()));

    let client = connect().await;
    insert_events(&client, 100, "PreToolUse", "tool_invocation").await;
    wait_for_count(&client, ALL_PROCESSED, 0, Duration::from_secs(30)).await;
    drop(client);

    cluster.stop_server().await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.start_server().await.unwrap();

    let client = connect().await;
    insert_events(&client, 100, "PostToolUse", "tool_completion").await;
    wait_for_count(&client, ALL_PROCESSED, 0, Duration::from_secs(60)).await;
    let metrics = running.stop().await;
    assert_eq!(count(&client, "SELECT count(*) FROM hook_events WHERE processed").await, 200);
    assert!(metrics.errors > 0, "the outage was noticed and counted");
    assert_eq!(invocations.snapshot().len(), 200);
    drop(client);
    cluster.stop_server().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn thousands_of_rows_at_the_retry_limit_ahead_of_live_events_do_not_hold_them_up() {
    let db = TestDb::migrated("stranded_ahead").await;
    let client = db.client().await;
    // 2,000 rows the original left at its limit, older than everything else, then live events.
    client
        .batch_execute(
            "INSERT INTO hook_events (id, source, action, resource, resource_id, retry_count, created_at)
             SELECT gen_random_uuid(), 'Stop', 'response_completed', 'session', 's' || i, 3,
                    now() - interval '1 day' + i * interval '1 ms'
             FROM generate_series(1, 2000) AS i",
        )
        .await
        .unwrap();
    let live = insert_events(&client, 20, "Stop", "response_completed").await;
    let (invocations, registry) = counting();
    // Polling once an hour, and no insert while it runs to send NOTIFY: only claiming again at
    // once after a claim that set rows aside gets past them.
    let config = EngineConfig { batch_size: 50, poll_interval: Duration::from_secs(3600), ..test_config() };
    let running = Running::start(engine(db.store(StoreOptions::default()).await, registry, config));
    wait_for_count(&client, ALL_DECIDED, 0, Duration::from_secs(30)).await;
    let metrics = running.stop().await;
    assert_eq!(
        count(&client, "SELECT count(*) FROM hook_events WHERE dead_at IS NOT NULL AND retry_count = 3")
            .await,
        2000
    );
    assert_eq!((metrics.set_aside, metrics.dead, metrics.succeeded), (2000, 0, 20));
    let snapshot = invocations.snapshot();
    assert_eq!(snapshot.len(), 20, "only the live events were handled");
    assert!(live.iter().all(|id| snapshot.get(id) == Some(&1)));
}

/// What [`Counting`] saw of the engine's claims.
#[derive(Debug, Default)]
struct ClaimsSeen {
    /// Claims on their way now, and isolated ones among them.
    now: usize,
    isolated_now: usize,
    /// The most on their way at once.
    most: usize,
    /// Claims begun beside an isolated one, or isolated ones begun beside another.
    beside_isolated: usize,
    isolated: usize,
    /// Claims that held rows back for want of byte budget.
    held_back: usize,
}

/// A [`PgStore`] that counts the claims on their way at once.
struct Counting {
    inner: PgStore,
    seen: Arc<Mutex<ClaimsSeen>>,
}

impl hook_core::Store for Counting {
    type Error = hook_store::StoreError;
    type Batch = hook_store::PgBatch;

    async fn claim(
        &self,
        request: hook_core::ClaimRequest,
    ) -> Result<Option<hook_store::PgBatch>, hook_store::StoreError> {
        {
            let mut seen = self.seen.lock().expect("claims seen");
            if seen.isolated_now > 0 || (request.isolate && seen.now > 0) {
                seen.beside_isolated += 1;
            }
            seen.now += 1;
            seen.most = seen.most.max(seen.now);
            if request.isolate {
                seen.isolated_now += 1;
                seen.isolated += 1;
            }
        }
        let claimed = self.inner.claim(request).await;
        let mut seen = self.seen.lock().expect("claims seen");
        seen.now -= 1;
        if matches!(&claimed, Ok(Some(batch)) if hook_core::ClaimedBatch::held_back(batch) > 0) {
            seen.held_back += 1;
        }
        if request.isolate {
            seen.isolated_now -= 1;
        }
        claimed
    }

    fn wakeups(&self) -> Option<tokio::sync::watch::Receiver<()>> {
        self.inner.wakeups()
    }

    fn suspects_waiting(&self) -> bool {
        self.inner.suspects_waiting()
    }
}

/// Inserts `n` events and leaves them as a holder that died mid-batch does: suspects, to be
/// handled one at a time, alone. Returns their ids.
async fn suspects_of_a_dead_holder(
    db: &TestDb,
    client: &tokio_postgres::Client,
    n: usize,
) -> Vec<uuid::Uuid> {
    use hook_core::{ClaimedBatch, Store};
    let suspects = insert_events(client, n, "Suspect", "a").await;
    let dead = db.store(StoreOptions { listen: false, ..StoreOptions::default() }).await;
    let mut batch = dead.claim(hook_core::ClaimRequest::default()).await.expect("claim").expect("a batch");
    assert_eq!(batch.take_events().len(), n);
    hook_tests::crash::registered(client).await;
    batch.start().await.expect("record the batch");
    hook_tests::crash::kill_the_processor(client).await;
    drop(batch);
    drop(dead);
    suspects
}

#[tokio::test(flavor = "multi_thread")]
async fn suspects_are_handled_one_after_another_without_waiting_for_a_wakeup() {
    let db = TestDb::migrated("suspects_back_to_back").await;
    let client = db.client().await;
    let suspects = suspects_of_a_dead_holder(&db, &client, 20).await;
    // No LISTEN and a poll interval of a minute: nothing wakes the loop between suspects.
    let (invocations, registry) = counting();
    let store = db.store(StoreOptions { listen: false, ..StoreOptions::default() }).await;
    let config = EngineConfig { poll_interval: Duration::from_secs(60), ..test_config() };
    let running = Running::start(engine(store, registry, config));
    // One suspect per poll interval would take 20 minutes.
    wait_for_count(&client, ALL_PROCESSED, 0, Duration::from_secs(30)).await;
    let metrics = running.stop().await;
    assert_eq!(metrics.succeeded, suspects.len() as u64);
    assert!(invocations.snapshot().values().all(|&n| n == 1), "each handled once");
}

/// Drains a backlog of 3,000 events behind the 20 suspects of a dead holder through an engine
/// with `claims_in_flight`; returns what the claims did, after checking that every event was
/// handled exactly once and the suspects were not charged.
async fn drain_with_claims_in_flight(name: &str, claims_in_flight: usize) -> ClaimsSeen {
    let db = TestDb::migrated(name).await;
    let client = db.client().await;
    let suspects = suspects_of_a_dead_holder(&db, &client, 20).await;
    let backlog = insert_events(&client, 3_000, "PreToolUse", "tool_invocation").await;

    let (invocations, registry) = counting();
    let seen = Arc::new(Mutex::new(ClaimsSeen::default()));
    let store = Counting { inner: db.store(StoreOptions::default()).await, seen: Arc::clone(&seen) };
    let config = EngineConfig { claims_in_flight, ..test_config() };
    let running = Running::start(engine(store, registry, config));
    wait_for_count(&client, ALL_PROCESSED, 0, Duration::from_secs(120)).await;
    let metrics = running.stop().await;

    let handled = invocations.snapshot();
    assert_eq!(handled.len(), suspects.len() + backlog.len(), "every event handled");
    assert!(handled.values().all(|&n| n == 1), "no event handled twice in this process");
    assert_eq!(metrics.succeeded, 3_020);
    let clean =
        "SELECT count(*) FROM hook_events WHERE processed AND retry_count = 0 AND processing_errors IS NULL";
    assert_eq!(count(&client, clean).await, 3_020, "suspects are not charged");
    let seen = std::mem::take(&mut *seen.lock().expect("claims seen"));
    assert!(seen.isolated >= suspects.len(), "each suspect claimed alone: {seen:?}");
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn claims_overlap_two_at_a_time_in_a_backlog_and_never_beside_an_isolated_one() {
    let seen = drain_with_claims_in_flight("claims_overlap", 2).await;
    assert_eq!(seen.most, 2, "two claims on their way at once: {seen:?}");
    assert_eq!(seen.beside_isolated, 0, "an isolated claim is alone: {seen:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_one_claim_in_flight_claims_never_overlap() {
    let seen = drain_with_claims_in_flight("claims_one_at_a_time", 1).await;
    assert_eq!(seen.most, 1, "{seen:?}");
    assert_eq!(seen.beside_isolated, 0, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_larger_than_a_share_of_the_byte_budget_is_claimed_in_a_backlog_not_held_back_to_its_end() {
    let db = TestDb::migrated("claims_large_in_backlog").await;
    let client = db.client().await;
    // 500 events, one of 700 KB (more than half of the 1 MiB budget, less than all of it), then
    // 6,000: the large one comes up while claims overlap, each with a share of the budget.
    insert_events(&client, 500, "PreToolUse", "tool_invocation").await;
    let large = uuid::Uuid::new_v4();
    client
        .execute(
            "INSERT INTO hook_events (id, source, action, resource, resource_id, payload, created_at) \
             VALUES ($1, 'PreToolUse', 'tool_invocation', 'tool', 'Bash', \
                     jsonb_build_object('text', repeat('x', 700000)), clock_timestamp())",
            &[&large],
        )
        .await
        .unwrap();
    let behind = insert_events(&client, 6_000, "PreToolUse", "tool_invocation").await;
    let (invocations, registry) = counting();
    let config = EngineConfig { max_bytes_in_flight: 1024 * 1024, ..test_config() };
    let seen = Arc::new(Mutex::new(ClaimsSeen::default()));
    let store = Counting { inner: db.store(StoreOptions::default()).await, seen: Arc::clone(&seen) };
    let running = Running::start(engine(store, registry, config));
    wait_for_count(&client, ALL_PROCESSED, 0, Duration::from_secs(120)).await;
    let metrics = running.stop().await;
    let seen = std::mem::take(&mut *seen.lock().expect("claims seen"));
    assert_eq!(seen.most, 2, "claims overlapped: {seen:?}");
    // Held back by a claim with a share of the budget, then claimed by one with all of it (or
    // a few times more, when it sat locked in a claim beside), not by every claim that meets it.
    assert!(seen.held_back <= 3, "held back again and again: {seen:?}");

    assert_eq!(metrics.succeeded, 6_501);
    assert!(invocations.snapshot().values().all(|&n| n == 1), "each handled once");
    // Processed before most of those behind it (held back to the end, it would be processed
    // after all of them).
    let before: i64 = client
        .query_one(
            "SELECT count(*) FROM hook_events \
             WHERE id = ANY ($1) AND processed_at < (SELECT processed_at FROM hook_events WHERE id = $2)",
            &[&behind, &large],
        )
        .await
        .unwrap()
        .get(0);
    assert!(before < 3_000, "{before} of the 6,000 behind it were processed before the large event");
}
