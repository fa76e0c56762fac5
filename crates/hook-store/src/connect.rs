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

/// Parses a `postgres://` URL or a `key=value` connection string. The error never repeats the
/// input, which may hold a password.
pub fn parse_database_url(url: &str) -> Result<Config, StoreError> {
    url.parse::<Config>()
        .map_err(|e| StoreError::Config(format!("DATABASE_URL is not a valid connection string: {e}")))
}

/// Fills in what a long-running service needs when the user left it unset: a connect timeout,
/// TCP keepalives and an application name visible in `pg_stat_activity`.
pub fn with_service_defaults(mut config: Config, application_name: &str) -> Config {
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    if config.get_application_name().is_none() {
        config.application_name(application_name);
    }
    config.keepalives(true).keepalives_idle(Duration::from_secs(30));
    config
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
    fn seed_defaults() {
        let config = SeedSettings { password: Some("pw".into()), ..Default::default() }.to_config();
        assert_eq!(redacted(&config), "postgresql://postgres@localhost:5436/omninode_bridge");
    }
}
