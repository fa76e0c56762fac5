//! The routes file: TOML, read and checked once at start-up.
//!
//! ```toml
//! [sinks.slack]
//! type = "webhook"
//! url = "https://hooks.slack.com/services/T000/B000/XXXX"
//! timeout = "5s"
//! body = { text = "{source}/{action} in session {session_id}" }
//!
//! [sinks.bus]
//! type = "nats"
//! url = "nats://127.0.0.1:4222"
//! subject = "hooks.{source}.{action}"
//! create_stream = { name = "HOOKS", duplicate_window = "10m" }
//!
//! [[routes]]
//! source = "Stop"
//! action = "*"
//! sinks = ["slack", "bus"]
//! ```
//!
//! Every mistake found is reported with its line ([`RoutesError::Invalid`]), not only the
//! first: syntax errors, unknown keys, wrong types, unknown sink names, duplicate routes,
//! missing secrets, programs that do not exist. Secrets are never read from the file itself:
//! `secret_env` names an environment variable, `secret_file` a file (both resolved here, so a
//! missing secret fails the start, not the first delivery). Relative paths are relative to the
//! routes file's directory. The full reference is docs/routes.md.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hook_core::{OrderRule, SessionOrder, WILDCARD};
use hyper::header::{HeaderName, HeaderValue};
use hyper::Uri;
use serde::Deserialize;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

use crate::command::CommandConfig;
use crate::error::{Problem, RoutesError};
use crate::nats::{NatsAuth, NatsConfig, StreamSpec};
use crate::template::{check_subject, Template};
use crate::webhook::{BodyTemplate, Secret, WebhookConfig};

/// The default timeout of a sink, when the engine's handler timeout is longer.
pub const DEFAULT_SINK_TIMEOUT: Duration = Duration::from_secs(10);

/// What the checks need to know from outside the file.
pub struct LoadOptions<'a> {
    /// The engine's handler timeout: every sink's timeout must be shorter.
    pub handler_timeout: Duration,
    /// Reads an environment variable (secrets named by `*_env`, `PATH` for programs).
    pub env: &'a dyn Fn(&str) -> Option<String>,
}

impl std::fmt::Debug for LoadOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadOptions").field("handler_timeout", &self.handler_timeout).finish_non_exhaustive()
    }
}

/// A checked routes file: plain data, from which [`crate::Routes::build`] makes the sinks.
#[derive(Debug, Clone)]
pub struct RoutesFile {
    /// The sinks, by name.
    pub sinks: Vec<SinkSpec>,
    /// The routes, in the order of the file.
    pub routes: Vec<RouteSpec>,
    /// Things worth a warning that are not mistakes (a sink no route uses, a secret file others
    /// can read).
    pub warnings: Vec<Problem>,
    /// The top-level `order = "session"`: every event is attempted in session order unless its
    /// route says `order = "none"` (events no route matches too). Default false.
    pub order_all: bool,
}

/// One `[sinks.NAME]` table.
#[derive(Debug, Clone)]
pub struct SinkSpec {
    /// The name routes refer to; also the `sink` label of the metrics.
    pub name: String,
    /// Where it is defined.
    pub line: usize,
    /// What it does.
    pub kind: SinkKind,
}

/// A sink's settings by type.
#[derive(Debug, Clone)]
pub enum SinkKind {
    /// `type = "webhook"`.
    Webhook(WebhookConfig),
    /// `type = "command"`.
    Command(CommandConfig),
    /// `type = "nats"`.
    Nats(NatsConfig),
}

impl SinkKind {
    /// The sink's timeout.
    pub fn timeout(&self) -> Duration {
        match self {
            SinkKind::Webhook(c) => c.timeout,
            SinkKind::Command(c) => c.timeout,
            SinkKind::Nats(c) => c.timeout,
        }
    }
}

