//! Hostile and malformed input: what producers (or hand-written SQL) can put in `hook_events`,
//! and what the processor does with it. Every row is either handled or refused with a recorded
//! reason, nothing crashes, and the claim loop never gets stuck: each test puts the odd rows
//! first in claim order (older `created_at`) and checks that ordinary events after them are
//! still processed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hook_core::{
    EngineConfig, HandlerRegistry, HandlerResult, HookEvent, MetricsSnapshot, NewEvent, RetryPolicy,
};
use hook_store::testing::TestDb;
use hook_store::tokio_postgres::Client;
use hook_store::StoreOptions;
use hook_tests::{count, insert_events, test_config, wait_for_count, Running};
use serde_json::{json, Value};
use uuid::Uuid;

/// Rows the processor still has to decide about.
const UNDECIDED: &str = "SELECT count(*) FROM hook_events WHERE NOT processed AND dead_at IS NULL";

/// Every event a handler saw, in order.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Arc<HookEvent>>>>);

impl Seen {
    fn push(&self, event: &Arc<HookEvent>) {
        self.0.lock().expect("seen lock").push(Arc::clone(event));
    }

    fn find(&self, id: Uuid) -> Option<Arc<HookEvent>> {
        self.0.lock().expect("seen lock").iter().find(|e| e.id == id).cloned()
    }
}

/// A registry whose wildcard handler records every event and succeeds.
fn recording(seen: &Seen) -> HandlerRegistry {
    let seen = seen.clone();
    let mut registry = HandlerRegistry::new();
    registry.register("*", "*", move |event: Arc<HookEvent>| {
        seen.push(&event);
        std::future::ready(HandlerResult::ok("seen"))
    });
    registry
}

/// Runs an engine until `done` (a count query) is 0, then stops it and returns its counts.
async fn run_until(
    db: &TestDb,
    registry: HandlerRegistry,
    config: EngineConfig,
    done: &str,
) -> MetricsSnapshot {
    let client = db.client().await;
    let engine = hook_core::Engine::builder(db.store(StoreOptions::default()).await)
        .registry(registry)
        .config(config)
        .build()
        .expect("valid config");
    let running = Running::start(engine);
    wait_for_count(&client, done, 0, Duration::from_secs(60)).await;
    running.stop().await
}

/// Moves every row inserted so far an hour back, ahead of anything inserted later in claim order.
async fn make_oldest(client: &Client) {
    client
        .batch_execute("UPDATE hook_events SET created_at = created_at - interval '1 hour'")
        .await
        .expect("move rows back");
}

async fn row_state(client: &Client, id: Uuid) -> (bool, i32, Option<Vec<Option<String>>>, bool) {
    let row = client
        .query_one(
            "SELECT processed, retry_count, processing_errors, dead_at IS NOT NULL FROM hook_events WHERE id = $1",
            &[&id],
        )
        .await
        .expect("read the row");
    (row.get(0), row.get(1), row.get(2), row.get(3))
}

fn sqlstate(error: &hook_store::StoreError) -> Option<String> {
    match error {
        hook_store::StoreError::Db(e) => e.code().map(|c| c.code().to_owned()),
        _ => None,
    }
}

