//! The `hook-processor` binary when the network to its database goes silent: a test-owned TCP
//! proxy on loopback ([`SilentProxy`]) between the processor and the test server stops
//! forwarding in both directions without closing or resetting anything, so the processor's
//! kernel keeps getting acknowledgements and only the processor's own deadlines can tell.
//!
//! - With events flowing, the processor reports the silence within 30 s (its log, `/readyz`),
//!   and once the proxy forwards again it processes everything: every row processed, each
//!   success committed exactly once (the outcome audit of `hook_store::bench`).
//! - SIGTERM during the silence: it exits, with code 0, within the drain timeout + 5 s; nothing
//!   is lost (a second processor drains the rest, each success committed once).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hook_store::testing::{config_to_url, SilentProxy, TestDb};
use hook_store::tokio_postgres::Client;
use hook_store::StoreOptions;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest wait for anything that should happen.
const PATIENCE: Duration = Duration::from_secs(60);

/// The acceptance bound: a silent network is noticed within this.
const NOTICED_WITHIN: Duration = Duration::from_secs(30);

/// An empty working directory (no `.env`), removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("hook-silent-{}-{n}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a scratch directory");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The binary with a clean environment and `env` on top, in `scratch`.
fn processor(scratch: &Scratch, env: &[(&str, &str)]) -> Command {
    let mut command = hook_store::testing::binary_command(env!("CARGO_BIN_EXE_hook-processor"));
    command.envs(env.iter().copied()).current_dir(&scratch.0).stdin(Stdio::null());
    command
}

/// A running processor; its stderr lines are collected with the time they arrived. Dropped
/// while running (a failed test), it is killed and its log printed.
struct Running {
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Running {
    fn spawn(mut command: Command) -> Running {
        let mut child =
            command.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("start hook-processor");
        let stderr = child.stderr.take().expect("stderr is piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap_or_else(|e| e.into_inner()).push((Instant::now(), line));
            }
        });
        Running { child, lines }
    }

    fn stderr(&self) -> String {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>().join("\n")
    }

    /// Waits, for at most `within` from `since`, for a stderr line logged after `since` that
    /// contains `needle`; returns it with when it came.
    async fn line_after(&mut self, needle: &str, since: Instant, within: Duration) -> (Instant, String) {
        loop {
            let found = self
                .lines
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .find(|(at, l)| *at >= since && l.contains(needle))
                .cloned();
            if let Some(found) = found {
                return found;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("hook-processor exited ({status}) before logging {needle:?}:\n{}", self.stderr());
            }
            assert!(
                since.elapsed() < within,
                "no line with {needle:?} within {within:?}:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The address of the HTTP endpoint, from its log line (the tests bind port 0).
    async fn http_addr(&mut self) -> SocketAddr {
        let (_, line) = self.line_after("serving /metrics", Instant::now(), PATIENCE).await;
        let start = line.find("127.0.0.1:").expect("an address in the line");
        let addr: String =
            line[start..].chars().take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':').collect();
        addr.parse().expect("a socket address")
    }

    /// Sends SIGTERM and waits (at most `within`) for the exit; the status, how long it took,
    /// and the log.
    async fn terminate(&mut self, within: Duration) -> (ExitStatus, Duration, String) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits"));
        let signalled = Instant::now();
        kill(pid, Signal::SIGTERM).expect("SIGTERM");
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                let took = signalled.elapsed();
                tokio::time::sleep(Duration::from_millis(100)).await; // let the reader drain
                return (status, took, self.stderr());
            }
            assert!(
                signalled.elapsed() < within,
                "still running {within:?} after SIGTERM:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- hook-processor's log ---\n{}", self.stderr());
        }
    }
}

/// `GET path`; the status code and the body. A probe that gets no answer in 10 s counts as 0.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        let status = response.split(' ').nth(1).and_then(|s| s.parse().ok())?;
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange).await.ok().flatten().unwrap_or((0, String::new()))
}

