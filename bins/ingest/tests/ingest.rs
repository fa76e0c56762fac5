//! `hook-ingest` as Claude Code runs it: a process with the hook's JSON on stdin, against a real
//! PostgreSQL that is up, down, silent, or missing its table.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hook_core::{default_registry, Engine, EngineConfig};
use hook_store::testing::TestDb;
use hook_store::tokio_postgres::{Client, NoTls};
use hook_store::{ClusterOptions, EmbeddedCluster, StoreOptions};
use serde_json::{json, Value};
use uuid::Uuid;

const SESSION: &str = "4b8d6f0e-2c1a-4e57-9a3b-0f6c2d9e1a77";

/// What one run of `hook-ingest` did.
#[derive(Debug)]
struct Run {
    success: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl Run {
    /// Asserts the hook contract: exit 0, nothing on stdout, and at most one stderr line, which
    /// is a warning; returns the warning.
    fn check(&self) -> Option<&str> {
        assert!(self.success && self.code == Some(0), "exit status: {self:?}");
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
    let begun = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hook-ingest"))
        .env_clear()
        // These tests are about the database and the spool: no processor's socket (a machine's
        // own /run/hook-events/ingest.sock, say) may take the events. tests/socket.rs has those.
        .env("HOOK_INGEST_SOCKET", "off")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hook-ingest");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    // A thread, so that a child that stops reading cannot deadlock the test.
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let output = child.wait_with_output().expect("wait for hook-ingest");
    let elapsed = begun.elapsed();
    writer.join().expect("stdin writer").expect("write stdin");
    Run {
        success: output.status.success(),
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        elapsed,
    }
}

/// A directory of its own under the system's temporary directory, removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("hook-ingest-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }

    fn spool(&self) -> String {
        self.0.join("spool.jsonl").display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // A test that failed half way leaves no server running (but keeps its files).
        hook_store::testing::stop_servers_under(&self.0);
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

/// The lines of the spool file and of the batch files beside it (oldest batch first, the spool
/// file last: the order a flush reads them in).
fn spool_lines(spool: &str) -> Vec<Value> {
    let path = Path::new(spool);
    let prefix = format!("{}.batch-", path.file_name().expect("a spool file name").to_string_lossy());
    let mut files: Vec<PathBuf> = std::fs::read_dir(path.parent().expect("a spool directory"))
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|f| f.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&prefix)));
    files.sort();
    files.push(path.to_path_buf());
    files
        .iter()
        .flat_map(|file| {
            std::fs::read_to_string(file)
                .unwrap_or_default()
                .lines()
                .map(|line| serde_json::from_str(line).expect("a spool line is JSON"))
                .collect::<Vec<Value>>()
        })
        .collect()
}

