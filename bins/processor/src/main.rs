//! `hook-processor`: claims rows of `hook_events`, routes each to its handler, retries failures
//! with backoff and records the outcome. With no database configured it runs on an embedded
//! PostgreSQL cluster under `--data-dir`.
//!
//! Around the engine it tells systemd when it is ready and whether it still makes progress
//! (`notify`), serves Prometheus metrics and health probes when asked to (`http`, `health`), and
//! `hook-processor stats` prints the queue's numbers (`stats`).

mod config;
mod health;
mod http;
mod ingest;
mod notify;
mod routes;
mod stats;
mod vacuum;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hook_core::Engine;
use hook_store::{redacted, EmbeddedCluster, PasswordSource, PgStore, StoreError, StoreOptions};
use tracing::{info, warn};

use crate::config::{Args, Command, Database, OpsConfig};
use crate::health::{Health, PROBE_TIMEOUT};
use crate::notify::Notifier;

const PROGRAM: &str = "hook-processor";

fn main() -> ExitCode {
    // A missing .env is normal; a malformed one is an error worth stopping for.
    if let Err(error) = dotenvy::dotenv() {
        if !error.not_found() {
            eprintln!("hook-processor: error: reading .env: {error}");
            return ExitCode::from(2);
        }
    }
    let args = match hook_cli::parse_args::<Args>(PROGRAM) {
        Ok(args) => args,
        Err(code) => return code,
    };
    // systemd's variables are read, and removed from the environment, before any thread starts.
    let notifier = Arc::new(Notifier::from_env());
    // One line on stderr; exit 2 for a mistake in the configuration, 1 for anything else.
    hook_cli::exit_code(PROGRAM, run(args, notifier))
}

