//! `hook-archive`: moves old processed events from `hook_events` into `hook_events_archive`, and
//! optionally purges the archive by age. The batches are hook-store's
//! [`hook_store::archive`]; this binary parses flags, connects, takes the advisory lock,
//! reports progress and maps the result to an exit code: 0 done, nothing to do or another run
//! busy, 1 failed, 2 bad usage.

mod args;

use std::io::Write;
use std::ops::ControlFlow;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use hook_store::archive::{self, ArchiveReport, Cutoffs};
use time::macros::format_description;
use time::{OffsetDateTime, UtcOffset};

use crate::args::Args;
use hook_cli::Progress;

const PROGRAM: &str = "hook-archive";

fn main() -> ExitCode {
    if let Err(code) = hook_cli::load_dotenv(PROGRAM) {
        return code;
    }
    let args = match hook_cli::parse_args::<Args>(PROGRAM) {
        Ok(args) => args,
        Err(code) => return code,
    };
    hook_cli::exit_code(PROGRAM, run(&args))
}

fn run(args: &Args) -> anyhow::Result<()> {
    hook_cli::init_logging(&args.log_level, false)?;
    let options = args.options();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let connected = hook_cli::connect(&args.database, PROGRAM).await?;
        hook_cli::check_tables(&connected, hook_store::schema::Scope::ARCHIVE).await?;
        let shown = connected.shown.clone();
        // One session for the whole run: it holds the advisory lock, and runs every batch.
        let client = connected.store.pool().get().await.with_context(|| format!("connecting to {shown}"))?;
        let cutoffs = archive::cutoffs(&client, &options)
            .await
            .with_context(|| format!("reading the clock of {shown}"))?;
        if args.dry_run {
            let plan = archive::plan_archive(&client, &cutoffs)
                .await
                .with_context(|| format!("counting rows in {shown}"))?;
            let mut text = format!(
                "{PROGRAM}: dry run: would move {} rows (processed before {})",
                plan.archivable,
                show_time(cutoffs.archive_before)
            );
            if let Some(before) = cutoffs.purge_before {
                text.push_str(&format!(
                    "; would purge {} archived rows (archived before {})",
                    plan.purgeable,
                    show_time(before)
                ));
            }
            say(&text)?;
        } else if !archive::try_lock(&client).await.with_context(|| format!("locking {shown}"))? {
            say(&format!("{PROGRAM}: another hook-archive is running on {shown}; nothing done"))?;
        } else {
            let result = archive_locked(&client, &cutoffs, args, options.batch_size, &shown).await;
            // Dropping the session would release the lock too; unlock so the pooled connection is clean.
            let unlocked = archive::unlock(&client).await;
            result?;
            unlocked.with_context(|| format!("unlocking {shown}"))?;
        }
        drop(client);
        connected.close().await
    })
}

async fn archive_locked(
    client: &hook_store::deadpool_postgres::Client,
    cutoffs: &Cutoffs,
    args: &Args,
    batch_size: usize,
    shown: &str,
) -> anyhow::Result<()> {
    let plan =
        archive::plan_archive(client, cutoffs).await.with_context(|| format!("counting rows in {shown}"))?;
    if plan.archivable == 0 && plan.purgeable == 0 {
        let mut text = format!(
            "{PROGRAM}: nothing to archive (no rows processed before {})",
            show_time(cutoffs.archive_before)
        );
        if let Some(before) = cutoffs.purge_before {
            text.push_str(&format!(" and nothing to purge (no rows archived before {})", show_time(before)));
        }
        return say(&text);
    }
    let interrupted = hook_cli::interrupt_flag();
    let started = Instant::now();
    let deadline = args.max_duration.map(|d| started + d);
    let mut out_of_time = false;
    let mut progress = Progress::new(PROGRAM, "rows moved or purged", plan.archivable + plan.purgeable);
    let result = archive::archive(client, cutoffs, batch_size, |batch| {
        progress.advance(batch.rows);
        if deadline.is_some_and(|d| Instant::now() >= d) {
            out_of_time = true;
        }
        if out_of_time || interrupted.load(Ordering::SeqCst) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .await;
    progress.finish();
    let report = result.with_context(|| format!("archiving in {shown}"))?;
    let seconds = started.elapsed().as_secs_f64();
    let mut text = summary(&report, cutoffs, seconds);
    if report.stopped {
        let left = (plan.archivable + plan.purgeable).saturating_sub(report.moved + report.purged);
        if out_of_time {
            text.push_str(&format!("; stopped at --max-duration, about {left} rows left for the next run"));
        }
    }
    if args.stats {
        text.push('\n');
        text.push_str(&stats(&report, seconds));
    }
    say(&text)?;
    if report.stopped && !out_of_time {
        anyhow::bail!("interrupted after moving {} rows; run again to continue", report.moved);
    }
    Ok(())
}

/// The one-line summary: rows moved, batches, seconds.
fn summary(report: &ArchiveReport, cutoffs: &Cutoffs, seconds: f64) -> String {
    let mut text = format!(
        "{PROGRAM}: moved {} in {}, {seconds:.1} s (processed before {})",
        plural(report.moved, "row", "rows"),
        plural(report.batches, "batch", "batches"),
        show_time(cutoffs.archive_before)
    );
    if cutoffs.purge_before.is_some() {
        text.push_str(&format!(
            "; purged {} in {}",
            plural(report.purged, "archived row", "archived rows"),
            plural(report.purge_batches, "batch", "batches")
        ));
    }
    text
}

/// "1 row", "2 rows".
fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Statement durations: each one is how long that batch held its row locks, at most.
fn stats(report: &ArchiveReport, seconds: f64) -> String {
    let mut durations = report.statement_durations.clone();
    durations.sort_unstable();
    let at = |q: f64| {
        let i = ((durations.len() as f64 * q).ceil() as usize).clamp(1, durations.len().max(1)) - 1;
        durations.get(i).copied().unwrap_or_default()
    };
    let ms = |d: Duration| d.as_secs_f64() * 1_000.0;
    let rows = report.moved + report.purged;
    format!(
        "{PROGRAM}: stats: {} statements, longest {:.1} ms, p99 {:.1} ms, median {:.1} ms; {:.0} rows/s",
        durations.len(),
        ms(durations.last().copied().unwrap_or_default()),
        ms(at(0.99)),
        ms(at(0.5)),
        if seconds > 0.0 { rows as f64 / seconds } else { 0.0 }
    )
}

fn show_time(time: OffsetDateTime) -> String {
    time.to_offset(UtcOffset::UTC)
        .format(format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC"))
        .unwrap_or_else(|_| time.to_string())
}

/// Writes `text` and a newline to stdout.
fn say(text: &str) -> anyhow::Result<()> {
    writeln!(std::io::stdout().lock(), "{text}").context("writing to standard output")
}
