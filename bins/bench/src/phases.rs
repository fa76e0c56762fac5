//! The measurements. Every phase starts from the same state: an emptied table, its backlog (if
//! any) bulk-inserted without NOTIFY, then `VACUUM (ANALYZE)` and a checkpoint.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use hook_core::{Engine, EngineConfig, HandlerResult, HookEvent, Store};
use hook_store::deadpool_postgres::{Manager, ManagerConfig, Object as Client, Pool, RecyclingMethod};
use hook_store::tokio_postgres::{Config, NoTls};
use hook_store::{bench, PgStore, StoreOptions};
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::report::{BaselineDrain, CpuClock, Latency, Percentiles, ProcessorDrain, Throughput};
use crate::Plan;

/// Rows per INSERT statement when building a backlog.
const INSERT_CHUNK: i64 = 20_000;
/// The original service's settings.
const BASELINE_POLL: Duration = Duration::from_secs(1);
const BASELINE_BATCH: i64 = 100;
/// `MAX_RETRY_COUNT`'s default.
const MAX_RETRY_COUNT: i32 = 3;

/// The database under test.
pub(crate) struct Db {
    config: Config,
    /// The same, as a URL for the hook-processor children.
    pub(crate) url: String,
    pub(crate) embedded: bool,
    /// The bench's own connections (producer, limit loop, baseline, read-outs).
    pool: Pool,
    /// The server's postmaster, when it runs on this machine: its CPU time and its children's
    /// are the server's share of each drain.
    pub(crate) postmaster: Option<u32>,
}

impl Db {
    /// `connections`: the most the bench holds at once (the limit loops, plus two).
    pub(crate) fn new(config: Config, url: String, embedded: bool, connections: usize) -> anyhow::Result<Db> {
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        // A bounded wait: a bench that needs more connections than its pool fails, not hangs.
        let pool = Pool::builder(manager)
            .max_size(connections)
            .runtime(hook_store::deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(60)))
            .build()
            .context("building the connection pool")?;
        Ok(Db { config, url, embedded, pool, postmaster: None })
    }

    /// The connection settings.
    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    pub(crate) async fn connect(&self) -> anyhow::Result<Client> {
        self.pool.get().await.context("connecting")
    }

    /// Finds the server's postmaster (the parent of a server process of ours), if the server runs
    /// on this machine, so that the drains can report the server's CPU time.
    pub(crate) async fn find_postmaster(&mut self) -> anyhow::Result<()> {
        let client = self.connect().await?;
        let backend = bench::backend_pid(&client).await?;
        self.postmaster = crate::report::postmaster_of(backend);
        Ok(())
    }

    /// A clock of this process's, the server's and the machine's CPU time, from now on.
    pub(crate) fn clock(&self) -> CpuClock {
        CpuClock::start(self.postmaster)
    }

    pub(crate) async fn store(&self, plan: &Plan) -> anyhow::Result<PgStore> {
        let options =
            StoreOptions { pool_size: plan.engine.batches_in_flight + 2, ..StoreOptions::default() };
        PgStore::connect(self.config.clone(), options).await.context("connecting the store")
    }
}

/// Empties the table, inserts `n` events (no NOTIFY) and settles it.
pub(crate) async fn backlog(db: &Db, n: u64) -> anyhow::Result<()> {
    let mut client = db.connect().await?;
    bench::truncate(&client).await?;
    let n = i64::try_from(n).context("backlog too large")?;
    let mut first = 1;
    while first <= n {
        let last = (first + INSERT_CHUNK - 1).min(n);
        bench::insert_backlog(&mut client, first, last).await.context("inserting the backlog")?;
        first = last + 1;
    }
    settle(&client).await
}

async fn settle(client: &Client) -> anyhow::Result<()> {
    if !bench::settle(client).await.context("vacuuming")? {
        tracing::warn!("CHECKPOINT refused (needs superuser or pg_checkpoint); phases may pay for each other's checkpoints");
    }
    Ok(())
}

