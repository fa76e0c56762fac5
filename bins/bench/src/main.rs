//! `hook-bench`: measures the engine against the database's own claim-and-complete limit and
//! against the original service's algorithm, in one run on one database, so every figure it
//! reports is comparable with the others (see docs/benchmarks.md).
//!
//! With no `DATABASE_URL` it runs on a durable embedded cluster under `--data-dir`.

mod bloat;
mod ingest;
mod phases;
mod pressure;
mod report;
mod sinks;
mod soak;
mod upgrade;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use hook_core::EngineConfig;
use hook_store::{parse_database_url, ClusterOptions, EmbeddedCluster};

use crate::phases::Db;
use crate::report::{LimitRun, Report};

/// Benchmarks hook-events on this machine.
///
/// One run measures, on the same database: the drain of a backlog by a bare SQL loop that claims
/// and completes events writing what the processor writes (the database's own limit), by the
/// hook-processor binary as shipped (default handlers; its peak RSS too), and by the engine in
/// this process with a no-op handler; pickup and completion latency under a steady trickle; and
/// the original service's algorithm (1 s poll, batch 100, one commit per event) measured the same
/// way.
///
/// `hook-bench soak` instead runs hook-processor children under a steady load for minutes while
/// killing them and restarting the database, then checks that nothing was lost, stranded or done
/// twice.
///
/// hook-bench empties `hook_events` before each phase. On DATABASE_URL it refuses a non-empty
/// table unless --truncate is given: point it at a scratch database.
#[derive(Debug, Parser)]
#[command(name = "hook-bench", version, about, long_about)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,

    /// Backlog size of the limit, processor and drain phases.
    #[arg(long, default_value_t = 100_000)]
    events: u64,

    /// Backlog size of the original algorithm's drain (it manages about 100 events/s).
    #[arg(long, default_value_t = 2_000)]
    baseline_events: u64,

    /// Events per second of the latency trickle.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,

    /// How long the latency trickle runs, in seconds.
    #[arg(long, default_value_t = 20.0)]
    duration: f64,

    /// Phases to run, comma separated. `jetstream`, `webhook`, `ingest`, `waiting`, `horizon`
    /// and `bloat` run only when named.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "limit,processor,drain,floor,latency,baseline"
    )]
    phases: Vec<Phase>,

    /// The NATS server of the `jetstream` phase (with JetStream enabled); the phase creates a
    /// stream of its own and deletes it afterwards.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats_url: String,

    /// Rows waiting for a retry in the waiting phase (its trickle is --rate for --duration).
    #[arg(long, default_value_t = 100_000)]
    waiting_rows: u64,

    /// Events per second of the producers of the horizon phase.
    #[arg(long, default_value_t = 500.0)]
    horizon_rate: f64,

    /// How long the horizon phase's producers run while the snapshot is held, in seconds.
    #[arg(long, default_value_t = 600.0)]
    horizon_duration: f64,

    /// Events per second of the producers of the bloat phase.
    #[arg(long, default_value_t = 2_000.0)]
    bloat_rate: f64,

    /// How long the bloat phase's producers run, in seconds.
    #[arg(long, default_value_t = 1_800.0)]
    bloat_duration: f64,

    /// The bloat phase's archiver moves events processed this many seconds ago into the archive
    /// and purges archived rows as old, every 5 s (hook-archive from a timer); 0: no archiver,
    /// every row stays.
    #[arg(long, default_value_t = 60.0)]
    bloat_archive_after: f64,

    /// The ids of the bloat phase's rows: time-ordered (version 7, as hook-ingest makes them) or
    /// random (version 4, as the original's producers make them).
    #[arg(long, value_enum, default_value_t = BloatIds::TimeOrdered)]
    bloat_ids: BloatIds,

    /// The bloat phase's size reference: the table's size this many seconds in.
    #[arg(long, default_value_t = 300.0)]
    bloat_baseline: f64,

    /// HOOK_VACUUM_DEAD_TUPLES of the bloat phase's hook-processor (0: its vacuum task off,
    /// autovacuum alone).
    #[arg(long, default_value_t = 20_000)]
    bloat_vacuum_dead_tuples: u64,

    /// The bloat phase holds a REPEATABLE READ snapshot for its whole run (as the horizon phase
    /// does, but with the hook-processor binary and its vacuum task): what the task costs when
    /// vacuum can remove nothing.
    #[arg(long)]
    bloat_hold_snapshot: bool,

    /// Seconds per row of the waiting, horizon and bloat phases' reports.
    #[arg(long, default_value_t = 60.0)]
    window: f64,

    /// Claims read the fresh index from its beginning, as before the low-water mark: to measure
    /// what the mark saves.
    #[arg(long)]
    no_low_water_mark: bool,

    /// PostgreSQL URL to benchmark on; without it, an embedded cluster under --data-dir.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    database_url: Option<String>,

    /// Directory of the embedded cluster (created on first use, durable: fsync and
    /// synchronous_commit on).
    #[arg(long, default_value = "/tmp/hook-bench-data", global = true)]
    data_dir: PathBuf,

    /// Allow emptying a non-empty hook_events table on DATABASE_URL.
    #[arg(long, global = true)]
    truncate: bool,

    /// Engine: events per claim [default: the engine's default].
    #[arg(long, global = true)]
    batch_size: Option<usize>,

    /// Engine: batches in flight [default: the engine's default].
    #[arg(long, global = true)]
    batches_in_flight: Option<usize>,

    /// Engine: claims on their way at once while a backlog drains [default: the engine's default].
    #[arg(long, global = true)]
    claims_in_flight: Option<usize>,

    /// Engine: handlers running at once [default: the engine's default].
    #[arg(long, global = true)]
    concurrency: Option<usize>,

    /// Rows claimed and completed per statement by the limit loop.
    #[arg(long, default_value_t = 100)]
    limit_batch: i64,

    /// Connections running the limit loop side by side, one measurement each, comma separated;
    /// the best is the limit [default: 1, the engine's batches in flight, and twice that].
    #[arg(long, value_delimiter = ',')]
    limit_connections: Vec<usize>,

    /// The hook-processor binary of the processor phase and the soak [default: next to hook-bench].
    #[arg(long, global = true)]
    processor_bin: Option<PathBuf>,

    /// Calls of hook-ingest per path in the ingest phase (after 20 warm-up calls).
    #[arg(long, default_value_t = 1000)]
    ingest_calls: usize,

    /// The hook-ingest binary of the ingest phase [default: next to the hook-processor binary].
    #[arg(long)]
    ingest_bin: Option<PathBuf>,

    /// Print the report as JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,

    /// Log level or filter for hook-bench's own logs (stderr).
    #[arg(long, default_value = "warn", global = true)]
    log_level: String,
}

