//! # hook-console
//!
//! A web console for a hook-events queue, as an axum [`Router`] that a service mounts in its own
//! app: the queue at a glance (overview, with charts drawn as SVG on the server), the events
//! (filtered, paged by keyset, each with its payload and every attempt's error), the agent
//! sessions (a timeline with each tool call's duration), and replay of selected or filtered
//! events through [`hook_store::replay`].
//!
//! ```no_run
//! # async fn example(pool: hook_store::deadpool_postgres::Pool) {
//! let console = hook_console::ConsoleState::new(pool, hook_console::ConsoleConfig::default());
//! let app = axum::Router::new().nest("/console", hook_console::router(console));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:9478").await.unwrap();
//! axum::serve(listener, app).await.unwrap();
//! # }
//! ```
//!
//! ## Safe by default
//!
//! - Without a [`Token`] the console only reads: every page runs in a `READ ONLY` transaction,
//!   and every action answers 403.
//! - With a token, actions need a login (the token, posted once, gives an `HttpOnly`,
//!   `SameSite=Strict` session cookie) and the session's CSRF value in the form; a POST from
//!   another origin is refused.
//! - Every value from the table is escaped (maud), and invisible or direction-changing Unicode
//!   is shown as its code point. Large JSON is cut on the database server.
//! - Every response carries a strict `Content-Security-Policy` (no inline script or style, no
//!   framing), `X-Content-Type-Options: nosniff`, `Referrer-Policy: same-origin` (a browser sends `Origin: null` on every POST under `no-referrer`, which the origin check refuses) and
//!   `Cache-Control: no-store`.
//!
//! Pages are plain HTML forms and links: everything works with JavaScript off; the one script
//! (`static/console.js`) only adds "select all".

mod auth;
mod chart;
mod error;
mod pages;
mod params;
mod text;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use deadpool_postgres::Pool;

pub use auth::Token;
pub use error::ConsoleError;

/// How the console behaves.
#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    /// The token that enables actions; `None`: read-only.
    pub token: Option<Token>,
    /// The bound of each statement a page runs (`statement_timeout`). Default 10 s.
    pub statement_timeout: Duration,
    /// Events per page of the events list. Default 50.
    pub page_size: usize,
    /// How long a login lasts. Default 8 hours.
    pub session_lifetime: Duration,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig {
            token: None,
            statement_timeout: Duration::from_secs(10),
            page_size: 50,
            session_lifetime: Duration::from_secs(8 * 3600),
        }
    }
}

/// What the console's handlers share: the pool (possibly attached later) and the logins.
#[derive(Clone)]
pub struct ConsoleState {
    inner: Arc<Inner>,
}

struct Inner {
    pool: OnceLock<Pool>,
    config: ConsoleConfig,
    sessions: Mutex<auth::Sessions>,
}

impl ConsoleState {
    /// A console reading through `pool`.
    pub fn new(pool: Pool, config: ConsoleConfig) -> ConsoleState {
        let state = ConsoleState::unattached(config);
        state.attach(pool);
        state
    }

    /// A console whose pool comes later ([`ConsoleState::attach`]); until then its pages answer
    /// 503. For a server that starts serving before it has connected to the database.
    pub fn unattached(config: ConsoleConfig) -> ConsoleState {
        ConsoleState {
            inner: Arc::new(Inner {
                pool: OnceLock::new(),
                config,
                sessions: Mutex::new(auth::Sessions::default()),
            }),
        }
    }

    /// Gives the console its pool (only the first call counts).
    pub fn attach(&self, pool: Pool) {
        let _ = self.inner.pool.set(pool);
    }

    /// Whether actions are enabled (a token is configured).
    pub fn writable(&self) -> bool {
        self.inner.config.token.is_some()
    }

    pub(crate) fn config(&self) -> &ConsoleConfig {
        &self.inner.config
    }

