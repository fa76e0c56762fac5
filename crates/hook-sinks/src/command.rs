//! The `command` sink: runs a program for each event.
//!
//! - The program is started from an argv, without a shell, in a process group of its own, with
//!   the event as one JSON object on stdin (then closed) and a clean environment: `PATH`,
//!   `HOME`, `LANG`, `TZ` when set, the variables named in `pass_env`, the ones given in `env`,
//!   and `HOOK_EVENT_ID`, `HOOK_SOURCE`, `HOOK_ACTION`, `HOOK_ATTEMPT`. The processor's own
//!   environment (the database password) is not passed on.
//! - Exit 0: delivered. An exit code in `permanent_exit_codes` (default [`PERMANENT_EXIT_CODE`],
//!   65, `EX_DATAERR`): permanent, the event is dead. Any other exit, or death by a signal:
//!   retryable.
//! - stdout and stderr are read as they come; the first `max_output` bytes of each are kept
//!   (stdout in `result_metadata`, stderr there and in the error text) and the rest is counted
//!   and dropped, so a chatty program neither blocks nor fills memory.
//! - At the timeout the whole process group gets SIGKILL; so does what is left of it when the
//!   program exits (a background child it forgot), and when the delivery is cancelled (the
//!   engine's handler timeout, or shutdown after the drain timeout). Nothing it started in its
//!   group outlives the delivery. A process that leaves the group (`setsid`) is its own.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::FutureExt;
use hook_core::HookEvent;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use crate::delivery::{Delivery, Sink};

/// The default exit code for "permanent failure, do not retry": 65, `EX_DATAERR` of
/// sysexits.h ("the input data was incorrect").
pub const PERMANENT_EXIT_CODE: i32 = 65;

/// Default bytes kept of stdout and of stderr each.
pub const DEFAULT_MAX_OUTPUT: usize = 4096;

/// Variables passed on from the processor's environment when set.
const BASE_ENV: &[&str] = &["PATH", "HOME", "LANG", "TZ"];

/// How to run the program.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandConfig {
    /// The program and its arguments; the program is looked up in `PATH` unless it holds a `/`.
    pub argv: Vec<String>,
    /// Longest run; then the process group is killed and the attempt is retryable.
    pub timeout: Duration,
    /// Exit codes meaning "permanent failure".
    pub permanent_exit_codes: Vec<i32>,
    /// Bytes kept of stdout and of stderr each.
    pub max_output: usize,
    /// Variables set for the program.
    pub env: Vec<(String, String)>,
    /// Variables passed on from the processor's environment, when set.
    pub pass_env: Vec<String>,
    /// The working directory; the processor's when `None`.
    pub cwd: Option<PathBuf>,
}

impl CommandConfig {
    /// A config for `argv` with the defaults: 10 s, exit 65 permanent, 4 KiB of output kept.
    pub fn new(argv: Vec<String>) -> Self {
        Self {
            argv,
            timeout: Duration::from_secs(10),
            permanent_exit_codes: vec![PERMANENT_EXIT_CODE],
            max_output: DEFAULT_MAX_OUTPUT,
            env: Vec::new(),
            pass_env: Vec::new(),
            cwd: None,
        }
    }
}

/// The `command` sink; see the module docs.
#[derive(Debug, Clone)]
pub struct CommandSink {
    config: Arc<CommandConfig>,
}

impl CommandSink {
    /// A sink running `config`. The argv must not be empty (the routes file checks it).
    pub fn new(config: CommandConfig) -> Self {
        Self { config: Arc::new(config) }
    }
}

impl Sink for CommandSink {
    fn kind(&self) -> &'static str {
        "command"
    }

    fn deliver(&self, event: Arc<HookEvent>) -> BoxFuture<'static, Delivery> {
        let config = Arc::clone(&self.config);
        async move { run(&config, &event).await }.boxed()
    }
}

/// Kills the process group when dropped, unless disarmed: so a cancelled delivery leaves no
/// process behind.
struct GroupGuard(Option<Pid>);