/// How the bloat phase makes its rows' ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BloatIds {
    /// Version 7 from each row's `created_at`, as hook-ingest's `Uuid::now_v7()`: each insert at
    /// the primary key's right edge.
    TimeOrdered,
    /// `gen_random_uuid()`: version 4, a random page of the primary key per insert.
    Random,
}

/// Another kind of run than the measurements.
#[derive(Debug, Subcommand)]
enum Command {
    /// Steady load on hook-processor children for minutes, with SIGKILLs and database restarts,
    /// then a consistency check: counts, no duplicates, no stranded leases. Exits 1 if a check
    /// fails.
    Soak(SoakArgs),
    /// The migrations on a large install made the original's way (its DDL, its producers' rows,
    /// its archive SQL) while a producer inserts at a steady rate: how long each migration took,
    /// which locks it held on which table for how long, and how long the producer's inserts
    /// waited. Runs in a database of its own, hook_bench_upgrade, made afresh and dropped after.
    Upgrade(UpgradeArgs),
}

#[derive(Debug, clap::Args)]
struct UpgradeArgs {
    /// Rows left in hook_events.
    #[arg(long, default_value_t = 1_000_000)]
    rows: i64,

    /// Rows in the archive the original's SQL made.
    #[arg(long, default_value_t = 1_000_000)]
    archive_rows: i64,

    /// Inserts per second of the producer.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,

    /// Run the first release's migrations (0001-0005 as first released) instead of this build's.
    #[arg(long)]
    first_release: bool,

    /// Keep a transaction open on hook_events for this many seconds as the migrations start.
    #[arg(long)]
    blocker_secs: Option<f64>,

