//! Connection settings: parsing, the original service's variables, and redaction for logs.

use std::time::Duration;

use tokio_postgres::config::Host;
use tokio_postgres::Config;

use crate::error::StoreError;

/// The original service's connection variables (`POSTGRES_*`, `DB_PASSWORD`), with its defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedSettings {
    /// `POSTGRES_HOST`, default `localhost`.
    pub host: String,
    /// `POSTGRES_PORT`, default 5436.
    pub port: u16,
    /// `POSTGRES_DB`, default `omninode_bridge`.
    pub database: String,
    /// `POSTGRES_USER`, default `postgres`.
    pub user: String,
    /// `DB_PASSWORD` or `POSTGRES_PASSWORD`; no default.
    pub password: Option<String>,
}

impl Default for SeedSettings {
    fn default() -> Self {
        Self {
            host: "localhost".into(),
            port: 5436,
            database: "omninode_bridge".into(),
            user: "postgres".into(),
            password: None,
        }
    }
}

impl SeedSettings {
    /// The connection configuration these settings describe.
    pub fn to_config(&self) -> Config {
        let mut config = Config::new();
        config.host(&self.host).port(self.port).dbname(&self.database).user(&self.user);
        if let Some(password) = &self.password {
            config.password(password);
        }
        config
    }
}

/// The database a program was pointed at, as its flags and environment said. Reading them is the
/// binary's job; [`resolve`](Self::resolve) decides, the same way for every binary: `DATABASE_URL`
/// first, else the original service's variables with its defaults when any of them is set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatabaseArgs {
    /// `DATABASE_URL`.
    pub url: Option<String>,
    /// `POSTGRES_HOST`.
    pub host: Option<String>,
    /// `POSTGRES_PORT`.
    pub port: Option<u16>,
    /// `POSTGRES_DB`.
    pub database: Option<String>,
    /// `POSTGRES_USER`.
    pub user: Option<String>,
    /// `DB_PASSWORD`, else `POSTGRES_PASSWORD` (empty values count as unset).
    pub password: Option<String>,
}

impl DatabaseArgs {
    /// The connection settings: `url` when set; else [`SeedSettings`] filled from the other
    /// fields when any of them is set; else `None` (nothing configured; the caller decides
    /// whether that means the embedded cluster or an error).
    ///
    /// This ignores libpq's `PG*` variables and password file; the binaries use
    /// [`resolve_with`](Self::resolve_with), which applies them.
    pub fn resolve(&self) -> Result<Option<Config>, StoreError> {
        Ok(self.resolve_with(&crate::LibpqEnv::default())?.map(|resolved| resolved.config))
    }
}

/// Parses a `postgres://` URL or a `key=value` connection string. The error never repeats the
/// input, which may hold a password.
///
/// A URL whose user name or password holds an unescaped `@` is refused even when it parses (it
/// would name a host such as `ss@db`), with a hint to percent-encode it; other mistakes get a
/// message saying what is wrong (see [`url_problem`]).
pub fn parse_database_url(url: &str) -> Result<Config, StoreError> {
    let invalid =
        |what: String| StoreError::Config(format!("DATABASE_URL is not a valid connection string: {what}"));
    if let Some(problem) = url_problem(url, None) {
        return Err(invalid(problem));
    }
    url.parse::<Config>()
        .map_err(|e| invalid(url_problem(url, Some(&e)).unwrap_or_else(|| parse_error_text(&e))))
}

