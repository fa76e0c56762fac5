//! Unit tests of the default handlers: routing, the rules behind each fact, and odd input.
//! The per-hook fixtures (Claude Code's inputs and the original producers' rows) are checked
//! against their table in `tests/tests/handlers.rs`.

use super::facts::*;
use super::*;

use futures::executor::block_on;
use serde_json::{json, Value};
use time::OffsetDateTime;
use uuid::Uuid;

fn event(source: &str, action: &str, payload: Value, metadata: Value) -> HookEvent {
    row(source, action, ("tool", ""), payload, metadata)
}

fn row(source: &str, action: &str, resource: (&str, &str), payload: Value, metadata: Value) -> HookEvent {
    HookEvent {
        id: Uuid::nil(),
        source: source.to_owned(),
        action: action.to_owned(),
        resource: resource.0.to_owned(),
        resource_id: resource.1.to_owned(),
        payload,
        metadata,
        processed: false,
        processing_errors: None,
        retry_count: 0,
        created_at: OffsetDateTime::UNIX_EPOCH,
        processed_at: None,
    }
}

/// Routes the event through the default registry, as the engine would.
fn handle(event: HookEvent) -> HandlerResult {
    let mut registry = HandlerRegistry::new();
    register_defaults(&mut registry);
    let Some(handler) = registry.resolve(&event.source, &event.action) else {
        panic!("no handler for {}/{}", event.source, event.action);
    };
    block_on(handler.handle(Arc::new(event)))
}

fn run(source: &str, action: &str, payload: Value, metadata: Value) -> HandlerResult {
    handle(event(source, action, payload, metadata))
}

/// The result metadata of a successful run.
fn facts(source: &str, action: &str, payload: Value, metadata: Value) -> Value {
    let result = run(source, action, payload.clone(), metadata);
    assert!(result.success, "{source}/{action} failed on {payload}: {result:?}");
    Value::Object(result.metadata)
}

/// Asserts the facts named in `expected` (a subset of the result's keys).
fn check(source: &str, action: &str, payload: Value, metadata: Value, expected: Value) {
    let facts = facts(source, action, payload.clone(), metadata);
    let Value::Object(expected) = expected else { panic!("expected facts are an object") };
    for (key, value) in expected {
        assert_eq!(facts.get(&key), Some(&value), "{source}/{action} `{key}` on {payload}: {facts}");
    }
}

const KNOWN_ROUTES: &[(&str, &str)] = &[
    ("PreToolUse", "tool_invocation"),
    ("PostToolUse", "tool_completion"),
    ("PostToolUseFailure", "post_tool_use_failure"),
    ("PermissionRequest", "permission_request"),
    ("UserPromptSubmit", "prompt_submitted"),
    ("Notification", "notification"),
    ("Stop", "session_stopped"),
    ("Stop", "response_completed"),
    ("SubagentStart", "subagent_start"),
    ("SubagentStop", "subagent_stop"),
    ("PreCompact", "pre_compact"),
    ("PostCompact", "post_compact"),
    ("SessionStart", "session_initialized"),
    ("SessionEnd", "session_ended"),
    ("SessionEnd", "session_completed"),
];

#[test]
fn registers_every_default_route() {
    let mut registry = HandlerRegistry::new();
    register_defaults(&mut registry);
    let mut routes = registry.routes();
    routes.sort();
    let mut expected: Vec<(String, String)> = KNOWN_ROUTES
        .iter()
        .chain([&(WILDCARD, WILDCARD)])
        .map(|&(s, a)| (s.to_owned(), a.to_owned()))
        .collect();
    expected.sort();
    assert_eq!(routes, expected);
}

#[test]
fn known_routes_resolve_to_their_own_handler_with_a_fixed_key_set() {
    for &(source, action) in KNOWN_ROUTES {
        let empty = facts(source, action, json!({}), json!({}));
        assert_eq!(empty.get("unknown"), None, "{source}/{action} fell through");
        assert!(empty.get("session_id").is_some(), "{source}/{action} has no session_id key");
        // The same keys whatever the input: a console can rely on them.
        let full = facts(
            source,
            action,
            json!({
                "session_id": "s", "tool_name": "Bash", "tool_input": {"command": "ls"},
                "tool_response": {"stdout": ""}, "prompt": "hi", "message": "m", "trigger": "auto",
            }),
            json!({"session_id": "s"}),
        );
        let keys = |v: &Value| v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>());
        assert_eq!(keys(&empty), keys(&full), "{source}/{action}");
    }
}

