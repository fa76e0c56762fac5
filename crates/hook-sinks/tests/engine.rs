//! Routes through the engine on a real PostgreSQL: how they compose with the built-in handlers,
//! a permanent failure making the event dead at once (logged with its reason, not as a retry
//! limit), and a retryable one burning its retries.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{insert, registry, row, test_config, wait_for_count, Running, UNDECIDED};
use hook_core::NewEvent;
use hook_store::testing::TestDb;
use serde_json::json;

const ROUTES: &str = r#"
[sinks.ok]
type = "command"
argv = ["sh", "-c", "cat >/dev/null; echo delivered"]
timeout = "3s"

[sinks.refuse]
type = "command"
argv = ["sh", "-c", "echo 'no such channel' >&2; exit 65"]
timeout = "3s"

[sinks.later]
type = "command"
argv = ["sh", "-c", "echo 'busy' >&2; exit 75"]
timeout = "3s"

[[routes]]
source = "PreToolUse"
action = "*"
sinks = ["ok"]

[[routes]]
source = "Stop"
action = "*"
sinks = ["refuse"]

[[routes]]
source = "SessionEnd"
action = "session_ended"
sinks = ["ok", "later"]
"#;

/// A `tracing` writer into a shared buffer: what the engine logs.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// The captured lines that mention `id`.
    fn lines_of(&self, id: uuid::Uuid) -> Vec<String> {
        let bytes = self.0.lock().expect("log buffer").clone();
        let id = id.to_string();
        String::from_utf8_lossy(&bytes).lines().filter(|l| l.contains(&id)).map(str::to_owned).collect()
    }
}

// A current-thread runtime: the engine's tasks run on this thread, under its log subscriber.
#[tokio::test]
async fn routes_compose_with_the_builtin_handlers_and_permanent_failures_die_at_once() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _logs = tracing::subscriber::set_default(subscriber);
    let db = TestDb::migrated("sinks_compose").await;
    let client = db.client().await;
    let config = test_config();
    let registry = registry(ROUTES, &config).await;
    let [routed, permanent, unrouted, retried]: [uuid::Uuid; 4] = insert(
        &client,
        vec![
            NewEvent::new("PreToolUse", "tool_invocation", "tool", "Bash")
                .with_payload(json!({"tool_name": "Bash", "tool_input": {"command": "ls"}})),
            NewEvent::new("Stop", "response_completed", "session", "s-1")
                .with_payload(json!({"session_id": "s-1"})),
            NewEvent::new("UserPromptSubmit", "prompt_submitted", "session", "s-1")
                .with_payload(json!({"prompt": "hello"})),
            NewEvent::new("SessionEnd", "session_ended", "session", "s-1")
                .with_payload(json!({"reason": "exit"})),
        ],
    )
    .await
    .try_into()
    .expect("four ids");
    let running = Running::start(&db, registry, config).await;
    wait_for_count(&client, UNDECIDED, 0, Duration::from_secs(60)).await;
    let totals = running.stop().await;

    // A routed event: the built-in facts, then the sink's.
    let r = row(&client, routed).await;
    assert!(r.processed && r.retry_count == 0, "{r:?}");
    assert_eq!(r.metadata["tool_name"], "Bash", "built-in facts kept: {}", r.metadata);
    assert_eq!(r.metadata["sinks"]["ok"]["ok"], true);
    assert_eq!(r.metadata["sinks"]["ok"]["type"], "command");
    assert_eq!(r.metadata["sinks"]["ok"]["stdout"], "delivered\n");

    // Exit 65: dead after its first attempt, with the reason.
    let r = row(&client, permanent).await;
    assert!(!r.processed && r.dead && r.retry_count == 1, "{r:?}");
    assert_eq!(r.errors.len(), 1);
    assert!(
        r.errors[0]
            .contains("permanent failure: sink refuse: sh exited with 65 (permanent): no such channel"),
        "{:?}",
        r.errors
    );
    assert_eq!(r.metadata["sinks"]["refuse"]["ok"], false);
    assert_eq!(r.metadata["sinks"]["refuse"]["exit_code"], 65);
    assert_eq!(r.metadata["event"], "stop", "built-in facts kept on failure too");
    // Its log line says why it is dead: the permanent reason, not a retry limit.
    let lines = captured.lines_of(permanent);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("attempt failed permanently"), "{lines:?}");
    assert!(lines[0].contains("exited with 65 (permanent): no such channel"), "{lines:?}");
    assert!(!lines[0].contains("retry limit"), "{lines:?}");

    // No route: the built-in handler alone, as without a routes file.
    let r = row(&client, unrouted).await;
    assert!(r.processed, "{r:?}");
    assert_eq!(r.metadata["prompt_length"], 5);
    assert!(r.metadata.get("sinks").is_none(), "{}", r.metadata);

    // A retryable sink next to one that delivers: retried to the limit, each attempt redelivered.
    let r = row(&client, retried).await;
    assert!(!r.processed && r.dead && r.retry_count == 3, "{r:?}");
    assert!(r.errors.iter().all(|e| e.contains("sink later: sh exited with 75: busy")), "{:?}", r.errors);
    assert_eq!(r.metadata["sinks"]["ok"]["ok"], true);
    assert_eq!(r.metadata["sinks"]["later"]["ok"], false);
    let lines = captured.lines_of(retried);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines[..2].iter().all(|l| l.contains("will retry")), "{lines:?}");
    assert!(lines[2].contains("retry limit reached"), "{lines:?}");

    assert_eq!((totals.succeeded, totals.dead), (2, 2), "{totals:?}");
    assert_eq!(totals.retried, 2, "only the retryable event was retried: {totals:?}");
}
