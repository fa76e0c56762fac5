//! # hook-sinks
//!
//! Delivers hook events onward without writing Rust: a routes file (TOML) maps `(source,
//! action)` to sinks — an HTTP webhook, a local command, a NATS JetStream stream — and this
//! crate turns it into a [`hook_core::HandlerRegistry`] for the engine. The sinks are
//! [`hook_core::Handler`]s in their own right, so a Rust service embedding the engine can use
//! them without a routes file.
//!
//! | item | what it is for |
//! |---|---|
//! | [`RoutesFile`], [`LoadOptions`], [`RoutesError`] | read and check a routes file: every mistake with its line |
//! | [`Routes`], [`RouteHandler`] | build the sinks and the registry, composed with the built-in handlers |
//! | [`WebhookSink`], [`CommandSink`], [`NatsSink`] | the sinks ([`webhook`], [`command`], [`nats`] say exactly what each does) |
//! | [`NamedSink`], [`Sink`], [`Delivery`] | a sink with its name, timeout and metrics, as a `Handler`; the trait to write another |
//! | [`template`] | the `{source}`-style placeholders of subjects and bodies |
//! | [`describe_metrics`], [`metric_names`] | the per-sink metrics |
//!
//! What the sinks guarantee: every sink is at-least-once. An event is marked processed only
//! after every sink of its route reported success (a 2xx, exit 0, the stream's ack), in the
//! claim's transaction; a crash before that commit delivers it again. The webhook's
//! `webhook-id` header and the NATS `Nats-Msg-Id` header carry the event id on every attempt, so
//! receivers can drop repeats, and JetStream does so itself within the stream's duplicate
//! window. A permanent failure makes the event dead at once ([`hook_core::RetryHint::Never`]); a
//! `Retry-After` delays the retry ([`hook_core::RetryHint::After`]).
//!
//! From Rust, without a routes file:
//!
//! ```no_run
//! use std::time::Duration;
//! use hook_sinks::{CommandConfig, CommandSink, NamedSink};
//!
//! let mut registry = hook_core::default_registry();
//! let notify = CommandSink::new(CommandConfig::new(vec!["/usr/local/bin/notify".into()]));
//! registry.register("Stop", "*", NamedSink::new("notify", notify, Duration::from_secs(5)));
//! ```
//!
//! ## Features
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `test-support` | no | `hook_sinks::testing`: a `nats-server -js` of a test's own |

#![deny(missing_docs)]

mod config;
mod delivery;
mod error;
mod router;

pub mod command;
pub mod nats;
pub mod template;
#[cfg(feature = "test-support")]
pub mod testing;
pub mod webhook;

pub use command::{CommandConfig, CommandSink, PERMANENT_EXIT_CODE};
pub use config::{
    parse_duration, LoadOptions, RouteSpec, RoutesFile, SinkKind, SinkSpec, DEFAULT_SINK_TIMEOUT,
};
pub use delivery::{
    describe_metrics, names as metric_names, Delivery, FailureKind, NamedSink, Sink, SINKS_KEY,
};
pub use error::{Problem, RoutesError, SinkError};
pub use nats::{NatsAuth, NatsConfig, NatsSink, StreamSpec};
pub use router::{RouteHandler, Routes};
pub use webhook::{Secret, WebhookConfig, WebhookSink};