#[test]
fn unknown_routes_succeed_as_unknown() {
    for (source, action) in
        [("TeammateIdle", "teammate_idle"), ("PreToolUse", "quality_check"), ("Notification", "*"), ("", "")]
    {
        assert_eq!(
            facts(source, action, json!({"anything": 1, "session_id": "s9"}), json!({})),
            json!({"unknown": true, "source": source, "action": action, "session_id": "s9"}),
        );
    }
}

#[test]
fn session_id_comes_from_the_payload_then_a_session_resource_then_the_metadata() {
    let cases = [
        // payload, resource, metadata, expected
        (json!({"session_id": "p"}), ("session", "r"), json!({"session_id": "m"}), json!("p")),
        // A Stop of the original producer without session_id in its payload.
        (json!({}), ("session", "r"), json!({"session_id": "m"}), json!("r")),
        (json!({"session_id": ""}), ("session", "r"), json!({}), json!("r")),
        (json!({"session_id": 7}), ("session", "r"), json!({}), json!("r")),
        // hook-ingest's placeholder is not an id; a tool's name neither.
        (json!({}), ("session", "unknown"), json!({"session_id": "m"}), json!("m")),
        (json!({}), ("tool", "Bash"), json!({"session_id": "m"}), json!("m")),
        (json!({}), ("tool", "Bash"), json!({"session_id": " "}), Value::Null),
        (json!([]), ("session", ""), json!(null), Value::Null),
    ];
    for (payload, resource, metadata, expected) in cases {
        for &(source, action) in KNOWN_ROUTES.iter().chain([&("Other", "thing")]) {
            let result = handle(row(source, action, resource, payload.clone(), metadata.clone()));
            assert_eq!(
                result.metadata["session_id"], expected,
                "{source}/{action}: {payload} {resource:?} {metadata}"
            );
        }
    }
}

#[test]
fn target_is_what_the_tool_call_acts_on() {
    let cases = [
        (json!({"tool_input": {"file_path": "/a.rs", "content": "x"}}), json!("/a.rs")),
        (json!({"tool_input": {"notebook_path": "/n.ipynb", "new_source": "x"}}), json!("/n.ipynb")),
        (json!({"tool_input": {"command": "cargo test", "description": "Run tests"}}), json!("cargo test")),
        (
            json!({"tool_input": {"url": "https://x.invalid/", "prompt": "summarise"}}),
            json!("https://x.invalid/"),
        ),
        (json!({"tool_input": {"query": "rust jsonb", "allowed_domains": []}}), json!("rust jsonb")),
        (json!({"tool_input": {"pattern": "fn main", "path": "/src"}}), json!("fn main")),
        (json!({"tool_input": {"path": "/src"}}), json!("/src")),
        (
            json!({"tool_input": {"description": "Review cart", "prompt": "long text", "subagent_type": "x"}}),
            json!("Review cart"),
        ),
        // Blank values are skipped; the producer's top-level path is the fallback.
        (json!({"tool_input": {"command": "  ", "path": "/d"}}), json!("/d")),
        (json!({"file_path": "/top.py", "tool_output": null}), json!("/top.py")),
        (json!({"tool_input": {"todos": []}}), Value::Null),
        (json!({"tool_input": "ls"}), Value::Null),
    ];
    for (payload, expected) in cases {
        check("PreToolUse", "tool_invocation", payload, json!({}), json!({"target": expected}));
    }
    let long = "x".repeat(MAX_TARGET_CHARS + 50);
    let facts = facts("PreToolUse", "tool_invocation", json!({"tool_input": {"command": long}}), json!({}));
    let target = facts["target"].as_str().unwrap_or_default();
    assert_eq!(target.chars().count(), MAX_TARGET_CHARS + 1);
    assert!(target.ends_with('…'));
}

