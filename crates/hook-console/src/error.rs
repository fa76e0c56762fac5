//! The error type of this crate, and how each error answers a request.

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};

/// What can go wrong in the console.
///
/// Messages are lowercase, without a trailing period, and never contain a password or a token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsoleError {
    /// The console has no database pool yet ([`crate::ConsoleState::unattached`]).
    #[error("not connected to the database yet")]
    NotConnected,
    /// No connection could be taken from the pool.
    #[error("connection pool: {0}")]
    Pool(String),
    /// A query failed.
    #[error(transparent)]
    Store(#[from] hook_store::StoreError),
    /// The request asked for something malformed.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The request may not do this (read-only console, no login, wrong CSRF value).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// No such page or event.
    #[error("not found")]
    NotFound,
    /// The configured token is not usable.
    #[error("console token: {0}")]
    Token(String),
}

impl From<deadpool_postgres::PoolError> for ConsoleError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        ConsoleError::Pool(error.to_string())
    }
}

impl From<hook_store::tokio_postgres::Error> for ConsoleError {
    fn from(error: hook_store::tokio_postgres::Error) -> Self {
        ConsoleError::Store(error.into())
    }
}

impl ConsoleError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ConsoleError::NotConnected | ConsoleError::Pool(_) => StatusCode::SERVICE_UNAVAILABLE,
            ConsoleError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ConsoleError::Forbidden(_) => StatusCode::FORBIDDEN,
            ConsoleError::NotFound => StatusCode::NOT_FOUND,
            ConsoleError::Store(_) | ConsoleError::Token(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A bare page: used where the layout's links are not known. Pages render their errors in the
/// layout themselves.
impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        if self.status().is_server_error() {
            tracing::warn!(error = %self, "console request failed");
        }
        let body = maud::html! {
            (maud::DOCTYPE)
            html lang="en" { head { meta charset="utf-8"; title { "hook-events console: error" } }
            body { h1 { (self.status().as_u16()) } p { (crate::text::shown(&self.to_string())) } } }
        };
        (self.status(), Html(body.into_string())).into_response()
    }
}