/// One `[[routes]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    /// The source, or `*`.
    pub source: String,
    /// The action, or `*`.
    pub action: String,
    /// Sink names, each defined in the file.
    pub sinks: Vec<String>,
    /// The route's `order`: `Some(true)` for `"session"`, `Some(false)` for `"none"`, `None`
    /// when it has none (the file's top-level `order` then decides).
    pub ordered: Option<bool>,
    /// Where it is defined.
    pub line: usize,
}

// ---------------------------------------------------------------------------------------------
// The raw shapes, as serde reads them (spans kept for the semantic checks).
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    url: Spanned<String>,
    secret_env: Option<Spanned<String>>,
    secret_file: Option<Spanned<String>>,
    timeout: Option<Spanned<RawDuration>>,
    #[serde(default)]
    headers: BTreeMap<String, Spanned<String>>,
    body: Option<Spanned<serde_json::Value>>,
    ca_file: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCommand {
    argv: Spanned<Vec<String>>,
    timeout: Option<Spanned<RawDuration>>,
    permanent_exit_codes: Option<Spanned<Vec<i64>>>,
    max_output: Option<Spanned<i64>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    pass_env: Vec<String>,
    cwd: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNats {
    url: Option<Spanned<String>>,
    subject: Spanned<String>,
    create_stream: Option<Spanned<RawStream>>,
    timeout: Option<Spanned<RawDuration>>,
    max_in_flight: Option<Spanned<i64>>,
    token_env: Option<Spanned<String>>,
    user: Option<Spanned<String>>,
    password_env: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStream {
    name: Spanned<String>,
    subjects: Option<Vec<String>>,
    duplicate_window: Option<Spanned<RawDuration>>,
    replicas: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    source: Spanned<String>,
    action: Spanned<String>,
    sinks: Spanned<Vec<Spanned<String>>>,
    order: Option<Spanned<String>>,
}

/// The values of `order` (a route's, or the file's top-level one).
const ORDER_VALUES: &str = "\"session\" or \"none\"";

/// Reads an `order` value: `Some(true)` for `"session"`, `Some(false)` for `"none"`, `None`
/// (reported) for anything else.
fn order_value(checker: &mut Checker<'_>, value: &Spanned<String>, what: &str) -> Option<bool> {
    match value.get_ref().as_str() {
        "session" => Some(true),
        "none" => Some(false),
        other => {
            checker.problem(value.span(), format!("{what}: unknown order {other:?} (one of {ORDER_VALUES})"));
            None
        }
    }
}

/// A duration: `"10s"`, `"250ms"`, `"2m"`, `"1h"`, or a number of seconds.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawDuration {
    Seconds(f64),
    Text(String),
}

/// Keys that would put a secret into the routes file, and what to write instead.
const SECRET_KEYS: &[(&str, &str)] =
    &[("secret", "secret_env or secret_file"), ("token", "token_env"), ("password", "password_env")];

const SINK_TYPES: &str = "webhook, command, nats";

/// Collects problems with their lines.
struct Checker<'t> {
    text: &'t str,
    problems: Vec<(usize, Problem)>,
    warnings: Vec<Problem>,
}

impl Checker<'_> {
    fn line(&self, offset: usize) -> usize {
        self.text.get(..offset.min(self.text.len())).map_or(1, |t| t.matches('\n').count() + 1)
    }

    fn problem(&mut self, span: Range<usize>, message: impl Into<String>) {
        let line = self.line(span.start);
        self.problems.push((span.start, Problem { line, message: message.into() }));
    }

    fn warn(&mut self, span: Range<usize>, message: impl Into<String>) {
        let line = self.line(span.start);
        self.warnings.push(Problem { line, message: message.into() });
    }

    fn serde_error(&mut self, fallback: Range<usize>, error: &toml::de::Error) {
        let span = error.span().unwrap_or(fallback);
        let message = error.message().trim().replace('\n', " ");
        self.problem(span, message);
    }
}

