//! Text as the console shows it: invisible Unicode made visible, JSON indented (even when cut),
//! times and durations in one format.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::time::Duration;

use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, PrimitiveDateTime, UtcOffset};

/// Characters that would hide or reorder text on the page: C0/C1 controls (but newline and tab),
/// bidirectional embeddings, overrides and isolates, zero-width characters, the byte-order mark,
/// interlinear annotations and tag characters.
fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{0}'..='\u{8}' | '\u{b}'..='\u{1f}' | '\u{7f}'..='\u{9f}'
        | '\u{ad}' | '\u{61c}' | '\u{180e}'
        | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{206f}'
        | '\u{feff}' | '\u{fff9}'..='\u{fffb}' | '\u{e0000}'..='\u{e007f}')
}

/// `text` with every invisible or direction-changing character replaced by its code point in
/// brackets (`⟦U+202E⟧`), so a value cannot hide or reorder what the page shows. HTML escaping is
/// maud's, on top of this.
pub(crate) fn shown(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_invisible) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if is_invisible(c) {
            let _ = write!(out, "⟦U+{:04X}⟧", u32::from(c));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `text` cut to `max` characters, with "…" when cut.
pub(crate) fn cut(text: &str, max: usize) -> Cow<'_, str> {
    match text.char_indices().nth(max) {
        Some((at, _)) => Cow::Owned(format!("{}…", &text[..at])),
        None => Cow::Borrowed(text),
    }
}

/// PostgreSQL's `jsonb` text (`{"a": 1, "b": [1, 2]}`), indented by two spaces per level. Works
/// on a prefix too (a cut payload): it only tracks strings and brackets, never parses.
pub(crate) fn pretty_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 4);
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut chars = text.chars().peekable();
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        for _ in 0..depth {
            out.push_str("  ");
        }
    };
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                out.push(c);
                let closing = if c == '{' { '}' } else { ']' };
                if chars.peek() == Some(&closing) {
                    if let Some(close) = chars.next() {
                        out.push(close);
                    }
                } else {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(',');
                newline(&mut out, depth);
                if chars.peek() == Some(&' ') {
                    chars.next();
                }
            }
            ' ' | '\n' | '\t' | '\r' => {}
            ':' => out.push_str(": "),
            other => out.push(other),
        }
    }
    out
}

/// `2024-05-01 12:34:56.789 UTC`.
pub(crate) fn time(at: OffsetDateTime) -> String {
    let at = at.to_offset(UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:03} UTC",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.millisecond()
    )
}

/// A time typed in a filter: `2024-05-01T12:34[:56]` (a `datetime-local` input, taken as UTC),
/// `2024-05-01 12:34[:56]`, `2024-05-01`, or RFC 3339.
pub(crate) fn parse_time(text: &str) -> Option<OffsetDateTime> {
    let text = text.trim();
    if let Ok(at) = OffsetDateTime::parse(text, &Rfc3339) {
        return Some(at);
    }
    let text = text.replacen(' ', "T", 1);
    let formats = [
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]"),
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]"),
    ];
    for format in formats {
        if let Ok(at) = PrimitiveDateTime::parse(&text, format) {
            return Some(at.assume_utc());
        }
    }
    let date = time::Date::parse(&text, time::macros::format_description!("[year]-[month]-[day]")).ok()?;
    Some(date.midnight().assume_utc())
}

/// `850 ms`, `12.3 s`, `4 min 05 s`, `2 h 03 min`, `3 d 04 h`.
pub(crate) fn duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    let whole = d.as_secs();
    if s < 1.0 {
        format!("{} ms", d.as_millis())
    } else if s < 60.0 {
        format!("{s:.1} s")
    } else if whole < 3600 {
        format!("{} min {:02} s", whole / 60, whole % 60)
    } else if whole < 86_400 {
        format!("{} h {:02} min", whole / 3600, (whole % 3600) / 60)
    } else {
        format!("{} d {:02} h", whole / 86_400, (whole % 86_400) / 3600)
    }
}

/// The duration from `from` to `to` (zero when negative).
pub(crate) fn between(from: OffsetDateTime, to: OffsetDateTime) -> Duration {
    Duration::try_from(to - from).unwrap_or(Duration::ZERO)
}

/// `1234567` → `1,234,567`.
pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `1536` → `1.5 KiB`.
pub(crate) fn size(n: i64) -> String {
    let n = n.max(0) as f64;
    if n < 1024.0 {
        format!("{n} B")
    } else if n < 1024.0 * 1024.0 {
        format!("{:.1} KiB", n / 1024.0)
    } else {
        format!("{:.1} MiB", n / (1024.0 * 1024.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invisible_characters_are_shown_as_code_points() {
        assert!(matches!(shown("plain <b>"), Cow::Borrowed("plain <b>")));
        assert_eq!(shown("a\u{202e}b\u{200b}c\u{0}"), "a⟦U+202E⟧b⟦U+200B⟧c⟦U+0000⟧");
        assert_eq!(shown("line\nnext\ttab"), "line\nnext\ttab");
        assert_eq!(shown("emoji 🦀 é"), "emoji 🦀 é");
    }

    #[test]
    fn json_is_indented_even_when_cut() {
        assert_eq!(
            pretty_json(r#"{"a": 1, "b": [1, 2], "c": {}}"#),
            "{\n  \"a\": 1,\n  \"b\": [\n    1,\n    2\n  ],\n  \"c\": {}\n}"
        );
        assert_eq!(pretty_json(r#"{"s": "x, {y}: \"z\""}"#), "{\n  \"s\": \"x, {y}: \\\"z\\\"\"\n}");
        assert_eq!(
            pretty_json(r#"{"a": [1, {"b": "unterminated"#),
            "{\n  \"a\": [\n    1,\n    {\n      \"b\": \"unterminated"
        );
        assert_eq!(pretty_json("[]"), "[]");
    }

    #[test]
    fn times_parse_and_format() {
        let at = parse_time("2024-05-01T12:34").unwrap();
        assert_eq!(time(at), "2024-05-01 12:34:00.000 UTC");
        assert_eq!(parse_time("2024-05-01 12:34:56"), parse_time("2024-05-01T12:34:56Z"));
        assert_eq!(parse_time("2024-05-01").map(time).as_deref(), Some("2024-05-01 00:00:00.000 UTC"));
        assert_eq!(parse_time("yesterday"), None);
    }

    #[test]
    fn numbers_and_durations() {
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(12), "12");
        assert_eq!(duration(Duration::from_millis(850)), "850 ms");
        assert_eq!(duration(Duration::from_secs(245)), "4 min 05 s");
        assert_eq!(duration(Duration::from_secs(7380)), "2 h 03 min");
        assert_eq!(size(20 * 1024 * 1024), "20.0 MiB");
        assert_eq!(cut("abcdef", 3), "abc…");
        assert_eq!(cut("abc", 3), "abc");
    }
}