    /// The runner's first lock_timeout, in milliseconds.
    #[arg(long, default_value_t = 100)]
    lock_timeout_ms: u64,

    /// The runner's longest lock_timeout (each repeat doubles it), in milliseconds.
    #[arg(long, default_value_t = 800)]
    max_lock_timeout_ms: u64,
}

#[derive(Debug, clap::Args)]
struct SoakArgs {
    /// How long the load runs, in minutes.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,

    /// Events per second the producer inserts.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,

    /// hook-processor children running at once.
    #[arg(long, default_value_t = 3)]
    processors: usize,

    /// Mean seconds between two SIGKILLs of a random child (each replaced at once); 0 for none.
    #[arg(long, default_value_t = 15.0)]
    kill_every: f64,

    /// Database restarts, spread evenly over the run (needs the embedded cluster).
    #[arg(long, default_value_t = 2)]
    restarts: usize,

    /// Seconds the database stays down at each restart.
    #[arg(long, default_value_t = 5.0)]
    down_secs: f64,

    /// Seed of the random choices (which child, when) [default: from the clock; printed].
    #[arg(long)]
    seed: Option<u64>,
}

/// One measurement of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Phase {
    /// Drain the backlog with a bare SQL loop writing what the processor writes: the database's
    /// own limit.
    Limit,
    /// Drain the backlog with the hook-processor binary as shipped (default handlers), and read
    /// its peak RSS: the headline.
    #[value(alias = "rss")]
    Processor,
    /// Drain the backlog with the engine in this process and a no-op handler.
    Drain,
    /// The trickle with nobody consuming: the producer's own commit latency.
    Floor,
    /// Pickup and completion latency of the engine under a steady trickle.
    Latency,
    /// The original's algorithm: its drain rate and latency.
    Baseline,
    /// The engine draining the backlog through a nats route into JetStream (acked).
    Jetstream,
    /// The engine draining the backlog through a webhook route into a loopback receiver.
    Webhook,
    /// hook-ingest's time per call, spawn to exit: through the processor's socket, on its own
    /// connection, and with the processor killed (not in the default set).
    Ingest,
    /// Pickup under the trickle on an empty table, then with --waiting-rows rows waiting for a
    /// retry, and the claim's EXPLAIN (ANALYZE, BUFFERS) on both.
    Waiting,
    /// Pickup, CPU per event and dead tuples per window while producers insert at
    /// --horizon-rate and a REPEATABLE READ snapshot is held for --horizon-duration.
    Horizon,
    /// The table's size and dead row versions while the hook-processor binary consumes
    /// --bloat-rate events per second for --bloat-duration and an archiver keeps a window of
    /// --bloat-archive-after seconds.
    Bloat,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hook-bench: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    init_logging(&args.log_level)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let (text, passed) = match &args.command {
        None => {
            let plan = Plan::from_args(&args)?;
            let report = runtime.block_on(bench(&args, &plan))?;
            (render(&report, args.json, Report::table)?, true)
        }
        Some(Command::Soak(soak)) => {
            let plan = soak_plan(&args, soak)?;
            let report = runtime.block_on(run_soak(&args, &plan))?;
            (render(&report, args.json, soak::SoakReport::table)?, report.passed)
        }
        Some(Command::Upgrade(upgrade)) => {
            let plan = upgrade_plan(upgrade)?;
            let report = runtime.block_on(run_upgrade(&args, &plan))?;
            (render(&report, args.json, upgrade::UpgradeReport::table)?, true)
        }
    };
    // The report is the program's output: stdout, where a pipe or redirect takes it.
    std::io::stdout().lock().write_all(text.as_bytes()).context("writing the report")?;
    anyhow::ensure!(passed, "the soak's consistency checks failed (see the report)");
    Ok(())
}

fn render<R: serde::Serialize>(report: &R, json: bool, table: fn(&R) -> String) -> anyhow::Result<String> {
    Ok(if json {
        serde_json::to_string_pretty(report).context("encoding the report")? + "\n"
    } else {
        table(report)
    })
}

