//! The `bloat` phase: whether `hook_events` stays bounded under sustained load (issue 15, item 3).
//!
//! The hook-processor binary as shipped (its vacuum task on, unless
//! `--bloat-vacuum-dead-tuples 0`) consumes while producers insert `--bloat-rate` events per
//! second for `--bloat-duration`, and an archiver does what `hook-archive` from a timer does:
//! every few seconds it moves events processed more than `--bloat-archive-after` ago into
//! `hook_events_archive` and purges archived rows as old (so that the table holds a bounded
//! window of events, as a deployment with a retention does; 0 keeps every row). Every
//! `SAMPLE_EVERY` the phase reads the table's dead and live row versions, its size (heap,
//! indexes, TOAST), its vacuums and HOT updates, and the machine's load; it reports per window
//! (`--window`) the events processed per second, the median dead row versions, the size and the
//! server's CPU per event, and over the run the size at the end against the size after
//! `--bloat-baseline` (five minutes), and the median of the dead row versions sampled.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hook_store::bench::{self, TableFacts};
use serde::Serialize;

use crate::phases::{processor_command, tail, Db};
use crate::pressure::ServerCpu;
use crate::report::load;
use crate::Plan;

/// Producer connections; each inserts its share of the rate.
const PRODUCERS: u64 = 4;
/// How often each producer inserts what is due (one statement, one NOTIFY).
const PRODUCER_TICK: Duration = Duration::from_millis(10);
/// Rows per producer statement, at most.
const MAX_CHUNK: u64 = 2_000;
/// How often the table is sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// How often the archiver runs.
const ARCHIVE_EVERY: Duration = Duration::from_secs(5);
/// `USER_HZ`.
const CLOCK_TICKS: f64 = 100.0;

/// One reading.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Sample {
    /// Seconds from the producers' start.
    pub(crate) at_s: f64,
    pub(crate) inserted: u64,
    /// Inserted less what waits (unprocessed, not dead).
    pub(crate) processed: u64,
    pub(crate) archived: u64,
    pub(crate) dead_tuples: i64,
    pub(crate) live_tuples: i64,
    pub(crate) heap_bytes: i64,
    pub(crate) index_bytes: i64,
    pub(crate) toast_bytes: i64,
    /// Vacuums since the phase began: by the processor's task (`VACUUM`) and by autovacuum.
    pub(crate) vacuums: i64,
    pub(crate) autovacuums: i64,
    /// Updates since the phase began, and how many of them were HOT.
    pub(crate) updates: i64,
    pub(crate) hot_updates: i64,
    pub(crate) load1: f64,
    #[serde(skip)]
    server_ticks: Option<u64>,
}

impl Sample {
    pub(crate) fn total_bytes(&self) -> i64 {
        self.heap_bytes + self.index_bytes + self.toast_bytes
    }
}

/// One window of the run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct BloatWindow {
    pub(crate) from_s: f64,
    /// Events inserted and processed per second in the window.
    pub(crate) inserted_per_s: f64,
    pub(crate) processed_per_s: f64,
    /// Median of the dead row versions sampled in the window.
    pub(crate) dead_tuples_median: i64,
    /// The table's size at the window's end, MiB (heap + indexes + TOAST).
    pub(crate) total_mib: f64,
    pub(crate) vacuums: i64,
    pub(crate) autovacuums: i64,
    /// CPU of every server process per event processed, µs.
    pub(crate) server_cpu_us_per_event: Option<f64>,
    /// The 1-minute load average at the window's end.
    pub(crate) load1: f64,
}

