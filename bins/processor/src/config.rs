//! Flags and environment: parsed and checked here, turned into the library's config structs.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args as ClapArgs, Parser, Subcommand, ValueEnum};
use hook_cli::{parse_duration, UsageError};
use hook_core::{EngineConfig, RetryPolicy};
use hook_store::tokio_postgres::Config;
use hook_store::{ClusterOptions, DatabaseArgs, PasswordSource};

use crate::vacuum::VacuumConfig;

/// Processes hook events from PostgreSQL.
///
/// The database comes from DATABASE_URL; else from the original service's variables
/// (POSTGRES_HOST, POSTGRES_PORT, POSTGRES_DB, POSTGRES_USER, DB_PASSWORD or POSTGRES_PASSWORD);
/// else from libpq's PGHOST; else an embedded cluster is started under --data-dir. What these
/// leave open comes from libpq's PG* variables; the password from the URL, DB_PASSWORD or
/// POSTGRES_PASSWORD, PGPASSWORD or ~/.pgpass, in that order. A .env file in the working directory
/// is read first. Passwords are accepted only from the environment, never as flags.
///
/// Durations are seconds (30, 1.5) or a number with a unit (250ms, 30s, 5m, 12h, 7d, 2w).
///
/// `hook-processor stats` prints the queue's numbers instead of processing.
#[derive(Debug, Parser)]
#[command(name = "hook-processor", version, about, long_about)]
pub(crate) struct Args {
    /// What to do instead of processing.
    #[command(subcommand)]
    pub(crate) command: Option<Command>,

    /// PostgreSQL connection URL (postgres://user@host:port/db) or key=value string.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    database_url: Option<String>,

    /// Database host when DATABASE_URL is not set [default: localhost].
    #[arg(long, env = "POSTGRES_HOST", global = true)]
    postgres_host: Option<String>,

    /// Database port when DATABASE_URL is not set [default: 5436].
    #[arg(long, env = "POSTGRES_PORT", global = true)]
    postgres_port: Option<u16>,

    /// Database name when DATABASE_URL is not set [default: omninode_bridge].
    #[arg(long, env = "POSTGRES_DB", global = true)]
    postgres_db: Option<String>,

    /// Database user when DATABASE_URL is not set [default: postgres].
    #[arg(long, env = "POSTGRES_USER", global = true)]
    postgres_user: Option<String>,

    /// Directory of the embedded PostgreSQL cluster, used when no database is configured.
    #[arg(long, env = "HOOK_DATA_DIR", default_value = ".hook-data", global = true)]
    data_dir: PathBuf,

    /// Longest sleep between claims when idle; NOTIFY usually wakes the processor first.
    /// Seconds ("1.0") or with a unit ("500ms", "2s").
    #[arg(long, env = "POLL_INTERVAL", default_value = "1.0", value_parser = parse_duration)]
    poll_interval: Duration,

    /// Events claimed per batch (1-10000).
    #[arg(long, env = "BATCH_SIZE", default_value_t = 100)]
    batch_size: usize,

    /// Failed attempts after which an event is dead (1-10).
    #[arg(long, env = "MAX_RETRY_COUNT", default_value_t = 3)]
    max_retry_count: u32,

    /// Handlers running at once.
    #[arg(long, env = "HOOK_CONCURRENCY", default_value_t = 800)]
    concurrency: usize,

    /// Batches claimed and not yet finished, at most.
    #[arg(long, env = "HOOK_BATCHES_IN_FLIGHT", default_value_t = 8)]
    batches_in_flight: usize,

    /// Claims on their way to the database at once, at most, while a backlog drains (each takes
    /// one of the batches in flight); one at a time when the table is drained.
    #[arg(long, env = "HOOK_CLAIMS_IN_FLIGHT", default_value_t = 2)]
    claims_in_flight: usize,

