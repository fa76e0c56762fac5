//! libpq's conventions for finding a server and its password: the `PG*` environment variables and
//! the password file (`PGPASSFILE`, else `~/.pgpass`), applied the way `psql` applies them.
//!
//! Reading the environment is the binaries' job: they fill a [`LibpqEnv`] through
//! [`LibpqEnv::from_vars`] and hand it to [`DatabaseArgs::resolve_with`], which decides, the same
//! way for every binary:
//!
//! 1. **Which server**: `DATABASE_URL`; else the original service's `POSTGRES_*` variables (or
//!    `DB_PASSWORD`/`POSTGRES_PASSWORD`) when any is set; else `PGHOST`/`PGHOSTADDR` when set;
//!    else nothing (the caller decides what that means).
//! 2. **Each setting** the chosen source leaves open is taken from `PGHOST`, `PGHOSTADDR`,
//!    `PGPORT`, `PGUSER`, `PGDATABASE`, `PGSSLMODE`, `PGCONNECT_TIMEOUT` and `PGAPPNAME`; then
//!    from the defaults (the original's `localhost:5436/omninode_bridge` as `postgres` for the
//!    `POSTGRES_*` variables; libpq's for the rest: port 5432, the login name as user, the user
//!    as database, the local socket directory or `localhost` as host).
//! 3. **The password**: the URL's own; else `DB_PASSWORD`/`POSTGRES_PASSWORD`; else `PGPASSWORD`;
//!    else the first matching line of the password file. A password file that group or others
//!    may read is ignored, with a warning, as libpq does.

use std::fmt;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::Config;

use crate::connect::{parse_database_url, DatabaseArgs, SeedSettings};
use crate::error::StoreError;

/// libpq's port when nothing says otherwise.
const LIBPQ_PORT: u16 = 5432;

/// Where libpq builds usually put the server's Unix socket, in the order they are tried when no
/// host is given (Debian's first, upstream's `/tmp` last).
const SOCKET_DIRS: [&str; 3] = ["/run/postgresql", "/var/run/postgresql", "/tmp"];

/// The `PG*` variables libpq reads, and where its password file is. Empty values count as unset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LibpqEnv {
    /// `PGHOST`: host names or socket directories, comma-separated.
    pub host: Option<String>,
    /// `PGHOSTADDR`: IP addresses, comma-separated.
    pub hostaddr: Option<String>,
    /// `PGPORT`: ports, comma-separated (checked when used, so the error can name it).
    pub port: Option<String>,
    /// `PGUSER`.
    pub user: Option<String>,
    /// `PGDATABASE`.
    pub database: Option<String>,
    /// `PGPASSWORD`.
    pub password: Option<String>,
    /// `PGSSLMODE`.
    pub sslmode: Option<String>,
    /// `PGCONNECT_TIMEOUT`, in seconds.
    pub connect_timeout: Option<String>,
    /// `PGAPPNAME`.
    pub application_name: Option<String>,
    /// The password file: `PGPASSFILE`, else `.pgpass` in the home directory; `None` when there
    /// is no home directory.
    pub passfile: Option<PathBuf>,
    /// The login name, libpq's default user.
    pub login: Option<String>,
}

impl LibpqEnv {
    /// Reads the variables through `var` (the process environment in the binaries: `|name|
    /// std::env::var(name).ok()`). The home directory is `HOME`, else the account's; the login
    /// name is the effective user's account name, else `USER`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> LibpqEnv {
        let var = |name: &str| var(name).filter(|value| !value.is_empty());
        let account = nix::unistd::User::from_uid(nix::unistd::geteuid()).ok().flatten();
        let home = var("HOME").map(PathBuf::from).or_else(|| account.as_ref().map(|a| a.dir.clone()));
        LibpqEnv {
            host: var("PGHOST"),
            hostaddr: var("PGHOSTADDR"),
            port: var("PGPORT"),
            user: var("PGUSER"),
            database: var("PGDATABASE"),
            password: var("PGPASSWORD"),
            sslmode: var("PGSSLMODE"),
            connect_timeout: var("PGCONNECT_TIMEOUT"),
            application_name: var("PGAPPNAME"),
            passfile: var("PGPASSFILE").map(PathBuf::from).or_else(|| home.map(|h| h.join(".pgpass"))),
            login: account.map(|a| a.name).or_else(|| var("USER")),
        }
    }
}

