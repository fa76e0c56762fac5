//! `hook-test-worker`: a processor embedding the engine, for the crash and fault tests.
//!
//! Its one handler, `("*", "*")`, sleeps `--delay-ms`, then records the invocation (event id and
//! this process's pid) in `test_invocations` through a connection of its own, outside the claim's
//! transaction: an invocation stays recorded even when the batch never commits (say, because the
//! process was killed). Comparing `test_invocations` with `hook_events` then shows which events were
//! handled, how often, and by which process.
//!
//! The recording connection reconnects when the server ends it (a restart, `pg_terminate_backend`),
//! retrying until it succeeds, so a fault of the database never turns into a failed attempt of the
//! handler; each invocation carries a nonce, so a retried insert whose first try did commit is not
//! recorded twice.
//!
//! After recording, the handler injects the fault named for the event's source, if any
//! (`--fault SOURCE=KIND`, repeatable):
//!
//! | KIND            | the handler then                                          |
//! |-----------------|-----------------------------------------------------------|
//! | `panic`         | panics                                                    |
//! | `hang`          | sleeps for an hour (the handler timeout ends it)          |
//! | `fail`          | returns an error                                          |
//! | `huge-error:N`  | returns an error of N bytes                               |
//! | `sleep:MS`      | sleeps MS milliseconds more, then succeeds                |
//! | `abort`         | aborts the whole process (`std::process::abort`)          |
//! | `abort-after:MS`| sleeps MS milliseconds more, then aborts the process      |
//!
//! ```text
//! hook-test-worker --url <conn> [--delay-ms 0] [--batch-size 100] [--batches-in-flight 2]
//!     [--concurrency 400] [--poll-ms 200] [--handler-timeout-ms 30000] [--claim-timeout-ms 60000]
//!     [--drain-timeout-ms 25000] [--max-retry-count 3] [--retry-base-ms 2000]
//!     [--max-bytes-in-flight BYTES] [--fault SOURCE=KIND]...
//! ```
//!
//! Every connection it opens carries the application name `hook-test-worker-<pid>`. Runs until
//! SIGTERM or SIGINT, then drains, logs the engine's metrics line (`... Errors=N ...`) and exits 0.
//! Logs to stderr.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use hook_core::{Engine, EngineConfig, HandlerResult, HookEvent, RetryPolicy, WILDCARD};
use hook_store::{parse_database_url, PgStore, StoreOptions};
use tokio_postgres::{Client, Config, NoTls, Statement};
use tracing::{info, warn};
use uuid::Uuid;

/// The test-only table of handler invocations. Created under an advisory lock, because two
/// workers starting at once would otherwise race in `CREATE TABLE IF NOT EXISTS` (it is not
/// atomic in PostgreSQL and can fail with a unique violation on `pg_type`).
const CREATE_INVOCATIONS: &str = "BEGIN; \
     SELECT pg_advisory_xact_lock(7415161718); \
     CREATE TABLE IF NOT EXISTS test_invocations ( \
         event_id uuid NOT NULL, \
         pid int NOT NULL, \
         at timestamptz NOT NULL DEFAULT clock_timestamp(), \
         nonce uuid UNIQUE \
     ); \
     COMMIT";

const RECORD_INVOCATION: &str =
    "INSERT INTO test_invocations (event_id, pid, nonce) VALUES ($1, $2, $3) ON CONFLICT (nonce) DO NOTHING";

/// A fault the handler injects for the events of one source.
#[derive(Debug, Clone, PartialEq)]
enum Fault {
    Panic,
    Hang,
    Fail,
    HugeError(usize),
    Sleep(Duration),
    Abort,
    AbortAfter(Duration),
}