    /// Bytes of JSON (payload + metadata) of the events held at once, over all batches: claims
    /// stop adding events past it, and an event larger than this alone is set aside dead
    /// without being fetched. Bytes, or with a unit ("64MiB", "512KiB", "1GiB").
    #[arg(long, env = "HOOK_MAX_BYTES_IN_FLIGHT", default_value = "32MiB", value_parser = parse_bytes)]
    max_bytes_in_flight: u64,

    /// Longest a handler may run before the attempt fails.
    #[arg(long, env = "HOOK_HANDLER_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    handler_timeout: Duration,

    /// How long a claim may go silent before the database releases it (must exceed the handler
    /// and drain timeouts).
    #[arg(long, env = "HOOK_CLAIM_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    claim_timeout: Duration,

    /// On SIGTERM/SIGINT, how long running handlers may still finish.
    #[arg(long, env = "HOOK_DRAIN_TIMEOUT", default_value = "25s", value_parser = parse_duration)]
    drain_timeout: Duration,

    /// Delay before the first retry; doubles with each failure.
    #[arg(long, env = "HOOK_RETRY_BASE_DELAY", default_value = "2s", value_parser = parse_duration)]
    retry_base_delay: Duration,

    /// Longest delay between retries.
    #[arg(long, env = "HOOK_RETRY_MAX_DELAY", default_value = "5m", value_parser = parse_duration)]
    retry_max_delay: Duration,

    /// How often the metrics line is logged ("0" for only at shutdown).
    #[arg(long, env = "HOOK_METRICS_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    metrics_interval: Duration,

    /// Serve /metrics (Prometheus), /healthz and /readyz on this address, e.g. 127.0.0.1:9477.
    /// Off unless set.
    #[arg(long, env = "HOOK_HTTP_ADDR")]
    pub(crate) http_addr: Option<SocketAddr>,

    /// Also serve the web console at /console on --http-addr: read-only unless
    /// HOOK_CONSOLE_TOKEN (or HOOK_CONSOLE_TOKEN_FILE) is set. Off unless set, since the console
    /// shows event payloads to whoever reaches the address (see docs/console.md).
    #[arg(long, env = "HOOK_CONSOLE")]
    console: bool,

    /// How often the queue-depth gauges of /metrics are refreshed (one query over the
    /// unprocessed rows).
    #[arg(long, env = "HOOK_GAUGE_INTERVAL", default_value = "15s", value_parser = parse_duration)]
    gauge_interval: Duration,

    /// The processing loop counts as stalled when it has neither completed a database round trip
    /// nor finished a handler for this long: /readyz fails and systemd's watchdog is no longer
    /// fed. Must exceed the handler timeout and the poll interval [default: the longer of the
    /// two + 15s].
    #[arg(long, env = "HOOK_STALL_TIMEOUT", value_parser = parse_duration)]
    stall_timeout: Option<Duration>,

    /// Longest one claim, keep-alive, completion, new connection or LISTEN ping may wait for the
    /// database. Past it the call fails, its connection is closed and the next one uses a fresh
    /// connection: a network gone silent is noticed this fast (TCP keepalives and
    /// tcp_user_timeout, from the URL or 10s/5s/3 and 20s, catch a dead peer too).
    #[arg(long, env = "HOOK_DB_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    db_timeout: Duration,

    /// At start, how long to keep retrying a database that cannot be reached (connection refused,
    /// timeout, server starting up) before giving up. Wrong credentials or a missing database
    /// fail at once. 0 (the default) fails at the first error.
    #[arg(long, env = "HOOK_WAIT_FOR_DATABASE", default_value = "0", value_parser = parse_duration)]
    wait_for_database: Duration,

    /// Routes file (TOML): deliver events to webhooks, commands and NATS JetStream by
    /// (source, action); see docs/routes.md. Checked at start-up: any mistake stops the start
    /// (exit 2) with its line. Without it, the built-in handlers only.
    #[arg(long, env = "HOOK_ROUTES")]
    pub(crate) routes: Option<PathBuf>,

    /// Accept events from hook-ingest on this local Unix socket, inserting them in batches on a
    /// connection kept open ("off" or unset: no socket). The units set
    /// %t/hook-events/ingest.sock, where hook-ingest looks by default.
    #[arg(long, env = "HOOK_INGEST_SOCKET")]
    ingest_socket: Option<PathBuf>,

