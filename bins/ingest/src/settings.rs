//! What the environment says: the database, the spool file and the time budget.
//!
//! Nothing here fails. A hook must not stop the agent over a bad variable, so a value that
//! cannot be used becomes a default plus a warning, and a database that cannot be used becomes
//! [`Database::Unusable`]: the event is spooled and the warning says why.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hook_store::tokio_postgres::Config;
use hook_store::{DatabaseArgs, LibpqEnv, PasswordSource};

/// How long connecting, flushing the spool and inserting may take together, by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(200);

/// The longest `HOOK_INGEST_TIMEOUT` accepted (Claude Code's own default hook timeout).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// The values PostgreSQL accepts for `synchronous_commit`.
pub const SYNCHRONOUS_COMMIT: [&str; 5] = ["on", "off", "local", "remote_write", "remote_apply"];

/// The database `hook-processor` creates in its embedded cluster.
pub const EMBEDDED_DATABASE: &str = "hook_events";

/// Where events go.
#[derive(Debug, Clone)]
pub enum Database {
    /// `DATABASE_URL`, the original service's `POSTGRES_*` variables or libpq's `PGHOST`, and
    /// where the password came from.
    Configured(Box<Config>, PasswordSource),
    /// The embedded cluster of `hook-processor` under `HOOK_DATA_DIR`, if it is running.
    Embedded(PathBuf),
    /// Nothing usable is configured; the text says why.
    Unusable(String),
}

/// Everything `hook-ingest` reads from its environment.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where events go.
    pub database: Database,
    /// The spool file.
    pub spool: PathBuf,
    /// The budget for connecting, flushing and inserting (`HOOK_INGEST_TIMEOUT`).
    pub timeout: Duration,
    /// `synchronous_commit` of the hook's inserts (`HOOK_INGEST_SYNCHRONOUS_COMMIT`), set with
    /// `SET LOCAL` in each insert's transaction; `None` keeps the server's setting.
    pub synchronous_commit: Option<&'static str>,
    /// The ingest sockets of a running `hook-processor` to try first, in order
    /// (`HOOK_INGEST_SOCKET`: one path, or `off` for none; by default
    /// [`wire::default_sockets`](crate::wire::default_sockets)).
    pub sockets: Vec<PathBuf>,
    /// Problems with the variables, one short text each.
    pub warnings: Vec<String>,
}

impl Settings {
    /// Reads the settings through `var` (the process environment in the binary; a map in tests).
    /// Empty values count as unset.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Settings {
        let var = |name: &str| var(name).filter(|value| !value.is_empty());
        let mut warnings = Vec::new();

        let timeout = match var("HOOK_INGEST_TIMEOUT").map(|text| parse_timeout(&text)) {
            None => DEFAULT_TIMEOUT,
            Some(Ok(timeout)) => timeout,
            Some(Err(error)) => {
                warnings.push(format!("HOOK_INGEST_TIMEOUT {error}; using 200ms"));
                DEFAULT_TIMEOUT
            }
        };

        let synchronous_commit = var("HOOK_INGEST_SYNCHRONOUS_COMMIT").and_then(|text| {
            let value = SYNCHRONOUS_COMMIT.iter().find(|v| v.eq_ignore_ascii_case(text.trim())).copied();
            if value.is_none() {
                warnings.push(format!(
                    "HOOK_INGEST_SYNCHRONOUS_COMMIT {text:?} is not one of {}; using the server's setting",
                    SYNCHRONOUS_COMMIT.join(", ")
                ));
            }
            value
        });

