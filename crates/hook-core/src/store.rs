//! The store boundary: what the engine needs from a database, and nothing more.
//!
//! `hook-store` implements it for PostgreSQL. The contract every implementation keeps:
//! - a claimed event is held by exactly one live claim; no other claim returns it until the
//!   holder finishes, releases or dies;
//! - a claim that dies (process killed, connection lost) makes its events claimable again;
//! - [`ClaimedBatch::finish`] applies outcomes only while the claim is still held (fencing): if the
//!   claim was lost, nothing is written and an error is returned;
//! - events of the batch without an outcome are released unchanged;
//! - a claim whose holder keeps calling [`ClaimedBatch::keep_alive`] does not lapse.

use std::future::Future;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::watch;
use uuid::Uuid;

use crate::event::HookEvent;

/// What to claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimRequest {
    /// At most this many events.
    pub limit: usize,
    /// Only events with `retry_count` below this are returned; the store sets aside rows at or
    /// above it as dead (see [`ClaimedBatch::set_aside`]).
    pub max_retry_count: u32,
    /// How long the claim may go without hearing from the engine before the store may consider
    /// its holder dead and release it.
    pub claim_timeout: Duration,
}

/// The outcome of one event, written by [`ClaimedBatch::finish`].
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The event.
    pub id: Uuid,
    /// What happened to it.
    pub resolution: Resolution,
    /// The handler's metadata, stored in `result_metadata`.
    pub metadata: Map<String, Value>,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    /// Handled: mark processed.
    Succeeded,
    /// Failed: count the attempt and record `error`.
    Failed {
        /// The error text, already bounded in size and free of NUL characters.
        error: String,
        /// When to try again, counted from the store's clock; `None` when the event is now dead.
        retry_after: Option<Duration>,
    },
}

/// A source of claimable events.
pub trait Store: Send + Sync + 'static {
    /// The store's error type.
    type Error: std::error::Error + Send + Sync + 'static;
    /// A claimed batch.
    type Batch: ClaimedBatch<Error = Self::Error>;

    /// Claims up to `request.limit` eligible events, oldest first; `None` when there are none
    /// (and nothing was set aside).
    fn claim(
        &self,
        request: ClaimRequest,
    ) -> impl Future<Output = Result<Option<Self::Batch>, Self::Error>> + Send;

    /// A receiver that is marked changed whenever new events may have become eligible (for
    /// PostgreSQL: a NOTIFY arrived, or the listener reconnected). `None` means poll only.
    fn wakeups(&self) -> Option<watch::Receiver<()>> {
        None
    }
}

/// Events held by one claim.
pub trait ClaimedBatch: Send + 'static {
    /// The store's error type.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Takes the claimed events out of the batch (the engine calls it once).
    fn take_events(&mut self) -> Vec<HookEvent>;

    /// Rows the claim took but set aside as dead instead of returning them as events (rows that
    /// cannot be decoded, or whose `retry_count` is already at the limit); written when the
    /// batch finishes. They count toward the claim's limit, so a batch of few events but many
    /// set-asides still tells the engine to claim again at once. A batch may hold no events at
    /// all when it holds set-asides.
    fn set_aside(&self) -> usize {
        0
    }

    /// Tells the store the holder is alive and still working on the batch, so the claim does not
    /// lapse while handlers run (lease extension). The engine calls it every third of the claim
    /// timeout. An error means the claim is lost: the engine then cancels the batch's handlers,
    /// since another claimer may already hold the events.
    fn keep_alive(&self) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Writes `outcomes` and ends the claim; events without an outcome are released unchanged.
    /// Fails, writing nothing, if the claim was lost.
    fn finish(self, outcomes: Vec<Outcome>) -> impl Future<Output = Result<(), Self::Error>> + Send;
}