/// The limit: `connections` loops side by side, each claiming and completing `limit_batch`
/// events per autocommitted statement until nothing is left.
pub(crate) async fn limit_drain(db: &Db, plan: &Plan, connections: usize) -> anyhow::Result<Throughput> {
    backlog(db, plan.events).await?;
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections {
        let client = db.connect().await?;
        // Prepared before the clock starts, as the engine's statements are prepared once per
        // connection.
        bench::limit_step(&client, 0, MAX_RETRY_COUNT).await?;
        clients.push(client);
    }
    let clock = db.clock();
    let loops = clients.into_iter().map(|client| async move {
        let mut done = 0;
        loop {
            let n = bench::limit_step(&client, plan.limit_batch, MAX_RETRY_COUNT).await?;
            if n == 0 {
                return Ok::<u64, hook_store::StoreError>(done);
            }
            done += n;
        }
    });
    let done: u64 = futures::future::try_join_all(loops).await?.into_iter().sum();
    let mut drain = Throughput::new(done, clock);
    anyhow::ensure!(done == plan.events, "the limit loop completed {done} of {} events", plan.events);
    drain.result_metadata_bytes = bench::mean_result_metadata_bytes(&db.connect().await?).await?;
    Ok(drain)
}

/// The engine with a no-op handler on every route, in this process.
pub(crate) async fn engine_drain(db: &Db, plan: &Plan) -> anyhow::Result<Throughput> {
    backlog(db, plan.events).await?;
    let store = db.store(plan).await?;
    let engine = Engine::builder(store)
        .handler("*", "*", |_event: Arc<HookEvent>| std::future::ready(HandlerResult::ok("")))
        .config(plan.engine.clone())
        .build()?;
    let metrics = engine.metrics();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let clock = db.clock();
    let task = tokio::spawn(engine.run(async move {
        let _ = stopped.await;
    }));
    let deadline = Instant::now() + Duration::from_secs(600);
    // Checked every 5 ms: finer, and this loop's own wakeups would show in the engine's CPU.
    while metrics.snapshot().processed < plan.events {
        anyhow::ensure!(Instant::now() < deadline, "the engine did not drain the backlog in 10 minutes");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut drain = Throughput::new(plan.events, clock);
    let _ = stop.send(());
    let totals = task.await.context("engine task")?;
    let client = db.connect().await?;
    let left = bench::unprocessed_count(&client).await?;
    anyhow::ensure!(left == 0 && totals.succeeded == plan.events, "engine drain: {left} left, {totals}");
    drain.result_metadata_bytes = bench::mean_result_metadata_bytes(&client).await?;
    Ok(drain)
}

/// Handler starts, recorded by the handler: the wait since `created_at`, and the start time
/// by the event's `metadata.seq`, to be matched with its producer's commit.
#[derive(Clone, Default)]
struct Pickups(Arc<Mutex<Vec<(i64, OffsetDateTime, OffsetDateTime)>>>);

impl Pickups {
    fn record(&self, event: &HookEvent) {
        let now = OffsetDateTime::now_utc();
        let seq = event.metadata.get("seq").and_then(serde_json::Value::as_i64).unwrap_or(-1);
        if let Ok(mut starts) = self.0.lock() {
            starts.push((seq, event.created_at, now));
        }
    }

    /// Handler start − created_at, and handler start − the producer's commit acknowledgement
    /// (`acked[seq - 1]`; a start before the acknowledgement counts as 0).
    fn histograms(
        &self,
        acked: &[Instant],
        origin: (Instant, OffsetDateTime),
    ) -> anyhow::Result<(Histogram<u64>, Histogram<u64>)> {
        let starts = self.0.lock().map(|s| s.clone()).unwrap_or_else(|p| p.into_inner().clone());
        let (mut since_created, mut since_commit) = (histogram()?, histogram()?);
        for (seq, created_at, started) in starts {
            since_created.saturating_record(micros(started - created_at));
            let ack = usize::try_from(seq - 1).ok().and_then(|i| acked.get(i));
            if let Some(&ack) = ack {
                let ack_wall = origin.1 + (ack - origin.0);
                since_commit.saturating_record(micros(started - ack_wall));
            }
        }
        Ok((since_created, since_commit))
    }
}

fn micros(d: time::Duration) -> u64 {
    u64::try_from(d.whole_microseconds()).unwrap_or(0)
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    // 1 µs to 1 h, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).context("creating a histogram")
}

/// A trickle's record: when each insert was acknowledged, and the INSERT round trips.
struct Trickle {
    inserted: u64,
    /// `acked[i - 1]`: when the producer's commit of event `i` was acknowledged.
    acked: Vec<Instant>,
    /// `acked`'s clock against the wall clock that `created_at` and the handlers use.
    origin: (Instant, OffsetDateTime),
    round_trips: Histogram<u64>,
}

/// Inserts `rate` events per second for `duration`, one autocommitted INSERT each (so each
/// sends its NOTIFY), from its own connection. An INSERT's round trip includes the commit's WAL
/// flush, before which no one can see the row.
async fn trickle(db: &Db, rate: f64, duration: Duration) -> anyhow::Result<Trickle> {
    let client = db.connect().await?;
    let total = (rate * duration.as_secs_f64()).round().max(1.0) as i64;
    let mut round_trips = histogram()?;
    let mut acked = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    let origin = (Instant::now(), OffsetDateTime::now_utc());
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for i in 1..=total {
        tick.tick().await;
        let sent = Instant::now();
        bench::insert_one(&client, i).await?;
        let ack = Instant::now();
        acked.push(ack);
        round_trips.saturating_record(u64::try_from((ack - sent).as_micros()).unwrap_or(u64::MAX));
    }
    Ok(Trickle { inserted: total as u64, acked, origin, round_trips })
}

async fn wait_until_processed(client: &Client, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while bench::unprocessed_count(client).await? > 0 {
        anyhow::ensure!(Instant::now() < deadline, "events still unprocessed {within:?} after the trickle");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn completion_latencies(client: &Client) -> anyhow::Result<Histogram<u64>> {
    let mut histogram = histogram()?;
    for us in bench::completion_latencies_us(client).await? {
        histogram.saturating_record(u64::try_from(us).unwrap_or(0));
    }
    Ok(histogram)
}

async fn latency(
    trickle: Trickle,
    waited: anyhow::Result<()>,
    pickups: &Pickups,
    client: &Client,
) -> anyhow::Result<Latency> {
    waited?;
    let (since_created, since_commit) = pickups.histograms(&trickle.acked, trickle.origin)?;
    Ok(Latency {
        events: trickle.inserted,
        producer_insert: Percentiles::of(&trickle.round_trips),
        pickup: Percentiles::of(&since_created),
        pickup_after_commit: Percentiles::of(&since_commit),
        processed: Percentiles::of(&completion_latencies(client).await?),
    })
}

/// The trickle with nobody consuming: the producer's INSERT round trips alone, the floor under
/// every pickup latency (a row is invisible until its commit's WAL flush is done).
pub(crate) async fn producer_floor(db: &Db, plan: &Plan) -> anyhow::Result<Percentiles> {
    let client = db.connect().await?;
    bench::truncate(&client).await?;
    settle(&client).await?;
    let trickle = trickle(db, plan.rate, plan.duration).await?;
    bench::truncate(&client).await?;
    Ok(Percentiles::of(&trickle.round_trips))
}

/// The engine idle on an empty table, then a steady trickle.
pub(crate) async fn engine_latency(db: &Db, plan: &Plan) -> anyhow::Result<Latency> {
    let client = db.connect().await?;
    bench::truncate(&client).await?;
    settle(&client).await?;
    let store = db.store(plan).await?;
    let mut wakeups = store.wakeups().context("the store is not listening")?;
    let pickups = Pickups::default();
    let recorder = pickups.clone();
    let engine = Engine::builder(store)
        .handler("*", "*", move |event: Arc<HookEvent>| {
            recorder.record(&event);
            std::future::ready(HandlerResult::ok(""))
        })
        .config(plan.engine.clone())
        .build()?;
    // LISTEN is established when the first wakeup arrives.
    tokio::time::timeout(Duration::from_secs(10), wakeups.changed())
        .await
        .context("LISTEN was not established in 10 s")?
        .context("the listener stopped")?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(engine.run(async move {
        let _ = stopped.await;
    }));
    let inserted = trickle(db, plan.rate, plan.duration).await;
    let waited = wait_until_processed(&client, Duration::from_secs(30)).await;
    let _ = stop.send(());
    task.await.context("engine task")?;
    latency(inserted?, waited, &pickups, &client).await
}

/// The original service's loop: fetch up to 100 events (autocommit: the row locks end with the
/// SELECT), run the handler and commit each event's update on its own, then sleep a poll
/// interval whatever was found. Returns the time spent outside the sleeps.
async fn baseline_loop(
    client: Client,
    pickups: Pickups,
    processed: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<Duration> {
    let mut busy = Duration::ZERO;
    while !*stop.borrow() {
        let started = Instant::now();
        let events = bench::baseline_fetch(&client, BASELINE_BATCH, MAX_RETRY_COUNT).await?;
        for event in events {
            pickups.record(&event);
            bench::baseline_mark_processed(&client, event.id).await?;
            processed.fetch_add(1, Ordering::Relaxed);
        }
        busy += started.elapsed();
        tokio::select! {
            _ = stop.changed() => {}
            () = tokio::time::sleep(BASELINE_POLL) => {}
        }
    }
    Ok(busy)
}

struct Baseline {
    pickups: Pickups,
    processed: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<Duration>>,
}

impl Baseline {
    async fn start(db: &Db) -> anyhow::Result<Baseline> {
        let pickups = Pickups::default();
        let processed = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = watch::channel(false);
        let client = db.connect().await?;
        let task = tokio::spawn(baseline_loop(client, pickups.clone(), Arc::clone(&processed), stopped));
        Ok(Baseline { pickups, processed, stop, task })
    }

    async fn stop(self) -> anyhow::Result<(Pickups, Duration)> {
        let _ = self.stop.send(true);
        let busy = self.task.await.context("baseline task")??;
        Ok((self.pickups, busy))
    }
}

/// The original's algorithm under the same trickle as [`engine_latency`].
pub(crate) async fn baseline_latency(db: &Db, plan: &Plan) -> anyhow::Result<Latency> {
    let client = db.connect().await?;
    bench::truncate(&client).await?;
    settle(&client).await?;
    let baseline = Baseline::start(db).await?;
    let inserted = trickle(db, plan.rate, plan.duration).await;
    let waited = wait_until_processed(&client, Duration::from_secs(30)).await;
    let (pickups, _) = baseline.stop().await?;
    latency(inserted?, waited, &pickups, &client).await
}

/// The original's algorithm draining a backlog of `baseline_events`. Also reports its rate
/// outside the poll sleeps (what one commit per event allows).
pub(crate) async fn baseline_drain(db: &Db, plan: &Plan) -> anyhow::Result<BaselineDrain> {
    backlog(db, plan.baseline_events).await?;
    let clock = db.clock();
    let baseline = Baseline::start(db).await?;
    let deadline = Instant::now() + Duration::from_secs(3600);
    while baseline.processed.load(Ordering::Relaxed) < plan.baseline_events {
        anyhow::ensure!(Instant::now() < deadline, "the baseline did not drain its backlog in an hour");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let drain = Throughput::new(plan.baseline_events, clock);
    let (_, busy) = baseline.stop().await?;
    let busy_rate = plan.baseline_events as f64 / busy.as_secs_f64().max(1e-9);
    Ok(BaselineDrain { drain, busy_events_per_s: busy_rate })
}

/// The hook-processor binary as shipped (its default handlers, log level and settings, the run's
/// engine settings) as a child process draining the backlog: the headline drain. Timed from the
/// moment it logs that its engine started (so its start-up, reported apart, is not counted) until
/// a poll (every 10 ms, one probe of the claim index) finds no event left. Its peak RSS is the
/// kernel's high-water mark (`VmHWM`), read just before it is sent SIGTERM.
pub(crate) async fn processor_drain(db: &Db, plan: &Plan) -> anyhow::Result<ProcessorDrain> {
    anyhow::ensure!(
        plan.processor_bin.is_file(),
        "no hook-processor binary at {} (build it with `cargo build --release -p hook-processor`, \
         or pass --processor-bin)",
        plan.processor_bin.display()
    );
    backlog(db, plan.events).await?;
    let client = db.connect().await?;
    bench::any_unprocessed(&client).await?;
    // A scratch working directory, so that no .env of the caller's is read.
    let workdir = std::env::temp_dir().join(format!("hook-bench-processor-{}", std::process::id()));
    std::fs::create_dir_all(&workdir).with_context(|| format!("creating {}", workdir.display()))?;
    let log_path = workdir.join("hook-processor.log");
    let log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let spawned = Instant::now();
    let mut child = processor_command(&plan.processor_bin, &db.url, &plan.engine, &workdir, log)
        .spawn()
        .with_context(|| format!("starting {}", plan.processor_bin.display()))?;
    let pid = child.id().context("the processor exited at once")?;
    let deadline = spawned + Duration::from_secs(600);
    // The engine's first line, logged just before its first claim.
    while !std::fs::read_to_string(&log_path).unwrap_or_default().contains("engine started") {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("hook-processor exited early ({status}); its log: {}", tail(&log_path));
        }
        anyhow::ensure!(Instant::now() < deadline, "hook-processor did not start in 10 minutes");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let clock = db.clock();
    let startup = spawned.elapsed();
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if !bench::any_unprocessed(&client).await? {
            break;
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("hook-processor exited early ({status}); its log: {}", tail(&log_path));
        }
        anyhow::ensure!(Instant::now() < deadline, "hook-processor did not drain the backlog in 10 minutes");
    }
    let mut drain = Throughput::new(plan.events, clock);
    let peak_kib = vm_hwm_kib(pid).unwrap_or(0);
    // Its whole life's CPU time, start-up included (a few milliseconds).
    let child_ticks = crate::report::process_cpu_ticks(&pid.to_string()).unwrap_or(0);
    drain.client_cpu_us_per_event = crate::report::cpu_us_per_event(child_ticks, plan.events);
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).context("pid out of range")?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).context("stopping hook-processor")?;
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .context("hook-processor did not stop within 30 s of SIGTERM")??;
    anyhow::ensure!(status.success(), "hook-processor failed ({status}); its log: {}", tail(&log_path));
    let _ = std::fs::remove_dir_all(&workdir);
    drain.result_metadata_bytes = bench::mean_result_metadata_bytes(&client).await?;
    Ok(ProcessorDrain { drain, peak_rss_kib: peak_kib, startup_s: startup.as_secs_f64() })
}

/// The hook-processor at `program` on the database at `url` with the engine's settings, in the
/// scratch directory `workdir` (so that no `.env` of the caller's is read), its stderr to `log`,
/// and none of the caller's variables that it reads (its default log level, as deployed).
/// Killed if dropped.
pub(crate) fn processor_command(
    program: &Path,
    url: &str,
    engine: &EngineConfig,
    workdir: &Path,
    log: std::fs::File,
) -> tokio::process::Command {
    let mut command = tokio::process::Command::from(hook_store::binary_command(program));
    command
        .current_dir(workdir)
        .env("DATABASE_URL", url)
        .env("HOOK_METRICS_INTERVAL", "0")
        .env("BATCH_SIZE", engine.batch_size.to_string())
        .env("HOOK_BATCHES_IN_FLIGHT", engine.batches_in_flight.to_string())
        .env("HOOK_CLAIMS_IN_FLIGHT", engine.claims_in_flight.to_string())
        .env("HOOK_CONCURRENCY", engine.concurrency.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true);
    command
}

/// The `VmHWM` (peak resident set) of a process, in KiB.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The last lines of a child's log, for an error message.
pub(crate) fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}
