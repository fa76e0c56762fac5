//! Tests of the `hook-processor` binary as its users run it: with no configuration on an embedded
//! cluster, and with bad configuration, which must fail fast with one clear line and no secrets.
//!
//! Every run gets a clean environment (none of the variables the binary reads) and a fresh working
//! directory under /tmp without a `.env`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hook_store::tokio_postgres::{self, Client, NoTls};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;
use uuid::Uuid;

/// Longest wait for anything here. Starting an embedded cluster for the first time runs `initdb`
/// with fsync on, which can take a while on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(120);

/// How long a refusal of bad configuration may take: a bound against hanging, not a speed test.
const REFUSAL_PATIENCE: Duration = Duration::from_secs(30);

/// A fresh directory under /tmp (reachable by the postgres account when we are root) holding the
/// working directory `cwd/` and room for a data directory `data/`. On drop, a server a failed test
/// left running under `data/` is shut down, and the directory removed.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = PathBuf::from(format!("/tmp/hook-processor-cli-{}-{n}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("cwd")).expect("create a scratch directory under /tmp");
        Scratch { dir }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn postmaster_pid(&self) -> PathBuf {
        self.data_dir().join("pgdata/postmaster.pid")
    }

    /// The binary, with a clean environment, run in `cwd/`, with its data directory in `data/`.
    fn processor(&self) -> Command {
        let mut command = hook_store::testing::binary_command(env!("CARGO_BIN_EXE_hook-processor"));
        command
            .env("HOOK_DATA_DIR", self.data_dir())
            .current_dir(self.dir.join("cwd"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // The first line of postmaster.pid is the server's pid; SIGQUIT is an immediate shutdown.
        if let Ok(text) = std::fs::read_to_string(self.postmaster_pid()) {
            if let Some(pid) = text.lines().next().and_then(|line| line.trim().parse().ok()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGQUIT);
                let until = Instant::now() + Duration::from_secs(30);
                while self.postmaster_pid().exists() && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running processor whose stderr is read line by line in a thread. Dropped while still
/// running (a failed test), it gets SIGTERM (so it stops its cluster) and, if it lingers, SIGKILL.
struct Running {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
}

impl Running {
    fn spawn(mut command: Command) -> Running {
        let mut child = command.spawn().expect("start hook-processor");
        let stderr = child.stderr.take().expect("stderr is piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(strip_ansi(&line));
            }
        });
        Running { child, lines, reader: Some(reader) }
    }

    fn stderr(&self) -> String {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).join("\n")
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits in i32"))
    }

    /// Waits (bounded) for a stderr line matching `wanted`, and returns it.
    async fn line(&mut self, what: &str, wanted: impl Fn(&str) -> bool) -> String {
        let until = Instant::now() + PATIENCE;
        loop {
            let found =
                self.lines.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|l| wanted(l)).cloned();
            if let Some(line) = found {
                return line;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("hook-processor exited ({status}) before logging {what}:\n{}", self.stderr());
            }
            assert!(Instant::now() < until, "no line with {what} after {PATIENCE:?}:\n{}", self.stderr());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (up to `patience`) for the process to exit; returns its status and its whole stderr.
    /// Past `patience` it panics, and the drop stops the process.
    async fn wait(&mut self, patience: Duration) -> (ExitStatus, String) {
        let until = Instant::now() + patience;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for hook-processor") {
                break status;
            }
            assert!(
                Instant::now() < until,
                "hook-processor did not exit within {patience:?}:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        (status, self.stderr())
    }

    async fn terminate(&mut self) -> (ExitStatus, String) {
        kill(self.pid(), Signal::SIGTERM).expect("SIGTERM hook-processor");
        self.wait(PATIENCE).await
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        let _ = kill(self.pid(), Signal::SIGTERM);
        let until = Instant::now() + Duration::from_secs(60);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Removes ANSI colour sequences (`ESC [ ... letter`), which the log formatter may emit.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The URL of the `psql "..."` hint in a log line.
fn psql_url(line: &str) -> String {
    let start =
        line.find("psql \"").map(|i| i + "psql \"".len()).unwrap_or_else(|| panic!("no psql hint: {line}"));
    let rest = &line[start..];
    let end = rest.find('"').unwrap_or_else(|| panic!("unterminated psql hint: {line}"));
    rest[..end].to_owned()
}

async fn connect(url: &str) -> Client {
    let (client, connection) =
        tokio_postgres::connect(url, NoTls).await.unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    tokio::spawn(connection);
    client
}

async fn processed(client: &Client, id: Uuid) -> bool {
    client
        .query_one("SELECT processed FROM hook_events WHERE id = $1", &[&id])
        .await
        .expect("read the event")
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn with_no_configuration_it_runs_on_an_embedded_cluster_it_stops_and_later_reuses() {
    let scratch = Scratch::new("embedded");
    let id = Uuid::new_v4();

    // First run: creates the cluster, processes one event, stops the cluster on SIGTERM.
    let mut run = Running::spawn(scratch.processor());
    let url = psql_url(&run.line("the psql hint", |l| l.contains("psql \"postgresql://")).await);
    assert!(url.starts_with("postgresql://postgres@/hook_events?host=/"), "{url}");
    assert!(url.ends_with("&port=5432"), "{url}");
    run.line("engine started", |l| l.contains("engine started")).await;
    let client = connect(&url).await;
    client
        .execute(
            "INSERT INTO hook_events (id, source, action, resource, resource_id, payload) \
             VALUES ($1, 'PreToolUse', 'tool_invocation', 'tool', 'Bash', $2)",
            &[&id, &json!({"tool_name": "Bash", "tool_input": {"command": "ls"}})],
        )
        .await
        .expect("insert an event");
    let until = Instant::now() + PATIENCE;
    while !processed(&client, id).await {
        assert!(Instant::now() < until, "event not processed after {PATIENCE:?}:\n{}", run.stderr());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let row = client
        .query_one(
            "SELECT result_metadata, processed_at >= created_at FROM hook_events WHERE id = $1",
            &[&id],
        )
        .await
        .expect("read the result");
    let metadata: serde_json::Value = row.get(0);
    assert_eq!(metadata["tool_name"], "Bash", "{metadata}");
    assert!(row.get::<_, bool>(1));
    drop(client);

    let (status, stderr) = run.terminate().await;
    assert_eq!(status.code(), Some(0), "{status}\n{stderr}");
    assert!(stderr.contains("Metrics: Processed=1, Succeeded=1"), "{stderr}");
    assert!(stderr.contains("initialized embedded PostgreSQL cluster"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!scratch.postmaster_pid().exists(), "the embedded cluster is still running:\n{stderr}");

    // Second run on the same directory: the same cluster (no initdb), the event still there.
    let mut run = Running::spawn(scratch.processor());
    let again = psql_url(&run.line("the psql hint", |l| l.contains("psql \"postgresql://")).await);
    assert_eq!(again, url);
    run.line("engine started", |l| l.contains("engine started")).await;
    let client = connect(&again).await;
    assert!(processed(&client, id).await, "the processed event survived the restart");
    let events: i64 = client.query_one("SELECT count(*) FROM hook_events", &[]).await.expect("count").get(0);
    assert_eq!(events, 1);
    drop(client);

    let (status, stderr) = run.terminate().await;
    assert_eq!(status.code(), Some(0), "{status}\n{stderr}");
    assert!(!stderr.contains("initializing embedded PostgreSQL cluster"), "{stderr}");
    assert!(stderr.contains("started embedded PostgreSQL"), "{stderr}");
    assert!(stderr.contains("Metrics: Processed=0"), "{stderr}");
    assert!(!scratch.postmaster_pid().exists(), "the embedded cluster is still running:\n{stderr}");
}

/// Runs the binary with `env` on top of a clean environment and checks that it refuses to start:
/// it exits non-zero without hanging, its last stderr line is `hook-processor: error: ...`
/// containing `expected`, it leaks no password and does not panic, and it touched no data
/// directory.
async fn check(env: &[(&str, &str)], expected: &str) {
    let scratch = Scratch::new("bad");
    let mut command = scratch.processor();
    command.envs(env.iter().copied());
    let started = Instant::now();
    let (status, stderr) = Running::spawn(command).wait(REFUSAL_PATIENCE).await;
    let case = format!("{env:?} ({:.2}s, {status})", started.elapsed().as_secs_f64());
    assert!(!status.success(), "{case}: succeeded\n{stderr}");
    let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    assert!(last.starts_with("hook-processor: error: "), "{case}: last line is not an error:\n{stderr}");
    assert!(last.contains(expected), "{case}: {expected:?} missing from the error:\n{stderr}");
    assert!(!stderr.contains("secretpw"), "{case}: the password leaked:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{case}: panicked:\n{stderr}");
    assert!(!scratch.data_dir().exists(), "{case}: an embedded cluster was set up:\n{stderr}");
    eprintln!("{case}: {last}");
}

/// A TCP port on 127.0.0.1 where nothing listens (it was free a moment ago).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

#[tokio::test]
async fn batch_size_zero_is_refused() {
    check(&[("BATCH_SIZE", "0")], "batch size 0").await;
}

#[tokio::test]
async fn max_retry_count_above_ten_is_refused() {
    check(&[("MAX_RETRY_COUNT", "11")], "max retry count 11").await;
}

#[tokio::test]
async fn an_unparsable_database_url_is_refused_without_echoing_it() {
    check(
        &[("DATABASE_URL", "postgres://u:secretpw@h:notaport/d")],
        "DATABASE_URL is not a valid connection string",
    )
    .await;
}

#[tokio::test]
async fn a_database_nobody_listens_on_is_reported_without_the_password() {
    let port = free_port();
    let url = format!("postgres://u:secretpw@127.0.0.1:{port}/d");
    check(&[("DATABASE_URL", url.as_str())], &format!("connecting to postgresql://u@127.0.0.1:{port}/d"))
        .await;
}

#[tokio::test]
async fn a_garbage_log_level_is_refused() {
    check(&[("LOG_LEVEL", "garbage(((")], "LOG_LEVEL").await;
}

/// A common mistake: the variables and flags, the exit status and the text of the one line.
type Mistake = (Vec<(String, String)>, &'static [&'static str], i32, String);

fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// Each way libpq users give a password reaches a server that demands one (scram-sha-256), for
/// the processor and for `hook-processor stats`; a wrong one fails with one line that says where
/// it came from and does not show it.
#[tokio::test(flavor = "multi_thread")]
async fn passwords_are_found_the_way_libpq_finds_them() {
    let cluster = hook_store::testing::PasswordCluster::start("processor").await;
    let role = cluster.role("processor").await;
    for (way, vars) in role.ways() {
        let scratch = Scratch::new("password");
        let mut command = scratch.processor();
        command.envs(vars.iter().map(|(k, v)| (k, v)));
        let mut run = Running::spawn(command);
        run.line("engine started", |l| l.contains("engine started")).await;
        let (status, stderr) = run.terminate().await;
        assert_eq!(status.code(), Some(0), "{way}: {stderr}");
        assert!(!scratch.data_dir().exists(), "{way}: no embedded cluster");

        let mut stats = scratch.processor();
        stats.envs(vars.iter().map(|(k, v)| (k, v))).arg("stats").stdout(Stdio::piped());
        let output = stats.output().expect("run hook-processor stats");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(output.status.code(), Some(0), "{way}: {}", String::from_utf8_lossy(&output.stderr));
        assert!(stdout.contains("pending"), "{way}: {stdout}");
    }
    for extra in [&[][..], &["stats"][..]] {
        let scratch = Scratch::new("wrong-password");
        let mut command = scratch.processor();
        command.envs(role.wrong("not-the-password")).env("LOG_LEVEL", "warn").args(extra);
        let output = command.output().expect("run hook-processor");
        let (code, line) = hook_store::testing::error_line("hook-processor", &output);
        assert_eq!(code, Some(1), "{extra:?}: {line}");
        assert!(line.contains(r#"password authentication failed for user "processor""#), "{line}");
        assert!(line.contains("(password from PGPASSWORD)"), "{line}");
        assert!(!line.contains("not-the-password") && !line.contains(&role.password), "{line}");
    }
}

/// The common mistakes, each with the one line it gets and its exit status: 2 for a mistake in
/// the configuration, 1 for a database that refuses.
#[tokio::test]
async fn common_mistakes_get_one_line_that_says_what_to_fix() {
    let refused = free_port();
    let refused_url = format!("postgres://app:secretpw@127.0.0.1:{refused}/events");
    let mut nobody = hook_store::testing::server().await;
    nobody.user("nobody").dbname("postgres");
    let nobody = hook_store::testing::config_to_url(&nobody);
    let cases: Vec<Mistake> = vec![
        (vars(&[("BATCH_SIZE", "abc")]), &[], 2, "BATCH_SIZE=\"abc\": invalid digit found in string".into()),
        (vars(&[("BATCH_SIZE", "0")]), &[], 2, "invalid configuration: batch size 0".into()),
        (vars(&[("MAX_RETRY_COUNT", "11")]), &[], 2, "max retry count 11".into()),
        (vars(&[("POLL_INTERVAL", "soon")]), &[], 2, "POLL_INTERVAL=\"soon\": \"soon\" is not a duration".into()),
        (vars(&[("HOOK_HANDLER_TIMEOUT", "30 sec")]), &["--claim-timeout", "20"], 2, "claim timeout".into()),
        (vec![], &["--batch-size", "abc"], 2, "invalid value 'abc' for '--batch-size <BATCH_SIZE>'".into()),
        (vars(&[("POSTGRES_PORT", "high")]), &[], 2, "POSTGRES_PORT=\"high\": invalid digit found in string".into()),
        (vars(&[("PGHOST", "db"), ("PGPORT", "high")]), &[], 2, "PGPORT \"high\" is not a port number".into()),
        (vars(&[("DATABASE_URL", "postgres://app:secret@pw@db/events")]), &[], 2, "percent-encode @ in the user name or password as %40".into()),
        (vars(&[("DATABASE_URL", "postgres://app:secretpw@db:notaport/events")]), &[], 2, "the port is not a number".into()),
        (vars(&[("DATABASE_URL", "postgresql+psycopg2://app@db/events")]), &[], 2, "must start with postgres:// or postgresql://".into()),
        (vars(&[("LOG_LEVEL", "garbage(((")]), &[], 2, "LOG_LEVEL".into()),
        (vec![], &["--bogus"], 2, "unexpected argument '--bogus' found (see --help)".into()),
        (vec![], &["stats", "--since", "soon"], 2, "'--since <SINCE>': \"soon\" is not a duration".into()),
        (vars(&[("DATABASE_URL", &refused_url)]), &[], 1, format!("connecting to postgresql://app@127.0.0.1:{refused}/events (password from DATABASE_URL): Connection refused")),
        (vars(&[("DATABASE_URL", &nobody)]), &[], 1, r#": FATAL: role "nobody" does not exist"#.into()),
    ];
    for (vars, args, code, expected) in cases {
        let scratch = Scratch::new("mistake");
        let mut command = scratch.processor();
        command.env("LOG_LEVEL", "warn").envs(vars.iter().map(|(k, v)| (k, v))).args(args);
        let output = command.output().expect("run hook-processor");
        let (got, line) = hook_store::testing::error_line("hook-processor", &output);
        eprintln!("{vars:?} {args:?} -> {got:?} {line}");
        assert_eq!(got, Some(code), "{vars:?} {args:?}: {line}");
        assert!(line.contains(&expected), "{vars:?} {args:?}: {expected:?} missing from: {line}");
        for repeated in ["error connecting to server", "db error", "secret"] {
            assert!(!line.contains(repeated), "{line}");
        }
        assert!(!scratch.data_dir().exists(), "{vars:?}: an embedded cluster was set up");
    }
}
