//! # hook-store
//!
//! Everything hook-events says to PostgreSQL: the [`PgStore`] that implements hook-core's
//! [`Store`](hook_core::Store), the versioned [migrations](migrate), the LISTEN/NOTIFY wakeup,
//! connection settings with [redaction](redacted) for logs, and an [`EmbeddedCluster`] started
//! from the machine's own PostgreSQL binaries. No other crate of the workspace holds SQL.
//!
//! | feature | what it adds |
//! |---|---|
//! | `test-support` | `testing`: a fresh, optionally migrated database per test |
//! | `bench` | `bench`: the SQL of `hook-bench` (event generation, the limit loop, the original's algorithm) |

#![deny(missing_docs)]

mod cluster;
mod connect;
mod enqueue;
mod error;
mod listen;
mod pg;
mod queries;

#[cfg(feature = "bench")]
pub mod bench;
pub mod archive;
pub mod migrate;
pub mod replay;
pub mod stats;
#[cfg(feature = "test-support")]
pub mod testing;

pub use cluster::{ClusterOptions, EmbeddedCluster, PgBinaries};
pub use connect::{parse_database_url, redacted, with_service_defaults, DatabaseArgs, SeedSettings};
pub use deadpool_postgres;
pub use enqueue::{enqueue, enqueue_many, AsGenericClient};
pub use error::StoreError;
pub use listen::CHANNEL;
pub use pg::{PgBatch, PgStore, StoreOptions};
pub use queries::claim_events;
pub use tokio_postgres;
