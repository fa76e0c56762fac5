//! The `ingest` phase: `hook-ingest` as Claude Code runs it, one process per call with a hook's
//! input on stdin, timed from spawn to exit (what the agent waits for around every tool call),
//! on each of its paths: through the ingest socket of a running `hook-processor`, straight to the
//! database with a connection of its own, and with the processor killed (its socket file left
//! behind, so the hook tries it, is refused, and falls back); then the socket and the own
//! connection again with `synchronous_commit=off` (set in the processor, resp. the hook), which
//! shows what each path costs apart from the commit's WAL flush. Starting `/bin/true` is the
//! floor.
//!
//! Every call must exit 0, and every event must end up stored once or, when a call ran out of
//! its budget (a loaded machine), spooled with one warning: both are counted per path. The
//! processor must have handled every stored event before it is killed.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use hook_store::bench;
use serde::Serialize;

use crate::phases::{processor_command, tail, Db};
use crate::Plan;

/// A PostToolUse hook's input, as Claude Code sends it (674 bytes).
const INPUT: &[u8] = include_bytes!("../../../tests/fixtures/hooks/PostToolUse.json");

/// Calls before the measured ones (page cache, the server's catalog caches).
const WARMUP: usize = 20;

/// One path: spawn-to-exit times of its calls, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct IngestPath {
    pub(crate) path: &'static str,
    pub(crate) calls: usize,
    pub(crate) p50_us: u64,
    pub(crate) p90_us: u64,
    pub(crate) p99_us: u64,
    pub(crate) max_us: u64,
    /// Events the calls stored (warm-up included); `None` for the floor, which stores nothing.
    pub(crate) stored: Option<i64>,
    /// Calls (warm-up included) that spooled their event instead, with a warning: they ran out
    /// of time. A later call of the same path flushes it.
    pub(crate) spooled: usize,
    /// The first of their warnings.
    pub(crate) warning: Option<String>,
}

/// The phase's result.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct IngestReport {
    /// The hook-ingest binary measured.
    pub(crate) binary: String,
    pub(crate) input_bytes: usize,
    pub(crate) paths: Vec<IngestPath>,
}

impl IngestReport {
    /// The socket path's row.
    pub(crate) fn socket(&self) -> Option<&IngestPath> {
        self.paths.iter().find(|p| p.path == SOCKET)
    }
}

const FLOOR: &str = "/bin/true (starting any process)";
const SOCKET: &str = "hook-ingest: socket, processor running";
const DIRECT: &str = "hook-ingest: own connection (socket off)";
const FALLBACK: &str = "hook-ingest: processor killed, own connection";
const SOCKET_ASYNC: &str = "  the same, synchronous_commit=off: socket";
const DIRECT_ASYNC: &str = "  the same, synchronous_commit=off: own conn.";

pub(crate) async fn ingest_latency(db: &Db, plan: &Plan) -> anyhow::Result<IngestReport> {
    let ingest_bin = plan.ingest_bin.clone();
    for bin in [&plan.processor_bin, &ingest_bin] {
        anyhow::ensure!(
            bin.is_file(),
            "no {} (build it with `cargo build --release -p hook-ingest -p hook-processor`, or pass \
             --processor-bin and --ingest-bin)",
            bin.display()
        );
    }
    let client = db.connect().await?;
    bench::truncate(&client).await?;
    let workdir = std::env::temp_dir().join(format!("hook-bench-ingest-{}", std::process::id()));
    std::fs::create_dir_all(&workdir).with_context(|| format!("creating {}", workdir.display()))?;
    let input = workdir.join("input.json");
    std::fs::write(&input, INPUT).with_context(|| format!("writing {}", input.display()))?;
    let socket = workdir.join("ingest.sock");
    let spool = workdir.join("spool.jsonl");
    let calls = plan.ingest_calls;
    let mut paths = Vec::new();
    let run = Run { client: &client, input: &input, workdir: &workdir, spool: &spool, calls };

    if Path::new("/bin/true").is_file() {
        paths.push(run.path(FLOOR, Path::new("/bin/true"), &[], false).await?);
    }
    let (url, socket_text, spool_text) =
        (db.url.clone(), socket.display().to_string(), spool.display().to_string());
    // No database of its own: the socket is the only way in, so each stored event went through it.
    let through_socket = [("HOOK_INGEST_SOCKET", socket_text.as_str()), ("HOOK_SPOOL", spool_text.as_str())];
    let own_connection =
        [("DATABASE_URL", url.as_str()), ("HOOK_INGEST_SOCKET", "off"), ("HOOK_SPOOL", spool_text.as_str())];
    let fallback = [
        ("DATABASE_URL", url.as_str()),
        ("HOOK_INGEST_SOCKET", socket_text.as_str()),
        ("HOOK_SPOOL", spool_text.as_str()),
    ];
    let asynchronous = [("HOOK_INGEST_SYNCHRONOUS_COMMIT", "off")];
    let own_connection_async = [own_connection.as_slice(), asynchronous.as_slice()].concat();

    let mut child = serve(db, plan, &workdir, &socket, &[]).await?;
    paths.push(run.path(SOCKET, &ingest_bin, &through_socket, true).await?);
    paths.push(run.path(DIRECT, &ingest_bin, &own_connection, true).await?);
    // The processor handles what the hooks stored, then is killed: its socket file stays.
    drained(&client).await?;
    child.kill().await.context("killing hook-processor")?;
    anyhow::ensure!(socket.exists(), "the killed processor's socket file is gone");
    paths.push(run.path(FALLBACK, &ingest_bin, &fallback, true).await?);

    // The same without waiting for the WAL flush: what the paths cost apart from the disk.
    let mut child = serve(db, plan, &workdir, &socket, &asynchronous).await?;
    paths.push(run.path(SOCKET_ASYNC, &ingest_bin, &through_socket, true).await?);
    paths.push(run.path(DIRECT_ASYNC, &ingest_bin, &own_connection_async, true).await?);
    drained(&client).await?;
    child.kill().await.context("killing hook-processor")?;

    bench::truncate(&client).await?;
    let _ = std::fs::remove_dir_all(&workdir);
    Ok(IngestReport { binary: ingest_bin.display().to_string(), input_bytes: INPUT.len(), paths })
}