    pub(crate) fn pool(&self) -> Result<&Pool, ConsoleError> {
        self.inner.pool.get().ok_or(ConsoleError::NotConnected)
    }

    pub(crate) fn sessions(&self) -> std::sync::MutexGuard<'_, auth::Sessions> {
        // A panic while the lock was held cannot leave the map inconsistent (every change is
        // one insert or remove), so a poisoned lock is used as it is.
        self.inner.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The console's routes, to serve at the root or to [`Router::nest`] under a path (links and the
/// login cookie follow the path it is mounted at).
///
/// | route | page |
/// |---|---|
/// | `GET /` | overview |
/// | `GET /events` | events, filtered and paged |
/// | `GET /events/{id}` | one event |
/// | `GET /sessions` | recent sessions |
/// | `GET /sessions/view?id=` | one session's timeline |
/// | `POST /replay` | replay: confirmation (`step=confirm`), then the run (`step=run`) |
/// | `GET, POST /login`, `POST /logout` | the token login |
pub fn router(state: ConsoleState) -> Router {
    Router::new()
        .route("/", get(pages::overview::page))
        .route("/events", get(pages::events::list))
        .route("/events/{id}", get(pages::events::detail))
        .route("/sessions", get(pages::sessions::list))
        .route("/sessions/view", get(pages::sessions::timeline))
        .route("/replay", post(pages::replay::replay))
        .route("/login", get(pages::login::form).post(pages::login::login))
        .route("/logout", post(pages::login::logout))
        .route("/static/console.css", get(pages::static_css))
        .route("/static/console.js", get(pages::static_js))
        .fallback(pages::not_found)
        .layer(middleware::from_fn(headers))
        .with_state(state)
}

/// Builds the console's indexes ([`hook_store::indexes::CONSOLE`]) where they are missing, and
/// logs what it did: every page reads through them, and the migrations do not build them (a
/// queue without a console should not write them). Until they are built the pages read the whole
/// table: on one of a million events or more the overview exceeds its statement timeout and
/// answers an error. Run it once when the console starts, beside serving: on a table of millions
/// of rows a build takes minutes, concurrently with the producers and processors. A failure (a
/// role that may not create indexes) is logged as a warning with where the statements are, and
/// the console serves on. The only thing a console writes that is not a replay.
pub async fn build_indexes(pool: &Pool) {
    hook_store::indexes::build_logged(
        pool,
        hook_store::indexes::CONSOLE,
        "the console's pages read the whole table until it is, and on a large one they exceed \
         their statement timeout",
    )
    .await
}

/// [`router`] nested at `path` (e.g. `/console`), plus a redirect from `path/` to `path` (a
/// nested router answers only the path without the slash). Merge it into an app:
/// `app.merge(hook_console::mount("/console", state))`.
///
/// # Panics
/// When `path` does not start with `/` or is `/` (axum's rule for nesting).
pub fn mount(path: &str, state: ConsoleState) -> Router {
    let path = path.trim_end_matches('/').to_owned();
    let target = path.clone();
    Router::new()
        .route(&format!("{path}/"), get(move || async move { axum::response::Redirect::permanent(&target) }))
        .nest(&path, router(state))
}

/// The policy: only this console's own stylesheet, script and forms; images only inline SVG
/// (which needs no source); nothing may frame it.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Security headers on every response, and `Server-Timing` (the time spent on the server,
/// queries and rendering, in milliseconds).
async fn headers(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let mut response = next.run(request).await;
    let elapsed = started.elapsed().as_secs_f64() * 1000.0;
    let headers = response.headers_mut();
    let fixed = [
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "same-origin"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CACHE_CONTROL, "no-store"),
    ];
    for (name, value) in fixed {
        headers.insert(name, HeaderValue::from_static(value));
    }
    if let Ok(value) = HeaderValue::from_str(&format!("app;dur={elapsed:.1}")) {
        headers.insert("server-timing", value);
    }
    response
}