async fn connect(config: &hook_store::tokio_postgres::Config) -> Client {
    let (client, connection) = config.connect(NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

async fn count(client: &Client, filter: &str) -> i64 {
    client
        .query_one(&format!("SELECT count(*) FROM hook_events WHERE {filter}"), &[])
        .await
        .expect("count")
        .get(0)
}

/// `(source, action, resource, resource_id)` of every event, oldest first.
async fn routes(client: &Client) -> Vec<[String; 4]> {
    let rows = client
        .query("SELECT source, action, resource, resource_id FROM hook_events ORDER BY created_at, id", &[])
        .await
        .expect("routes");
    rows.iter().map(|r| [r.get(0), r.get(1), r.get(2), r.get(3)]).collect()
}

#[tokio::test]
async fn every_fixture_is_stored_under_its_route_and_handled_by_its_handler() {
    let db = TestDb::migrated("ingest_fixtures").await;
    let client = db.client().await;
    let scratch = Scratch::new("fixtures");
    let (url, spool) = (db.url(), scratch.spool());
    // Asynchronous commit, as a deployment that trades the WAL flush for speed would run it.
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("HOOK_SPOOL", spool.as_str()),
        ("HOOK_INGEST_SYNCHRONOUS_COMMIT", "off"),
    ];
    // hook_event_name, action, resource, resource_id, a fact its handler reports.
    let cases = [
        ("PreToolUse", "tool_invocation", "tool", "Write", ("tool_name", json!("Write"))),
        (
            "PostToolUse",
            "tool_completion",
            "tool",
            "Edit",
            ("file_path", json!("/home/dev/shop/src/cart.py")),
        ),
        ("UserPromptSubmit", "prompt_submitted", "session", SESSION, ("prompt_length", json!(76))),
        ("Stop", "response_completed", "session", SESSION, ("event", json!("stop"))),
        ("SessionStart", "session_initialized", "session", SESSION, ("cwd", json!("/home/dev/shop"))),
        ("SessionEnd", "session_ended", "session", SESSION, ("reason", json!("prompt_input_exit"))),
        (
            "Notification",
            "notification",
            "session",
            SESSION,
            ("notification_type", json!("permission_prompt")),
        ),
        ("SubagentStop", "subagent_stop", "session", SESSION, ("event", json!("subagent_stop"))),
        ("PreCompact", "pre_compact", "session", SESSION, ("trigger", json!("manual"))),
    ];
    for (name, ..) in &cases {
        let run = ingest(&fixture(name), &env);
        assert_eq!(run.check(), None, "{name}");
    }
    assert!(spool_lines(&spool).is_empty());

    let store = db.store(StoreOptions::default()).await;
    let config = EngineConfig {
        poll_interval: Duration::from_millis(50),
        metrics_interval: None,
        ..Default::default()
    };
    let engine = Engine::builder(store).registry(default_registry()).config(config).build().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let processing = tokio::spawn(engine.run(async {
        let _ = stopped.await;
    }));
    let deadline = Instant::now() + Duration::from_secs(30);
    while count(&client, "NOT processed").await > 0 {
        assert!(Instant::now() < deadline, "events still unprocessed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(());
    let totals = processing.await.unwrap();
    assert_eq!((totals.succeeded, totals.failed), (9, 0));

    for (name, action, resource, resource_id, (fact, value)) in cases {
        let row = client
            .query_one(
                "SELECT action, resource, resource_id, payload, metadata, result_metadata \
                 FROM hook_events WHERE source = $1",
                &[&name],
            )
            .await
            .unwrap();
        let got: [String; 3] = [row.get(0), row.get(1), row.get(2)];
        assert_eq!(got, [action, resource, resource_id], "{name}");
        let payload: Value = row.get(3);
        assert_eq!(
            payload,
            serde_json::from_slice::<Value>(&fixture(name)).unwrap(),
            "{name}: payload is the input"
        );
        let metadata: Value = row.get(4);
        assert_eq!(metadata["hook_type"], json!(name));
        assert_eq!(metadata["session_id"], json!(SESSION));
        assert_eq!(metadata["cwd"], json!("/home/dev/shop"));
        assert!(metadata["logged_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{metadata}");
        let result: Value = row.get(5);
        assert_eq!(result[fact], value, "{name}: {result}");
        assert_eq!(result.get("unknown"), None, "{name} fell through to the wildcard: {result}");
        assert_eq!(result["session_id"], json!(SESSION), "{name}: {result}");
    }
}

#[tokio::test]
async fn malformed_input_exits_0_warns_once_and_keeps_what_there_is() {
    let db = TestDb::migrated("ingest_malformed").await;
    let client = db.client().await;
    let scratch = Scratch::new("malformed");
    let (url, spool) = (db.url(), scratch.spool());
    let env = [("DATABASE_URL", url.as_str()), ("HOOK_SPOOL", spool.as_str())];
    let mut huge = br#"{"hook_event_name":"PostToolUse","tool_response":""#.to_vec();
    huge.resize(16 * 1024 * 1024 + 10, b'x');
    // input, warning, whether a raw record is stored
    let cases: Vec<(Vec<u8>, &str, bool)> = vec![
        (b"".to_vec(), "empty input; nothing stored", false),
        (b" \n".to_vec(), "empty input; nothing stored", false),
        (b"PreToolUse Bash".to_vec(), "input is not JSON (expected value at line 1 column 1)", true),
        (b"\xff\xfe\x00".to_vec(), "input is not JSON (expected value at line 1 column 1)", true),
        (
            br#"{"hook_event_name": "Stop", "session_id": "#.to_vec(),
            "input is not JSON (EOF while parsing",
            true,
        ),
        (b"[1, 2, 3]".to_vec(), "input is not a JSON object", true),
        (br#"{"session_id": "s"}"#.to_vec(), "input has no hook_event_name", true),
        (huge, "input of 16777226 bytes is over the 16 MiB limit; kept its first 64 KiB", true),
    ];
    let mut stored = 0;
    for (input, warning, keeps) in &cases {
        let run = ingest(input, &env);
        let shown = String::from_utf8_lossy(&input[..input.len().min(40)]).into_owned();
        let line = run.check().unwrap_or_else(|| panic!("no warning for {shown:?}"));
        assert!(line.contains(warning), "{shown:?}: {line}");
        stored += i64::from(*keeps);
        assert_eq!(count(&client, "true").await, stored, "{shown:?}");
    }
    assert!(spool_lines(&spool).is_empty());
    let raw: Vec<(String, Value)> = client
        .query("SELECT resource_id, payload FROM hook_events ORDER BY created_at", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(count(&client, "source = 'hook-ingest' AND action = 'malformed_input'").await, 6);
    assert_eq!(raw[0].1["raw"], json!("PreToolUse Bash"));
    assert_eq!(raw[1].1["raw"], json!("\u{FFFD}\u{FFFD}\u{FFFD}"), "invalid UTF-8 and NUL are replaced");
    assert_eq!(raw[5].1["raw"].as_str().map(str::len), Some(64 * 1024));
    assert_eq!(raw[5].1["bytes"], json!(16 * 1024 * 1024 + 10));
}

/// The acceptance test: 100 hooks while the database is stopped exit 0 within the timeout; once
/// it is back, the next hook flushes all 100 and the table holds exactly 101 events.
#[tokio::test]
async fn an_outage_spools_every_event_and_the_next_run_flushes_them_once_in_order() {
    let scratch = Scratch::new("outage");
    let cluster = EmbeddedCluster::start(ClusterOptions {
        data_dir: scratch.0.join("cluster"),
        database: "hook_events".into(),
        durable: false,
        max_connections: 20,
    })
    .await
    .unwrap();
    let config = cluster.config("hook_events");
    {
        let client = connect(&config).await;
        hook_store::migrate::migrate(&client).await.unwrap();
    }
    let url = cluster.url("hook_events");
    let spool = scratch.spool();
    let env = [("DATABASE_URL", url.as_str()), ("HOOK_SPOOL", spool.as_str())];

    cluster.stop_server().await.unwrap();
    let mut elapsed = Vec::new();
    for n in 0..100 {
        let run = ingest(&stop_event(n), &env);
        let warning = run.check().expect("a warning when the database is down");
        assert!(warning.contains("event spooled to"), "{warning}");
        elapsed.push(run.elapsed);
    }
    elapsed.sort();
    eprintln!("100 runs with the database stopped: p50 {:?}, max {:?}", elapsed[50], elapsed[99]);
    // The hook's budget is 200 ms; a loaded CI machine can delay a process's start and exit, so
    // the bound on every run leaves room for scheduling, while the median must be well inside.
    assert!(
        elapsed[50] < Duration::from_millis(200),
        "the median run ends within the 200ms timeout: {elapsed:?}"
    );
    assert!(elapsed[99] < Duration::from_millis(1000), "no run blocks: {elapsed:?}");
    let spooled = spool_lines(&spool);
    assert_eq!(spooled.len(), 100);
    let spooled_ids: Vec<Uuid> =
        spooled.iter().map(|line| line["id"].as_str().unwrap().parse().unwrap()).collect();

    cluster.start_server().await.unwrap();
    // The runs that flush get a generous budget: this part is about what is stored, not about
    // speed, and a loaded machine must not turn the flush into a timeout (the 200 ms budget is
    // asserted on the outage runs above).
    let flushing = [env[0], env[1], ("HOOK_INGEST_TIMEOUT", "10s")];
    let run = ingest(&stop_event(100), &flushing);
    assert_eq!(run.check(), None);
    assert!(spool_lines(&spool).is_empty(), "the spool was emptied");

    let client = connect(&config).await;
    assert_eq!(count(&client, "true").await, 101);
    let in_order: Vec<Uuid> = client
        .query("SELECT id FROM hook_events ORDER BY created_at, id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(in_order[..100], spooled_ids[..], "spooled events keep their order, before the new one");
    let sessions: Vec<String> = routes(&client).await.into_iter().map(|[.., id]| id).collect();
    assert_eq!(sessions, (0..=100).map(|n| format!("s{n}")).collect::<Vec<_>>());

    // Flushing again (say, a copy of the spool restored from a backup) adds nothing.
    let lines: String = spooled.iter().map(|line| format!("{line}\n")).collect();
    std::fs::write(&spool, lines).unwrap();
    assert_eq!(ingest(&stop_event(101), &flushing).check(), None);
    assert_eq!(count(&client, "true").await, 102);

    // The embedded cluster by HOOK_DATA_DIR: found while it runs, not waited for when stopped.
    let data_dir = scratch.0.join("cluster").display().to_string();
    let by_dir = [("HOOK_DATA_DIR", data_dir.as_str()), ("HOOK_SPOOL", spool.as_str())];
    assert_eq!(ingest(&stop_event(102), &by_dir).check(), None);
    assert_eq!(count(&client, "true").await, 103);
    drop(client);
    cluster.stop_server().await.unwrap();
    let run = ingest(&stop_event(103), &by_dir);
    let warning = run.check().expect("a warning");
    assert!(warning.contains("is not running; event spooled to"), "{warning}");
    assert_eq!(spool_lines(&spool).len(), 1);
}

#[tokio::test]
async fn a_server_that_does_not_answer_is_given_up_on_within_the_timeout() {
    // Accepts connections (the kernel does, from the backlog) and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("postgres://hooks@127.0.0.1:{}/events", silent.local_addr().unwrap().port());
    let scratch = Scratch::new("silent");
    let spool = scratch.spool();
    for (timeout, budget) in [(None, 200), (Some("50ms"), 50)] {
        let mut env = vec![("DATABASE_URL", url.as_str()), ("HOOK_SPOOL", spool.as_str())];
        env.extend(timeout.map(|t| ("HOOK_INGEST_TIMEOUT", t)));
        let run = ingest(&stop_event(0), &env);
        let warning = run.check().expect("a warning");
        assert!(warning.contains(&format!("within {budget}ms; event spooled")), "{warning}");
        assert!(run.elapsed >= Duration::from_millis(budget), "{:?}", run.elapsed);
        // A bound against hanging, with room for a loaded machine's scheduling.
        assert!(run.elapsed < Duration::from_millis(budget + 1000), "{:?}", run.elapsed);
    }
    assert_eq!(spool_lines(&spool).len(), 2);
}

#[tokio::test]
async fn concurrent_hooks_lose_and_duplicate_nothing() {
    let db = TestDb::migrated("ingest_concurrent").await;
    let scratch = Scratch::new("concurrent");
    let spool = scratch.spool();
    let down = "host=/nonexistent-hook-events user=postgres dbname=x".to_string();
    let up = db.url();
    // A generous budget: this test is about concurrency, not speed, and on a loaded machine a
    // flush cut off by the 200 ms deadline (which may still commit) would leave lines spooled.
    let burst = |url: String, from: usize, n: usize| {
        let spool = spool.clone();
        let runs: Vec<_> = (from..from + n)
            .map(|i| {
                let (url, spool) = (url.clone(), spool.clone());
                std::thread::spawn(move || {
                    let env = [
                        ("DATABASE_URL", url.as_str()),
                        ("HOOK_SPOOL", spool.as_str()),
                        ("HOOK_INGEST_TIMEOUT", "10s"),
                    ];
                    ingest(&stop_event(i), &env)
                })
            })
            .collect();
        for run in runs {
            run.join().unwrap().check();
        }
    };
    burst(down, 0, 24);
    assert_eq!(spool_lines(&spool).len(), 24, "every line whole");
    burst(up, 24, 12);
    let client = db.client().await;
    assert_eq!(count(&client, "true").await, 36);
    assert!(spool_lines(&spool).is_empty());
    let sessions: i64 = client
        .query_one("SELECT count(DISTINCT resource_id) FROM hook_events", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(sessions, 36);
}

#[tokio::test]
async fn a_missing_table_spools_until_it_exists() {
    let db = TestDb::empty("ingest_no_table").await;
    let scratch = Scratch::new("no-table");
    let (url, spool) = (db.url(), scratch.spool());
    let env =
        [("DATABASE_URL", url.as_str()), ("HOOK_SPOOL", spool.as_str()), ("HOOK_INGEST_TIMEOUT", "10s")];
    let warning = ingest(&stop_event(0), &env).check().map(str::to_owned).expect("a warning");
    assert!(warning.contains(r#"relation "hook_events" does not exist"#), "{warning}");
    let warning = ingest(&stop_event(1), &env).check().map(str::to_owned).expect("a warning");
    assert!(warning.contains("event spooled behind the rest"), "{warning}");
    assert_eq!(spool_lines(&spool).len(), 2);

    let client = db.client().await;
    hook_store::migrate::migrate(&client).await.unwrap();
    assert_eq!(ingest(&stop_event(2), &env).check(), None);
    let sessions: Vec<String> = routes(&client).await.into_iter().map(|[.., id]| id).collect();
    assert_eq!(sessions, ["s0", "s1", "s2"]);
}

#[tokio::test]
async fn refused_and_torn_spool_lines_never_block_the_spool() {
    // Also with each statement in its own transaction (BEGIN; SET LOCAL ...; COMMIT), where a
    // refused statement aborts the transaction it runs in.
    for synchronous_commit in [None, Some("off")] {
        let db = TestDb::migrated("ingest_poison").await;
        let scratch = Scratch::new("poison");
        let (url, spool) = (db.url(), scratch.spool());
        let good = |n: usize| {
            json!({"id": Uuid::now_v7(), "source": "Stop", "action": "response_completed", "resource": "session",
                   "resource_id": format!("s{n}"), "created_at": format!("2026-01-01T00:00:0{n}Z")})
        };
        // Too long for VARCHAR(255): the database refuses it.
        let refused_id = Uuid::now_v7();
        let refused = json!({"id": refused_id, "source": "Stop", "action": "response_completed",
                             "resource": "session", "resource_id": "x".repeat(300)});
        let lines = format!("{}\n{refused}\n{{\"id\": \"torn\n{}\n", good(1), good(2));
        std::fs::write(&spool, &lines).unwrap();
        // A generous budget: this test is about poison lines, not speed, and a loaded machine
        // must not turn the flush into a timeout.
        let mut env = vec![
            ("DATABASE_URL", url.as_str()),
            ("HOOK_SPOOL", spool.as_str()),
            ("HOOK_INGEST_TIMEOUT", "10s"),
        ];
        env.extend(synchronous_commit.map(|value| ("HOOK_INGEST_SYNCHRONOUS_COMMIT", value)));
        assert_eq!(ingest(&stop_event(3), &env).check(), None);
        assert!(spool_lines(&spool).is_empty());

        let client = db.client().await;
        let got = routes(&client).await;
        let actions: Vec<&str> = got.iter().map(|[_, action, ..]| action.as_str()).collect();
        assert_eq!(got.len(), 5, "{got:?}");
        assert_eq!(actions.iter().filter(|a| **a == "response_completed").count(), 3, "{got:?}");
        let stand_in: (String, Value) = client
            .query_one("SELECT action, payload FROM hook_events WHERE id = $1", &[&refused_id])
            .await
            .map(|r| (r.get(0), r.get(1)))
            .unwrap();
        assert_eq!(stand_in.0, "rejected_event");
        assert!(stand_in.1["error"].as_str().unwrap().contains("too long"), "{}", stand_in.1);
        let torn = "action = 'malformed_spool_line' AND payload->>'raw' = '{\"id\": \"torn'";
        assert_eq!(count(&client, torn).await, 1);

        // The same lines again: nothing new.
        std::fs::write(&spool, &lines).unwrap();
        assert_eq!(ingest(&stop_event(4), &env).check(), None);
        assert_eq!(count(&client, "true").await, 6);
    }
}

/// The spool's acceptance test with real hooks: 1,000 `hook-ingest` runs, eight at a time, spool
/// their events (the database they are given is down) while this test flushes the same spool
/// into a real database with a flusher paused inside its critical section (100 ms per chunk,
/// its batch claimed), and while the spool's lock is held past the hooks' 2 s patience. Every
/// event arrives once.
#[tokio::test(flavor = "multi_thread")]
async fn a_paused_flusher_loses_none_of_1000_concurrent_hooks() {
    const RUNS: usize = 1_000;
    const PARALLEL: usize = 8;
    let db = TestDb::migrated("ingest_paused_flusher").await;
    let scratch = Scratch::new("paused");
    let spool_path = scratch.spool();
    let spool = hook_ingest::spool::Spool::new(&spool_path);
    let down = "host=/nonexistent-hook-events user=postgres dbname=x";
    let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));

    let hooks: Vec<_> = (0..PARALLEL)
        .map(|t| {
            let spool_path = spool_path.clone();
            std::thread::spawn(move || {
                for n in (t..RUNS).step_by(PARALLEL) {
                    let run = ingest(
                        &stop_event(n),
                        &[("DATABASE_URL", down), ("HOOK_SPOOL", spool_path.as_str())],
                    );
                    let warning = run.check().expect("a warning: the database is down");
                    assert!(warning.contains("event spooled to"), "{warning}");
                }
            })
        })
        .collect();
    let holder = {
        let (spool, running) = (spool.clone(), std::sync::Arc::clone(&running));
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            // A frozen appender: longer than the hooks' patience (2 s).
            let held = spool.lock(Duration::from_secs(10)).unwrap();
            std::thread::sleep(Duration::from_millis(2_500));
            drop(held);
            while running.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let client = db.client().await;
    let mut chunks = 0;
    let mut flushed_meanwhile = 0;
    while hooks.iter().any(|h| !h.is_finished()) {
        let flushed = spool
            .flush(50, usize::MAX, |events| {
                chunks += 1;
                let client = &client;
                async move {
                    // Paused inside the critical section: the batch is claimed, the hooks append.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    hook_store::enqueue_many(client, &events).await.map(|_| ()).map_err(|e| e.to_string())
                }
            })
            .await
            .unwrap();
        assert_eq!(flushed.failure, None);
        flushed_meanwhile += flushed.events;
    }
    running.store(false, std::sync::atomic::Ordering::SeqCst);
    for hook in hooks {
        hook.join().unwrap();
    }
    holder.join().unwrap();
    let left = spool_lines(&spool_path).len();
    let last =
        spool
            .flush(500, usize::MAX, |events| {
                let client = &client;
                async move {
                    hook_store::enqueue_many(client, &events).await.map(|_| ()).map_err(|e| e.to_string())
                }
            })
            .await
            .unwrap();
    assert_eq!(last.failure, None);
    assert!(spool.is_empty());
    let stored = count(&client, "true").await;
    let sessions: i64 =
        client.query_one("SELECT count(DISTINCT resource_id) FROM hook_events", &[]).await.unwrap().get(0);
    eprintln!(
        "{RUNS} hooks: {flushed_meanwhile} flushed while they ran ({chunks} chunks), {left} left for the \
         last flush; {stored} rows, {} lost",
        RUNS as i64 - sessions
    );
    assert_eq!((stored, sessions), (RUNS as i64, RUNS as i64), "every event once");
}

/// Each way libpq users give a password reaches a server that demands one (scram-sha-256); a
/// wrong one is one warning line that says where it came from and does not show it (and the
/// event is spooled).
#[tokio::test]
async fn passwords_are_found_the_way_libpq_finds_them() {
    let cluster = hook_store::testing::PasswordCluster::start("ingest").await;
    let role = cluster.role("ingester").await;
    let mut config = hook_store::tokio_postgres::Config::new();
    config
        .host_path(&cluster.socket_dir)
        .port(cluster.port)
        .user(&role.user)
        .dbname(&role.user)
        .password(role.password.as_str());
    let client = connect(&config).await;
    hook_store::migrate::migrate(&client).await.unwrap();
    let scratch = Scratch::new("passwords");
    let spool = scratch.spool();
    let ways = role.ways();
    for (n, (way, vars)) in ways.iter().enumerate() {
        let mut env: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        env.extend([("HOOK_SPOOL", spool.as_str()), ("HOOK_INGEST_TIMEOUT", "10s")]);
        assert_eq!(ingest(&stop_event(n), &env).check(), None, "{way}");
    }
    assert_eq!(count(&client, "true").await, ways.len() as i64);

    let wrong = role.wrong("not-the-password");
    let mut env: Vec<(&str, &str)> = wrong.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    env.extend([("HOOK_SPOOL", spool.as_str()), ("HOOK_INGEST_TIMEOUT", "10s")]);
    let run = ingest(&stop_event(99), &env);
    let warning = run.check().expect("a warning");
    assert!(warning.contains(r#"password authentication failed for user "ingester""#), "{warning}");
    assert!(
        warning.contains("(password from PGPASSWORD)") && warning.contains("event spooled to"),
        "{warning}"
    );
    assert!(!warning.contains("not-the-password") && !warning.contains(&role.password), "{warning}");
}

/// The common mistakes: the hook still exits 0 and prints one warning line that says what to fix.
#[test]
fn common_mistakes_get_one_warning_that_says_what_to_fix() {
    let scratch = Scratch::new("mistakes");
    let spool = scratch.spool();
    let refused = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let refused_url = format!("postgres://app:zqxv@127.0.0.1:{refused}/events");
    let cases: Vec<(Vec<(&str, &str)>, String)> = vec![
        (vec![("DATABASE_URL", "postgres://app:zq@xv@db/events")], "percent-encode @ in the user name or password as %40".into()),
        (vec![("DATABASE_URL", "mysql://app@db/events")], "must start with postgres:// or postgresql://, not mysql://".into()),
        (vec![("DATABASE_URL", &refused_url)], format!("connecting to postgresql://app@127.0.0.1:{refused}/events (password from DATABASE_URL): Connection refused")),
        (vec![("POSTGRES_PORT", "high")], "POSTGRES_PORT \"high\" is not a port number".into()),
        (vec![("PGHOST", "db"), ("PGPORT", "high")], "PGPORT \"high\" is not a port number".into()),
        (vec![("HOOK_DATA_DIR", "/nonexistent"), ("HOOK_INGEST_TIMEOUT", "soon")], "HOOK_INGEST_TIMEOUT \"soon\" is not a duration".into()),
    ];
    for (mut env, expected) in cases {
        env.push(("HOOK_SPOOL", spool.as_str()));
        let run = ingest(&stop_event(0), &env);
        let warning = run.check().expect("a warning");
        eprintln!("{env:?} -> {warning}");
        assert!(warning.contains(&expected), "{env:?}: {expected:?} missing from: {warning}");
        for repeated in ["error connecting to server", "db error", "zq", "xv"] {
            assert!(!warning.contains(repeated), "{warning}");
        }
    }
}
