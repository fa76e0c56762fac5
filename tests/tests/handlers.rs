//! The default handlers against their fixtures: every Claude Code hook's input (as `hook-ingest`
//! stores it) and every original producer's row yields exactly the facts of
//! `tests/fixtures/handler_facts.json`, in process and through the real engine and PostgreSQL.
//! `docs/handlers.md` documents the same facts.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::executor::block_on;
use hook_core::{default_registry, Engine, HookEvent, NewEvent, WILDCARD};
use hook_store::testing::TestDb;
use hook_store::StoreOptions;
use hook_tests::{test_config, wait_for_count, Running};
use serde_json::Value;
use time::OffsetDateTime;

/// One row of the table: a fixture and the exact result metadata its handler reports.
struct Case {
    fixture: String,
    facts: Value,
}

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn table() -> Vec<Case> {
    let Value::Array(rows) = read_json(&fixtures_dir().join("handler_facts.json")) else {
        panic!("handler_facts.json is an array");
    };
    rows.into_iter()
        .map(|row| Case {
            fixture: row["fixture"].as_str().expect("fixture is a path").to_owned(),
            facts: row["facts"].clone(),
        })
        .collect()
}

/// The event stored for a fixture: a Claude Code input goes through `hook-ingest`'s own
/// mapping; a producer row is inserted as the producer wrote it.
fn new_event(fixture: &str) -> NewEvent {
    let path = fixtures_dir().join(fixture);
    if fixture.starts_with("hooks/") {
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let prepared = hook_ingest::mapping::prepare(&bytes, bytes.len() as u64, OffsetDateTime::now_utc());
        assert_eq!(prepared.warning, None, "{fixture}");
        prepared.event.unwrap_or_else(|| panic!("{fixture}: nothing to store"))
    } else {
        let row = read_json(&path);
        let text = |key: &str| row[key].as_str().unwrap_or_else(|| panic!("{fixture}: {key}")).to_owned();
        NewEvent::new(text("source"), text("action"), text("resource"), text("resource_id"))
            .with_payload(row["payload"].clone())
            .with_metadata(row["metadata"].clone())
    }
}

/// The row the engine would hand to a handler.
fn stored(event: NewEvent) -> HookEvent {
    HookEvent {
        id: event.id,
        source: event.source,
        action: event.action,
        resource: event.resource,
        resource_id: event.resource_id,
        payload: event.payload,
        metadata: event.metadata,
        processed: false,
        processing_errors: None,
        retry_count: 0,
        created_at: event.created_at.unwrap_or_else(OffsetDateTime::now_utc),
        processed_at: None,
    }
}

/// Every `.json` file under `dir`, as a path relative to the fixtures directory.
fn files_under(dir: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut pending = vec![fixtures_dir().join(dir)];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|ext| ext == "json") {
                let relative = path.strip_prefix(fixtures_dir()).expect("under fixtures");
                found.insert(relative.to_string_lossy().into_owned());
            }
        }
    }
    found
}

#[test]
fn every_fixture_yields_its_facts() {
    let registry = default_registry();
    for case in table() {
        let event = stored(new_event(&case.fixture));
        let handler = registry.resolve(&event.source, &event.action).expect("the wildcard takes anything");
        let result = block_on(handler.handle(Arc::new(event)));
        assert!(result.success, "{}: {result:?}", case.fixture);
        assert_eq!(Value::Object(result.metadata), case.facts, "{}", case.fixture);
    }
}

#[test]
fn the_table_covers_every_fixture_and_every_route() {
    let listed: BTreeSet<String> = table().into_iter().map(|case| case.fixture).collect();
    let on_disk: BTreeSet<String> = files_under("hooks").into_iter().chain(files_under("producer")).collect();
    assert_eq!(listed, on_disk, "fixtures without expected facts, or facts without a fixture");

    // Each default route is reached by at least one of Claude Code's inputs, except the seed's
    // and producers' own action names, which hook-ingest never writes.
    let producer_only = [("Stop", "session_stopped"), ("SessionEnd", "session_completed")];
    let reached: BTreeSet<(String, String)> = listed
        .iter()
        .filter(|fixture| fixture.starts_with("hooks/"))
        .map(|fixture| new_event(fixture))
        .map(|event| (event.source, event.action))
        .collect();
    for (source, action) in default_registry().routes() {
        let route = (source.as_str(), action.as_str());
        if source == WILDCARD || producer_only.contains(&route) {
            continue;
        }
        assert!(
            reached.contains(&(source.clone(), action.clone())),
            "no Claude Code fixture reaches {source}/{action}"
        );
    }

    // One file per hook, each with a route of its own.
    for fixture in files_under("hooks").iter().filter(|f| !f.contains("variants")) {
        let case = table().into_iter().find(|case| &case.fixture == fixture).expect("listed");
        assert_eq!(case.facts.get("unknown"), None, "{fixture} reaches the wildcard");
        assert!(case.facts["session_id"].is_string(), "{fixture}: no session_id");
    }
}

