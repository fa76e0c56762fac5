//! From a hook's stdin to the event to store: the routes, and what becomes of input that is
//! not a hook's JSON.
//!
//! | `hook_event_name`  | `source`           | `action`              | `resource`  | `resource_id` |
//! |--------------------|--------------------|-----------------------|-------------|---------------|
//! | `PreToolUse`       | `PreToolUse`       | `tool_invocation`     | `tool`      | `tool_name`   |
//! | `PostToolUse`      | `PostToolUse`      | `tool_completion`     | `tool`      | `tool_name`   |
//! | `UserPromptSubmit` | `UserPromptSubmit` | `prompt_submitted`    | `session`   | `session_id`  |
//! | `Stop`             | `Stop`             | `response_completed`  | `session`   | `session_id`  |
//! | `SessionStart`     | `SessionStart`     | `session_initialized` | `session`   | `session_id`  |
//! | `SessionEnd`       | `SessionEnd`       | `session_ended`       | `session`   | `session_id`  |
//! | any other, e.g. `SubagentStop` | the name | snake case: `subagent_stop` | `tool` if the input names a tool, else `session` | `tool_name` or `session_id` |
//!
//! The default handlers have a route for these and for `Notification`, `SubagentStop`,
//! `PreCompact`, `PostToolUseFailure`, `PermissionRequest`, `SubagentStart` and `PostCompact`
//! (`docs/handlers.md`); events Claude Code adds later reach the global wildcard handler, or a
//! handler a service registers for them. A missing `tool_name` or `session_id` is `unknown`.
//!
//! `payload` is the hook's input as it came; `metadata` is `{hook_type, session_id, cwd,
//! logged_at}` (`logged_at`: when `hook-ingest` read the input, RFC 3339, UTC).
//!
//! Input that is not a hook's JSON becomes a *raw record*, `source = "hook-ingest"`,
//! `action = "malformed_input"`, `resource = "hook_input"`, `resource_id = "unknown"`, with
//! `payload = {"raw": <the input as text>, "error": <why>}` (for input over [`MAX_INPUT`]
//! bytes only its first [`RAW_PREFIX`] bytes, plus `"bytes": <size>`). Empty input has nothing to
//! keep and stores nothing.
//!
//! Everything stored is made acceptable to PostgreSQL first: `\u0000`, which `jsonb` and `text`
//! refuse, becomes U+FFFD, and the four routing columns are cut to their 255 characters.

use std::io::{self, Read};

use hook_core::NewEvent;
use serde_json::{json, Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The largest input stored as an event, in bytes.
pub const MAX_INPUT: usize = 16 * 1024 * 1024;

/// How much of an oversized input its raw record keeps, in bytes.
pub const RAW_PREFIX: usize = 64 * 1024;

/// The `source` of records `hook-ingest` writes about input it could not use.
pub const INGEST_SOURCE: &str = "hook-ingest";

/// The longest value of a routing column (`VARCHAR(255)`), in characters.
const MAX_COLUMN_CHARS: usize = 255;

/// What to store, and what to warn about.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// The event, unless there was nothing to keep.
    pub event: Option<NewEvent>,
    /// Why the input was not a hook's JSON.
    pub warning: Option<String>,
}

/// Reads all of `input` (stdin), keeping at most [`MAX_INPUT`]` + 1` bytes, and turns it into the
/// event to store. The rest of an oversized input is read and dropped, so that the writer never
/// sees a broken pipe.
pub fn read_input(input: impl Read, logged_at: OffsetDateTime) -> Prepared {
    let mut kept = Vec::new();
    let limit = u64::try_from(MAX_INPUT).unwrap_or(u64::MAX) + 1;
    let mut input = input;
    let read = input.by_ref().take(limit).read_to_end(&mut kept);
    let total = match read {
        Ok(_) if kept.len() > MAX_INPUT => {
            io::copy(&mut input, &mut io::sink()).map(|rest| kept.len() as u64 + rest)
        }
        Ok(_) => Ok(kept.len() as u64),
        Err(error) => Err(error),
    };
    match total {
        Ok(total) => prepare(&kept, total, logged_at),
        Err(error) => {
            let warning = format!("reading stdin failed after {} bytes: {error}", kept.len());
            let event = (!kept.trim_ascii().is_empty())
                .then(|| raw_record(&kept, kept.len() as u64, &warning, logged_at));
            Prepared { event, warning: Some(warning) }
        }
    }
}