    /// Permissions of the ingest socket, octal: 0600 (only the processor's user may connect) or
    /// 0660 (its group too).
    #[arg(long, env = "HOOK_INGEST_SOCKET_MODE", default_value = "0600", value_parser = parse_mode)]
    ingest_socket_mode: u32,

    /// synchronous_commit of the ingest socket's inserts (on, off, local, remote_write,
    /// remote_apply) [default: the server's]. "off" answers hooks before the WAL reaches the
    /// disk: a database crash can then lose the last fraction of a second of their events.
    #[arg(long, env = "HOOK_INGEST_SYNCHRONOUS_COMMIT", value_parser = parse_synchronous_commit)]
    ingest_synchronous_commit: Option<&'static str>,

    /// VACUUM hook_events once its dead row versions (n_dead_tup) reach this many, between
    /// autovacuum's naps; one processor of several at a time. 0 turns the task off (autovacuum
    /// alone). Needs a role that may vacuum the table (see docs/operations.md).
    #[arg(long, env = "HOOK_VACUUM_DEAD_TUPLES", default_value_t = 20_000)]
    vacuum_dead_tuples: u64,

    /// How often the vacuum task reads the dead row versions.
    #[arg(long, env = "HOOK_VACUUM_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    vacuum_interval: Duration,

    /// Log level or filter (error, warn, info, debug, trace, or tracing directives).
    #[arg(long, env = "LOG_LEVEL", default_value = "info", global = true)]
    log_level: String,

    /// Log format: text for people, json (one object per line) for journald or Loki.
    #[arg(long, env = "HOOK_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Print the queue's numbers: pending, retrying and dead events now; events processed in a
    /// window with their time to process (avg, p95, max) and error rate; failing routes and
    /// sinks (of a routes file) with their latest error. Reads only, through the table's indexes.
    Stats(StatsArgs),
}

/// Flags of `hook-processor stats`.
#[derive(Debug, Clone, ClapArgs)]
pub(crate) struct StatsArgs {
    /// The window: events processed (or died) within this long before now. "1h", "30m", "7d".
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub(crate) since: Duration,

    /// Print one JSON object instead of the text report.
    #[arg(long)]
    pub(crate) json: bool,

    /// The p95 is taken over the latest this many events of the window (a percentile needs a
    /// sort; this bounds it).
    #[arg(long, default_value_t = 100_000)]
    pub(crate) p95_of: u64,

    /// At most this many failing routes (and as many failing sinks).
    #[arg(long, default_value_t = 20)]
    pub(crate) routes: usize,

    /// Give up on a query after this long.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub(crate) timeout: Duration,
}

/// What the binary does around the engine: health, systemd, the metrics endpoint, the ingest
/// socket.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct OpsConfig {
    /// Where /metrics, /healthz and /readyz are served; `None`: not at all.
    pub(crate) http_addr: Option<SocketAddr>,
    /// How often the queue-depth gauges are refreshed.
    pub(crate) gauge_interval: Duration,
    /// No progress for this long means the loop is stalled.
    pub(crate) stall_timeout: Duration,
    /// How long to retry an unreachable database at start.
    pub(crate) wait_for_database: Duration,
    /// The deadline of each call to the database (`StoreOptions::call_timeout`).
    pub(crate) db_timeout: Duration,
    /// Whether the web console is served at /console on `http_addr`.
    pub(crate) console: bool,
    /// The ingest socket to serve; `None`: none.
    pub(crate) ingest_socket: Option<IngestSocket>,
    /// The vacuum task.
    pub(crate) vacuum: VacuumConfig,
}

/// The ingest socket to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IngestSocket {
    /// Its path, absolute.
    pub(crate) path: PathBuf,
    /// Its permissions.
    pub(crate) mode: u32,
    /// `synchronous_commit` of its inserts; `None`: the server's.
    pub(crate) synchronous_commit: Option<&'static str>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (journald, Loki).
    Json,
}