/// The `bloat` phase.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Bloat {
    pub(crate) rate: f64,
    pub(crate) seconds: f64,
    /// `None`: every row stays.
    pub(crate) archive_after_s: Option<f64>,
    /// The processor's `HOOK_VACUUM_DEAD_TUPLES` (0: its vacuum task off).
    pub(crate) vacuum_dead_tuples: u64,
    /// Whether a `REPEATABLE READ` snapshot was held for the whole run.
    pub(crate) snapshot_held: bool,
    /// Whether the producers' ids were time-ordered (version 7, as hook-ingest's) or random.
    pub(crate) time_ordered_ids: bool,
    pub(crate) inserted: u64,
    /// Over the producing time.
    pub(crate) inserted_per_s: f64,
    pub(crate) processed_per_s: f64,
    /// Events left unprocessed when the producers stopped.
    pub(crate) backlog_at_end: u64,
    /// The size after `baseline_s` and at the end of the producing time, MiB, and their ratio.
    pub(crate) baseline_s: f64,
    pub(crate) baseline_mib: f64,
    pub(crate) end_mib: f64,
    pub(crate) size_ratio: f64,
    /// Over every sample of the producing time.
    pub(crate) dead_tuples_median: i64,
    pub(crate) dead_tuples_p90: i64,
    pub(crate) dead_tuples_max: i64,
    pub(crate) samples_taken: usize,
    /// Share of the updates that were HOT.
    pub(crate) hot_update_share: f64,
    pub(crate) vacuums: i64,
    pub(crate) autovacuums: i64,
    /// Each index at the baseline and at the end, bytes.
    pub(crate) indexes_baseline: Vec<(String, i64)>,
    pub(crate) indexes_end: Vec<(String, i64)>,
    pub(crate) windows: Vec<BloatWindow>,
    pub(crate) samples: Vec<Sample>,
}

