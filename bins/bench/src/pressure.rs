//! The pressure phases: what a claim costs when the table fills with rows it cannot take.
//!
//! - `waiting`: the engine under a trickle on an empty table, then the same trickle with `N`
//!   rows waiting for a retry (a day away), with `EXPLAIN (ANALYZE, BUFFERS)` of the claim on
//!   both tables;
//! - `horizon`: the engine under producers inserting at a steady rate while another session
//!   holds a `REPEATABLE READ` snapshot, so that vacuum can remove nothing, then the claim's
//!   plan from the beginning of the fresh index and from the low-water mark.
//!
//! Each reports, per window (a minute by default): handler starts, pickup (handler start −
//! `created_at`) p50/p99, the server's CPU per event (every process of the PostgreSQL server,
//! read from /proc: the backends of the engine, the producers and the snapshot's holder,
//! autovacuum, the WAL writer), this process's CPU per event (the engine and the producers), and
//! the table's dead row versions.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use hook_core::{Engine, HandlerResult, HookEvent, Store};
use hook_store::bench::{self, ClaimPlan};
use hook_store::{PgStore, StoreOptions};
use serde::Serialize;
use time::OffsetDateTime;

use crate::phases::Db;
use crate::report::{process_cpu_ticks, Percentiles};
use crate::Plan;

/// Rows per INSERT statement when building the waiting rows.
const INSERT_CHUNK: i64 = 20_000;
/// `metadata.seq` of the first waiting row, far from the producers' numbers.
const WAITING_SEQ: i64 = 1_000_000_000;
/// Producer connections; each inserts its share of the rate, one autocommitted row at a time.
const PRODUCERS: usize = 4;
/// `USER_HZ`.
const CLOCK_TICKS: f64 = 100.0;

/// One window of a pressure run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Window {
    /// Seconds from the producers' start to the window's start.
    pub(crate) from_s: f64,
    /// Handler starts in the window, and their pickup (handler start − `created_at`).
    pub(crate) pickup: Percentiles,
    /// CPU time of every process of the server in the window per handler start, µs; `None`
    /// when the server's processes cannot be read (it runs elsewhere).
    pub(crate) server_cpu_us_per_event: Option<f64>,
    /// CPU time of hook-bench (the engine and the producers) per handler start, µs.
    pub(crate) bench_cpu_us_per_event: f64,
    /// `n_dead_tup` of `hook_events` at the window's end.
    pub(crate) dead_tuples: i64,
    /// The claim ledger's size at the window's end, KiB.
    pub(crate) ledger_kib: i64,
}

/// One pressure run: producers at a steady rate, the engine claiming.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Pressure {
    /// What the table held (or what held it).
    pub(crate) what: String,
    pub(crate) rate: f64,
    pub(crate) seconds: f64,
    pub(crate) inserted: u64,
    /// Events the engine processed (all of them, or the run failed).
    pub(crate) processed: u64,
    /// Over the whole run.
    pub(crate) pickup: Percentiles,
    pub(crate) windows: Vec<Window>,
}

/// The claim's plan, as `EXPLAIN (ANALYZE, BUFFERS)` saw it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PlanFacts {
    /// Shared buffers hit or read.
    pub(crate) buffers: i64,
    /// Rows read and discarded by filters.
    pub(crate) rows_removed: i64,
    pub(crate) seq_scans: usize,
    pub(crate) indexes: Vec<String>,
    /// Rows locked and returned.
    pub(crate) rows: i64,
}

impl From<ClaimPlan> for PlanFacts {
    fn from(p: ClaimPlan) -> Self {
        PlanFacts {
            buffers: p.buffers,
            rows_removed: p.rows_removed,
            seq_scans: p.seq_scans,
            indexes: p.indexes,
            rows: p.rows,
        }
    }
}

