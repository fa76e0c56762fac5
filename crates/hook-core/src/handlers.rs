//! The default handlers: what the processor does with the events the hooks write.
//!
//! They are the counterpart of the seed's `event_handlers.py`. Each one reads a few facts out of
//! the event's `payload` and `metadata`, where the original producers (`hook_event_logger.py`,
//! `session_intelligence.py`, `response_intelligence.py`) put them, and reports them as result
//! metadata. The handlers have no side effects, so they have no reason to fail: a missing, null or
//! oddly typed field is a missing fact (`null` in the result), never a failed attempt, because a
//! retry would not make the field appear.
//!
//! | route                              | result metadata                                              |
//! |------------------------------------|--------------------------------------------------------------|
//! | `PreToolUse/tool_invocation`       | `tool_name`, `quality_check_performed`, `file_path`          |
//! | `PostToolUse/tool_completion`      | `tool_name`, `file_path`, `auto_fix_applied`                 |
//! | `UserPromptSubmit/prompt_submitted`| `agent_detected`, `detection_method`, `confidence`, `prompt_length` |
//! | `Stop/session_stopped`, `Stop/response_completed` | `event: "stop"`, `session_id`, `completion_status`, `tool_count`, `interrupted` |
//! | `SessionStart/session_initialized` | `event: "session_start"`, `session_id`, `cwd`, `project_path`, `git_branch` |
//! | `SessionEnd/session_ended`, `SessionEnd/session_completed` | `event: "session_end"`, `session_id`, `reason` |
//! | `*/*`                              | `unknown: true`, `source`, `action`                          |
//!
//! Every key is always present (`null` when the fact is missing), except `prompt_length`, which is
//! left out when there is no prompt text to count.
//!
//! The seed registered only the first five routes, but the producers wrote `Stop/response_completed`,
//! `SessionStart/session_initialized` and `SessionEnd/session_completed`, which the seed then
//! handled with its "unknown event" fallback; here they get real handlers.

use std::sync::Arc;

use serde_json::Value;

use crate::event::{HandlerResult, HookEvent};
use crate::handler::{Handler, HandlerRegistry, WILDCARD};

/// Registers the default handlers for the seed's routes and for the routes the original producers wrote.
///
/// Also registers the global wildcard `(*, *)`, which marks any other event successful with
/// `{"unknown": true, "source": ..., "action": ...}` so that unknown events are not retried. Routes
/// registered earlier are replaced; register custom handlers afterwards to override a default.
pub fn register_defaults(registry: &mut HandlerRegistry) {
    for &(source, action, extract) in ROUTES {
        registry.register(source, action, handler(extract));
    }
}

/// A handler body: a pure function of the event.
type Extract = fn(&HookEvent) -> HandlerResult;

/// The default routes, in the order of the module's table.
const ROUTES: &[(&str, &str, Extract)] = &[
    ("PreToolUse", "tool_invocation", tool_invocation),
    ("PostToolUse", "tool_completion", tool_completion),
    ("UserPromptSubmit", "prompt_submitted", prompt_submitted),
    ("Stop", "session_stopped", stop),
    ("Stop", "response_completed", stop),
    ("SessionStart", "session_initialized", session_start),
    ("SessionEnd", "session_ended", session_end),
    ("SessionEnd", "session_completed", session_end),
    (WILDCARD, WILDCARD, unknown_event),
];

/// Wraps a pure function as an async [`Handler`].
fn handler(extract: Extract) -> impl Handler {
    move |event: Arc<HookEvent>| async move { extract(&event) }
}

// ---------------------------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------------------------

/// `PreToolUse/tool_invocation`: the producer wrote `payload = {tool_name, tool_input,
/// quality_check}`; the seed reported the tool name and whether a quality check ran.
fn tool_invocation(event: &HookEvent) -> HandlerResult {
    let tool_name = tool_name(event);
    let quality_check_performed = value_at(&event.payload, &["quality_check"]).is_some();
    let file_path = file_path(event);
    tracing::debug!(
        event_id = %event.id,
        source = %event.source,
        action = %event.action,
        tool_name,
        quality_check_performed,
        "handled tool invocation"
    );
    HandlerResult::ok(format!("processed PreToolUse for {tool_name}"))
        .with("tool_name", tool_name)
        .with("quality_check_performed", quality_check_performed)
        .with("file_path", file_path)
}

