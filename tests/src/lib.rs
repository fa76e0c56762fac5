//! Shared helpers of the integration tests: inserting events, waiting, and counting handler
//! invocations. Every test owns a fresh database (see `hook_store::testing`).

pub mod crash;
pub mod worker;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hook_core::{HandlerResult, HookEvent};
use serde_json::{json, Value};
use tokio_postgres::Client;
use uuid::Uuid;

/// Inserts `n` events of `(source, action)` with a seed-shaped payload; returns their ids in
/// creation order (created_at increases by 1 µs per event).
pub async fn insert_events(client: &Client, n: usize, source: &str, action: &str) -> Vec<Uuid> {
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
    for chunk in ids.chunks(5_000) {
        client
            .execute(
                "INSERT INTO hook_events (id, source, action, resource, resource_id, payload, created_at)
                 SELECT id, $2, $3, 'tool', 'Bash', $4,
                        clock_timestamp() + ord * interval '1 microsecond'
                 FROM unnest($1::uuid[]) WITH ORDINALITY AS t(id, ord)",
                &[&chunk, &source, &action, &json!({"tool_name": "Bash", "tool_input": {"command": "ls"}})],
            )
            .await
            .expect("insert events");
    }
    ids
}

/// Inserts one event with the given payload and returns its id.
pub async fn insert_event(client: &Client, source: &str, action: &str, payload: Value) -> Uuid {
    let id = Uuid::new_v4();
    client
        .execute(
            "INSERT INTO hook_events (id, source, action, resource, resource_id, payload) VALUES ($1, $2, $3, 'r', 'r1', $4)",
            &[&id, &source, &action, &payload],
        )
        .await
        .expect("insert event");
    id
}

/// Polls `query` (a single bigint, e.g. a count) until it equals `expected`, for up to `within`.
///
/// # Panics
/// When the value is still different after `within`.
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
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A single bigint from `query`.
pub async fn count(client: &Client, query: &str) -> i64 {
    client.query_one(query, &[]).await.expect("count query").get(0)
}

/// Counts invocations per event id; its [`handler`](Invocations::handler) succeeds.
#[derive(Clone, Default)]
pub struct Invocations(Arc<Mutex<HashMap<Uuid, u32>>>);

impl Invocations {
    /// Records one invocation of `event`.
    pub fn record(&self, event: &HookEvent) {
        *self.0.lock().expect("invocations lock").entry(event.id).or_default() += 1;
    }

    /// A handler that records and succeeds.
    pub fn handler(
        &self,
    ) -> impl Fn(Arc<HookEvent>) -> std::future::Ready<HandlerResult> + Send + Sync + 'static {
        let this = self.clone();
        move |event: Arc<HookEvent>| {
            this.record(&event);
            std::future::ready(HandlerResult::ok("counted"))
        }
    }

    /// Invocations per event.
    pub fn snapshot(&self) -> HashMap<Uuid, u32> {
        self.0.lock().expect("invocations lock").clone()
    }

    /// Total invocations.
    pub fn total(&self) -> u64 {
        self.0.lock().expect("invocations lock").values().map(|&n| u64::from(n)).sum()
    }
}

/// An engine running in the background until [`Running::stop`].
pub struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<hook_core::MetricsSnapshot>,
}

impl Running {
    /// Starts `engine` on the current runtime.
    pub fn start<S: hook_core::Store>(engine: hook_core::Engine<S>) -> Running {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(engine.run(async move {
            let _ = stopped.await;
        }));
        Running { stop, task }
    }

    /// Signals shutdown and waits for the engine's final counts.
    pub async fn stop(self) -> hook_core::MetricsSnapshot {
        let _ = self.stop.send(());
        self.task.await.expect("engine task")
    }
}

/// An engine configuration for tests: short poll and timeouts, no metrics log, no jitter.
pub fn test_config() -> hook_core::EngineConfig {
    hook_core::EngineConfig {
        poll_interval: Duration::from_millis(50),
        handler_timeout: Duration::from_secs(5),
        drain_timeout: Duration::from_secs(5),
        claim_timeout: Duration::from_secs(20),
        metrics_interval: None,
        retry: hook_core::RetryPolicy {
            base_delay: Duration::from_millis(100),
            jitter: 0.0,
            ..hook_core::RetryPolicy::default()
        },
        ..hook_core::EngineConfig::default()
    }
}

/// The README's Rust examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
