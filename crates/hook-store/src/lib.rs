//! # hook-store
//!
//! Everything hook-events says to PostgreSQL: the [`PgStore`] that implements hook-core's
//! [`Store`](hook_core::Store), [`enqueue`] and [`enqueue_many`] for producers, the versioned
//! [migrations](migrate), the LISTEN/NOTIFY wakeup, connection settings with [redaction](redacted)
//! for logs, and an [`EmbeddedCluster`] started from the machine's own PostgreSQL binaries. No
//! other crate of the workspace holds SQL.
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `test-support` | no | `testing`: a fresh, optionally migrated database per test, and a TCP proxy that can go silent; `seed`: the original's table, variants of it that do not fit, snapshots |
//! | `testcontainers` | no | with `test-support`: a PostgreSQL container when the machine has no server binaries |
//! | `bench` | no | `bench`: the SQL of `hook-bench` (event generation, the limit loop, the original's algorithm); `seed` |
//!
//! ## Producing events, transactionally
//!
//! [`enqueue`] inserts a [`NewEvent`](hook_core::NewEvent) through the client the caller already
//! holds, so the event commits with the caller's transaction or not at all: a processor never
//! sees an event for work that was rolled back, nor misses one for work that committed. It takes
//! tokio-postgres's `Client` and `Transaction` and deadpool's pooled `Object` and `Transaction`
//! alike ([`AsGenericClient`]); [`enqueue_many`] inserts a batch in one statement. Ids are the
//! producer's, so sending an event twice stores it once.
//!
//! ```no_run
//! use hook_core::NewEvent;
//! use serde_json::json;
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let config = hook_store::parse_database_url("postgres://app@localhost/app")?;
//! let (mut client, connection) = config.connect(hook_store::tokio_postgres::NoTls).await?;
//! tokio::spawn(connection);
//!
//! let tx = client.transaction().await?;
//! tx.execute("INSERT INTO orders (id, item) VALUES ('o-1042', 'tea')", &[]).await?;
//! let placed = NewEvent::new("OrderService", "order_placed", "order", "o-1042")
//!     .with_payload(json!({"item": "tea"}));
//! hook_store::enqueue(&tx, &placed).await?;
//! tx.commit().await?; // the order and its event, or neither
//! # Ok(()) }
//! ```
//!
//! ## Processing events
//!
//! [`PgStore`] connects a pool, applies the migrations on request, and LISTENs for inserts; the
//! engine of hook-core runs over it in the caller's runtime, next to the service's other tasks,
//! until the shutdown future completes (it then lets running handlers finish):
//!
//! ```no_run
//! use std::sync::Arc;
//! use hook_core::{default_registry, Engine, EngineConfig, HandlerResult, HookEvent};
//! use hook_store::{PgStore, StoreOptions};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let config = hook_store::parse_database_url("postgres://app@localhost/app")?;
//! let store = PgStore::connect(config, StoreOptions::default()).await?;
//! store.migrate().await?;
//!
//! let mut handlers = default_registry();
//! handlers.register("OrderService", "order_placed", |event: Arc<HookEvent>| async move {
//!     HandlerResult::ok("confirmed").with("order", event.resource_id.clone())
//! });
//! let engine = Engine::builder(store).registry(handlers).config(EngineConfig::default()).build()?;
//!
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let processing = tokio::spawn(engine.run(async {
//!     let _ = stopped.await;
//! }));
//! // ... the service's other work; then, on shutdown:
//! let _ = stop.send(());
//! let totals = processing.await?;
//! println!("{totals}");
//! # Ok(()) }
//! ```
//!
//! `examples/embedded_service.rs` puts both together: an order service with an exact route, a
//! source wildcard and a global handler, its own runtime, and a clean shutdown
//! (`cargo run -p hook-store --example embedded_service`).

#![deny(missing_docs)]

mod cluster;
mod connect;
mod deadline;
mod enqueue;
mod error;
mod libpq;
mod listen;
mod pg;
mod presence;
pub use presence::Presence;
mod queries;

pub mod archive;
#[cfg(feature = "bench")]
pub mod bench;
#[cfg(any(feature = "test-support", feature = "bench"))]
mod children;
pub mod console;
pub mod indexes;
pub mod migrate;
#[cfg(feature = "test-support")]
mod proxy;
pub mod replay;
pub mod schema;
#[cfg(any(feature = "test-support", feature = "bench"))]
pub mod seed;
pub mod stats;
#[cfg(feature = "test-support")]
pub mod testing;
pub mod tls;
pub mod vacuum;

#[cfg(any(feature = "test-support", feature = "bench"))]
pub use children::binary_command;
pub use cluster::{ClusterOptions, EmbeddedCluster, PgBinaries};
pub use connect::{
    apply_network_defaults, parse_database_url, redacted, url_problem, with_service_defaults, DatabaseArgs,
    SeedSettings, KEEPALIVES_IDLE, KEEPALIVES_INTERVAL, KEEPALIVES_RETRIES, TCP_USER_TIMEOUT,
};
pub use deadline::DEFAULT_CALL_TIMEOUT;
pub use deadpool_postgres;
pub use enqueue::{enqueue, enqueue_many, AsGenericClient};
pub use error::StoreError;
pub use libpq::{read_passfile, LibpqEnv, PassfileKey, PasswordSource, Resolved};
pub use listen::CHANNEL;
pub use pg::{PgBatch, PgStore, StoreOptions};
pub use queries::{
    claim_events, claim_events_after, claim_events_ordered, Claimed, OrderRules, LATE_COMMIT_MARGIN,
};
pub use tokio_postgres;