impl std::str::FromStr for Fault {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> anyhow::Result<Fault> {
        Ok(match text.split_once(':') {
            None if text == "panic" => Fault::Panic,
            None if text == "hang" => Fault::Hang,
            None if text == "fail" => Fault::Fail,
            None if text == "abort" => Fault::Abort,
            Some(("huge-error", bytes)) => Fault::HugeError(number("huge-error", bytes)?),
            Some(("sleep", ms)) => Fault::Sleep(Duration::from_millis(number("sleep", ms)?)),
            Some(("abort-after", ms)) => Fault::AbortAfter(Duration::from_millis(number("abort-after", ms)?)),
            _ => bail!(
                "unknown fault {text:?} (panic, hang, fail, huge-error:N, sleep:MS, abort, abort-after:MS)"
            ),
        })
    }
}

/// The command line.
#[derive(Debug)]
struct Args {
    url: String,
    delay: Duration,
    batch_size: usize,
    batches_in_flight: usize,
    concurrency: usize,
    poll: Duration,
    handler_timeout: Duration,
    claim_timeout: Duration,
    drain_timeout: Duration,
    max_retry_count: u32,
    retry_base: Duration,
    max_bytes_in_flight: u64,
    faults: HashMap<String, Fault>,
}

impl Args {
    fn parse(mut argv: impl Iterator<Item = String>) -> anyhow::Result<Args> {
        let defaults = EngineConfig::default();
        let mut url = None;
        let mut args = Args {
            url: String::new(),
            delay: Duration::ZERO,
            batch_size: 100,
            batches_in_flight: 2,
            concurrency: defaults.concurrency,
            poll: Duration::from_millis(200),
            handler_timeout: defaults.handler_timeout,
            claim_timeout: defaults.claim_timeout,
            drain_timeout: defaults.drain_timeout,
            max_retry_count: defaults.retry.max_retry_count,
            retry_base: defaults.retry.base_delay,
            max_bytes_in_flight: defaults.max_bytes_in_flight,
            faults: HashMap::new(),
        };
        let ms = |flag: &str, text: &str| number(flag, text).map(Duration::from_millis);
        while let Some(flag) = argv.next() {
            let mut value = || argv.next().with_context(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--url" => url = Some(value()?),
                "--delay-ms" => args.delay = ms(&flag, &value()?)?,
                "--batch-size" => args.batch_size = number(&flag, &value()?)?,
                "--batches-in-flight" => args.batches_in_flight = number(&flag, &value()?)?,
                "--concurrency" => args.concurrency = number(&flag, &value()?)?,
                "--poll-ms" => args.poll = ms(&flag, &value()?)?,
                "--handler-timeout-ms" => args.handler_timeout = ms(&flag, &value()?)?,
                "--claim-timeout-ms" => args.claim_timeout = ms(&flag, &value()?)?,
                "--drain-timeout-ms" => args.drain_timeout = ms(&flag, &value()?)?,
                "--max-retry-count" => args.max_retry_count = number(&flag, &value()?)?,
                "--retry-base-ms" => args.retry_base = ms(&flag, &value()?)?,
                "--max-bytes-in-flight" => args.max_bytes_in_flight = number(&flag, &value()?)?,
                "--fault" => {
                    let spec = value()?;
                    let (source, kind) = spec
                        .split_once('=')
                        .with_context(|| format!("--fault {spec:?}: expected SOURCE=KIND"))?;
                    args.faults.insert(source.to_owned(), kind.parse()?);
                }
                other => bail!("unknown argument {other:?}"),
            }
        }
        args.url = url.context("--url is required")?;
        Ok(args)
    }

    fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            batch_size: self.batch_size,
            batches_in_flight: self.batches_in_flight,
            concurrency: self.concurrency,
            poll_interval: self.poll,
            handler_timeout: self.handler_timeout,
            claim_timeout: self.claim_timeout,
            drain_timeout: self.drain_timeout,
            metrics_interval: None,
            max_bytes_in_flight: self.max_bytes_in_flight,
            retry: RetryPolicy {
                max_retry_count: self.max_retry_count,
                base_delay: self.retry_base,
                ..RetryPolicy::default()
            },
            ..EngineConfig::default()
        }
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

