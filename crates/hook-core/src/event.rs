//! The event model: one row of `hook_events`, and what a handler says about it.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use uuid::Uuid;

/// One row of the `hook_events` table, with every column of the original schema.
///
/// The columns the processor added later (`result_metadata`, `next_attempt_at`, `dead_at`) are
/// bookkeeping of the store and are not needed by handlers, so they are not part of this type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HookEvent {
    /// Primary key.
    pub id: Uuid,
    /// The hook that produced the event, e.g. `PreToolUse`.
    pub source: String,
    /// What happened, e.g. `tool_invocation`.
    pub action: String,
    /// The kind of thing the event is about, e.g. `tool`.
    pub resource: String,
    /// Which thing the event is about, e.g. a tool name or a session id.
    pub resource_id: String,
    /// The hook's input, as the producer wrote it.
    pub payload: Value,
    /// Producer-side metadata (session id, cwd, ...).
    pub metadata: Value,
    /// Whether a handler has succeeded on this event.
    pub processed: bool,
    /// Error texts of failed attempts, oldest first; `None` when there were none (or after a reset).
    pub processing_errors: Option<Vec<String>>,
    /// Number of failed attempts so far.
    pub retry_count: i32,
    /// When the producer inserted the event.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When a handler succeeded on the event.
    #[serde(with = "time::serde::rfc3339::option")]
    pub processed_at: Option<OffsetDateTime>,
}

/// What a handler reports about one event.
///
/// `success = false` (or a handler error, panic or timeout) counts as one failed attempt: the
/// engine records `error` (or `message` when there is no error) and schedules a retry.
/// `metadata` is stored in the row's `result_metadata` column whatever the outcome. `retry` lets
/// a failed attempt ask for more than the retry policy's schedule: no retry at all (the event is
/// dead at once) or not before a delay (a server's `Retry-After`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct HandlerResult {
    /// Whether the event was handled.
    pub success: bool,
    /// A short human-readable summary.
    pub message: String,
    /// What went wrong, when `success` is false.
    pub error: Option<String>,
    /// Structured facts the handler extracted; stored with the event.
    pub metadata: Map<String, Value>,
    /// How a failed attempt wants to be retried; ignored on success.
    #[serde(skip)]
    pub retry: RetryHint,
}

/// What a failed attempt says about trying again; see [`HandlerResult::retry`].
///
/// ```
/// use std::time::Duration;
/// use hook_core::RetryHint;
///
/// let policy = Duration::from_secs(2);
/// let max = Duration::from_secs(300);
/// assert_eq!(RetryHint::Policy.delay(policy, max), policy);
/// assert_eq!(RetryHint::After(Duration::from_secs(30)).delay(policy, max), Duration::from_secs(30));
/// assert_eq!(RetryHint::After(Duration::from_secs(1)).delay(policy, max), policy);
/// assert_eq!(RetryHint::After(Duration::from_secs(3600)).delay(policy, max), max);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RetryHint {
    /// The retry policy decides (the default).
    #[default]
    Policy,
    /// Retry, but not before this long (e.g. an HTTP `Retry-After`); never later than the
    /// policy's `max_delay`. The retry limit still applies.
    After(Duration),
    /// A permanent failure: retrying cannot help, so the event is dead after this attempt,
    /// whatever its retry count.
    Never,
}

impl RetryHint {
    /// Whether the event should be dead after this failure regardless of its retry count.
    pub fn is_permanent(self) -> bool {
        self == RetryHint::Never
    }

    /// The delay before the next attempt: the policy's `policy_delay`, or the hint's delay when
    /// that is longer, never above `max_delay`.
    pub fn delay(self, policy_delay: Duration, max_delay: Duration) -> Duration {
        match self {
            RetryHint::After(after) => policy_delay.max(after).min(max_delay.max(policy_delay)),
            RetryHint::Policy | RetryHint::Never => policy_delay,
        }
    }
}

impl HandlerResult {
    /// A successful result with a message and no metadata.
    pub fn ok(message: impl Into<String>) -> Self {
        Self {
            success: true,
            message: message.into(),
            error: None,
            metadata: Map::new(),
            retry: RetryHint::Policy,
        }
    }

    /// A failed result; `error` is recorded in `processing_errors`.
    pub fn failed(error: impl Into<String>) -> Self {
        Self {
            success: false,
            message: "failed".to_owned(),
            error: Some(error.into()),
            metadata: Map::new(),
            retry: RetryHint::Policy,
        }
    }

