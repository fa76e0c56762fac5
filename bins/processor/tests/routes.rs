//! `hook-processor --routes FILE` as users run it: a routes file with a mistake stops the start
//! with exit 2 and the line of each mistake, before any database is touched.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A bound against hanging, not a speed test.
const REFUSAL_PATIENCE: Duration = Duration::from_secs(30);

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hook-processor-routes-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

/// The binary with a clean environment and a database that cannot be reached (it must not get
/// that far), run with `--routes FILE`.
fn processor(dir: &std::path::Path) -> Command {
    let mut command = hook_store::testing::binary_command(env!("CARGO_BIN_EXE_hook-processor"));
    command
        .env("DATABASE_URL", "postgres://hook@127.0.0.1:1/nowhere")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

fn refused(tag: &str, routes: &str) -> String {
    let dir = scratch(tag);
    std::fs::write(dir.join("routes.toml"), routes).expect("write the routes file");
    let started = Instant::now();
    let Output { status, stderr, .. } =
        processor(&dir).args(["--routes", "routes.toml"]).output().expect("run hook-processor");
    let stderr = String::from_utf8_lossy(&stderr).into_owned();
    assert!(started.elapsed() < REFUSAL_PATIENCE, "took {:?}", started.elapsed());
    assert_eq!(status.code(), Some(2), "exit status {status}; stderr:\n{stderr}");
    assert!(stderr.starts_with("hook-processor: error: "), "{stderr}");
    assert!(!stderr.contains("nowhere"), "got as far as the database: {stderr}");
    let _ = std::fs::remove_dir_all(&dir);
    stderr
}

#[test]
fn a_typo_exits_2_with_the_line_and_the_reason() {
    let stderr = refused(
        "typo",
        "[sinks.hook]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:9/\"\ntimeuot = \"5s\"\n\n[[routes]]\nsource = \"*\"\naction = \"*\"\nsinks = [\"hook\"]\n",
    );
    assert!(stderr.contains("routes.toml:4: unknown field `timeuot`, expected one of"), "{stderr}");
}

#[test]
fn an_unknown_sink_exits_2_with_the_line_and_the_reason() {
    let stderr = refused(
        "unknown-sink",
        "[sinks.slack]\ntype = \"command\"\nargv = [\"true\"]\n\n[[routes]]\nsource = \"Stop\"\naction = \"*\"\nsinks = [\"slak\"]\n",
    );
    assert!(
        stderr.contains("routes.toml:8: route (\"Stop\", \"*\"): unknown sink \"slak\" (defined: slack)"),
        "{stderr}"
    );
}

#[test]
fn a_missing_secret_exits_2_with_the_line_and_the_reason() {
    let stderr = refused(
        "secret",
        "[sinks.hook]\ntype = \"webhook\"\nurl = \"https://hooks.example.invalid/\"\nsecret_env = \"HOOK_TEST_UNSET_SECRET\"\n\n[[routes]]\nsource = \"*\"\naction = \"*\"\nsinks = [\"hook\"]\n",
    );
    assert!(
        stderr.contains(
            "routes.toml:4: sink \"hook\": the environment variable HOOK_TEST_UNSET_SECRET (secret_env) is not set or empty"
        ),
        "{stderr}"
    );
}

#[test]
fn several_mistakes_are_all_reported_one_line_each() {
    let stderr = refused(
        "several",
        "[sinks.a]\ntype = \"webhok\"\n\n[sinks.b]\ntype = \"command\"\nargv = [\"no-such-program-here\"]\n\n[[routes]]\nsource = \"*\"\naction = \"*\"\nsinks = [\"c\"]\n",
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    assert!(
        lines[0]
            .ends_with("routes.toml:2: sink \"a\": unknown type \"webhok\" (one of webhook, command, nats)"),
        "{stderr}"
    );
    assert!(
        lines[1]
            .contains("routes.toml:6: sink \"b\": the program \"no-such-program-here\" is not found in PATH"),
        "{stderr}"
    );
    assert!(lines[2].contains("routes.toml:11: route (\"*\", \"*\"): unknown sink \"c\""), "{stderr}");
}

#[test]
fn a_missing_routes_file_exits_2() {
    let dir = scratch("missing");
    let output = processor(&dir).args(["--routes", "absent.toml"]).output().expect("run hook-processor");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("reading the routes file absent.toml: No such file or directory"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `GET path` on the processor's HTTP endpoint, the body.
fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to /metrics");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    response
}

#[tokio::test]
async fn a_failing_sink_shows_on_metrics_and_in_stats() {
    let db = hook_store::testing::TestDb::migrated("routes_stats").await;
    let client = db.client().await;
    let dir = scratch("stats");
    let closed = hook_sinks::testing::free_port();
    std::fs::write(
        dir.join("routes.toml"),
        format!(
            "[sinks.refuse]\ntype = \"command\"\nargv = [\"sh\", \"-c\", \"echo 'channel archived' >&2; exit 65\"]\n\n\
             [sinks.hook]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:{closed}/x\"\ntimeout = \"1s\"\n\n\
             [sinks.fine]\ntype = \"command\"\nargv = [\"true\"]\n\n\
             [[routes]]\nsource = \"Stop\"\naction = \"*\"\nsinks = [\"refuse\", \"fine\"]\n\n\
             [[routes]]\nsource = \"Notification\"\naction = \"*\"\nsinks = [\"hook\"]\n"
        ),
    )
    .expect("routes file");
    let stop = hook_core::NewEvent::new("Stop", "response_completed", "session", "s-1");
    let note = hook_core::NewEvent::new("Notification", "notification", "session", "s-1");
    let other = hook_core::NewEvent::new("PreToolUse", "tool_invocation", "tool", "Bash");
    hook_store::enqueue_many(&client, &[stop.clone(), note.clone(), other.clone()]).await.expect("enqueue");
    let http = hook_sinks::testing::free_port();
    let mut child = hook_store::testing::binary_command(env!("CARGO_BIN_EXE_hook-processor"))
        .env("DATABASE_URL", db.url())
        .env("HOOK_HTTP_ADDR", format!("127.0.0.1:{http}"))
        .env("HOOK_RETRY_BASE_DELAY", "30s")
        .args(["--routes", "routes.toml"])
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start hook-processor");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let decided: i64 = client
            .query_one(
                "SELECT count(*) FROM hook_events WHERE processed OR dead_at IS NOT NULL OR retry_count > 0",
                &[],
            )
            .await
            .expect("count")
            .get(0);
        if decided == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "events not attempted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = http_get(http, "/metrics");
    let _ = child.kill();
    let _ = child.wait();
    let line = |prefix: &str| metrics.lines().find(|l| l.starts_with(prefix)).map(str::to_owned);
    let permanent =
        line("hook_events_sink_failures_total{sink=\"refuse\",type=\"command\",kind=\"permanent\"}");
    assert_eq!(permanent.as_deref().and_then(|l| l.rsplit(' ').next()), Some("1"), "{metrics}");
    let retryable =
        line("hook_events_sink_failures_total{sink=\"hook\",type=\"webhook\",kind=\"retryable\"}");
    assert_eq!(retryable.as_deref().and_then(|l| l.rsplit(' ').next()), Some("1"), "{metrics}");
    let delivered = line("hook_events_sink_deliveries_total{sink=\"fine\",type=\"command\"}");
    assert_eq!(delivered.as_deref().and_then(|l| l.rsplit(' ').next()), Some("1"), "{metrics}");
    assert!(
        metrics.contains("hook_events_sink_duration_seconds_bucket{sink=\"refuse\",type=\"command\",le="),
        "{metrics}"
    );

    let stats = hook_store::testing::binary_command(env!("CARGO_BIN_EXE_hook-processor"))
        .env("DATABASE_URL", db.url())
        .args(["stats"])
        .output()
        .expect("hook-processor stats");
    let text = String::from_utf8_lossy(&stats.stdout);
    assert!(stats.status.success(), "{text}");
    let section = text.split("failing sinks").nth(1).expect("a failing sinks section");
    let refuse = section.lines().find(|l| l.trim_start().starts_with("refuse")).expect("the refuse sink");
    assert!(refuse.contains("command") && refuse.contains("channel archived"), "{refuse}");
    let hook = section.lines().find(|l| l.trim_start().starts_with("hook ")).expect("the hook sink");
    assert!(hook.contains("webhook") && hook.contains("retry in"), "{hook}");
    assert!(
        !section.lines().any(|l| l.trim_start().starts_with("fine")),
        "a sink that delivered is not failing: {section}"
    );

    let json = hook_store::testing::binary_command(env!("CARGO_BIN_EXE_hook-processor"))
        .env("DATABASE_URL", db.url())
        .args(["stats", "--json"])
        .output()
        .expect("hook-processor stats --json");
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON report");
    let sinks = report["failing_sinks"].as_array().expect("failing_sinks");
    assert_eq!(sinks.len(), 2, "{sinks:?}");
    let refuse = sinks.iter().find(|s| s["sink"] == "refuse").expect("refuse");
    assert_eq!(
        (refuse["type"].as_str(), refuse["dead"].as_u64(), refuse["retrying"].as_u64()),
        (Some("command"), Some(1), Some(0))
    );
    let hook = sinks.iter().find(|s| s["sink"] == "hook").expect("hook");
    assert_eq!((hook["dead"].as_u64(), hook["retrying"].as_u64()), (Some(0), Some(1)));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_order_exits_2_with_the_line_and_the_reason() {
    let stderr = refused(
        "order",
        "[sinks.fine]\ntype = \"command\"\nargv = [\"true\"]\n\n[[routes]]\nsource = \"*\"\naction = \"*\"\nsinks = [\"fine\"]\norder = \"by-session\"\n",
    );
    assert!(
        stderr.contains(
            "routes.toml:9: route (\"*\", \"*\"): unknown order \"by-session\" (one of \"session\" or \"none\")"
        ),
        "{stderr}"
    );
}
