//! `hook-bench soak`: hook-processor children under a steady load for minutes, while the soak
//! kills one with SIGKILL every so often (just after a burst of events, so that batches are in
//! flight) and restarts the database; then a consistency check.
//!
//! What is checked, and from where:
//! - **Nothing lost, nothing added.** The producer numbers its events (`metadata.seq`) and keeps
//!   the ranges whose INSERT was acknowledged, and those whose INSERT failed (their commit is
//!   unknown). Every acknowledged number must be in the table exactly once, and no row may carry a
//!   number the producer never sent.
//! - **Nothing stranded.** Once the producer stops, the queue must drain; then no row may be
//!   left unprocessed, none locked (a lease nobody releases), and `processed_at >= created_at`.
//! - **Nothing done twice.** A trigger records every committed outcome (the table
//!   `hook_outcome_audit_rows`): each event must have exactly one committed success (the success
//!   update only matches unprocessed rows, so this finds events whose success never committed;
//!   a second completion shows as the processor's warning "some outcomes matched no unprocessed
//!   row", which must not appear). The children log every handled event
//!   (`LOG_LEVEL=info,hook_core::engine=debug`, JSON), also those whose batch never commits; each
//!   handling of an event but the last is excused only when its process was killed after it and
//!   before the next handling, or the database went down under it. Anything else is a handling
//!   under a live claim, and fails the soak.
//! - **Nobody gives up.** A processor that exits without being told to fails the soak; so does
//!   one that does not exit 0 on SIGTERM at the end.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use hook_store::{bench, EmbeddedCluster};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::phases::{processor_command, tail, Db};
use crate::report::{Percentiles, Throughput};

/// Most rows one producer statement inserts (after an outage the producer catches up in these).
const PRODUCER_CHUNK: i64 = 1_000;
/// Events inserted at once just before each kill, 0 to 20 ms ahead of it.
const KILL_BURST: i64 = 500;
/// How often the soak samples the backlog and looks at its children.
const TICK: Duration = Duration::from_millis(100);
/// A handling that ended this long before the database went down may still have had its
/// commit in flight.
const OUTAGE_SLACK: Duration = Duration::from_secs(2);
/// Events created this soon after the database was back are counted with the outage.
const AFTER_OUTAGE: Duration = Duration::from_secs(10);
/// How often the soak reports its progress on stderr.
const PROGRESS_EVERY: Duration = Duration::from_secs(60);
/// Longest wait for the queue to drain once the producer stops.
const DRAIN_PATIENCE: Duration = Duration::from_secs(300);

/// What a soak run does.
#[derive(Debug, Clone)]
pub(crate) struct SoakPlan {
    pub(crate) duration: Duration,
    /// Events per second the producer inserts.
    pub(crate) rate: f64,
    /// hook-processor children running at once.
    pub(crate) processors: usize,
    /// Mean time between two SIGKILLs (each lands uniformly in 0.5x..1.5x of it).
    pub(crate) kill_every: Duration,
    /// Database restarts, spread evenly over the run.
    pub(crate) restarts: usize,
    /// How long the database stays down at each restart.
    pub(crate) down_for: Duration,
    pub(crate) seed: u64,
    pub(crate) engine: hook_core::EngineConfig,
    pub(crate) processor_bin: PathBuf,
}

/// One hook-processor child.
struct Processor {
    child: tokio::process::Child,
    pid: u32,
    /// Its sessions' `application_name`.
    name: String,
    log: PathBuf,
    killed_at: Option<OffsetDateTime>,
}

/// The children, live and gone, and where they write.
struct Fleet<'a> {
    plan: &'a SoakPlan,
    url: &'a str,
    workdir: PathBuf,
    all: Vec<Processor>,
    /// Indices into `all` of the children that should be running.
    live: Vec<usize>,
    unexpected_exits: Vec<String>,
}