#[test]
fn tool_outcome_reads_the_response() {
    let outcome = |payload: Value| tool_outcome(&event("PostToolUse", "tool_completion", payload, json!({})));
    let cases = [
        // No response: nothing to judge by.
        (json!({"tool_name": "Edit"}), None, None, None),
        (json!({"tool_output": null}), None, None, None),
        // A response is a success unless it says otherwise.
        (json!({"tool_response": {"filePath": "/a"}}), Some(true), None, None),
        (json!({"tool_response": "done"}), Some(true), None, None),
        (json!({"tool_response": [{"type": "text", "text": "ok"}]}), Some(true), None, None),
        (json!({"tool_output": {"stdout": ""}}), Some(true), None, None),
        (
            json!({"tool_response": {"stdout": "", "stderr": "warn", "interrupted": false}}),
            Some(true),
            None,
            Some(false),
        ),
        (json!({"tool_response": {"success": true, "error": "ignored"}}), Some(true), None, None),
        (json!({"tool_response": {"success": false}}), Some(false), None, None),
        (
            json!({"tool_response": {"success": false, "error": "disk full"}}),
            Some(false),
            Some("disk full"),
            None,
        ),
        (
            json!({"tool_response": {"stdout": "", "stderr": "killed", "interrupted": true}}),
            Some(false),
            Some("killed"),
            Some(true),
        ),
        (
            json!({"tool_response": {"stdout": "", "stderr": "", "interrupted": true}}),
            Some(false),
            Some("interrupted"),
            Some(true),
        ),
        (
            json!({"tool_response": {"isError": true, "content": [{"type": "text", "text": "no such issue"}]}}),
            Some(false),
            Some("no such issue"),
            None,
        ),
        (json!({"tool_response": {"is_error": true}}), Some(false), None, None),
        (json!({"tool_response": {"error": "timeout"}}), Some(false), Some("timeout"), None),
        (json!({"tool_response": {"error": ""}}), Some(true), None, None),
    ];
    for (payload, success, error, interrupted) in cases {
        assert_eq!(
            outcome(payload.clone()),
            Outcome { success, error: error.map(str::to_owned), interrupted },
            "{payload}"
        );
    }
    let long = "e".repeat(MAX_TEXT_CHARS * 2);
    let error = outcome(json!({"tool_response": {"error": long}})).error.unwrap_or_default();
    assert_eq!(error.chars().count(), MAX_TEXT_CHARS + 1);
}

#[test]
fn tool_failure_reads_every_spelling_of_the_error() {
    for key in ["error", "tool_error", "error_message"] {
        check(
            "PostToolUseFailure",
            "post_tool_use_failure",
            json!({"tool_name": "Bash", key: "exit 1", "is_interrupt": false}),
            json!({}),
            json!({"success": false, "error": "exit 1", "interrupted": false, "tool_name": "Bash"}),
        );
    }
    check(
        "PostToolUseFailure",
        "post_tool_use_failure",
        json!({}),
        json!({}),
        json!({"success": false, "error": null, "interrupted": null, "tool_name": "unknown"}),
    );
}

#[test]
fn agent_mentions() {
    let cases = [
        ("@agent-code-reviewer look at cart.py", Some("agent-code-reviewer")),
        ("Ask @agent-test-runner, then stop.", Some("agent-test-runner")),
        ("use @agent-db_expert.", Some("agent-db_expert")),
        ("plugin: (@agent-my-plugin:reviewer)", Some("agent-my-plugin:reviewer")),
        ("mail me@agent-x.com, or @agent-real", Some("agent-real")),
        ("@agent- nothing", None),
        ("no mention", None),
        ("@agent", None),
        ("", None),
        ("é@agent-x", None),
        ("👋@agent-wave", Some("agent-wave")),
    ];
    for (prompt, expected) in cases {
        assert_eq!(agent_mention(prompt).as_deref(), expected, "{prompt}");
    }
    let long = format!("@agent-{}", "a".repeat(500));
    assert_eq!(agent_mention(&long).map(|a| a.len()), Some("agent-".len() + 100));
}

#[test]
fn slash_commands() {
    let cases = [
        ("/review the cart", Some("/review")),
        ("  /compact", Some("/compact")),
        ("/my-plugin:deploy prod", Some("/my-plugin:deploy")),
        ("/home/dev/shop/cart.py is broken", None),
        ("/", None),
        ("/ review", None),
        ("please /review", None),
        ("", None),
    ];
    for (prompt, expected) in cases {
        assert_eq!(slash_command(prompt), expected, "{prompt}");
    }
}

#[test]
fn prompt_facts_never_hold_the_prompt() {
    let prompt = "my secret plan is SECRET-1234, @agent-planner please help";
    let facts = facts("UserPromptSubmit", "prompt_submitted", json!({"prompt": prompt}), json!({}));
    assert!(!facts.to_string().contains("SECRET"), "{facts}");
    assert_eq!(facts["prompt_length"], prompt.chars().count());
    assert_eq!(facts["agent_detected"], "agent-planner");
}

