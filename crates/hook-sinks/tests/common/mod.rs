//! Shared by the integration tests: an engine over a fresh database, an HTTP receiver on
//! loopback that records what it gets, and a `nats-server -js` of the test's own.

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use hook_core::{Engine, EngineConfig, HandlerRegistry, HookEvent, MetricsSnapshot, NewEvent, RetryPolicy};
use hook_sinks::{LoadOptions, Routes, RoutesFile};
use hook_store::testing::TestDb;
use hook_store::tokio_postgres::Client;
use hook_store::{PgStore, StoreOptions};

/// An engine configuration for tests: short poll and timeouts, no metrics log, no jitter.
pub fn test_config() -> EngineConfig {
    EngineConfig {
        poll_interval: Duration::from_millis(50),
        handler_timeout: Duration::from_secs(5),
        drain_timeout: Duration::from_secs(5),
        claim_timeout: Duration::from_secs(20),
        metrics_interval: None,
        retry: RetryPolicy { base_delay: Duration::from_millis(100), jitter: 0.0, ..RetryPolicy::default() },
        ..EngineConfig::default()
    }
}

/// Reads a routes file from text, with the test's own environment.
pub fn routes_file(text: &str, config: &EngineConfig) -> RoutesFile {
    let env = |name: &str| std::env::var(name).ok();
    let options = LoadOptions { handler_timeout: config.handler_timeout, env: &env };
    RoutesFile::parse(text, Path::new("routes.toml"), Path::new("/"), &options)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The registry a routes file gives, over the built-in handlers.
pub async fn registry(text: &str, config: &EngineConfig) -> HandlerRegistry {
    let file = routes_file(text, config);
    let routes = Routes::build(&file).await.unwrap_or_else(|(name, e)| panic!("sink {name}: {e}"));
    routes.registry(hook_core::default_registry())
}

/// An engine running in the background until [`Running::stop`].
pub struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<MetricsSnapshot>,
}

impl Running {
    /// Starts an engine over `db` with `registry`.
    pub async fn start(db: &TestDb, registry: HandlerRegistry, config: EngineConfig) -> Running {
        let store: PgStore = db.store(StoreOptions::default()).await;
        let engine = Engine::builder(store).registry(registry).config(config).build().expect("valid config");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(engine.run(async move {
            let _ = stopped.await;
        }));
        Running { stop, task }
    }

    /// Signals shutdown and waits for the final counts.
    pub async fn stop(self) -> MetricsSnapshot {
        let _ = self.stop.send(());
        self.task.await.expect("engine task")
    }
}

/// Inserts events and returns their ids, oldest first.
pub async fn insert(client: &Client, events: Vec<NewEvent>) -> Vec<uuid::Uuid> {
    let ids = events.iter().map(|e| e.id).collect();
    hook_store::enqueue_many(client, &events).await.expect("enqueue");
    ids
}

/// Polls `query` (one bigint) until it equals `expected`, for up to `within`.
pub async fn wait_for_count(client: &Client, query: &str, expected: i64, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let got: i64 = client.query_one(query, &[]).await.expect("count query").get(0);
        if got == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{query}: still {got} after {within:?}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Counts to 0 once every event is processed or dead.
pub const UNDECIDED: &str = "SELECT count(*) FROM hook_events WHERE NOT processed AND dead_at IS NULL";

/// One event's row, as the tests look at it.
#[derive(Debug)]
pub struct Row {
    pub processed: bool,
    pub dead: bool,
    pub retry_count: i32,
    pub errors: Vec<String>,
    pub metadata: serde_json::Value,
}

/// Reads one event's row.
pub async fn row(client: &Client, id: uuid::Uuid) -> Row {
    let row = client
        .query_one(
            "SELECT processed, dead_at IS NOT NULL, retry_count, coalesce(processing_errors, '{}'), \
             coalesce(result_metadata, 'null') FROM hook_events WHERE id = $1",
            &[&id],
        )
        .await
        .expect("read the event");
    Row {
        processed: row.get(0),
        dead: row.get(1),
        retry_count: row.get(2),
        errors: row.get(3),
        metadata: row.get(4),
    }
}

/// A stored-event shape for sink tests that do not go through the database.
pub fn event(source: &str, action: &str) -> Arc<HookEvent> {
    Arc::new(HookEvent {
        id: uuid::Uuid::now_v7(),
        source: source.into(),
        action: action.into(),
        resource: "session".into(),
        resource_id: "s-1".into(),
        payload: serde_json::json!({"session_id": "s-1"}),
        metadata: serde_json::json!({"session_id": "s-1"}),
        processed: false,
        processing_errors: None,
        retry_count: 0,
        created_at: time::OffsetDateTime::now_utc(),
        processed_at: None,
    })
}

// ---------------------------------------------------------------------------------------------
// An HTTP receiver
// ---------------------------------------------------------------------------------------------

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

/// What the receiver answers on each path:
/// `/ok` 200, `/fail` 500, `/busy` 429 with `Retry-After: 3`, `/gone` 410, `/bad` 400,
/// `/redirect` 302, `/slow` 200 after 3 s, `/flaky` 503 on the first two requests per event
/// then 200.
#[derive(Clone, Default)]
pub struct Receiver {
    pub requests: Arc<Mutex<Vec<Received>>>,
    flaky: Arc<Mutex<HashMap<String, u32>>>,
}

impl Receiver {
    pub fn requests(&self) -> Vec<Received> {
        self.requests.lock().expect("lock").clone()
    }

    pub fn router(&self) -> Router {
        Router::new().route("/{*path}", post(answer)).with_state(self.clone())
    }

    /// Serves on `listener` in the background.
    pub fn serve(&self, listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
        let app = self.router();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        })
    }

    /// Serves on a fresh loopback port; returns its address.
    pub async fn start(&self) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        self.serve(listener);
        addr
    }
}

async fn answer(
    State(receiver): State<Receiver>,
    axum::extract::Path(path): axum::extract::Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let id = headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    receiver.requests.lock().expect("lock").push(Received {
        path: path.clone(),
        headers,
        body: body.to_vec(),
    });
    match path.as_str() {
        "ok" => (StatusCode::OK, "thanks").into_response(),
        "fail" => (StatusCode::INTERNAL_SERVER_ERROR, "database on fire").into_response(),
        "busy" => (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "3")], "slow down").into_response(),
        "gone" => (StatusCode::GONE, "no such hook").into_response(),
        "bad" => (StatusCode::BAD_REQUEST, "invalid_payload").into_response(),
        "redirect" => (StatusCode::FOUND, [("location", "/ok")], "").into_response(),
        "slow" => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            (StatusCode::OK, "late").into_response()
        }
        "flaky" => {
            let mut seen = receiver.flaky.lock().expect("lock");
            let n = seen.entry(id).or_default();
            *n += 1;
            if *n <= 2 {
                (StatusCode::SERVICE_UNAVAILABLE, "warming up").into_response()
            } else {
                (StatusCode::OK, "ok now").into_response()
            }
        }
        _ => (StatusCode::NOT_FOUND, "unknown path").into_response(),
    }
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
