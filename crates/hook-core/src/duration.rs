//! Durations as people type them in flags and variables, parsed the same way by every binary.

use std::time::Duration;

/// The units, longest names first within each, and their length in seconds.
const UNITS: &[(&[&str], f64)] = &[
    (&["ms", "msec", "msecs", "millisecond", "milliseconds"], 0.001),
    (&["s", "sec", "secs", "second", "seconds"], 1.0),
    (&["m", "min", "mins", "minute", "minutes"], 60.0),
    (&["h", "hr", "hrs", "hour", "hours"], 3_600.0),
    (&["d", "day", "days"], 86_400.0),
    (&["w", "week", "weeks"], 604_800.0),
];

/// Parses a duration: a non-negative number of seconds (`30`, `1.5`), or a number with a unit:
/// `ms`, `s`, `m`, `h`, `d` or `w` (`250ms`, `90m`, `12h`, `30d`, `2w`; the unit's long names and
/// a space before it are accepted too, as in `30 days`). Every binary of hook-events reads
/// durations with this, so `30` means thirty seconds everywhere.
///
/// ```
/// use std::time::Duration;
/// use hook_core::parse_duration;
/// assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
/// assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
/// assert!(parse_duration("soon").unwrap_err().contains("is not a duration"));
/// ```
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    let not_a_duration = || {
        format!(
            "{trimmed:?} is not a duration: use seconds (30, 1.5) or a number with a unit \
             (250ms, 30s, 5m, 12h, 30d, 2w)"
        )
    };
    let split = trimmed.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let unit = unit.trim_start().to_ascii_lowercase();
    let scale = if unit.is_empty() {
        1.0
    } else {
        UNITS
            .iter()
            .find(|(names, _)| names.contains(&unit.as_str()))
            .map(|(_, seconds)| *seconds)
            .ok_or_else(not_a_duration)?
    };
    if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
        return Err(not_a_duration());
    }
    let value: f64 = number.parse().map_err(|_| not_a_duration())?;
    Duration::try_from_secs_f64(value * scale).map_err(|_| format!("{trimmed:?} is too long a duration"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_people_type() {
        for (text, ms) in [
            ("30", 30_000),
            ("1.0", 1_000),
            ("0.25", 250),
            ("0", 0),
            ("250ms", 250),
            ("2s", 2_000),
            ("5m", 300_000),
            ("90m", 5_400_000),
            ("1h", 3_600_000),
            ("1.5h", 5_400_000),
            ("7d", 604_800_000),
            ("2w", 1_209_600_000),
            (" 30 days ", 2_592_000_000),
            ("10 Minutes", 600_000),
        ] {
            assert_eq!(parse_duration(text).map(|d| d.as_millis()), Ok(ms), "{text}");
        }
        for bad in ["", "x", "-1", "-1d", "d", "1y", "NaN", "inf", "1.5.2s", ".5", "5.", "1e3", "30 dayz"] {
            let error = parse_duration(bad).unwrap_err();
            assert!(error.contains("is not a duration"), "{bad}: {error}");
        }
        assert!(parse_duration("99999999999999999999999w").unwrap_err().contains("too long"));
    }
}