/// The engine settings of the flags shared by the measurements and the soak.
fn engine_config(args: &Args) -> anyhow::Result<EngineConfig> {
    let defaults = EngineConfig::default();
    let engine = EngineConfig {
        batch_size: args.batch_size.unwrap_or(defaults.batch_size),
        batches_in_flight: args.batches_in_flight.unwrap_or(defaults.batches_in_flight),
        claims_in_flight: args.claims_in_flight.unwrap_or(defaults.claims_in_flight),
        concurrency: args.concurrency.unwrap_or(defaults.concurrency),
        metrics_interval: None,
        ..defaults
    };
    engine.validate().context("invalid engine settings")?;
    Ok(engine)
}

fn processor_bin(args: &Args) -> anyhow::Result<PathBuf> {
    match &args.processor_bin {
        Some(path) => Ok(path.clone()),
        None => Ok(std::env::current_exe().context("locating hook-bench")?.with_file_name("hook-processor")),
    }
}

fn soak_plan(args: &Args, soak: &SoakArgs) -> anyhow::Result<soak::SoakPlan> {
    anyhow::ensure!(soak.minutes > 0.0 && soak.minutes <= 24.0 * 60.0, "--minutes must be in (0, 1440]");
    anyhow::ensure!(soak.rate > 0.0 && soak.rate <= 20_000.0, "--rate must be in (0, 20000]");
    anyhow::ensure!((1..=8).contains(&soak.processors), "--processors must be in 1..=8");
    anyhow::ensure!(
        soak.kill_every >= 0.0 && soak.kill_every.is_finite(),
        "--kill-every must be 0 or more seconds"
    );
    anyhow::ensure!(soak.down_secs >= 0.0 && soak.down_secs <= 600.0, "--down-secs must be in [0, 600]");
    anyhow::ensure!(
        soak.restarts == 0 || args.database_url.is_none(),
        "--restarts needs the embedded cluster (run without DATABASE_URL), or pass --restarts 0"
    );
    let seed = soak.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    eprintln!("hook-bench soak: seed {seed} (replay the same faults with --seed {seed})");
    Ok(soak::SoakPlan {
        duration: Duration::from_secs_f64(soak.minutes * 60.0),
        rate: soak.rate,
        processors: soak.processors,
        // No kills: one "kill" after the end of the run.
        kill_every: if soak.kill_every == 0.0 {
            Duration::from_secs_f64(soak.minutes * 60.0 * 4.0)
        } else {
            Duration::from_secs_f64(soak.kill_every)
        },
        restarts: soak.restarts,
        down_for: Duration::from_secs_f64(soak.down_secs),
        seed,
        engine: engine_config(args)?,
        processor_bin: processor_bin(args)?,
    })
    .and_then(|plan| {
        // Each child holds its batches' connections, two more and a LISTEN session; the
        // embedded cluster allows 100, and a replacement overlaps the killed child's last ones.
        let connections = (plan.processors + 1) * (plan.engine.batches_in_flight + 3) + 4;
        anyhow::ensure!(
            connections <= 90,
            "--processors {} with {} batches in flight needs about {connections} connections; \
             the embedded cluster allows 100",
            plan.processors,
            plan.engine.batches_in_flight
        );
        Ok(plan)
    })
}

async fn run_soak(args: &Args, plan: &soak::SoakPlan) -> anyhow::Result<soak::SoakReport> {
    let (db, cluster) = open(args, 4).await?;
    let result = async {
        let client = db.connect().await?;
        hook_store::migrate::migrate(&client).await.context("migrating the soak database")?;
        refuse_foreign_rows(args, &db, &client).await?;
        drop(client);
        let report = interruptible(soak::soak(&db, cluster.as_ref(), plan)).await;
        // Also after a failed run: the audit trigger must not slow whatever runs next. (A new
        // connection: the soak restarted the server.) A failure here must not hide the soak's.
        let removed = match db.connect().await {
            Ok(client) => hook_store::bench::remove_outcome_audit(&client).await.map_err(anyhow::Error::from),
            Err(error) => Err(error),
        };
        match (report, removed) {
            (Ok(report), Ok(())) => Ok(report),
            (Ok(_), Err(error)) => Err(error.context("removing the soak's audit trigger")),
            (Err(error), removed) => {
                if let Err(cleanup) = removed {
                    tracing::warn!(error = %cleanup, "could not remove the soak's audit trigger");
                }
                Err(error)
            }
        }
    }
    .await;
    close(db, cluster).await?;
    result
}

