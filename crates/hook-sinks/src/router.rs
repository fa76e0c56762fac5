//! From a checked [`RoutesFile`] to a [`HandlerRegistry`]: the sinks built once, each route a
//! [`RouteHandler`].
//!
//! How routes compose with the built-in handlers: the registry the engine gets holds only the
//! routes (matched exact → `(source, *)` → `(*, *)`) plus, unless the file has a `(*, *)` route,
//! a `(*, *)` fallback to the built-in registry. A route first runs the built-in handler the
//! event would have had without the routes file (the `base` registry, resolved per event), so
//! its facts are in `result_metadata` as before; if that fails, the sinks are not tried. Then it
//! delivers to all of the route's sinks at once, and the attempt succeeds only if every sink
//! delivered. Each sink's own facts are under `result_metadata.sinks.<name>`. A retry
//! delivers to every sink of the route again (each is at-least-once).

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::FutureExt;
use hook_core::{Handler, HandlerRegistry, HandlerResult, HookEvent, WILDCARD};

use crate::command::CommandSink;
use crate::config::{RoutesFile, SinkKind};
use crate::delivery::{combine, NamedSink};
use crate::error::SinkError;
use crate::nats::NatsSink;
use crate::webhook::WebhookSink;

/// A route: the built-in handler's facts, then delivery to every sink.
#[derive(Clone)]
pub struct RouteHandler {
    builtin: Option<Arc<HandlerRegistry>>,
    sinks: Vec<NamedSink>,
}

impl std::fmt::Debug for RouteHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.sinks.iter().map(NamedSink::name).collect();
        f.debug_struct("RouteHandler")
            .field("sinks", &names)
            .field("builtin", &self.builtin.is_some())
            .finish()
    }
}

impl RouteHandler {
    /// Delivers to `sinks`, after the handler `builtin` resolves for the event (none: no facts).
    pub fn new(builtin: Option<Arc<HandlerRegistry>>, sinks: Vec<NamedSink>) -> Self {
        Self { builtin, sinks }
    }
}

impl Handler for RouteHandler {
    fn handle(&self, event: Arc<HookEvent>) -> BoxFuture<'static, HandlerResult> {
        let this = self.clone();
        async move {
            let base = match this.builtin.as_ref().and_then(|r| r.resolve(&event.source, &event.action)) {
                Some(handler) => handler.handle(Arc::clone(&event)).await,
                None => HandlerResult::ok(""),
            };
            if !base.success {
                return base;
            }
            let deliveries =
                futures::future::join_all(this.sinks.iter().map(|s| s.deliver(Arc::clone(&event)))).await;
            let pairs: Vec<_> = this.sinks.iter().zip(deliveries).collect();
            combine(base, &pairs)
        }
        .boxed()
    }
}

/// The built sinks and routes of a routes file.
#[derive(Debug, Clone)]
pub struct Routes {
    sinks: Vec<NamedSink>,
    routes: Vec<(String, String, Vec<NamedSink>)>,
}

impl Routes {
    /// Builds every sink of `file` (HTTP clients, NATS connections started in the background)
    /// and the routes. Must be called inside a tokio runtime.
    pub async fn build(file: &RoutesFile) -> Result<Self, (String, SinkError)> {
        let mut by_name = HashMap::new();
        let mut sinks = Vec::new();
        for spec in &file.sinks {
            let timeout = spec.kind.timeout();
            let sink = match &spec.kind {
                SinkKind::Webhook(config) => {
                    let sink = WebhookSink::new(config.clone()).map_err(|e| (spec.name.clone(), e))?;
                    NamedSink::new(spec.name.clone(), sink, timeout)
                }
                SinkKind::Command(config) => {
                    NamedSink::new(spec.name.clone(), CommandSink::new(config.clone()), timeout)
                }
                SinkKind::Nats(config) => {
                    let sink = NatsSink::connect(config.clone()).await.map_err(|e| (spec.name.clone(), e))?;
                    NamedSink::new(spec.name.clone(), sink, timeout)
                }
            };
            by_name.insert(spec.name.clone(), sink.clone());
            sinks.push(sink);
        }
        let routes = file
            .routes
            .iter()
            .map(|route| {
                let sinks = route.sinks.iter().filter_map(|name| by_name.get(name).cloned()).collect();
                (route.source.clone(), route.action.clone(), sinks)
            })
            .collect();
        Ok(Self { sinks, routes })
    }

    /// The sinks, in the order of the file.
    pub fn sinks(&self) -> &[NamedSink] {
        &self.sinks
    }

    /// The registry for the engine: the routes over `base` (the built-in handlers), composed as
    /// the module docs say.
    pub fn registry(&self, base: HandlerRegistry) -> HandlerRegistry {
        let base = Arc::new(base);
        let mut registry = HandlerRegistry::new();
        let mut has_global = false;
        for (source, action, sinks) in &self.routes {
            has_global |= source == WILDCARD && action == WILDCARD;
            registry.register(source, action, RouteHandler::new(Some(Arc::clone(&base)), sinks.clone()));
        }
        if !has_global {
            registry.register(WILDCARD, WILDCARD, BuiltIn(base));
        }
        registry
    }
}

/// Events no route matches: the built-in handler they would have had.
struct BuiltIn(Arc<HandlerRegistry>);

impl Handler for BuiltIn {
    fn handle(&self, event: Arc<HookEvent>) -> BoxFuture<'static, HandlerResult> {
        match self.0.resolve(&event.source, &event.action) {
            Some(handler) => handler.handle(event),
            None => {
                let error =
                    format!("no handler registered for ({}, {}) and no wildcard", event.source, event.action);
                async move { HandlerResult::failed(error) }.boxed()
            }
        }
    }
}
