//! What the hook-events binaries (`hook-replay`, `hook-archive`, ...) share: the database flags
//! and connection, logging, progress on stderr, and the mapping of errors to exit codes
//! (0 done, 1 failed, 2 bad usage or a table that does not fit). Not a public library: it serves this workspace's binaries.

mod args;
mod db;
mod progress;

use std::process::ExitCode;

pub use args::{parse_args, usage_line};
pub use db::{connect, connecting_to, libpq_env, resolve_database, Connected, DatabaseFlags};
pub use hook_core::parse_duration;
pub use progress::Progress;

/// Extra trusted root certificates for `sslmode=require`, from libpq's `PGSSLROOTCERT`.
pub fn tls_root_cert() -> Option<std::path::PathBuf> {
    std::env::var_os("PGSSLROOTCERT").filter(|v| !v.is_empty()).map(std::path::PathBuf::from)
}

/// A flag set on SIGINT or SIGTERM, for tools that stop after the batch in progress (which
/// commits). Must be called inside a tokio runtime.
pub fn interrupt_flag() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let set = std::sync::Arc::clone(&flag);
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut term) = signal(SignalKind::terminate()) else { return };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        set.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    flag
}

/// The web console's token: `HOOK_CONSOLE_TOKEN`, or the contents of the file named by
/// `HOOK_CONSOLE_TOKEN_FILE` (e.g. a systemd credential); `None` when neither is set (the console
/// is then read-only). Both set is a [`UsageError`]; so is a file that cannot be read.
pub fn console_token() -> anyhow::Result<Option<String>> {
    let value = std::env::var("HOOK_CONSOLE_TOKEN").ok().filter(|v| !v.trim().is_empty());
    let file = std::env::var_os("HOOK_CONSOLE_TOKEN_FILE").filter(|v| !v.is_empty());
    match (value, file) {
        (Some(_), Some(_)) => {
            Err(UsageError("set HOOK_CONSOLE_TOKEN or HOOK_CONSOLE_TOKEN_FILE, not both".into()).into())
        }
        (Some(value), None) => Ok(Some(value)),
        (None, Some(path)) => {
            let path = std::path::PathBuf::from(path);
            let text = std::fs::read_to_string(&path).map_err(|e| {
                UsageError(format!("HOOK_CONSOLE_TOKEN_FILE: reading {}: {e}", path.display()))
            })?;
            Ok(Some(text.trim().to_owned()))
        }
        (None, None) => Ok(None),
    }
}

/// A mistake in the flags, input or configuration: exit status 2.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Reads `.env` from the working directory. A missing file is normal; a malformed one is an
/// error worth stopping for (exit 2).
pub fn load_dotenv(program: &str) -> Result<(), ExitCode> {
    match dotenvy::dotenv() {
        Err(error) if !error.not_found() => {
            eprintln!("{program}: error: reading .env: {error}");
            Err(ExitCode::from(2))
        }
        _ => Ok(()),
    }
}

/// Prints a failed run's error as one line (with its chain) and picks the exit code: 2 for a
/// [`UsageError`] or a table that does not fit ([`is_schema_mismatch`]), 1 for anything else, 0
/// for success.
pub fn exit_code(program: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{program}: error: {error:#}");
            if error.is::<UsageError>() || is_schema_mismatch(&error) {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Whether `error` is, or was caused by, a table that does not fit this build
/// ([`hook_store::StoreError::Schema`]): exit status 2, since running again cannot help until the
/// table is fixed.
pub fn is_schema_mismatch(error: &anyhow::Error) -> bool {
    error
        .chain()
        .any(|cause| cause.downcast_ref::<hook_store::StoreError>().is_some_and(|e| e.is_schema_mismatch()))
}

/// Checks the tables of `connected` for what the tool is about to do (see [`hook_store::schema`]),
/// before it changes anything.
pub async fn check_tables(connected: &Connected, scope: hook_store::schema::Scope) -> anyhow::Result<()> {
    use anyhow::Context;
    let shown = &connected.shown;
    let client = connected.store.pool().get().await.with_context(|| format!("connecting to {shown}"))?;
    hook_store::schema::check(&client, scope).await.with_context(|| format!("checking the tables of {shown}"))
}

/// Sets up logging to stderr from a level or filter; the database driver's notices stay at warn
/// unless named. Unknown levels are a [`UsageError`] rather than a silent "log nothing".
pub fn init_logging(level: &str, json: bool) -> anyhow::Result<()> {
    let mut directives = level.to_lowercase();
    check_log_directives(&directives).map_err(|e| UsageError(format!("LOG_LEVEL: {e}")))?;
    if !directives.contains("tokio_postgres") {
        directives.push_str(",tokio_postgres=warn");
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .map_err(|_| UsageError(format!("LOG_LEVEL {level:?} is not a log level or filter")))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = if json { builder.json().flatten_event(true).try_init() } else { builder.try_init() };
    result.map_err(|e| anyhow::anyhow!("setting up logging: {e}"))
}

/// Accepts what a user means by a log level: a level name, or comma-separated `target=level`
/// directives. `EnvFilter` alone would take any word as a target name and silently log nothing.
pub fn check_log_directives(directives: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    for directive in directives.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let (target, level) = directive.rsplit_once('=').unwrap_or(("", directive));
        let target_ok = target.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '-');
        if !LEVELS.contains(&level) || !target_ok {
            return Err(format!(
                "{directive:?} is not a level (off, error, warn, info, debug, trace) or target=level"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_levels() {
        for ok in ["info", "debug", "hook_core=debug,warn", "hook_store::pg=trace"] {
            assert!(check_log_directives(ok).is_ok(), "{ok}");
        }
        for bad in ["garbage(((", "verbose", "hook_core=loud", "a b=info"] {
            assert!(check_log_directives(bad).is_err(), "{bad}");
        }
    }
}