/// Where a connection's password came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordSource {
    /// No password: the server must not ask for one (trust, peer, certificates).
    None,
    /// The connection string's own `password`.
    Url,
    /// `DB_PASSWORD` or `POSTGRES_PASSWORD`.
    Variable,
    /// `PGPASSWORD`.
    PgPassword,
    /// A line of this password file.
    Passfile(PathBuf),
}

impl fmt::Display for PasswordSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PasswordSource::None => f.write_str("no password"),
            PasswordSource::Url => f.write_str("password from DATABASE_URL"),
            PasswordSource::Variable => f.write_str("password from DB_PASSWORD or POSTGRES_PASSWORD"),
            PasswordSource::PgPassword => f.write_str("password from PGPASSWORD"),
            PasswordSource::Passfile(path) => write!(f, "password from {}", path.display()),
        }
    }
}

/// The connection settings [`DatabaseArgs::resolve_with`] chose.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The settings, password included.
    pub config: Config,
    /// Where the password came from, for error messages.
    pub password: PasswordSource,
    /// Problems worth a warning that did not stop the resolution (an unsafe password file).
    pub warnings: Vec<String>,
}

/// Which of the three sources chose the server.
enum Mode {
    Url,
    Seed,
    Libpq,
}

impl DatabaseArgs {
    /// The connection settings, with libpq's conventions for what the arguments leave open.
    /// `None` when nothing names a server: no URL, no `POSTGRES_*` variable, no
    /// `PGHOST`/`PGHOSTADDR`.
    ///
    /// The server comes from the URL, else the `POSTGRES_*` fields (with the original's defaults
    /// for what they leave open, after the `PG*` variables), else `PGHOST`/`PGHOSTADDR` (with
    /// libpq's defaults). Whatever the chosen source leaves open comes from the `PG*` variables.
    /// The password is the URL's, else `password` (`DB_PASSWORD`/`POSTGRES_PASSWORD`), else
    /// `PGPASSWORD`, else the password file's first matching line.
    ///
    /// Errors name the variable at fault and never contain a password.
    pub fn resolve_with(&self, env: &LibpqEnv) -> Result<Option<Resolved>, StoreError> {
        let seed_password = self.password.clone().filter(|p| !p.is_empty());
        let (mut config, mode, url_keys) = if let Some(url) = &self.url {
            (parse_database_url(url)?, Mode::Url, connection_string_keys(url))
        } else if seed_password.is_some()
            || self.host.is_some()
            || self.port.is_some()
            || self.database.is_some()
            || self.user.is_some()
        {
            (Config::new(), Mode::Seed, Vec::new())
        } else if env.host.is_some() || env.hostaddr.is_some() {
            (Config::new(), Mode::Libpq, Vec::new())
        } else {
            return Ok(None);
        };
        let seed = SeedSettings::default();
        let said = |key: &str| url_keys.iter().any(|k| k == key);

        // Host and port.
        if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
            match (&mode, &self.host) {
                (Mode::Seed, Some(host)) => {
                    config.host(host);
                }
                _ => apply_pg_hosts(&mut config, env)?,
            }
        }
        if config.get_ports().is_empty() {
            let port = match (&mode, self.port) {
                (Mode::Seed, Some(port)) => Some(vec![port]),
                _ => env.port.as_deref().map(|p| parse_ports("PGPORT", p)).transpose()?,
            };
            let port = port.unwrap_or_else(|| match mode {
                Mode::Seed => vec![seed.port],
                _ => vec![LIBPQ_PORT],
            });
            for p in port {
                config.port(p);
            }
        }
        if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
            match mode {
                Mode::Seed => {
                    config.host(&seed.host);
                }
                _ => {
                    let port = config.get_ports().first().copied().unwrap_or(LIBPQ_PORT);
                    match default_socket_dir(port) {
                        Some(dir) => config.host_path(dir),
                        None => config.host("localhost"),
                    };
                }
            }
        }

        // User and database.
        if config.get_user().is_none() {
            let user = match (&mode, &self.user) {
                (Mode::Seed, Some(user)) => Some(user.clone()),
                _ => env.user.clone(),
            };
            let user = user.or_else(|| match mode {
                Mode::Seed => Some(seed.user.clone()),
                _ => env.login.clone(),
            });
            match user {
                Some(user) => config.user(user),
                None => {
                    return Err(StoreError::Config(
                        "no database user: put one in DATABASE_URL or set PGUSER".into(),
                    ))
                }
            };
        }
        if config.get_dbname().is_none() {
            let database = match (&mode, &self.database) {
                (Mode::Seed, Some(database)) => Some(database.clone()),
                _ => env.database.clone(),
            };
            let database = database.or_else(|| match mode {
                Mode::Seed => Some(seed.database.clone()),
                _ => None,
            });
            if let Some(database) = database {
                config.dbname(database);
            }
        }

        // Options a URL may set.
        if !said("sslmode") {
            if let Some(mode) = &env.sslmode {
                config.ssl_mode(parse_sslmode(mode)?);
            }
        }
        if !said("connect_timeout") && config.get_connect_timeout().is_none() {
            if let Some(text) = &env.connect_timeout {
                let seconds: u64 = text.trim().parse().map_err(|_| {
                    StoreError::Config(format!("PGCONNECT_TIMEOUT {text:?} is not a whole number of seconds"))
                })?;
                if seconds > 0 {
                    config.connect_timeout(Duration::from_secs(seconds.max(2)));
                }
            }
        }
        if !said("application_name") && config.get_application_name().is_none() {
            if let Some(name) = &env.application_name {
                config.application_name(name);
            }
        }

        // The password, last: the password file matches on the settings chosen above.
        let mut warnings = Vec::new();
        let password = if config.get_password().is_some_and(|p| !p.is_empty()) {
            PasswordSource::Url
        } else if let Some(password) = seed_password {
            config.password(password);
            PasswordSource::Variable
        } else if let Some(password) = &env.password {
            config.password(password.as_str());
            PasswordSource::PgPassword
        } else if let Some(path) = &env.passfile {
            let key = PassfileKey::of(&config);
            match read_passfile(path, &key) {
                Ok(Some(password)) => {
                    config.password(password);
                    PasswordSource::Passfile(path.clone())
                }
                Ok(None) => PasswordSource::None,
                Err(warning) => {
                    warnings.push(warning);
                    PasswordSource::None
                }
            }
        } else {
            PasswordSource::None
        };
        Ok(Some(Resolved { config, password, warnings }))
    }
}