fn upgrade_plan(upgrade: &UpgradeArgs) -> anyhow::Result<upgrade::UpgradePlan> {
    anyhow::ensure!(
        upgrade.rows >= 0 && upgrade.archive_rows >= 0,
        "--rows and --archive-rows must be 0 or more"
    );
    anyhow::ensure!(upgrade.rate > 0.0 && upgrade.rate <= 5_000.0, "--rate must be in (0, 5000]");
    anyhow::ensure!(
        upgrade.blocker_secs.is_none_or(|s| s > 0.0 && s <= 600.0),
        "--blocker-secs must be in (0, 600]"
    );
    anyhow::ensure!(upgrade.lock_timeout_ms > 0, "--lock-timeout-ms must be positive");
    Ok(upgrade::UpgradePlan {
        rows: upgrade.rows,
        archive_rows: upgrade.archive_rows,
        rate: upgrade.rate,
        first_release: upgrade.first_release,
        blocker: upgrade.blocker_secs.map(Duration::from_secs_f64),
        options: hook_store::migrate::MigrateOptions {
            lock_timeout: Duration::from_millis(upgrade.lock_timeout_ms),
            max_lock_timeout: Duration::from_millis(upgrade.max_lock_timeout_ms),
            ..hook_store::migrate::MigrateOptions::default()
        },
    })
}

async fn run_upgrade(args: &Args, plan: &upgrade::UpgradePlan) -> anyhow::Result<upgrade::UpgradeReport> {
    let (db, cluster) = open(args, 1).await?;
    let admin = db.config().clone();
    let result = interruptible(async {
        let config = upgrade::fresh_database(&admin).await?;
        upgrade::upgrade(&config, plan).await
    })
    .await;
    let dropped = upgrade::drop_database(&admin).await;
    close(db, cluster).await?;
    let report = result?;
    dropped.context("dropping the upgrade database")?;
    Ok(report)
}

/// What to measure, checked once.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) events: u64,
    pub(crate) baseline_events: u64,
    pub(crate) rate: f64,
    pub(crate) duration: Duration,
    pub(crate) engine: EngineConfig,
    pub(crate) limit_batch: i64,
    pub(crate) limit_connections: Vec<usize>,
    pub(crate) processor_bin: PathBuf,
    pub(crate) ingest_calls: usize,
    pub(crate) ingest_bin: PathBuf,
    pub(crate) waiting_rows: u64,
    pub(crate) horizon_rate: f64,
    pub(crate) horizon_duration: Duration,
    pub(crate) window: Duration,
    pub(crate) low_water_mark: bool,
    pub(crate) bloat_rate: f64,
    pub(crate) bloat_duration: Duration,
    pub(crate) bloat_archive_after: Option<Duration>,
    pub(crate) bloat_baseline: Duration,
    pub(crate) bloat_vacuum_dead_tuples: u64,
    pub(crate) bloat_hold_snapshot: bool,
    pub(crate) bloat_ids: hook_store::bench::Ids,
}