/// Where the events are.
pub(crate) enum Database {
    /// A server the user configured, and where its password came from.
    Configured(Box<Config>, PasswordSource),
    /// The embedded cluster.
    Embedded(ClusterOptions),
}

impl Args {
    pub(crate) fn engine_config(&self) -> anyhow::Result<EngineConfig> {
        let config = EngineConfig {
            batch_size: self.batch_size,
            concurrency: self.concurrency,
            batches_in_flight: self.batches_in_flight,
            claims_in_flight: self.claims_in_flight,
            poll_interval: self.poll_interval,
            claim_timeout: self.claim_timeout,
            handler_timeout: self.handler_timeout,
            drain_timeout: self.drain_timeout,
            retry: RetryPolicy {
                base_delay: self.retry_base_delay,
                max_delay: self.retry_max_delay,
                max_retry_count: self.max_retry_count,
                ..RetryPolicy::default()
            },
            metrics_interval: (!self.metrics_interval.is_zero()).then_some(self.metrics_interval),
            max_bytes_in_flight: self.max_bytes_in_flight,
        };
        config.validate().map_err(|e| UsageError(format!("invalid configuration: {e}")))?;
        Ok(config)
    }

    /// The settings around the engine, checked against the engine's.
    pub(crate) fn ops_config(&self, engine: &EngineConfig) -> anyhow::Result<OpsConfig> {
        // An idle loop claims every poll interval, a busy one finishes a handler at least every
        // handler timeout: the default leaves 15 s on top of the longer of the two.
        let stall_timeout = self
            .stall_timeout
            .unwrap_or(engine.handler_timeout.max(engine.poll_interval) + Duration::from_secs(15));
        if stall_timeout <= engine.handler_timeout || stall_timeout <= engine.poll_interval {
            return Err(UsageError(format!(
                "invalid configuration: stall timeout ({stall_timeout:?}) must be longer than the handler \
                 timeout ({:?}) and the poll interval ({:?})",
                engine.handler_timeout, engine.poll_interval
            ))
            .into());
        }
        if self.gauge_interval.is_zero() {
            return Err(
                UsageError("invalid configuration: gauge interval must be greater than zero".into()).into()
            );
        }
        if self.db_timeout.is_zero() {
            anyhow::bail!("invalid configuration: database timeout must be greater than zero");
        }
        if self.vacuum_interval.is_zero() {
            return Err(UsageError(
                "invalid configuration: vacuum interval (HOOK_VACUUM_INTERVAL) must be greater than zero"
                    .into(),
            )
            .into());
        }
        if self.console && self.http_addr.is_none() {
            anyhow::bail!(
                "invalid configuration: --console (HOOK_CONSOLE) needs --http-addr (HOOK_HTTP_ADDR)"
            );
        }
        Ok(OpsConfig {
            http_addr: self.http_addr,
            gauge_interval: self.gauge_interval,
            stall_timeout,
            wait_for_database: self.wait_for_database,
            db_timeout: self.db_timeout,
            console: self.console,
            ingest_socket: self.ingest_socket()?,
            vacuum: VacuumConfig {
                dead_tuples: (self.vacuum_dead_tuples > 0).then_some(self.vacuum_dead_tuples),
                interval: self.vacuum_interval,
            },
        })
    }

    /// The ingest socket to serve, if one is configured.
    pub(crate) fn ingest_socket(&self) -> anyhow::Result<Option<IngestSocket>> {
        let Some(path) = self.ingest_socket.as_ref().filter(|path| !path.as_os_str().is_empty()) else {
            return Ok(None);
        };
        if path.as_os_str().eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        let path = std::path::absolute(path).context("reading the working directory")?;
        Ok(Some(IngestSocket {
            path,
            mode: self.ingest_socket_mode,
            synchronous_commit: self.ingest_synchronous_commit,
        }))
    }

