//! `hook-replay`: re-queues failed and dead hook events (or, on request, processed ones) so that
//! processors handle them again. The selection and the batches are hook-store's
//! [`hook_store::replay`]; this binary parses flags, connects, reports progress and maps
//! the result to an exit code: 0 done or nothing to do, 1 failed, 2 bad usage.

mod args;

use std::io::Write;
use std::ops::ControlFlow;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::Context;
use hook_store::replay::{self, ReplayPlan, ReplayReport};

use crate::args::Args;
use hook_cli::Progress;

const PROGRAM: &str = "hook-replay";
/// How many ids a dry run shows.
const SAMPLE_IDS: usize = 5;

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
    let filter = args.filter()?;
    let options = args.options();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let connected = hook_cli::connect(&args.database, PROGRAM).await?;
        hook_cli::check_tables(&connected, hook_store::schema::Scope::QUEUE).await?;
        let shown = connected.shown.clone();
        let mut client =
            connected.store.pool().get().await.with_context(|| format!("connecting to {shown}"))?;
        let plan = replay::plan_replay(&client, &filter, SAMPLE_IDS)
            .await
            .with_context(|| format!("selecting events in {shown}"))?;
        if args.dry_run {
            print_plan(&plan, args.include_processed)?;
        } else if plan.total() == 0 {
            say(&format!(
                "{PROGRAM}: nothing to re-queue: no event matches{}",
                hint(args.include_processed)
            ))?;
        } else {
            let interrupted = hook_cli::interrupt_flag();
            let started = Instant::now();
            let mut progress = Progress::new(PROGRAM, "events re-queued", plan.total());
            let result = replay::replay(&mut client, &filter, &options, |batch| {
                progress.advance(batch.replayed.len() as u64);
                if interrupted.load(Ordering::SeqCst) {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
            .await;
            progress.finish();
            let report = result.with_context(|| format!("re-queuing events in {shown}"))?;
            print_report(&report, started.elapsed().as_secs_f64())?;
            if report.stopped {
                anyhow::bail!(
                    "interrupted after re-queuing {} events; run again to continue",
                    report.replayed
                );
            }
        }
        drop(client);
        connected.close().await
    })
}

fn hint(include_processed: bool) -> &'static str {
    if include_processed {
        ""
    } else {
        " (processed events are selected only with --include-processed)"
    }
}

/// Writes `text` and a newline to stdout.
fn say(text: &str) -> anyhow::Result<()> {
    writeln!(std::io::stdout().lock(), "{text}").context("writing to standard output")
}

fn groups(groups: &[((String, String), u64)]) -> String {
    groups.iter().map(|((source, action), n)| format!("\n  {n:>8}  {source}/{action}")).collect()
}

/// "1 event", "2 events".
fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn print_plan(plan: &ReplayPlan, include_processed: bool) -> anyhow::Result<()> {
    if plan.total() == 0 {
        return say(&format!(
            "{PROGRAM}: dry run: nothing to re-queue: no event matches{}",
            hint(include_processed)
        ));
    }
    let ids: Vec<String> = plan.sample_ids.iter().map(ToString::to_string).collect();
    let more = if plan.total() > ids.len() as u64 { ", ..." } else { "" };
    say(&format!(
        "{PROGRAM}: dry run: {} would be re-queued{}\n  first ids: {}{more}",
        plural(plan.total(), "event", "events"),
        groups(&plan.groups),
        ids.join(", ")
    ))
}

fn print_report(report: &ReplayReport, seconds: f64) -> anyhow::Result<()> {
    let mut by_kind: Vec<_> = report.by_kind.iter().map(|(k, n)| (k.clone(), *n)).collect();
    by_kind.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let mut text = format!(
        "{PROGRAM}: re-queued {} in {}, {seconds:.2} s{}",
        plural(report.replayed, "event", "events"),
        plural(report.batches, "batch", "batches"),
        groups(&by_kind)
    );
    if report.skipped_held > 0 {
        text.push_str(&format!(
            "\n{PROGRAM}: {} being processed left alone",
            plural(report.skipped_held, "matching event", "matching events")
        ));
    }
    say(&text)
}