/// `PostToolUse/tool_completion`: the producer wrote `payload = {tool_name, tool_output,
/// file_path, auto_fix_details}` and `metadata = {auto_fix_applied}`.
fn tool_completion(event: &HookEvent) -> HandlerResult {
    let tool_name = tool_name(event);
    let file_path = file_path(event);
    // The seed looked only at the details; the producer's own flag counts too, since it may
    // report a fix without details.
    let auto_fix_applied = value_at(&event.payload, &["auto_fix_details"]).is_some()
        || either(event, &["auto_fix_applied"], bool_at) == Some(true);
    tracing::debug!(
        event_id = %event.id,
        source = %event.source,
        action = %event.action,
        tool_name,
        auto_fix_applied,
        "handled tool completion"
    );
    HandlerResult::ok(format!("processed PostToolUse for {tool_name}"))
        .with("tool_name", tool_name)
        .with("file_path", file_path)
        .with("auto_fix_applied", auto_fix_applied)
}

/// `UserPromptSubmit/prompt_submitted`: the producer wrote `payload = {prompt_preview,
/// agent_detected, detection_method, confidence, ...}`; Claude Code's own hook input has `prompt`.
///
/// The metadata's `agent_detected` is a boolean, so only a string counts as the agent's name.
fn prompt_submitted(event: &HookEvent) -> HandlerResult {
    let agent_detected = either(event, &["agent_detected"], str_at);
    let detection_method = either(event, &["detection_method"], str_at);
    let confidence = either(event, &["confidence"], number_at);
    let prompt_length = str_at(&event.payload, &["prompt"])
        .or_else(|| str_at(&event.payload, &["prompt_preview"]))
        .map(|prompt| prompt.chars().count());
    // Never the prompt itself: it is the user's text.
    tracing::debug!(
        event_id = %event.id,
        source = %event.source,
        action = %event.action,
        agent_detected,
        detection_method,
        confidence,
        prompt_length,
        "handled prompt submission"
    );
    let mut result = HandlerResult::ok("processed UserPromptSubmit event")
        .with("agent_detected", agent_detected)
        .with("detection_method", detection_method)
        .with("confidence", confidence);
    if let Some(length) = prompt_length {
        result = result.with("prompt_length", length);
    }
    result
}

/// `Stop/session_stopped` (the seed's route) and `Stop/response_completed` (what the producer
/// wrote, with `payload = {session_id, completion_status, tools_executed, tool_count | total_tools,
/// interrupted, ...}`).
fn stop(event: &HookEvent) -> HandlerResult {
    let session_id = session_id(event);
    let completion_status = either(event, &["completion_status"], str_at);
    let tool_count = u64_at(&event.payload, &["tool_count"])
        .or_else(|| u64_at(&event.payload, &["total_tools"]))
        .or_else(|| len_at(&event.payload, &["tools_executed"]));
    let interrupted = bool_at(&event.payload, &["interrupted"])
        .or_else(|| completion_status.map(|status| status == "interrupted"));
    tracing::debug!(
        event_id = %event.id,
        source = %event.source,
        action = %event.action,
        session_id,
        completion_status,
        tool_count,
        "handled stop"
    );
    let session = session_id.unwrap_or("unknown");
    HandlerResult::ok(format!("processed Stop event for session {session}"))
        .with("event", "stop")
        .with("session_id", session_id)
        .with("completion_status", completion_status)
        .with("tool_count", tool_count)
        .with("interrupted", interrupted)
}

/// `SessionStart/session_initialized`: the producer wrote `payload = {session_id, project_path,
/// cwd, git_branch, ...}` and, in one version, `metadata = {git_metadata: {git_branch, ...}}`.
fn session_start(event: &HookEvent) -> HandlerResult {
    let session_id = session_id(event);
    let cwd = either(event, &["cwd"], str_at);
    let project_path = either(event, &["project_path"], str_at);
    let git_branch = str_at(&event.payload, &["git_branch"])
        .or_else(|| str_at(&event.metadata, &["git_metadata", "git_branch"]));
    tracing::debug!(
        event_id = %event.id,
        source = %event.source,
        action = %event.action,
        session_id,
        "handled session start"
    );
    let session = session_id.unwrap_or("unknown");
    HandlerResult::ok(format!("processed SessionStart event for session {session}"))
        .with("event", "session_start")
        .with("session_id", session_id)
        .with("cwd", cwd)
        .with("project_path", project_path)
        .with("git_branch", git_branch)
}