    /// The database for `stats`: like [`database`](Self::database), but an embedded cluster is
    /// only used when its server is already running (a report starts no server).
    pub(crate) fn stats_database(&self) -> anyhow::Result<(Config, PasswordSource)> {
        match self.database()? {
            Database::Configured(config, password) => Ok((*config, password)),
            Database::Embedded(options) => {
                let config =
                    hook_store::EmbeddedCluster::running_config(&options.data_dir, &options.database)
                        .ok_or_else(|| {
                            UsageError(format!(
                            "no database configured (DATABASE_URL, POSTGRES_* or PGHOST) and no embedded \
                             PostgreSQL running under {}",
                            options.data_dir.display()
                        ))
                        })?;
                Ok((config, PasswordSource::None))
            }
        }
    }

    /// The database: the one the flags, `POSTGRES_*`, `DB_PASSWORD` and libpq's variables name
    /// (see `hook_store::DatabaseArgs::resolve_with`), else the embedded cluster.
    pub(crate) fn database(&self) -> anyhow::Result<Database> {
        let args = DatabaseArgs {
            url: self.database_url.clone(),
            host: self.postgres_host.clone(),
            port: self.postgres_port,
            database: self.postgres_db.clone(),
            user: self.postgres_user.clone(),
            password: env_nonempty("DB_PASSWORD").or_else(|| env_nonempty("POSTGRES_PASSWORD")),
        };
        if let Some(resolved) = hook_cli::resolve_database("hook-processor", &args)? {
            return Ok(Database::Configured(Box::new(resolved.config), resolved.password));
        }
        let data_dir = if self.data_dir.is_absolute() {
            self.data_dir.clone()
        } else {
            std::env::current_dir().context("reading the working directory")?.join(&self.data_dir)
        };
        Ok(Database::Embedded(ClusterOptions {
            data_dir,
            database: "hook_events".into(),
            durable: true,
            max_connections: 100,
        }))
    }
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

pub(crate) fn init_logging(args: &Args) -> anyhow::Result<()> {
    // A bare level applies to our crates; the database driver's chatter (server NOTICEs) stays
    // at warn unless the user names it.
    let mut directives = args.log_level.to_lowercase();
    hook_cli::check_log_directives(&directives).map_err(|e| UsageError(format!("LOG_LEVEL: {e}")))?;
    if !directives.contains("tokio_postgres") {
        directives.push_str(",tokio_postgres=warn");
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .map_err(|_| UsageError(format!("LOG_LEVEL {:?} is not a log level or filter", args.log_level)))?;
    // Colours only on a terminal: journald and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // JSON: the event's fields at the top level, the fields of the span it ran in (`event_id`,
    // `source`, `action`, `attempt` for everything a handler logs) under "span".
    let result = match args.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => {
            builder.json().flatten_event(true).with_current_span(true).with_span_list(false).try_init()
        }
    };
    result.map_err(|e| anyhow::anyhow!("setting up logging: {e}"))
}

/// Parses an octal file mode for the ingest socket: "0600", "660", "0o660". A mode that lets
/// every local user connect (write permission for others) is refused: anyone could then insert
/// events.
pub(crate) fn parse_mode(text: &str) -> Result<u32, String> {
    let digits = text.trim();
    let digits = digits.strip_prefix("0o").unwrap_or(digits);
    let mode = u32::from_str_radix(digits, 8)
        .ok()
        .filter(|mode| *mode <= 0o777 && !digits.is_empty())
        .ok_or_else(|| format!("{text:?} is not an octal file mode such as 0600 or 0660"))?;
    if mode & 0o002 != 0 {
        return Err(format!(
            "{text:?} would let every local user insert events; use 0600, or 0660 and a group"
        ));
    }
    Ok(mode)
}

/// One of the values PostgreSQL takes for `synchronous_commit`, any case.
pub(crate) fn parse_synchronous_commit(text: &str) -> Result<&'static str, String> {
    let values = hook_ingest::settings::SYNCHRONOUS_COMMIT;
    values
        .iter()
        .find(|value| value.eq_ignore_ascii_case(text.trim()))
        .copied()
        .ok_or_else(|| format!("{text:?} is not one of {}", values.join(", ")))
}

