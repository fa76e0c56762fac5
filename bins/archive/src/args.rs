//! Flags and environment, parsed and checked here, turned into hook-store's [`ArchiveOptions`].

use std::time::Duration;

use clap::Parser;
use hook_store::archive::ArchiveOptions;

use hook_cli::{parse_duration, DatabaseFlags};

/// Moves processed hook events older than --older-than from hook_events into
/// hook_events_archive, in batches of one statement each, so that a run killed at any moment
/// neither loses nor duplicates a row. Pending, retrying and dead events are never moved.
///
/// Only one run works on a database at a time: a run that finds another one running says so and
/// exits 0, so overlapping cron or timer runs are harmless. Prints a one-line summary (rows moved,
/// batches, seconds).
///
/// Exit status: 0 done or nothing to do (or another run busy), 1 failed, 2 bad usage.
#[derive(Debug, Parser)]
#[command(name = "hook-archive", version, about, long_about)]
pub(crate) struct Args {
    #[command(flatten)]
    pub(crate) database: DatabaseFlags,

    /// Move events processed longer ago than this (processed_at): a number with a unit, s, m, h,
    /// d or w (90m, 12h, 30d); a bare number is seconds, as in every duration of hook-events.
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    older_than: Duration,

    /// Rows per batch; each batch is one statement, and its own transaction.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    batch_size: u32,

    /// Only show how many rows would be moved (and purged).
    #[arg(long)]
    pub(crate) dry_run: bool,

    /// Start no new batch after running this long (same units as --older-than); what is left
    /// waits for the next run.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) max_duration: Option<Duration>,

    /// Also delete rows archived longer ago than this (archived_at) from hook_events_archive.
    /// Off unless given.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    purge_archive_older_than: Option<Duration>,

    /// Also print how long the batch statements took (longest, p99, median): each one is the
    /// longest any row lock of the run is held.
    #[arg(long)]
    pub(crate) stats: bool,

    /// Log level or filter (error, warn, info, debug, trace, or tracing directives).
    #[arg(long, env = "LOG_LEVEL", default_value = "warn")]
    pub(crate) log_level: String,
}

impl Args {
    pub(crate) fn options(&self) -> ArchiveOptions {
        ArchiveOptions {
            older_than: self.older_than,
            batch_size: self.batch_size as usize,
            purge_older_than: self.purge_archive_older_than,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("hook-archive").chain(argv.iter().copied()))
    }

    #[test]
    fn defaults_and_durations() {
        let options = parse(&[]).unwrap().options();
        assert_eq!(options, ArchiveOptions::default());
        for (text, seconds) in [("30d", 2_592_000), ("12h", 43_200), ("30", 30), ("1.5d", 129_600)] {
            let args = parse(&["--older-than", text]).unwrap();
            assert_eq!(args.options().older_than, Duration::from_secs(seconds), "{text}");
        }
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        for argv in [&["--older-than", "5x"][..], &["--batch-size", "0"], &["--max-duration", "soon"]] {
            let error = parse(argv).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{argv:?}");
        }
        let args = parse(&["--purge-archive-older-than", "365d", "--batch-size", "50"]).unwrap();
        assert_eq!(args.options().purge_older_than, Some(Duration::from_secs(365 * 86_400)));
        assert_eq!(args.options().batch_size, 50);
    }
}