/// What every path's calls share.
struct Run<'a> {
    client: &'a hook_store::deadpool_postgres::Object,
    input: &'a Path,
    workdir: &'a Path,
    spool: &'a Path,
    calls: usize,
}

impl Run<'_> {
    /// Times the calls of one path and checks that each event was stored once or spooled.
    async fn path(
        &self,
        label: &'static str,
        program: &Path,
        env: &[(&str, &str)],
        stores: bool,
    ) -> anyhow::Result<IngestPath> {
        let before = bench::row_count(self.client).await?;
        let (samples, warnings) = run_calls(program, env, self.input, self.workdir, self.calls).await?;
        let stored = bench::row_count(self.client).await? - before;
        // A later call of the path may have flushed what an earlier one spooled.
        let left = std::fs::read_to_string(self.spool).map_or(0, |text| text.lines().count());
        let _ = std::fs::remove_file(self.spool);
        let expected = if stores { WARMUP + self.calls } else { 0 };
        anyhow::ensure!(
            usize::try_from(stored).ok().map(|stored| stored + left) == Some(expected),
            "{label}: {stored} events stored and {left} left in the spool by {expected} calls"
        );
        anyhow::ensure!(
            warnings.len() >= left && warnings.iter().all(|w| w.contains("event spooled")),
            "{label}: {left} events left in the spool, warnings: {:?}",
            warnings.first()
        );
        let spooled = warnings.len();
        Ok(summary(label, &samples, stores.then_some(stored), spooled, warnings.into_iter().next()))
    }
}

/// Runs `program` `WARMUP + calls` times, one after the other, with `input` on stdin and exactly
/// `env` as its environment; returns the measured calls' spawn-to-exit times and what they
/// wrote on stderr, line by line. Every call must exit 0.
async fn run_calls(
    program: &Path,
    env: &[(&str, &str)],
    input: &Path,
    workdir: &Path,
    calls: usize,
) -> anyhow::Result<(Vec<Duration>, Vec<String>)> {
    let program = program.to_path_buf();
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let (input, stderr_path) = (input.to_path_buf(), workdir.join("calls.stderr"));
    tokio::task::spawn_blocking(move || -> anyhow::Result<(Vec<Duration>, Vec<String>)> {
        let stderr =
            File::create(&stderr_path).with_context(|| format!("creating {}", stderr_path.display()))?;
        let mut samples = Vec::with_capacity(calls);
        for n in 0..WARMUP + calls {
            let stdin = File::open(&input).with_context(|| format!("opening {}", input.display()))?;
            let mut command = Command::new(&program);
            command
                .env_clear()
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdin(stdin)
                .stdout(Stdio::null())
                .stderr(stderr.try_clone()?);
            let started = Instant::now();
            let status = command.status().with_context(|| format!("running {}", program.display()))?;
            let elapsed = started.elapsed();
            anyhow::ensure!(status.success(), "{} failed: {status}", program.display());
            if n >= WARMUP {
                samples.push(elapsed);
            }
        }
        let said = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        Ok((samples, said.lines().map(str::to_owned).collect()))
    })
    .await
    .context("the calls' thread")?
}

fn summary(
    path: &'static str,
    samples: &[Duration],
    stored: Option<i64>,
    spooled: usize,
    warning: Option<String>,
) -> IngestPath {
    let mut sorted: Vec<u64> =
        samples.iter().map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)).collect();
    sorted.sort_unstable();
    let at = |q: f64| {
        sorted.get(((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1))).copied()
    };
    IngestPath {
        path,
        calls: sorted.len(),
        p50_us: at(0.50).unwrap_or(0),
        p90_us: at(0.90).unwrap_or(0),
        p99_us: at(0.99).unwrap_or(0),
        max_us: sorted.last().copied().unwrap_or(0),
        stored,
        spooled,
        warning,
    }
}

/// Starts hook-processor serving `socket` (with `env` added) and waits until it accepts.
async fn serve(
    db: &Db,
    plan: &Plan,
    workdir: &Path,
    socket: &Path,
    env: &[(&str, &str)],
) -> anyhow::Result<tokio::process::Child> {
    let log_path = workdir.join("hook-processor.log");
    let log = File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut command = processor_command(&plan.processor_bin, &db.url, &plan.engine, workdir, log);
    command.env("HOOK_INGEST_SOCKET", socket).envs(env.iter().copied());
    let mut child = command.spawn().with_context(|| format!("starting {}", plan.processor_bin.display()))?;
    let until = Instant::now() + Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("hook-processor exited early ({status}); its log: {}", tail(&log_path));
        }
        anyhow::ensure!(Instant::now() < until, "hook-processor did not serve its socket within 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(child)
}

/// Waits until the processor has handled every event.
async fn drained(client: &hook_store::deadpool_postgres::Object) -> anyhow::Result<()> {
    let until = Instant::now() + Duration::from_secs(120);
    while bench::unprocessed_count(client).await? > 0 {
        anyhow::ensure!(
            Instant::now() < until,
            "hook-processor did not handle the hooks' events in 2 minutes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