/// Turns the bytes of an input (`total` bytes long, of which `bytes` were kept) into the event
/// to store.
pub fn prepare(bytes: &[u8], total: u64, logged_at: OffsetDateTime) -> Prepared {
    let rejected = |warning: String| Prepared {
        event: Some(raw_record(bytes, total, &warning, logged_at)),
        warning: Some(warning),
    };
    if bytes.len() > MAX_INPUT {
        return rejected(format!("input of {total} bytes is over the 16 MiB limit; kept its first 64 KiB"));
    }
    if bytes.trim_ascii().is_empty() {
        return Prepared { event: None, warning: Some("empty input; nothing stored".into()) };
    }
    match serde_json::from_slice::<Value>(bytes) {
        Err(error) => rejected(format!("input is not JSON ({error}); stored as a raw record")),
        Ok(Value::Object(input)) => match input.get("hook_event_name") {
            Some(Value::String(name)) if !name.is_empty() => {
                let name = name.clone();
                Prepared { event: Some(hook_event(&name, input, logged_at)), warning: None }
            }
            _ => rejected("input has no hook_event_name; stored as a raw record".into()),
        },
        Ok(_) => rejected("input is not a JSON object; stored as a raw record".into()),
    }
}

/// The action of a hook event: the default handlers' route for the six they handle, else the
/// name in snake case.
pub fn action_for(hook_event_name: &str) -> String {
    match hook_event_name {
        "PreToolUse" => "tool_invocation".into(),
        "PostToolUse" => "tool_completion".into(),
        "UserPromptSubmit" => "prompt_submitted".into(),
        "Stop" => "response_completed".into(),
        "SessionStart" => "session_initialized".into(),
        "SessionEnd" => "session_ended".into(),
        other => snake_case(other),
    }
}

/// The event for a hook's input object.
fn hook_event(name: &str, input: Map<String, Value>, logged_at: OffsetDateTime) -> NewEvent {
    let text = |key: &str| input.get(key).and_then(Value::as_str).filter(|s| !s.is_empty());
    let (resource, resource_id) = match (name, text("tool_name")) {
        ("PreToolUse" | "PostToolUse", tool) => ("tool", tool.unwrap_or("unknown")),
        (_, Some(tool)) => ("tool", tool),
        (_, None) => ("session", text("session_id").unwrap_or("unknown")),
    };
    let metadata = json!({
        "hook_type": name,
        "session_id": input.get("session_id").cloned().unwrap_or(Value::Null),
        "cwd": input.get("cwd").cloned().unwrap_or(Value::Null),
        "logged_at": rfc3339(logged_at),
    });
    NewEvent::new(column(name), column(&action_for(name)), resource, column(resource_id))
        .with_payload(sanitized(Value::Object(input)))
        .with_metadata(sanitized(metadata))
}

/// The raw record of input that is not a hook's JSON; see the module documentation.
fn raw_record(bytes: &[u8], total: u64, error: &str, logged_at: OffsetDateTime) -> NewEvent {
    let oversized = bytes.len() > MAX_INPUT;
    let kept = if oversized { &bytes[..RAW_PREFIX] } else { bytes };
    let mut payload = json!({"raw": String::from_utf8_lossy(kept), "error": error});
    if oversized {
        payload["bytes"] = json!(total);
    }
    let metadata = json!({
        "hook_type": null,
        "session_id": null,
        "cwd": null,
        "logged_at": rfc3339(logged_at),
    });
    NewEvent::new(INGEST_SOURCE, "malformed_input", "hook_input", "unknown")
        .with_payload(sanitized(payload))
        .with_metadata(metadata)
}

/// `OffsetDateTime` as RFC 3339 (it always formats; the fallback is unreachable).
pub(crate) fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap_or_else(|_| at.unix_timestamp().to_string())
}

