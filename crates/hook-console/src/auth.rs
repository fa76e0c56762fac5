//! Who may act: the token, the logins it gives, and the CSRF value of each login.
//!
//! A login posts the token once; the console answers with a random session id in an `HttpOnly`,
//! `SameSite=Strict` cookie and keeps, for that session, a random CSRF value that every form of
//! an action carries. An action is allowed only with a live session and its CSRF value, and not
//! from another origin (`Origin` / `Sec-Fetch-Site`). Sessions live in memory: a restart logs
//! everyone out.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap};
use rand::RngCore;

use crate::error::ConsoleError;

/// The name of the login cookie.
pub(crate) const COOKIE: &str = "hook_console_session";

/// At most this many logins are kept; the oldest goes first.
const MAX_SESSIONS: usize = 1000;

/// The secret that enables actions. Never shown: `Debug` prints `Token(..)`.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    /// The shortest token accepted, in bytes.
    pub const MIN_LEN: usize = 16;

    /// A token from its text (surrounding whitespace, such as a file's final newline, removed).
    /// At least [`Token::MIN_LEN`] bytes.
    pub fn new(text: &str) -> Result<Token, ConsoleError> {
        let text = text.trim();
        if text.len() < Token::MIN_LEN {
            return Err(ConsoleError::Token(format!(
                "the token must be at least {} bytes long (it has {}); e.g. `openssl rand -hex 32`",
                Token::MIN_LEN,
                text.len()
            )));
        }
        Ok(Token(text.to_owned()))
    }

    /// Whether `given` is the token, compared in constant time.
    pub(crate) fn matches(&self, given: &str) -> bool {
        equal(self.0.as_bytes(), given.trim().as_bytes())
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

/// Byte equality whose time depends on the lengths only.
fn equal(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A live login.
#[derive(Debug, Clone)]
pub(crate) struct Login {
    /// The CSRF value its forms carry.
    pub(crate) csrf: String,
    expires: Instant,
    created: Instant,
}

/// The live logins, by session id.
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    by_id: HashMap<String, Login>,
}

impl Sessions {
    /// A new login valid for `lifetime`: its session id and CSRF value.
    pub(crate) fn create(&mut self, lifetime: Duration) -> (String, Login) {
        let now = Instant::now();
        self.by_id.retain(|_, login| login.expires > now);
        while self.by_id.len() >= MAX_SESSIONS {
            let oldest = self.by_id.iter().min_by_key(|(_, l)| l.created).map(|(id, _)| id.clone());
            match oldest {
                Some(id) => self.by_id.remove(&id),
                None => break,
            };
        }
        let login = Login { csrf: random_hex(), expires: now + lifetime, created: now };
        let id = random_hex();
        self.by_id.insert(id.clone(), login.clone());
        (id, login)
    }

    /// The live login of session `id`.
    pub(crate) fn get(&self, id: &str) -> Option<Login> {
        self.by_id.get(id).filter(|l| l.expires > Instant::now()).cloned()
    }

    /// Ends the login of session `id`.
    pub(crate) fn remove(&mut self, id: &str) {
        self.by_id.remove(id);
    }
}

/// The session id in the request's cookie, if any.
pub(crate) fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
}

/// The cookie that logs in as session `id` for `lifetime`, on `path`.
pub(crate) fn login_cookie(id: &str, path: &str, lifetime: Duration) -> String {
    format!("{COOKIE}={id}; Path={path}; Max-Age={}; HttpOnly; SameSite=Strict", lifetime.as_secs())
}

/// The cookie that logs out.
pub(crate) fn logout_cookie(path: &str) -> String {
    format!("{COOKIE}=; Path={path}; Max-Age=0; HttpOnly; SameSite=Strict")
}

/// Refuses a request sent by a page of another origin: `Sec-Fetch-Site: cross-site` (or
/// `same-site`), or an `Origin` whose host is not the request's `Host`.
pub(crate) fn same_origin(headers: &HeaderMap) -> Result<(), ConsoleError> {
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = text(header::HeaderName::from_static("sec-fetch-site")) {
        if site != "same-origin" && site != "none" {
            return Err(ConsoleError::Forbidden(format!("a request from another site ({site})")));
        }
    }
    if let Some(origin) = text(header::ORIGIN) {
        let host = text(header::HOST).unwrap_or("");
        let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
        if origin == "null" || origin_host != host {
            return Err(ConsoleError::Forbidden("a request from another origin".into()));
        }
    }
    Ok(())
}

/// Allows an action: a token is configured, the request has a live login, carries that login's
/// CSRF value and comes from this console's origin.
pub(crate) fn check_action(
    writable: bool,
    login: Option<&Login>,
    csrf: Option<&str>,
    headers: &HeaderMap,
) -> Result<(), ConsoleError> {
    if !writable {
        return Err(ConsoleError::Forbidden(
            "this console is read-only: set HOOK_CONSOLE_TOKEN to enable actions".into(),
        ));
    }
    let Some(login) = login else {
        return Err(ConsoleError::Forbidden("log in with the console token first".into()));
    };
    same_origin(headers)?;
    match csrf {
        Some(given) if equal(login.csrf.as_bytes(), given.as_bytes()) => Ok(()),
        _ => {
            Err(ConsoleError::Forbidden("the form's CSRF value is missing or wrong; reload the page".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn tokens_are_long_enough_and_compared_whole() {
        assert!(Token::new("short").is_err());
        let token = Token::new("0123456789abcdef\n").unwrap();
        assert!(token.matches("0123456789abcdef"));
        assert!(!token.matches("0123456789abcdeF"));
        assert!(!token.matches("0123456789abcde"));
        assert_eq!(format!("{token:?}"), "Token(..)");
    }

    #[test]
    fn cookies_and_origins() {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_static("a=1; hook_console_session=abc; b=2"));
        assert_eq!(session_id(&headers).as_deref(), Some("abc"));
        headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:9478"));
        assert!(same_origin(&headers).is_ok());
        headers.insert(header::ORIGIN, HeaderValue::from_static("http://127.0.0.1:9478"));
        assert!(same_origin(&headers).is_ok());
        headers.insert(header::ORIGIN, HeaderValue::from_static("http://evil.example"));
        assert!(same_origin(&headers).is_err());
        headers.insert(header::ORIGIN, HeaderValue::from_static("http://127.0.0.1:9478"));
        headers.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(same_origin(&headers).is_err());
    }

    #[test]
    fn sessions_expire_and_are_capped() {
        let mut sessions = Sessions::default();
        let (id, login) = sessions.create(Duration::from_secs(60));
        assert_eq!(sessions.get(&id).map(|l| l.csrf), Some(login.csrf));
        let (gone, _) = sessions.create(Duration::ZERO);
        assert!(sessions.get(&gone).is_none());
        for _ in 0..MAX_SESSIONS + 5 {
            sessions.create(Duration::from_secs(60));
        }
        assert!(sessions.by_id.len() <= MAX_SESSIONS);
        sessions.remove(&id);
        assert!(sessions.get(&id).is_none());
    }
}
