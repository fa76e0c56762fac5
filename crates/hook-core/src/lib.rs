//! # hook-core
//!
//! The event model, handler registry, default handlers, retry policy and processing engine of
//! hook-events. It knows no SQL and does no IO of its own: the engine runs against the [`Store`]
//! trait, which `hook-store` implements for PostgreSQL (`hook_store::PgStore`), and producers hand
//! [`NewEvent`]s to `hook_store::enqueue`.
//!
//! | item | what it is for |
//! |---|---|
//! | [`NewEvent`] | an event to insert, its id assigned by the producer (UUIDv7) |
//! | [`HookEvent`], [`HandlerResult`] | a stored event, and what a handler says about it |
//! | [`Handler`], [`HandlerRegistry`], [`default_registry`] | routing by `(source, action)`: exact, then `(source, *)`, then `(*, *)` |
//! | [`Engine`], [`EngineConfig`] | claim batches, run handlers concurrently with a timeout, record outcomes, retry with backoff |
//! | [`RetryPolicy`] | the delay before the next attempt, a pure function of the attempt |
//! | [`parse_duration`] | durations as every binary reads them (`30`, `1.5`, `250ms`, `12h`, `30d`) |
//! | [`Metrics`], [`MetricsSnapshot`] | counters of committed outcomes |
//! | [`Store`], [`ClaimedBatch`] | what the engine needs of a database |
//!
//! ## Features
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | *(none)* | | hook-core has no optional parts; it needs tokio only for tasks, timers and channels |
//!
//! ## Routing
//!
//! A handler is anything implementing [`Handler`], including a plain async closure returning a
//! [`HandlerResult`] or a `Result<HandlerResult, E: Display>` (an `Err` is one failed attempt):
//!
//! ```
//! use std::sync::Arc;
//! use hook_core::{default_registry, HandlerResult, HookEvent};
//!
//! let mut registry = default_registry(); // the routes of Claude Code's hook events
//! registry.register("MyService", "order_placed", |event: Arc<HookEvent>| async move {
//!     HandlerResult::ok("confirmed").with("order", event.resource_id.clone())
//! });
//! registry.register("MyService", "*", |event: Arc<HookEvent>| async move {
//!     Err::<HandlerResult, _>(format!("no handler yet for {}", event.action))
//! });
//! assert!(registry.resolve("MyService", "anything").is_some());
//! ```
//!
//! ## Running the engine
//!
//! With PostgreSQL, build the engine over `hook_store::PgStore` (see hook-store's documentation
//! and its `embedded_service` example). Any other store works the same way; here, an in-memory one:
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use std::time::Duration;
//! use hook_core::{ClaimRequest, ClaimedBatch, Engine, EngineConfig, HandlerResult, HookEvent};
//! use hook_core::{Outcome, Store};
//!
//! /// Events waiting, and the outcomes recorded.
//! #[derive(Default)]
//! struct Memory { waiting: Mutex<Vec<HookEvent>>, done: Arc<Mutex<Vec<Outcome>>> }
//! struct Batch { events: Vec<HookEvent>, done: Arc<Mutex<Vec<Outcome>>> }
//!
//! impl Store for Memory {
//!     type Error = std::convert::Infallible;
//!     type Batch = Batch;
//!     async fn claim(&self, request: ClaimRequest) -> Result<Option<Batch>, Self::Error> {
//!         let mut waiting = self.waiting.lock().unwrap();
//!         let n = request.limit.min(waiting.len());
//!         let events: Vec<HookEvent> = waiting.drain(..n).collect();
//!         Ok((!events.is_empty()).then(|| Batch { events, done: Arc::clone(&self.done) }))
//!     }
//! }
//!
//! impl ClaimedBatch for Batch {
//!     type Error = std::convert::Infallible;
//!     fn take_events(&mut self) -> Vec<HookEvent> {
//!         std::mem::take(&mut self.events)
//!     }
//!     async fn keep_alive(&self) -> Result<(), Self::Error> {
//!         Ok(()) // an in-memory claim cannot lapse
//!     }
//!     async fn finish(self, outcomes: Vec<Outcome>) -> Result<hook_core::Finished, Self::Error> {
//!         self.done.lock().unwrap().extend(outcomes);
//!         Ok(hook_core::Finished::default())
//!     }
//! }
//! # fn event(source: &str, action: &str) -> HookEvent {
//! #     HookEvent {
//! #         id: uuid::Uuid::now_v7(), source: source.into(), action: action.into(),
//! #         resource: "order".into(), resource_id: "o-1".into(), payload: serde_json::json!({}),
//! #         metadata: serde_json::json!({}), processed: false, processing_errors: None,
//! #         retry_count: 0, created_at: time::OffsetDateTime::now_utc(), processed_at: None,
//! #     }
//! # }
//!
//! let store = Memory::default();
//! store.waiting.lock().unwrap().extend([event("MyService", "order_placed"), event("Other", "x")]);
//! let done = Arc::clone(&store.done);
//!
//! let engine = Engine::builder(store)
//!     .handler("MyService", "order_placed", |_event: Arc<HookEvent>| async { HandlerResult::ok("confirmed") })
//!     .handler("*", "*", |_event: Arc<HookEvent>| async { HandlerResult::ok("ignored") })
//!     .config(EngineConfig { poll_interval: Duration::from_millis(10), ..EngineConfig::default() })
//!     .build()?;
//!
//! let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
//! let totals = runtime.block_on(engine.run({
//!     // Stop once both outcomes are recorded; a service would wait for its shutdown signal.
//!     let done = Arc::clone(&done);
//!     async move {
//!         while done.lock().unwrap().len() < 2 {
//!             tokio::time::sleep(Duration::from_millis(5)).await;
//!         }
//!     }
//! }));
//! assert_eq!((totals.succeeded, totals.failed), (2, 0));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]

mod duration;
mod engine;
mod error;
mod event;
mod handler;
mod handlers;
mod metrics;
mod order;
mod retry;
mod store;

pub use crate::metrics::{
    describe_metrics, names as metric_names, Metrics, MetricsSnapshot, MAX_LABELLED_PAIRS, OTHER_LABEL,
};
pub use duration::parse_duration;
pub use engine::{
    bound_text, is_loud_failure, Engine, EngineBuilder, EngineConfig, DEFAULT_MAX_BYTES_IN_FLIGHT,
    MAX_ERROR_BYTES, MIN_BYTES_IN_FLIGHT,
};
pub use error::ConfigError;
pub use event::{HandlerResult, HookEvent, NewEvent, RetryHint};
pub use handler::{Handler, HandlerRegistry, IntoHandlerResult, WILDCARD};
pub use handlers::register_defaults;
pub use order::{OrderRule, SessionOrder};
pub use retry::{RetryPolicy, RETRY_COUNT_LIMIT};
pub use store::{ClaimRequest, ClaimedBatch, Finished, Outcome, Resolution, Store};

/// A registry holding the default handlers (see [`register_defaults`]).
pub fn default_registry() -> HandlerRegistry {
    let mut registry = HandlerRegistry::new();
    register_defaults(&mut registry);
    registry
}