impl RoutesFile {
    /// Reads and checks the routes file at `path`.
    pub fn load(path: &Path, options: &LoadOptions<'_>) -> Result<Self, RoutesError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| RoutesError::Read { path: path.to_owned(), source })?;
        let base = path.parent().map(Path::to_owned).unwrap_or_default();
        Self::parse(&text, path, &base, options)
    }

    /// Checks `text`; `path` is only used in messages, `base_dir` anchors relative paths.
    pub fn parse(
        text: &str,
        path: &Path,
        base_dir: &Path,
        options: &LoadOptions<'_>,
    ) -> Result<Self, RoutesError> {
        let mut checker = Checker { text, problems: Vec::new(), warnings: Vec::new() };
        let (root, syntax) = DeTable::parse_recoverable(text);
        for error in &syntax {
            checker.serde_error(0..0, error);
        }
        let mut sinks = Vec::new();
        let mut routes = Vec::new();
        let mut order_all = false;
        if syntax.is_empty() {
            let root = root.into_inner();
            let mut sinks_value = None;
            let mut routes_value = None;
            for (key, value) in root {
                match key.get_ref().as_ref() {
                    "sinks" => sinks_value = Some(value),
                    "routes" => routes_value = Some(value),
                    "order" => {
                        let span = value.span();
                        if let Some(order) = deserialize::<Spanned<String>>(&mut checker, value, span) {
                            order_all = order_value(&mut checker, &order, "the top-level order") == Some(true);
                        }
                    }
                    other => checker.problem(
                        key.span(),
                        format!(
                            "unknown key {other:?} at the top level (expected order, [sinks.NAME] tables and [[routes]] entries)"
                        ),
                    ),
                }
            }
            let context = Context { options, base_dir };
            let mut defined = Vec::new();
            if let Some(value) = sinks_value {
                sinks = check_sinks(&mut checker, &context, value, &mut defined);
            }
            match routes_value {
                Some(value) => routes = check_routes(&mut checker, &defined, value),
                None => checker.problem(0..0, "no [[routes]]: add at least one route naming its sinks"),
            }
            for sink in &sinks {
                if !routes.iter().any(|r: &RouteSpec| r.sinks.contains(&sink.name)) {
                    checker.warnings.push(Problem {
                        line: sink.line,
                        message: format!("sink {:?} is used by no route", sink.name),
                    });
                }
            }
        }
        if !checker.problems.is_empty() {
            let mut problems = checker.problems;
            problems.sort_by_key(|(offset, _)| *offset);
            return Err(RoutesError::Invalid {
                path: path.to_owned(),
                problems: problems.into_iter().map(|(_, p)| p).collect(),
            });
        }
        Ok(RoutesFile { sinks, routes, warnings: checker.warnings, order_all })
    }
}

impl RoutesFile {
    /// Which events are attempted in session order, for the store's claim: one rule per route
    /// (its own `order`, else the top-level one), and with a top-level `order = "session"` and
    /// no `(*, *)` route, a `(*, *)` rule for the events no route matches.
    pub fn session_order(&self) -> SessionOrder {
        let mut rules: Vec<OrderRule> = self
            .routes
            .iter()
            .map(|r| OrderRule {
                source: r.source.clone(),
                action: r.action.clone(),
                ordered: r.ordered.unwrap_or(self.order_all),
            })
            .collect();
        if self.order_all && !rules.iter().any(|r| r.source == WILDCARD && r.action == WILDCARD) {
            rules.push(OrderRule { source: WILDCARD.into(), action: WILDCARD.into(), ordered: true });
        }
        SessionOrder { rules }
    }
}

struct Context<'a> {
    options: &'a LoadOptions<'a>,
    base_dir: &'a Path,
}

impl Context<'_> {
    fn path(&self, text: &str) -> PathBuf {
        let path = Path::new(text);
        if path.is_absolute() {
            path.to_owned()
        } else {
            self.base_dir.join(path)
        }
    }
}

