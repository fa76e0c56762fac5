//! The ingest socket with real processes: `hook-ingest` as Claude Code runs it, against the real
//! `hook-processor` binary (built next to `hook-ingest`) serving the socket, killed, or killed
//! between a commit and its answer, and against clients that misbehave.
//!
//! A hook given no database of its own can store its event only through the socket (or spool
//! it), which is how these tests tell the paths apart.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hook_core::NewEvent;
use hook_ingest::wire::{encode_request, MAX_REQUEST};
use hook_store::testing::TestDb;
use hook_store::tokio_postgres::Client;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use uuid::Uuid;

/// Longest wait for anything that should happen.
const PATIENCE: Duration = Duration::from_secs(60);

/// The `hook-processor` binary of this build.
fn processor_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_hook-ingest")).with_file_name("hook-processor");
    assert!(
        path.is_file(),
        "{} is missing: build it first (`cargo build -p hook-processor`, or run the whole workspace's tests)",
        path.display()
    );
    path
}

/// A running `hook-processor` serving an ingest socket; its stderr is collected. Killed if
/// dropped.
struct Processor {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Processor {
    fn start(url: &str, socket: &Path, env: &[(&str, &str)], cwd: &Path) -> Processor {
        let mut command = hook_store::testing::binary_command(processor_binary());
        command
            .env("DATABASE_URL", url)
            .env("HOOK_INGEST_SOCKET", socket)
            .env("HOOK_METRICS_INTERVAL", "0")
            .envs(env.iter().copied())
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("start hook-processor");
        let stderr = child.stderr.take().expect("stderr is piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        Processor { child, lines }
    }

    /// Starts one and waits until it serves the socket.
    async fn serving(url: &str, socket: &Path, env: &[(&str, &str)], cwd: &Path) -> Processor {
        let mut processor = Processor::start(url, socket, env, cwd);
        processor.line("accepting events from hook-ingest").await;
        processor
    }

    fn stderr(&self) -> String {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).join("\n")
    }

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

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits"));
        kill(pid, signal).expect("signal hook-processor");
    }

    async fn exit(&mut self) -> (ExitStatus, String) {
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

    async fn kill(&mut self) {
        self.signal(Signal::SIGKILL);
        self.exit().await;
    }
}

impl Drop for Processor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one run of `hook-ingest` did.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Asserts the hook contract (exit 0, nothing on stdout, at most one warning line) and
    /// returns the warning.
    fn check(&self) -> Option<&str> {
        assert_eq!(self.code, Some(0), "exit status: {self:?}");
        assert_eq!(self.stdout, "", "stdout must stay empty: {self:?}");
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert!(lines.len() <= 1, "at most one stderr line: {self:?}");
        let warning = lines.first().copied();
        if let Some(line) = warning {
            assert!(line.starts_with("hook-ingest: warning: "), "{line}");
        }
        warning
    }
}

/// Runs `hook-ingest` with `input` on stdin and only the given variables in its environment.
fn ingest(input: &[u8], env: &[(&str, &str)]) -> Run {
    ingest_as(None, input, env)
}

/// [`ingest`], as the user and group `uid` if given.
fn ingest_as(uid: Option<u32>, input: &[u8], env: &[(&str, &str)]) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hook-ingest"));
    if let Some(uid) = uid {
        command.uid(uid).gid(uid);
    }
    let mut child = command
        .env_clear()
        // These tests are about which path stores an event, not about speed: a budget a loaded
        // machine cannot exhaust (the socket then gets all of it, or 100 ms before the database).
        .env("HOOK_INGEST_TIMEOUT", "10s")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hook-ingest");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input).expect("write stdin");
    drop(stdin);
    let output = child.wait_with_output().expect("wait for hook-ingest");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A directory of its own under the system's temporary directory, removed at the end. Short,
/// because a socket's path must fit in 107 bytes.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("hi-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn fixture(name: &str) -> Vec<u8> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hooks").join(format!("{name}.json"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn stop_event(n: usize) -> Vec<u8> {
    serde_json::to_vec(&json!({"hook_event_name": "Stop", "session_id": format!("s{n}"), "cwd": "/w"}))
        .expect("serialize")
}

fn spool_ids(spool: &Path) -> Vec<Uuid> {
    std::fs::read_to_string(spool)
        .unwrap_or_default()
        .lines()
        .map(|line| {
            serde_json::from_str::<Value>(line).expect("a spool line is JSON")["id"]
                .as_str()
                .expect("a spool line has an id")
                .parse()
                .expect("the id is a UUID")
        })
        .collect()
}