/// The `waiting` phase.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Waiting {
    pub(crate) rows_waiting: u64,
    /// The claim on the empty table (generic plan, as a prepared statement runs after five
    /// executions), then with the waiting rows (generic, then custom).
    pub(crate) plan_empty: PlanFacts,
    pub(crate) plan_waiting: PlanFacts,
    pub(crate) plan_waiting_custom: PlanFacts,
    pub(crate) empty: Pressure,
    pub(crate) waiting: Pressure,
}

/// The `horizon` phase.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Horizon {
    pub(crate) run: Pressure,
    /// With the snapshot still held after the run: the claim from the beginning of the fresh
    /// index (what every claim read before the low-water mark), and from a mark a second ago.
    pub(crate) plan_from_beginning: PlanFacts,
    pub(crate) plan_from_mark: PlanFacts,
    /// Whether the store kept a low-water mark (`--no-low-water-mark` turns it off, to compare).
    pub(crate) low_water_mark: bool,
}

/// The `waiting` phase: the trickle on an empty table, then with `plan.waiting_rows` rows
/// waiting for a retry.
pub(crate) async fn waiting(db: &Db, plan: &Plan) -> anyhow::Result<Waiting> {
    let mut client = db.connect().await?;
    bench::truncate(&client).await?;
    settle(&client).await?;
    let limit = batch_limit(plan);
    let plan_empty: PlanFacts = bench::explain_claim(&client, limit, None, true).await?.into();
    let empty = run(db, plan, "empty table".into(), plan.rate, plan.duration).await?;
    bench::truncate(&client).await?;
    let rows = i64::try_from(plan.waiting_rows).context("--waiting-rows too large")?;
    let mut first = 1;
    while first <= rows {
        let last = (first + INSERT_CHUNK - 1).min(rows);
        bench::insert_waiting(&mut client, WAITING_SEQ + first, WAITING_SEQ + last)
            .await
            .context("inserting the waiting rows")?;
        first = last + 1;
    }
    settle(&client).await?;
    let plan_waiting: PlanFacts = bench::explain_claim(&client, limit, None, true).await?.into();
    let plan_waiting_custom: PlanFacts = bench::explain_claim(&client, limit, None, false).await?.into();
    let what = format!("{} rows waiting for a retry", plan.waiting_rows);
    let waiting = run(db, plan, what, plan.rate, plan.duration).await?;
    bench::truncate(&client).await?;
    Ok(Waiting {
        rows_waiting: plan.waiting_rows,
        plan_empty,
        plan_waiting,
        plan_waiting_custom,
        empty,
        waiting,
    })
}

/// The `horizon` phase: producers at `plan.horizon_rate` for `plan.horizon_duration` while a
/// `REPEATABLE READ` snapshot is held.
pub(crate) async fn horizon(db: &Db, plan: &Plan) -> anyhow::Result<Horizon> {
    let client = db.connect().await?;
    bench::truncate(&client).await?;
    settle(&client).await?;
    let holder = db.connect().await?;
    bench::hold_snapshot(&holder).await.context("holding a snapshot")?;
    let what = "a REPEATABLE READ snapshot held".to_owned();
    let result = run(db, plan, what, plan.horizon_rate, plan.horizon_duration).await;
    let plans = async {
        let limit = batch_limit(plan);
        let beginning = bench::explain_claim(&client, limit, None, true).await?;
        let mark = OffsetDateTime::now_utc() - time::Duration::SECOND;
        let from_mark = bench::explain_claim(&client, limit, Some(mark), true).await?;
        anyhow::Ok((beginning, from_mark))
    }
    .await;
    bench::release_snapshot(&holder).await?;
    let run = result?;
    let (beginning, from_mark) = plans?;
    bench::truncate(&client).await?;
    Ok(Horizon {
        run,
        plan_from_beginning: beginning.into(),
        plan_from_mark: from_mark.into(),
        low_water_mark: plan.low_water_mark,
    })
}

fn batch_limit(plan: &Plan) -> i64 {
    i64::try_from(plan.engine.batch_size).unwrap_or(i64::MAX)
}

