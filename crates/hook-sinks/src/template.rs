//! Templates: a NATS subject (`hooks.{source}.{action}`) or the strings of a webhook body, with
//! placeholders filled from the event.
//!
//! A placeholder is a field name in braces; `{{` and `}}` stand for literal braces. The names:
//!
//! | placeholder | value |
//! |---|---|
//! | `{id}` | the event id (a UUID) |
//! | `{source}`, `{action}`, `{resource}`, `{resource_id}` | the columns |
//! | `{session_id}` | `metadata.session_id`, else `payload.session_id`, else empty |
//! | `{created_at}` | RFC 3339 |
//! | `{attempt}` | 1 on the first attempt, 2 on the first retry, ... |
//! | `{payload}`, `{metadata}`, `{event}` | the JSON value (the whole event for `{event}`); compact JSON text inside a longer string |

use std::fmt;
use std::fmt::Write as _;

use hook_core::HookEvent;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;

/// A field an event can fill in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// `{id}`.
    Id,
    /// `{source}`.
    Source,
    /// `{action}`.
    Action,
    /// `{resource}`.
    Resource,
    /// `{resource_id}`.
    ResourceId,
    /// `{session_id}`.
    SessionId,
    /// `{created_at}`.
    CreatedAt,
    /// `{attempt}`.
    Attempt,
    /// `{payload}`.
    Payload,
    /// `{metadata}`.
    Metadata,
    /// `{event}`.
    Event,
}

/// Every placeholder name, as written between braces.
pub const FIELD_NAMES: &[&str] = &[
    "id",
    "source",
    "action",
    "resource",
    "resource_id",
    "session_id",
    "created_at",
    "attempt",
    "payload",
    "metadata",
    "event",
];

impl Field {
    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "id" => Field::Id,
            "source" => Field::Source,
            "action" => Field::Action,
            "resource" => Field::Resource,
            "resource_id" => Field::ResourceId,
            "session_id" => Field::SessionId,
            "created_at" => Field::CreatedAt,
            "attempt" => Field::Attempt,
            "payload" => Field::Payload,
            "metadata" => Field::Metadata,
            "event" => Field::Event,
            _ => return None,
        })
    }

    /// The field's value as JSON.
    pub fn value(self, event: &HookEvent) -> Value {
        match self {
            Field::Payload => event.payload.clone(),
            Field::Metadata => event.metadata.clone(),
            Field::Event => serde_json::to_value(event).unwrap_or(Value::Null),
            Field::Attempt => Value::from(event.retry_count.saturating_add(1)),
            _ => Value::String(self.text(event)),
        }
    }

    /// The field's value as text (compact JSON for the JSON-valued fields).
    pub fn text(self, event: &HookEvent) -> String {
        match self {
            Field::Id => event.id.to_string(),
            Field::Source => event.source.clone(),
            Field::Action => event.action.clone(),
            Field::Resource => event.resource.clone(),
            Field::ResourceId => event.resource_id.clone(),
            Field::SessionId => session_id(event).unwrap_or_default().to_owned(),
            Field::CreatedAt => event.created_at.format(&Rfc3339).unwrap_or_default(),
            Field::Attempt => event.retry_count.saturating_add(1).to_string(),
            Field::Payload | Field::Metadata | Field::Event => self.value(event).to_string(),
        }
    }
}