impl<'a> Fleet<'a> {
    fn new(plan: &'a SoakPlan, url: &'a str) -> anyhow::Result<Fleet<'a>> {
        anyhow::ensure!(
            plan.processor_bin.is_file(),
            "no hook-processor binary at {} (build it with `cargo build --release -p hook-processor`, \
             or pass --processor-bin)",
            plan.processor_bin.display()
        );
        anyhow::ensure!(
            url.starts_with("postgres://") || url.starts_with("postgresql://"),
            "the soak needs DATABASE_URL as a postgresql:// URL (it adds an application_name per child)"
        );
        let workdir = std::env::temp_dir().join(format!("hook-bench-soak-{}", std::process::id()));
        std::fs::create_dir_all(&workdir).with_context(|| format!("creating {}", workdir.display()))?;
        Ok(Fleet { plan, url, workdir, all: Vec::new(), live: Vec::new(), unexpected_exits: Vec::new() })
    }

    /// Starts a child and returns its index in `all`.
    fn spawn(&mut self) -> anyhow::Result<usize> {
        let n = self.all.len();
        let name = format!("hook-soak-{}-{n}", std::process::id());
        let log = self.workdir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let separator = if self.url.contains('?') { '&' } else { '?' };
        let url = format!("{}{separator}application_name={name}", self.url);
        let child = processor_command(&self.plan.processor_bin, &url, &self.plan.engine, &self.workdir, file)
            // Every handled event in the log, as JSON with its timestamp.
            .env("LOG_LEVEL", "info,hook_core::engine=debug")
            .env("HOOK_LOG_FORMAT", "json")
            // A replacement started while the database is down waits for it, as a unit with
            // Restart= would.
            .env("HOOK_WAIT_FOR_DATABASE", "120s")
            .spawn()
            .with_context(|| format!("starting {}", self.plan.processor_bin.display()))?;
        let pid = child.id().context("a hook-processor child exited at once")?;
        self.all.push(Processor { child, pid, name, log, killed_at: None });
        self.live.push(n);
        Ok(n)
    }

    /// Records and replaces every child that exited on its own.
    fn check(&mut self) -> anyhow::Result<()> {
        let mut exited = Vec::new();
        for &i in &self.live {
            if let Some(status) = self.all[i].child.try_wait()? {
                let p = &self.all[i];
                self.unexpected_exits.push(format!("pid {} exited ({status}): {}", p.pid, tail(&p.log)));
                exited.push(i);
            }
        }
        for i in exited {
            self.live.retain(|&j| j != i);
            self.spawn()?;
        }
        Ok(())
    }

    /// SIGKILLs the child at `live[victim]` and starts its replacement; returns the killed
    /// child's index and when the signal went. `None` if that child had already exited (it is
    /// recorded as an unexpected exit, and replaced, instead).
    async fn kill(&mut self, victim: usize) -> anyhow::Result<Option<(usize, Instant)>> {
        let i = self.live[victim];
        if self.all[i].child.try_wait()?.is_some() {
            self.check()?;
            return Ok(None);
        }
        self.live.remove(victim);
        let p = &mut self.all[i];
        let sent = Instant::now();
        p.child.start_kill().context("SIGKILL to a hook-processor child")?;
        p.killed_at = Some(OffsetDateTime::now_utc());
        p.child.wait().await.context("reaping a killed child")?;
        self.spawn()?;
        Ok(Some((i, sent)))
    }

    /// SIGTERMs every live child; returns those that did not exit 0 within a minute.
    async fn stop(&mut self) -> Vec<String> {
        let mut failures = Vec::new();
        for &i in &self.live {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(self.all[i].pid).unwrap_or(i32::MAX));
            if let Err(e) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM) {
                failures.push(format!("SIGTERM to {pid}: {e}"));
            }
        }
        for i in std::mem::take(&mut self.live) {
            let p = &mut self.all[i];
            match tokio::time::timeout(Duration::from_secs(60), p.child.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) => failures.push(format!("pid {} exited ({status}): {}", p.pid, tail(&p.log))),
                Ok(Err(e)) => failures.push(format!("pid {}: {e}", p.pid)),
                Err(_) => {
                    let _ = p.child.start_kill();
                    failures.push(format!("pid {} did not exit within 60 s of SIGTERM", p.pid));
                }
            }
        }
        failures
    }
}

/// What the producer did.
#[derive(Debug, Default)]
struct Produced {
    /// Ranges of `seq` whose INSERT was acknowledged.
    acked: Vec<(i64, i64)>,
    /// Ranges whose INSERT failed: they may or may not have committed.
    uncertain: Vec<(i64, i64)>,
    /// Times the producer could not get a connection.
    refused: u64,
}

impl Produced {
    fn count(ranges: &[(i64, i64)]) -> u64 {
        ranges.iter().map(|&(first, last)| (last - first + 1).unsigned_abs()).sum()
    }
}