fn run(args: Args, notifier: Arc<Notifier>) -> anyhow::Result<()> {
    config::init_logging(&args)?;
    if let Some(Command::Stats(stats_args)) = &args.command {
        let (database, password) = args.stats_database()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        return runtime.block_on(stats::run(database, &password, stats_args));
    }
    let engine_config = args.engine_config()?;
    let ops = args.ops_config(&engine_config)?;
    let routes = args.routes.as_deref().map(|path| routes::load(path, &engine_config)).transpose()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(async {
        let health = Health::new(ops.stall_timeout);
        let console = console_state(&ops)?;
        if let Some(addr) = ops.http_addr {
            let prometheus = http::install_recorder()?;
            http::serve(addr, health.clone(), prometheus, console.clone()).await?;
        }
        // After the recorder (the sinks' metric handles), before the database.
        let registry = routes::registry(routes.as_ref(), args.routes.as_deref()).await?;
        let starting = tokio::spawn(notify::extend_while_starting(Arc::clone(&notifier)));
        notifier.status("connecting to the database");
        let (pg_config, password, cluster) = match args.database()? {
            Database::Configured(config, password) => (*config, password, None),
            Database::Embedded(options) => {
                let dir = options.data_dir.clone();
                let cluster = EmbeddedCluster::start(options)
                    .await
                    .with_context(|| format!("starting the embedded PostgreSQL under {}", dir.display()))?;
                info!(url = %cluster.url("hook_events"), "embedded PostgreSQL ready; insert events with: psql \"{}\"", cluster.url("hook_events"));
                (cluster.config("hook_events"), PasswordSource::None, Some(cluster))
            }
        };
        let session_order = routes.as_ref().map(hook_sinks::RoutesFile::session_order).unwrap_or_default();
        let work = Work { engine_config, registry, console, session_order };
        let result = process(pg_config, &password, work, &ops, health, notifier, starting).await;
        if let Some(cluster) = cluster {
            cluster.stop().await.context("stopping the embedded PostgreSQL")?;
        }
        result
    });
    // Whatever is left (a connection waiting on a silent socket, a DNS lookup on a blocking
    // thread) must not hold up the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// After SIGTERM/SIGINT, how long past the drain timeout the processor waits for the engine to
/// record the drained outcomes before it exits anyway: an unreachable database must not keep it
/// running until systemd's SIGKILL (`TimeoutStopSec=30s` against the 25 s drain timeout).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// What the processor runs once the database is there: the engine with its configuration and
/// handlers (the routes file's, or the built-in ones), and the console's pages when enabled.
struct Work {
    engine_config: hook_core::EngineConfig,
    registry: hook_core::HandlerRegistry,
    console: Option<hook_console::ConsoleState>,
    /// Which events the claims take in session order (the routes file's `order`).
    session_order: hook_core::SessionOrder,
}

/// After the engine stopped, how long the processor waits for the ingest socket's server to
/// finish the requests it had read (it stopped accepting at the signal).
const INGEST_STOP_WAIT: Duration = Duration::from_secs(2);

async fn process(
    pg_config: hook_store::tokio_postgres::Config,
    password: &PasswordSource,
    work: Work,
    ops: &OpsConfig,
    health: Health,
    notifier: Arc<Notifier>,
    starting: tokio::task::JoinHandle<()>,
) -> anyhow::Result<()> {
    let Work { engine_config, registry, console, session_order } = work;
    let pg_config = hook_store::with_service_defaults(pg_config, "hook-processor");
    let shown = redacted(&pg_config);
    let options = StoreOptions {
        pool_size: engine_config.batches_in_flight + 2,
        // libpq's variable for extra trusted roots (sslmode=require); see hook_store::tls.
        tls_root_cert: std::env::var_os("PGSSLROOTCERT").filter(|v| !v.is_empty()).map(Into::into),
        call_timeout: ops.db_timeout,
        session_order,
        ..StoreOptions::default()
    };
    let store = connect(&pg_config, options.clone(), ops.wait_for_database, &notifier)
        .await
        .with_context(|| hook_cli::connecting_to(&shown, password))?;
    notifier.status("applying migrations");
    // A database that restarts or goes away right after the connect (a failover, a restart under
    // systemd's ordering) fails the migrations the same way the connect would have: wait for it
    // as the connect does, instead of exiting.
    let report = until_reachable(ops.wait_for_database, &notifier, || store.migrate())
        .await
        .with_context(|| format!("migrating {shown}"))?;
    // The migrations refuse a table that does not fit before they touch it; this also covers a
    // table changed after they were applied. Either way nothing is claimed.
    until_reachable(ops.wait_for_database, &notifier, || async {
        let client = store.pool().get().await?;
        hook_store::schema::check(&client, hook_store::schema::Scope::QUEUE).await
    })
    .await
    .with_context(|| format!("checking the tables of {shown}"))?;
    info!(database = %shown, applied = ?report.applied, "database ready");
    let (stop_ingest, ingest_stopped) = tokio::sync::watch::channel(false);
    let ingest = match &ops.ingest_socket {
        Some(socket) => Some(ingest::start(&pg_config, &options, socket, ingest_stopped).await?),
        None => None,
    };
    // Probes and gauge queries get a pool of their own, so they never wait behind the engine.
    // Same connection settings (TLS included) as the engine's.
    let probe_options =
        StoreOptions { pool_size: 2, listen: false, pool_timeout: PROBE_TIMEOUT, ..options.clone() };
    // The console's pages get a small pool of their own too.
    let console_store = match &console {
        Some(console) => {
            let console_options = StoreOptions { pool_size: 3, listen: false, ..options };
            let store = PgStore::connect(pg_config.clone(), console_options)
                .await
                .with_context(|| format!("connecting to {shown}"))?;
            console.attach(store.pool().clone());
            // Beside the engine: on a large table the build takes minutes.
            let pool = store.pool().clone();
            tokio::spawn(async move { hook_console::build_indexes(&pool).await });
            Some(store)
        }
        None => None,
    };
    // The vacuum task gets one connection of its own: a VACUUM may run for seconds.
    let vacuum_store = match ops.vacuum.dead_tuples {
        Some(_) => {
            let vacuum_options = StoreOptions { pool_size: 1, listen: false, ..probe_options.clone() };
            let store = PgStore::connect(pg_config.clone(), vacuum_options)
                .await
                .with_context(|| format!("connecting to {shown}"))?;
            Some(store)
        }
        None => None,
    };
    let vacuum_task =
        vacuum_store.as_ref().map(|store| tokio::spawn(vacuum::run(store.pool().clone(), ops.vacuum)));
    let probe =
        PgStore::connect(pg_config, probe_options).await.with_context(|| format!("connecting to {shown}"))?;
    health.attach_probe_pool(probe.pool().clone());
    let stop_within = engine_config.drain_timeout + SHUTDOWN_GRACE;
    let presence = store.presence();
    let engine = Engine::builder(store).registry(registry).config(engine_config).build()?;
    health.attach_engine(engine.metrics());
    starting.abort();
    let supervisor = tokio::spawn(notify::supervise(Arc::clone(&notifier), health.clone()));
    let gauges =
        ops.http_addr.map(|_| tokio::spawn(http::refresh_gauges(health.clone(), ops.gauge_interval)));
    // The signal is awaited in a task of its own: the engine polls its shutdown future only
    // between store calls, and the bound below must start when the signal arrives.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let signals = {
        let (health, notifier, stop_ingest) = (health.clone(), Arc::clone(&notifier), stop_ingest.clone());
        // Registered here, before the engine announces itself: a handler installed only when the
        // task first runs could leave a SIGTERM sent right after "engine started" to the
        // default action (the process killed, under load).
        let signal = shutdown_signal();
        tokio::spawn(async move {
            signal.await;
            health.set_stopping();
            notifier.stopping();
            // New hooks go to the database while the engine drains.
            stop_ingest.send_replace(true);
            stop_tx.send_replace(true);
        })
    };
    let shutdown = {
        let mut stop = stop_rx.clone();
        async move {
            let _ = stop.wait_for(|stop| *stop).await;
        }
    };
    // The engine bounds its drain, but recording the drained outcomes and a claim under way at
    // the signal wait for the database, each up to the database timeout: past the drain timeout
    // plus a grace the processor stops waiting. Dropping the engine closes its connections; the
    // server rolls back what they had not committed, and those events are claimed again later.
    let overdue = async move {
        let mut stop = stop_rx;
        if stop.wait_for(|stop| *stop).await.is_ok() {
            tokio::time::sleep(stop_within).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let totals = tokio::select! {
        totals = engine.run(shutdown) => Some(totals),
        () = overdue => None,
    };
    if totals.is_some() {
        // A database that did not answer the drain would not answer this either.
        presence.leave().await;
    }
    stop_ingest.send_replace(true);
    if let Some(ingest) = ingest {
        // Requests already read are inserted or answered within the server's grace period, which
        // began at the signal, alongside the engine's drain.
        let _ = tokio::time::timeout(INGEST_STOP_WAIT, ingest).await;
    }
    supervisor.abort();
    signals.abort();
    if let Some(gauges) = gauges {
        gauges.abort();
    }
    if let Some(vacuum_task) = vacuum_task {
        vacuum_task.abort();
    }
    match totals {
        Some(totals) => notifier.status(&format!("stopped; {totals}")),
        None => {
            warn!(
                waited_s = stop_within.as_secs_f64(),
                "shutdown did not finish within the drain timeout + {}s (is the database answering?); \
                 exiting anyway: outcomes not yet committed are rolled back when the server ends our \
                 sessions, and those events will be handled again",
                SHUTDOWN_GRACE.as_secs()
            );
            notifier.status("stopped without finishing the drain: the database did not answer");
        }
    }
    drop(probe);
    drop(console_store);
    drop(vacuum_store);
    Ok(())
}

/// The web console's state when `--console` is set: its token from the environment (read-only
/// without one); the pool is attached once the database is connected.
fn console_state(ops: &OpsConfig) -> anyhow::Result<Option<hook_console::ConsoleState>> {
    if !ops.console {
        return Ok(None);
    }
    let token = match hook_cli::console_token()? {
        Some(text) => Some(hook_console::Token::new(&text).context("invalid configuration")?),
        None => None,
    };
    let config = hook_console::ConsoleConfig { token, ..hook_console::ConsoleConfig::default() };
    Ok(Some(hook_console::ConsoleState::unattached(config)))
}

/// Connects, retrying for up to `wait` while the database is unreachable (refused, timed out,
/// starting up, out of connections); errors that waiting cannot fix (credentials, a missing
/// database) are returned at once.
async fn connect(
    config: &hook_store::tokio_postgres::Config,
    options: StoreOptions,
    wait: Duration,
    notifier: &Notifier,
) -> Result<PgStore, StoreError> {
    until_reachable(wait, notifier, || PgStore::connect(config.clone(), options.clone())).await
}

/// Runs `call`, again for up to `wait` while it fails because the database is unreachable
/// ([`is_transient`]); other errors are returned at once.
async fn until_reachable<T, F, Fut>(wait: Duration, notifier: &Notifier, mut call: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let deadline = Instant::now() + wait;
    let mut delay = Duration::from_millis(500);
    loop {
        match call().await {
            Ok(value) => return Ok(value),
            Err(error) if is_transient(&error) && Instant::now() + delay < deadline => {
                warn!(%error, retry_in_s = delay.as_secs_f64(), "database unreachable; waiting for it");
                notifier.status(&format!("waiting for the database: {error}"));
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(error) => return Err(error),
        }
    }
}

/// Whether waiting may help: no answer at all (or none in time), or SQLSTATE class 08 (connection exception), 53
/// (insufficient resources) or 57 (operator intervention: starting up, shutting down).
fn is_transient(error: &StoreError) -> bool {
    match error {
        StoreError::Pool(_) | StoreError::Timeout { .. } => true,
        StoreError::Db(error) => {
            error.code().is_none_or(|code| matches!(code.code().get(..2), Some("08" | "53" | "57")))
        }
        _ => false,
    }
}

/// Waits for SIGTERM or SIGINT. The handlers are installed when this is called, not when the
/// future is first polled.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let streams =
        signal(SignalKind::terminate()).and_then(|term| Ok((term, signal(SignalKind::interrupt())?)));
    async move {
        match streams {
            Ok((mut term, mut int)) => tokio::select! {
                _ = term.recv() => info!("SIGTERM received"),
                _ = int.recv() => info!("SIGINT received"),
            },
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM; stop with SIGINT");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
