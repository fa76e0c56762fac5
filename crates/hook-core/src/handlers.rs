//! The default handlers: what the processor does with the events the hooks write.
//!
//! They are the counterpart of the seed's `event_handlers.py`. Each one reads facts out of the
//! event and reports them as result metadata (the row's `result_metadata`). They read two shapes
//! of input:
//!
//! - **Claude Code's hook input**, stored as is by `hook-ingest` (`payload` = the hook's JSON:
//!   `session_id`, `cwd`, `hook_event_name`, `tool_name`, `tool_input`, `tool_response`,
//!   `tool_use_id`, `prompt`, `message`, `trigger`, `source`, `reason`, ...);
//! - **the original producers' rows** (`hook_event_logger.py`, `session_intelligence.py`,
//!   `response_intelligence.py`), whose keys keep the meaning they had in the seed.
//!
//! The handlers have no side effects, so they have no reason to fail: a missing, null or oddly
//! typed field is a missing fact (`null` in the result), never a failed attempt, because a retry
//! would not make the field appear. Every key of a route is always present.
//!
//! | route | result metadata |
//! |---|---|
//! | `PreToolUse/tool_invocation` | `tool_name`, `quality_check_performed`, `file_path`, `session_id`, `tool_use_id`, `target` |
//! | `PostToolUse/tool_completion` | `tool_name`, `file_path`, `auto_fix_applied`, `session_id`, `tool_use_id`, `target`, `success`, `error`, `interrupted` |
//! | `PostToolUseFailure/post_tool_use_failure` | `tool_name`, `file_path`, `session_id`, `tool_use_id`, `target`, `success` (false), `error`, `interrupted` |
//! | `PermissionRequest/permission_request` | `event: "permission_request"`, `tool_name`, `file_path`, `session_id`, `tool_use_id`, `target` |
//! | `UserPromptSubmit/prompt_submitted` | `agent_detected`, `detection_method`, `confidence`, `prompt_length`, `session_id`, `slash_command` |
//! | `Notification/notification` | `event: "notification"`, `session_id`, `message`, `notification_type`, `title` |
//! | `Stop/session_stopped`, `Stop/response_completed` | `event: "stop"`, `session_id`, `completion_status`, `tool_count`, `interrupted`, `stop_hook_active` |
//! | `SubagentStart/subagent_start` | `event: "subagent_start"`, `session_id`, `agent_id`, `agent_type` |
//! | `SubagentStop/subagent_stop` | `event: "subagent_stop"`, `session_id`, `agent_id`, `agent_type`, `stop_hook_active` |
//! | `PreCompact/pre_compact` | `event: "pre_compact"`, `session_id`, `trigger`, `has_custom_instructions` |
//! | `PostCompact/post_compact` | `event: "post_compact"`, `session_id`, `trigger` |
//! | `SessionStart/session_initialized` | `event: "session_start"`, `session_id`, `cwd`, `project_path`, `git_branch`, `start_source`, `model`, `agent_type` |
//! | `SessionEnd/session_ended`, `SessionEnd/session_completed` | `event: "session_end"`, `session_id`, `reason` |
//! | `*/*` | `unknown: true`, `source`, `action`, `session_id` |
//!
//! `docs/handlers.md` says where each fact comes from, hook by hook. The seed registered only
//! the first route of each hook it knew; the producers also wrote `Stop/response_completed`,
//! `SessionStart/session_initialized` and `SessionEnd/session_completed`, which the seed handled
//! with its "unknown event" fallback; here they get real handlers, as do the hooks Claude Code
//! added since (under the action `hook-ingest` gives them: the hook's name in snake case).

mod facts;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use crate::event::{HandlerResult, HookEvent};
use crate::handler::{Handler, HandlerRegistry, WILDCARD};

use facts::{
    agent_mention, bool_at, cut, either, file_path, is_hook_input, known, len_at, number_at, session_id,
    slash_command, str_at, target, tool_name, tool_outcome, u64_at, value_at, MAX_TEXT_CHARS,
};

/// Registers the default handlers for the seed's routes, the routes the original producers
/// wrote, and the routes `hook-ingest` stores Claude Code's hooks under.
///
/// Also registers the global wildcard `(*, *)`, which marks any other event successful with
/// `{"unknown": true, "source": ..., "action": ..., "session_id": ...}` so that unknown events
/// are not retried. Routes registered earlier are replaced; register custom handlers afterwards
/// to override a default.
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
    ("PostToolUseFailure", "post_tool_use_failure", tool_failure),
    ("PermissionRequest", "permission_request", permission_request),
    ("UserPromptSubmit", "prompt_submitted", prompt_submitted),
    ("Notification", "notification", notification),
    ("Stop", "session_stopped", stop),
    ("Stop", "response_completed", stop),
    ("SubagentStart", "subagent_start", subagent_start),
    ("SubagentStop", "subagent_stop", subagent_stop),
    ("PreCompact", "pre_compact", pre_compact),
    ("PostCompact", "post_compact", post_compact),
    ("SessionStart", "session_initialized", session_start),
    ("SessionEnd", "session_ended", session_end),
    ("SessionEnd", "session_completed", session_end),
    (WILDCARD, WILDCARD, unknown_event),
];

