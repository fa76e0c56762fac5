//! `hook-ingest`: a Claude Code command hook that stores the hook's input as a hook event.
//!
//! Reads the hook's JSON from stdin; exits 0 whatever happens; writes nothing to stdout; prints
//! at most one warning line to stderr. See `docs/ingest.md`.

use std::io::Write;
use std::process::ExitCode;

use hook_ingest::settings::Settings;

const USAGE: &str = "\
hook-ingest: stores a Claude Code hook's input (JSON on stdin) as a row of hook_events.

Usage: hook-ingest < hook-input.json

Environment:
  DATABASE_URL            connection URL; else the POSTGRES_* variables of hook-processor;
                          else libpq's PGHOST (PG* variables fill in the rest; the password
                          from the URL, DB_PASSWORD, PGPASSWORD or ~/.pgpass)
  HOOK_DATA_DIR           else: the embedded cluster of hook-processor in this directory
  HOOK_INGEST_TIMEOUT     budget for connecting and inserting (default 200ms)
  HOOK_SPOOL              where events wait while the database is away
                          (default $XDG_STATE_HOME/hook-events/spool.jsonl)
  HOOK_INGEST_SYNCHRONOUS_COMMIT
                          synchronous_commit of the hook's inserts (on, off, ...);
                          default: the server's setting

It always exits 0 and never writes to stdout while working as a hook.
";

fn main() -> ExitCode {
    match std::env::args_os().nth(1) {
        Some(arg) if arg == "--help" || arg == "-h" => {
            let _ = std::io::stdout().write_all(USAGE.as_bytes());
            return ExitCode::SUCCESS;
        }
        Some(arg) if arg == "--version" || arg == "-V" => {
            let _ = writeln!(std::io::stdout(), "hook-ingest {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    // A panic must not turn into a non-zero exit or a multi-line backtrace in the agent's log.
    std::panic::set_hook(Box::new(|_| {}));
    let settings = Settings::from_vars(|name| std::env::var(name).ok());
    let warning = std::panic::catch_unwind(|| hook_ingest::run(&settings, std::io::stdin().lock()))
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Some(format!("internal error ({what}); the event may be lost"))
        });
    if let Some(warning) = warning {
        let _ = writeln!(std::io::stderr(), "hook-ingest: warning: {warning}");
    }
    ExitCode::SUCCESS
}
