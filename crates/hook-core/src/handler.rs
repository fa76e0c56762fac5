//! The [`Handler`] trait and the [`HandlerRegistry`] that routes events to handlers.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::FutureExt;

use crate::event::{HandlerResult, HookEvent};

/// The wildcard that matches any source or action in [`HandlerRegistry::register`].
pub const WILDCARD: &str = "*";

/// Handles one event.
///
/// Implement it for a type, or register a plain async closure: any
/// `Fn(Arc<HookEvent>) -> impl Future<Output = R>` is a handler when `R` is a [`HandlerResult`]
/// or a `Result<HandlerResult, E>` with `E: Display` (an `Err` is one failed attempt).
///
/// ```
/// use std::sync::Arc;
/// use hook_core::{HandlerRegistry, HandlerResult, HookEvent};
///
/// let mut registry = HandlerRegistry::new();
/// registry.register("PreToolUse", "*", |event: Arc<HookEvent>| async move {
///     HandlerResult::ok(format!("saw {}", event.action))
/// });
/// registry.register("*", "*", |_event: Arc<HookEvent>| async move {
///     Err::<HandlerResult, _>("no route for this event")
/// });
/// assert!(registry.resolve("PreToolUse", "anything").is_some());
/// ```
pub trait Handler: Send + Sync + 'static {
    /// Handles `event`. The engine enforces the handler timeout and catches panics.
    fn handle(&self, event: Arc<HookEvent>) -> BoxFuture<'static, HandlerResult>;
}

/// What an async closure may return to be used as a [`Handler`].
pub trait IntoHandlerResult {
    /// Converts into the result the engine records.
    fn into_handler_result(self) -> HandlerResult;
}

impl IntoHandlerResult for HandlerResult {
    fn into_handler_result(self) -> HandlerResult {
        self
    }
}

impl<E: fmt::Display> IntoHandlerResult for Result<HandlerResult, E> {
    fn into_handler_result(self) -> HandlerResult {
        self.unwrap_or_else(|error| HandlerResult::failed(error.to_string()))
    }
}

impl<F, Fut> Handler for F
where
    F: Fn(Arc<HookEvent>) -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: IntoHandlerResult,
{
    fn handle(&self, event: Arc<HookEvent>) -> BoxFuture<'static, HandlerResult> {
        self(event).map(IntoHandlerResult::into_handler_result).boxed()
    }
}

/// Routes `(source, action)` to a handler: an exact match first, then `(source, *)`, then `(*, *)`.
#[derive(Clone, Default)]
pub struct HandlerRegistry {
    /// By source, then action: looked up with the event's `&str`s, without allocating.
    exact: HashMap<String, HashMap<String, Arc<dyn Handler>>>,
    by_source: HashMap<String, Arc<dyn Handler>>,
    global: Option<Arc<dyn Handler>>,
}

impl fmt::Debug for HandlerRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut routes = self.routes();
        routes.sort();
        f.debug_struct("HandlerRegistry").field("routes", &routes).finish()
    }
}

impl HandlerRegistry {
    /// An empty registry: every event is a failed attempt with "no handler" until one is registered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `handler` for `(source, action)`; either may be [`WILDCARD`]. A later
    /// registration for the same route replaces the earlier one. `(*, action)` with a concrete
    /// action is not a supported route and is treated as `(*, *)`.
    pub fn register(&mut self, source: &str, action: &str, handler: impl Handler) -> &mut Self {
        self.register_arc(source, action, Arc::new(handler))
    }

    /// Like [`register`](Self::register), for a handler that is already shared.
    pub fn register_arc(&mut self, source: &str, action: &str, handler: Arc<dyn Handler>) -> &mut Self {
        match (source == WILDCARD, action == WILDCARD) {
            (true, _) => self.global = Some(handler),
            (false, true) => {
                self.by_source.insert(source.to_owned(), handler);
            }
            (false, false) => {
                self.exact.entry(source.to_owned()).or_default().insert(action.to_owned(), handler);
            }
        }
        self
    }

    /// The handler for an event, by the precedence exact, `(source, *)`, `(*, *)`.
    pub fn resolve(&self, source: &str, action: &str) -> Option<Arc<dyn Handler>> {
        self.exact
            .get(source)
            .and_then(|actions| actions.get(action))
            .or_else(|| self.by_source.get(source))
            .or(self.global.as_ref())
            .cloned()
    }

    /// Every registered route as `(source, action)`, wildcards spelled `*`, in no fixed order.
    pub fn routes(&self) -> Vec<(String, String)> {
        let exact = self
            .exact
            .iter()
            .flat_map(|(source, actions)| actions.keys().map(move |action| (source.clone(), action.clone())));
        let by_source = self.by_source.keys().map(|s| (s.clone(), WILDCARD.to_owned()));
        let global = self.global.iter().map(|_| (WILDCARD.to_owned(), WILDCARD.to_owned()));
        exact.chain(by_source).chain(global).collect()
    }

    /// Number of registered routes.
    pub fn len(&self) -> usize {
        self.exact.values().map(HashMap::len).sum::<usize>()
            + self.by_source.len()
            + usize::from(self.global.is_some())
    }

    /// Whether no route is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