/// `PGHOST` and `PGHOSTADDR` into `config`, when set.
fn apply_pg_hosts(config: &mut Config, env: &LibpqEnv) -> Result<(), StoreError> {
    if let Some(hosts) = &env.host {
        for host in hosts.split(',').map(str::trim).filter(|h| !h.is_empty()) {
            if host.starts_with('/') {
                config.host_path(host);
            } else {
                config.host(host);
            }
        }
    }
    if let Some(addrs) = &env.hostaddr {
        for addr in addrs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            let ip = addr.parse().map_err(|_| {
                StoreError::Config(format!(
                    "PGHOSTADDR {addr:?} is not an IP address (a name goes in PGHOST)"
                ))
            })?;
            config.hostaddr(ip);
        }
    }
    Ok(())
}

fn parse_ports(variable: &str, text: &str) -> Result<Vec<u16>, StoreError> {
    text.split(',')
        .map(|p| {
            p.trim().parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                StoreError::Config(format!("{variable} {:?} is not a port number (1-65535)", p.trim()))
            })
        })
        .collect()
}

/// libpq's `sslmode` values, mapped onto what tokio-postgres knows. `require` here verifies the
/// server's certificate (see [`crate::tls`]), which is libpq's `verify-full`, so `verify-ca` and
/// `verify-full` become `require`; `allow` becomes `prefer`.
fn parse_sslmode(text: &str) -> Result<SslMode, StoreError> {
    match text.trim() {
        "disable" => Ok(SslMode::Disable),
        "allow" | "prefer" => Ok(SslMode::Prefer),
        "require" | "verify-ca" | "verify-full" => Ok(SslMode::Require),
        other => Err(StoreError::Config(format!(
            "PGSSLMODE {other:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
        ))),
    }
}