/// Records invocations through a connection of its own, reconnecting when it is lost.
struct Recorder {
    config: Config,
    pid: i32,
    current: tokio::sync::Mutex<Option<Arc<(Client, Statement)>>>,
}

impl Recorder {
    async fn connect(&self) -> Result<Arc<(Client, Statement)>, tokio_postgres::Error> {
        let (client, connection) = self.config.connect(NoTls).await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                warn!(%error, "invocation recorder connection ended");
            }
        });
        client.batch_execute(CREATE_INVOCATIONS).await?;
        let statement = client.prepare(RECORD_INVOCATION).await?;
        Ok(Arc::new((client, statement)))
    }

    /// The live connection, opening a new one if there is none or it was closed.
    async fn client(&self) -> Result<Arc<(Client, Statement)>, tokio_postgres::Error> {
        let mut current = self.current.lock().await;
        if let Some(live) = current.as_ref().filter(|c| !c.0.is_closed()) {
            return Ok(Arc::clone(live));
        }
        *current = None;
        let fresh = self.connect().await?;
        *current = Some(Arc::clone(&fresh));
        Ok(fresh)
    }

    /// Records one invocation, retrying (the handler timeout bounds it) until it is stored.
    async fn record(&self, event_id: Uuid) {
        let nonce = Uuid::new_v4();
        let mut pause = Duration::from_millis(20);
        loop {
            let outcome = match self.client().await {
                Ok(live) => live.0.execute(&live.1, &[&event_id, &self.pid, &nonce]).await.map(drop),
                Err(error) => Err(error),
            };
            match outcome {
                Ok(()) => return,
                Err(error) => {
                    warn!(%error, %event_id, "recording the invocation failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
            }
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let shutdown = shutdown_signal()?;
    let pid = i32::try_from(std::process::id()).context("pid out of range")?;
    let mut config = parse_database_url(&args.url)?;
    // Lets a test find (and wait out, or terminate) this process's sessions.
    config.application_name(format!("hook-test-worker-{pid}"));

    let store =
        PgStore::connect(config.clone(), StoreOptions::default()).await.context("connecting the store")?;
    store.migrate().await.context("migrating")?;

    // Connecting creates test_invocations if needed.
    let recorder = Arc::new(Recorder { config: config.clone(), pid, current: Default::default() });
    recorder.client().await.context("connecting the invocation recorder")?;

    let delay = args.delay;
    let faults = Arc::new(args.faults.clone());
    let handler = move |event: Arc<HookEvent>| {
        let recorder = Arc::clone(&recorder);
        let faults = Arc::clone(&faults);
        async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            recorder.record(event.id).await;
            match faults.get(&event.source) {
                None => Ok(HandlerResult::ok("ok")),
                Some(Fault::Panic) => panic!("injected panic for {}", event.id),
                Some(Fault::Hang) => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Ok(HandlerResult::ok("woke up after an hour"))
                }
                Some(Fault::Fail) => Err("injected failure".to_owned()),
                Some(Fault::HugeError(bytes)) => Err("E".repeat(*bytes)),
                Some(Fault::Sleep(extra)) => {
                    tokio::time::sleep(*extra).await;
                    Ok(HandlerResult::ok("slept"))
                }
                Some(Fault::Abort) => {
                    warn!(event_id = %event.id, "injected abort");
                    std::process::abort()
                }
                Some(Fault::AbortAfter(extra)) => {
                    tokio::time::sleep(*extra).await;
                    warn!(event_id = %event.id, "injected abort");
                    std::process::abort()
                }
            }
        }
    };
    let presence = store.presence();
    let engine = Engine::builder(store)
        .handler(WILDCARD, WILDCARD, handler)
        .config(args.engine_config())
        .build()
        .context("building the engine")?;
    info!(pid, delay_ms = delay.as_millis() as u64, faults = ?args.faults, "hook-test-worker running");
    let snapshot = engine.run(shutdown).await;
    presence.leave().await;
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
