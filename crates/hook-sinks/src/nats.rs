//! The `nats` sink: publishes each event to NATS JetStream and waits for the stream's ack.
//!
//! - The subject comes from a template, e.g. `hooks.{source}.{action}`; each filled-in value is
//!   made one subject token (see [`Template::render_subject`]).
//! - The message is the event as JSON, with the header `Nats-Msg-Id` set to the event id: a
//!   re-publish of the same event (a processor killed after the ack but before its commit, a
//!   retry) within the stream's duplicate window is dropped by the stream and acknowledged as a
//!   duplicate. `Hook-Source`, `Hook-Action` and `Hook-Attempt` headers ride along.
//! - The event counts as delivered only once the stream's ack arrived (the message is stored,
//!   replicated as the stream is configured). No ack within the timeout, no stream for the
//!   subject, a lost connection: retryable. A message larger than the server's `max_payload`:
//!   permanent.
//! - Publishes are asynchronous: handlers publishing at once share one connection, each waiting
//!   for its own ack, with at most `max_in_flight` acks outstanding (more wait), so one
//!   processor is bounded by the engine's concurrency, not by round trips.
//! - The connection is made in the background and re-made after a loss; until it is up,
//!   deliveries fail (retryable). With `create_stream`, the stream is created (or found) before
//!   the first publish, retried on each delivery until it succeeds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, stream};
use futures::future::BoxFuture;
use futures::FutureExt;
use hook_core::HookEvent;
use serde_json::{Map, Value};
use tokio::sync::OnceCell;

use crate::delivery::{Delivery, Sink};
use crate::error::SinkError;
use crate::template::Template;

/// How to authenticate to the server.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum NatsAuth {
    /// No credentials (or those in the URL).
    #[default]
    None,
    /// A token.
    Token(String),
    /// A user and password.
    UserPassword(String, String),
}

impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NatsAuth::None => f.write_str("None"),
            NatsAuth::Token(_) => f.write_str("Token(..)"),
            NatsAuth::UserPassword(user, _) => write!(f, "UserPassword({user:?}, ..)"),
        }
    }
}

/// The stream to create when missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSpec {
    /// The stream's name.
    pub name: String,
    /// The subjects it captures; by default the subject template with `*` for each templated
    /// token ([`Template::subject_filter`]).
    pub subjects: Vec<String>,
    /// How long the stream remembers message ids to drop duplicates. JetStream's default is 2 min.
    pub duplicate_window: Duration,
    /// Replicas (1 on a single server; 3 on a cluster for fault tolerance).
    pub replicas: usize,
}

/// Where and how to publish.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Server URLs, comma-separated (`nats://127.0.0.1:4222`, `tls://...`).
    pub url: String,
    /// The subject template.
    pub subject: Template,
    /// Create this stream if it does not exist; `None`: the stream must exist.
    pub create_stream: Option<StreamSpec>,
    /// Longest wait for the ack.
    pub timeout: Duration,
    /// Acks outstanding at most, over all handlers using this sink.
    pub max_in_flight: usize,
    /// Credentials.
    pub auth: NatsAuth,
    /// Extra trusted roots (PEM) for `tls://`.
    pub ca_file: Option<std::path::PathBuf>,
}

impl NatsConfig {
    /// Publishes to `url` on `subject`, a 10 s timeout, 1024 acks in flight, no stream creation.
    pub fn new(url: impl Into<String>, subject: Template) -> Self {
        Self {
            url: url.into(),
            subject,
            create_stream: None,
            timeout: Duration::from_secs(10),
            max_in_flight: 1024,
            auth: NatsAuth::None,
            ca_file: None,
        }
    }
}

/// The `nats` sink; see the module docs.
#[derive(Clone)]
pub struct NatsSink {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NatsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSink")
            .field("url", &self.inner.config.url)
            .field("subject", &self.inner.config.subject.as_str())
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: NatsConfig,
    jetstream: jetstream::Context,
    stream_ready: OnceCell<()>,
}

