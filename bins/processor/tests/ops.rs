//! The `hook-processor` binary as operators meet it: `/metrics` after real work, `/readyz` and
//! systemd's notifications (through a `NOTIFY_SOCKET` of our own) while its database is stopped
//! and started again, the `stats` report, and what its logs say and never say.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hook_store::testing::TestDb;
use hook_store::tokio_postgres::{Client, NoTls};
use hook_store::{ClusterOptions, EmbeddedCluster};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest wait for anything that should happen.
const PATIENCE: Duration = Duration::from_secs(60);

/// The binary with a clean environment, `env` on top, run in `cwd`.
fn processor(cwd: &Path, env: &[(&str, &str)]) -> Command {
    let mut command = hook_store::testing::binary_command(env!("CARGO_BIN_EXE_hook-processor"));
    command.envs(env.iter().copied()).current_dir(cwd).stdin(Stdio::null());
    command
}

/// A fresh directory under /tmp, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("hook-ops-{}-{tag}", std::process::id()));
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

/// A running processor; its stderr is collected line by line. Dropped while running (a failed
/// test), it is terminated.
struct Running {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
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
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        Running { child, lines }
    }

    fn stderr(&self) -> String {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).join("\n")
    }

    /// Waits for a stderr line containing `needle` and returns it.
    async fn line(&mut self, needle: &str) -> String {
        let until = Instant::now() + PATIENCE;
        loop {
            let found = self
                .lines
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .find(|l| l.contains(needle))
                .cloned();
            if let Some(line) = found {
                return line;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("hook-processor exited ({status}) before logging {needle:?}:\n{}", self.stderr());
            }
            assert!(Instant::now() < until, "no line with {needle:?}:\n{}", self.stderr());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The address of the HTTP endpoint, from its log line (the tests bind port 0).
    async fn http_addr(&mut self) -> SocketAddr {
        let line = self.line("serving /metrics").await;
        let start = line.find("127.0.0.1:").expect("an address in the line");
        let addr: String =
            line[start..].chars().take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':').collect();
        addr.parse().expect("a socket address")
    }

    async fn terminate(&mut self) -> (ExitStatus, String) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits"));
        kill(pid, Signal::SIGTERM).expect("SIGTERM");
        let until = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                tokio::time::sleep(Duration::from_millis(100)).await; // let the reader drain
                return (status, self.stderr());
            }
            assert!(Instant::now() < until, "did not stop:\n{}", self.stderr());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `GET path` over HTTP/1.1; the status code and the body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect to the HTTP endpoint");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send the request");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read the response");
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status code");
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// Polls `GET path` until `check(status, body)` holds; returns the last body.
async fn get_until(addr: SocketAddr, path: &str, what: &str, check: impl Fn(u16, &str) -> bool) -> String {
    let until = Instant::now() + PATIENCE;
    loop {
        let (status, body) = get(addr, path).await;
        if check(status, &body) {
            return body;
        }
        assert!(Instant::now() < until, "{path}: {what} never happened; last answer {status}:\n{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of the sample `series` (name with labels, exactly as rendered) in a scrape.
fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn connect(db: &TestDb) -> Client {
    db.client().await
}

async fn insert(client: &Client, source: &str, action: &str, n: usize, payload: Value) {
    for _ in 0..n {
        client
            .execute(
                "INSERT INTO hook_events (id, source, action, resource, resource_id, payload) \
                 VALUES (gen_random_uuid(), $1, $2, 'tool', 'Bash', $3)",
                &[&source, &action, &payload],
            )
            .await
            .expect("insert an event");
    }
}

async fn wait_all_processed(client: &Client) {
    let until = Instant::now() + PATIENCE;
    loop {
        let left: i64 = client
            .query_one("SELECT count(*) FROM hook_events WHERE NOT processed", &[])
            .await
            .expect("count")
            .get(0);
        if left == 0 {
            return;
        }
        assert!(Instant::now() < until, "{left} events still unprocessed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_what_was_processed_by_route() {
    let db = TestDb::migrated("ops_metrics").await;
    let client = connect(&db).await;
    insert(&client, "PreToolUse", "tool_invocation", 3, json!({"tool_name": "Bash"})).await;
    insert(&client, "Stop", "session_stopped", 2, json!({"session_id": "s1"})).await;
    let scratch = Scratch::new("metrics");
    let url = db.url();
    let mut run = Running::spawn(processor(
        &scratch.0,
        &[("DATABASE_URL", &url), ("HOOK_HTTP_ADDR", "127.0.0.1:0"), ("HOOK_GAUGE_INTERVAL", "100ms")],
    ));
    let addr = run.http_addr().await;
    wait_all_processed(&client).await;
    insert(&client, "Mystery", "whatever", 1, json!([1, 2])).await;
    wait_all_processed(&client).await;

    let pre = r#"{source="PreToolUse",action="tool_invocation"}"#;
    let stop = r#"{source="Stop",action="session_stopped"}"#;
    let mystery = r#"{source="Mystery",action="whatever"}"#;
    let scrape = get_until(addr, "/metrics", "all six counted, pending gauge at 0", |status, body| {
        status == 200
            && sample(body, &format!("hook_events_succeeded_total{mystery}")) == Some(1.0)
            && sample(body, "hook_events_pending") == Some(0.0)
    })
    .await;
    for (route, n) in [(pre, 3.0), (stop, 2.0), (mystery, 1.0)] {
        assert_eq!(
            sample(&scrape, &format!("hook_events_succeeded_total{route}")),
            Some(n),
            "{route}\n{scrape}"
        );
        assert_eq!(
            sample(&scrape, &format!("hook_events_claimed_total{route}")),
            Some(n),
            "{route}\n{scrape}"
        );
        assert_eq!(sample(&scrape, &format!("hook_events_failed_total{route}")), Some(0.0), "{route}");
        assert_eq!(sample(&scrape, &format!("hook_events_dead_total{route}")), Some(0.0), "{route}");
        assert_eq!(
            sample(&scrape, &format!("hook_events_handler_duration_seconds_count{route}")),
            Some(n),
            "{route}\n{scrape}"
        );
        assert_eq!(
            sample(&scrape, &format!("hook_events_pickup_latency_seconds_count{route}")),
            Some(n),
            "{route}\n{scrape}"
        );
    }
    assert_eq!(sample(&scrape, "hook_events_batch_size_sum"), Some(6.0), "{scrape}");
    assert_eq!(sample(&scrape, "hook_events_database_errors_total"), Some(0.0));
    assert_eq!(sample(&scrape, "hook_events_dead"), Some(0.0));
    assert_eq!(sample(&scrape, "hook_events_ready"), Some(1.0));
    assert!(sample(&scrape, "hook_events_since_progress_seconds").is_some_and(|s| (0.0..5.0).contains(&s)));
    assert!(scrape.contains("# TYPE hook_events_succeeded_total counter"), "{scrape}");
    assert!(scrape.contains("# TYPE hook_events_handler_duration_seconds histogram"), "{scrape}");
    assert!(scrape.contains("# HELP hook_events_pending "), "{scrape}");

    assert_eq!(get(addr, "/healthz").await, (200, "ok\n".to_owned()));
    let (status, body) = get(addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(get(addr, "/nothing").await.0, 404);

    let (status, stderr) = run.terminate().await;
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("Metrics: Processed=6, Succeeded=6"), "{stderr}");
}

/// Messages received on a notification socket, with when they arrived.
#[derive(Clone, Default)]
struct Notifications(Arc<Mutex<Vec<(Instant, String)>>>);

impl Notifications {
    /// Binds `path` and collects every datagram until the process ends.
    fn listen(path: &Path) -> Notifications {
        let socket = UnixDatagram::bind(path).expect("bind the notification socket");
        let this = Notifications::default();
        let sink = this.clone();
        std::thread::spawn(move || {
            let mut buffer = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buffer) {
                let message = String::from_utf8_lossy(&buffer[..n]).into_owned();
                sink.0.lock().unwrap_or_else(|e| e.into_inner()).push((Instant::now(), message));
            }
        });
        this
    }

    /// Messages with a line equal to `line` (or starting with it, for `STATUS=`), received
    /// after `since`.
    fn count(&self, line: &str, since: Instant) -> usize {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(at, m)| {
                *at >= since && m.lines().any(|l| l == line || (line.ends_with('=') && l.starts_with(line)))
            })
            .count()
    }

    fn statuses(&self) -> Vec<String> {
        let all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        all.iter()
            .flat_map(|(_, m)| {
                m.lines().filter(|l| l.starts_with("STATUS=")).map(str::to_owned).collect::<Vec<_>>()
            })
            .collect()
    }

    fn all(&self) -> String {
        let all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        all.iter().map(|(_, m)| m.replace('\n', " | ")).collect::<Vec<_>>().join("\n")
    }

    /// Waits until at least `n` messages with `line` arrived after `since`.
    async fn wait_for(&self, line: &str, n: usize, since: Instant, within: Duration) {
        let until = Instant::now() + within;
        while self.count(line, since) < n {
            assert!(
                Instant::now() < until,
                "fewer than {n} {line:?} within {within:?}; got:\n{}",
                self.all()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_and_the_watchdog_follow_the_database() {
    let scratch = Scratch::new("watchdog");
    let cluster = EmbeddedCluster::start(ClusterOptions {
        data_dir: scratch.0.join("pg"),
        database: "ops".into(),
        durable: false,
        max_connections: 50,
    })
    .await
    .expect("start a cluster of our own");
    let socket = scratch.0.join("notify.sock");
    let notifications = Notifications::listen(&socket);
    let url = cluster.url("ops");
    let socket_path = socket.display().to_string();
    let started = Instant::now();
    let mut run = Running::spawn(processor(
        &scratch.0,
        &[
            ("DATABASE_URL", url.as_str()),
            ("NOTIFY_SOCKET", socket_path.as_str()),
            ("WATCHDOG_USEC", "1000000"),
            ("HOOK_HTTP_ADDR", "127.0.0.1:0"),
            ("HOOK_STALL_TIMEOUT", "2s"),
            ("HOOK_HANDLER_TIMEOUT", "1s"),
            ("HOOK_DRAIN_TIMEOUT", "1s"),
            ("POLL_INTERVAL", "0.2"),
        ],
    ));
    let addr = run.http_addr().await;

    // Ready after the first claim, then fed: WatchdogSec=1s means a ping every 250 ms.
    notifications.wait_for("READY=1", 1, started, PATIENCE).await;
    let ready_at = Instant::now();
    notifications.wait_for("WATCHDOG=1", 3, ready_at, Duration::from_secs(5)).await;
    get_until(addr, "/readyz", "ready", |status, _| status == 200).await;

    // The database goes away: /readyz says so at once, and the pings stop once the loop has
    // made no progress for the stall timeout (2 s).
    let (pg, connection) = cluster.config("ops").connect(NoTls).await.expect("connect");
    tokio::spawn(connection);
    insert(&pg, "PreToolUse", "tool_invocation", 1, json!({})).await;
    drop(pg);
    cluster.stop_server().await.expect("stop the server");
    let stopped = Instant::now();
    let body = get_until(addr, "/readyz", "unready", |status, _| status == 503).await;
    assert!(body.contains("database") || body.contains("stalled"), "{body}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let quiet_from = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        notifications.count("WATCHDOG=1", quiet_from),
        0,
        "pinged while the database was down (stopped {:?} before the quiet window):\n{}",
        quiet_from - stopped,
        notifications.all()
    );
    assert!(
        notifications.statuses().iter().any(|s| s.starts_with("STATUS=stalled")),
        "{}",
        notifications.all()
    );
    let body = get_until(addr, "/readyz", "unready", |status, _| status == 503).await;
    assert!(body.contains("stalled") || body.contains("database"), "{body}");

    // It comes back: progress, pings and readiness resume without a restart.
    cluster.start_server().await.expect("start the server again");
    let back = Instant::now();
    notifications.wait_for("WATCHDOG=1", 2, back, PATIENCE).await;
    get_until(addr, "/readyz", "ready again", |status, _| status == 200).await;

    let (status, stderr) = run.terminate().await;
    assert_eq!(status.code(), Some(0), "{stderr}");
    notifications.wait_for("STOPPING=1", 1, back, Duration::from_secs(5)).await;
    assert_eq!(notifications.count("READY=1", started), 1, "{}", notifications.all());
    assert!(stderr.contains("withholding watchdog pings"), "{stderr}");
    assert!(stderr.contains("makes progress again"), "{stderr}");
    cluster.stop_server().await.expect("stop the server");
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_reports_the_queue_in_text_and_json() {
    let db = TestDb::migrated("ops_stats").await;
    let client = connect(&db).await;
    client
        .batch_execute(
            "INSERT INTO hook_events (id, source, action, resource, resource_id, processed, retry_count,
                                      processing_errors, created_at, processed_at, dead_at)
             VALUES (gen_random_uuid(), 'PreToolUse', 'tool_invocation', 't', 'Bash', true, 0, NULL,
                     now() - interval '10 minutes', now() - interval '10 minutes' + interval '2 seconds', NULL),
                    (gen_random_uuid(), 'PreToolUse', 'tool_invocation', 't', 'Bash', true, 1, ARRAY['flaky'],
                     now() - interval '10 minutes', now() - interval '10 minutes' + interval '4 seconds', NULL),
                    (gen_random_uuid(), 'Stop', 'session_stopped', 's', 's1', false, 3, ARRAY['a', 'b', 'no such session'],
                     now() - interval '5 minutes', NULL, now() - interval '1 minute'),
                    (gen_random_uuid(), 'Stop', 'session_stopped', 's', 's2', false, 0, NULL,
                     now() - interval '30 seconds', NULL, NULL)",
        )
        .await
        .expect("insert known rows");
    let scratch = Scratch::new("stats");
    let url = db.url();
    let output = processor(&scratch.0, &[("DATABASE_URL", &url)])
        .args(["stats", "--since", "1h", "--json"])
        .output()
        .expect("run hook-processor stats --json");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).expect("one JSON object");
    assert_eq!(report["queue"]["pending"], 1, "{report:#}");
    assert_eq!(report["queue"]["dead"], 1, "{report:#}");
    assert_eq!(report["queue"]["died_in_window"], 1, "{report:#}");
    assert_eq!(report["processed"]["count"], 2, "{report:#}");
    assert_eq!(report["processed"]["with_retries"], 1, "{report:#}");
    assert_eq!(report["processed"]["error_rate"], 0.5, "{report:#}");
    assert_eq!(report["processed"]["latency_seconds"]["avg"], 3.0, "{report:#}");
    assert_eq!(report["processed"]["latency_seconds"]["max"], 4.0, "{report:#}");
    assert_eq!(report["window_seconds"], 3600.0);
    let routes = report["failing_routes"].as_array().expect("routes");
    assert_eq!(routes.len(), 2, "{report:#}");
    let stop = routes.iter().find(|r| r["source"] == "Stop").expect("the Stop route");
    assert_eq!((stop["dead"].as_u64(), stop["latest_error"].as_str()), (Some(1), Some("no such session")));

    let output = processor(&scratch.0, &[("DATABASE_URL", &url)])
        .args(["stats"])
        .output()
        .expect("run hook-processor stats");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).expect("UTF-8");
    for expected in [
        "processed in the last 1h\n",
        "50.00%   1 of 2 needed a retry",
        "no such session",
        "avg 3.00s, p95 4.00s, max 4.00s",
        "queries took",
    ] {
        assert!(text.contains(expected), "{expected:?} missing:\n{text}");
    }

    // No database configured and no embedded cluster running: one clear error, nothing started.
    let output = processor(&scratch.0, &[("HOOK_DATA_DIR", "nowhere")]).arg("stats").output().expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("no embedded PostgreSQL running"), "{stderr}");
    assert!(!scratch.0.join("nowhere").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_carry_event_fields_and_never_payloads_or_passwords() {
    let db = TestDb::migrated("ops_logs").await;
    let client = connect(&db).await;
    let scratch = Scratch::new("logs");
    // Trust authentication ignores the password, so it can be anything, and must appear nowhere.
    let url = format!("{} password=hunter2-do-not-log", db.url());
    let mut run = Running::spawn(processor(
        &scratch.0,
        &[("DATABASE_URL", url.as_str()), ("HOOK_LOG_FORMAT", "json"), ("LOG_LEVEL", "debug")],
    ));
    run.line("engine started").await;
    insert(&client, "Mystery", "whatever", 1, json!({"secret_payload": "payload-marker-7f3a"})).await;
    insert(
        &client,
        "PreToolUse",
        "tool_invocation",
        1,
        json!({"tool_name": "Bash", "tool_input": {"command": "payload-marker-7f3a"}}),
    )
    .await;
    wait_all_processed(&client).await;
    let (status, stderr) = run.terminate().await;
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("hunter2"), "the password leaked:\n{stderr}");

    let lines: Vec<Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let field = |line: &Value, name: &str| line.get(name).or_else(|| line["span"].get(name)).cloned();
    let mut event_lines = 0;
    for line in &lines {
        let level = line["level"].as_str().unwrap_or("");
        if ["INFO", "WARN", "ERROR"].contains(&level) {
            assert!(!line.to_string().contains("payload-marker"), "a payload at {level}: {line}");
        }
        if field(line, "event_id").is_some() {
            event_lines += 1;
            for name in ["source", "action", "attempt"] {
                assert!(field(line, name).is_some(), "{name} missing: {line}");
            }
        }
    }
    assert!(event_lines >= 2, "no event lines:\n{stderr}");
    let unknown = lines
        .iter()
        .find(|l| l["message"].as_str().is_some_and(|m| m.starts_with("no handler for event type")))
        .expect("the unknown event's line");
    assert_eq!(field(unknown, "source"), Some(json!("Mystery")), "{unknown}");
    assert_eq!(field(unknown, "attempt"), Some(json!(1)), "{unknown}");
    // Debug: a hook Claude Code adds later must not log a line per event at the default level.
    assert_eq!(unknown["level"], "DEBUG");
}