/// Wraps a pure function as an async [`Handler`]. It logs nothing: the engine logs each handled
/// event (`handled`, at debug), and the facts may hold commands and paths.
fn handler(extract: Extract) -> impl Handler {
    move |event: Arc<HookEvent>| async move { extract(&event) }
}

/// `"unknown"` for a summary line when the session is not known, as in the seed.
fn or_unknown(session: Option<&str>) -> &str {
    session.unwrap_or("unknown")
}

// ---------------------------------------------------------------------------------------------
// Tool calls
// ---------------------------------------------------------------------------------------------

/// `PreToolUse/tool_invocation`: the producer wrote `payload = {tool_name, tool_input,
/// quality_check}`; Claude Code's input has `tool_name`, `tool_input`, `tool_use_id`.
fn tool_invocation(event: &HookEvent) -> HandlerResult {
    let tool_name = tool_name(event);
    // Only the producer ran a quality check; Claude Code's input never has one.
    let quality_check_performed = value_at(&event.payload, &["quality_check"]).is_some();
    HandlerResult::ok(format!("processed PreToolUse for {tool_name}"))
        .with("tool_name", tool_name)
        .with("quality_check_performed", quality_check_performed)
        .with("file_path", file_path(event))
        .with("session_id", session_id(event))
        .with("tool_use_id", str_at(&event.payload, &["tool_use_id"]))
        .with("target", target(event))
}

/// `PostToolUse/tool_completion`: the producer wrote `payload = {tool_name, tool_output,
/// file_path, auto_fix_details}` and `metadata = {auto_fix_applied}`; Claude Code's input adds
/// `tool_response`, which says whether the call succeeded.
fn tool_completion(event: &HookEvent) -> HandlerResult {
    let tool_name = tool_name(event);
    // The seed looked only at the details; the producer's own flag counts too, since it may
    // report a fix without details. Nothing fixes anything on Claude Code's path: false there.
    let auto_fix_applied = value_at(&event.payload, &["auto_fix_details"]).is_some()
        || either(event, &["auto_fix_applied"], bool_at) == Some(true);
    let outcome = tool_outcome(event);
    HandlerResult::ok(format!("processed PostToolUse for {tool_name}"))
        .with("tool_name", tool_name)
        .with("file_path", file_path(event))
        .with("auto_fix_applied", auto_fix_applied)
        .with("session_id", session_id(event))
        .with("tool_use_id", str_at(&event.payload, &["tool_use_id"]))
        .with("target", target(event))
        .with("success", outcome.success)
        .with("error", outcome.error)
        .with("interrupted", outcome.interrupted)
}

/// `PostToolUseFailure/post_tool_use_failure`: Claude Code's input for a tool call that failed,
/// `{tool_name, tool_input, tool_use_id, error, is_interrupt}`.
fn tool_failure(event: &HookEvent) -> HandlerResult {
    let tool_name = tool_name(event);
    // `error` is the documented field; versions and ports also wrote these two.
    let error = ["error", "tool_error", "error_message"]
        .iter()
        .find_map(|key| str_at(&event.payload, &[*key]))
        .map(|text| cut(text, MAX_TEXT_CHARS));
    HandlerResult::ok(format!("processed PostToolUseFailure for {tool_name}"))
        .with("tool_name", tool_name)
        .with("file_path", file_path(event))
        .with("session_id", session_id(event))
        .with("tool_use_id", str_at(&event.payload, &["tool_use_id"]))
        .with("target", target(event))
        .with("success", false)
        .with("error", error)
        .with("interrupted", bool_at(&event.payload, &["is_interrupt"]))
}

/// `PermissionRequest/permission_request`: Claude Code is about to ask the user to allow a
/// tool call, `{tool_name, tool_input, permission_suggestions}`.
fn permission_request(event: &HookEvent) -> HandlerResult {
    let tool_name = tool_name(event);
    HandlerResult::ok(format!("processed PermissionRequest for {tool_name}"))
        .with("event", "permission_request")
        .with("tool_name", tool_name)
        .with("file_path", file_path(event))
        .with("session_id", session_id(event))
        .with("tool_use_id", str_at(&event.payload, &["tool_use_id"]))
        .with("target", target(event))
}

