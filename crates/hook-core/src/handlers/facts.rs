//! Facts shared by several handlers, and the lookups they are read with.
//!
//! Every function here is total: any JSON value, of any shape, gives an answer (`None` when the
//! fact is not there).

use serde_json::Value;

use crate::event::HookEvent;

/// The longest `target` kept, in characters; a longer one is cut and ends with `…`.
pub(super) const MAX_TARGET_CHARS: usize = 200;

/// The longest error or notification text kept, in characters; a longer one is cut and ends with `…`.
pub(super) const MAX_TEXT_CHARS: usize = 500;

/// The longest agent name read from an `@agent-<name>` mention, in characters.
const MAX_AGENT_CHARS: usize = 100;

/// The longest slash command recognised, in characters after the `/`.
const MAX_COMMAND_CHARS: usize = 64;

/// The keys of `tool_input` that say what a tool call acts on, by precedence: files (`Read`,
/// `Write`, `Edit`, `MultiEdit`, `NotebookEdit`), then `Bash`'s command, `WebFetch`'s URL,
/// `WebSearch`'s query, `Grep`'s and `Glob`'s pattern, a directory (`LS`, or a search's `path`),
/// and the `Task` tool's description. Never `prompt` or `content`: those are text, not targets.
const TARGET_KEYS: &[&str] =
    &["file_path", "notebook_path", "command", "url", "query", "pattern", "path", "description"];

// ---------------------------------------------------------------------------------------------
// Facts
// ---------------------------------------------------------------------------------------------

/// The tool's name, or `"unknown"` as in the seed.
pub(super) fn tool_name(event: &HookEvent) -> &str {
    either(event, &["tool_name"], str_at).unwrap_or("unknown")
}

/// The file a tool touched: the producer's top-level `file_path`, else Claude Code's
/// `tool_input.file_path` / `tool_input.notebook_path`, else `tool_response.filePath`.
pub(super) fn file_path(event: &HookEvent) -> Option<&str> {
    const PATHS: &[&[&str]] = &[
        &["file_path"],
        &["tool_input", "file_path"],
        &["tool_input", "notebook_path"],
        &["tool_response", "filePath"],
    ];
    PATHS.iter().find_map(|path| str_at(&event.payload, path))
}

/// What a tool call acts on, in one line for a person: the first non-blank of
/// [`TARGET_KEYS`] in `tool_input`, else [`file_path`]; at most [`MAX_TARGET_CHARS`] characters.
pub(super) fn target(event: &HookEvent) -> Option<String> {
    let input = value_at(&event.payload, &["tool_input"]);
    let from_input =
        || TARGET_KEYS.iter().find_map(|key| str_at(input?, &[*key]).filter(|text| !text.trim().is_empty()));
    from_input().or_else(|| file_path(event)).map(|text| cut(text, MAX_TARGET_CHARS))
}

/// The session the event belongs to: the payload's `session_id`, else the `resource_id` of a
/// row whose `resource` is `session` (`unknown` there is `hook-ingest`'s placeholder, not an
/// id), else the metadata's `session_id`. Empty strings do not count.
pub(super) fn session_id(event: &HookEvent) -> Option<&str> {
    let from_resource = || {
        (event.resource == "session")
            .then_some(event.resource_id.as_str())
            .filter(|id| known(id) && *id != "unknown")
    };
    str_at(&event.payload, &["session_id"])
        .filter(known)
        .or_else(from_resource)
        .or_else(|| str_at(&event.metadata, &["session_id"]).filter(known))
}

/// Whether `text` is a usable value: not empty, not only blanks.
pub(super) fn known(text: &&str) -> bool {
    !text.trim().is_empty()
}

/// Whether the payload is Claude Code's input of the hook `name` (its `hook_event_name`).
pub(super) fn is_hook_input(event: &HookEvent, name: &str) -> bool {
    str_at(&event.payload, &["hook_event_name"]) == Some(name)
}

/// How a tool call that completed turned out, read from its response.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Outcome {
    /// Whether the call succeeded; `None` without a response to judge by.
    pub(super) success: Option<bool>,
    /// Why it did not, when the response says.
    pub(super) error: Option<String>,
    /// The response's own `interrupted` flag (`Bash`: cut off by its timeout or the user).
    pub(super) interrupted: Option<bool>,
}

