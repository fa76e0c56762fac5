//! What a sink reports ([`Delivery`]), the [`Sink`] trait, and [`NamedSink`]: a sink with its
//! name, timeout and metrics, usable as a [`hook_core::Handler`] on its own.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::FutureExt;
use hook_core::{Handler, HandlerResult, HookEvent, RetryHint};
use metrics::{counter, describe_counter, describe_histogram, histogram, Counter, Histogram, Unit};
use serde_json::{Map, Value};

/// The names of the per-sink metrics, labelled `sink` (the name in the routes file) and `type`
/// (`webhook`, `command`, `nats`).
pub mod names {
    /// Counter: deliveries that succeeded.
    pub const DELIVERIES: &str = "hook_events_sink_deliveries_total";
    /// Counter, also labelled `kind` (`retryable`, `permanent`, `timeout`): deliveries that failed.
    pub const FAILURES: &str = "hook_events_sink_failures_total";
    /// Histogram (seconds): how long deliveries took, failures included.
    pub const DURATION: &str = "hook_events_sink_duration_seconds";
}

/// Registers the help texts of the sink metrics with the installed recorder.
pub fn describe_metrics() {
    describe_counter!(
        names::DELIVERIES,
        "Deliveries to a sink that succeeded (attempts, before the outcome is committed)"
    );
    describe_counter!(
        names::FAILURES,
        "Deliveries to a sink that failed, by kind: retryable, permanent, timeout"
    );
    describe_histogram!(
        names::DURATION,
        Unit::Seconds,
        "How long deliveries to a sink took, failures included"
    );
}

/// How one delivery ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    /// Delivered; `facts` (status code, stream sequence, output...) go to `result_metadata`.
    Delivered {
        /// What the sink reports about the delivery.
        facts: Map<String, Value>,
    },
    /// Failed; another attempt may succeed.
    Retryable {
        /// What went wrong.
        error: String,
        /// Not before this long (a server's `Retry-After`), if the sink was told.
        retry_after: Option<Duration>,
        /// What the sink reports about the attempt.
        facts: Map<String, Value>,
    },
    /// Failed; another attempt cannot succeed (a 4xx, a "permanent" exit code): the event is dead.
    Permanent {
        /// What went wrong.
        error: String,
        /// What the sink reports about the attempt.
        facts: Map<String, Value>,
    },
}

/// How a failed delivery is counted in [`names::FAILURES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Will be retried.
    Retryable,
    /// Will not be retried.
    Permanent,
    /// The sink's timeout passed (retried).
    Timeout,
}

impl FailureKind {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Retryable => "retryable",
            FailureKind::Permanent => "permanent",
            FailureKind::Timeout => "timeout",
        }
    }
}

impl Delivery {
    /// A retryable failure with no facts.
    pub fn retryable(error: impl Into<String>) -> Self {
        Delivery::Retryable { error: error.into(), retry_after: None, facts: Map::new() }
    }

    /// A permanent failure with no facts.
    pub fn permanent(error: impl Into<String>) -> Self {
        Delivery::Permanent { error: error.into(), facts: Map::new() }
    }

    /// Whether it was delivered.
    pub fn is_delivered(&self) -> bool {
        matches!(self, Delivery::Delivered { .. })
    }

    fn facts(&self) -> &Map<String, Value> {
        match self {
            Delivery::Delivered { facts }
            | Delivery::Retryable { facts, .. }
            | Delivery::Permanent { facts, .. } => facts,
        }
    }

    fn error(&self) -> Option<&str> {
        match self {
            Delivery::Delivered { .. } => None,
            Delivery::Retryable { error, .. } | Delivery::Permanent { error, .. } => Some(error),
        }
    }
}

/// Somewhere events are delivered to.
///
/// A sink only delivers; [`NamedSink`] adds the timeout, the metrics and the conversion to a
/// [`HandlerResult`].
pub trait Sink: Send + Sync + 'static {
    /// The sink type, for logs and metric labels (`webhook`, `command`, `nats`).
    fn kind(&self) -> &'static str;

    /// Delivers one event. Must be cancel-safe: the future may be dropped at its timeout or at
    /// shutdown, and must then leave nothing behind (a command sink kills its process group).
    fn deliver(&self, event: Arc<HookEvent>) -> BoxFuture<'static, Delivery>;
}

/// A sink with its name from the routes file, its timeout and its metrics. It is a
/// [`Handler`] by itself (register it directly in a [`hook_core::HandlerRegistry`]), and the
/// building block of a route ([`crate::RouteHandler`]).
#[derive(Clone)]
pub struct NamedSink {
    name: Arc<str>,
    sink: Arc<dyn Sink>,
    timeout: Duration,
    metrics: Arc<SinkMetrics>,
}

impl fmt::Debug for NamedSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NamedSink")
            .field("name", &self.name)
            .field("kind", &self.sink.kind())
            .field("timeout", &self.timeout)
            .finish()
    }
}

struct SinkMetrics {
    deliveries: Counter,
    retryable: Counter,
    permanent: Counter,
    timeout: Counter,
    duration: Histogram,
}