/// What is wrong with a connection string, in words a person can act on, without repeating any
/// part of it that may be secret. With `error` (tokio-postgres's parse error), always `Some`
/// when the mistake is recognised; without, only the mistakes tokio-postgres does not catch.
pub fn url_problem(url: &str, error: Option<&tokio_postgres::Error>) -> Option<String> {
    let url = url.trim();
    let scheme_end = url.find("://");
    if let Some(rest) = url.strip_prefix("postgres://").or_else(|| url.strip_prefix("postgresql://")) {
        // tokio-postgres (like libpq) ends the credentials at the first `@`; the host is what
        // follows the last `@` before the path or query.
        let authority_end = rest.rfind('@').map_or(0, |at| at + 1);
        let authority = &rest[..authority_end];
        if authority.matches('@').count() > 1 {
            return Some(
                "it has more than one @ before the host: percent-encode @ in the user name or \
                 password as %40 (and : / ? # as %3A %2F %3F %23)"
                    .into(),
            );
        }
        let error = error?;
        let text = parse_error_text(error);
        if text.contains("option `port`") {
            return Some(
                "the port is not a number (if the password holds : / ? or #, percent-encode them \
                 as %3A %2F %3F %23)"
                    .into(),
            );
        }
        if text.contains("option `sslmode`") {
            return Some(
                "sslmode must be disable, prefer or require (require verifies the server's \
                 certificate, as libpq's verify-full does)"
                    .into(),
            );
        }
        if text.contains("invalid utf-8") {
            return Some("a percent-encoded part is not UTF-8 text".into());
        }
        return Some(text);
    }
    if let Some(end) = scheme_end {
        let scheme = &url[..end];
        if !scheme.is_empty()
            && scheme.len() <= 30
            && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.:".contains(c))
        {
            return Some(format!("it must start with postgres:// or postgresql://, not {scheme}://"));
        }
        return Some("it must start with postgres:// or postgresql://".into());
    }
    let error = error?;
    let text = parse_error_text(error);
    if text.contains("option `sslmode`") {
        return Some(
            "sslmode must be disable, prefer or require (require verifies the server's certificate, \
             as libpq's verify-full does)"
                .into(),
        );
    }
    if text.starts_with("unknown option") || text.contains("option `") {
        return Some(text);
    }
    Some(format!(
        "it is neither a postgres://user@host:port/database URL nor key=value pairs \
         (host=... dbname=...): {text}"
    ))
}

/// tokio-postgres's parse error with its cause ("invalid value for option `port`"), which it
/// keeps as the error's source.
fn parse_error_text(error: &tokio_postgres::Error) -> String {
    match std::error::Error::source(error) {
        Some(cause) => cause.to_string(),
        None => error.to_string(),
    }
}

/// Fills in what a long-running service needs when the user left it unset: a connect timeout,
/// an application name visible in `pg_stat_activity`, and the TCP settings of
/// [`apply_network_defaults`].
pub fn with_service_defaults(mut config: Config, application_name: &str) -> Config {
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    if config.get_application_name().is_none() {
        config.application_name(application_name);
    }
    apply_network_defaults(&mut config);
    config
}

/// Idle time before the first TCP keepalive probe, unless the connection string sets
/// `keepalives_idle`.
pub const KEEPALIVES_IDLE: Duration = Duration::from_secs(10);
/// Time between keepalive probes, unless the connection string sets `keepalives_interval`.
pub const KEEPALIVES_INTERVAL: Duration = Duration::from_secs(5);
/// Unanswered probes before the kernel drops the connection, unless the connection string sets
/// `keepalives_retries`.
pub const KEEPALIVES_RETRIES: u32 = 3;
/// How long sent data may stay unacknowledged before the kernel drops the connection, unless
/// the connection string sets `tcp_user_timeout`.
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(20);

/// tokio-postgres's own keepalive idle time, which stands for "not set" (see
/// [`apply_network_defaults`]).
const LIBRARY_KEEPALIVES_IDLE: Duration = Duration::from_secs(2 * 60 * 60);