/// The names of the spool's files beside it: the spool itself, batch and temporary files.
fn spool_files(spool: &Path) -> Vec<String> {
    let name = spool.file_name().and_then(|n| n.to_str()).expect("a spool file name");
    let mut names: Vec<String> = std::fs::read_dir(spool.parent().expect("a directory"))
        .expect("list the spool's directory")
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|file| file.starts_with(name))
        .collect();
    names.sort();
    names
}

/// Writes `events` as spool lines to `path` (a spool or batch file).
fn write_spool_lines(path: &Path, events: &[NewEvent]) {
    let mut lines = Vec::new();
    for event in events {
        serde_json::to_writer(&mut lines, event).expect("serialize");
        lines.push(b'\n');
    }
    std::fs::write(path, lines).expect("write spool lines");
}

async fn count(client: &Client, filter: &str) -> i64 {
    client
        .query_one(&format!("SELECT count(*) FROM hook_events WHERE {filter}"), &[])
        .await
        .expect("count")
        .get(0)
}

/// Ids, oldest first.
async fn ids(client: &Client) -> Vec<Uuid> {
    let rows = client.query("SELECT id FROM hook_events ORDER BY created_at, id", &[]).await.expect("ids");
    rows.iter().map(|r| r.get(0)).collect()
}

async fn wait_for(client: &Client, filter: &str, expected: i64) {
    let until = Instant::now() + PATIENCE;
    loop {
        let found = count(client, filter).await;
        if found == expected {
            return;
        }
        assert!(Instant::now() < until, "{found} rows with {filter}, expected {expected}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

/// Sends `bytes` on a new connection to `socket` and returns the answer line.
fn raw_request(socket: &Path, bytes: &[u8]) -> String {
    let mut stream = UnixStream::connect(socket).expect("connect to the socket");
    stream.set_read_timeout(Some(PATIENCE)).expect("set a read timeout");
    let writer = {
        let mut stream = stream.try_clone().expect("clone the stream");
        let bytes = bytes.to_vec();
        // The server may stop reading (and close) before all is sent: that is the point.
        std::thread::spawn(move || {
            let _ = stream.write_all(&bytes);
        })
    };
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    let _ = writer.join();
    answer
}

#[tokio::test]
async fn hooks_go_through_the_socket_of_a_running_processor_once_each_and_are_handled() {
    let db = TestDb::migrated("socket_running").await;
    let client = db.client().await;
    let scratch = Scratch::new("run");
    let socket = scratch.path("run/ingest.sock");
    let mut processor = Processor::serving(&db.url(), &socket, &[], &scratch.0).await;
    assert!(std::fs::metadata(&socket).unwrap().file_type().is_socket());
    assert_eq!(mode(&socket), 0o600, "only the processor's user may connect");
    assert_eq!(mode(socket.parent().unwrap()), 0o700, "the directory it made is private");

    // No database of their own: only the socket can store their events.
    let (socket_text, spool) = (socket.display().to_string(), scratch.path("spool.jsonl"));
    let spool_text = spool.display().to_string();
    let env = [("HOOK_INGEST_SOCKET", socket_text.as_str()), ("HOOK_SPOOL", spool_text.as_str())];
    let names = ["PreToolUse", "PostToolUse", "UserPromptSubmit", "Stop", "SessionStart", "SessionEnd"];
    for name in names {
        assert_eq!(ingest(&fixture(name), &env).check(), None, "{name}");
    }
    // Hooks arriving together share inserts, and each is still stored once.
    let burst: Vec<_> = (0..16)
        .map(|n| {
            let env: Vec<(String, String)> =
                env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            std::thread::spawn(move || {
                let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                ingest(&stop_event(n), &env)
            })
        })
        .collect();
    for run in burst {
        assert_eq!(run.join().unwrap().check(), None);
    }
    assert!(spool_ids(&spool).is_empty(), "nothing spooled");
    assert_eq!(count(&client, "true").await, 22);
    assert_eq!(count(&client, "source = 'Stop' AND resource_id LIKE 's%'").await, 16);
    let stored = ids(&client).await;
    let mut distinct = stored.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 22);

    // The processor handles them like any other event.
    wait_for(&client, "processed", 22).await;
    let result: Value = client
        .query_one("SELECT result_metadata FROM hook_events WHERE source = 'PostToolUse'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(result["file_path"], json!("/home/dev/shop/src/cart.py"), "{result}");

    // A second processor on the same socket refuses to start instead of stealing it.
    let mut second = Processor::start(&db.url(), &socket, &[], &scratch.0);
    let (status, stderr) = second.exit().await;
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("another hook-processor serves the ingest socket"), "{stderr}");
    assert!(processor.running());
    assert_eq!(ingest(&stop_event(99), &env).check(), None, "the first one still serves");

    // Stopping removes the socket, so hooks go straight to the database.
    processor.signal(Signal::SIGTERM);
    let (status, stderr) = processor.exit().await;
    assert!(status.success(), "{stderr}");
    assert!(!socket.exists(), "the socket is removed on stop");
    assert!(!stderr.contains("WARN") && !stderr.contains("ERROR"), "{stderr}");
}

#[tokio::test]
async fn with_the_processor_gone_hooks_use_the_database_then_the_spool_and_a_new_processor_drains_it() {
    let db = TestDb::migrated("socket_gone").await;
    let client = db.client().await;
    let scratch = Scratch::new("gone");
    let socket = scratch.path("ingest.sock");
    let mut processor = Processor::serving(&db.url(), &socket, &[], &scratch.0).await;
    processor.kill().await;
    assert!(socket.exists(), "a killed processor leaves its socket file behind");

    let (socket_text, spool) = (socket.display().to_string(), scratch.path("spool.jsonl"));
    let (spool_text, url) = (spool.display().to_string(), db.url());
    let with_db = [
        ("HOOK_INGEST_SOCKET", socket_text.as_str()),
        ("HOOK_SPOOL", spool_text.as_str()),
        ("DATABASE_URL", url.as_str()),
    ];
    let without_db = &with_db[..2];
    // Processor down, database up: inserted directly, and nothing to warn about.
    for n in 0..3 {
        assert_eq!(ingest(&stop_event(n), &with_db).check(), None);
    }
    assert_eq!(count(&client, "true").await, 3);
    // No database either: spooled.
    for n in 3..6 {
        let run = ingest(&stop_event(n), without_db);
        let warning = run.check().expect("a warning");
        assert!(warning.contains("event spooled to"), "{warning}");
    }
    let spooled = spool_ids(&spool);
    assert_eq!(spooled.len(), 3);
    assert_eq!(count(&client, "true").await, 3);

    // A new processor replaces the stale socket; the next hook drains the spool through it, in
    // order, before its own event.
    let _processor = Processor::serving(&db.url(), &socket, &[], &scratch.0).await;
    assert_eq!(ingest(&stop_event(6), without_db).check(), None);
    assert!(spool_ids(&spool).is_empty(), "the spool was drained");
    let stored = ids(&client).await;
    assert_eq!(stored.len(), 7);
    assert_eq!(stored[3..6], spooled[..], "spooled events keep their order, before the new one");

    // The same spool again (a backup restored): nothing doubles.
    let lines: String = spooled
        .iter()
        .map(|id| {
            format!(
                "{}\n",
                json!({"id": id, "source": "Stop",
        "action": "response_completed", "resource": "session", "resource_id": "again"})
            )
        })
        .collect();
    std::fs::write(&spool, lines).unwrap();
    assert_eq!(ingest(&stop_event(7), without_db).check(), None);
    assert_eq!(count(&client, "true").await, 8);
    assert_eq!(count(&client, "resource_id = 'again'").await, 0);
}

#[tokio::test]
async fn a_processor_killed_between_its_commit_and_its_answer_leaves_each_event_stored_once() {
    let db = TestDb::migrated("socket_killed").await;
    let client = db.client().await;
    let scratch = Scratch::new("kill");
    let socket = scratch.path("ingest.sock");
    // Debug builds only: the processor waits this long between a commit and its answer.
    let delay = [("HOOK_INGEST_TEST_ANSWER_DELAY", "600000")];
    let mut processor = Processor::serving(&db.url(), &socket, &delay, &scratch.0).await;

    let (socket_text, spool) = (socket.display().to_string(), scratch.path("spool.jsonl"));
    let (spool_text, url) = (spool.display().to_string(), db.url());
    let with_db = [
        ("HOOK_INGEST_SOCKET", socket_text.as_str()),
        ("HOOK_SPOOL", spool_text.as_str()),
        ("DATABASE_URL", url.as_str()),
    ];
    // A hook that can reach the database stops waiting for the answer after the socket's share of
    // its budget and inserts again: the id is already there, the hook reports success.
    assert_eq!(ingest(&stop_event(0), &with_db).check(), None);
    assert_eq!(count(&client, "true").await, 1, "stored once");
    assert!(processor.running(), "the processor still holds its answer");

    // A hook without a database waits for the whole budget; the processor commits and is
    // killed before it answers.
    let waiting = {
        let env: Vec<(String, String)> = [
            ("HOOK_INGEST_SOCKET", socket_text.as_str()),
            ("HOOK_SPOOL", spool_text.as_str()),
            ("HOOK_INGEST_TIMEOUT", "60s"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        std::thread::spawn(move || {
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            ingest(&stop_event(1), &env)
        })
    };
    wait_for(&client, "true", 2).await;
    assert!(!waiting.is_finished(), "the hook waits for the answer");
    processor.kill().await;
    let run = waiting.join().unwrap();
    let warning = run.check().expect("a warning");
    assert!(warning.contains("closed before the answer"), "{warning}");
    assert!(warning.contains("event spooled to"), "{warning}");
    let spooled = spool_ids(&spool);
    assert_eq!(spooled.len(), 1);
    assert!(ids(&client).await.contains(&spooled[0]), "the spooled copy is the committed event");

    // The next processor drains the spool: the copy is skipped.
    let _processor = Processor::serving(&db.url(), &socket, &[], &scratch.0).await;
    assert_eq!(ingest(&stop_event(2), &with_db[..2]).check(), None);
    assert!(spool_ids(&spool).is_empty());
    assert_eq!(count(&client, "true").await, 3, "each event once");
}

#[tokio::test]
async fn bad_clients_are_answered_or_cut_off_and_the_processor_keeps_serving() {
    let db = TestDb::migrated("socket_bad").await;
    let client = db.client().await;
    let scratch = Scratch::new("bad");
    let socket = scratch.path("sock/ingest.sock");
    let group = [("HOOK_INGEST_SOCKET_MODE", "0660")];
    let mut processor = Processor::serving(&db.url(), &socket, &group, &scratch.0).await;
    assert_eq!(mode(&socket), 0o660, "the group may connect too");
    assert_eq!(mode(socket.parent().unwrap()), 0o710, "and search the directory, not list it");

    let (socket_text, spool) = (socket.display().to_string(), scratch.path("spool.jsonl"));
    let (spool_text, url) = (spool.display().to_string(), db.url());
    let with_db = [
        ("HOOK_INGEST_SOCKET", socket_text.as_str()),
        ("HOOK_SPOOL", spool_text.as_str()),
        ("DATABASE_URL", url.as_str()),
    ];
    let without_db = &with_db[..2];

    // Requests that are not requests.
    let answer = raw_request(&socket, b"PreToolUse Bash\n\n");
    assert!(answer.starts_with("error line 1 is not an event"), "{answer}");
    assert_eq!(raw_request(&socket, b"\n"), "stored 0\n");
    let answer = raw_request(&socket, b"\n\n");
    assert!(answer.starts_with("error bytes after the request"), "{answer}");
    let answer = raw_request(&socket, &vec![b'x'; MAX_REQUEST + 1]);
    assert_eq!(answer, format!("error request over {MAX_REQUEST} bytes\n"));
    {
        // Half a request, then the client closes its side.
        let mut stream = UnixStream::connect(&socket).unwrap();
        stream.write_all(br#"{"id": "#).unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("error the connection was closed before the request ended"), "{answer}");
    }
    // A client that connects and leaves.
    drop(UnixStream::connect(&socket).unwrap());

    // A slow client is cut off after the request timeout, and hooks are served meanwhile.
    let mut slow = UnixStream::connect(&socket).unwrap();
    slow.write_all(br#"{"id": "#).unwrap();
    assert_eq!(ingest(&stop_event(0), without_db).check(), None, "served beside a slow client");
    slow.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut answer = String::new();
    slow.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, "error no complete request within 2000ms\n");

    // Connections past the limit are turned away at once; a hook then uses the database.
    let flood: Vec<UnixStream> = (0..300).map(|_| UnixStream::connect(&socket).unwrap()).collect();
    let mut busy = 0;
    for stream in &flood[256..] {
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut answer = String::new();
        let _ = (&*stream).read_to_string(&mut answer);
        busy += usize::from(answer == "error busy: too many connections\n");
    }
    assert!(busy >= 40, "{busy} of 44 connections past the limit were turned away");
    assert_eq!(ingest(&stop_event(1), &with_db).check(), None, "stored beside the flood");
    drop(flood);
    // Their connections are freed as the server sees them close.
    let until = Instant::now() + PATIENCE;
    while raw_request(&socket, b"\n") != "stored 0\n" {
        assert!(Instant::now() < until, "the connection limit was not freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Events the database refuses for their data become raw records with their ids, without
    // failing the good event sent with them.
    let long = NewEvent::new("Stop", "response_completed", "session", "x".repeat(300));
    let nul =
        NewEvent::new("Stop", "response_completed", "session", "nul").with_payload(json!({"p": "a\u{0}b"}));
    let good = NewEvent::new("Stop", "response_completed", "session", "good");
    let answer = raw_request(&socket, &encode_request(&[long.clone(), nul.clone(), good.clone()]).unwrap());
    assert_eq!(answer, "stored 3\n");
    for refused in [&long, &nul] {
        let action: String = client
            .query_one("SELECT action FROM hook_events WHERE id = $1", &[&refused.id])
            .await
            .unwrap()
            .get(0);
        assert_eq!(action, "rejected_event");
    }
    assert_eq!(count(&client, &format!("id = '{}' AND resource_id = 'good'", good.id)).await, 1);

    // After all that, the processor still serves.
    assert!(processor.running(), "{}", processor.stderr());
    assert_eq!(ingest(&stop_event(2), without_db).check(), None);
    assert_eq!(count(&client, "true").await, 6);
    assert!(spool_ids(&spool).is_empty());
    assert!(!processor.stderr().contains("panicked"), "{}", processor.stderr());
}

#[tokio::test]
async fn a_batch_left_by_a_killed_flush_and_the_spool_drain_through_the_socket_once_each() {
    let db = TestDb::migrated("socket_batches").await;
    let client = db.client().await;
    let scratch = Scratch::new("batch");
    let socket = scratch.path("ingest.sock");
    let _processor = Processor::serving(&db.url(), &socket, &[], &scratch.0).await;
    let (socket_text, spool) = (socket.display().to_string(), scratch.path("spool.jsonl"));
    let spool_text = spool.display().to_string();
    let without_db = [("HOOK_INGEST_SOCKET", socket_text.as_str()), ("HOOK_SPOOL", spool_text.as_str())];

    // A hook killed while it flushed: its claimed batch (1,200 events, three requests' worth)
    // is left beside the spool, unlocked. Then one more event is spooled, by a hook that had no
    // way in at all.
    let t0 = time::macros::datetime!(2020-01-01 00:00 UTC);
    let batch: Vec<NewEvent> = (0..1200)
        .map(|n| {
            NewEvent::new("Stop", "response_completed", "session", format!("b{n}"))
                .with_created_at(t0 + time::Duration::seconds(n))
        })
        .collect();
    write_spool_lines(&scratch.path("spool.jsonl.batch-00000000000000000001-1-0"), &batch);
    let run = ingest(&stop_event(0), &[("HOOK_INGEST_SOCKET", "off"), ("HOOK_SPOOL", spool_text.as_str())]);
    assert!(run.check().expect("a warning").contains("event spooled to"), "{run:?}");
    let spooled = spool_ids(&spool);
    assert_eq!(spooled.len(), 1);
    assert_eq!(spool_files(&spool).len(), 2, "the batch and the spool");

    // The next hook sends the batch, then the spool, then its own event, through the socket.
    assert_eq!(ingest(&stop_event(1), &without_db).check(), None);
    assert_eq!(spool_files(&spool), Vec::<String>::new(), "nothing left behind");
    let stored = ids(&client).await;
    assert_eq!(stored.len(), 1202, "each event once");
    let batch_ids: Vec<Uuid> = batch.iter().map(|e| e.id).collect();
    assert_eq!(stored[..1200], batch_ids[..]);
    assert_eq!(stored[1200], spooled[0]);
    assert_eq!(count(&client, "resource_id = 's1'").await, 1);
}

#[tokio::test]
async fn a_processor_that_hangs_after_committing_a_flush_leaves_it_to_the_database_without_doubling() {
    let db = TestDb::migrated("socket_hang_flush").await;
    let client = db.client().await;
    let scratch = Scratch::new("hang");
    let socket = scratch.path("ingest.sock");
    // Debug builds only: the processor waits this long between a commit and its answer.
    let delay = [("HOOK_INGEST_TEST_ANSWER_DELAY", "600000")];
    let mut processor = Processor::serving(&db.url(), &socket, &delay, &scratch.0).await;
    let (socket_text, spool) = (socket.display().to_string(), scratch.path("spool.jsonl"));
    let (spool_text, url) = (spool.display().to_string(), db.url());
    let no_socket = [("HOOK_INGEST_SOCKET", "off"), ("HOOK_SPOOL", spool_text.as_str())];
    for n in 0..3 {
        assert!(ingest(&stop_event(n), &no_socket).check().expect("a warning").contains("event spooled to"));
    }
    let spooled = spool_ids(&spool);

    // The hook sends the spool through the socket; the processor commits it and keeps its
    // answer. After the socket's share of the budget the hook flushes the same batch through the
    // database (the ids are there: nothing is added), then inserts its own event.
    let with_db = [
        ("HOOK_INGEST_SOCKET", socket_text.as_str()),
        ("HOOK_SPOOL", spool_text.as_str()),
        ("DATABASE_URL", url.as_str()),
    ];
    assert_eq!(ingest(&stop_event(3), &with_db).check(), None);
    assert_eq!(spool_files(&spool), Vec::<String>::new(), "the batch went in and is gone");
    // The processor's insert may land before or after the hook's: wait for it, then kill it
    // while it still holds its answer.
    wait_for(&client, "true", 4).await;
    assert!(processor.running(), "the processor still holds its answer");
    processor.kill().await;
    let stored = ids(&client).await;
    assert_eq!(stored.len(), 4, "each event once");
    assert_eq!(stored[..3], spooled[..], "the spooled events first, in order");
    assert_eq!(count(&client, "resource_id = 's3'").await, 1);

    // The socket left by the killed processor: the next hook goes straight to the database.
    assert!(socket.exists());
    assert_eq!(ingest(&stop_event(4), &with_db).check(), None);
    assert_eq!(count(&client, "true").await, 5);
}

#[tokio::test]
async fn a_socket_the_hook_may_not_use_sends_its_event_another_way_and_says_why_when_it_spools() {
    let db = TestDb::migrated("socket_denied").await;
    let client = db.client().await;
    let scratch = Scratch::new("deny");
    let socket = scratch.path("sock/ingest.sock");
    let _processor = Processor::serving(&db.url(), &socket, &[], &scratch.0).await;
    // A directory anyone may write, for the stranger's spool.
    let open = scratch.path("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (socket_text, spool) = (socket.display().to_string(), open.join("spool.jsonl"));
    let spool_text = spool.display().to_string();
    let without_db = [("HOOK_INGEST_SOCKET", socket_text.as_str()), ("HOOK_SPOOL", spool_text.as_str())];

    // Root may connect to any socket: as root the stranger is another user (nobody), as anyone
    // else the socket's owner with the socket's permissions taken away.
    let stranger = nix::unistd::Uid::effective().is_root().then_some(65534);
    if stranger.is_none() {
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o000)).unwrap();
    }
    let run = ingest_as(stranger, &stop_event(0), &without_db);
    let warning = run.check().expect("a warning");
    assert!(warning.contains(&format!("connecting to {socket_text}: Permission denied")), "{warning}");
    assert!(warning.contains("event spooled to"), "{warning}");
    assert_eq!(spool_ids(&spool).len(), 1);
    assert_eq!(count(&client, "true").await, 0);

    // Someone the socket lets in drains that spool through it.
    if stranger.is_none() {
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    assert_eq!(ingest(&stop_event(1), &without_db).check(), None);
    assert_eq!(spool_files(&spool), Vec::<String>::new());
    assert_eq!(count(&client, "true").await, 2);

    // A path that names something other than a socket is no processor: the database, silently.
    let plain = scratch.path("plain.sock");
    std::fs::write(&plain, b"not a socket").unwrap();
    let (plain_text, url) = (plain.display().to_string(), db.url());
    let env = [
        ("HOOK_INGEST_SOCKET", plain_text.as_str()),
        ("HOOK_SPOOL", spool_text.as_str()),
        ("DATABASE_URL", url.as_str()),
    ];
    assert_eq!(ingest(&stop_event(2), &env).check(), None);
    assert_eq!(count(&client, "true").await, 3);
}