impl GroupGuard {
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            // ESRCH (the group is already gone) is the normal case after a clean exit.
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn run(config: &CommandConfig, event: &HookEvent) -> Delivery {
    let Some((program, args)) = config.argv.split_first() else {
        return Delivery::permanent("the command's argv is empty");
    };
    let body = match serde_json::to_vec(event) {
        Ok(body) => body,
        Err(error) => return Delivery::permanent(format!("cannot encode the event: {error}")),
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for name in BASE_ENV.iter().copied().chain(config.pass_env.iter().map(String::as_str)) {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    command.envs(config.env.iter().map(|(k, v)| (k, v)));
    command
        .env("HOOK_EVENT_ID", event.id.to_string())
        .env("HOOK_SOURCE", &event.source)
        .env("HOOK_ACTION", &event.action)
        .env("HOOK_ATTEMPT", event.retry_count.saturating_add(1).to_string());
    if let Some(cwd) = &config.cwd {
        command.current_dir(cwd);
    }
    let started = Instant::now();
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => return Delivery::retryable(format!("cannot start {program}: {error}")),
    };
    let mut guard = GroupGuard(child.id().and_then(|id| i32::try_from(id).ok()).map(Pid::from_raw));
    let (Some(mut stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Delivery::retryable("the child's pipes were not set up");
    };
    let write = async move {
        // A program that exits without reading its input is not an error here: its exit code says.
        let _ = stdin.write_all(&body).await;
        let _ = stdin.shutdown().await;
    };
    let max = config.max_output;
    let pgid = guard.0;
    let wait = async {
        let status = child.wait().await;
        // The program is done; whatever it left in its group (a forgotten background child
        // holding the pipes open) dies now, so the reads below end.
        if let Some(pgid) = pgid {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
        status
    };
    let run = async {
        let (status, (), out, err) = tokio::join!(wait, write, bounded(stdout, max), bounded(stderr, max));
        (status, out, err)
    };
    let outcome = tokio::time::timeout(config.timeout, run).await;
    guard.kill();
    let elapsed = started.elapsed();
    let (status, out, err) = match outcome {
        Ok(done) => done,
        Err(_) => {
            let _ = child.wait().await;
            return Delivery::retryable(format!(
                "{program} timed out after {:.3}s; its process group was killed",
                config.timeout.as_secs_f64()
            ));
        }
    };
    let status = match status {
        Ok(status) => status,
        Err(error) => return Delivery::retryable(format!("waiting for {program}: {error}")),
    };
    let mut facts = Map::new();
    facts.insert("exit_code".into(), status.code().map_or(Value::Null, Value::from));
    if let Some(signal) = status.signal() {
        facts.insert("signal".into(), Value::from(signal));
    }
    facts.insert("elapsed_ms".into(), Value::from(elapsed.as_millis() as u64));
    out.insert_into(&mut facts, "stdout");
    err.insert_into(&mut facts, "stderr");
    let stderr_note =
        if err.text.trim().is_empty() { String::new() } else { format!(": {}", err.text.trim()) };
    match classify(status, &config.permanent_exit_codes) {
        Class::Success => Delivery::Delivered { facts },
        Class::Permanent(code) => Delivery::Permanent {
            error: format!("{program} exited with {code} (permanent){stderr_note}"),
            facts,
        },
        Class::Retryable(how) => {
            Delivery::Retryable { error: format!("{program} {how}{stderr_note}"), retry_after: None, facts }
        }
    }
}

enum Class {
    Success,
    Permanent(i32),
    Retryable(String),
}

fn classify(status: ExitStatus, permanent: &[i32]) -> Class {
    match (status.code(), status.signal()) {
        (Some(0), _) => Class::Success,
        (Some(code), _) if permanent.contains(&code) => Class::Permanent(code),
        (Some(code), _) => Class::Retryable(format!("exited with {code}")),
        (None, Some(signal)) => Class::Retryable(format!("was killed by signal {signal}")),
        (None, None) => Class::Retryable("ended without an exit code".into()),
    }
}

/// The first bytes of a stream, and how many there were in all.
struct Output {
    text: String,
    kept: usize,
    total: u64,
}

impl Output {
    fn insert_into(&self, facts: &mut Map<String, Value>, key: &str) {
        facts.insert(key.into(), Value::from(self.text.clone()));
        if self.total > self.kept as u64 {
            facts.insert(format!("{key}_bytes"), Value::from(self.total));
            facts.insert(format!("{key}_truncated"), Value::Bool(true));
        }
    }
}

/// Reads `reader` to its end, keeping the first `max` bytes (as text, invalid UTF-8 replaced)
/// and counting the rest.
async fn bounded(mut reader: impl AsyncRead + Unpin, max: usize) -> Output {
    let mut kept = Vec::with_capacity(max.min(8192));
    let mut buf = vec![0u8; 8192];
    let mut total = 0u64;
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                total += n as u64;
                let room = max.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    let text = String::from_utf8_lossy(&kept).replace('\0', "\u{FFFD}");
    Output { text, kept: kept.len(), total }
}