/// The producer's numbering, shared by the steady load and the bursts before kills, and what
/// became of each statement.
struct Ledger {
    next: AtomicI64,
    produced: Mutex<Produced>,
}

impl Ledger {
    fn new() -> Ledger {
        Ledger { next: AtomicI64::new(1), produced: Mutex::new(Produced::default()) }
    }

    /// Inserts the next `n` events in one statement and records the outcome; returns false
    /// when no connection could be had (nothing was sent).
    async fn insert(&self, db: &Db, n: i64) -> bool {
        let Ok(client) = db.connect().await else {
            self.lock().refused += 1;
            return false;
        };
        let first = self.next.fetch_add(n, Ordering::SeqCst);
        let last = first + n - 1;
        let result = bench::insert_range(&client, first, last, bench::Ids::Random).await;
        let mut produced = self.lock();
        match result {
            Ok(_) => produced.acked.push((first, last)),
            Err(error) => {
                tracing::debug!(%error, "producer insert failed");
                produced.uncertain.push((first, last));
            }
        }
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Produced> {
        self.produced.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Inserts `rate` events per second in small statements until told to stop, catching up after
/// an outage in chunks of [`PRODUCER_CHUNK`].
async fn produce(db: &Db, ledger: &Ledger, rate: f64, mut stop: watch::Receiver<bool>) {
    let mut sent = 0_i64;
    let started = Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_millis(10));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.changed() => return,
        }
        let due = (rate * started.elapsed().as_secs_f64()) as i64 - sent;
        if due <= 0 {
            continue;
        }
        let n = due.min(PRODUCER_CHUNK);
        if ledger.insert(db, n).await {
            sent += n;
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A database restart: when it went down and when it was back, on the wall clock (to compare
/// with the children's log timestamps) and on the monotonic one.
#[derive(Debug, Clone, Copy)]
struct Outage {
    down: OffsetDateTime,
    up: OffsetDateTime,
    up_instant: Instant,
}

/// Figures and verdict of one soak run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SoakReport {
    pub(crate) minutes: f64,
    pub(crate) rate: f64,
    pub(crate) processors: usize,
    pub(crate) seed: u64,
    pub(crate) load_before: [f64; 3],
    pub(crate) load_after: [f64; 3],
    /// Events whose INSERT was acknowledged.
    pub(crate) produced: u64,
    /// Events whose INSERT failed (during an outage); in the table or not.
    pub(crate) producer_uncertain: u64,
    pub(crate) producer_refused_connections: u64,
    pub(crate) rows: u64,
    pub(crate) processed: u64,
    pub(crate) dead: u64,
    /// The whole run, producer and drain, as throughput.
    pub(crate) throughput: Throughput,
    pub(crate) kills: usize,
    pub(crate) restarts: usize,
    pub(crate) down_s: f64,
    /// After a SIGKILL, until the server had ended every session of the killed child (its
    /// leases released).
    pub(crate) lease_release_after_kill: Option<Percentiles>,
    /// After the database was back, until the backlog fell below a second's worth of events.
    pub(crate) recovery_after_restart_ms: Vec<u64>,
    pub(crate) max_backlog: i64,
    /// processed_at − created_at of every processed event.
    pub(crate) processed_latency: Percentiles,
    /// The same, of the events created neither while the database was down nor in the
    /// [`AFTER_OUTAGE`] after it was back.
    pub(crate) processed_latency_outside_outages: Percentiles,
    /// From the producer's stop until nothing was queued.
    pub(crate) final_drain_s: f64,
    /// Handlings seen in the children's logs.
    pub(crate) handlings: u64,
    /// Events handled more than once, each excused by a kill, an outage, or nothing.
    pub(crate) rehandled_after_kill: u64,
    pub(crate) rehandled_after_outage: u64,
    pub(crate) checks: Vec<Check>,
    pub(crate) passed: bool,
    pub(crate) seconds: f64,
}

/// One consistency check: how many things were wrong (0 passes).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Check {
    pub(crate) what: &'static str,
    pub(crate) found: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) examples: Vec<String>,
}

/// Runs the soak. `cluster` is the embedded cluster to restart (required when
/// `plan.restarts > 0`).
pub(crate) async fn soak(
    db: &Db,
    cluster: Option<&EmbeddedCluster>,
    plan: &SoakPlan,
) -> anyhow::Result<SoakReport> {
    anyhow::ensure!(
        plan.restarts == 0 || cluster.is_some(),
        "--restarts needs the embedded cluster (run without DATABASE_URL), or pass --restarts 0"
    );
    let began = Instant::now();
    let load_before = crate::report::load();
    let mut rng = StdRng::seed_from_u64(plan.seed);
    {
        let client = db.connect().await?;
        bench::truncate(&client).await?;
        bench::install_outcome_audit(&client).await.context("installing the outcome audit")?;
    }
    let mut fleet = Fleet::new(plan, &db.url)?;
    for _ in 0..plan.processors {
        fleet.spawn()?;
    }
    let clock = crate::report::CpuClock::start(None);
    let (stop_producer, stopped) = watch::channel(false);
    let ledger = Ledger::new();
    let producer = produce(db, &ledger, plan.rate, stopped);
    tokio::pin!(producer);

    let started = Instant::now();
    let mut next_kill = started + jitter(&mut rng, plan.kill_every);
    let mut restarts_at: Vec<Instant> = (1..=plan.restarts)
        .map(|i| started + plan.duration.mul_f64(i as f64 / (plan.restarts + 1) as f64))
        .collect();
    restarts_at.reverse();
    let mut outages: Vec<Outage> = Vec::new();
    let mut recovering: Option<Instant> = None;
    let mut recoveries = Vec::new();
    let mut lease_release = Histogram::<u64>::new(3).context("histogram")?;
    let mut kills = 0;
    let mut max_backlog = 0;
    let calm_backlog = (plan.rate as i64).max(50);

    // The run: the producer runs as a branch of this select, the fault schedule in the other.
    let faults = async {
        let mut next_progress = started + PROGRESS_EVERY;
        while started.elapsed() < plan.duration {
            tokio::time::sleep(TICK).await;
            fleet.check()?;
            let backlog = backlog(db).await;
            if Instant::now() >= next_progress {
                next_progress += PROGRESS_EVERY;
                eprintln!(
                    "hook-bench soak: {:>4.0} s, backlog {}, {kills} kills, {} restarts",
                    started.elapsed().as_secs_f64(),
                    backlog.map_or_else(|| "unknown".into(), |b| b.to_string()),
                    outages.len()
                );
            }
            if let Some(backlog) = backlog {
                max_backlog = max_backlog.max(backlog);
                if let Some(since) = recovering.filter(|_| backlog <= calm_backlog) {
                    recoveries.push(since.elapsed().as_millis() as u64);
                    recovering = None;
                }
            }
            let now = Instant::now();
            if now >= next_kill {
                // A burst first, so that the kill most likely lands while batches are in flight.
                ledger.insert(db, KILL_BURST).await;
                tokio::time::sleep(Duration::from_millis(rng.gen_range(0..20))).await;
                let victim = rng.gen_range(0..fleet.live.len());
                if let Some((killed, sent)) = fleet.kill(victim).await? {
                    kills += 1;
                    let name = fleet.all[killed].name.clone();
                    if let Some(release) = sessions_gone(db, &name, sent).await {
                        lease_release.record(release.as_micros() as u64).ok();
                    }
                    tracing::info!(pid = fleet.all[killed].pid, "killed a processor");
                }
                next_kill = Instant::now() + jitter(&mut rng, plan.kill_every);
            }
            if restarts_at.last().is_some_and(|&at| now >= at) {
                restarts_at.pop();
                let cluster = cluster.context("no cluster to restart")?;
                let down = OffsetDateTime::now_utc();
                cluster.stop_server().await.context("stopping the database")?;
                tokio::time::sleep(plan.down_for).await;
                cluster.start_server().await.context("starting the database again")?;
                let outage = Outage { down, up: OffsetDateTime::now_utc(), up_instant: Instant::now() };
                recovering = Some(outage.up_instant);
                tracing::info!("restarted the database");
                outages.push(outage);
            }
        }
        anyhow::Ok(())
    };
    tokio::select! {
        result = faults => {
            result?;
            let _ = stop_producer.send(true);
            (&mut producer).await;
        }
        () = &mut producer => {}
    }
    let produced = std::mem::take(&mut *ledger.lock());
    // The tail: the queue drains with every child alive.
    let producer_stopped = Instant::now();
    let drained = loop {
        fleet.check()?;
        if backlog(db).await == Some(0) {
            break true;
        }
        if producer_stopped.elapsed() > DRAIN_PATIENCE {
            break false;
        }
        tokio::time::sleep(TICK).await;
    };
    let final_drain = producer_stopped.elapsed();
    let mut client = db.connect().await?;
    let locked_while_idle = bench::locked_rows(&mut client).await?;
    let stop_failures = fleet.stop().await;
    let throughput = Throughput::new(Produced::count(&produced.acked), clock);

    let states = bench::end_states(&client).await?;
    let audit = bench::outcome_audit(&client).await?;
    let locked_after = bench::locked_rows(&mut client).await?;
    let seqs = bench::sequence_numbers(&client).await?;
    let latency = histogram(bench::completion_latencies_us(&client).await?)?;
    let (from, until): (Vec<_>, Vec<_>) =
        outages.iter().map(|o| (o.down - OUTAGE_SLACK, o.up + AFTER_OUTAGE)).unzip();
    let calm_latency = histogram(bench::completion_latencies_outside_us(&client, &from, &until).await?)?;

    let Logs { handlings, fenced_completions } = read_logs(&fleet.all)?;
    let killed_at: Vec<_> = fleet.all.iter().map(|p| p.killed_at).collect();
    let rehandled = classify_rehandlings(&handlings, &killed_at, &outages);
    let mut checks = ranges_check(&seqs, &produced);
    checks.extend([
        Check::count("events still queued after the drain", states.queued, !drained),
        Check::count("events set aside dead (every handler succeeds)", states.dead, false),
        Check::count("events processed before they were created", states.processed_before_created, false),
        Check::count("events without exactly one committed success", audit.events_without_one_success, false),
        Check::count("committed failures (every handler succeeds)", audit.failures, false),
        Check::count("rows locked once the queue was empty", locked_while_idle, false),
        Check::count("rows locked after every processor stopped", locked_after, false),
        Check::count(
            "processed events never seen handled in a log",
            (states.processed - i64::try_from(handlings.len()).unwrap_or(i64::MAX)).max(0),
            false,
        ),
        Check::list("events handled again under a live claim", rehandled.unexplained),
        Check::list("completions that found their events already processed", fenced_completions),
        Check::list("processors that exited without being told to", fleet.unexpected_exits.clone()),
        Check::list("processors that did not exit 0 on SIGTERM", stop_failures),
    ]);
    let passed = checks.iter().all(|c| c.found == 0);
    let report = SoakReport {
        minutes: plan.duration.as_secs_f64() / 60.0,
        rate: plan.rate,
        processors: plan.processors,
        seed: plan.seed,
        load_before,
        load_after: crate::report::load(),
        produced: Produced::count(&produced.acked),
        producer_uncertain: Produced::count(&produced.uncertain),
        producer_refused_connections: produced.refused,
        rows: seqs.len() as u64,
        processed: states.processed.unsigned_abs(),
        dead: states.dead.unsigned_abs(),
        throughput,
        kills,
        restarts: outages.len(),
        down_s: plan.down_for.as_secs_f64(),
        lease_release_after_kill: (!lease_release.is_empty()).then(|| Percentiles::of(&lease_release)),
        recovery_after_restart_ms: recoveries,
        max_backlog,
        processed_latency: Percentiles::of(&latency),
        processed_latency_outside_outages: Percentiles::of(&calm_latency),
        final_drain_s: final_drain.as_secs_f64(),
        handlings: handlings.values().map(|h| h.len() as u64).sum(),
        rehandled_after_kill: rehandled.after_kill,
        rehandled_after_outage: rehandled.after_outage,
        checks,
        passed,
        seconds: began.elapsed().as_secs_f64(),
    };
    if passed {
        let _ = std::fs::remove_dir_all(&fleet.workdir);
    } else {
        eprintln!("hook-bench: the children's logs are kept in {}", fleet.workdir.display());
    }
    Ok(report)
}

impl Check {
    fn count(what: &'static str, found: i64, failed: bool) -> Check {
        Check { what, found: found.max(i64::from(failed)).unsigned_abs(), examples: Vec::new() }
    }