/// Checks every sink; `defined` gets every name, valid or not, so routes naming a sink with a
/// mistake of its own are not reported again.
fn check_sinks(
    checker: &mut Checker<'_>,
    context: &Context<'_>,
    value: Spanned<DeValue<'_>>,
    defined: &mut Vec<String>,
) -> Vec<SinkSpec> {
    let span = value.span();
    let DeValue::Table(table) = value.into_inner() else {
        checker.problem(span, "`sinks` must be a table: write [sinks.NAME] with a type");
        return Vec::new();
    };
    let mut sinks = Vec::new();
    for (name, value) in table {
        let name_span = name.span();
        let name = name.into_inner().into_owned();
        defined.push(name.clone());
        let line = checker.line(name_span.start);
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            checker.problem(
                name_span.clone(),
                format!("sink name {name:?} may hold only letters, digits, '_' and '-'"),
            );
        }
        let table_span = value.span();
        let DeValue::Table(mut table) = value.into_inner() else {
            checker.problem(table_span, format!("sink {name:?} must be a table ([sinks.{name}])"));
            continue;
        };
        for (key, replacement) in SECRET_KEYS {
            if let Some((k, _)) = table.get_key_value(*key) {
                checker.problem(
                    k.span(),
                    format!(
                        "sink {name:?}: `{key}` would put a secret in the routes file; use {replacement} instead"
                    ),
                );
            }
        }
        let Some((type_key, kind)) = table.remove_entry("type") else {
            checker.problem(name_span, format!("sink {name:?} has no `type` (one of {SINK_TYPES})"));
            continue;
        };
        let kind_span = kind.span();
        let kind_name = kind.get_ref().as_str().map(str::to_owned);
        drop(type_key);
        for (key, _) in SECRET_KEYS {
            table.remove(*key);
        }
        let rest = Spanned::new(table_span.clone(), DeValue::Table(table));
        let spec = match kind_name.as_deref() {
            Some("webhook") => deserialize::<RawWebhook>(checker, rest, table_span.clone())
                .and_then(|raw| check_webhook(checker, context, &name, raw).map(SinkKind::Webhook)),
            Some("command") => deserialize::<RawCommand>(checker, rest, table_span.clone())
                .and_then(|raw| check_command(checker, context, &name, raw).map(SinkKind::Command)),
            Some("nats") => deserialize::<RawNats>(checker, rest, table_span.clone())
                .and_then(|raw| check_nats(checker, context, &name, raw).map(SinkKind::Nats)),
            Some(other) => {
                checker.problem(
                    kind_span,
                    format!("sink {name:?}: unknown type {other:?} (one of {SINK_TYPES})"),
                );
                None
            }
            None => {
                checker.problem(
                    kind_span,
                    format!("sink {name:?}: `type` must be a string (one of {SINK_TYPES})"),
                );
                None
            }
        };
        if let Some(kind) = spec {
            let timeout = kind.timeout();
            if timeout >= context.options.handler_timeout {
                checker.problem(
                    name_span,
                    format!(
                        "sink {name:?}: its timeout ({}) must be shorter than the handler timeout ({}, --handler-timeout / HOOK_HANDLER_TIMEOUT)",
                        secs(timeout),
                        secs(context.options.handler_timeout)
                    ),
                );
            }
            sinks.push(SinkSpec { name, line, kind });
        }
    }
    sinks
}

fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

fn deserialize<'de, T: Deserialize<'de>>(
    checker: &mut Checker<'_>,
    value: Spanned<DeValue<'de>>,
    span: Range<usize>,
) -> Option<T> {
    match T::deserialize(ValueDeserializer::from(value)) {
        Ok(raw) => Some(raw),
        Err(error) => {
            checker.serde_error(span, &error);
            None
        }
    }
}