/// `SessionEnd/session_ended` (the seed's route) and `SessionEnd/session_completed` (what the
/// producer wrote, `payload = {session_id, timestamp, ...}`); Claude Code's hook input adds `reason`.
fn session_end(event: &HookEvent) -> HandlerResult {
    let session_id = session_id(event);
    let reason = either(event, &["reason"], str_at);
    tracing::debug!(
        event_id = %event.id,
        source = %event.source,
        action = %event.action,
        session_id,
        reason,
        "handled session end"
    );
    let session = session_id.unwrap_or("unknown");
    HandlerResult::ok(format!("processed SessionEnd event for session {session}"))
        .with("event", "session_end")
        .with("session_id", session_id)
        .with("reason", reason)
}

/// `*/*`: any event without a route. Successful, so that it is not retried forever.
fn unknown_event(event: &HookEvent) -> HandlerResult {
    tracing::debug!(
        event_id = %event.id,
        source = %event.source,
        action = %event.action,
        "no handler for event type; marking it processed"
    );
    HandlerResult::ok(format!("unknown event type: {}/{}", event.source, event.action))
        .with("source", event.source.as_str())
        .with("action", event.action.as_str())
        .with("unknown", true)
}

// ---------------------------------------------------------------------------------------------
// Facts shared by several handlers
// ---------------------------------------------------------------------------------------------

/// The tool's name, or `"unknown"` as in the seed.
fn tool_name(event: &HookEvent) -> &str {
    either(event, &["tool_name"], str_at).unwrap_or("unknown")
}

/// The file a tool touched: the producer's top-level `file_path`, else Claude Code's
/// `tool_input.file_path` / `tool_input.notebook_path`, else `tool_response.filePath`.
fn file_path(event: &HookEvent) -> Option<&str> {
    const PATHS: &[&[&str]] = &[
        &["file_path"],
        &["tool_input", "file_path"],
        &["tool_input", "notebook_path"],
        &["tool_response", "filePath"],
    ];
    PATHS.iter().find_map(|path| str_at(&event.payload, path))
}

/// The session id, in the payload or the metadata (the producers wrote it in both).
fn session_id(event: &HookEvent) -> Option<&str> {
    either(event, &["session_id"], str_at)
}

// ---------------------------------------------------------------------------------------------
// Lookups: total functions over any JSON value
// ---------------------------------------------------------------------------------------------

/// Reads `path` from the payload, else from the metadata.
fn either<'a, T>(
    event: &'a HookEvent,
    path: &[&str],
    read: fn(&'a Value, &[&str]) -> Option<T>,
) -> Option<T> {
    read(&event.payload, path).or_else(|| read(&event.metadata, path))
}

/// The value at `path` through nested objects; `None` when a step is missing or not an object,
/// or when the value is `null`.
fn value_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(value, |value, key| value.as_object()?.get(*key)).filter(|value| !value.is_null())
}

/// The string at `path`, only if it is a string.
fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    value_at(value, path)?.as_str()
}

/// The boolean at `path`, only if it is a boolean.
fn bool_at(value: &Value, path: &[&str]) -> Option<bool> {
    value_at(value, path)?.as_bool()
}

/// The non-negative integer at `path`, only if it is one.
fn u64_at(value: &Value, path: &[&str]) -> Option<u64> {
    value_at(value, path)?.as_u64()
}

/// The length of the array at `path`, only if it is an array.
fn len_at(value: &Value, path: &[&str]) -> Option<u64> {
    let len = value_at(value, path)?.as_array()?.len();
    u64::try_from(len).ok()
}

