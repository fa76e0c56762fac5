//! The `webhook` sink: one HTTP `POST` per event.
//!
//! The body is the event as JSON (every column of [`HookEvent`], `created_at` in RFC 3339), or
//! the route's `body` template (see [`crate::template`]). Headers, after the
//! [Standard Webhooks](https://www.standardwebhooks.com) scheme:
//!
//! | header | value |
//! |---|---|
//! | `webhook-id`, `idempotency-key` | the event id: the same on every attempt, so a receiver can drop repeats |
//! | `webhook-timestamp` | the attempt's time, Unix seconds |
//! | `webhook-signature` | `v1,` + base64 of HMAC-SHA256(key, `"{webhook-id}.{webhook-timestamp}.{body}"`), when a secret is configured |
//! | `hook-attempt` | 1 on the first attempt, 2 on the first retry, ... |
//!
//! The key is the secret's bytes; a secret written `whsec_<base64>` (as Standard Webhooks
//! libraries generate them) is the base64-decoded rest. [`sign`] and [`verify`] implement it.
//!
//! Outcomes: 2xx delivered; 408, 429 and 5xx retryable, no sooner than the `Retry-After` the
//! server sent (seconds or an HTTP date); connection errors and the timeout retryable; any other
//! status (3xx, which is not followed, and the other 4xx) permanent. HTTPS verifies the server
//! against the system's trusted roots, plus a PEM file of extra roots (`ca_file`) if given.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use hmac::{KeyInit, Mac};
use hook_core::HookEvent;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::delivery::{Delivery, Sink};
use crate::error::SinkError;
use crate::template::Template;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// At most this many bytes of a response body are read, for the error text.
const MAX_RESPONSE_BYTES: usize = 2048;