fn duration(
    checker: &mut Checker<'_>,
    value: Option<Spanned<RawDuration>>,
    default: Duration,
) -> Option<Duration> {
    let Some(value) = value else { return Some(default) };
    let span = value.span();
    let parsed = match value.into_inner() {
        RawDuration::Seconds(s) => {
            Duration::try_from_secs_f64(s).map_err(|_| format!("{s} is not a duration"))
        }
        RawDuration::Text(text) => parse_duration(&text),
    };
    match parsed {
        Ok(d) if !d.is_zero() => Some(d),
        Ok(_) => {
            checker.problem(span, "a timeout must be greater than zero");
            None
        }
        Err(message) => {
            checker.problem(span, message);
            None
        }
    }
}

/// Parses `"250ms"`, `"10s"`, `"2m"`, `"1h"`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = text.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (text, 1.0)
    };
    let bad = || format!("{text:?} is not a duration (write e.g. \"250ms\", \"10s\", \"2m\")");
    let value: f64 = number.trim().parse().map_err(|_| bad())?;
    if !value.is_finite() || value < 0.0 {
        return Err(bad());
    }
    Duration::try_from_secs_f64(value * scale).map_err(|_| bad())
}

fn default_timeout(options: &LoadOptions<'_>) -> Duration {
    if options.handler_timeout > DEFAULT_SINK_TIMEOUT {
        DEFAULT_SINK_TIMEOUT
    } else {
        options.handler_timeout.mul_f64(0.8)
    }
}

/// Reads the secret named by `env` or `file` (exactly one, when `required` or either is given).
fn secret(
    checker: &mut Checker<'_>,
    context: &Context<'_>,
    sink: &str,
    env: Option<Spanned<String>>,
    file: Option<Spanned<String>>,
    what: &str,
) -> Option<Option<String>> {
    match (env, file) {
        (None, None) => Some(None),
        (Some(env), Some(_)) => {
            checker.problem(env.span(), format!("sink {sink:?}: give {what}_env or {what}_file, not both"));
            None
        }
        (Some(env), None) => {
            let name = env.get_ref();
            match (context.options.env)(name).filter(|v| !v.trim().is_empty()) {
                Some(value) => Some(Some(value)),
                None => {
                    checker.problem(
                        env.span(),
                        format!(
                            "sink {sink:?}: the environment variable {name} ({what}_env) is not set or empty"
                        ),
                    );
                    None
                }
            }
        }
        (None, Some(file)) => {
            let path = context.path(file.get_ref());
            match std::fs::read_to_string(&path) {
                Ok(value) if !value.trim().is_empty() => {
                    use std::os::unix::fs::PermissionsExt as _;
                    if let Ok(meta) = std::fs::metadata(&path) {
                        if meta.permissions().mode() & 0o077 != 0 {
                            checker.warn(
                                file.span(),
                                format!(
                                    "sink {sink:?}: the secret file {} can be read by others (chmod 600 it)",
                                    path.display()
                                ),
                            );
                        }
                    }
                    Some(Some(value))
                }
                Ok(_) => {
                    checker.problem(
                        file.span(),
                        format!("sink {sink:?}: the secret file {} is empty", path.display()),
                    );
                    None
                }
                Err(error) => {
                    checker.problem(
                        file.span(),
                        format!("sink {sink:?}: cannot read the secret file {}: {error}", path.display()),
                    );
                    None
                }
            }
        }
    }
}

fn readable_file(
    checker: &mut Checker<'_>,
    context: &Context<'_>,
    sink: &str,
    value: Option<Spanned<String>>,
) -> Option<Option<PathBuf>> {
    let Some(value) = value else { return Some(None) };
    let path = context.path(value.get_ref());
    match std::fs::File::open(&path) {
        Ok(_) => Some(Some(path)),
        Err(error) => {
            checker.problem(value.span(), format!("sink {sink:?}: cannot read {}: {error}", path.display()));
            None
        }
    }
}