#[test]
fn prompt_agent_precedence() {
    let cases = [
        // The producer's detection wins over a mention.
        (
            json!({"prompt": "@agent-a", "agent_detected": "agent-b", "detection_method": "ai", "confidence": 0.4}),
            json!({"agent_detected": "agent-b", "detection_method": "ai", "confidence": 0.4}),
        ),
        // A mention wins over the session's agent.
        (
            json!({"prompt": "@agent-a", "agent_type": "reviewer"}),
            json!({"agent_detected": "agent-a", "detection_method": "mention", "confidence": 1.0}),
        ),
        (
            json!({"prompt": "hello", "agent_type": "reviewer"}),
            json!({"agent_detected": "reviewer", "detection_method": "agent_type", "confidence": 1.0}),
        ),
        (
            json!({"prompt": "hello", "agent_type": ""}),
            json!({"agent_detected": null, "detection_method": null, "confidence": null}),
        ),
    ];
    for (payload, expected) in cases {
        check("UserPromptSubmit", "prompt_submitted", payload, json!({"agent_detected": true}), expected);
    }
}

#[test]
fn a_claude_code_stop_is_a_complete_response() {
    check(
        "Stop",
        "response_completed",
        json!({"hook_event_name": "Stop", "stop_hook_active": true}),
        json!({}),
        json!({"completion_status": "complete", "interrupted": false, "stop_hook_active": true, "tool_count": null}),
    );
    // Without Claude Code's marker, nothing is assumed.
    check(
        "Stop",
        "session_stopped",
        json!({"stop_hook_active": false}),
        json!({"hook_type": "Stop"}),
        json!({"completion_status": null, "interrupted": null, "stop_hook_active": false}),
    );
    // The producer's own status wins.
    check(
        "Stop",
        "response_completed",
        json!({"hook_event_name": "Stop", "completion_status": "interrupted"}),
        json!({}),
        json!({"completion_status": "interrupted", "interrupted": true}),
    );
}

#[test]
fn project_path_of_a_claude_code_session_is_its_startup_directory() {
    let start = |source: &str| json!({"hook_event_name": "SessionStart", "cwd": "/w", "source": source});
    check("SessionStart", "session_initialized", start("startup"), json!({}), json!({"project_path": "/w"}));
    for source in ["resume", "clear", "compact"] {
        check("SessionStart", "session_initialized", start(source), json!({}), json!({"project_path": null}));
    }
    // The producer's own path wins; a producer row is not Claude Code's input.
    check(
        "SessionStart",
        "session_initialized",
        json!({"hook_event_name": "SessionStart", "cwd": "/w", "source": "startup", "project_path": "/p"}),
        json!({}),
        json!({"project_path": "/p"}),
    );
    check(
        "SessionStart",
        "session_initialized",
        json!({"cwd": "/w", "source": "startup"}),
        json!({}),
        json!({"project_path": null}),
    );
}

#[test]
fn odd_payloads_never_fail() {
    let odd = [
        Value::Null,
        json!(42),
        json!(-1.5),
        json!(true),
        json!("str"),
        json!([]),
        json!([{"tool_name": "Write"}]),
        json!({}),
        json!({"tool_input": "x"}),
        json!({"tool_input": null, "tool_response": [1]}),
        json!({"tool_input": {"command": 5, "file_path": []}, "tool_response": {"success": "yes", "content": 3}}),
        json!({"tool_response": {"isError": true, "content": [7, {"text": null}]}}),
        json!({"prompt": 7}),
        json!({"prompt": null, "prompt_preview": ["a"]}),
        json!({"prompt": "@agent-@agent-/x /"}),
        json!({"confidence": "high"}),
        json!({"confidence": {"value": 0.9}}),
        json!({"confidence": 1e308, "tool_count": -3, "total_tools": "2"}),
        json!({"tool_name": 5, "file_path": false, "session_id": 9, "agent_detected": true}),
        json!({"tools_executed": "Read", "interrupted": "yes", "quality_check": false}),
        json!({"git_metadata": "main", "auto_fix_details": 0, "auto_fix_applied": "true"}),
        json!({"hook_event_name": 3, "message": {"text": "m"}, "trigger": [], "custom_instructions": 1}),
        json!({"hook_event_name": "Stop", "source": 1, "agent_id": false, "is_interrupt": "no"}),
    ];
    let routes = KNOWN_ROUTES.iter().chain([&("Notification", "notified")]);
    for &(source, action) in routes {
        for value in &odd {
            for (payload, metadata) in
                [(value.clone(), json!({})), (json!({}), value.clone()), (value.clone(), value.clone())]
            {
                let result = run(source, action, payload.clone(), metadata.clone());
                assert!(result.success, "{source}/{action} failed on {payload} / {metadata}: {result:?}");
                let serialized = serde_json::to_string(&result.metadata);
                assert!(serialized.is_ok(), "{source}/{action}: metadata does not serialize");
            }
        }
    }
}