impl Plan {
    fn from_args(args: &Args) -> anyhow::Result<Plan> {
        anyhow::ensure!(
            args.events > 0 && args.baseline_events > 0,
            "--events and --baseline-events must be positive"
        );
        anyhow::ensure!(args.rate > 0.0 && args.rate <= 10_000.0, "--rate must be in (0, 10000]");
        anyhow::ensure!(args.duration > 0.0 && args.duration <= 3600.0, "--duration must be in (0, 3600]");
        anyhow::ensure!((1..=10_000).contains(&args.limit_batch), "--limit-batch must be in 1..=10000");
        let engine = engine_config(args)?;
        let mut limit_connections = if args.limit_connections.is_empty() {
            vec![1, engine.batches_in_flight, 2 * engine.batches_in_flight]
        } else {
            args.limit_connections.clone()
        };
        limit_connections.sort_unstable();
        limit_connections.dedup();
        anyhow::ensure!(
            limit_connections.iter().all(|&n| (1..=32).contains(&n)),
            "--limit-connections must be in 1..=32"
        );
        let processor_bin = processor_bin(args)?;
        anyhow::ensure!((1..=100_000).contains(&args.ingest_calls), "--ingest-calls must be in 1..=100000");
        anyhow::ensure!(args.waiting_rows <= 100_000_000, "--waiting-rows must be at most 100000000");
        anyhow::ensure!(
            args.horizon_rate > 0.0 && args.horizon_rate <= 10_000.0,
            "--horizon-rate must be in (0, 10000]"
        );
        anyhow::ensure!(
            args.horizon_duration > 0.0 && args.horizon_duration <= 24.0 * 3600.0,
            "--horizon-duration must be in (0, 86400]"
        );
        anyhow::ensure!(args.window >= 1.0 && args.window <= 3600.0, "--window must be in [1, 3600]");
        anyhow::ensure!(
            args.bloat_rate > 0.0 && args.bloat_rate <= 100_000.0,
            "--bloat-rate must be in (0, 100000]"
        );
        anyhow::ensure!(
            args.bloat_duration > 0.0 && args.bloat_duration <= 24.0 * 3600.0,
            "--bloat-duration must be in (0, 86400]"
        );
        anyhow::ensure!(
            args.bloat_archive_after >= 0.0 && args.bloat_archive_after <= 86_400.0,
            "--bloat-archive-after must be in [0, 86400]"
        );
        anyhow::ensure!(
            args.bloat_baseline > 0.0 && args.bloat_baseline <= 24.0 * 3600.0,
            "--bloat-baseline must be in (0, 86400]"
        );
        Ok(Plan {
            events: args.events,
            baseline_events: args.baseline_events,
            rate: args.rate,
            duration: Duration::from_secs_f64(args.duration),
            engine,
            limit_batch: args.limit_batch,
            limit_connections,
            processor_bin: processor_bin.clone(),
            ingest_calls: args.ingest_calls,
            ingest_bin: args
                .ingest_bin
                .clone()
                .unwrap_or_else(|| processor_bin.with_file_name("hook-ingest")),
            waiting_rows: args.waiting_rows,
            horizon_rate: args.horizon_rate,
            horizon_duration: Duration::from_secs_f64(args.horizon_duration),
            window: Duration::from_secs_f64(args.window),
            low_water_mark: !args.no_low_water_mark,
            bloat_rate: args.bloat_rate,
            bloat_duration: Duration::from_secs_f64(args.bloat_duration),
            bloat_archive_after: (args.bloat_archive_after > 0.0)
                .then(|| Duration::from_secs_f64(args.bloat_archive_after)),
            bloat_baseline: Duration::from_secs_f64(args.bloat_baseline),
            bloat_vacuum_dead_tuples: args.bloat_vacuum_dead_tuples,
            bloat_hold_snapshot: args.bloat_hold_snapshot,
            bloat_ids: match args.bloat_ids {
                BloatIds::Random => hook_store::bench::Ids::Random,
                BloatIds::TimeOrdered => hook_store::bench::Ids::TimeOrdered,
            },
        })
    }
}

/// Runs `work` unless Ctrl-C comes first, in which case `work` is dropped (its hook-processor
/// children are killed with it) and the caller still closes the connections and stops the
/// embedded cluster.
async fn interruptible<T>(work: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::select! {
        result = work => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    }
}

/// The database of the run: DATABASE_URL, or the durable embedded cluster under --data-dir.
async fn open(args: &Args, connections: usize) -> anyhow::Result<(Db, Option<EmbeddedCluster>)> {
    Ok(match &args.database_url {
        Some(url) => (Db::new(parse_database_url(url)?, url.clone(), false, connections)?, None),
        None => {
            let cluster = EmbeddedCluster::start(ClusterOptions {
                data_dir: args.data_dir.clone(),
                database: "hook_bench".into(),
                durable: true,
                max_connections: 100,
            })
            .await
            .with_context(|| format!("starting the embedded PostgreSQL under {}", args.data_dir.display()))?;
            let db = Db::new(cluster.config("hook_bench"), cluster.url("hook_bench"), true, connections)?;
            (db, Some(cluster))
        }
    })
}