fn check_webhook(
    checker: &mut Checker<'_>,
    context: &Context<'_>,
    name: &str,
    raw: RawWebhook,
) -> Option<WebhookConfig> {
    let mut ok = true;
    let url = match raw.url.get_ref().parse::<Uri>() {
        Ok(url) if matches!(url.scheme_str(), Some("http" | "https")) && url.host().is_some() => Some(url),
        Ok(_) => {
            checker.problem(
                raw.url.span(),
                format!(
                    "sink {name:?}: url {:?} must be http://HOST/... or https://HOST/...",
                    raw.url.get_ref()
                ),
            );
            None
        }
        Err(error) => {
            checker.problem(
                raw.url.span(),
                format!("sink {name:?}: url {:?} is not a URL: {error}", raw.url.get_ref()),
            );
            None
        }
    };
    let secret_span = raw.secret_env.as_ref().or(raw.secret_file.as_ref()).map(Spanned::span);
    let secret = match secret(checker, context, name, raw.secret_env, raw.secret_file, "secret") {
        Some(Some(text)) => match Secret::from_text(&text) {
            Ok(secret) => Some(Some(secret)),
            Err(error) => {
                checker.problem(secret_span.unwrap_or(0..0), format!("sink {name:?}: {error}"));
                None
            }
        },
        Some(None) => Some(None),
        None => None,
    };
    let timeout = duration(checker, raw.timeout, default_timeout(context.options));
    let mut headers = Vec::new();
    for (key, value) in raw.headers {
        let span = value.span();
        match (HeaderName::try_from(key.as_str()), HeaderValue::try_from(value.into_inner())) {
            (Ok(k), Ok(v)) => {
                let reserved = [
                    "content-type",
                    "webhook-id",
                    "webhook-timestamp",
                    "webhook-signature",
                    "idempotency-key",
                    "hook-attempt",
                ];
                if reserved.contains(&k.as_str()) {
                    checker.problem(span, format!("sink {name:?}: header {key:?} is set by the sink itself"));
                    ok = false;
                } else {
                    headers.push((k, v));
                }
            }
            _ => {
                checker.problem(span, format!("sink {name:?}: header {key:?} is not a valid HTTP header"));
                ok = false;
            }
        }
    }
    let body = match raw.body {
        None => Some(None),
        Some(body) => match BodyTemplate::from_value(body.get_ref()) {
            Ok(template) => Some(Some(template)),
            Err(error) => {
                checker.problem(body.span(), format!("sink {name:?}: body: {error}"));
                None
            }
        },
    };
    let ca_file = readable_file(checker, context, name, raw.ca_file);
    let config = WebhookConfig {
        url: url?,
        secret: secret?,
        timeout: timeout?,
        headers,
        body: body?,
        ca_file: ca_file?,
    };
    ok.then_some(config)
}

fn check_command(
    checker: &mut Checker<'_>,
    context: &Context<'_>,
    name: &str,
    raw: RawCommand,
) -> Option<CommandConfig> {
    let mut ok = true;
    let argv_span = raw.argv.span();
    let argv = raw.argv.into_inner();
    match argv.first() {
        None => {
            checker.problem(
                argv_span.clone(),
                format!("sink {name:?}: argv is empty; give the program and its arguments"),
            );
            ok = false;
        }
        Some(program) => {
            if let Err(message) = find_program(program, context) {
                checker.problem(argv_span.clone(), format!("sink {name:?}: {message}"));
                ok = false;
            }
        }
    }
    let timeout = duration(checker, raw.timeout, default_timeout(context.options));
    let mut config = CommandConfig::new(argv);
    if let Some(codes) = raw.permanent_exit_codes {
        let span = codes.span();
        let codes = codes.into_inner();
        if codes.iter().any(|&c| !(1..=255).contains(&c)) {
            checker.problem(span, format!("sink {name:?}: permanent_exit_codes must be within 1-255"));
            ok = false;
        }
        config.permanent_exit_codes = codes.into_iter().filter_map(|c| i32::try_from(c).ok()).collect();
    }
    if let Some(max) = raw.max_output {
        match usize::try_from(*max.get_ref()) {
            Ok(n) if n <= 1 << 20 => config.max_output = n,
            _ => {
                checker
                    .problem(max.span(), format!("sink {name:?}: max_output must be within 0-1048576 bytes"));
                ok = false;
            }
        }
    }
    config.env = raw.env.into_iter().collect();
    config.pass_env = raw.pass_env;
    if let Some(cwd) = raw.cwd {
        let path = context.path(cwd.get_ref());
        if path.is_dir() {
            config.cwd = Some(path);
        } else {
            checker.problem(cwd.span(), format!("sink {name:?}: cwd {} is not a directory", path.display()));
            ok = false;
        }
    }
    config.timeout = timeout?;
    ok.then_some(config)
}