impl NatsSink {
    /// Starts connecting (in the background: an unreachable server is not an error here).
    /// Must be called inside a tokio runtime.
    pub async fn connect(config: NatsConfig) -> Result<Self, SinkError> {
        let mut options = async_nats::ConnectOptions::new()
            .name("hook-processor")
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(config.timeout);
        options = match &config.auth {
            NatsAuth::None => options,
            NatsAuth::Token(token) => options.token(token.clone()),
            NatsAuth::UserPassword(user, password) => {
                options.user_and_password(user.clone(), password.clone())
            }
        };
        if let Some(ca) = &config.ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        let client = options
            .connect(config.url.as_str())
            .await
            .map_err(|e| SinkError::Config(format!("nats {}: {e}", config.url)))?;
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(config.timeout)
            .max_ack_inflight(config.max_in_flight.max(1))
            .backpressure_on_inflight(true)
            .build(client);
        Ok(Self { inner: Arc::new(Inner { config, jetstream, stream_ready: OnceCell::new() }) })
    }

    /// The JetStream context, e.g. to read the stream back in tests.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.inner.jetstream
    }
}

impl Sink for NatsSink {
    fn kind(&self) -> &'static str {
        "nats"
    }

    fn deliver(&self, event: Arc<HookEvent>) -> BoxFuture<'static, Delivery> {
        let inner = Arc::clone(&self.inner);
        async move { inner.publish(&event).await }.boxed()
    }
}

impl Inner {
    async fn ensure_stream(&self) -> Result<(), String> {
        let Some(spec) = &self.config.create_stream else { return Ok(()) };
        self.stream_ready
            .get_or_try_init(|| async {
                let config = stream::Config {
                    name: spec.name.clone(),
                    subjects: spec.subjects.clone(),
                    duplicate_window: spec.duplicate_window,
                    num_replicas: spec.replicas,
                    storage: stream::StorageType::File,
                    ..stream::Config::default()
                };
                self.jetstream
                    .get_or_create_stream(config)
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("creating stream {}: {e}", spec.name))
            })
            .await
            .map(|_| ())
    }

    async fn publish(&self, event: &HookEvent) -> Delivery {
        if let Err(error) = self.ensure_stream().await {
            return Delivery::retryable(error);
        }
        let payload = match serde_json::to_vec(event) {
            Ok(payload) => payload,
            Err(error) => return Delivery::permanent(format!("cannot encode the event: {error}")),
        };
        let subject = self.config.subject.render_subject(event);
        let message = PublishMessage::build()
            .payload(payload.into())
            .message_id(event.id.to_string())
            .header("Hook-Source", event.source.as_str())
            .header("Hook-Action", event.action.as_str())
            .header("Hook-Attempt", event.retry_count.saturating_add(1).to_string().as_str());
        let started = Instant::now();
        let failed = |kind: PublishErrorKind, error: String| match kind {
            PublishErrorKind::MaxPayloadExceeded => Delivery::permanent(error),
            _ => Delivery::retryable(error),
        };
        let ack = match self.jetstream.send_publish(subject.clone(), message).await {
            Ok(ack) => ack,
            Err(error) => return failed(error.kind(), format!("publish to {subject}: {error}")),
        };
        match ack.await {
            Ok(ack) => {
                let mut facts = Map::new();
                facts.insert("subject".into(), Value::from(subject));
                facts.insert("stream".into(), Value::from(ack.stream));
                facts.insert("seq".into(), Value::from(ack.sequence));
                if ack.duplicate {
                    facts.insert("duplicate".into(), Value::Bool(true));
                }
                facts.insert("elapsed_ms".into(), Value::from(started.elapsed().as_millis() as u64));
                Delivery::Delivered { facts }
            }
            Err(error) => failed(error.kind(), format!("ack for {subject}: {error}")),
        }
    }
}
