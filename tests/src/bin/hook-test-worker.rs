//! `hook-test-worker`: a processor embedding the engine, for the crash tests.
//!
//! Its one handler, `("*", "*")`, sleeps `--delay-ms`, then records the invocation (event id and
//! this process's pid) in `test_invocations` through a connection of its own, outside the claim's
//! transaction: an invocation stays recorded even when the batch never commits (say, because the
//! process was killed). Comparing `test_invocations` with `hook_events` then shows which events were
//! handled, how often, and by which process.
//!
//! ```text
//! hook-test-worker --url <conn> [--delay-ms 0] [--batch-size 100] [--batches-in-flight 2]
//! ```
//!
//! Runs until SIGTERM or SIGINT, then drains and exits 0. Logs to stderr.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use hook_core::{Engine, EngineConfig, HandlerResult, HookEvent, WILDCARD};
use hook_store::{parse_database_url, PgStore, StoreOptions};
use tokio_postgres::NoTls;
use tracing::info;

/// The test-only table of handler invocations. Created under an advisory lock, because two
/// workers starting at once would otherwise race in `CREATE TABLE IF NOT EXISTS` (it is not
/// atomic in PostgreSQL and can fail with a unique violation on `pg_type`).
const CREATE_INVOCATIONS: &str = "BEGIN; \
     SELECT pg_advisory_xact_lock(7415161718); \
     CREATE TABLE IF NOT EXISTS test_invocations ( \
         event_id uuid NOT NULL, \
         pid int NOT NULL, \
         at timestamptz NOT NULL DEFAULT clock_timestamp() \
     ); \
     COMMIT";

const RECORD_INVOCATION: &str = "INSERT INTO test_invocations (event_id, pid) VALUES ($1, $2)";

/// The command line.
#[derive(Debug)]
struct Args {
    url: String,
    delay: Duration,
    batch_size: usize,
    batches_in_flight: usize,
}

impl Args {
    fn parse(mut argv: impl Iterator<Item = String>) -> anyhow::Result<Args> {
        let mut url = None;
        let mut delay_ms = 0u64;
        let mut batch_size = 100usize;
        let mut batches_in_flight = 2usize;
        while let Some(flag) = argv.next() {
            let mut value = || argv.next().with_context(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--url" => url = Some(value()?),
                "--delay-ms" => delay_ms = number(&flag, &value()?)?,
                "--batch-size" => batch_size = number(&flag, &value()?)?,
                "--batches-in-flight" => batches_in_flight = number(&flag, &value()?)?,
                other => bail!("unknown argument {other:?}"),
            }
        }
        Ok(Args {
            url: url.context("--url is required")?,
            delay: Duration::from_millis(delay_ms),
            batch_size,
            batches_in_flight,
        })
    }
}

fn number<T: std::str::FromStr>(flag: &str, text: &str) -> anyhow::Result<T> {
    text.parse().map_err(|_| anyhow::anyhow!("{flag}: {text:?} is not a non-negative integer"))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let result = Args::parse(std::env::args().skip(1)).and_then(|args| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?
            .block_on(run(args))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hook-test-worker: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let shutdown = shutdown_signal()?;
    let pid = i32::try_from(std::process::id()).context("pid out of range")?;
    let mut config = parse_database_url(&args.url)?;
    // Lets a test find (and wait out) this process's sessions after killing it.
    config.application_name(format!("hook-test-worker-{pid}"));

    let store =
        PgStore::connect(config.clone(), StoreOptions::default()).await.context("connecting the store")?;
    store.migrate().await.context("migrating")?;

    let (client, connection) = config.connect(NoTls).await.context("connecting the invocation recorder")?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(%error, "invocation recorder connection ended");
        }
    });
    client.batch_execute(CREATE_INVOCATIONS).await.context("creating test_invocations")?;
    let record = client.prepare(RECORD_INVOCATION).await.context("preparing the invocation insert")?;
    let client = Arc::new(client);

    let delay = args.delay;
    let handler = move |event: Arc<HookEvent>| {
        let client = Arc::clone(&client);
        let record = record.clone();
        async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            client
                .execute(&record, &[&event.id, &pid])
                .await
                .map(|_| HandlerResult::ok("ok"))
                .map_err(|e| format!("recording the invocation: {e}"))
        }
    };
    let engine = Engine::builder(store)
        .handler(WILDCARD, WILDCARD, handler)
        .config(EngineConfig {
            batch_size: args.batch_size,
            batches_in_flight: args.batches_in_flight,
            poll_interval: Duration::from_millis(200),
            metrics_interval: None,
            ..EngineConfig::default()
        })
        .build()
        .context("building the engine")?;
    info!(pid, delay_ms = delay.as_millis() as u64, "hook-test-worker running");
    let snapshot = engine.run(shutdown).await;
    info!(pid, "hook-test-worker stopped: {snapshot}");
    Ok(())
}

/// Completes on SIGTERM or SIGINT. The SIGTERM handler is installed at once (not on first poll),
/// so a SIGTERM that arrives while the engine starts is not fatal.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received"),
            _ = int.recv() => info!("SIGINT received"),
        }
    })
}