/// Finds `program` as `execve` would: a path with a `/`, else the first match in `PATH`.
fn find_program(program: &str, context: &Context<'_>) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt as _;
    let executable = |path: &Path| {
        std::fs::metadata(path).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
    };
    if program.contains('/') {
        let path = context.path(program);
        return if executable(&path) {
            Ok(path)
        } else {
            Err(format!("the program {} does not exist or is not executable", path.display()))
        };
    }
    let search = (context.options.env)("PATH").unwrap_or_default();
    search
        .split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(program))
        .find(|path| executable(path))
        .ok_or_else(|| format!("the program {program:?} is not found in PATH"))
}

fn check_nats(
    checker: &mut Checker<'_>,
    context: &Context<'_>,
    name: &str,
    raw: RawNats,
) -> Option<NatsConfig> {
    let mut ok = true;
    let url = raw.url.map_or_else(|| "nats://127.0.0.1:4222".to_owned(), Spanned::into_inner);
    let parsed = Template::parse(raw.subject.get_ref())
        .map_err(|e| e.0)
        .and_then(|t| check_subject(&t).map(|()| t).map_err(|e| e.0));
    let subject = match parsed {
        Ok(t) => Some(t),
        Err(message) => {
            checker.problem(raw.subject.span(), format!("sink {name:?}: subject: {message}"));
            None
        }
    };
    let timeout = duration(checker, raw.timeout, default_timeout(context.options));
    let mut max_in_flight = 1024;
    if let Some(max) = raw.max_in_flight {
        match usize::try_from(*max.get_ref()) {
            Ok(n) if (1..=1_000_000).contains(&n) => max_in_flight = n,
            _ => {
                checker.problem(max.span(), format!("sink {name:?}: max_in_flight must be within 1-1000000"));
                ok = false;
            }
        }
    }
    let mut create_stream = None;
    if let Some(stream) = raw.create_stream {
        let stream = stream.into_inner();
        let stream_name = stream.name.get_ref().clone();
        let bad_char = |c: char| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\');
        if stream_name.is_empty() || stream_name.chars().any(bad_char) {
            checker.problem(
                stream.name.span(),
                format!(
                    "sink {name:?}: stream name {stream_name:?} may not be empty or hold spaces, '.', '*', '>', '/' or '\\'"
                ),
            );
            ok = false;
        }
        let window = duration(checker, stream.duplicate_window, Duration::from_secs(120));
        let replicas = match stream.replicas {
            None => Some(1),
            Some(r) => match usize::try_from(*r.get_ref()) {
                Ok(n) if (1..=5).contains(&n) => Some(n),
                _ => {
                    checker.problem(r.span(), format!("sink {name:?}: replicas must be within 1-5"));
                    None
                }
            },
        };
        let subjects =
            stream.subjects.unwrap_or_else(|| subject.iter().map(Template::subject_filter).collect());
        match (window, replicas) {
            (Some(duplicate_window), Some(replicas)) => {
                create_stream = Some(StreamSpec { name: stream_name, subjects, duplicate_window, replicas });
            }
            _ => ok = false,
        }
    }
    let token_span = raw.token_env.as_ref().map(Spanned::span);
    let token = secret(checker, context, name, raw.token_env, None, "token");
    let password = secret(checker, context, name, raw.password_env, None, "password");
    let auth = match (token, raw.user, password) {
        (Some(None), None, Some(None)) => Some(NatsAuth::None),
        (Some(Some(token)), None, Some(None)) => Some(NatsAuth::Token(token.trim().to_owned())),
        (Some(None), Some(user), Some(Some(password))) => {
            Some(NatsAuth::UserPassword(user.into_inner(), password.trim().to_owned()))
        }
        (Some(None), Some(user), Some(None)) => {
            checker.problem(user.span(), format!("sink {name:?}: `user` needs password_env"));
            None
        }
        (Some(_), _, Some(_)) => {
            checker.problem(
                token_span.unwrap_or(0..0),
                format!("sink {name:?}: give token_env, or user with password_env, not both"),
            );
            None
        }
        // A secret that could not be read: already reported.
        _ => None,
    };
    let ca_file = readable_file(checker, context, name, raw.ca_file);
    let config = NatsConfig {
        url,
        subject: subject?,
        create_stream,
        timeout: timeout?,
        max_in_flight,
        auth: auth?,
        ca_file: ca_file?,
    };
    ok.then_some(config)
}

