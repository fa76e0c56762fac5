//! Child processes of the workspace's binaries, for tests and hook-bench (features
//! `test-support`, `bench`).

/// The variables of the caller's environment that would change what a hook-events binary does:
/// its database, its settings, its logging and systemd's notification socket.
const BINARY_VARIABLES: &[&str] = &[
    "DATABASE_URL",
    "DB_PASSWORD",
    "POSTGRES_PASSWORD",
    "POSTGRES_HOST",
    "POSTGRES_PORT",
    "POSTGRES_DB",
    "POSTGRES_USER",
    "PGSSLROOTCERT",
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGDATABASE",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGSSLMODE",
    "PGCONNECT_TIMEOUT",
    "PGAPPNAME",
    "BATCH_SIZE",
    "MAX_RETRY_COUNT",
    "POLL_INTERVAL",
    "LOG_LEVEL",
    "RUST_LOG",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// A password file that does not exist: the children read no `~/.pgpass` of the developer's.
const NO_PASSFILE: &str = "/nonexistent/hook-events-test-pgpass";

/// A command for one of the workspace's binaries with none of the variables it reads inherited
/// from the caller's environment (the list above and every `HOOK_*`), and no password file
/// (`PGPASSFILE` names a missing file), so a developer's settings cannot change what a test or a
/// benchmark sees. Set what the test needs on the returned command.
pub fn binary_command(program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
    let mut command = std::process::Command::new(program);
    for var in BINARY_VARIABLES {
        command.env_remove(var);
    }
    command.env("PGPASSFILE", NO_PASSFILE);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("HOOK_") {
            command.env_remove(name);
        }
    }
    command
}