    /// A permanent failure: the event is dead after this attempt, with `error` as the reason.
    pub fn permanent(error: impl Into<String>) -> Self {
        Self { retry: RetryHint::Never, ..Self::failed(error) }
    }

    /// Sets how a failure wants to be retried (see [`RetryHint`]).
    #[must_use]
    pub fn with_retry(mut self, retry: RetryHint) -> Self {
        self.retry = retry;
        self
    }

    /// Adds one metadata entry.
    #[must_use]
    pub fn with(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// The text recorded for a failed attempt: the error, else the message, else a fixed text.
    pub fn error_text(&self) -> String {
        match (&self.error, self.message.is_empty()) {
            (Some(error), _) if !error.is_empty() => error.clone(),
            (_, false) => self.message.clone(),
            _ => "handler reported failure without a message".to_owned(),
        }
    }
}

/// An event to insert into `hook_events`: what a producer decides. The columns the processor
/// maintains (`processed`, `retry_count`, ...) start at their defaults.
///
/// The id is assigned here, by the producer, not by the database: a producer that is unsure
/// whether its insert reached the table (a timeout, a connection lost at `COMMIT`) can send the
/// same event again and the store skips it (`ON CONFLICT (id) DO NOTHING`). [`NewEvent::new`]
/// takes a UUIDv7, whose time-ordered prefix keeps the primary key index compact under inserts.
///
/// ```
/// use hook_core::NewEvent;
/// use serde_json::json;
///
/// let event = NewEvent::new("OrderService", "order_placed", "order", "o-1042")
///     .with_payload(json!({"item": "tea", "quantity": 2}))
///     .with_metadata(json!({"request_id": "r-7"}));
/// assert_eq!(event.id.get_version_num(), 7);
/// assert_eq!(event.created_at, None); // the database's now() at insert
/// ```
///
/// It serializes to one JSON object with these field names (`created_at` in RFC 3339), which is
/// the line format of `hook-ingest`'s spool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewEvent {
    /// Primary key, chosen by the producer.
    pub id: Uuid,
    /// The producer or hook, e.g. `PreToolUse`; with `action`, it selects the handler.
    pub source: String,
    /// What happened, e.g. `tool_invocation`.
    pub action: String,
    /// The kind of thing the event is about, e.g. `tool`.
    pub resource: String,
    /// Which thing the event is about, e.g. a tool name or a session id.
    pub resource_id: String,
    /// The event's content; `{}` by default.
    #[serde(default = "empty_object")]
    pub payload: Value,
    /// Producer-side facts about the event (session, host, ...); `{}` by default.
    #[serde(default = "empty_object")]
    pub metadata: Value,
    /// When the event happened; `None` lets the database use its own `now()` at insert.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub created_at: Option<OffsetDateTime>,
}

fn empty_object() -> Value {
    Value::Object(Map::new())
}

impl NewEvent {
    /// An event with a fresh UUIDv7 id, empty `payload` and `metadata`, and no `created_at`.
    ///
    /// The four text columns are `VARCHAR(255)` in the table: longer values are refused by the
    /// database, so cut values of unknown length (tool names, ids from outside) before.
    pub fn new(
        source: impl Into<String>,
        action: impl Into<String>,
        resource: impl Into<String>,
        resource_id: impl Into<String>,
    ) -> Self {
        Self {
            id: Uuid::now_v7(),
            source: source.into(),
            action: action.into(),
            resource: resource.into(),
            resource_id: resource_id.into(),
            payload: empty_object(),
            metadata: empty_object(),
            created_at: None,
        }
    }

    /// Replaces the id (e.g. with one derived from the caller's own key, for idempotent retries).
    #[must_use]
    pub fn with_id(mut self, id: Uuid) -> Self {
        self.id = id;
        self
    }

    /// Replaces the payload.
    #[must_use]
    pub fn with_payload(mut self, payload: Value) -> Self {
        self.payload = payload;
        self
    }

    /// Replaces the metadata.
    #[must_use]
    pub fn with_metadata(mut self, metadata: Value) -> Self {
        self.metadata = metadata;
        self
    }

    /// Sets when the event happened, instead of the database's `now()` at insert. The processor
    /// claims events oldest `created_at` first.
    #[must_use]
    pub fn with_created_at(mut self, created_at: OffsetDateTime) -> Self {
        self.created_at = Some(created_at);
        self
    }
}