/// Polls `/readyz` until its status is `status`, for at most `within`; returns the body.
async fn readyz_until(addr: SocketAddr, status: u16, within: Duration) -> String {
    let until = Instant::now() + within;
    loop {
        let (got, body) = get(addr, "/readyz").await;
        if got == status {
            return body;
        }
        assert!(
            Instant::now() < until,
            "/readyz never answered {status} within {within:?}; last {got}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Inserts a few events every 100 ms on its own (direct) connection until stopped, as producers
/// do, whatever happens to the processor's network.
struct Producer {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<i64>,
}

impl Producer {
    async fn start(db: &TestDb) -> Producer {
        let store = db.store(StoreOptions { pool_size: 1, listen: false, ..StoreOptions::default() }).await;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let task = tokio::spawn(async move {
            let client = store.pool().get().await.expect("a producer connection");
            let mut next = 1_i64;
            while !flag.load(Ordering::Relaxed) {
                hook_store::bench::insert_range(&client, next, next + 2, hook_store::bench::Ids::Random)
                    .await
                    .expect("insert events");
                next += 3;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            next - 1
        });
        Producer { stop, task }
    }

    /// Stops inserting; the number of events inserted.
    async fn stop(self) -> i64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the producer task")
    }
}

async fn processed(client: &Client) -> i64 {
    client.query_one("SELECT count(*) FROM hook_events WHERE processed", &[]).await.expect("count").get(0)
}

/// Waits until at least `target` events are processed.
async fn wait_processed(client: &Client, target: i64, within: Duration) {
    let until = Instant::now() + within;
    loop {
        let done = processed(client).await;
        if done >= target {
            return;
        }
        assert!(Instant::now() < until, "only {done} of {target} events processed after {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every one of the `total` events is processed, and each success committed exactly once.
async fn assert_all_processed_once(client: &Client, total: i64) {
    wait_processed(client, total, PATIENCE).await;
    let rows: i64 = client.query_one("SELECT count(*) FROM hook_events", &[]).await.expect("count").get(0);
    assert_eq!(rows, total);
    let audit = hook_store::bench::outcome_audit(client).await.expect("read the outcome audit");
    assert_eq!(audit.successes, total, "{audit:?}");
    assert_eq!(audit.events_without_one_success, 0, "{audit:?}");
    assert_eq!(audit.failures, 0, "{audit:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_network_is_noticed_within_30s_and_everything_is_processed_once_it_is_back() {
    let db = TestDb::migrated("silent_processor").await;
    let client = db.client().await;
    hook_store::bench::install_outcome_audit(&client).await.expect("install the outcome audit");
    let proxy = SilentProxy::start(&db.config()).await;
    let url = config_to_url(&proxy.config(&db.config()));
    let scratch = Scratch::new("noticed");
    // The shipped network settings: HOOK_DB_TIMEOUT, keepalives and tcp_user_timeout unset.
    let mut run = Running::spawn(processor(
        &scratch,
        &[("DATABASE_URL", url.as_str()), ("HOOK_HTTP_ADDR", "127.0.0.1:0"), ("HOOK_METRICS_INTERVAL", "0")],
    ));
    let addr = run.http_addr().await;
    let producer = Producer::start(&db).await;
    wait_processed(&client, 30, PATIENCE).await;
    readyz_until(addr, 200, PATIENCE).await;

    let frozen_at = Instant::now();
    proxy.freeze();
    let (noticed_at, line) = run.line_after("no answer from the database", frozen_at, NOTICED_WITHIN).await;
    eprintln!("noticed {:?} after the freeze: {line}", noticed_at - frozen_at);
    let body = readyz_until(addr, 503, Duration::from_secs(10)).await;
    assert!(body.contains("database"), "{body}");

    proxy.thaw();
    let total = {
        tokio::time::sleep(Duration::from_secs(1)).await;
        producer.stop().await
    };
    assert_all_processed_once(&client, total).await;
    readyz_until(addr, 200, PATIENCE).await;
    let (status, _, stderr) = run.terminate(PATIENCE).await;
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_the_silence_exits_within_the_drain_timeout_and_loses_nothing() {
    let db = TestDb::migrated("silent_sigterm").await;
    let client = db.client().await;
    hook_store::bench::install_outcome_audit(&client).await.expect("install the outcome audit");
    let proxy = SilentProxy::start(&db.config()).await;
    let url = config_to_url(&proxy.config(&db.config()));
    let scratch = Scratch::new("sigterm");
    let drain = Duration::from_secs(2);
    let mut run = Running::spawn(processor(
        &scratch,
        &[("DATABASE_URL", url.as_str()), ("HOOK_DRAIN_TIMEOUT", "2s"), ("HOOK_METRICS_INTERVAL", "0")],
    ));
    let producer = Producer::start(&db).await;
    wait_processed(&client, 30, PATIENCE).await;

    proxy.freeze();
    // Let the processor send calls into the silence (a claim, or outcomes) that will not return.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let bound = drain + Duration::from_secs(5);
    let (status, took, stderr) = run.terminate(PATIENCE).await;
    let forced = stderr.lines().find(|l| l.contains("shutdown did not finish"));
    eprintln!("exited {took:?} after SIGTERM; {}", forced.unwrap_or("the engine finished its drain"));
    assert!(took < bound, "took {took:?} to exit after SIGTERM (drain timeout {drain:?}):\n{stderr}");
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("SIGTERM received"), "{stderr}");

    // Nothing is lost: with the network back, another processor (directly connected) finishes.
    proxy.thaw();
    let total = producer.stop().await;
    let direct = db.url();
    let scratch = Scratch::new("sigterm-after");
    let mut after = Running::spawn(processor(&scratch, &[("DATABASE_URL", direct.as_str())]));
    assert_all_processed_once(&client, total).await;
    let (status, _, stderr) = after.terminate(PATIENCE).await;
    assert_eq!(status.code(), Some(0), "{stderr}");
}