#[test]
fn odd_values_are_missing_facts() {
    check(
        "PreToolUse",
        "tool_invocation",
        json!({"tool_input": "x"}),
        Value::Null,
        json!({
            "tool_name": "unknown", "quality_check_performed": false, "file_path": null,
            "session_id": null, "tool_use_id": null, "target": null,
        }),
    );
    check(
        "PostToolUse",
        "tool_completion",
        json!(42),
        json!("str"),
        json!({
            "tool_name": "unknown", "file_path": null, "auto_fix_applied": false,
            "success": null, "error": null, "interrupted": null,
        }),
    );
    check(
        "UserPromptSubmit",
        "prompt_submitted",
        json!({"prompt": 7}),
        json!([]),
        json!({
            "agent_detected": null, "detection_method": null, "confidence": null,
            "prompt_length": null, "slash_command": null,
        }),
    );
    check(
        "Stop",
        "response_completed",
        json!({"tools_executed": "Read", "tool_count": -3}),
        json!(null),
        json!({
            "event": "stop", "session_id": null, "completion_status": null,
            "tool_count": null, "interrupted": null, "stop_hook_active": null,
        }),
    );
    check(
        "Notification",
        "notification",
        json!({"message": 5, "notification_type": ["x"], "title": {}}),
        json!({}),
        json!({"message": null, "notification_type": null, "title": null}),
    );
    check(
        "PreCompact",
        "pre_compact",
        json!({"trigger": 1, "custom_instructions": "   "}),
        json!({}),
        json!({"trigger": null, "has_custom_instructions": false}),
    );
}

#[test]
fn cut_counts_characters() {
    assert_eq!(cut("héllo", 10), "héllo");
    assert_eq!(cut("héllo", 5), "héllo");
    assert_eq!(cut("héllo", 2), "hé…");
    assert_eq!(cut("👋👋👋", 1), "👋…");
    assert_eq!(cut("", 0), "");
    assert_eq!(cut("a", 0), "…");
}

/// Asserts what each typed lookup reads at `path` in `doc`.
fn check_lookup(doc: &Value, path: &[&str], expected: Value) {
    let actual = json!({
        "str": str_at(doc, path),
        "number": number_at(doc, path),
        "bool": bool_at(doc, path),
        "len": len_at(doc, path),
    });
    assert_eq!(actual, expected, "{path:?}");
}

#[test]
fn lookups() {
    let doc = json!({"a": {"b": "text", "n": 0.5, "s": "2.5", "t": true, "l": [1, 2], "z": null}, "x": "y"});
    let none = json!({"str": null, "number": null, "bool": null, "len": null});
    let cases: [(&[&str], Value); 10] = [
        (&["a", "b"], json!({"str": "text", "number": null, "bool": null, "len": null})),
        (&["a", "n"], json!({"str": null, "number": 0.5, "bool": null, "len": null})),
        (&["a", "s"], json!({"str": "2.5", "number": 2.5, "bool": null, "len": null})),
        (&["a", "t"], json!({"str": null, "number": null, "bool": true, "len": null})),
        (&["a", "l"], json!({"str": null, "number": null, "bool": null, "len": 2})),
        (&["a", "z"], none.clone()),
        (&["a", "missing"], none.clone()),
        (&["x", "deeper"], none.clone()),
        (&["a"], none.clone()),
        (&[], none),
    ];
    for (path, expected) in cases {
        check_lookup(&doc, path, expected);
    }
    for odd in [Value::Null, json!(1), json!("a"), json!(["a"])] {
        assert_eq!(value_at(&odd, &["a"]), None, "{odd}");
    }
    assert_eq!(value_at(&Value::Null, &[]), None);
    assert_eq!(value_at(&json!(1), &[]), Some(&json!(1)));
}