/// The finite number at `path`, given as a JSON number or as a string that parses as one
/// (producers wrote confidences both ways).
fn number_at(value: &Value, path: &[&str]) -> Option<f64> {
    let number = match value_at(value, path)? {
        Value::Number(number) => number.as_f64(),
        Value::String(text) => text.trim().parse::<f64>().ok(),
        _ => None,
    }?;
    number.is_finite().then_some(number)
}

#[cfg(test)]
mod tests {
    use super::*;

    use futures::executor::block_on;
    use serde_json::json;
    use time::OffsetDateTime;
    use uuid::Uuid;

    fn event(source: &str, action: &str, payload: Value, metadata: Value) -> HookEvent {
        HookEvent {
            id: Uuid::nil(),
            source: source.to_owned(),
            action: action.to_owned(),
            resource: "tool".to_owned(),
            resource_id: String::new(),
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
    fn run(source: &str, action: &str, payload: Value, metadata: Value) -> HandlerResult {
        let mut registry = HandlerRegistry::new();
        register_defaults(&mut registry);
        let Some(handler) = registry.resolve(source, action) else {
            panic!("no handler for {source}/{action}");
        };
        block_on(handler.handle(Arc::new(event(source, action, payload, metadata))))
    }

    /// Asserts that the event succeeds with exactly `expected` as result metadata.
    fn check(source: &str, action: &str, payload: Value, metadata: Value, expected: Value) {
        let result = run(source, action, payload.clone(), metadata);
        assert!(result.success, "{source}/{action} failed on {payload}: {result:?}");
        assert_eq!(Value::Object(result.metadata), expected, "{source}/{action} on {payload}");
    }

    const KNOWN_ROUTES: &[(&str, &str)] = &[
        ("PreToolUse", "tool_invocation"),
        ("PostToolUse", "tool_completion"),
        ("UserPromptSubmit", "prompt_submitted"),
        ("Stop", "session_stopped"),
        ("Stop", "response_completed"),
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
    fn known_routes_resolve_to_their_own_handler() {
        for &(source, action) in KNOWN_ROUTES {
            let result = run(source, action, json!({}), json!({}));
            assert!(result.success, "{source}/{action}");
            assert_eq!(result.metadata.get("unknown"), None, "{source}/{action} fell through");
        }
    }

    #[test]
    fn unknown_routes_succeed_as_unknown() {
        for (source, action) in
            [("Notification", "notified"), ("PreToolUse", "quality_check"), ("SubagentStop", "*"), ("", "")]
        {
            check(
                source,
                action,
                json!({"anything": 1}),
                json!({}),
                json!({"unknown": true, "source": source, "action": action}),
            );
        }
    }

    #[test]
    fn tool_invocation_facts() {
        let cases = [
            // What hook_event_logger.log_pretooluse wrote.
            (
                json!({
                    "tool_name": "Write",
                    "tool_input": {"file_path": "/src/a.py", "content": "x"},
                    "quality_check": {"passed": true},
                }),
                json!({"hook_type": "PreToolUse", "correlation_id": "c"}),
                json!({"tool_name": "Write", "quality_check_performed": true, "file_path": "/src/a.py"}),
            ),
            // No quality check (the producer wrote null), no file.
            (
                json!({"tool_name": "Bash", "tool_input": {"command": "ls"}, "quality_check": null}),
                json!({}),
                json!({"tool_name": "Bash", "quality_check_performed": false, "file_path": null}),
            ),
            // Tool name only in metadata; notebook path.
            (
                json!({"tool_input": {"notebook_path": "/n.ipynb"}}),
                json!({"tool_name": "NotebookEdit"}),
                json!({"tool_name": "NotebookEdit", "quality_check_performed": false, "file_path": "/n.ipynb"}),
            ),
        ];
        for (payload, metadata, expected) in cases {
            check("PreToolUse", "tool_invocation", payload, metadata, expected);
        }
    }

    #[test]
    fn tool_completion_facts() {
        let cases = [
            // What hook_event_logger.log_posttooluse wrote.
            (
                json!({
                    "tool_name": "Write",
                    "tool_output": null,
                    "file_path": "/test/example.py",
                    "auto_fix_details": {"fixes": ["renamed_variable"]},
                }),
                json!({"hook_type": "PostToolUse", "auto_fix_applied": true}),
                json!({"tool_name": "Write", "file_path": "/test/example.py", "auto_fix_applied": true}),
            ),
            (
                json!({"tool_name": "Bash", "tool_output": {"stdout": ""}, "file_path": null, "auto_fix_details": null}),
                json!({"hook_type": "PostToolUse", "auto_fix_applied": false}),
                json!({"tool_name": "Bash", "file_path": null, "auto_fix_applied": false}),
            ),
            // The producer's flag without details; Claude Code's raw input shape.
            (
                json!({"tool_name": "Edit", "tool_input": {"file_path": "/b.rs"}, "tool_response": {"filePath": "/b.rs"}}),
                json!({"auto_fix_applied": true}),
                json!({"tool_name": "Edit", "file_path": "/b.rs", "auto_fix_applied": true}),
            ),
            (
                json!({"tool_response": {"filePath": "/c.rs"}}),
                json!({}),
                json!({"tool_name": "unknown", "file_path": "/c.rs", "auto_fix_applied": false}),
            ),
        ];
        for (payload, metadata, expected) in cases {
            check("PostToolUse", "tool_completion", payload, metadata, expected);
        }
    }

    #[test]
    fn prompt_submitted_facts() {
        let cases = [
            // What hook_event_logger.log_userprompt wrote: the metadata's agent_detected is a bool.
            (
                json!({
                    "prompt_preview": "Create a function to calculate fibonacci",
                    "agent_detected": "agent-code-generator",
                    "agent_domain": "code_generation",
                    "detection_method": "pattern",
                    "confidence": 0.9,
                }),
                json!({"hook_type": "UserPromptSubmit", "agent_detected": true, "detection_method": "pattern"}),
                json!({
                    "agent_detected": "agent-code-generator",
                    "detection_method": "pattern",
                    "confidence": 0.9,
                    "prompt_length": 40,
                }),
            ),
            // No agent: the metadata's `false` is not a name; the method only in metadata.
            (
                json!({"prompt_preview": "", "agent_detected": null, "confidence": null}),
                json!({"agent_detected": false, "detection_method": "ai"}),
                json!({"agent_detected": null, "detection_method": "ai", "confidence": null, "prompt_length": 0}),
            ),
            // Claude Code's raw input: characters, not bytes; confidence as text.
            (
                json!({"prompt": "héllo 👋", "confidence": " 0.75 "}),
                json!({}),
                json!({"agent_detected": null, "detection_method": null, "confidence": 0.75, "prompt_length": 7}),
            ),
            // An integer confidence; no prompt at all.
            (
                json!({"confidence": 1}),
                json!({}),
                json!({"agent_detected": null, "detection_method": null, "confidence": 1.0}),
            ),
            // Unusable confidences.
            (
                json!({"confidence": "high", "prompt": 7}),
                json!({"confidence": "NaN"}),
                json!({"agent_detected": null, "detection_method": null, "confidence": null}),
            ),
        ];
        for (payload, metadata, expected) in cases {
            check("UserPromptSubmit", "prompt_submitted", payload, metadata, expected);
        }
    }

    #[test]
    fn stop_facts() {
        let cases = [
            // What response_intelligence.log_response_completion wrote.
            (
                "response_completed",
                json!({
                    "session_id": "s1",
                    "completion_status": "complete",
                    "tools_executed": ["Read", "Edit"],
                    "tool_count": 2,
                    "timestamp": "2025-10-19T18:00:00Z",
                }),
                json!({"hook_type": "Stop", "session_id": "s1", "completion_status": "complete"}),
                json!({
                    "event": "stop", "session_id": "s1", "completion_status": "complete",
                    "tool_count": 2, "interrupted": false,
                }),
            ),
            // The ResponseIntelligence class: total_tools and interrupted; session only in metadata.
            (
                "response_completed",
                json!({"tools_executed": ["Write"], "total_tools": 1, "completion_status": "interrupted", "interrupted": true}),
                json!({"session_id": "s2", "hook_type": "Stop"}),
                json!({
                    "event": "stop", "session_id": "s2", "completion_status": "interrupted",
                    "tool_count": 1, "interrupted": true,
                }),
            ),
            // Count from the list when no count was written.
            (
                "response_completed",
                json!({"tools_executed": ["Read", "Read", "Bash"]}),
                json!({}),
                json!({
                    "event": "stop", "session_id": null, "completion_status": null,
                    "tool_count": 3, "interrupted": null,
                }),
            ),
            // Claude Code's raw Stop input on the seed's route.
            (
                "session_stopped",
                json!({"session_id": "s3", "transcript_path": "/t.jsonl", "stop_hook_active": false}),
                json!({}),
                json!({
                    "event": "stop", "session_id": "s3", "completion_status": null,
                    "tool_count": null, "interrupted": null,
                }),
            ),
        ];
        for (action, payload, metadata, expected) in cases {
            check("Stop", action, payload, metadata, expected);
        }
    }

    #[test]
    fn session_start_facts() {
        let cases = [
            // session_intelligence.log_session_start.
            (
                json!({"session_id": "s1", "project_path": "/p", "cwd": "/p/sub", "timestamp": "t"}),
                json!({"hook_type": "SessionStart", "session_id": "s1"}),
                json!({
                    "event": "session_start", "session_id": "s1", "cwd": "/p/sub",
                    "project_path": "/p", "git_branch": null,
                }),
            ),
            // The version with git metadata.
            (
                json!({"session_id": "s2", "cwd": "/w", "git_branch": "main", "git_dirty": true}),
                json!({"git_metadata": {"git_branch": "ignored"}}),
                json!({
                    "event": "session_start", "session_id": "s2", "cwd": "/w",
                    "project_path": null, "git_branch": "main",
                }),
            ),
            (
                json!({"session_id": "s3"}),
                json!({"git_metadata": {"git_branch": "feature"}}),
                json!({
                    "event": "session_start", "session_id": "s3", "cwd": null,
                    "project_path": null, "git_branch": "feature",
                }),
            ),
        ];
        for (payload, metadata, expected) in cases {
            check("SessionStart", "session_initialized", payload, metadata, expected);
        }
    }

    #[test]
    fn session_end_facts() {
        let cases = [
            // session_intelligence.log_session_end.
            (
                "session_completed",
                json!({"session_id": "s1", "timestamp": "t", "duration_seconds": 12}),
                json!({"hook_type": "SessionEnd", "session_id": "s1"}),
                json!({"event": "session_end", "session_id": "s1", "reason": null}),
            ),
            // Claude Code's raw SessionEnd input on the seed's route.
            (
                "session_ended",
                json!({"session_id": "s2", "reason": "logout"}),
                json!({}),
                json!({"event": "session_end", "session_id": "s2", "reason": "logout"}),
            ),
        ];
        for (action, payload, metadata, expected) in cases {
            check("SessionEnd", action, payload, metadata, expected);
        }
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
            json!({"prompt": 7}),
            json!({"prompt": null, "prompt_preview": ["a"]}),
            json!({"confidence": "high"}),
            json!({"confidence": {"value": 0.9}}),
            json!({"confidence": 1e308, "tool_count": -3, "total_tools": "2"}),
            json!({"tool_name": 5, "file_path": false, "session_id": 9, "agent_detected": true}),
            json!({"tools_executed": "Read", "interrupted": "yes", "quality_check": false}),
            json!({"git_metadata": "main", "auto_fix_details": 0, "auto_fix_applied": "true"}),
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
            }),
        );
        check(
            "PostToolUse",
            "tool_completion",
            json!(42),
            json!("str"),
            json!({
                "tool_name": "unknown", "file_path": null, "auto_fix_applied": false,
            }),
        );
        check(
            "UserPromptSubmit",
            "prompt_submitted",
            json!({"prompt": 7}),
            json!([]),
            json!({
                "agent_detected": null, "detection_method": null, "confidence": null,
            }),
        );
        check(
            "Stop",
            "response_completed",
            json!({"tools_executed": "Read", "tool_count": -3}),
            json!(null),
            json!({
                "event": "stop", "session_id": null, "completion_status": null,
                "tool_count": null, "interrupted": null,
            }),
        );
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
        let doc =
            json!({"a": {"b": "text", "n": 0.5, "s": "2.5", "t": true, "l": [1, 2], "z": null}, "x": "y"});
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
}