/// The first of libpq's usual socket directories holding a server socket for `port`.
fn default_socket_dir(port: u16) -> Option<PathBuf> {
    SOCKET_DIRS.iter().map(PathBuf::from).find(|dir| dir.join(format!(".s.PGSQL.{port}")).exists())
}

/// What a password file line is matched against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassfileKey {
    /// The host name, the socket directory, or `localhost` for a default socket directory.
    pub host: String,
    /// The port, in decimal.
    pub port: String,
    /// The database (the user's name when none is set, as the server does).
    pub database: String,
    /// The user.
    pub user: String,
}

impl PassfileKey {
    /// The key of `config`'s first host, as libpq forms it: a Unix socket in a default directory
    /// (and an unset host) counts as `localhost`; an address given only as `hostaddr` counts as
    /// that address.
    pub fn of(config: &Config) -> PassfileKey {
        let host = match (config.get_hosts().first(), config.get_hostaddrs().first()) {
            (Some(Host::Tcp(name)), _) => name.clone(),
            (Some(Host::Unix(path)), _) => {
                if SOCKET_DIRS.iter().any(|dir| Path::new(dir) == path) {
                    "localhost".to_owned()
                } else {
                    String::from_utf8_lossy(path.as_os_str().as_bytes()).into_owned()
                }
            }
            (None, Some(addr)) => addr.to_string(),
            (None, None) => "localhost".to_owned(),
        };
        let port = config.get_ports().first().copied().unwrap_or(LIBPQ_PORT).to_string();
        let user = config.get_user().unwrap_or_default().to_owned();
        let database = config.get_dbname().map_or_else(|| user.clone(), str::to_owned);
        PassfileKey { host, port, database, user }
    }
}

/// The password of the first line of the password file at `path` that matches `key`, libpq's
/// way: `hostname:port:database:username:password`, `*` matching anything in the first four
/// fields, `\` escaping `:` and `\`, lines starting with `#` ignored.
///
/// `Ok(None)` when the file does not exist or no line matches. `Err` holds a warning, and means
/// the file is ignored: it is not a plain file, cannot be read, or group or others have any
/// access to it (libpq's rule; it must be `0600` or less).
pub fn read_passfile(path: &Path, key: &PassfileKey) -> Result<Option<String>, String> {
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(_) => return Ok(None),
    };
    if !meta.is_file() {
        return Err(format!("password file {} is not a plain file; ignoring it", path.display()));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "password file {} has group or world access; ignoring it (permissions should be u=rw \
             (0600) or less: chmod 600 {})",
            path.display(),
            path.display()
        ));
    }
    let text = fs::read(path).map_err(|e| format!("reading password file {}: {e}", path.display()))?;
    Ok(passfile_match(&text, key))
}

/// The password of the first line of `text` that matches `key`.
fn passfile_match(text: &[u8], key: &PassfileKey) -> Option<String> {
    let fields = [key.host.as_bytes(), key.port.as_bytes(), key.database.as_bytes(), key.user.as_bytes()];
    'lines: for line in text.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() || line.starts_with(b"#") {
            continue;
        }
        let mut rest = line;
        for wanted in fields {
            match match_field(rest, wanted) {
                Some(after) => rest = after,
                None => continue 'lines,
            }
        }
        // The password runs to the end of the line, or to an unescaped `:`.
        let mut password = Vec::with_capacity(rest.len());
        let mut bytes = rest.iter();
        while let Some(&b) = bytes.next() {
            match b {
                b':' => break,
                b'\\' => match bytes.next() {
                    Some(&escaped) => password.push(escaped),
                    None => password.push(b'\\'),
                },
                _ => password.push(b),
            }
        }
        return Some(String::from_utf8_lossy(&password).into_owned());
    }
    None
}

/// Matches one `:`-terminated field at the start of `line` against `wanted` (`*` matches
/// anything); returns what follows the `:`.
fn match_field<'a>(line: &'a [u8], wanted: &[u8]) -> Option<&'a [u8]> {
    if let Some(after) = line.strip_prefix(b"*:") {
        return Some(after);
    }
    let mut value = Vec::with_capacity(wanted.len());
    let mut i = 0;
    while i < line.len() {
        match line[i] {
            b'\\' if i + 1 < line.len() => {
                value.push(line[i + 1]);
                i += 2;
            }
            b':' => return (value == wanted).then(|| &line[i + 1..]),
            b => {
                value.push(b);
                i += 1;
            }
        }
    }
    None
}

