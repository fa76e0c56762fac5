//! Compatibility with the original service: its table, its rows, its SQL.

use std::time::Duration;

use hook_core::{Engine, EngineConfig, HandlerResult, HookEvent, RetryPolicy};
use hook_store::testing::TestDb;
use hook_store::StoreOptions;
use hook_tests::{count, test_config, wait_for_count, Running};

/// The original's DDL, verbatim.
const SEED_DDL: &str = "
CREATE TABLE hook_events (
    id UUID PRIMARY KEY,
    source VARCHAR(255) NOT NULL,
    action VARCHAR(255) NOT NULL,
    resource VARCHAR(255) NOT NULL,
    resource_id VARCHAR(255) NOT NULL,
    payload JSONB NOT NULL DEFAULT '{}',
    metadata JSONB NOT NULL DEFAULT '{}',
    processed BOOLEAN NOT NULL DEFAULT FALSE,
    processing_errors TEXT[],
    retry_count INTEGER NOT NULL DEFAULT 0 CHECK (retry_count >= 0 AND retry_count <= 10),
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    processed_at TIMESTAMPTZ,
    CONSTRAINT processing_time_valid CHECK (processed_at IS NULL OR processed_at >= created_at),
    CONSTRAINT retry_count_limit CHECK (retry_count <= 10)
);
CREATE INDEX idx_hook_events_processed ON hook_events (processed, created_at DESC) WHERE NOT processed;
CREATE INDEX idx_hook_events_source_action ON hook_events (source, action);
CREATE INDEX idx_hook_events_retry ON hook_events (retry_count, created_at) WHERE retry_count > 0;
";

/// 419 backlogged rows as the original producers wrote them, some already retried once.
const SEED_ROWS: &str = "
INSERT INTO hook_events (id, source, action, resource, resource_id, payload, metadata, retry_count, processing_errors, created_at)
SELECT gen_random_uuid(),
       (ARRAY['PreToolUse','PostToolUse','UserPromptSubmit','Stop','SessionStart','SessionEnd'])[1 + i % 6],
       (ARRAY['tool_invocation','tool_completion','prompt_submitted','response_completed','session_initialized','session_completed'])[1 + i % 6],
       'tool', 'r' || i,
       jsonb_build_object('tool_name', 'Bash', 'prompt', repeat('p', i), 'session_id', 's' || (i % 7)),
       jsonb_build_object('hook_type', 'x'),
       CASE WHEN i % 50 = 0 THEN 1 ELSE 0 END,
       CASE WHEN i % 50 = 0 THEN ARRAY['old error'] END,
       now() - interval '2 days' + i * interval '1 second'
FROM generate_series(1, 419) AS i;
";

async fn seed_table(test: &str) -> (TestDb, tokio_postgres::Client) {
    let db = TestDb::empty(test).await;
    let client = db.client().await;
    client.batch_execute(SEED_DDL).await.expect("the original DDL applies");
    client.batch_execute(SEED_ROWS).await.expect("the backlog inserts");
    (db, client)
}