#[tokio::test]
async fn fixtures_through_the_engine_store_their_facts_in_result_metadata() {
    let db = TestDb::migrated("handler_fixtures").await;
    let client = db.client().await;
    let cases = table();
    let mut ids = Vec::new();
    for case in &cases {
        let event = new_event(&case.fixture);
        assert!(hook_store::enqueue(&client, &event).await.expect("enqueue"), "{}", case.fixture);
        ids.push(event.id);
    }
    let engine = Engine::builder(db.store(StoreOptions::default()).await)
        .registry(default_registry())
        .config(test_config());
    let running = Running::start(engine.build().expect("engine"));
    wait_for_count(
        &client,
        "SELECT count(*) FROM hook_events WHERE NOT processed",
        0,
        Duration::from_secs(30),
    )
    .await;
    let totals = running.stop().await;
    assert_eq!((totals.succeeded, totals.failed), (cases.len() as u64, 0));

    for (case, id) in cases.iter().zip(ids) {
        let row = client
            .query_one(
                "SELECT result_metadata, processing_errors, retry_count FROM hook_events WHERE id = $1",
                &[&id],
            )
            .await
            .expect("the row");
        let (facts, errors, retries): (Value, Option<Vec<String>>, i32) =
            (row.get(0), row.get(1), row.get(2));
        assert_eq!(facts, case.facts, "{}", case.fixture);
        assert_eq!((errors, retries), (None, 0), "{}", case.fixture);
    }
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What handling one event logs at `level` and above.
fn logs_at(level: tracing::Level, event: HookEvent) -> String {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let registry = default_registry();
    tracing::subscriber::with_default(subscriber, || {
        let handler = registry.resolve(&event.source, &event.action).expect("a handler");
        block_on(handler.handle(Arc::new(event)))
    });
    let bytes = captured.0.lock().expect("log buffer").clone();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[test]
fn unknown_hooks_reach_the_wildcard_logged_at_debug_only() {
    let event = || stored(new_event("hooks/variants/TeammateIdle.json"));
    assert_eq!(logs_at(tracing::Level::INFO, event()), "", "the wildcard logs above debug");
    let debug = logs_at(tracing::Level::DEBUG, event());
    assert!(debug.contains("no handler for event type"), "{debug}");
    assert!(debug.contains("TeammateIdle"), "{debug}");
    // A known hook's handler logs nothing (the engine logs each handled event), so never the prompt.
    let prompt = stored(new_event("hooks/UserPromptSubmit.json"));
    assert_eq!(logs_at(tracing::Level::TRACE, prompt), "");
}

/// hook-bench's limit statement writes, for every row of the bench's mix, exactly the
/// `result_metadata` the default handlers report for that row, so that the limit writes what
/// the processor writes (docs/benchmarks.md).
#[tokio::test]
async fn the_bench_limit_writes_what_the_default_handlers_report() {
    let db = TestDb::migrated("handlers_bench_limit").await;
    // The bench's SQL takes deadpool's clients.
    let store = db.store(StoreOptions { listen: false, ..StoreOptions::default() }).await;
    let client = store.pool().get().await.expect("a pooled connection");
    // 120 rows: every hook type of the mix twenty times, the variants (auto fixes every 20th
    // row, prompts of every length) included.
    hook_store::bench::insert_range(&client, 1, 120, hook_store::bench::Ids::Random)
        .await
        .expect("insert the bench's rows");
    let events = hook_store::bench::baseline_fetch(&client, 1_000, 3).await.expect("read the rows");
    assert_eq!(events.len(), 120);
    let registry = default_registry();
    let expected: std::collections::HashMap<uuid::Uuid, Value> = events
        .into_iter()
        .map(|event| {
            let handler =
                registry.resolve(&event.source, &event.action).expect("the wildcard takes anything");
            let id = event.id;
            let result = block_on(handler.handle(Arc::new(event)));
            assert!(result.success, "{result:?}");
            (id, Value::Object(result.metadata))
        })
        .collect();
    assert!(
        expected.values().all(|facts| facts.get("unknown").is_none()),
        "a bench row reached the wildcard"
    );
    while hook_store::bench::limit_step(&client, 50, 3).await.expect("the limit statement") > 0 {}
    let written = hook_store::bench::result_metadata(&client).await.expect("read result_metadata");
    assert_eq!(written.len(), 120);
    for (id, facts) in written {
        assert_eq!(facts.as_ref(), expected.get(&id), "event {id}");
    }
}
