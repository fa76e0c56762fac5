//! Flags and environment, parsed and checked here, turned into hook-store's [`ReplayFilter`].

use std::io::Read;

use clap::Parser;
use hook_store::replay::{ReplayFilter, ReplayOptions};
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{Date, OffsetDateTime};
use uuid::Uuid;

use hook_cli::UsageError;
use hook_cli::{parse_duration, DatabaseFlags};

/// Re-queues failed and dead hook events so that processors handle them again.
///
/// By default it selects events that failed at least once and are not processed (retrying or
/// dead); --include-processed adds events that succeeded. The other filters narrow that down and
/// combine with AND. Re-queuing resets retry_count, clears the dead mark and the retry schedule,
/// keeps the old errors unless --clear-errors, and appends an entry to the event's `replays`
/// history. It works in short batches that skip events a processor holds, so it is safe while
/// processors run; they are woken when each batch commits.
///
/// Exit status: 0 done or nothing to do, 1 failed, 2 bad usage.
#[derive(Debug, Parser)]
#[command(name = "hook-replay", version, about, long_about)]
pub(crate) struct Args {
    #[command(flatten)]
    pub(crate) database: DatabaseFlags,

    /// Only events of this source (repeatable: any of them).
    #[arg(long, value_name = "SOURCE")]
    source: Vec<String>,

    /// Only events of this action (repeatable: any of them).
    #[arg(long, value_name = "ACTION")]
    action: Vec<String>,

    /// Only events created at or after this time: RFC 3339 (2025-10-19T18:00:00Z), a date
    /// (2025-10-19, UTC), or an age (90m, 12h, 7d: that long ago; a bare number is seconds, as in
    /// every duration of hook-events).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    since: Option<OffsetDateTime>,

    /// Only events created before this time (same forms as --since).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    until: Option<OffsetDateTime>,

    /// Only this event (repeatable). `--id -` reads ids from standard input, separated by
    /// whitespace or commas.
    #[arg(long, value_name = "UUID", value_parser = parse_id)]
    id: Vec<IdArg>,

    /// Also re-run events that were processed successfully.
    #[arg(long)]
    pub(crate) include_processed: bool,

    /// Drop the old errors (processing_errors) instead of keeping them.
    #[arg(long)]
    clear_errors: bool,

    /// Only show how many events would be re-queued, by source and action, and a few ids.
    #[arg(long)]
    pub(crate) dry_run: bool,

    /// Events per batch; each batch is one short transaction.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    batch_size: u32,

    /// Log level or filter (error, warn, info, debug, trace, or tracing directives).
    #[arg(long, env = "LOG_LEVEL", default_value = "warn")]
    pub(crate) log_level: String,
}

/// One `--id` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdArg {
    /// `-`: read ids from standard input.
    Stdin,
    /// An event id.
    Id(Uuid),
}

fn parse_id(text: &str) -> Result<IdArg, String> {
    if text == "-" {
        return Ok(IdArg::Stdin);
    }
    text.parse().map(IdArg::Id).map_err(|_| format!("{text:?} is not an event id (a UUID) or -"))
}

/// Parses an RFC 3339 time, a date (midnight UTC) or an age ("12h": that long before now).
fn parse_time(text: &str) -> Result<OffsetDateTime, String> {
    let text = text.trim();
    if let Ok(time) = OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(time);
    }
    if let Ok(date) = Date::parse(text, format_description!("[year]-[month]-[day]")) {
        return Ok(date.midnight().assume_utc());
    }
    let age = parse_duration(text).map_err(|_| {
        format!("{text:?} is not a time: use RFC 3339 (2025-10-19T18:00:00Z), a date (2025-10-19) or an age (12h, 7d)")
    })?;
    Ok(OffsetDateTime::now_utc() - age)
}

impl Args {
    /// The filter the flags describe, reading ids from standard input for `--id -`.
    pub(crate) fn filter(&self) -> Result<ReplayFilter, UsageError> {
        if let (Some(since), Some(until)) = (self.since, self.until) {
            if since >= until {
                return Err(UsageError("--since must be before --until".into()));
            }
        }
        let mut ids = Vec::new();
        for id in &self.id {
            match id {
                IdArg::Id(id) => ids.push(*id),
                IdArg::Stdin => ids.extend(read_ids(std::io::stdin().lock())?),
            }
        }
        if self.id.contains(&IdArg::Stdin) && ids.is_empty() {
            return Err(UsageError("--id -: standard input held no event id".into()));
        }
        ids.sort_unstable();
        ids.dedup();
        Ok(ReplayFilter {
            sources: self.source.clone(),
            actions: self.action.clone(),
            since: self.since,
            until: self.until,
            ids,
            include_processed: self.include_processed,
        })
    }

    pub(crate) fn options(&self) -> ReplayOptions {
        ReplayOptions { batch_size: self.batch_size as usize, clear_errors: self.clear_errors }
    }
}

/// Reads event ids separated by whitespace or commas.
fn read_ids(mut input: impl Read) -> Result<Vec<Uuid>, UsageError> {
    let mut text = String::new();
    input
        .read_to_string(&mut text)
        .map_err(|e| UsageError(format!("--id -: reading standard input: {e}")))?;
    text.split(|c: char| c.is_whitespace() || c == ',')
        .filter(|token| !token.is_empty())
        .map(|token| {
            token.parse().map_err(|_| {
                UsageError(format!("--id -: {token:?} on standard input is not an event id (a UUID)"))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("hook-replay").chain(argv.iter().copied()))
    }

    #[test]
    fn ages_and_times() {
        for bad in ["", "h", "-1d", "3y"] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
        let ago = |text: &str| (OffsetDateTime::now_utc() - parse_time(text).unwrap()).whole_seconds();
        assert!((ago("90") - 90).abs() < 60, "a bare number is seconds, as everywhere");
        assert!((ago("1.5h") - 5_400).abs() < 60);
        assert_eq!(parse_time("2025-10-19").unwrap().unix_timestamp(), 1_760_832_000);
        assert_eq!(parse_time("2025-10-19T00:00:00+02:00").unwrap().unix_timestamp(), 1_760_824_800);
        let ago = OffsetDateTime::now_utc() - parse_time("2h").unwrap();
        assert!((ago.whole_seconds() - 7_200).abs() < 60);
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn ids_from_flags_and_input() {
        let id = Uuid::new_v4();
        let args = parse(&["--id", &id.to_string(), "--source", "A", "--source", "B"]).unwrap();
        let filter = args.filter().unwrap();
        assert_eq!(filter.ids, vec![id]);
        assert_eq!(filter.sources, ["A", "B"]);
        assert!(parse(&["--id", "nope"]).is_err());
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let read = read_ids(format!("{a}\n {b},{a}\n\n").as_bytes()).unwrap();
        assert_eq!(read, vec![a, b, a]);
        let bad = read_ids(format!("{a}\nnot-a-uuid\n").as_bytes()).unwrap_err();
        assert!(bad.0.contains("\"not-a-uuid\""), "{}", bad.0);
    }

    #[test]
    fn since_must_precede_until() {
        let args = parse(&["--since", "2025-10-20", "--until", "2025-10-19"]).unwrap();
        assert!(args.filter().is_err());
        assert!(parse(&["--batch-size", "0"]).is_err());
    }
}