async fn close(db: Db, cluster: Option<EmbeddedCluster>) -> anyhow::Result<()> {
    // Close the bench's connections before the server goes, so none of them logs its death.
    drop(db);
    if let Some(cluster) = cluster {
        cluster.stop().await.context("stopping the embedded PostgreSQL")?;
    }
    Ok(())
}

async fn bench(args: &Args, plan: &Plan) -> anyhow::Result<Report> {
    // The pressure phases hold their producers', the snapshot's and two read-out connections.
    let connections = (plan.limit_connections.iter().max().copied().unwrap_or(1) + 2).max(8);
    let (mut db, cluster) = open(args, connections).await?;
    let result = async {
        db.find_postmaster().await?;
        interruptible(measure(args, plan, &db)).await
    }
    .await;
    close(db, cluster).await?;
    result
}

/// hook-bench empties `hook_events`: on DATABASE_URL only when it is empty or --truncate says so.
async fn refuse_foreign_rows(
    args: &Args,
    db: &Db,
    client: &hook_store::deadpool_postgres::Object,
) -> anyhow::Result<()> {
    let rows = hook_store::bench::row_count(client).await?;
    if rows > 0 && !db.embedded && !args.truncate {
        anyhow::bail!(
            "hook_events already holds {rows} rows and hook-bench empties it; \
             point DATABASE_URL at a scratch database, or pass --truncate"
        );
    }
    Ok(())
}

async fn measure(args: &Args, plan: &Plan, db: &Db) -> anyhow::Result<Report> {
    let client = db.connect().await?;
    hook_store::migrate::migrate(&client).await.context("migrating the bench database")?;
    refuse_foreign_rows(args, db, &client).await?;
    let mut report = Report::begin(plan, db).await?;
    let wanted = |phase| args.phases.contains(&phase);
    if wanted(Phase::Limit) {
        for &connections in &plan.limit_connections {
            let drain = phases::limit_drain(db, plan, connections).await.context("limit phase")?;
            report.limit.push(LimitRun { connections, drain });
        }
    }
    if wanted(Phase::Processor) {
        report.processor = Some(phases::processor_drain(db, plan).await.context("processor phase")?);
    }
    if wanted(Phase::Drain) {
        report.drain = Some(phases::engine_drain(db, plan).await.context("drain phase")?);
    }
    if wanted(Phase::Floor) {
        report.floor = Some(phases::producer_floor(db, plan).await.context("floor phase")?);
    }
    if wanted(Phase::Latency) {
        report.latency = Some(phases::engine_latency(db, plan).await.context("latency phase")?);
    }
    if wanted(Phase::Baseline) {
        report.baseline_latency =
            Some(phases::baseline_latency(db, plan).await.context("baseline latency phase")?);
        report.baseline_drain = Some(phases::baseline_drain(db, plan).await.context("baseline drain phase")?);
    }
    if wanted(Phase::Jetstream) {
        report.jetstream =
            Some(sinks::jetstream_drain(db, plan, &args.nats_url).await.context("jetstream phase")?);
    }
    if wanted(Phase::Webhook) {
        report.webhook = Some(sinks::webhook_drain(db, plan).await.context("webhook phase")?);
    }
    if wanted(Phase::Ingest) {
        report.ingest = Some(ingest::ingest_latency(db, plan).await.context("ingest phase")?);
    }
    if wanted(Phase::Waiting) {
        report.waiting = Some(pressure::waiting(db, plan).await.context("waiting phase")?);
    }
    if wanted(Phase::Horizon) {
        report.horizon = Some(pressure::horizon(db, plan).await.context("horizon phase")?);
    }
    if wanted(Phase::Bloat) {
        report.bloat = Some(bloat::bloat(db, plan).await.context("bloat phase")?);
    }
    hook_store::bench::truncate(&client).await?;
    report.finish();
    Ok(report)
}

fn init_logging(level: &str) -> anyhow::Result<()> {
    let filter =
        tracing_subscriber::EnvFilter::try_new(format!("{level},tokio_postgres=warn,deadpool=error"))
            .with_context(|| format!("--log-level {level:?} is not a log level or filter"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init()
        .map_err(|e| anyhow::anyhow!("setting up logging: {e}"))
}