#[tokio::test]
async fn a_seed_table_with_419_rows_is_migrated_intact_then_fully_processed() {
    let (db, client) = seed_table("seed_419").await;
    let before = client
        .query("SELECT id, source, action, payload, retry_count, processing_errors, created_at FROM hook_events ORDER BY id", &[])
        .await
        .unwrap();
    let store = db.store(StoreOptions::default()).await;
    let report = store.migrate().await.unwrap();
    assert_eq!(report.applied.len(), hook_store::migrate::MIGRATIONS.len());
    let after = client
        .query("SELECT id, source, action, payload, retry_count, processing_errors, created_at FROM hook_events ORDER BY id", &[])
        .await
        .unwrap();
    assert_eq!(before.len(), 419);
    for (a, b) in before.iter().zip(&after) {
        assert_eq!(a.get::<_, uuid::Uuid>(0), b.get::<_, uuid::Uuid>(0));
        assert_eq!(a.get::<_, serde_json::Value>(3), b.get::<_, serde_json::Value>(3));
        assert_eq!(a.get::<_, Option<Vec<String>>>(5), b.get::<_, Option<Vec<String>>>(5));
        assert_eq!(a.get::<_, time::OffsetDateTime>(6), b.get::<_, time::OffsetDateTime>(6));
    }

    let engine =
        Engine::builder(store).registry(hook_core::default_registry()).config(test_config()).build().unwrap();
    let running = Running::start(engine);
    wait_for_count(
        &client,
        "SELECT count(*) FROM hook_events WHERE NOT processed",
        0,
        Duration::from_secs(60),
    )
    .await;
    let metrics = running.stop().await;
    assert_eq!(metrics.succeeded, 419);

    // The original's success criteria and monitoring queries, verbatim, still answer correctly.
    assert_eq!(count(&client, "SELECT COUNT(*) FROM hook_events WHERE processed = TRUE").await, 419);
    assert_eq!(
        count(&client, "SELECT count(*) FROM hook_events WHERE processed AND processed_at >= created_at")
            .await,
        419
    );
    let stats = client
        .query_one(
            "SELECT
                COUNT(*) FILTER (WHERE processed = TRUE) as processed_count,
                COUNT(*) FILTER (WHERE processed = FALSE) as pending_count,
                COUNT(*) FILTER (WHERE retry_count > 0) as retry_count,
                AVG(EXTRACT(EPOCH FROM (processed_at - created_at))) as avg_processing_time_sec
            FROM hook_events
            WHERE created_at > NOW() - INTERVAL '3 days'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((stats.get::<_, i64>(0), stats.get::<_, i64>(1), stats.get::<_, i64>(2)), (419, 0, 8));
    let error_rate = client
        .query_one(
            "SELECT
                COUNT(*) FILTER (WHERE retry_count = 0) as successful,
                COUNT(*) FILTER (WHERE retry_count > 0) as failed
            FROM hook_events
            WHERE processed = TRUE
              AND processed_at > NOW() - INTERVAL '1 hour'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((error_rate.get::<_, i64>(0), error_rate.get::<_, i64>(1)), (411, 8));
}

#[tokio::test]
async fn the_seed_reset_sql_requeues_dead_events() {
    let (db, client) = seed_table("seed_reset").await;
    client.batch_execute("UPDATE hook_events SET created_at = now() - interval '1 hour'").await.unwrap();
    let store = db.store(StoreOptions::default()).await;
    store.migrate().await.unwrap();

    // Every PreToolUse attempt fails until the "fix" below; with max_retry_count 3 they die.
    let fixed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = std::sync::Arc::clone(&fixed);
    let mut registry = hook_core::default_registry();
    registry.register("PreToolUse", "tool_invocation", move |_e: std::sync::Arc<HookEvent>| {
        let ok = flag.load(std::sync::atomic::Ordering::SeqCst);
        async move {
            if ok {
                HandlerResult::ok("fixed")
            } else {
                HandlerResult::failed("downstream unavailable")
            }
        }
    });
    let config = EngineConfig {
        retry: RetryPolicy {
            base_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(50),
            jitter: 0.0,
            max_retry_count: 3,
        },
        ..test_config()
    };
    let running = Running::start(Engine::builder(store).registry(registry).config(config).build().unwrap());
    let pre = count(&client, "SELECT count(*) FROM hook_events WHERE source = 'PreToolUse'").await;
    wait_for_count(
        &client,
        "SELECT count(*) FROM hook_events WHERE dead_at IS NOT NULL",
        pre,
        Duration::from_secs(60),
    )
    .await;
    wait_for_count(
        &client,
        "SELECT count(*) FROM hook_events WHERE NOT processed AND dead_at IS NULL",
        0,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        count(&client, "SELECT count(*) FROM hook_events WHERE retry_count >= 3 AND NOT processed").await,
        pre
    );

    fixed.store(true, std::sync::atomic::Ordering::SeqCst);
    // The original's "Reset Failed Events" SQL, verbatim.
    let reset = client
        .execute(
            "UPDATE hook_events
            SET retry_count = 0,
                processing_errors = NULL
            WHERE retry_count >= 3
              AND source = 'PreToolUse'
              AND created_at > NOW() - INTERVAL '1 day'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(reset as i64, pre);
    wait_for_count(
        &client,
        "SELECT count(*) FROM hook_events WHERE NOT processed",
        0,
        Duration::from_secs(60),
    )
    .await;
    running.stop().await;
    assert_eq!(count(&client, "SELECT count(*) FROM hook_events WHERE dead_at IS NOT NULL").await, 0);
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM hook_events WHERE source = 'PreToolUse' AND processed AND retry_count = 0"
        )
        .await,
        pre
    );
}

#[tokio::test]
async fn events_the_original_stranded_at_the_retry_limit_are_set_aside_dead_and_stay_resettable() {
    let (db, client) = seed_table("seed_stranded").await;
    // The original left events that hit the limit unprocessed with retry_count 3, for good.
    let stranded = client
        .execute(
            "UPDATE hook_events SET retry_count = 3, processing_errors = ARRAY['e1', 'e2', 'e3'] \
             WHERE resource_id IN ('r7', 'r8', 'r9')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(stranded, 3);
    let store = db.store(StoreOptions::default()).await;
    store.migrate().await.unwrap();
    let invocations = hook_tests::Invocations::default();
    let mut registry = hook_core::HandlerRegistry::new();
    registry.register("*", "*", invocations.handler());
    let config =
        EngineConfig { retry: RetryPolicy { max_retry_count: 3, ..test_config().retry }, ..test_config() };
    let running = Running::start(Engine::builder(store).registry(registry).config(config).build().unwrap());
    // Decided, every one: none left live and unprocessed.
    wait_for_count(
        &client,
        "SELECT count(*) FROM hook_events WHERE NOT processed AND dead_at IS NULL",
        0,
        Duration::from_secs(60),
    )
    .await;
    let rows = client
        .query(
            "SELECT processed, dead_at IS NOT NULL, retry_count, processing_errors FROM hook_events \
             WHERE resource_id IN ('r7', 'r8', 'r9')",
            &[],
        )
        .await
        .unwrap();
    for row in &rows {
        let errors: Vec<String> = row.get(3);
        assert_eq!((row.get::<_, bool>(0), row.get::<_, bool>(1), row.get::<_, i32>(2)), (false, true, 3));
        assert_eq!(&errors[..3], ["e1", "e2", "e3"]);
        assert!(errors[3].starts_with("retry_count 3 is at MAX_RETRY_COUNT (3)"), "{errors:?}");
    }
    assert_eq!(invocations.total(), 416, "the stranded rows were not attempted again");
    // The original's view of failures still lists them.
    assert_eq!(
        count(&client, "SELECT count(*) FROM hook_events WHERE retry_count >= 3 AND NOT processed").await,
        3
    );

    // Its reset SQL brings them back, and they are processed.
    client
        .execute(
            "UPDATE hook_events SET retry_count = 0, processing_errors = NULL \
             WHERE retry_count >= 3 AND created_at > NOW() - INTERVAL '3 days'",
            &[],
        )
        .await
        .unwrap();
    wait_for_count(
        &client,
        "SELECT count(*) FROM hook_events WHERE NOT processed",
        0,
        Duration::from_secs(60),
    )
    .await;
    running.stop().await;
    assert_eq!(invocations.total(), 419);
}

#[tokio::test]
async fn an_empty_database_gets_the_seed_table() {
    let db = TestDb::empty("seed_fresh").await;
    db.store(StoreOptions::default()).await.migrate().await.unwrap();
    let client = db.client().await;
    let indexes = count(
        &client,
        "SELECT count(*) FROM pg_indexes WHERE tablename = 'hook_events' AND indexname IN
         ('idx_hook_events_processed', 'idx_hook_events_source_action', 'idx_hook_events_retry')",
    )
    .await;
    assert_eq!(indexes, 3);
    let checks = count(
        &client,
        "SELECT count(*) FROM pg_constraint WHERE conrelid = 'hook_events'::regclass
         AND conname IN ('processing_time_valid', 'retry_count_limit')",
    )
    .await;
    assert_eq!(checks, 2);
}
