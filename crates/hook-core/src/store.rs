//! The store boundary: what the engine needs from a database, and nothing more.
//!
//! `hook-store` implements it for PostgreSQL. The contract every implementation keeps:
//! - a claimed event is held by exactly one live claim; no other claim returns it until the
//!   holder finishes, releases or dies;
//! - a claim that dies (process killed, connection lost) makes its events claimable again;
//! - [`ClaimedBatch::finish`] applies outcomes only while the claim is still held (fencing): if the
//!   claim was lost, nothing is written and an error is returned;
//! - events of the batch without an outcome are released unchanged;
//! - a claim whose holder keeps calling [`ClaimedBatch::keep_alive`] does not lapse;
//! - an attempt whose holder dies while the handler runs is not lost: once the engine has called
//!   [`ClaimedBatch::start`], a holder that dies before finishing leaves its events *suspect*;
//!   suspects are not returned by ordinary claims, only one at a time by a claim with
//!   [`ClaimRequest::isolate`], and a suspect whose isolated holder died is returned once by
//!   [`ClaimedBatch::take_crashed`] so that the engine counts the crash as a failed attempt.

use std::future::Future;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::watch;
use uuid::Uuid;

use crate::event::HookEvent;

/// What to claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimRequest {
    /// At most this many events. The engine passes no more than its free handler slots, so
    /// that every claimed event starts at once.
    pub limit: usize,
    /// Only events with `retry_count` below this are returned; the store sets aside rows at or
    /// above it as dead (see [`ClaimedBatch::set_aside`]).
    pub max_retry_count: u32,
    /// How long the claim may go without hearing from the engine before the store may consider
    /// its holder dead and release it.
    pub claim_timeout: Duration,
    /// At most this many bytes of JSON (payload and metadata) in the events returned. Rows the
    /// claim took past it are not returned (they stay held until the batch ends). Counted as
    /// [`ClaimedBatch::bytes`].
    pub max_bytes: u64,
    /// An event whose payload and metadata alone exceed this many bytes of JSON can never be
    /// held: the store sets it aside dead with the reason, without fetching it.
    pub max_event_bytes: u64,
    /// Whether the claim may return a suspect event (one whose previous holder died) to be
    /// handled alone. The engine sets it only when no other batch or claim is in flight, and
    /// starts none until a batch that is [`isolated`](ClaimedBatch::isolated) has finished: a
    /// crash while an isolated event runs is that event's.
    pub isolate: bool,
}

impl Default for ClaimRequest {
    /// 100 events, `max_retry_count` 3, a 60 s claim timeout, no byte limit, no isolation.
    fn default() -> Self {
        Self {
            limit: 100,
            max_retry_count: 3,
            claim_timeout: Duration::from_secs(60),
            max_bytes: u64::MAX,
            max_event_bytes: u64::MAX,
            isolate: false,
        }
    }
}

/// What [`ClaimedBatch::finish`] reports when the outcomes are committed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Finished {
    /// Events whose outcome could not be written as given (a trigger or constraint refused it,
    /// or the text could not be stored) and that were set aside instead, with the reason, so
    /// that their batch-mates could be committed. They are not counted as succeeded or failed.
    pub set_aside: Vec<(Uuid, String)>,
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
    /// (and nothing was set aside). The engine may have several claims on their way at once
    /// (see [`EngineConfig::claims_in_flight`](crate::EngineConfig::claims_in_flight)), never one
    /// with [`ClaimRequest::isolate`] beside another.
    fn claim(
        &self,
        request: ClaimRequest,
    ) -> impl Future<Output = Result<Option<Self::Batch>, Self::Error>> + Send;

    /// A receiver that is marked changed whenever new events may have become eligible (for
    /// PostgreSQL: a NOTIFY arrived, or the listener reconnected). `None` means poll only.
    fn wakeups(&self) -> Option<watch::Receiver<()>> {
        None
    }

    /// Whether the latest claim saw suspect events waiting to be handled in isolation (see
    /// [`ClaimRequest::isolate`]). The engine then lets its batches in flight finish and claims
    /// with `isolate`.
    fn suspects_waiting(&self) -> bool {
        false
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

    /// Events whose previous attempt was handled alone and whose holder died while it ran: the
    /// engine records a failed attempt for each (the crash is the event's), without running a
    /// handler. The engine calls it once.
    fn take_crashed(&mut self) -> Vec<HookEvent> {
        Vec::new()
    }

    /// Whether the batch holds a suspect event to be handled alone: the engine runs nothing else
    /// while it runs.
    fn isolated(&self) -> bool {
        false
    }

    /// Rows the claim took but holds back without returning them, because the byte limit was
    /// reached; they are released unchanged when the batch ends.
    fn held_back(&self) -> usize {
        0
    }

    /// Bytes of JSON (payload and metadata) of the events returned.
    fn bytes(&self) -> u64 {
        0
    }

    /// Records that the batch's handlers are about to start, so that a holder that dies while
    /// they run leaves its events suspect instead of simply claimable. The engine calls it once,
    /// before the first handler starts; on an error no handler starts and the engine releases
    /// the batch.
    fn start(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send {
        std::future::ready(Ok(()))
    }

    /// Ends the claim at once without writing any outcome: every event is released unchanged and
    /// is not suspect. Best effort; never fails (a claim that cannot be ended cleanly ends with
    /// its connection).
    fn release(self) -> impl Future<Output = ()> + Send
    where
        Self: Sized,
    {
        async move {
            let _ = self.finish(Vec::new()).await;
        }
    }

    /// Tells the store the holder is alive and still working on the batch, so the claim does not
    /// lapse while handlers run (lease extension). The engine calls it every third of the claim
    /// timeout. An error means the claim is lost: the engine then cancels the batch's handlers,
    /// since another claimer may already hold the events.
    fn keep_alive(&self) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Writes `outcomes` and ends the claim; events without an outcome are released unchanged.
    /// Fails, writing nothing, if the claim was lost. An outcome that cannot be written does not
    /// fail the batch: that event is set aside and reported in [`Finished::set_aside`].
    fn finish(self, outcomes: Vec<Outcome>) -> impl Future<Output = Result<Finished, Self::Error>> + Send;

    /// Whether `error`, returned by [`finish`](ClaimedBatch::finish), means the outcome is
    /// unknown (the connection was lost after COMMIT was sent, and it could not be found out
    /// whether the commit took place) rather than that nothing was written.
    fn is_outcome_unknown(error: &Self::Error) -> bool {
        let _ = error;
        false
    }
}