// ---------------------------------------------------------------------------------------------
// Prompts and notifications
// ---------------------------------------------------------------------------------------------

/// `UserPromptSubmit/prompt_submitted`: the producer wrote `payload = {prompt_preview,
/// agent_detected, detection_method, confidence, ...}`; Claude Code's input has `prompt`.
///
/// Never the prompt itself: it is the user's text. Only its length, the agent it names
/// (`@agent-<name>`) and the slash command it starts with.
fn prompt_submitted(event: &HookEvent) -> HandlerResult {
    let prompt = str_at(&event.payload, &["prompt"]);
    let prompt_length =
        prompt.or_else(|| str_at(&event.payload, &["prompt_preview"])).map(|text| text.chars().count());
    // The producer's detection first (the metadata's `agent_detected` is a boolean, so only a
    // string counts as a name); else an agent the prompt names; else the agent the session runs as.
    let producer = either(event, &["agent_detected"], str_at);
    let derived = producer.is_none().then(|| derived_agent(event, prompt)).flatten();
    let (agent_detected, detection_method, confidence) = match (producer, derived) {
        (None, Some((agent, method))) => (Some(agent), Some(method.to_owned()), Some(1.0)),
        (agent, _) => (
            agent.map(str::to_owned),
            either(event, &["detection_method"], str_at).map(str::to_owned),
            either(event, &["confidence"], number_at),
        ),
    };
    HandlerResult::ok("processed UserPromptSubmit event")
        .with("agent_detected", agent_detected)
        .with("detection_method", detection_method)
        .with("confidence", confidence)
        .with("prompt_length", prompt_length)
        .with("session_id", session_id(event))
        .with("slash_command", prompt.and_then(slash_command))
}

/// The agent a Claude Code prompt goes to, and how that is known: the agent it names
/// (`@agent-<name>`), else the agent the session runs as (`agent_type`, set by `claude --agent`
/// and inside subagents).
fn derived_agent(event: &HookEvent, prompt: Option<&str>) -> Option<(String, &'static str)> {
    prompt.and_then(agent_mention).map(|agent| (agent, "mention")).or_else(|| {
        str_at(&event.payload, &["agent_type"]).filter(known).map(|agent| (agent.to_owned(), "agent_type"))
    })
}

/// `Notification/notification`: Claude Code tells the user something, `{message,
/// notification_type, title}` (e.g. "Claude needs your permission to use Bash").
fn notification(event: &HookEvent) -> HandlerResult {
    let session = session_id(event);
    HandlerResult::ok(format!("processed Notification event for session {}", or_unknown(session)))
        .with("event", "notification")
        .with("session_id", session)
        .with("message", str_at(&event.payload, &["message"]).map(|text| cut(text, MAX_TEXT_CHARS)))
        .with("notification_type", str_at(&event.payload, &["notification_type"]))
        .with("title", str_at(&event.payload, &["title"]).map(|text| cut(text, MAX_TEXT_CHARS)))
}

// ---------------------------------------------------------------------------------------------
// Stops and subagents
// ---------------------------------------------------------------------------------------------

/// `Stop/session_stopped` (the seed's route) and `Stop/response_completed` (what the producer
/// and `hook-ingest` write). The producer wrote `payload = {session_id, completion_status,
/// tools_executed, tool_count | total_tools, interrupted, ...}`; Claude Code's input has
/// `stop_hook_active`, and Claude Code runs the hook only when the response finished (not on a
/// user interrupt), so its Stop is a complete, uninterrupted response.
fn stop(event: &HookEvent) -> HandlerResult {
    let session = session_id(event);
    let completion_status = either(event, &["completion_status"], str_at)
        .or_else(|| is_hook_input(event, "Stop").then_some("complete"));
    let tool_count = u64_at(&event.payload, &["tool_count"])
        .or_else(|| u64_at(&event.payload, &["total_tools"]))
        .or_else(|| len_at(&event.payload, &["tools_executed"]));
    let interrupted = bool_at(&event.payload, &["interrupted"])
        .or_else(|| completion_status.map(|status| status == "interrupted"));
    HandlerResult::ok(format!("processed Stop event for session {}", or_unknown(session)))
        .with("event", "stop")
        .with("session_id", session)
        .with("completion_status", completion_status)
        .with("tool_count", tool_count)
        .with("interrupted", interrupted)
        .with("stop_hook_active", bool_at(&event.payload, &["stop_hook_active"]))
}