async fn settle(client: &hook_store::deadpool_postgres::Object) -> anyhow::Result<()> {
    bench::settle(client).await.context("vacuuming")?;
    Ok(())
}

/// Handler starts: `created_at`, and when (wall clock and monotonic).
#[derive(Clone, Default)]
struct Starts(Arc<Mutex<Vec<(OffsetDateTime, OffsetDateTime, Instant)>>>);

impl Starts {
    fn record(&self, event: &HookEvent) {
        let (wall, at) = (OffsetDateTime::now_utc(), Instant::now());
        if let Ok(mut starts) = self.0.lock() {
            starts.push((event.created_at, wall, at));
        }
    }

    fn take(&self) -> Vec<(OffsetDateTime, OffsetDateTime, Instant)> {
        self.0.lock().map(|s| s.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }
}

/// One reading of the clocks and the table.
#[derive(Debug, Clone, Copy)]
struct Sample {
    server_ticks: Option<u64>,
    bench_ticks: u64,
    dead_tuples: i64,
    ledger_bytes: i64,
}

async fn sample(
    server: Option<&ServerCpu>,
    client: &hook_store::deadpool_postgres::Object,
) -> anyhow::Result<Sample> {
    Ok(Sample {
        server_ticks: server.and_then(ServerCpu::ticks),
        bench_ticks: process_cpu_ticks("self").unwrap_or(0),
        dead_tuples: bench::dead_tuples(client).await?,
        ledger_bytes: bench::ledger_bytes(client).await?,
    })
}

/// The engine (no-op handler) under `PRODUCERS` connections inserting `rate` events per second
/// in all for `duration`, sampled every `plan.window`.
async fn run(db: &Db, plan: &Plan, what: String, rate: f64, duration: Duration) -> anyhow::Result<Pressure> {
    let client = db.connect().await?;
    let server = ServerCpu::find(&client).await;
    let options = StoreOptions {
        pool_size: plan.engine.batches_in_flight + 3,
        low_water_mark: plan.low_water_mark,
        ..StoreOptions::default()
    };
    let store = PgStore::connect(db.config().clone(), options).await.context("connecting the store")?;
    let mut wakeups = store.wakeups().context("the store is not listening")?;
    let starts = Starts::default();
    let recorder = starts.clone();
    let engine = Engine::builder(store)
        .handler("*", "*", move |event: Arc<HookEvent>| {
            recorder.record(&event);
            std::future::ready(HandlerResult::ok(""))
        })
        .config(plan.engine.clone())
        .build()?;
    tokio::time::timeout(Duration::from_secs(10), wakeups.changed())
        .await
        .context("LISTEN was not established in 10 s")?
        .context("the listener stopped")?;
    let processed_before = bench::processed_count(&client).await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(engine.run(async move {
        let _ = stopped.await;
    }));
    let origin = Instant::now();
    let mut samples = vec![(origin, sample(server.as_ref(), &client).await?)];
    let producing = produce(db, rate, duration);
    tokio::pin!(producing);
    let inserted = loop {
        let next = origin + plan.window * u32::try_from(samples.len()).unwrap_or(u32::MAX);
        tokio::select! {
            inserted = &mut producing => break inserted?,
            () = tokio::time::sleep_until(next.into()) => {
                samples.push((Instant::now(), sample(server.as_ref(), &client).await?));
            }
        }
    };
    // Everything produced is processed, or the run fails.
    let deadline = Instant::now() + Duration::from_secs(120);
    let processed = loop {
        let processed = u64::try_from(bench::processed_count(&client).await? - processed_before).unwrap_or(0);
        if processed >= inserted {
            break processed;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{processed} of {inserted} events processed 2 minutes after the producers stopped ({what})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let end = Instant::now();
    samples.push((end, sample(server.as_ref(), &client).await?));
    let _ = stop.send(());
    task.await.context("engine task")?;

    let starts = starts.take();
    let mut all = histogram()?;
    let mut windows = Vec::new();
    for pair in samples.windows(2) {
        let ((from, a), (to, b)) = (pair[0], pair[1]);
        let mut pickups = histogram()?;
        for (created_at, wall, at) in &starts {
            if *at >= from && (*at < to || to == end) {
                pickups.saturating_record(micros(*wall - *created_at));
            }
        }
        let events = pickups.len();
        let per_event = |ticks: u64| ticks as f64 / CLOCK_TICKS * 1e6 / events.max(1) as f64;
        windows.push(Window {
            from_s: (from - origin).as_secs_f64(),
            pickup: Percentiles::of(&pickups),
            server_cpu_us_per_event: a
                .server_ticks
                .zip(b.server_ticks)
                .map(|(a, b)| per_event(b.saturating_sub(a))),
            bench_cpu_us_per_event: per_event(b.bench_ticks.saturating_sub(a.bench_ticks)),
            dead_tuples: b.dead_tuples,
            ledger_kib: b.ledger_bytes / 1024,
        });
    }
    for (created_at, wall, _) in &starts {
        all.saturating_record(micros(*wall - *created_at));
    }
    Ok(Pressure {
        what,
        rate,
        seconds: (end - origin).as_secs_f64(),
        inserted,
        processed,
        pickup: Percentiles::of(&all),
        windows,
    })
}

/// `PRODUCERS` connections, each inserting its share of `rate` events per second for
/// `duration`, one autocommitted INSERT (and NOTIFY) at a time. Returns the events inserted.
async fn produce(db: &Db, rate: f64, duration: Duration) -> anyhow::Result<u64> {
    let total = (rate * duration.as_secs_f64()).round().max(1.0) as i64;
    let producers = i64::try_from(PRODUCERS).unwrap_or(1);
    let mut tasks = Vec::new();
    for k in 0..producers {
        let client = db.connect().await?;
        let period = Duration::from_secs_f64(producers as f64 / rate);
        tasks.push(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut inserted = 0u64;
            let mut seq = k + 1;
            while seq <= total {
                tick.tick().await;
                bench::insert_one(&client, seq).await?;
                inserted += 1;
                seq += producers;
            }
            anyhow::Ok(inserted)
        });
    }
    Ok(futures::future::try_join_all(tasks).await?.into_iter().sum())
}

fn micros(d: time::Duration) -> u64 {
    u64::try_from(d.whole_microseconds()).unwrap_or(0)
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).context("creating a histogram")
}

/// The CPU time of a local PostgreSQL server: its postmaster (with the children it reaped) and
/// every live child process.
pub(crate) struct ServerCpu {
    postmaster: String,
}

impl ServerCpu {
    /// The postmaster of `client`'s backend, if the backend is a process of this machine.
    pub(crate) async fn find(client: &hook_store::deadpool_postgres::Object) -> Option<ServerCpu> {
        let backend = bench::backend_pid(client).await.ok()?;
        let fields = stat_fields(&backend.to_string())?;
        let postmaster = fields.get(1)?.clone();
        stat_fields(&postmaster)?;
        Some(ServerCpu { postmaster })
    }

    pub(crate) fn ticks(&self) -> Option<u64> {
        let number = |fields: &[String], n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
        let own = stat_fields(&self.postmaster)?;
        let mut ticks = number(&own, 14)? + number(&own, 15)? + number(&own, 16)? + number(&own, 17)?;
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else { continue };
            let Some(fields) = stat_fields(pid) else { continue };
            if fields.get(1).map(String::as_str) == Some(self.postmaster.as_str()) {
                ticks += number(&fields, 14).unwrap_or(0) + number(&fields, 15).unwrap_or(0);
            }
        }
        Some(ticks)
    }
}

/// The fields of /proc/`pid`/stat from the third on (state, ppid, ...): field `n` is at `n - 3`.
fn stat_fields(pid: &str) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}