/// The outcome of a `PostToolUse`, from Claude Code's `tool_response` (else the producer's
/// `tool_output`). Claude Code runs `PostToolUse` for a call that completed, so a response is a
/// success unless it says otherwise: `success: false`, `is_error`/`isError: true` (MCP tools),
/// `interrupted: true` (`Bash`), or a non-empty `error`.
pub(super) fn tool_outcome(event: &HookEvent) -> Outcome {
    let Some(response) =
        value_at(&event.payload, &["tool_response"]).or_else(|| value_at(&event.payload, &["tool_output"]))
    else {
        return Outcome::default();
    };
    let interrupted = bool_at(response, &["interrupted"]);
    let flagged =
        bool_at(response, &["is_error"]) == Some(true) || bool_at(response, &["isError"]) == Some(true);
    let error_text = str_at(response, &["error"]).filter(known);
    let success = bool_at(response, &["success"])
        .unwrap_or(!(flagged || interrupted == Some(true) || error_text.is_some()));
    let error = (!success)
        .then(|| {
            error_text
                .or_else(|| str_at(response, &["stderr"]).filter(known))
                .or_else(|| first_text(response).filter(known))
                .map(|text| cut(text, MAX_TEXT_CHARS))
                .or_else(|| (interrupted == Some(true)).then(|| "interrupted".to_owned()))
        })
        .flatten();
    Outcome { success: Some(success), error, interrupted }
}

/// The first `content[].text` of an MCP tool result.
fn first_text(response: &Value) -> Option<&str> {
    value_at(response, &["content"])?.as_array()?.iter().find_map(|item| str_at(item, &["text"]))
}

/// The agent a prompt names with Claude Code's `@agent-<name>` mention, as `agent-<name>` (the
/// form the original producer reported), if the prompt has one. A mention starts the prompt or
/// follows a character that is not part of a word (so `me@agent-x.com` is not one).
pub(super) fn agent_mention(prompt: &str) -> Option<String> {
    const MARK: &str = "@agent-";
    let mut rest = prompt;
    let mut offset = 0;
    while let Some(found) = rest.find(MARK) {
        let at = offset + found;
        let before = prompt[..at].chars().next_back();
        let after = &prompt[at + MARK.len()..];
        let name: String = after
            .chars()
            .take_while(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ':' | '.'))
            .take(MAX_AGENT_CHARS)
            .collect();
        let name = name.trim_end_matches(['.', ':', '-']);
        if !before.is_some_and(|c| c.is_alphanumeric() || c == '_') && !name.is_empty() {
            return Some(format!("agent-{name}"));
        }
        offset = at + MARK.len();
        rest = &prompt[offset..];
    }
    None
}

/// The slash command a prompt starts with (`/review`, `/compact`, `/my-plugin:deploy`), without
/// its arguments; `None` when the prompt does not start with one (a path such as `/home/x` is
/// not a command).
pub(super) fn slash_command(prompt: &str) -> Option<&str> {
    let word = prompt.split_whitespace().next()?;
    let name = word.strip_prefix('/')?;
    let valid = !name.is_empty()
        && name.chars().count() <= MAX_COMMAND_CHARS
        && name.chars().all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ':'));
    valid.then_some(word)
}

/// `text` cut to `max` characters, with `…` appended when it was longer.
pub(super) fn cut(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Lookups: total functions over any JSON value
// ---------------------------------------------------------------------------------------------

/// Reads `path` from the payload, else from the metadata.
pub(super) fn either<'a, T>(
    event: &'a HookEvent,
    path: &[&str],
    read: fn(&'a Value, &[&str]) -> Option<T>,
) -> Option<T> {
    read(&event.payload, path).or_else(|| read(&event.metadata, path))
}

/// The value at `path` through nested objects; `None` when a step is missing or not an object,
/// or when the value is `null`.
pub(super) fn value_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(value, |value, key| value.as_object()?.get(*key)).filter(|value| !value.is_null())
}

/// The string at `path`, only if it is a string.
pub(super) fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    value_at(value, path)?.as_str()
}

/// The boolean at `path`, only if it is a boolean.
pub(super) fn bool_at(value: &Value, path: &[&str]) -> Option<bool> {
    value_at(value, path)?.as_bool()
}

/// The non-negative integer at `path`, only if it is one.
pub(super) fn u64_at(value: &Value, path: &[&str]) -> Option<u64> {
    value_at(value, path)?.as_u64()
}

/// The length of the array at `path`, only if it is an array.
pub(super) fn len_at(value: &Value, path: &[&str]) -> Option<u64> {
    let len = value_at(value, path)?.as_array()?.len();
    u64::try_from(len).ok()
}

/// The finite number at `path`, given as a JSON number or as a string that parses as one
/// (producers wrote confidences both ways).
pub(super) fn number_at(value: &Value, path: &[&str]) -> Option<f64> {
    let number = match value_at(value, path)? {
        Value::Number(number) => number.as_f64(),
        Value::String(text) => text.trim().parse::<f64>().ok(),
        _ => None,
    }?;
    number.is_finite().then_some(number)
}