/// A secret's key bytes, never shown in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// The key for `text`: `whsec_<base64>` decodes to its bytes; anything else is used as it
    /// is. Surrounding whitespace (a file's final newline) is ignored.
    pub fn from_text(text: &str) -> Result<Self, SinkError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(SinkError::Config("the secret is empty".into()));
        }
        match text.strip_prefix("whsec_") {
            Some(encoded) => base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map(Secret)
                .map_err(|e| SinkError::Config(format!("the whsec_ secret is not valid base64: {e}"))),
            None => Ok(Secret(text.as_bytes().to_vec())),
        }
    }

    /// The key bytes.
    pub fn key(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// The `webhook-signature` value for a message: `v1,` + base64(HMAC-SHA256(key,
/// `"{id}.{timestamp}.{body}"`)).
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC takes keys of any length, so this never fails; an empty signature would verify nothing.
    let Ok(mut mac) = <HmacSha256 as KeyInit>::new_from_slice(key) else { return String::new() };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

/// Checks a `webhook-signature` header (which may hold several space-separated signatures)
/// against the message, in constant time. A receiver should also refuse timestamps far from its
/// own clock (Standard Webhooks suggests five minutes), which this does not check.
pub fn verify(key: &[u8], id: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
    let expected = sign(key, id, timestamp, body);
    header.split(' ').any(|candidate| constant_time_eq(candidate.as_bytes(), expected.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Where and how to POST.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// The receiver, `http://` or `https://`.
    pub url: Uri,
    /// Signs each request when set.
    pub secret: Option<Secret>,
    /// Longest a request may take, body included.
    pub timeout: Duration,
    /// Extra headers.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The body as a JSON value whose strings are templates; the whole event when `None`.
    pub body: Option<BodyTemplate>,
    /// Extra trusted roots (PEM), for a receiver with a private CA.
    pub ca_file: Option<PathBuf>,
}

impl WebhookConfig {
    /// POST to `url` with no secret, 10 s timeout, the event as the body.
    pub fn new(url: Uri) -> Self {
        Self {
            url,
            secret: None,
            timeout: Duration::from_secs(10),
            headers: Vec::new(),
            body: None,
            ca_file: None,
        }
    }
}

/// A JSON body whose strings are [`Template`]s, filled per event.
#[derive(Debug, Clone, PartialEq)]
pub enum BodyTemplate {
    /// A string template.
    Text(Template),
    /// Kept as it is (numbers, booleans, null).
    Literal(Value),
    /// An array of templates.
    Array(Vec<BodyTemplate>),
    /// An object of templates (keys are kept as they are).
    Object(Vec<(String, BodyTemplate)>),
}

impl BodyTemplate {
    /// Parses every string of `value` as a template.
    pub fn from_value(value: &Value) -> Result<Self, crate::template::TemplateError> {
        Ok(match value {
            Value::String(s) => BodyTemplate::Text(Template::parse(s)?),
            Value::Array(items) => {
                BodyTemplate::Array(items.iter().map(Self::from_value).collect::<Result<_, _>>()?)
            }
            Value::Object(map) => BodyTemplate::Object(
                map.iter().map(|(k, v)| Ok((k.clone(), Self::from_value(v)?))).collect::<Result<_, _>>()?,
            ),
            other => BodyTemplate::Literal(other.clone()),
        })
    }

    /// The body for `event`.
    pub fn render(&self, event: &HookEvent) -> Value {
        match self {
            BodyTemplate::Text(t) => t.render_json(event),
            BodyTemplate::Literal(v) => v.clone(),
            BodyTemplate::Array(items) => Value::Array(items.iter().map(|t| t.render(event)).collect()),
            BodyTemplate::Object(fields) => {
                Value::Object(fields.iter().map(|(k, t)| (k.clone(), t.render(event))).collect())
            }
        }
    }
}

/// The `webhook` sink; see the module docs.
#[derive(Clone)]
pub struct WebhookSink {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for WebhookSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSink").field("url", &self.inner.config.url).finish_non_exhaustive()
    }
}

struct Inner {
    config: WebhookConfig,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    user_agent: HeaderValue,
}

impl WebhookSink {
    /// Builds the HTTP client (TLS roots read now: a bad `ca_file` fails here).
    pub fn new(config: WebhookConfig) -> Result<Self, SinkError> {
        let tls = tls_config(config.ca_file.as_deref())?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        let user_agent = HeaderValue::from_static(concat!("hook-events/", env!("CARGO_PKG_VERSION")));
        Ok(Self { inner: Arc::new(Inner { config, client, user_agent }) })
    }
}

/// rustls with the ring provider, trusting the system's roots plus those in `extra`.
fn tls_config(extra: Option<&Path>) -> Result<rustls::ClientConfig, SinkError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if let Some(path) = extra {
        let bad = |e: &dyn std::fmt::Display| SinkError::Config(format!("ca_file {}: {e}", path.display()));
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| bad(&e))?
            .collect::<Result<_, _>>()
            .map_err(|e| bad(&e))?;
        if certs.is_empty() {
            return Err(bad(&"no PEM certificate in it"));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| bad(&e))?;
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SinkError::Config(format!("tls: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

impl Sink for WebhookSink {
    fn kind(&self) -> &'static str {
        "webhook"
    }

    fn deliver(&self, event: Arc<HookEvent>) -> BoxFuture<'static, Delivery> {
        let inner = Arc::clone(&self.inner);
        async move { inner.post(&event).await }.boxed()
    }
}

impl Inner {
    async fn post(&self, event: &HookEvent) -> Delivery {
        let config = &self.config;
        let body = match &config.body {
            Some(template) => serde_json::to_vec(&template.render(event)),
            None => serde_json::to_vec(event),
        };
        let body = match body {
            Ok(body) => Bytes::from(body),
            Err(error) => return Delivery::permanent(format!("cannot encode the body: {error}")),
        };
        let id = event.id.to_string();
        let timestamp = OffsetDateTime::now_utc().unix_timestamp();
        let mut request = Request::builder().method(Method::POST).uri(config.url.clone());
        if let Some(headers) = request.headers_mut() {
            for (name, value) in &config.headers {
                headers.insert(name.clone(), value.clone());
            }
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            if !headers.contains_key(USER_AGENT) {
                headers.insert(USER_AGENT, self.user_agent.clone());
            }
            let text = |s: String| HeaderValue::try_from(s).unwrap_or_else(|_| HeaderValue::from_static(""));
            headers.insert("webhook-id", text(id.clone()));
            headers.insert("idempotency-key", text(id.clone()));
            headers.insert("webhook-timestamp", text(timestamp.to_string()));
            headers.insert("hook-attempt", text(event.retry_count.saturating_add(1).to_string()));
            if let Some(secret) = &config.secret {
                headers.insert("webhook-signature", text(sign(secret.key(), &id, timestamp, &body)));
            }
        }
        let request = match request.body(Full::new(body)) {
            Ok(request) => request,
            Err(error) => return Delivery::permanent(format!("cannot build the request: {error}")),
        };
        let started = Instant::now();
        let response = match self.client.request(request).await {
            Ok(response) => response,
            Err(error) => {
                return Delivery::retryable(format!("POST {}: {}", config.url, error_chain(&error)))
            }
        };
        let status = response.status();
        let retry_after =
            response.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
        let text = read_bounded(response.into_body()).await;
        let mut facts = Map::new();
        facts.insert("status".into(), Value::from(status.as_u16()));
        facts.insert("elapsed_ms".into(), Value::from(started.elapsed().as_millis() as u64));
        if let Some(after) = retry_after {
            facts.insert("retry_after_s".into(), Value::from(after.as_secs_f64()));
        }
        let error = || {
            let text = text.trim();
            if text.is_empty() {
                format!("HTTP {status}")
            } else {
                format!("HTTP {status}: {text}")
            }
        };
        match classify(status) {
            Class::Delivered => Delivery::Delivered { facts },
            Class::Retryable => Delivery::Retryable { error: error(), retry_after, facts },
            Class::Permanent => Delivery::Permanent { error: error(), facts },
        }
    }
}

/// The chain of an error's sources on one line ("client error (Connect): tcp connect error:
/// Connection refused").
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// What a status code means for the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// 2xx.
    Delivered,
    /// 408, 429, 5xx.
    Retryable,
    /// Everything else.
    Permanent,
}

/// Classifies a response status; see the module docs.
pub fn classify(status: StatusCode) -> Class {
    if status.is_success() {
        Class::Delivered
    } else if status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
    {
        Class::Retryable
    } else {
        Class::Permanent
    }
}

/// Parses `Retry-After`: whole seconds, or an HTTP date (`Wed, 21 Oct 2015 07:28:00 GMT`),
/// counted from now. A date in the past is zero.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let at = time::PrimitiveDateTime::parse(value, &format).ok()?.assume_utc();
    let delta = at - OffsetDateTime::now_utc();
    Some(Duration::try_from(delta).unwrap_or(Duration::ZERO))
}

