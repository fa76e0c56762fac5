//! # hook-core
//!
//! The event model, handler registry, default handlers, retry policy and processing engine of
//! hook-events. It knows no SQL and does no IO of its own: the engine runs against the [`Store`]
//! trait, which `hook-store` implements for PostgreSQL.
//!
//! ```
//! use std::sync::Arc;
//! use hook_core::{default_registry, HandlerResult, HookEvent};
//!
//! let mut registry = default_registry();
//! registry.register("MyService", "*", |event: Arc<HookEvent>| async move {
//!     HandlerResult::ok("done").with("resource", event.resource.clone())
//! });
//! assert!(registry.resolve("MyService", "anything").is_some());
//! ```

#![deny(missing_docs)]

mod engine;
mod error;
mod event;
mod handler;
mod handlers;
mod metrics;
mod retry;
mod store;

pub use engine::{bound_text, Engine, EngineBuilder, EngineConfig, MAX_ERROR_BYTES};
pub use error::ConfigError;
pub use event::{HandlerResult, HookEvent, NewEvent};
pub use handler::{Handler, HandlerRegistry, IntoHandlerResult, WILDCARD};
pub use handlers::register_defaults;
pub use metrics::{Metrics, MetricsSnapshot};
pub use retry::{RetryPolicy, RETRY_COUNT_LIMIT};
pub use store::{ClaimRequest, ClaimedBatch, Outcome, Resolution, Store};

/// A registry holding the default handlers (see [`register_defaults`]).
pub fn default_registry() -> HandlerRegistry {
    let mut registry = HandlerRegistry::new();
    register_defaults(&mut registry);
    registry
}
