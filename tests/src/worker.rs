//! `hook-test-worker` processes driven by the crash and fault tests, and a bounded wait.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Longest wait for a worker to exit after a signal.
const WORKER_EXIT_PATIENCE: Duration = Duration::from_secs(90);

/// A bounded polling loop: `tick` sleeps a little, and panics once `patience` has passed.
pub struct Deadline {
    what: String,
    patience: Duration,
    until: Instant,
}

impl Deadline {
    /// Starts waiting, for at most `patience`, for `what` (named in the panic).
    pub fn new(patience: Duration, what: impl Into<String>) -> Deadline {
        Deadline { what: what.into(), patience, until: Instant::now() + patience }
    }

    /// Sleeps 10 ms.
    ///
    /// # Panics
    /// Once the patience is spent.
    pub async fn tick(&self) {
        assert!(Instant::now() < self.until, "gave up after {:?} waiting for {}", self.patience, self.what);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A running `hook-test-worker`, its stderr going to a log file. Dropped while still running (a
/// failed test), it is killed; its log is printed when the test failed.
pub struct Worker {
    child: Child,
    /// The process id (its sessions are named `hook-test-worker-<pid>`).
    pub pid: i32,
    log: PathBuf,
}

impl Worker {
    /// Starts `program` (`env!("CARGO_BIN_EXE_hook-test-worker")`, which only integration tests
    /// see) on the database at `url` with extra flags (see the worker's docs).
    pub fn start(program: &str, url: &str, flags: &[&str]) -> Worker {
        Worker::start_limited(program, url, flags, &[])
    }

    /// Like [`start`](Worker::start), under resource limits: `limits` are `prlimit` options
    /// (`"--as=419430400"`, `"--core=0"`); `prlimit` sets them and execs the program, so the pid
    /// is still the worker's. No limits: the program is started directly.
    pub fn start_limited(program: &str, url: &str, flags: &[&str], limits: &[&str]) -> Worker {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let log = std::env::temp_dir().join(format!(
            "hook-fault-worker-{}-{}.log",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let stderr = std::fs::File::create(&log).expect("create the worker's log file");
        let mut command = if limits.is_empty() {
            Command::new(program)
        } else {
            let mut prlimit = Command::new("prlimit");
            prlimit.args(limits).arg("--").arg(program);
            prlimit
        };
        let child = command
            .args(["--url", url])
            .args(flags)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start hook-test-worker");
        let pid = i32::try_from(child.id()).expect("pid fits in i32");
        Worker { child, pid, log }
    }

    /// What the worker wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` to the worker.
    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid), signal).unwrap_or_else(|e| panic!("{signal} to {}: {e}", self.pid));
    }

    /// SIGKILL, then waits for the process to be gone.
    pub async fn kill_9(&mut self) {
        self.child.kill().expect("SIGKILL the worker");
        let status = self.wait().await;
        assert_eq!(status.signal(), Some(Signal::SIGKILL as i32), "{status:?}");
    }

    /// SIGTERM, then waits for the worker to drain and exit; asserts a clean exit and returns
    /// its log.
    pub async fn terminate(&mut self) -> String {
        self.signal(Signal::SIGTERM);
        let status = self.wait().await;
        let log = self.log();
        assert!(status.success(), "worker {}: {status:?}\n{log}", self.pid);
        log
    }

    /// Waits (bounded) for the worker to exit.
    pub async fn wait(&mut self) -> ExitStatus {
        let deadline = Deadline::new(WORKER_EXIT_PATIENCE, format!("worker {} to exit", self.pid));
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the worker") {
                return status;
            }
            deadline.tick().await;
        }
    }

    /// The exit status, if the worker has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("wait for the worker")
    }

    /// Panics, with the log, if the worker exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("wait for the worker") {
            panic!("worker {} exited unasked ({status:?}):\n{}", self.pid, self.log());
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGCONT);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- log of hook-test-worker {} (last lines) ---", self.pid);
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
        let _ = std::fs::remove_file(&self.log);
    }
}