/// Runs the phase.
pub(crate) async fn bloat(db: &Db, plan: &Plan) -> anyhow::Result<Bloat> {
    anyhow::ensure!(
        plan.processor_bin.is_file(),
        "no hook-processor binary at {} (build it with `cargo build --release -p hook-processor`, \
         or pass --processor-bin)",
        plan.processor_bin.display()
    );
    let client = db.connect().await?;
    bench::truncate(&client).await?;
    bench::truncate_archive(&client).await?;
    bench::settle(&client).await.context("vacuuming")?;
    let server = ServerCpu::find(&client).await;
    let origin_facts = bench::table_facts(&client).await?;

    let workdir = std::env::temp_dir().join(format!("hook-bench-bloat-{}", std::process::id()));
    std::fs::create_dir_all(&workdir).with_context(|| format!("creating {}", workdir.display()))?;
    let log_path = workdir.join("hook-processor.log");
    let log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut command = processor_command(&plan.processor_bin, &db.url, &plan.engine, &workdir, log);
    command.env("HOOK_VACUUM_DEAD_TUPLES", plan.bloat_vacuum_dead_tuples.to_string());
    let mut child = command.spawn().with_context(|| format!("starting {}", plan.processor_bin.display()))?;
    let pid = child.id().context("the processor exited at once")?;
    let started = Instant::now();
    while !std::fs::read_to_string(&log_path).unwrap_or_default().contains("engine started") {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("hook-processor exited early ({status}); its log: {}", tail(&log_path));
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "hook-processor did not start in 2 minutes"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let holder = if plan.bloat_hold_snapshot {
        let holder = db.connect().await?;
        bench::hold_snapshot(&holder).await.context("holding a snapshot")?;
        Some(holder)
    } else {
        None
    };
    let inserted = Arc::new(AtomicU64::new(0));
    let archived = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let origin = Instant::now();
    let producers =
        produce(db, plan.bloat_rate, plan.bloat_duration, plan.bloat_ids, Arc::clone(&inserted)).await?;
    let archiver = match plan.bloat_archive_after {
        Some(after) => {
            let client = db.connect().await?;
            Some(tokio::spawn(archive_loop(client, after, Arc::clone(&archived), Arc::clone(&stop))))
        }
        None => None,
    };
    let read = |at: Instant| {
        let (inserted, archived, client, server) = (&inserted, &archived, &client, server.as_ref());
        async move {
            let facts = bench::table_facts(client).await?;
            let waiting = u64::try_from(bench::unprocessed_count(client).await?).unwrap_or(0);
            let inserted = inserted.load(Ordering::Relaxed);
            anyhow::Ok(sample(
                at - origin,
                inserted,
                waiting,
                archived.load(Ordering::Relaxed),
                facts,
                &origin_facts,
                server,
            ))
        }
    };
    let mut samples = vec![read(origin).await?];
    let mut indexes_baseline = Vec::new();
    tokio::pin!(producers);
    let mut produced = None;
    while produced.is_none() {
        let next = origin + SAMPLE_EVERY * u32::try_from(samples.len()).unwrap_or(u32::MAX);
        tokio::select! {
            result = &mut producers => produced = Some(result?),
            () = tokio::time::sleep_until(next.into()) => {
                let at = Instant::now();
                samples.push(read(at).await?);
                if indexes_baseline.is_empty() && at - origin >= plan.bloat_baseline {
                    indexes_baseline = bench::index_sizes(&client).await?;
                }
                if let Some(status) = child.try_wait()? {
                    anyhow::bail!("hook-processor exited early ({status}); its log: {}", tail(&log_path));
                }
            }
        }
    }
    let producing = origin.elapsed();
    let last = read(Instant::now()).await?;
    let indexes_end = bench::index_sizes(&client).await?;
    samples.push(last.clone());
    if let Some(holder) = holder {
        bench::release_snapshot(&holder).await?;
    }
    stop.store(true, Ordering::Relaxed);
    if let Some(archiver) = archiver {
        archiver.await.context("archiver task")??;
    }
    // Everything inserted is processed, or the run fails.
    let deadline = Instant::now() + Duration::from_secs(300);
    while bench::unprocessed_count(&client).await? > 0 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} events still unprocessed 5 minutes after the producers stopped",
            bench::unprocessed_count(&client).await?
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).context("pid out of range")?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).context("stopping hook-processor")?;
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .context("hook-processor did not stop within 30 s of SIGTERM")??;
    anyhow::ensure!(status.success(), "hook-processor failed ({status}); its log: {}", tail(&log_path));
    let _ = std::fs::remove_dir_all(&workdir);
    bench::truncate(&client).await?;
    bench::truncate_archive(&client).await?;

    let baseline =
        samples.iter().find(|s| s.at_s >= plan.bloat_baseline.as_secs_f64()).unwrap_or(&last).clone();
    let mib = |bytes: i64| bytes as f64 / 1_048_576.0;
    let mut dead: Vec<i64> = samples.iter().map(|s| s.dead_tuples).collect();
    dead.sort_unstable();
    let seconds = producing.as_secs_f64();
    Ok(Bloat {
        rate: plan.bloat_rate,
        seconds,
        archive_after_s: plan.bloat_archive_after.map(|d| d.as_secs_f64()),
        vacuum_dead_tuples: plan.bloat_vacuum_dead_tuples,
        snapshot_held: plan.bloat_hold_snapshot,
        time_ordered_ids: plan.bloat_ids == bench::Ids::TimeOrdered,
        inserted: last.inserted,
        inserted_per_s: last.inserted as f64 / seconds,
        processed_per_s: last.processed as f64 / seconds,
        backlog_at_end: last.inserted - last.processed,
        baseline_s: baseline.at_s,
        baseline_mib: mib(baseline.total_bytes()),
        end_mib: mib(last.total_bytes()),
        size_ratio: last.total_bytes() as f64 / baseline.total_bytes().max(1) as f64,
        dead_tuples_median: quantile(&dead, 0.5),
        dead_tuples_p90: quantile(&dead, 0.9),
        dead_tuples_max: dead.last().copied().unwrap_or(0),
        samples_taken: dead.len(),
        hot_update_share: last.hot_updates as f64 / last.updates.max(1) as f64,
        vacuums: last.vacuums,
        autovacuums: last.autovacuums,
        indexes_baseline,
        indexes_end,
        windows: windows(&samples, plan.window),
        samples,
    })
}

