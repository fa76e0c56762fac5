//! The command sink with real programs: exit codes, stdin, a clean environment, bounded output,
//! and no process left behind on timeout, on cancellation or after the program exits.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hook_core::HookEvent;
use hook_sinks::{CommandConfig, CommandSink, Delivery, NamedSink, Sink};

fn event() -> Arc<HookEvent> {
    Arc::new(HookEvent {
        id: uuid::Uuid::now_v7(),
        source: "Stop".into(),
        action: "response_completed".into(),
        resource: "session".into(),
        resource_id: "s-1".into(),
        payload: serde_json::json!({"session_id": "s-1"}),
        metadata: serde_json::json!({}),
        processed: false,
        processing_errors: None,
        retry_count: 0,
        created_at: time::OffsetDateTime::now_utc(),
        processed_at: None,
    })
}

fn sh(script: &str) -> CommandConfig {
    CommandConfig {
        timeout: Duration::from_secs(10),
        ..CommandConfig::new(vec!["sh".into(), "-c".into(), script.into()])
    }
}

async fn deliver(config: CommandConfig) -> Delivery {
    CommandSink::new(config).deliver(event()).await
}

/// A scratch directory for pid files.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hook-sinks-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Waits for the pid written into `file` by the script.
async fn read_pid(file: &Path) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(pid) = std::fs::read_to_string(file).ok().and_then(|t| t.trim().parse().ok()) {
            return pid;
        }
        assert!(Instant::now() < deadline, "no pid in {}", file.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether `pid` is still a live (not zombie) process.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next());
            state != Some('Z')
        }
        Err(_) => false,
    }
}

async fn assert_gone(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) {
        assert!(Instant::now() < deadline, "process {pid} outlived the delivery");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn facts(delivery: &Delivery) -> &serde_json::Map<String, serde_json::Value> {
    match delivery {
        Delivery::Delivered { facts }
        | Delivery::Retryable { facts, .. }
        | Delivery::Permanent { facts, .. } => facts,
    }
}

#[tokio::test]
async fn exit_zero_is_delivered_and_the_event_arrives_on_stdin() {
    let delivery = deliver(sh("cat; echo; echo to-stderr >&2")).await;
    let Delivery::Delivered { facts } = &delivery else { panic!("{delivery:?}") };
    let stdout = facts["stdout"].as_str().unwrap();
    let sent: serde_json::Value = serde_json::from_str(stdout.trim()).expect("the event as JSON on stdin");
    assert_eq!(sent["source"], "Stop");
    assert_eq!(sent["payload"]["session_id"], "s-1");
    assert_eq!(facts["stderr"], "to-stderr\n");
    assert_eq!(facts["exit_code"], 0);
}

#[tokio::test]
async fn exit_codes_decide_permanent_or_retryable() {
    let delivery = deliver(sh("echo bad input >&2; exit 65")).await;
    let Delivery::Permanent { error, .. } = &delivery else { panic!("65 is permanent: {delivery:?}") };
    assert!(error.contains("exited with 65 (permanent): bad input"), "{error}");

    let delivery = deliver(sh("echo try later >&2; exit 75")).await;
    let Delivery::Retryable { error, .. } = &delivery else { panic!("75 is retryable: {delivery:?}") };
    assert!(error.contains("exited with 75: try later"), "{error}");

    let delivery = deliver(CommandConfig { permanent_exit_codes: vec![3], ..sh("exit 3") }).await;
    assert!(matches!(delivery, Delivery::Permanent { .. }), "configured code: {delivery:?}");

    let delivery = deliver(sh("kill -TERM $$")).await;
    let Delivery::Retryable { error, .. } = &delivery else { panic!("a signal is retryable: {delivery:?}") };
    assert!(error.contains("killed by signal 15"), "{error}");

    let delivery = deliver(CommandConfig::new(vec!["/nonexistent/program".into()])).await;
    assert!(matches!(delivery, Delivery::Retryable { .. }), "{delivery:?}");
}

#[tokio::test]
async fn the_environment_is_clean_but_for_what_the_route_gives() {
    let config = CommandConfig {
        env: vec![("NOTIFY".into(), "ops".into())],
        pass_env: vec!["CARGO_PKG_NAME".into()],
        ..sh("echo \"[$CARGO_MANIFEST_DIR][$NOTIFY][$CARGO_PKG_NAME][$HOOK_SOURCE][$HOOK_ATTEMPT][${HOOK_EVENT_ID:+id}]\"")
    };
    assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some(), "cargo sets it for tests");
    let delivery = deliver(config).await;
    assert_eq!(facts(&delivery)["stdout"], "[][ops][hook-sinks][Stop][1][id]\n");
}

#[tokio::test]
async fn a_huge_stdout_is_bounded_and_counted() {
    let config =
        CommandConfig { max_output: 1000, ..sh("head -c 20000000 /dev/zero | tr '\\0' x; echo done >&2") };
    let started = Instant::now();
    let delivery = deliver(config).await;
    let Delivery::Delivered { facts } = &delivery else { panic!("{delivery:?}") };
    assert_eq!(facts["stdout"].as_str().unwrap().len(), 1000);
    assert_eq!(facts["stdout_bytes"], 20_000_000);
    assert_eq!(facts["stdout_truncated"], true);
    assert_eq!(facts["stderr"], "done\n");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn at_the_timeout_the_whole_process_group_is_killed() {
    let dir = scratch("timeout");
    let pidfile = dir.join("child.pid");
    let script = format!("sleep 300 & echo $! > {}; sleep 300", pidfile.display());
    let config = CommandConfig { timeout: Duration::from_millis(700), ..sh(&script) };
    let started = Instant::now();
    let delivery = deliver(config).await;
    let Delivery::Retryable { error, .. } = &delivery else { panic!("{delivery:?}") };
    assert!(error.contains("timed out after 0.700s; its process group was killed"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_gone(read_pid(&pidfile).await).await;
}

#[tokio::test]
async fn a_cancelled_delivery_kills_the_group() {
    // The engine drops a handler at its own timeout, and at shutdown after the drain timeout.
    let dir = scratch("cancel");
    let pidfile = dir.join("child.pid");
    let script = format!("sleep 300 & echo $! > {}; sleep 300", pidfile.display());
    let named = NamedSink::new("slow", CommandSink::new(sh(&script)), Duration::from_secs(60));
    let outcome = tokio::time::timeout(Duration::from_millis(700), named.deliver(event())).await;
    assert!(outcome.is_err(), "still running when dropped");
    assert_gone(read_pid(&pidfile).await).await;
}

#[tokio::test]
async fn what_the_program_leaves_behind_is_killed_when_it_exits() {
    let dir = scratch("leftover");
    let pidfile = dir.join("child.pid");
    // The background child keeps stdout open: the delivery must not wait for it.
    let script = format!("sleep 300 & echo $! > {}; echo finished", pidfile.display());
    let started = Instant::now();
    let delivery = deliver(sh(&script)).await;
    assert!(delivery.is_delivered(), "{delivery:?}");
    assert_eq!(facts(&delivery)["stdout"], "finished\n");
    assert!(started.elapsed() < Duration::from_secs(5), "waited for the leftover child");
    assert_gone(read_pid(&pidfile).await).await;
}

#[tokio::test]
async fn the_named_sink_timeout_is_a_retryable_failure() {
    let named = NamedSink::new("slow", CommandSink::new(sh("sleep 5")), Duration::from_millis(200));
    let delivery = named.deliver(event()).await;
    let Delivery::Retryable { error, .. } = &delivery else { panic!("{delivery:?}") };
    assert!(error.contains("timed out after 0.200s"), "{error}");
}