/// Sets the TCP settings that let the kernel notice a dead connection in seconds rather than
/// the 2 hours (idle) or ~15 minutes (unacknowledged data) of its defaults, each only where the
/// connection string did not set it: keepalive probes after [`KEEPALIVES_IDLE`] of silence,
/// every [`KEEPALIVES_INTERVAL`], [`KEEPALIVES_RETRIES`] of them (a quiet dead connection is
/// dropped after about 20 s, since the user timeout also bounds unanswered probes), and
/// [`TCP_USER_TIMEOUT`] for data sent and never acknowledged.
///
/// `keepalives=0` in the connection string is kept (no keepalives). Zero values of the other
/// parameters are ignored by the parser, and a `keepalives_idle` of exactly 7200 (the driver's
/// own default) is taken as unset. Unix-socket connections ignore all of this. PgStore applies
/// it to every connection it opens; calls on a connection are bounded besides by
/// [`StoreOptions::call_timeout`](crate::StoreOptions::call_timeout), which also catches a peer
/// that acknowledges but never answers.
pub fn apply_network_defaults(config: &mut Config) {
    if config.get_keepalives_idle() == LIBRARY_KEEPALIVES_IDLE {
        config.keepalives_idle(KEEPALIVES_IDLE);
    }
    if config.get_keepalives_interval().is_none() {
        config.keepalives_interval(KEEPALIVES_INTERVAL);
    }
    if config.get_keepalives_retries().is_none() {
        config.keepalives_retries(KEEPALIVES_RETRIES);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
}

/// The connection string without its password, for logs and error messages:
/// `postgresql://user@host:port/dbname`.
///
/// ```
/// let config = hook_store::parse_database_url("postgres://app:s3cret@db.internal:5433/events").unwrap();
/// let shown = hook_store::redacted(&config);
/// assert_eq!(shown, "postgresql://app@db.internal:5433/events");
/// assert!(!shown.contains("s3cret"));
/// ```
pub fn redacted(config: &Config) -> String {
    let user = config.get_user().unwrap_or("");
    let db = config.get_dbname().unwrap_or("");
    let ports = config.get_ports();
    let mut tcp = Vec::new();
    let mut sockets = Vec::new();
    for (i, host) in config.get_hosts().iter().enumerate() {
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        match host {
            Host::Tcp(name) => tcp.push(format!("{name}:{port}")),
            Host::Unix(path) => sockets.push(format!("host={}&port={port}", path.display())),
        }
    }
    let at = if user.is_empty() { String::new() } else { format!("{user}@") };
    match sockets.first() {
        Some(socket) if tcp.is_empty() => format!("postgresql://{at}/{db}?{socket}"),
        _ => format!("postgresql://{at}{}/{db}", tcp.join(",")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_drops_passwords() {
        for (input, expected) in [
            ("postgres://u:pw@h:1/d", "postgresql://u@h:1/d"),
            ("host=h port=2 user=u password=pw dbname=d", "postgresql://u@h:2/d"),
            (
                "host=/run/pg port=5432 user=postgres dbname=x",
                "postgresql://postgres@/x?host=/run/pg&port=5432",
            ),
        ] {
            let shown = redacted(&parse_database_url(input).unwrap());
            assert_eq!(shown, expected);
            assert!(!shown.contains("pw"));
        }
    }

    #[test]
    fn bad_url_error_hides_input() {
        let err = parse_database_url("postgres://u:topsecret@h:notaport/d").unwrap_err().to_string();
        assert!(err.contains("DATABASE_URL"), "{err}");
        assert!(!err.contains("topsecret"), "{err}");
    }

    #[test]
    fn url_mistakes_say_what_to_fix_and_hide_the_password() {
        for (url, expected) in [
            ("postgres://app:zq@xv@db/events", "percent-encode @ in the user name or password as %40"),
            ("postgres://app:zq@xv:w0rd@db:5432/events", "percent-encode @"),
            ("postgres://app:zq:xv@db:notaport/events", "the port is not a number"),
            ("postgres://app@db/events?sslmode=verify-full", "sslmode must be disable, prefer or require"),
            ("mysql://app:zqxv@db/events", "must start with postgres:// or postgresql://, not mysql://"),
            ("postgresql+psycopg2://app@db/events", "not postgresql+psycopg2://"),
            ("db.internal:5432/events", "neither a postgres://user@host:port/database URL nor key=value"),
            ("host=db sslmode=maybe", "sslmode must be"),
            ("host=db colour=blue", "unknown option `colour`"),
        ] {
            let error = parse_database_url(url).unwrap_err().to_string();
            assert!(
                error.starts_with("invalid database configuration: DATABASE_URL is not a valid"),
                "{error}"
            );
            assert!(error.contains(expected), "{url}: {error}");
            for secret in ["zq", "xv", "w0rd"] {
                assert!(!error.contains(secret), "{url}: {error}");
            }
        }
        assert!(parse_database_url("postgres://app:zq%40xv@db/events").is_ok());
    }

    #[test]
    fn database_args_resolve_like_the_processor() {
        assert_eq!(DatabaseArgs::default().resolve().unwrap(), None);
        let url = DatabaseArgs {
            url: Some("postgres://u@h:1/d".into()),
            host: Some("x".into()),
            ..Default::default()
        };
        assert_eq!(redacted(&url.resolve().unwrap().unwrap()), "postgresql://u@h:1/d");
        let seed = DatabaseArgs { password: Some("pw".into()), ..Default::default() };
        assert_eq!(
            redacted(&seed.resolve().unwrap().unwrap()),
            "postgresql://postgres@localhost:5436/omninode_bridge"
        );
        let host = DatabaseArgs { host: Some("db".into()), database: Some("e".into()), ..Default::default() };
        assert_eq!(redacted(&host.resolve().unwrap().unwrap()), "postgresql://postgres@db:5436/e");
        let empty_password = DatabaseArgs { password: Some(String::new()), ..Default::default() };
        assert_eq!(empty_password.resolve().unwrap(), None);
    }

    #[test]
    fn network_defaults_fill_only_what_the_url_left_unset() {
        let mut config = parse_database_url("postgres://u@h/d").unwrap();
        apply_network_defaults(&mut config);
        assert!(config.get_keepalives());
        assert_eq!(config.get_keepalives_idle(), KEEPALIVES_IDLE);
        assert_eq!(config.get_keepalives_interval(), Some(KEEPALIVES_INTERVAL));
        assert_eq!(config.get_keepalives_retries(), Some(KEEPALIVES_RETRIES));
        assert_eq!(config.get_tcp_user_timeout(), Some(&TCP_USER_TIMEOUT));

        let mut config = parse_database_url(
            "postgres://u@h/d?keepalives_idle=60&keepalives_interval=7&keepalives_retries=9&tcp_user_timeout=45",
        )
        .unwrap();
        apply_network_defaults(&mut config);
        assert_eq!(config.get_keepalives_idle(), Duration::from_secs(60));
        assert_eq!(config.get_keepalives_interval(), Some(Duration::from_secs(7)));
        assert_eq!(config.get_keepalives_retries(), Some(9));
        assert_eq!(config.get_tcp_user_timeout(), Some(&Duration::from_secs(45)));

        let mut config = parse_database_url("host=h user=u keepalives=0").unwrap();
        apply_network_defaults(&mut config);
        assert!(!config.get_keepalives(), "keepalives=0 is the user's choice");
        assert_eq!(config.get_tcp_user_timeout(), Some(&TCP_USER_TIMEOUT));

        // Applying twice changes nothing (PgStore applies it to configs that already have it).
        let mut again = with_service_defaults(parse_database_url("postgres://u@h/d").unwrap(), "x");
        apply_network_defaults(&mut again);
        assert_eq!(again.get_keepalives_idle(), KEEPALIVES_IDLE);
        assert_eq!(again.get_connect_timeout(), Some(&Duration::from_secs(10)));
    }

    #[test]
    fn seed_defaults() {
        let config = SeedSettings { password: Some("pw".into()), ..Default::default() }.to_config();
        assert_eq!(redacted(&config), "postgresql://postgres@localhost:5436/omninode_bridge");
    }
}