/// `PreCompact` → `pre_compact`, `SubagentStop` → `subagent_stop`, `HTTPRequest` → `http_request`.
pub fn snake_case(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    let mut out = String::with_capacity(name.len() + 4);
    for (i, &c) in chars.iter().enumerate() {
        if c.is_uppercase() {
            let after_lower = i > 0 && (chars[i - 1].is_lowercase() || chars[i - 1].is_ascii_digit());
            let ends_acronym =
                i > 0 && chars[i - 1].is_uppercase() && chars.get(i + 1).is_some_and(|n| n.is_lowercase());
            if after_lower || ends_acronym {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else if c.is_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('_') && !out.is_empty() {
            out.push('_');
        }
    }
    column(out.trim_end_matches('_'))
}

/// A routing column's value: no NUL, at most 255 characters.
pub(crate) fn column(text: &str) -> String {
    text.chars().take(MAX_COLUMN_CHARS).map(|c| if c == '\0' { '\u{FFFD}' } else { c }).collect()
}

/// `value` with every NUL character, in strings and keys, replaced by U+FFFD: PostgreSQL's
/// `jsonb` refuses `\u0000`. Values without NUL are returned untouched.
pub fn sanitized(value: Value) -> Value {
    fn clean(text: String) -> String {
        if text.contains('\0') {
            text.replace('\0', "\u{FFFD}")
        } else {
            text
        }
    }
    match value {
        Value::String(text) => Value::String(clean(text)),
        Value::Array(items) => Value::Array(items.into_iter().map(sanitized).collect()),
        Value::Object(map) => Value::Object(map.into_iter().map(|(k, v)| (clean(k), sanitized(v))).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_760_000_000).unwrap()
    }

    /// The routing columns of the stored event, or `None` when nothing is stored.
    fn route(input: &[u8]) -> Option<[String; 4]> {
        let event = prepare(input, input.len() as u64, at()).event?;
        Some([event.source, event.action, event.resource, event.resource_id])
    }

    #[test]
    fn hook_events_map_to_routes() {
        let cases: &[(&str, [&str; 4])] = &[
            (
                r#"{"hook_event_name":"PreToolUse","session_id":"s","tool_name":"Bash"}"#,
                ["PreToolUse", "tool_invocation", "tool", "Bash"],
            ),
            (
                r#"{"hook_event_name":"PostToolUse","session_id":"s"}"#,
                ["PostToolUse", "tool_completion", "tool", "unknown"],
            ),
            (
                r#"{"hook_event_name":"UserPromptSubmit","session_id":"s1","prompt":"hi"}"#,
                ["UserPromptSubmit", "prompt_submitted", "session", "s1"],
            ),
            (
                r#"{"hook_event_name":"Stop","session_id":"s2"}"#,
                ["Stop", "response_completed", "session", "s2"],
            ),
            (
                r#"{"hook_event_name":"SessionStart","session_id":"s3","source":"startup"}"#,
                ["SessionStart", "session_initialized", "session", "s3"],
            ),
            (r#"{"hook_event_name":"SessionEnd"}"#, ["SessionEnd", "session_ended", "session", "unknown"]),
            (
                r#"{"hook_event_name":"SubagentStop","session_id":"s"}"#,
                ["SubagentStop", "subagent_stop", "session", "s"],
            ),
            (
                r#"{"hook_event_name":"PreCompact","session_id":"s"}"#,
                ["PreCompact", "pre_compact", "session", "s"],
            ),
            (
                r#"{"hook_event_name":"Notification","session_id":"s"}"#,
                ["Notification", "notification", "session", "s"],
            ),
            (
                r#"{"hook_event_name":"PostToolUseFailure","session_id":"s","tool_name":"Edit"}"#,
                ["PostToolUseFailure", "post_tool_use_failure", "tool", "Edit"],
            ),
            (
                r#"{"hook_event_name":"Stop","session_id":7}"#,
                ["Stop", "response_completed", "session", "unknown"],
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(route(input.as_bytes()), Some(expected.map(String::from)), "{input}");
        }
    }

    #[test]
    fn payload_is_the_input_and_metadata_the_context() {
        let input = json!({
            "hook_event_name": "UserPromptSubmit", "session_id": "s1", "cwd": "/w",
            "transcript_path": "/t.jsonl", "prompt": "héllo",
        });
        let bytes = serde_json::to_vec(&input).unwrap();
        let prepared = prepare(&bytes, bytes.len() as u64, at());
        assert_eq!(prepared.warning, None);
        let event = prepared.event.unwrap();
        assert_eq!(event.payload, input);
        assert_eq!(
            event.metadata,
            json!({"hook_type": "UserPromptSubmit", "session_id": "s1", "cwd": "/w", "logged_at": "2025-10-09T08:53:20Z"})
        );
        assert_eq!(event.created_at, None);
    }

    #[test]
    fn input_that_is_not_a_hook_becomes_a_raw_record() {
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "input is not JSON (expected ident at line 1 column 2); stored as a raw record"),
            (
                b"{\"hook_event_name\": \"Stop\"",
                "input is not JSON (EOF while parsing an object at line 1 column 26); stored as a raw record",
            ),
            (b"[1, 2]", "input is not a JSON object; stored as a raw record"),
            (b"{\"session_id\": \"s\"}", "input has no hook_event_name; stored as a raw record"),
            (b"{\"hook_event_name\": 5}", "input has no hook_event_name; stored as a raw record"),
            (b"\xff\xfe{}", "input is not JSON (expected value at line 1 column 1); stored as a raw record"),
        ];
        for (input, warning) in cases {
            let prepared = prepare(input, input.len() as u64, at());
            assert_eq!(prepared.warning.as_deref(), Some(*warning), "{input:?}");
            let event = prepared.event.unwrap();
            assert_eq!(
                [event.source.as_str(), &event.action, &event.resource, &event.resource_id],
                ["hook-ingest", "malformed_input", "hook_input", "unknown"]
            );
            assert_eq!(event.payload["raw"], json!(String::from_utf8_lossy(input)));
            assert_eq!(event.payload["error"], json!(warning));
        }
    }

    #[test]
    fn empty_input_stores_nothing() {
        for input in [&b""[..], b"  \n\t"] {
            let prepared = prepare(input, input.len() as u64, at());
            assert_eq!(
                prepared,
                Prepared { event: None, warning: Some("empty input; nothing stored".into()) }
            );
        }
    }

    #[test]
    fn oversized_input_keeps_a_prefix_and_is_read_to_the_end() {
        let mut input = br#"{"hook_event_name":"PostToolUse","tool_response":""#.to_vec();
        input.resize(MAX_INPUT + 1000, b'x');
        let reader = io::Cursor::new(input.clone());
        let prepared = read_input(reader, at());
        let event = prepared.event.unwrap();
        assert_eq!(event.action, "malformed_input");
        assert_eq!(event.payload["raw"].as_str().unwrap().len(), RAW_PREFIX);
        assert_eq!(event.payload["bytes"], json!(MAX_INPUT + 1000));
        let warning = prepared.warning.unwrap();
        assert_eq!(warning, "input of 16778216 bytes is over the 16 MiB limit; kept its first 64 KiB");
        // Exactly at the limit is still an input.
        let mut input = br#"{"hook_event_name":"Stop","pad":""#.to_vec();
        input.resize(MAX_INPUT - 2, b'x');
        input.extend_from_slice(b"\"}");
        let prepared = read_input(io::Cursor::new(input), at());
        assert_eq!(prepared.warning, None);
        assert_eq!(prepared.event.unwrap().action, "response_completed");
    }

    #[test]
    fn stored_values_are_acceptable_to_postgres() {
        let long = "t".repeat(300);
        let input = json!({
            "hook_event_name": "PreToolUse", "tool_name": long,
            "tool_response": {"stdout": "a\u{0}b", "k\u{0}": ["\u{0}"]},
        });
        let bytes = serde_json::to_vec(&input).unwrap();
        let event = prepare(&bytes, bytes.len() as u64, at()).event.unwrap();
        assert_eq!(event.resource_id.chars().count(), 255);
        assert_eq!(
            event.payload["tool_response"],
            json!({"stdout": "a\u{FFFD}b", "k\u{FFFD}": ["\u{FFFD}"]})
        );
        assert_eq!(event.payload["tool_name"], json!(long), "the payload keeps the whole name");
    }

    #[test]
    fn snake_case_names() {
        for (name, expected) in [
            ("SubagentStop", "subagent_stop"),
            ("PreCompact", "pre_compact"),
            ("Notification", "notification"),
            ("PostToolUseFailure", "post_tool_use_failure"),
            ("HTTPRequest", "http_request"),
            ("Step2Done", "step2_done"),
            ("already_snake", "already_snake"),
            ("with space-and.dots", "with_space_and_dots"),
            ("", ""),
        ] {
            assert_eq!(snake_case(name), expected, "{name}");
        }
    }
}