/// The keys a connection string sets: the query parameters of a URL, or the keys of a
/// `key=value` string. Values are skipped (they may be passwords).
pub(crate) fn connection_string_keys(text: &str) -> Vec<String> {
    let text = text.trim();
    if let Some(rest) = text.strip_prefix("postgres://").or_else(|| text.strip_prefix("postgresql://")) {
        // tokio-postgres takes the credentials up to the first `@`; the query follows the host.
        let after_credentials = rest.find('@').map_or(rest, |at| &rest[at + 1..]);
        let Some(query) = after_credentials.split_once('?').map(|(_, q)| q) else {
            return Vec::new();
        };
        return query
            .split('&')
            .filter_map(|pair| pair.split_once('=').map(|(k, _)| k.trim().to_owned()))
            .collect();
    }
    let mut keys = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if key.is_empty() || chars.next() != Some('=') {
            return keys;
        }
        keys.push(key);
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek() == Some(&'\'') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        chars.next();
                    }
                    '\'' => break,
                    _ => {}
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    chars.next();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redacted;

    fn key(host: &str, port: &str, database: &str, user: &str) -> PassfileKey {
        PassfileKey { host: host.into(), port: port.into(), database: database.into(), user: user.into() }
    }

    #[test]
    fn passfile_lines_match_like_libpq() {
        let file = b"# comment\n\
                     other:5432:*:*:nope\n\
                     db.internal:5432:events:app:first\n\
                     db.internal:5432:events:app:second\n\
                     *:6543:*:app:any-host\n\
                     db.internal:*:*:maint:colon\\:and\\\\backslash:ignored\n\
                     we\\:ird:5432:*:*:escaped-host\n\
                     /srv/pg/run:5432:*:*:socket\r\n";
        let cases = [
            (key("db.internal", "5432", "events", "app"), Some("first")),
            (key("any", "6543", "x", "app"), Some("any-host")),
            (key("db.internal", "1", "y", "maint"), Some("colon:and\\backslash")),
            (key("we:ird", "5432", "d", "u"), Some("escaped-host")),
            (key("/srv/pg/run", "5432", "d", "u"), Some("socket")),
            (key("db.internal", "5432", "events", "nobody"), None),
            (key("db.internal", "5433", "events", "app"), None),
        ];
        for (key, expected) in cases {
            assert_eq!(passfile_match(file, &key).as_deref(), expected, "{key:?}");
        }
    }

    #[test]
    fn a_passfile_others_may_read_is_ignored_with_a_warning() {
        let dir = std::env::temp_dir().join(format!("hook-store-pgpass-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pgpass");
        fs::write(&path, "*:*:*:*:pw\n").unwrap();
        let any = key("h", "5432", "d", "u");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let warning = read_passfile(&path, &any).unwrap_err();
        assert!(warning.contains("has group or world access"), "{warning}");
        assert!(warning.contains("chmod 600"), "{warning}");
        assert!(!warning.contains("pw\n"), "{warning}");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_passfile(&path, &any), Ok(Some("pw".into())));
        assert_eq!(read_passfile(&dir.join("missing"), &any), Ok(None));
        assert!(read_passfile(&dir, &any).unwrap_err().contains("not a plain file"));
        fs::remove_dir_all(&dir).unwrap();
    }

    fn env(vars: &[(&str, &str)]) -> LibpqEnv {
        let mut env =
            LibpqEnv::from_vars(|name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned()));
        env.login = Some("login".into());
        if !vars.iter().any(|(k, _)| *k == "PGPASSFILE") {
            env.passfile = None;
        }
        env
    }

    fn resolve(args: DatabaseArgs, vars: &[(&str, &str)]) -> Option<(String, PasswordSource)> {
        args.resolve_with(&env(vars)).unwrap().map(|r| (redacted(&r.config), r.password))
    }

    #[test]
    fn pg_variables_fill_in_what_the_url_leaves_open() {
        let url = |u: &str| DatabaseArgs { url: Some(u.into()), ..Default::default() };
        let pg = [("PGUSER", "pguser"), ("PGDATABASE", "pgdb"), ("PGHOST", "pghost"), ("PGPASSWORD", "p")];
        assert_eq!(
            resolve(url("postgres://app@db/events"), &pg),
            Some(("postgresql://app@db:5432/events".into(), PasswordSource::PgPassword))
        );
        assert_eq!(
            resolve(url("postgres:///"), &pg),
            Some(("postgresql://pguser@pghost:5432/pgdb".into(), PasswordSource::PgPassword))
        );
        assert_eq!(resolve(url("postgres://app:own@db/events"), &pg).map(|r| r.1), Some(PasswordSource::Url));
        let with_seed_password = DatabaseArgs {
            url: Some("postgres://app@db/e".into()),
            password: Some("s".into()),
            ..Default::default()
        };
        assert_eq!(resolve(with_seed_password, &pg).map(|r| r.1), Some(PasswordSource::Variable));
        assert_eq!(
            resolve(url("host=db dbname=e"), &[]).map(|r| r.0),
            Some("postgresql://login@db:5432/e".into())
        );
    }

    #[test]
    fn the_server_comes_from_the_url_then_postgres_then_pghost() {
        assert_eq!(resolve(DatabaseArgs::default(), &[("PGUSER", "u"), ("PGPASSWORD", "p")]), None);
        assert_eq!(
            resolve(DatabaseArgs::default(), &[("PGHOST", "h"), ("PGPORT", "6000")]),
            Some(("postgresql://login@h:6000/".into(), PasswordSource::None))
        );
        let seed = DatabaseArgs { host: Some("db".into()), ..Default::default() };
        assert_eq!(
            resolve(seed.clone(), &[]).map(|r| r.0),
            Some("postgresql://postgres@db:5436/omninode_bridge".into())
        );
        // POSTGRES_* first, then PG*, then the original's defaults.
        assert_eq!(
            resolve(seed, &[("PGHOST", "ignored"), ("PGPORT", "5432"), ("PGUSER", "pg")]).map(|r| r.0),
            Some("postgresql://pg@db:5432/omninode_bridge".into())
        );
    }

    #[test]
    fn bad_pg_values_name_their_variable() {
        let pghost = |extra: (&str, &str)| {
            DatabaseArgs::default().resolve_with(&env(&[("PGHOST", "h"), extra])).unwrap_err().to_string()
        };
        assert!(pghost(("PGPORT", "fivefour")).contains("PGPORT \"fivefour\""));
        assert!(pghost(("PGSSLMODE", "yes")).contains("PGSSLMODE \"yes\""));
        assert!(pghost(("PGCONNECT_TIMEOUT", "soon")).contains("PGCONNECT_TIMEOUT"));
        assert!(pghost(("PGHOSTADDR", "db.internal")).contains("PGHOSTADDR"));
        let mode = |m: &str| {
            let args = DatabaseArgs { url: Some("postgres://u@h/d".into()), ..Default::default() };
            args.resolve_with(&env(&[("PGSSLMODE", m)])).unwrap().unwrap().config.get_ssl_mode()
        };
        assert_eq!(mode("verify-full"), SslMode::Require);
        assert_eq!(mode("disable"), SslMode::Disable);
        let url_says =
            DatabaseArgs { url: Some("postgres://u@h/d?sslmode=disable".into()), ..Default::default() };
        let config = url_says.resolve_with(&env(&[("PGSSLMODE", "require")])).unwrap().unwrap().config;
        assert_eq!(config.get_ssl_mode(), SslMode::Disable, "the URL's sslmode wins");
    }

    #[test]
    fn keys_of_connection_strings_skip_values() {
        assert_eq!(
            connection_string_keys("postgres://u:p?w@h/d?sslmode=require&application_name=x"),
            ["sslmode", "application_name"]
        );
        assert!(connection_string_keys("postgres://u@h/d").is_empty());
        assert_eq!(
            connection_string_keys("host=h password='a b\\' sslmode=x' sslmode = disable"),
            ["host", "password", "sslmode"]
        );
    }
}