fn quantile(sorted: &[i64], q: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn sample(
    at: Duration,
    inserted: u64,
    waiting: u64,
    archived: u64,
    facts: TableFacts,
    origin: &TableFacts,
    server: Option<&ServerCpu>,
) -> Sample {
    Sample {
        at_s: at.as_secs_f64(),
        inserted,
        processed: inserted.saturating_sub(waiting),
        archived,
        dead_tuples: facts.dead_tuples,
        live_tuples: facts.live_tuples,
        heap_bytes: facts.heap_bytes,
        index_bytes: facts.index_bytes,
        toast_bytes: facts.toast_bytes,
        vacuums: facts.vacuums - origin.vacuums,
        autovacuums: facts.autovacuums - origin.autovacuums,
        updates: facts.updates - origin.updates,
        hot_updates: facts.hot_updates - origin.hot_updates,
        load1: load()[0],
        server_ticks: server.and_then(ServerCpu::ticks),
    }
}

/// The samples grouped in windows of `window`.
fn windows(samples: &[Sample], window: Duration) -> Vec<BloatWindow> {
    let window_s = window.as_secs_f64();
    let mut out = Vec::new();
    let mut start = 0;
    while start + 1 < samples.len() {
        let from = &samples[start];
        let mut end = start + 1;
        while end + 1 < samples.len() && samples[end].at_s - from.at_s < window_s {
            end += 1;
        }
        let to = &samples[end];
        let span = (to.at_s - from.at_s).max(1e-9);
        let mut dead: Vec<i64> = samples[start + 1..=end].iter().map(|s| s.dead_tuples).collect();
        dead.sort_unstable();
        let processed = to.processed.saturating_sub(from.processed);
        out.push(BloatWindow {
            from_s: from.at_s,
            inserted_per_s: to.inserted.saturating_sub(from.inserted) as f64 / span,
            processed_per_s: processed as f64 / span,
            dead_tuples_median: quantile(&dead, 0.5),
            total_mib: to.total_bytes() as f64 / 1_048_576.0,
            vacuums: to.vacuums - from.vacuums,
            autovacuums: to.autovacuums - from.autovacuums,
            server_cpu_us_per_event: from
                .server_ticks
                .zip(to.server_ticks)
                .map(|(a, b)| b.saturating_sub(a) as f64 / CLOCK_TICKS * 1e6 / processed.max(1) as f64),
            load1: to.load1,
        });
        start = end;
    }
    out
}

/// `PRODUCERS` connections inserting `rate` events per second in all for `duration`: every
/// `PRODUCER_TICK` each inserts what its share says is due by then (so a slow statement is made
/// up by the next). Returns the events inserted; `inserted` counts them as they commit.
async fn produce(
    db: &Db,
    rate: f64,
    duration: Duration,
    ids: bench::Ids,
    inserted: Arc<AtomicU64>,
) -> anyhow::Result<impl std::future::Future<Output = anyhow::Result<u64>>> {
    let mut tasks = Vec::new();
    for k in 0..PRODUCERS {
        let client = db.connect().await?;
        let inserted = Arc::clone(&inserted);
        let share = rate / PRODUCERS as f64;
        tasks.push(tokio::spawn(async move {
            let start = Instant::now();
            let mut tick = tokio::time::interval(PRODUCER_TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            // Each producer numbers its rows in a range of its own (`metadata.seq`).
            let mut next = (k + 1) * 10_000_000_000;
            let mut done = 0u64;
            loop {
                tick.tick().await;
                let elapsed = start.elapsed().min(duration);
                let due = (share * elapsed.as_secs_f64()) as u64;
                let n = due.saturating_sub(done).min(MAX_CHUNK);
                if n > 0 {
                    let first = i64::try_from(next)?;
                    let last = i64::try_from(next + n - 1)?;
                    bench::insert_range(&client, first, last, ids).await?;
                    next += n;
                    done += n;
                    inserted.fetch_add(n, Ordering::Relaxed);
                }
                if elapsed >= duration && done >= due {
                    break;
                }
            }
            anyhow::Ok(done)
        }));
    }
    Ok(async move {
        let mut total = 0;
        for task in tasks {
            total += task.await.context("producer task")??;
        }
        Ok(total)
    })
}

/// What `hook-archive --older-than <after> --purge-older-than <after>` from a timer does, every
/// `ARCHIVE_EVERY` until `stop`.
async fn archive_loop(
    client: hook_store::deadpool_postgres::Object,
    after: Duration,
    archived: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let options = hook_store::archive::ArchiveOptions {
        older_than: after,
        batch_size: 1_000,
        purge_older_than: Some(after),
    };
    anyhow::ensure!(hook_store::archive::try_lock(&client).await?, "another archive run holds its lock");
    let mut tick = tokio::time::interval(ARCHIVE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let cutoffs = hook_store::archive::cutoffs(&client, &options).await?;
        let report = hook_store::archive::archive(&client, &cutoffs, options.batch_size, |_| {
            if stop.load(Ordering::Relaxed) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .await?;
        archived.fetch_add(report.moved, Ordering::Relaxed);
    }
    hook_store::archive::unlock(&client).await?;
    Ok(())
}
