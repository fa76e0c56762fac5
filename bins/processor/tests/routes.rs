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