async fn read_bounded(mut body: hyper::body::Incoming) -> String {
    let mut kept = Vec::new();
    while kept.len() < MAX_RESPONSE_BYTES {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    let room = MAX_RESPONSE_BYTES - kept.len();
                    kept.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            _ => break,
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes() {
        for (code, class) in [
            (200, Class::Delivered),
            (204, Class::Delivered),
            (301, Class::Permanent),
            (400, Class::Permanent),
            (404, Class::Permanent),
            (408, Class::Retryable),
            (429, Class::Retryable),
            (500, Class::Retryable),
            (503, Class::Retryable),
        ] {
            assert_eq!(classify(StatusCode::from_u16(code).unwrap()), class, "{code}");
        }
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO));
        let later = OffsetDateTime::now_utc() + time::Duration::seconds(90);
        let format = time::macros::format_description!(
            "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
        );
        let d = parse_retry_after(&later.format(&format).unwrap()).unwrap();
        assert!(d > Duration::from_secs(80) && d <= Duration::from_secs(90), "{d:?}");
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn secrets_and_signatures() {
        let raw = Secret::from_text("s3cret\n").unwrap();
        assert_eq!(raw.key(), b"s3cret");
        let encoded = Secret::from_text("whsec_czNjcmV0").unwrap();
        assert_eq!(encoded.key(), b"s3cret");
        assert!(Secret::from_text("whsec_***").is_err());
        assert!(Secret::from_text("  ").is_err());
        assert_eq!(format!("{raw:?}"), "Secret(..)");
        let sig = sign(b"s3cret", "id-1", 1_700_000_000, b"{}");
        assert!(sig.starts_with("v1,"));
        assert!(verify(b"s3cret", "id-1", 1_700_000_000, b"{}", &format!("v1,bogus {sig}")));
        assert!(!verify(b"s3cret", "id-1", 1_700_000_001, b"{}", &sig));
        assert!(!verify(b"other", "id-1", 1_700_000_000, b"{}", &sig));
    }
}