        let port = var("POSTGRES_PORT");
        let args = DatabaseArgs {
            url: var("DATABASE_URL"),
            host: var("POSTGRES_HOST"),
            port: port.as_deref().and_then(|p| p.trim().parse().ok()),
            database: var("POSTGRES_DB"),
            user: var("POSTGRES_USER"),
            password: var("DB_PASSWORD").or_else(|| var("POSTGRES_PASSWORD")),
        };
        let bad_port = port.filter(|_| args.url.is_none() && args.port.is_none());
        let env = LibpqEnv::from_vars(|name| var(name));
        let database = match (args.resolve_with(&env), bad_port) {
            (_, Some(port)) => Database::Unusable(format!("POSTGRES_PORT {port:?} is not a port number")),
            (Ok(Some(resolved)), None) => {
                warnings.extend(resolved.warnings);
                Database::Configured(Box::new(with_ingest_defaults(resolved.config)), resolved.password)
            }
            (Err(error), None) => Database::Unusable(error.to_string()),
            (Ok(None), None) => match var("HOOK_DATA_DIR") {
                Some(dir) => Database::Embedded(absolute(Path::new(&dir))),
                None => Database::Unusable(
                    "no database configured (set DATABASE_URL, POSTGRES_HOST, PGHOST or HOOK_DATA_DIR)"
                        .into(),
                ),
            },
        };

        let spool = var("HOOK_SPOOL").map(|path| absolute(Path::new(&path))).unwrap_or_else(|| {
            let state = var("XDG_STATE_HOME")
                .map(PathBuf::from)
                .filter(|dir| dir.is_absolute())
                .or_else(|| var("HOME").map(|home| Path::new(&home).join(".local/state")))
                .unwrap_or_else(std::env::temp_dir);
            state.join("hook-events").join("spool.jsonl")
        });

        let sockets = match var(crate::wire::SOCKET_VARIABLE) {
            Some(value) if value.trim().eq_ignore_ascii_case("off") => Vec::new(),
            Some(path) => vec![absolute(Path::new(&path))],
            None => crate::wire::default_sockets(var("XDG_RUNTIME_DIR").as_deref()),
        };

        Settings { database, spool, timeout, synchronous_commit, sockets, warnings }
    }
}

/// The connection settings a hook needs: its name in `pg_stat_activity`, and the TCP settings
/// every connection of the project gets (`hook_store::apply_network_defaults`). The connect
/// timeout is not set here; the whole delivery runs under the hook's budget.
fn with_ingest_defaults(mut config: Config) -> Config {
    if config.get_application_name().is_none() {
        config.application_name("hook-ingest");
    }
    hook_store::apply_network_defaults(&mut config);
    config
}