    fn list(what: &'static str, mut examples: Vec<String>) -> Check {
        let found = examples.len() as u64;
        examples.truncate(5);
        Check { what, found, examples }
    }
}

fn histogram(values: Vec<i64>) -> anyhow::Result<Histogram<u64>> {
    let mut histogram = Histogram::<u64>::new(3).context("histogram")?;
    for value in values {
        histogram.record(value.max(0).unsigned_abs()).ok();
    }
    Ok(histogram)
}

/// Uniform in 0.5x..1.5x of `mean`.
fn jitter(rng: &mut StdRng, mean: Duration) -> Duration {
    mean.mul_f64(rng.gen_range(0.5..1.5))
}

/// Live queued events, or `None` while the database cannot be asked.
async fn backlog(db: &Db) -> Option<i64> {
    let client = db.connect().await.ok()?;
    bench::unprocessed_count(&client).await.ok()
}

/// How long after `since` the server had no session named `name` left, or `None` if that
/// could not be seen within 30 s.
async fn sessions_gone(db: &Db, name: &str, since: Instant) -> Option<Duration> {
    let client = db.connect().await.ok()?;
    while since.elapsed() < Duration::from_secs(30) {
        if bench::sessions(&client, name).await.ok()? == 0 {
            return Some(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    None
}

/// The checks of the rows' sequence numbers against what the producer sent.
fn ranges_check(seqs: &[i64], produced: &Produced) -> Vec<Check> {
    let mut seen: HashMap<i64, u32> = HashMap::with_capacity(seqs.len());
    for &seq in seqs {
        *seen.entry(seq).or_default() += 1;
    }
    let mut sent: Vec<(i64, i64)> = produced.acked.iter().chain(&produced.uncertain).copied().collect();
    sent.sort_unstable();
    // The ranges do not overlap: the last one starting at or before `seq` is the only candidate.
    let was_sent = |seq: i64| {
        let after = sent.partition_point(|&(first, _)| first <= seq);
        after > 0 && seq <= sent[after - 1].1
    };
    let mut lost = Vec::new();
    for &(first, last) in &produced.acked {
        lost.extend((first..=last).filter(|seq| !seen.contains_key(seq)).map(|seq| format!("seq {seq}")));
    }
    let duplicated: Vec<String> =
        seen.iter().filter(|&(_, &n)| n > 1).map(|(seq, n)| format!("seq {seq} x{n}")).collect();
    let strangers: Vec<String> =
        seen.keys().filter(|&&seq| !was_sent(seq)).map(|seq| format!("seq {seq}")).collect();
    vec![
        Check::list("acknowledged events missing from the table", lost),
        Check::list("events in the table more than once", duplicated),
        Check::list("rows the producer never sent", strangers),
    ]
}

/// Handlings by event id: (when, index of the child), in time order.
type Handlings = HashMap<String, Vec<(OffsetDateTime, usize)>>;

/// What the processor logs when a batch's outcomes matched fewer unprocessed rows than it had:
/// some event was completed by someone else meanwhile.
const FENCED_COMPLETION: &str = "some outcomes matched no unprocessed row";

/// What the children's logs say.
#[derive(Debug, Default)]
struct Logs {
    handlings: Handlings,
    /// Batches whose completion found some of their events already processed.
    fenced_completions: Vec<String>,
}

/// Reads every child's log.
fn read_logs(all: &[Processor]) -> anyhow::Result<Logs> {
    let mut logs = Logs::default();
    for (i, p) in all.iter().enumerate() {
        let text = std::fs::read_to_string(&p.log).with_context(|| format!("reading {}", p.log.display()))?;
        logs.parse(&text, i).with_context(|| format!("reading {}", p.log.display()))?;
    }
    for list in logs.handlings.values_mut() {
        list.sort_unstable();
    }
    Ok(logs)
}

impl Logs {
    /// Adds what child `child`'s JSON log says; the handlings are left unsorted.
    fn parse(&mut self, text: &str, child: usize) -> anyhow::Result<()> {
        #[derive(serde::Deserialize)]
        struct Line {
            timestamp: String,
            message: String,
            event_id: Option<String>,
        }
        // A line cut short by SIGKILL does not parse, and its batch never committed.
        for line in text.lines() {
            if line.contains(FENCED_COMPLETION) {
                self.fenced_completions.push(format!("child #{child}: {line}"));
            }
            if !line.contains("\"handled\"") {
                continue;
            }
            let Ok(line) = serde_json::from_str::<Line>(line) else { continue };
            let (Some(id), "handled") = (line.event_id, line.message.as_str()) else { continue };
            let at = OffsetDateTime::parse(&line.timestamp, &Rfc3339)
                .with_context(|| format!("a timestamp: {:?}", line.timestamp))?;
            self.handlings.entry(id).or_default().push((at, child));
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Rehandled {
    after_kill: u64,
    after_outage: u64,
    unexplained: Vec<String>,
}

/// Sorts every handling but an event's last (the one that committed) by what excuses it: its
/// child was killed after it and before the next handling of the event, or the database went
/// down around it (from [`OUTAGE_SLACK`] before the stop until it was back) and the next
/// handling came after the stop. `killed_at[i]`: when child `i` was killed, if it was.
fn classify_rehandlings(
    handlings: &Handlings,
    killed_at: &[Option<OffsetDateTime>],
    outages: &[Outage],
) -> Rehandled {
    let mut rehandled = Rehandled::default();
    for (id, list) in handlings {
        for pair in list.windows(2) {
            let ((at, i), (next, _)) = (pair[0], pair[1]);
            if killed_at.get(i).copied().flatten().is_some_and(|killed| at <= killed && killed <= next) {
                rehandled.after_kill += 1;
            } else if outages.iter().any(|o| at >= o.down - OUTAGE_SLACK && at <= o.up && next >= o.down) {
                rehandled.after_outage += 1;
            } else {
                rehandled.unexplained.push(format!("event {id}: by child #{i} at {at}, again at {next}"));
            }
        }
    }
    rehandled
}

impl SoakReport {
    /// The report as a table for a terminal.
    pub(crate) fn table(&self) -> String {
        use std::fmt::Write as _;
        let ms = |us: u64| format!("{:.1} ms", us as f64 / 1000.0);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "hook-bench soak: {:.1} min, {} events/s, {} processors, seed {}, load {:.2} -> {:.2}",
            self.minutes, self.rate, self.processors, self.seed, self.load_before[0], self.load_after[0]
        );
        let _ = writeln!(
            out,
            "produced {} acknowledged (+{} with unknown commit, {} refused connections); table {} rows: {} processed, {} dead",
            self.produced, self.producer_uncertain, self.producer_refused_connections, self.rows, self.processed, self.dead
        );
        let _ = writeln!(
            out,
            "faults: {} SIGKILLs, {} database restarts ({:.1} s down each)",
            self.kills, self.restarts, self.down_s
        );
        if let Some(l) = &self.lease_release_after_kill {
            let _ =
                writeln!(out, "leases released after SIGKILL: p50 {}, max {}", ms(l.p50_us), ms(l.max_us));
        }
        let _ = writeln!(
            out,
            "recovery after restart (backlog back under 1 s of load): {:?} ms; max backlog {}",
            self.recovery_after_restart_ms, self.max_backlog
        );
        for (what, p) in [
            ("all events", &self.processed_latency),
            ("outside restarts", &self.processed_latency_outside_outages),
        ] {
            let _ = writeln!(
                out,
                "processed_at - created_at, {what}: p50 {}, p95 {}, p99 {}, max {}",
                ms(p.p50_us),
                ms(p.p95_us),
                ms(p.p99_us),
                ms(p.max_us)
            );
        }
        let _ = writeln!(
            out,
            "handlings {}; handled again after a kill {}, after an outage {}; final drain {:.2} s; machine CPU busy {:.0}%",
            self.handlings,
            self.rehandled_after_kill,
            self.rehandled_after_outage,
            self.final_drain_s,
            self.throughput.machine_cpu_busy * 100.0
        );
        let _ = writeln!(out, "checks:");
        for check in &self.checks {
            let mark = if check.found == 0 { "ok  " } else { "FAIL" };
            let _ = writeln!(out, "  {mark} {:<55} {}", check.what, check.found);
            for example in &check.examples {
                let _ = writeln!(out, "         {example}");
            }
        }
        let _ = writeln!(out, "{} ({:.0} s)", if self.passed { "PASSED" } else { "FAILED" }, self.seconds);
        out
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    const ID: &str = "0b6f2c1e-6a51-4c57-9d4e-2f1f4b1f0a01";

    fn handled(at: &str, id: &str) -> String {
        format!(
            r#"{{"timestamp":"{at}","level":"DEBUG","message":"handled","event_id":"{id}","source":"Stop","action":"response_completed","attempt":1,"target":"hook_core::engine"}}"#
        )
    }

    #[test]
    fn handlings_and_fenced_completions_are_read_from_json_logs_and_a_line_cut_short_is_skipped() {
        let log = [
            r#"{"timestamp":"2026-11-25T17:00:00.000001Z","level":"INFO","message":"listening"}"#.to_owned(),
            handled("2026-11-25T17:00:01.5Z", ID),
            r#"{"timestamp":"2026-11-25T17:00:01.6Z","level":"DEBUG","message":"handled session end","event_id":"x"}"#
                .to_owned(),
            handled("2026-11-25T17:00:02Z", "other")[..60].to_owned(),
        ]
        .join("\n");
        let mut logs = Logs::default();
        logs.parse(&log, 3).unwrap();
        assert_eq!(logs.handlings.len(), 1, "{:?}", logs.handlings);
        assert_eq!(logs.handlings[ID], vec![(datetime!(2026-11-25 17:00:01.5 UTC), 3)]);
        assert!(logs.fenced_completions.is_empty());
        let fenced = r#"{"timestamp":"2026-11-25T17:00:03Z","level":"WARN","expected":100,"written":99,"message":"some outcomes matched no unprocessed row"}"#;
        logs.parse(fenced, 1).unwrap();
        assert_eq!(logs.fenced_completions.len(), 1);
    }

    #[test]
    fn a_rehandling_is_excused_only_by_a_later_kill_or_an_outage_around_it() {
        let t = |s: i64| datetime!(2026-11-25 17:00:00 UTC) + time::Duration::seconds(s);
        let killed_at = [Some(t(10)), None, None];
        let outage = Outage { down: t(100), up: t(105), up_instant: Instant::now() };
        let mut handlings = Handlings::new();
        // Child 0 handled it, was killed later; child 1 committed.
        handlings.insert("killed".into(), vec![(t(9), 0), (t(11), 1)]);
        // Child 1 handled it just before the database went down; child 2 committed.
        handlings.insert("outage".into(), vec![(t(99), 1), (t(106), 2)]);
        // Child 1 handled it and was neither killed nor hit by an outage: a live claim.
        handlings.insert("live".into(), vec![(t(50), 1), (t(51), 2)]);
        // Child 0 handled it, then child 2 did, and only then was child 0 killed: the two
        // handlings overlapped under child 0's live claim.
        handlings.insert("late kill".into(), vec![(t(8), 0), (t(9), 2)]);
        // Handled once: nothing to excuse.
        handlings.insert("once".into(), vec![(t(1), 2)]);
        let rehandled = classify_rehandlings(&handlings, &killed_at, &[outage]);
        assert_eq!((rehandled.after_kill, rehandled.after_outage), (1, 1));
        let mut unexplained = rehandled.unexplained;
        unexplained.sort();
        assert_eq!(unexplained.len(), 2, "{unexplained:?}");
        assert!(unexplained[0].starts_with("event late kill: by child #0"), "{unexplained:?}");
        assert!(unexplained[1].starts_with("event live: by child #1"), "{unexplained:?}");
    }

    #[test]
    fn rows_are_checked_against_what_the_producer_sent() {
        let produced = Produced { acked: vec![(1, 5), (8, 9)], uncertain: vec![(6, 7)], refused: 0 };
        // 3 lost, 5 twice, 6 from an uncertain insert (fine), 42 from nowhere.
        let seqs = [1, 2, 4, 5, 5, 6, 8, 9, 42];
        let checks = ranges_check(&seqs, &produced);
        let found: Vec<(&str, u64)> = checks.iter().map(|c| (c.what, c.found)).collect();
        assert_eq!(
            found,
            [
                ("acknowledged events missing from the table", 1),
                ("events in the table more than once", 1),
                ("rows the producer never sent", 1),
            ]
        );
        assert_eq!(checks[0].examples, ["seq 3"]);
        assert_eq!(checks[2].examples, ["seq 42"]);
        let clean = ranges_check(&[1, 2, 3, 4, 5, 8, 9], &produced);
        assert!(clean.iter().all(|c| c.found == 0), "{clean:?}");
    }
}