/// Parses a byte count: "1048576", or with a unit: "512KiB", "64MiB", "1GiB" (powers of 1024;
/// "K", "M", "G", "KB", "MB", "GB" mean the same).
pub(crate) fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("{text:?} is not a size (try 1048576, 512KiB, 64MiB, 1GiB)")),
    };
    let value: u64 =
        number.parse().map_err(|_| format!("{text:?} is not a size (try 1048576, 512KiB, 64MiB, 1GiB)"))?;
    value.checked_mul(scale).ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_the_shared_forms() {
        let args =
            Args::try_parse_from(["hook-processor", "--poll-interval", "0.25", "--handler-timeout", "2w"])
                .unwrap();
        assert_eq!(args.poll_interval, Duration::from_millis(250));
        assert_eq!(args.handler_timeout, Duration::from_secs(14 * 86_400));
        assert!(Args::try_parse_from(["hook-processor", "--poll-interval", "soon"]).is_err());
    }

    #[test]
    fn sizes() {
        for (text, bytes) in
            [("1048576", 1 << 20), ("64MiB", 64 << 20), ("512k", 512 << 10), ("1 GiB", 1 << 30)]
        {
            assert_eq!(parse_bytes(text).unwrap(), bytes, "{text}");
        }
        for bad in ["", "x", "-1", "1.5MiB", "1TiB", "99999999999999999999"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_values_are_refused() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["hook-processor"];
            argv.extend_from_slice(extra);
            Args::try_parse_from(argv).unwrap().engine_config().map(|_| ()).map_err(|e| format!("{e:#}"))
        };
        assert!(parse(&[]).is_ok());
        assert!(parse(&["--batch-size", "0"]).unwrap_err().contains("batch size 0"));
        assert!(parse(&["--max-retry-count", "11"]).unwrap_err().contains("max retry count 11"));
        assert!(parse(&["--max-bytes-in-flight", "1KiB"]).unwrap_err().contains("bytes in flight 1024"));
    }

    #[test]
    fn stall_timeout_defaults_above_handler_timeout_and_poll_interval() {
        let ops = |extra: &[&str]| {
            let mut argv = vec!["hook-processor"];
            argv.extend_from_slice(extra);
            let args = Args::try_parse_from(argv).unwrap();
            let engine = args.engine_config().unwrap();
            args.ops_config(&engine).map_err(|e| format!("{e:#}"))
        };
        assert_eq!(ops(&[]).unwrap().stall_timeout, Duration::from_secs(45));
        assert_eq!(ops(&["--poll-interval", "60"]).unwrap().stall_timeout, Duration::from_secs(75));
        assert_eq!(ops(&["--stall-timeout", "31s"]).unwrap().stall_timeout, Duration::from_secs(31));
        assert!(ops(&["--stall-timeout", "30s"]).unwrap_err().contains("stall timeout"));
        assert_eq!(ops(&[]).unwrap().http_addr, None);
        assert_eq!(ops(&[]).unwrap().db_timeout, hook_store::DEFAULT_CALL_TIMEOUT);
        assert_eq!(ops(&["--db-timeout", "5s"]).unwrap().db_timeout, Duration::from_secs(5));
        assert!(ops(&["--db-timeout", "0"]).unwrap_err().contains("database timeout"));
        let addr = ops(&["--http-addr", "127.0.0.1:9477"]).unwrap().http_addr;
        assert_eq!(addr, Some("127.0.0.1:9477".parse().unwrap()));
        assert!(!ops(&[]).unwrap().console);
        assert!(ops(&["--console"]).unwrap_err().contains("needs --http-addr"));
        assert!(ops(&["--console", "--http-addr", "127.0.0.1:9477"]).unwrap().console);
    }

    #[test]
    fn the_vacuum_task_is_on_by_default_and_zero_turns_it_off() {
        let vacuum = |extra: &[&str]| {
            let mut argv = vec!["hook-processor"];
            argv.extend_from_slice(extra);
            let args = Args::try_parse_from(argv).map_err(|e| e.to_string())?;
            let engine = args.engine_config().map_err(|e| format!("{e:#}"))?;
            args.ops_config(&engine).map(|ops| ops.vacuum).map_err(|e| format!("{e:#}"))
        };
        let defaults = VacuumConfig { dead_tuples: Some(20_000), interval: Duration::from_secs(1) };
        assert_eq!(vacuum(&[]).unwrap(), defaults);
        assert_eq!(vacuum(&["--vacuum-dead-tuples", "0"]).unwrap().dead_tuples, None);
        let tuned = vacuum(&["--vacuum-dead-tuples", "5000", "--vacuum-interval", "250ms"]).unwrap();
        assert_eq!(tuned, VacuumConfig { dead_tuples: Some(5_000), interval: Duration::from_millis(250) });
        let error = vacuum(&["--vacuum-interval", "0"]).unwrap_err();
        assert_eq!(
            error,
            "invalid configuration: vacuum interval (HOOK_VACUUM_INTERVAL) must be greater than zero"
        );
        assert!(vacuum(&["--vacuum-dead-tuples", "-1"]).is_err());
        assert!(vacuum(&["--vacuum-interval", "soon"]).is_err());
    }

    #[test]
    fn the_ingest_socket_is_off_unless_named() {
        let socket = |extra: &[&str]| {
            let mut argv = vec!["hook-processor"];
            argv.extend_from_slice(extra);
            Args::try_parse_from(argv).map_err(|e| e.to_string())?.ingest_socket().map_err(|e| e.to_string())
        };
        assert_eq!(socket(&[]).unwrap(), None);
        assert_eq!(socket(&["--ingest-socket", "off"]).unwrap(), None);
        let named = socket(&["--ingest-socket", "/run/hook-events/ingest.sock"]).unwrap();
        let expected = IngestSocket {
            path: "/run/hook-events/ingest.sock".into(),
            mode: 0o600,
            synchronous_commit: None,
        };
        assert_eq!(named, Some(expected));
        let off = socket(&["--ingest-socket", "/s.sock", "--ingest-synchronous-commit", "OFF"]).unwrap();
        assert_eq!(off.and_then(|s| s.synchronous_commit), Some("off"));
        let error =
            socket(&["--ingest-socket", "/s.sock", "--ingest-synchronous-commit", "maybe"]).unwrap_err();
        assert!(error.contains("is not one of on, off"), "{error}");
        let group = socket(&["--ingest-socket", "/s.sock", "--ingest-socket-mode", "0660"]).unwrap();
        assert_eq!(group.map(|s| s.mode), Some(0o660));
        let relative = socket(&["--ingest-socket", "s.sock"]).unwrap().unwrap();
        assert!(relative.path.is_absolute(), "{relative:?}");
        for bad in ["0800", "rw", "", "01777"] {
            let error = socket(&["--ingest-socket", "/s.sock", "--ingest-socket-mode", bad]).unwrap_err();
            assert!(error.contains("octal file mode"), "{bad}: {error}");
        }
        for open in ["0666", "0o602"] {
            let error = socket(&["--ingest-socket", "/s.sock", "--ingest-socket-mode", open]).unwrap_err();
            assert!(error.contains("every local user"), "{open}: {error}");
        }
        let read_only = socket(&["--ingest-socket", "/s.sock", "--ingest-socket-mode", "0644"]).unwrap();
        assert_eq!(read_only.map(|s| s.mode), Some(0o644), "others may not connect: allowed");
    }

    #[test]
    fn stats_takes_its_flags_and_the_global_ones() {
        let args = Args::try_parse_from([
            "hook-processor",
            "stats",
            "--since",
            "7d",
            "--json",
            "--database-url",
            "postgres://u@h/d",
        ])
        .unwrap();
        let Some(Command::Stats(stats)) = &args.command else { panic!("not stats: {args:?}") };
        assert_eq!((stats.since, stats.json, stats.p95_of), (Duration::from_secs(7 * 86400), true, 100_000));
        assert!(args.stats_database().is_ok());
    }
}