/// `path` made absolute against the working directory (Claude Code runs hooks in the project's
/// directory, so relative paths are better avoided in the first place).
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Parses a duration the way every binary does ([`hook_core::parse_duration`]: `250ms`, `1s`,
/// `1.5s`, plain seconds `0.2`), between 1 ms and [`MAX_TIMEOUT`].
pub fn parse_timeout(text: &str) -> Result<Duration, String> {
    let timeout = hook_core::parse_duration(text)?;
    if timeout < Duration::from_millis(1) || timeout > MAX_TIMEOUT {
        return Err(format!("{:?} is not between 1ms and 60s", text.trim()));
    }
    Ok(timeout)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Settings {
        let vars: HashMap<String, String> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Settings::from_vars(|name| vars.get(name).cloned())
    }

    fn shown(database: &Database) -> String {
        match database {
            Database::Configured(config, _) => hook_store::redacted(config),
            Database::Embedded(dir) => format!("embedded {}", dir.display()),
            Database::Unusable(why) => format!("unusable: {why}"),
        }
    }

    #[test]
    fn the_database_comes_from_the_url_then_the_seed_variables_then_the_data_dir() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("DATABASE_URL", "postgres://u:pw@h:1/d"), ("POSTGRES_HOST", "x")], "postgresql://u@h:1/d"),
            (&[("DB_PASSWORD", "pw")], "postgresql://postgres@localhost:5436/omninode_bridge"),
            (
                &[("POSTGRES_HOST", "db"), ("POSTGRES_PORT", "6000")],
                "postgresql://postgres@db:6000/omninode_bridge",
            ),
            (&[("HOOK_DATA_DIR", "/srv/hooks")], "embedded /srv/hooks"),
            (&[("DATABASE_URL", ""), ("HOOK_DATA_DIR", "/srv/hooks")], "embedded /srv/hooks"),
            (
                &[],
                "unusable: no database configured (set DATABASE_URL, POSTGRES_HOST, PGHOST or HOOK_DATA_DIR)",
            ),
            (&[("POSTGRES_PORT", "high")], "unusable: POSTGRES_PORT \"high\" is not a port number"),
        ];
        for (vars, expected) in cases {
            assert_eq!(shown(&settings(vars).database), *expected, "{vars:?}");
        }
        let bad = shown(&settings(&[("DATABASE_URL", "postgres://u:secret@h:port/d")]).database);
        assert!(bad.starts_with("unusable: invalid database configuration"), "{bad}");
        assert!(!bad.contains("secret"), "{bad}");
    }

    #[test]
    fn the_spool_defaults_to_the_state_directory() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("HOOK_SPOOL", "/x/s.jsonl"), ("HOME", "/home/a")], "/x/s.jsonl"),
            (&[("XDG_STATE_HOME", "/state"), ("HOME", "/home/a")], "/state/hook-events/spool.jsonl"),
            (
                &[("XDG_STATE_HOME", "relative"), ("HOME", "/home/a")],
                "/home/a/.local/state/hook-events/spool.jsonl",
            ),
            (&[("HOME", "/home/a")], "/home/a/.local/state/hook-events/spool.jsonl"),
        ];
        for (vars, expected) in cases {
            assert_eq!(settings(vars).spool, PathBuf::from(expected), "{vars:?}");
        }
    }

    #[test]
    fn the_sockets_are_the_variables_path_or_the_defaults_or_none() {
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
        let cases: &[Case<'_>] = &[
            (&[("HOOK_INGEST_SOCKET", "/tmp/x.sock"), ("XDG_RUNTIME_DIR", "/run/user/7")], &["/tmp/x.sock"]),
            (&[("HOOK_INGEST_SOCKET", "off"), ("XDG_RUNTIME_DIR", "/run/user/7")], &[]),
            (&[("HOOK_INGEST_SOCKET", " OFF ")], &[]),
            (
                &[("XDG_RUNTIME_DIR", "/run/user/7")],
                &["/run/user/7/hook-events/ingest.sock", "/run/hook-events/ingest.sock"],
            ),
            (&[("HOOK_INGEST_SOCKET", ""), ("XDG_RUNTIME_DIR", "")], &["/run/hook-events/ingest.sock"]),
        ];
        for (vars, expected) in cases {
            let expected: Vec<PathBuf> = expected.iter().map(PathBuf::from).collect();
            assert_eq!(settings(vars).sockets, expected, "{vars:?}");
        }
    }

    #[test]
    fn timeouts() {
        for (text, ms) in [("200ms", 200), ("1s", 1000), ("0.05", 50), (" 1.5s ", 1500), ("60s", 60_000)] {
            assert_eq!(parse_timeout(text).map(|d| d.as_millis()), Ok(ms), "{text}");
        }
        for bad in ["", "fast", "0", "-1s", "61s", "NaN", "0.0001"] {
            assert!(parse_timeout(bad).is_err(), "{bad}");
        }
        let s = settings(&[("HOOK_INGEST_TIMEOUT", "soon"), ("HOOK_INGEST_SYNCHRONOUS_COMMIT", "maybe")]);
        assert_eq!((s.timeout, s.synchronous_commit), (DEFAULT_TIMEOUT, None));
        assert_eq!(
            s.warnings,
            [
                "HOOK_INGEST_TIMEOUT \"soon\" is not a duration: use seconds (30, 1.5) or a number with a \
                 unit (250ms, 30s, 5m, 12h, 30d, 2w); using 200ms",
                "HOOK_INGEST_SYNCHRONOUS_COMMIT \"maybe\" is not one of on, off, local, remote_write, \
                 remote_apply; using the server's setting",
            ]
        );
        assert_eq!(settings(&[("HOOK_INGEST_SYNCHRONOUS_COMMIT", "OFF")]).synchronous_commit, Some("off"));
        assert_eq!(settings(&[]).synchronous_commit, None);
    }
}