/// The session an event belongs to: `metadata.session_id` (what `hook-ingest` writes), else
/// `payload.session_id` (the hook's own input).
pub fn session_id(event: &HookEvent) -> Option<&str> {
    [&event.metadata, &event.payload]
        .into_iter()
        .find_map(|v| v.get("session_id").and_then(Value::as_str).filter(|s| !s.is_empty()))
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(Field),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

/// Why a template does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError(pub String);

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TemplateError {}

impl Template {
    /// Parses `text`; an unknown placeholder or an unmatched brace is an error.
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => {
                                return Err(TemplateError(format!("unclosed '{{' in template {text:?}")));
                            }
                        }
                    }
                    let field = Field::from_name(name.trim()).ok_or_else(|| {
                        TemplateError(format!(
                            "unknown placeholder {{{name}}} in template {text:?} (known: {})",
                            FIELD_NAMES.iter().map(|n| format!("{{{n}}}")).collect::<Vec<_>>().join(", ")
                        ))
                    })?;
                    if !literal.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Field(field));
                }
                '}' => {
                    return Err(TemplateError(format!(
                        "unmatched '}}' in template {text:?} (write '}}}}' for a literal brace)"
                    )))
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Text(literal));
        }
        Ok(Self { source: text.to_owned(), parts })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the template has no placeholder.
    pub fn is_constant(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Text(_)))
    }

    /// The fields it uses, in order.
    pub fn fields(&self) -> impl Iterator<Item = Field> + '_ {
        self.parts.iter().filter_map(|p| match p {
            Part::Field(f) => Some(*f),
            Part::Text(_) => None,
        })
    }

    /// Fills in the placeholders, each value passed through `escape`.
    pub fn render_with(&self, event: &HookEvent, escape: impl Fn(&str, &mut String)) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Field(field) => escape(&field.text(event), &mut out),
            }
        }
        out
    }

    /// Fills in the placeholders as they are.
    pub fn render(&self, event: &HookEvent) -> String {
        self.render_with(event, |value, out| out.push_str(value))
    }

    /// Renders as a JSON value: a template that is exactly one placeholder gives that field's
    /// JSON value (`{payload}` stays an object, `{attempt}` a number); anything else a string.
    pub fn render_json(&self, event: &HookEvent) -> Value {
        match self.parts.as_slice() {
            [Part::Field(field)] => field.value(event),
            _ => Value::String(self.render(event)),
        }
    }

    /// Renders as a NATS subject: each filled-in value becomes one subject token, with every
    /// character outside `A-Z a-z 0-9 _ -` replaced by `_` (a `.` would add a token, `*` and `>`
    /// are wildcards, spaces are not allowed) and an empty value written `_`.
    pub fn render_subject(&self, event: &HookEvent) -> String {
        self.render_with(event, |value, out| {
            if value.is_empty() {
                out.push('_');
            }
            for c in value.chars() {
                out.push(if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' });
            }
        })
    }

    /// The subject filter matching every subject this template renders: each token holding a
    /// placeholder becomes `*` (e.g. `hooks.{source}.{action}` → `hooks.*.*`).
    pub fn subject_filter(&self) -> String {
        let mut out = String::new();
        let tokens = self.source.split('.');
        for (i, token) in tokens.enumerate() {
            if i > 0 {
                out.push('.');
            }
            let templated = Template::parse(token).map(|t| !t.is_constant()).unwrap_or(true);
            if templated {
                out.push('*');
            } else {
                let _ = write!(out, "{}", token.replace("{{", "{").replace("}}", "}"));
            }
        }
        out
    }
}

/// Checks that a subject template renders valid subjects: non-empty tokens, no spaces or
/// wildcards in its literal text.
pub fn check_subject(template: &Template) -> Result<(), TemplateError> {
    let text = template.as_str();
    if text.is_empty() {
        return Err(TemplateError("the subject is empty".into()));
    }
    for token in text.split('.') {
        if token.is_empty() {
            return Err(TemplateError(format!(
                "subject {text:?} has an empty token (two dots, or a dot at an end)"
            )));
        }
        let literal: String = Template::parse(token)
            .map(|t| {
                t.parts
                    .iter()
                    .filter_map(|p| if let Part::Text(s) = p { Some(s.clone()) } else { None })
                    .collect()
            })
            .unwrap_or_default();
        if literal.chars().any(|c| c.is_whitespace() || c == '*' || c == '>') {
            return Err(TemplateError(format!(
                "subject {text:?}: token {token:?} holds a space or a wildcard (* or >)"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn event() -> HookEvent {
        HookEvent {
            id: uuid::Uuid::nil(),
            source: "PreToolUse".into(),
            action: "tool.invocation *x".into(),
            resource: "tool".into(),
            resource_id: "Bash".into(),
            payload: serde_json::json!({"tool_name": "Bash", "session_id": "p-1"}),
            metadata: serde_json::json!({"session_id": "s-1"}),
            processed: false,
            processing_errors: None,
            retry_count: 2,
            created_at: time::OffsetDateTime::UNIX_EPOCH,
            processed_at: None,
        }
    }

    #[test]
    fn placeholders_and_escapes() {
        let t = Template::parse("{{x}} {source}/{resource_id} #{attempt} {session_id}").unwrap();
        assert_eq!(t.render(&event()), "{x} PreToolUse/Bash #3 s-1");
        assert!(Template::parse("{nope}").unwrap_err().0.contains("unknown placeholder {nope}"));
        assert!(Template::parse("{source").unwrap_err().0.contains("unclosed"));
        assert!(Template::parse("a}b").unwrap_err().0.contains("unmatched"));
    }

    #[test]
    fn json_values() {
        assert_eq!(Template::parse("{payload}").unwrap().render_json(&event())["tool_name"], "Bash");
        assert_eq!(Template::parse("{attempt}").unwrap().render_json(&event()), 3);
        assert_eq!(Template::parse("n={attempt}").unwrap().render_json(&event()), "n=3");
    }

    #[test]
    fn subjects_are_sanitized_token_by_token() {
        let t = Template::parse("hooks.{source}.{action}").unwrap();
        assert_eq!(t.render_subject(&event()), "hooks.PreToolUse.tool_invocation__x");
        assert_eq!(t.subject_filter(), "hooks.*.*");
        assert!(check_subject(&t).is_ok());
        assert!(check_subject(&Template::parse("hooks..x").unwrap()).is_err());
        assert!(check_subject(&Template::parse("hooks.*").unwrap()).is_err());
        let mut e = event();
        e.source = String::new();
        assert_eq!(t.render_subject(&e), "hooks._.tool_invocation__x");
    }
}