impl SinkMetrics {
    fn new(name: &str, kind: &'static str) -> Self {
        let labels = [("sink", name.to_owned()), ("type", kind.to_owned())];
        let failures = |k: FailureKind| {
            let mut labels = labels.to_vec();
            labels.push(("kind", k.as_str().to_owned()));
            counter!(names::FAILURES, &labels)
        };
        Self {
            deliveries: counter!(names::DELIVERIES, &labels),
            retryable: failures(FailureKind::Retryable),
            permanent: failures(FailureKind::Permanent),
            timeout: failures(FailureKind::Timeout),
            duration: histogram!(names::DURATION, &labels),
        }
    }
}

impl NamedSink {
    /// Names `sink` and bounds each delivery by `timeout`. The metric handles come from the
    /// recorder installed at this moment.
    pub fn new(name: impl Into<String>, sink: impl Sink, timeout: Duration) -> Self {
        Self::from_arc(name, Arc::new(sink), timeout)
    }

    /// Like [`new`](Self::new), for a sink that is already shared.
    pub fn from_arc(name: impl Into<String>, sink: Arc<dyn Sink>, timeout: Duration) -> Self {
        let name: Arc<str> = name.into().into();
        let metrics = Arc::new(SinkMetrics::new(&name, sink.kind()));
        Self { name, sink, timeout, metrics }
    }

    /// The sink's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The sink's type.
    pub fn kind(&self) -> &'static str {
        self.sink.kind()
    }

    /// The longest a delivery may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Delivers `event` under the timeout and records the metrics.
    pub fn deliver(&self, event: Arc<HookEvent>) -> BoxFuture<'static, Delivery> {
        let this = self.clone();
        async move {
            let started = Instant::now();
            let id = event.id;
            let delivery = match tokio::time::timeout(this.timeout, this.sink.deliver(event)).await {
                Ok(delivery) => delivery,
                Err(_) => {
                    this.metrics.timeout.increment(1);
                    this.metrics.duration.record(started.elapsed().as_secs_f64());
                    tracing::debug!(event_id = %id, sink = %this.name, "delivery timed out");
                    return Delivery::retryable(format!(
                        "timed out after {:.3}s",
                        this.timeout.as_secs_f64()
                    ));
                }
            };
            let elapsed = started.elapsed();
            this.metrics.duration.record(elapsed.as_secs_f64());
            match &delivery {
                Delivery::Delivered { .. } => {
                    this.metrics.deliveries.increment(1);
                    tracing::debug!(event_id = %id, sink = %this.name, elapsed_ms = elapsed.as_millis() as u64, "delivered");
                }
                Delivery::Retryable { error, .. } => {
                    this.metrics.retryable.increment(1);
                    tracing::debug!(event_id = %id, sink = %this.name, %error, "delivery failed; retryable");
                }
                Delivery::Permanent { error, .. } => {
                    this.metrics.permanent.increment(1);
                    tracing::debug!(event_id = %id, sink = %this.name, %error, "delivery failed; permanent");
                }
            }
            delivery
        }
        .boxed()
    }
}

impl Handler for NamedSink {
    fn handle(&self, event: Arc<HookEvent>) -> BoxFuture<'static, HandlerResult> {
        let delivery = self.deliver(event);
        let this = self.clone();
        async move { combine(HandlerResult::ok(""), &[(&this, delivery.await)]) }.boxed()
    }
}

/// The key of `result_metadata` under which each sink's facts are stored, by sink name.
pub const SINKS_KEY: &str = "sinks";

/// Merges the deliveries of one attempt into `base` (the built-in handler's result):
/// - every sink's facts go under `result_metadata.sinks.<name>`, with `ok` (bool), `type`, and
///   `error` when it failed;
/// - all delivered: success;
/// - any permanent: a permanent failure (the event is dead), naming every failed sink;
/// - else any retryable: a failure retried no sooner than the longest `Retry-After`.
pub(crate) fn combine(mut base: HandlerResult, deliveries: &[(&NamedSink, Delivery)]) -> HandlerResult {
    let mut sinks = Map::new();
    let mut errors = Vec::new();
    let mut permanent = false;
    let mut retry_after: Option<Duration> = None;
    for (sink, delivery) in deliveries {
        let mut facts = delivery.facts().clone();
        facts.insert("ok".into(), Value::Bool(delivery.is_delivered()));
        facts.insert("type".into(), Value::from(sink.kind()));
        if let Some(error) = delivery.error() {
            facts.insert("error".into(), Value::from(hook_core::bound_text(error)));
            errors.push(format!("sink {}: {error}", sink.name()));
        }
        match delivery {
            Delivery::Permanent { .. } => permanent = true,
            Delivery::Retryable { retry_after: Some(after), .. } => {
                retry_after = Some(retry_after.map_or(*after, |d| d.max(*after)));
            }
            _ => {}
        }
        sinks.insert(sink.name().to_owned(), Value::Object(facts));
    }
    let metadata = std::mem::take(&mut base.metadata);
    let mut result = if errors.is_empty() {
        if base.message.is_empty() {
            base.message = format!("delivered to {}", deliveries.len());
        }
        base
    } else if permanent {
        HandlerResult::permanent(format!("permanent failure: {}", errors.join("; ")))
    } else {
        let hint = retry_after.map_or(RetryHint::Policy, RetryHint::After);
        HandlerResult::failed(errors.join("; ")).with_retry(hint)
    };
    result.metadata = metadata;
    result.metadata.insert(SINKS_KEY.into(), Value::Object(sinks));
    result
}
