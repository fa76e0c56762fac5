//! The pages. Each handler reads in one read-only transaction and renders with maud, which
//! escapes every value; [`crate::text::shown`] makes invisible Unicode visible first.

pub(crate) mod events;
pub(crate) mod login;
pub(crate) mod overview;
pub(crate) mod replay;
pub(crate) mod sessions;

use axum::extract::{FromRequestParts, NestedPath};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use hook_store::console::EventRow;
use maud::{html, Markup, DOCTYPE};

use crate::auth::{self, Login};
use crate::error::ConsoleError;
use crate::text::{self, shown};
use crate::ConsoleState;

/// What every page needs: the state, where the console is mounted, and the login.
pub(crate) struct Ctx {
    pub(crate) state: ConsoleState,
    /// The path the console is mounted at, without a trailing slash (`""` at the root).
    pub(crate) base: String,
    /// The request's live login: its session id and login.
    pub(crate) login: Option<(String, Login)>,
    pub(crate) headers: HeaderMap,
}

impl FromRequestParts<ConsoleState> for Ctx {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &ConsoleState) -> Result<Self, Self::Rejection> {
        let base = parts
            .extensions
            .get::<NestedPath>()
            .map(|p| p.as_str().trim_end_matches('/').to_owned())
            .unwrap_or_default();
        let login = if state.writable() {
            auth::session_id(&parts.headers).and_then(|id| state.sessions().get(&id).map(|login| (id, login)))
        } else {
            None
        };
        Ok(Ctx { state: state.clone(), base, login, headers: parts.headers.clone() })
    }
}

/// Which page the navigation marks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Nav {
    Overview,
    Events,
    Sessions,
    None,
}

impl Ctx {
    /// A link to `path` (which starts with `/`) under the console's mount point.
    pub(crate) fn url(&self, path: &str) -> String {
        if path == "/" && !self.base.is_empty() {
            return self.base.clone();
        }
        format!("{}{path}", self.base)
    }

    /// The login cookie's path.
    pub(crate) fn cookie_path(&self) -> String {
        format!("{}/", self.base)
    }

    /// The CSRF value of the login, when there is one.
    pub(crate) fn csrf(&self) -> Option<&str> {
        self.login.as_ref().map(|(_, l)| l.csrf.as_str())
    }

    /// Whether this request may offer actions (a token is configured and the user is logged in).
    pub(crate) fn can_act(&self) -> bool {
        self.login.is_some()
    }

    pub(crate) fn statement_timeout_ms(&self) -> u64 {
        u64::try_from(self.state.config().statement_timeout.as_millis()).unwrap_or(u64::MAX)
    }

    /// A pooled connection.
    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Client, ConsoleError> {
        Ok(self.state.pool()?.get().await?)
    }

    /// The page `title` with `body` in the console's frame.
    pub(crate) fn layout(&self, title: &str, nav: Nav, body: Markup) -> Markup {
        let item = |which: Nav, path: &str, name: &str| {
            html! { a href=(self.url(path)) aria-current=[(nav == which).then_some("page")] { (name) } }
        };
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    meta name="viewport" content="width=device-width, initial-scale=1";
                    meta name="referrer" content="same-origin";
                    title { (title) " · hook-events" }
                    link rel="stylesheet" href=(self.url("/static/console.css"));
                    script src=(self.url("/static/console.js")) defer {}
                }
                body {
                    header {
                        a.brand href=(self.url("/")) { "hook-events" }
                        nav {
                            (item(Nav::Overview, "/", "Overview"))
                            (item(Nav::Events, "/events", "Events"))
                            (item(Nav::Sessions, "/sessions", "Sessions"))
                        }
                        div.mode {
                            @if !self.state.writable() {
                                span.badge.readonly title="Set HOOK_CONSOLE_TOKEN to enable replay" { "read-only" }
                            } @else if let Some(csrf) = self.csrf() {
                                form method="post" action=(self.url("/logout")) {
                                    input type="hidden" name="csrf" value=(csrf);
                                    button type="submit" { "Log out" }
                                }
                            } @else {
                                a href=(self.url("/login")) { "Log in to act" }
                            }
                        }
                    }
                    main { (body) }
                }
            }
        }
    }

    /// An error in the console's frame, with its status.
    pub(crate) fn error_page(&self, error: &ConsoleError) -> Response {
        if error.status().is_server_error() {
            tracing::warn!(%error, "console request failed");
        }
        let body = html! {
            h1 { (error.status().as_u16()) " " (error.status().canonical_reason().unwrap_or("")) }
            p.error { (shown(&error.to_string())) }
        };
        (error.status(), Html(self.layout("error", Nav::None, body).into_string())).into_response()
    }

    /// The page, or the error page.
    pub(crate) fn respond(&self, result: Result<Markup, ConsoleError>) -> Response {
        match result {
            Ok(page) => Html(page.into_string()).into_response(),
            Err(error) => self.error_page(&error),
        }
    }
}

/// An event's state, as a badge: its class and text.
pub(crate) fn state_badge(row: &EventRow) -> Markup {
    let (class, label) = if row.processed {
        if row.retry_count > 0 {
            ("recovered", format!("processed after {} failed", row.retry_count))
        } else {
            ("processed", "processed".to_owned())
        }
    } else if row.dead_at.is_some() {
        ("dead", "dead".to_owned())
    } else if row.retry_count > 0 {
        ("retrying", format!("retrying ({} failed)", row.retry_count))
    } else {
        ("pending", "pending".to_owned())
    };
    html! { span class=(format!("badge {class}")) { (label) } }
}

/// A link to the session `session`'s timeline.
pub(crate) fn session_link(ctx: &Ctx, session: &str) -> Markup {
    let href =
        format!("{}{}", ctx.url("/sessions/view"), crate::params::query(&[("id", session.to_owned())]));
    html! { a.session href=(href) { (shown(&text::cut(session, 40))) } }
}

pub(crate) async fn static_css() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], include_str!("../../static/console.css"))
}

pub(crate) async fn static_js() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], include_str!("../../static/console.js"))
}

pub(crate) async fn not_found(ctx: Ctx) -> Response {
    let mut response = ctx.error_page(&ConsoleError::NotFound);
    *response.status_mut() = StatusCode::NOT_FOUND;
    response
}