/// `SubagentStart/subagent_start`: a subagent (the Task tool) starts, `{agent_id, agent_type}`.
fn subagent_start(event: &HookEvent) -> HandlerResult {
    let session = session_id(event);
    HandlerResult::ok(format!("processed SubagentStart event for session {}", or_unknown(session)))
        .with("event", "subagent_start")
        .with("session_id", session)
        .with("agent_id", str_at(&event.payload, &["agent_id"]))
        .with("agent_type", str_at(&event.payload, &["agent_type"]))
}

/// `SubagentStop/subagent_stop`: a subagent finished, `{stop_hook_active, agent_id,
/// agent_type, agent_transcript_path, last_assistant_message}` (the last three in newer versions).
fn subagent_stop(event: &HookEvent) -> HandlerResult {
    let session = session_id(event);
    HandlerResult::ok(format!("processed SubagentStop event for session {}", or_unknown(session)))
        .with("event", "subagent_stop")
        .with("session_id", session)
        .with("agent_id", str_at(&event.payload, &["agent_id"]))
        .with("agent_type", str_at(&event.payload, &["agent_type"]))
        .with("stop_hook_active", bool_at(&event.payload, &["stop_hook_active"]))
}

// ---------------------------------------------------------------------------------------------
// Compaction
// ---------------------------------------------------------------------------------------------

/// `PreCompact/pre_compact`: the context is about to be compacted, `{trigger: "manual" |
/// "auto", custom_instructions}`. The instructions are the user's text: only whether there are any.
fn pre_compact(event: &HookEvent) -> HandlerResult {
    let session = session_id(event);
    let has_custom_instructions =
        str_at(&event.payload, &["custom_instructions"]).is_some_and(|text| !text.trim().is_empty());
    HandlerResult::ok(format!("processed PreCompact event for session {}", or_unknown(session)))
        .with("event", "pre_compact")
        .with("session_id", session)
        .with("trigger", str_at(&event.payload, &["trigger"]))
        .with("has_custom_instructions", has_custom_instructions)
}

/// `PostCompact/post_compact`: the context was compacted, `{trigger, compact_summary}`.
fn post_compact(event: &HookEvent) -> HandlerResult {
    let session = session_id(event);
    HandlerResult::ok(format!("processed PostCompact event for session {}", or_unknown(session)))
        .with("event", "post_compact")
        .with("session_id", session)
        .with("trigger", str_at(&event.payload, &["trigger"]))
}

// ---------------------------------------------------------------------------------------------
// Sessions
// ---------------------------------------------------------------------------------------------

/// `SessionStart/session_initialized`: the producer wrote `payload = {session_id, project_path,
/// cwd, git_branch, ...}` and, in one version, `metadata = {git_metadata: {git_branch, ...}}`;
/// Claude Code's input has `cwd`, `source` (`startup`, `resume`, `clear`, `compact`), `model`
/// and, for `claude --agent`, `agent_type`.
fn session_start(event: &HookEvent) -> HandlerResult {
    let session = session_id(event);
    let cwd = either(event, &["cwd"], str_at);
    let start_source = str_at(&event.payload, &["source"]);
    // A new session starts in the project's directory (Claude Code's project root); a resumed
    // or cleared one may have moved on, so only a startup's cwd says where the project is.
    let project_path = either(event, &["project_path"], str_at).or_else(|| {
        (is_hook_input(event, "SessionStart") && start_source == Some("startup")).then_some(cwd).flatten()
    });
    let git_branch = str_at(&event.payload, &["git_branch"])
        .or_else(|| str_at(&event.metadata, &["git_metadata", "git_branch"]));
    HandlerResult::ok(format!("processed SessionStart event for session {}", or_unknown(session)))
        .with("event", "session_start")
        .with("session_id", session)
        .with("cwd", cwd)
        .with("project_path", project_path)
        .with("git_branch", git_branch)
        .with("start_source", start_source)
        .with("model", str_at(&event.payload, &["model"]))
        .with("agent_type", str_at(&event.payload, &["agent_type"]))
}

/// `SessionEnd/session_ended` (the seed's and `hook-ingest`'s route) and
/// `SessionEnd/session_completed` (the producer's, `payload = {session_id, timestamp, ...}`);
/// Claude Code's input adds `reason` (`clear`, `logout`, `prompt_input_exit`, `other`, ...).
fn session_end(event: &HookEvent) -> HandlerResult {
    let session = session_id(event);
    HandlerResult::ok(format!("processed SessionEnd event for session {}", or_unknown(session)))
        .with("event", "session_end")
        .with("session_id", session)
        .with("reason", either(event, &["reason"], str_at))
}

/// `*/*`: any event without a route. Successful, so that it is not retried forever; logged at
/// debug, since a hook Claude Code adds later would otherwise log a line per event.
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
        .with("session_id", session_id(event))
}