#[tokio::test]
async fn payloads_of_twenty_mib_are_processed_and_so_is_what_follows() {
    const MIB: i32 = 1024 * 1024;
    let db = TestDb::migrated("hostile_huge_payload").await;
    let client = db.client().await;
    // One 20 MiB string, and one 20 MiB object of 440,000 small members.
    let insert = |payload_sql: &str| {
        format!(
            "INSERT INTO hook_events (id, source, action, resource, resource_id, payload)
             SELECT gen_random_uuid(), 'Huge', 'blob', 'r', 'r1', {payload_sql}"
        )
    };
    let began = Instant::now();
    client
        .batch_execute(&insert(&format!("jsonb_build_object('blob', repeat('x', {}))", 20 * MIB)))
        .await
        .expect("a 20 MiB jsonb string is stored");
    client
        .batch_execute(&insert(
            "(SELECT jsonb_object_agg('key' || i, repeat('y', 32)) FROM generate_series(1, 440000) AS i)",
        ))
        .await
        .expect("a 20 MiB jsonb object is stored");
    let sizes: Vec<i32> = client
        .query("SELECT octet_length(payload::text) FROM hook_events", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(sizes.iter().all(|&s| s >= 20 * MIB), "{sizes:?}");
    make_oldest(&client).await;
    let after = insert_events(&client, 50, "PreToolUse", "tool_invocation").await;

    let seen = Seen::default();
    let metrics = run_until(&db, recording(&seen), test_config(), UNDECIDED).await;
    assert_eq!((metrics.succeeded, metrics.failed, metrics.errors), (52, 0, 0));
    let huge: Vec<Arc<HookEvent>> =
        seen.0.lock().unwrap().iter().filter(|e| e.source == "Huge").cloned().collect();
    assert_eq!(huge.len(), 2);
    let blob = huge.iter().find_map(|e| e.payload["blob"].as_str().map(str::len));
    assert_eq!(blob, Some(20 * MIB as usize), "the handler got the whole string");
    let members = huge.iter().find_map(|e| e.payload.as_object().filter(|o| o.len() > 1).map(|o| o.len()));
    assert_eq!(members, Some(440_000));
    assert!(after.iter().all(|&id| seen.find(id).is_some()));
    eprintln!("two 20 MiB payloads stored and processed in {:?} (sizes {sizes:?})", began.elapsed());
}

#[tokio::test]
async fn a_nul_byte_is_refused_by_the_database_at_insert() {
    let db = TestDb::migrated("hostile_nul").await;
    let client = db.client().await;
    let in_text = NewEvent::new("Pre\0ToolUse", "tool_invocation", "tool", "Bash");
    let error = hook_store::enqueue(&client, &in_text).await.expect_err("NUL in a text column");
    // 22021: character_not_in_repertoire ("invalid byte sequence for encoding UTF8: 0x00").
    assert_eq!(sqlstate(&error).as_deref(), Some("22021"), "{error}");
    let in_json = NewEvent::new("PreToolUse", "tool_invocation", "tool", "Bash")
        .with_payload(json!({"command": "printf 'a\0b'"}));
    let error = hook_store::enqueue(&client, &in_json).await.expect_err("NUL in a jsonb string");
    // 22P05: untranslatable_character ("unsupported Unicode escape sequence": \u0000).
    assert_eq!(sqlstate(&error).as_deref(), Some("22P05"), "{error}");
    let in_key =
        NewEvent::new("PreToolUse", "tool_invocation", "tool", "Bash").with_metadata(json!({"k\0": 1}));
    assert!(hook_store::enqueue(&client, &in_key).await.is_err(), "NUL in a jsonb key");
    // A batch holding one such event is refused whole.
    let fine = NewEvent::new("PreToolUse", "tool_invocation", "tool", "Bash");
    assert!(hook_store::enqueue_many(&client, &[fine.clone(), in_json]).await.is_err());
    assert_eq!(count(&client, "SELECT count(*) FROM hook_events").await, 0, "nothing was stored");
    assert!(hook_store::enqueue(&client, &fine).await.expect("the connection is still usable"));
}

#[tokio::test]
async fn odd_unicode_in_source_and_action_is_stored_routed_and_handled_verbatim() {
    let db = TestDb::migrated("hostile_unicode").await;
    let client = db.client().await;
    let odd = [
        ("\u{200F}PreToolUse\u{200E}", "\u{202E}noitacovni_loot"), // RTL/LTR marks, RTL override
        ("🦀🔥", "👨\u{200D}👩\u{200D}👧"),                        // emoji, a ZWJ sequence
        ("e\u{0301}\u{0301}\u{0301}", "a\u{20DD}"),                // stacked combining marks
        ("\u{FEFF}bom", "\u{FFFF}\u{10FFFF}"),                     // BOM, noncharacters
        ("  ", "\t\n\r"),                                          // blank and control characters
        ("", ""),                                                  // empty
    ];
    let long = "🦀".repeat(255); // 255 characters, 1,020 bytes: VARCHAR(255) counts characters
    let mut ids = Vec::new();
    for (source, action) in odd.iter().copied().chain([(long.as_str(), long.as_str())]) {
        let event = NewEvent::new(source, action, "ресурс", "ид");
        hook_store::enqueue(&client, &event).await.unwrap_or_else(|e| panic!("{source:?}: {e}"));
        ids.push((event.id, source.to_owned(), action.to_owned()));
    }
    let too_long = NewEvent::new("🦀".repeat(256), "a", "r", "r");
    let error = hook_store::enqueue(&client, &too_long).await.expect_err("256 characters");
    assert_eq!(sqlstate(&error).as_deref(), Some("22001"), "string_data_right_truncation: {error}");
    make_oldest(&client).await;
    let after = insert_events(&client, 20, "PreToolUse", "tool_invocation").await;

    // An exact route on an odd pair is found; everything else falls to the wildcard.
    let seen = Seen::default();
    let mut registry = recording(&seen);
    registry.register(odd[1].0, odd[1].1, |_e: Arc<HookEvent>| async move {
        HandlerResult::ok("exact").with("route", "🦀 exact")
    });
    let metrics = run_until(&db, registry, test_config(), UNDECIDED).await;
    assert_eq!((metrics.succeeded, metrics.failed, metrics.errors), (27, 0, 0));
    for (id, source, action) in &ids {
        let row = client
            .query_one("SELECT source, action, processed FROM hook_events WHERE id = $1", &[id])
            .await
            .unwrap();
        assert_eq!((row.get::<_, String>(0), row.get::<_, String>(1)), (source.clone(), action.clone()));
        assert!(row.get::<_, bool>(2), "{source:?}");
        if source != odd[1].0 {
            let event = seen.find(*id).expect("the wildcard saw it");
            assert_eq!((&event.source, &event.action), (source, action), "decoded verbatim");
        }
    }
    let route: Value = client
        .query_one("SELECT result_metadata->'route' FROM hook_events WHERE id = $1", &[&ids[1].0])
        .await
        .unwrap()
        .get(0);
    assert_eq!(route, json!("🦀 exact"));
    assert!(after.iter().all(|&id| seen.find(id).is_some()));
}

#[tokio::test]
async fn sql_looking_strings_are_data() {
    let db = TestDb::migrated("hostile_sql").await;
    let client = db.client().await;
    let drop_table = "'; DROP TABLE hook_events; --";
    let event = NewEvent::new(drop_table, "\" OR 1=1 --", "x'); DELETE FROM hook_events; --", "$1 $$ \\")
        .with_payload(json!({"q": "'; TRUNCATE hook_events; --", "'; --": "$$; SELECT pg_sleep(60); $$"}))
        .with_metadata(json!({"cwd": "/tmp/'; DROP SCHEMA public CASCADE; --"}));
    hook_store::enqueue(&client, &event).await.expect("stored as data");
    make_oldest(&client).await;
    let after = insert_events(&client, 10, "PreToolUse", "tool_invocation").await;

    // The handler fails with an error and metadata that look like SQL: recorded verbatim.
    let mut registry = HandlerRegistry::new();
    registry
        .register(drop_table, "*", |e: Arc<HookEvent>| async move {
            HandlerResult::failed(format!("{}'); DROP TABLE hook_events; --", e.source))
                .with("'; DELETE FROM hook_events; --", e.payload["q"].clone())
        })
        .register("*", "*", |_e: Arc<HookEvent>| async move { HandlerResult::ok("fine") });
    let config =
        EngineConfig { retry: RetryPolicy { max_retry_count: 1, ..test_config().retry }, ..test_config() };
    let metrics = run_until(&db, registry, config, UNDECIDED).await;
    assert_eq!((metrics.succeeded, metrics.dead, metrics.errors), (10, 1, 0));

    let (processed, retries, errors, dead) = row_state(&client, event.id).await;
    assert_eq!((processed, retries, dead), (false, 1, true));
    assert_eq!(errors, Some(vec![Some(format!("{drop_table}'); DROP TABLE hook_events; --"))]));
    let row = client
        .query_one(
            "SELECT source, action, resource, resource_id, payload, metadata, result_metadata
             FROM hook_events WHERE id = $1",
            &[&event.id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), event.source);
    assert_eq!(row.get::<_, String>(1), event.action);
    assert_eq!(row.get::<_, String>(2), event.resource);
    assert_eq!(row.get::<_, String>(3), event.resource_id);
    assert_eq!(row.get::<_, Value>(4), event.payload);
    assert_eq!(row.get::<_, Value>(5), event.metadata);
    assert_eq!(
        row.get::<_, Value>(6),
        json!({"'; DELETE FROM hook_events; --": "'; TRUNCATE hook_events; --"})
    );
    assert_eq!(count(&client, "SELECT count(*) FROM hook_events").await, 11, "the table is intact");
    for id in after {
        assert!(row_state(&client, id).await.0);
    }
}

#[tokio::test]
async fn rows_at_the_retry_limit_and_with_null_errors_are_decided_without_a_check_violation() {
    let db = TestDb::migrated("hostile_retry_limit").await;
    let client = db.client().await;
    let insert = |source: &'static str, retry_count: i32, errors: Option<Vec<Option<&'static str>>>| {
        let client = &client;
        async move {
            let id = Uuid::new_v4();
            client
                .execute(
                    "INSERT INTO hook_events (id, source, action, resource, resource_id, retry_count, processing_errors)
                     VALUES ($1, $2, 'a', 'r', 'r1', $3, $4)",
                    &[&id, &source, &retry_count, &errors],
                )
                .await
                .expect("insert");
            id
        }
    };
    // retry_count is CHECKed to 0..=10.
    let at_limit = insert("Fails", 10, Some(vec![Some("old error")])).await;
    let last_try_fails = insert("Fails", 9, None).await;
    let last_try_works = insert("Works", 9, Some(vec![None, Some("e")])).await;
    let null_errors_fail = insert("Fails", 0, None).await;
    let over = client
        .execute(
            "INSERT INTO hook_events (id, source, action, resource, resource_id, retry_count)
             VALUES (gen_random_uuid(), 'x', 'a', 'r', 'r1', 11)",
            &[],
        )
        .await
        .expect_err("retry_count 11 violates the CHECK");
    assert_eq!(over.code().map(|c| c.code()), Some("23514"), "{over}");
    make_oldest(&client).await;
    let after = insert_events(&client, 10, "PreToolUse", "tool_invocation").await;

    let mut registry = HandlerRegistry::new();
    registry
        .register("Fails", "*", |_e: Arc<HookEvent>| async move { Err::<HandlerResult, _>("still failing") })
        .register("*", "*", |_e: Arc<HookEvent>| async move { HandlerResult::ok("fine") });
    // The highest limit the engine accepts: an event at 9 gets one more try. Retries wait an hour,
    // so each row is decided once: done when no row awaits its first decision.
    let hour = Duration::from_secs(3600);
    let retry = RetryPolicy { max_retry_count: 10, base_delay: hour, max_delay: hour, ..test_config().retry };
    let config = EngineConfig { retry, ..test_config() };
    let undecided = "SELECT count(*) FROM hook_events \
                     WHERE NOT processed AND dead_at IS NULL AND next_attempt_at IS NULL";
    let metrics = run_until(&db, registry, config, undecided).await;

    // At the limit already: not attempted, set aside as dead with the reason, its count and
    // earlier errors kept.
    let (processed, retries, errors, dead) = row_state(&client, at_limit).await;
    assert_eq!((processed, retries, dead), (false, 10, true));
    let errors = errors.expect("errors kept");
    assert_eq!(errors[0].as_deref(), Some("old error"));
    assert!(
        errors.len() == 2
            && errors[1]
                .as_deref()
                .is_some_and(|e| e.starts_with("retry_count 10 is at MAX_RETRY_COUNT (10)")),
        "{errors:?}"
    );
    // Its last try fails: counted up to the limit (not past the CHECK) and marked dead.
    assert_eq!(
        row_state(&client, last_try_fails).await,
        (false, 10, Some(vec![Some("still failing".into())]), true)
    );
    assert!(row_state(&client, last_try_works).await.0);
    // NULL processing_errors: the first error starts the array; retried, not dead.
    let (processed, retries, errors, dead) = row_state(&client, null_errors_fail).await;
    assert_eq!(
        (processed, retries, errors, dead),
        (false, 1, Some(vec![Some("still failing".into())]), false)
    );
    for id in after {
        assert!(row_state(&client, id).await.0);
    }
    assert_eq!(metrics.errors, 0, "no statement failed");
}

/// Waits until every one of `ids` is processed.
async fn wait_processed(client: &Client, ids: &[Uuid], within: Duration) {
    let query = format!(
        "SELECT count(*) FROM hook_events WHERE NOT processed AND id IN ({})",
        ids.iter().map(|id| format!("'{id}'")).collect::<Vec<_>>().join(",")
    );
    wait_for_count(client, &query, 0, within).await;
}

#[tokio::test]
async fn deeply_nested_json_does_not_stall_the_claim_loop() {
    let db = TestDb::migrated("hostile_nested").await;
    let client = db.client().await;
    // jsonb takes 10,000 levels (PostgreSQL's parser gives up near 50,000 at the default
    // max_stack_depth of 2 MB); serde_json's default recursion limit is 128.
    let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let mut odd = Vec::new();
    for (column, depth) in [("payload", 100), ("payload", 129), ("payload", 10_000), ("metadata", 10_000)] {
        let id = Uuid::new_v4();
        client
            .execute(
                &format!(
                    "INSERT INTO hook_events (id, source, action, resource, resource_id, {column})
                     VALUES ($1, 'Nested', 'deep', 'r', 'r1', $2::text::jsonb)"
                ),
                &[&id, &nested(depth)],
            )
            .await
            .unwrap_or_else(|e| panic!("jsonb of depth {depth}: {e}"));
        odd.push((id, column, depth));
    }
    make_oldest(&client).await;
    let after = insert_events(&client, 20, "PreToolUse", "tool_invocation").await;

    let seen = Seen::default();
    let engine = hook_core::Engine::builder(db.store(StoreOptions::default()).await)
        .registry(recording(&seen))
        .config(test_config())
        .build()
        .expect("valid config");
    let running = Running::start(engine);
    wait_processed(&client, &after, Duration::from_secs(15)).await;
    let metrics = running.stop().await;
    for (id, column, depth) in odd {
        let (processed, _, errors, _) = row_state(&client, id).await;
        assert!(processed || errors.is_some(), "{column} of depth {depth}: neither handled nor refused");
    }
    eprintln!("{metrics}");
}

#[tokio::test]
async fn timestamps_beyond_the_decodable_range_do_not_stall_the_claim_loop() {
    let db = TestDb::migrated("hostile_timestamps").await;
    let client = db.client().await;
    let mut odd = Vec::new();
    for created_at in
        ["-infinity", "4000-01-01 BC", "0001-01-01", "9999-12-31 23:59:59", "20000-01-01", "infinity"]
    {
        let id = Uuid::new_v4();
        client
            .execute(
                "INSERT INTO hook_events (id, source, action, resource, resource_id, created_at)
                 VALUES ($1, 'Time', 'odd', 'r', 'r1', $2::text::timestamptz)",
                &[&id, &created_at],
            )
            .await
            .unwrap_or_else(|e| panic!("created_at {created_at}: {e}"));
        odd.push((id, created_at));
    }
    let after = insert_events(&client, 20, "PreToolUse", "tool_invocation").await;

    let seen = Seen::default();
    let engine = hook_core::Engine::builder(db.store(StoreOptions::default()).await)
        .registry(recording(&seen))
        .config(test_config())
        .build()
        .expect("valid config");
    let running = Running::start(engine);
    wait_processed(&client, &after, Duration::from_secs(15)).await;
    let metrics = running.stop().await;
    for (id, created_at) in odd {
        let (processed, _, errors, _) = row_state(&client, id).await;
        assert!(processed || errors.is_some(), "created_at {created_at}: neither handled nor refused");
    }
    eprintln!("{metrics}");
}