fn check_routes(
    checker: &mut Checker<'_>,
    defined: &[String],
    value: Spanned<DeValue<'_>>,
) -> Vec<RouteSpec> {
    let span = value.span();
    let DeValue::Array(items) = value.into_inner() else {
        checker.problem(span, "`routes` must be an array of tables: write [[routes]] for each route");
        return Vec::new();
    };
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    let mut routes = Vec::new();
    for item in items {
        let span = item.span();
        let Some(raw) = deserialize::<RawRoute>(checker, item, span.clone()) else { continue };
        let line = checker.line(span.start);
        let source = raw.source.get_ref().clone();
        let action = raw.action.get_ref().clone();
        let mut ok = true;
        if source.is_empty() || action.is_empty() {
            checker.problem(span.clone(), "a route's source and action may not be empty (use \"*\" for any)");
            ok = false;
        }
        if source == WILDCARD && action != WILDCARD {
            checker.problem(
                raw.action.span(),
                format!("route (*, {action:?}): a concrete action needs a concrete source; routes match exact, then (source, *), then (*, *)"),
            );
            ok = false;
        }
        if let Some(first) = seen.get(&(source.clone(), action.clone())) {
            checker.problem(
                span.clone(),
                format!("route ({source:?}, {action:?}) is defined twice (first on line {first})"),
            );
            ok = false;
        }
        seen.insert((source.clone(), action.clone()), line);
        let ordered = match &raw.order {
            Some(order) => {
                let ordered = order_value(checker, order, &format!("route ({source:?}, {action:?})"));
                ok &= ordered.is_some();
                ordered
            }
            None => None,
        };
        let names_span = raw.sinks.span();
        let names = raw.sinks.into_inner();
        if names.is_empty() {
            checker.problem(names_span, format!("route ({source:?}, {action:?}) names no sink"));
            ok = false;
        }
        let mut route_sinks: Vec<String> = Vec::new();
        for sink in names {
            let sink_name = sink.get_ref().clone();
            if !defined.contains(&sink_name) {
                let hint = if defined.is_empty() {
                    "no sink is defined".to_owned()
                } else {
                    format!("defined: {}", defined.join(", "))
                };
                checker.problem(
                    sink.span(),
                    format!("route ({source:?}, {action:?}): unknown sink {sink_name:?} ({hint})"),
                );
                ok = false;
            } else if route_sinks.contains(&sink_name) {
                checker.problem(
                    sink.span(),
                    format!("route ({source:?}, {action:?}) names sink {sink_name:?} twice"),
                );
                ok = false;
            } else {
                route_sinks.push(sink_name);
            }
        }
        if ok {
            routes.push(RouteSpec { source, action, sinks: route_sinks, ordered, line });
        }
    }
    routes
}
