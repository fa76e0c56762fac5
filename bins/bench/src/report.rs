//! The report of one run: what was measured, on what, against which targets; as a table or JSON.

use std::fmt::Write as _;
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::phases::Db;
use crate::Plan;

/// A drain: how many events, how long.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Throughput {
    pub(crate) events: u64,
    pub(crate) seconds: f64,
    pub(crate) events_per_s: f64,
    /// CPU time per event of the claiming process (hook-bench running the engine or the SQL
    /// loop's client side; the child in the hook-processor row), in microseconds.
    pub(crate) client_cpu_us_per_event: f64,
    /// CPU time per event of the database server (the postmaster and all its processes:
    /// backends, WAL writer, checkpointer, ...), in microseconds; `None` when the server does
    /// not run on this machine.
    pub(crate) server_cpu_us_per_event: Option<f64>,
    /// Mean stored size of the `result_metadata` the drain wrote, in bytes.
    pub(crate) result_metadata_bytes: Option<f64>,
    /// How busy the machine's CPUs were during the drain, 0 to 1 (all processes, the server
    /// and anyone else's included).
    pub(crate) machine_cpu_busy: f64,
}

impl Throughput {
    pub(crate) fn new(events: u64, clock: CpuClock) -> Throughput {
        let seconds = clock.started.elapsed().as_secs_f64();
        let (process_s, server_s, busy) = clock.stop();
        let per_event = |s: f64| s * 1e6 / (events.max(1) as f64);
        Throughput {
            events,
            seconds,
            events_per_s: events as f64 / seconds.max(1e-9),
            client_cpu_us_per_event: per_event(process_s),
            server_cpu_us_per_event: server_s.map(per_event),
            result_metadata_bytes: None,
            machine_cpu_busy: busy,
        }
    }
}

/// Wall time, this process's CPU time, the server's (given its postmaster) and the machine's busy
/// time, from one moment on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuClock {
    started: Instant,
    process_ticks: u64,
    server: Option<(u32, u64)>,
    machine: (u64, u64),
}

impl CpuClock {
    pub(crate) fn start(postmaster: Option<u32>) -> CpuClock {
        let server = postmaster.and_then(|pid| Some((pid, server_cpu_ticks(pid)?)));
        CpuClock { started: Instant::now(), process_ticks: process_ticks(), server, machine: machine_ticks() }
    }

    /// This process's and the server's CPU seconds since the start, and the machine's busy
    /// fraction.
    fn stop(self) -> (f64, Option<f64>, f64) {
        let process = process_ticks().saturating_sub(self.process_ticks) as f64 / CLOCK_TICKS;
        let server = self.server.and_then(|(pid, before)| {
            Some(server_cpu_ticks(pid)?.saturating_sub(before) as f64 / CLOCK_TICKS)
        });
        let (busy, total) = machine_ticks();
        let (busy, total) = (busy.saturating_sub(self.machine.0), total.saturating_sub(self.machine.1));
        (process, server, if total == 0 { 0.0 } else { busy as f64 / total as f64 })
    }
}

/// The fields of `/proc/<pid>/stat` after the command name, from field 3 (the state) on.
fn stat_fields(pid: &str) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after it are numbers but the state (field 3).
    let rest = stat.rsplit_once(')').map(|(_, rest)| rest)?;
    Some(rest.split_whitespace().map(|f| f.parse::<u64>().unwrap_or(0)).collect())
}

/// The postmaster of the server process `backend`, if it runs on this machine and is a
/// PostgreSQL server's: the parent of `backend`, named `postgres` (or `postmaster`).
pub(crate) fn postmaster_of(backend: i32) -> Option<u32> {
    let ppid = u32::try_from(*stat_fields(&backend.to_string())?.get(4 - 3)?).ok()?;
    let name = std::fs::read_to_string(format!("/proc/{ppid}/comm")).ok()?;
    matches!(name.trim(), "postgres" | "postmaster").then_some(ppid)
}

/// CPU ticks of the server: the postmaster's own and those of the children it has reaped
/// (utime, stime, cutime, cstime), plus those of its live children. A child that exits between
/// two readings moves from the second sum to the first, so the total only grows.
fn server_cpu_ticks(postmaster: u32) -> Option<u64> {
    let own = stat_fields(&postmaster.to_string())?;
    let field = |fields: &[u64], n: usize| fields.get(n - 3).copied().unwrap_or(0);
    let mut ticks = (14..=17).map(|n| field(&own, n)).sum::<u64>();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else { continue };
        if let Some(fields) = stat_fields(pid) {
            if field(&fields, 4) == u64::from(postmaster) {
                ticks += field(&fields, 14) + field(&fields, 15);
            }
        }
    }
    Some(ticks)
}

/// `USER_HZ`, the unit of /proc's CPU times; 100 on every Linux we run on.
const CLOCK_TICKS: f64 = 100.0;

/// utime + stime of this process (all threads), from /proc/self/stat.
fn process_ticks() -> u64 {
    process_cpu_ticks("self").unwrap_or(0)
}

/// utime + stime of process `pid` ("self" for this one), in `USER_HZ` ticks.
pub(crate) fn process_cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at the state, field 3.
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    Some(field(14)? + field(15)?)
}

/// `ticks` of CPU time per event, in microseconds.
pub(crate) fn cpu_us_per_event(ticks: u64, events: u64) -> f64 {
    ticks as f64 / CLOCK_TICKS * 1e6 / events.max(1) as f64
}

/// (busy, total) CPU ticks of the whole machine, from /proc/stat.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or_default();
    let ticks: Vec<u64> = line.split_whitespace().skip(1).filter_map(|t| t.parse().ok()).collect();
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// One measurement of the limit.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct LimitRun {
    pub(crate) connections: usize,
    pub(crate) drain: Throughput,
}

/// Percentiles of a latency, in microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Percentiles {
    pub(crate) count: u64,
    pub(crate) p50_us: u64,
    pub(crate) p95_us: u64,
    pub(crate) p99_us: u64,
    pub(crate) max_us: u64,
}

impl Percentiles {
    pub(crate) fn of(histogram: &Histogram<u64>) -> Percentiles {
        Percentiles {
            count: histogram.len(),
            p50_us: histogram.value_at_quantile(0.50),
            p95_us: histogram.value_at_quantile(0.95),
            p99_us: histogram.value_at_quantile(0.99),
            max_us: histogram.max(),
        }
    }
}

/// Latencies under the trickle: handler start − created_at, and processed_at − created_at.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Latency {
    pub(crate) events: u64,
    /// The producer's INSERT round trip (autocommit, so it includes the WAL flush).
    pub(crate) producer_insert: Percentiles,
    /// Handler start − created_at.
    pub(crate) pickup: Percentiles,
    /// Handler start − the producer's commit acknowledgement: the processor's own share.
    pub(crate) pickup_after_commit: Percentiles,
    /// processed_at − created_at.
    pub(crate) processed: Percentiles,
}

/// The original algorithm's drain, and its rate outside the poll sleeps.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct BaselineDrain {
    pub(crate) drain: Throughput,
    pub(crate) busy_events_per_s: f64,
}

/// The hook-processor child's drain, its peak RSS, and how long it took to start (from the
/// spawn to its engine's start; not part of the drain's time).
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct ProcessorDrain {
    pub(crate) drain: Throughput,
    pub(crate) peak_rss_kib: u64,
    pub(crate) startup_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Machine {
    cpus: usize,
    cpu_model: String,
    memory_mib: u64,
    postgres: String,
    synchronous_commit: String,
    fsync: String,
    wal_sync_method: String,
    shared_buffers: String,
    database: &'static str,
    load_before: [f64; 3],
    load_after: [f64; 3],
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Settings {
    events: u64,
    baseline_events: u64,
    rate: f64,
    duration_s: f64,
    batch_size: usize,
    batches_in_flight: usize,
    claims_in_flight: usize,
    concurrency: usize,
    limit_batch: i64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Ratios {
    /// The hook-processor binary's drain against the fastest limit run: the headline.
    processor_over_limit: Option<f64>,
    /// The in-process engine's drain (no-op handler) against the fastest limit run.
    drain_over_limit: Option<f64>,
    /// The in-process engine's drain against the one-connection limit loop.
    drain_over_one_connection_limit: Option<f64>,
    drain_over_baseline_drain: Option<f64>,
    baseline_p99_pickup_over_engine: Option<f64>,
    baseline_p99_processed_over_engine: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Target {
    what: &'static str,
    target: &'static str,
    measured: String,
    met: bool,
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    machine: Machine,
    settings: Settings,
    /// The limit loop, per number of connections; the best is the limit.
    pub(crate) limit: Vec<LimitRun>,
    pub(crate) drain: Option<Throughput>,
    /// The producer's INSERT round trips with nobody consuming.
    pub(crate) floor: Option<Percentiles>,
    pub(crate) latency: Option<Latency>,
    pub(crate) baseline_latency: Option<Latency>,
    pub(crate) baseline_drain: Option<BaselineDrain>,
    /// The hook-processor binary's drain: the headline.
    pub(crate) processor: Option<ProcessorDrain>,
    /// The engine through a nats route into JetStream.
    pub(crate) jetstream: Option<Throughput>,
    /// The engine through a webhook route into a loopback receiver.
    pub(crate) webhook: Option<Throughput>,
    pub(crate) ingest: Option<crate::ingest::IngestReport>,
    pub(crate) waiting: Option<crate::pressure::Waiting>,
    pub(crate) horizon: Option<crate::pressure::Horizon>,
    pub(crate) bloat: Option<crate::bloat::Bloat>,
    ratios: Ratios,
    targets: Vec<Target>,
    seconds: f64,
    #[serde(skip)]
    started: Option<Instant>,
}

impl Report {
    pub(crate) async fn begin(plan: &Plan, db: &Db) -> anyhow::Result<Report> {
        let client = db.connect().await?;
        let facts = hook_store::bench::server_facts(&client).await?;
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib: u64 = field(&meminfo, "MemTotal:").and_then(|v| v.parse().ok()).unwrap_or(0);
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Ok(Report {
            machine: Machine {
                cpus: std::thread::available_parallelism().map_or(0, usize::from),
                cpu_model: field(&cpuinfo, "model name")
                    .map_or_else(String::new, |m| m.trim_start_matches(':').trim().to_owned()),
                memory_mib: memory_kib / 1024,
                postgres: facts.version,
                synchronous_commit: facts.synchronous_commit,
                fsync: facts.fsync,
                wal_sync_method: facts.wal_sync_method,
                shared_buffers: facts.shared_buffers,
                database: if db.embedded { "embedded cluster (durable)" } else { "DATABASE_URL" },
                load_before: load(),
                load_after: [0.0; 3],
            },
            settings: Settings {
                events: plan.events,
                baseline_events: plan.baseline_events,
                rate: plan.rate,
                duration_s: plan.duration.as_secs_f64(),
                batch_size: plan.engine.batch_size,
                batches_in_flight: plan.engine.batches_in_flight,
                claims_in_flight: plan.engine.claims_in_flight,
                concurrency: plan.engine.concurrency,
                limit_batch: plan.limit_batch,
            },
            limit: Vec::new(),
            drain: None,
            floor: None,
            latency: None,
            baseline_latency: None,
            baseline_drain: None,
            processor: None,
            jetstream: None,
            webhook: None,
            ingest: None,
            waiting: None,
            horizon: None,
            bloat: None,
            ratios: Ratios::default(),
            targets: Vec::new(),
            seconds: 0.0,
            started: Some(Instant::now()),
        })
    }

    /// Computes the ratios and checks the targets.
    pub(crate) fn finish(&mut self) {
        self.machine.load_after = load();
        self.seconds = self.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        let ratio = |a: f64, b: f64| (b > 0.0).then(|| a / b);
        if let (Some(processor), Some(limit)) = (self.processor, self.best_limit()) {
            self.ratios.processor_over_limit = ratio(processor.drain.events_per_s, limit.events_per_s);
        }
        if let (Some(drain), Some(limit)) = (self.drain, self.best_limit()) {
            self.ratios.drain_over_limit = ratio(drain.events_per_s, limit.events_per_s);
        }
        let single = self.limit.iter().find(|run| run.connections == 1).map(|run| run.drain);
        if let (Some(drain), Some(single)) = (self.drain, single) {
            self.ratios.drain_over_one_connection_limit = ratio(drain.events_per_s, single.events_per_s);
        }
        if let (Some(drain), Some(baseline)) = (self.drain, self.baseline_drain) {
            self.ratios.drain_over_baseline_drain = ratio(drain.events_per_s, baseline.drain.events_per_s);
        }
        if let (Some(engine), Some(baseline)) = (self.latency, self.baseline_latency) {
            self.ratios.baseline_p99_pickup_over_engine =
                ratio(baseline.pickup.p99_us as f64, engine.pickup.p99_us as f64);
            self.ratios.baseline_p99_processed_over_engine =
                ratio(baseline.processed.p99_us as f64, engine.processed.p99_us as f64);
        }
        let mut targets = Vec::new();
        if let Some(r) = self.ratios.processor_over_limit {
            targets.push(Target {
                what: "hook-processor drain / limit",
                target: ">= 80%",
                measured: format!("{:.0}%", r * 100.0),
                met: r >= 0.80,
            });
        }
        if let Some(l) = self.latency {
            targets.push(Target {
                what: "p99 pickup (handler start - created_at)",
                target: "<= 10 ms",
                measured: ms(l.pickup.p99_us),
                met: l.pickup.p99_us <= 10_000,
            });
            targets.push(Target {
                what: "p99 processed_at - created_at",
                target: "<= 50 ms",
                measured: ms(l.processed.p99_us),
                met: l.processed.p99_us <= 50_000,
            });
        }
        if let Some(rss) = self.processor {
            targets.push(Target {
                what: "peak RSS, backlog drain",
                target: "< 64 MiB",
                measured: format!("{:.1} MiB", rss.peak_rss_kib as f64 / 1024.0),
                met: rss.peak_rss_kib < 64 * 1024,
            });
        }
        if let Some(j) = self.jetstream {
            targets.push(Target {
                what: "engine -> JetStream, events/s",
                target: ">= 10000",
                measured: format!("{:.0}", j.events_per_s),
                met: j.events_per_s >= 10_000.0,
            });
        }
        if let Some(socket) = self.ingest.as_ref().and_then(|i| i.socket()) {
            targets.push(Target {
                what: "hook-ingest p50, socket (spawn to exit)",
                target: "<= 3 ms",
                measured: ms(socket.p50_us),
                met: socket.p50_us <= 3_000,
            });
            targets.push(Target {
                what: "hook-ingest p99, socket (spawn to exit)",
                target: "<= 10 ms",
                measured: ms(socket.p99_us),
                met: socket.p99_us <= 10_000,
            });
        }
        if let Some(b) = self.baseline_latency {
            targets.push(Target {
                // Half the 1 s poll on average, plus the original's commits before the event.
                what: "baseline p50 pickup (the original's ~0.5 s)",
                target: "0.3-1 s",
                measured: ms(b.pickup.p50_us),
                met: (300_000..=1_000_000).contains(&b.pickup.p50_us),
            });
        }
        if let Some(w) = &self.waiting {
            let (empty, waiting) = (w.empty.pickup.p99_us, w.waiting.pickup.p99_us);
            targets.push(Target {
                what: "waiting: p99 pickup / the same on an empty table",
                target: "<= 1.5x",
                measured: format!("{:.2}x", waiting as f64 / empty.max(1) as f64),
                met: waiting as f64 <= 1.5 * empty as f64,
            });
        }
        if let Some(h) = &self.horizon {
            let windows = &h.run.windows;
            if let (Some(first), Some(last)) =
                (windows.first(), windows.iter().rev().find(|w| w.pickup.count > 0))
            {
                targets.push(Target {
                    what: "horizon: p99 pickup, last window / first",
                    target: "<= 2x",
                    measured: format!(
                        "{:.2}x",
                        last.pickup.p99_us as f64 / first.pickup.p99_us.max(1) as f64
                    ),
                    met: last.pickup.p99_us <= 2 * first.pickup.p99_us,
                });
                targets.push(Target {
                    what: "horizon: p99 pickup, last window",
                    target: "<= 30 ms",
                    measured: ms(last.pickup.p99_us),
                    met: last.pickup.p99_us <= 30_000,
                });
                if let (Some(a), Some(b)) = (first.server_cpu_us_per_event, last.server_cpu_us_per_event) {
                    targets.push(Target {
                        what: "horizon: server CPU per event, last / first",
                        target: "<= 1.5x",
                        measured: format!("{:.2}x", b / a.max(1e-9)),
                        met: b <= 1.5 * a,
                    });
                }
                targets.push(Target {
                    what: "horizon: hook-bench CPU per event, last / first",
                    target: "<= 1.5x",
                    measured: format!(
                        "{:.2}x",
                        last.bench_cpu_us_per_event / first.bench_cpu_us_per_event.max(1e-9)
                    ),
                    met: last.bench_cpu_us_per_event <= 1.5 * first.bench_cpu_us_per_event,
                });
            }
        }
        if let Some(b) = &self.bloat {
            // Without an archiver the table grows by what is inserted: the size bound is for a
            // run whose processed events leave.
            if b.archive_after_s.is_some() && b.seconds >= 2.0 * b.baseline_s && b.baseline_s > 0.0 {
                targets.push(Target {
                    what: "bloat: size at the end / after the baseline",
                    target: "<= 2x",
                    measured: format!("{:.2}x", b.size_ratio),
                    met: b.size_ratio <= 2.0,
                });
            }
            let (first, last) = (b.windows.first(), b.windows.iter().rev().find(|w| w.processed_per_s > 0.0));
            if let (true, Some(a), Some(z)) = (
                b.snapshot_held,
                first.and_then(|w| w.server_cpu_us_per_event),
                last.and_then(|w| w.server_cpu_us_per_event),
            ) {
                targets.push(Target {
                    what: "bloat, snapshot held: server CPU/event last/first",
                    target: "<= 1.5x",
                    measured: format!("{:.2}x", z / a.max(1e-9)),
                    met: z <= 1.5 * a,
                });
            }
            targets.push(Target {
                what: "bloat: dead tuples, median of samples",
                target: "< 50000",
                measured: b.dead_tuples_median.to_string(),
                met: b.dead_tuples_median < 50_000,
            });
        }
        self.targets = targets;
    }

    /// The fastest limit run.
    fn best_limit(&self) -> Option<Throughput> {
        self.limit.iter().map(|run| run.drain).max_by(|a, b| a.events_per_s.total_cmp(&b.events_per_s))
    }

    /// The human-readable table.
    pub(crate) fn table(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let s = &self.settings;
        let _ = writeln!(
            out,
            "hook-bench on {} CPUs ({}), {} MiB, PostgreSQL {} ({})",
            m.cpus, m.cpu_model, m.memory_mib, m.postgres, m.database
        );
        let _ = writeln!(
            out,
            "  synchronous_commit={} fsync={} wal_sync_method={} shared_buffers={}; load {} before, {} after; {:.0} s in all",
            m.synchronous_commit,
            m.fsync,
            m.wal_sync_method,
            m.shared_buffers,
            loads(m.load_before),
            loads(m.load_after),
            self.seconds
        );
        let _ = writeln!(
            out,
            "  engine: batch {}, {} batches in flight, {} claims in flight, concurrency {}; limit loop: {} rows \
             per statement, writing the default handlers' result_metadata",
            s.batch_size, s.batches_in_flight, s.claims_in_flight, s.concurrency, s.limit_batch
        );
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<46} {:>8} {:>8} {:>9} {:>8} {:>8} {:>6} {:>5}",
            "drain", "events", "seconds", "events/s", "client", "server", "meta", "busy"
        );
        let _ = writeln!(
            out,
            "{:<46} {:>8} {:>8} {:>9} {:>8} {:>8} {:>6} {:>5}",
            "", "", "", "", "us/ev", "us/ev", "bytes", ""
        );
        let mut row = |name: &str, t: &Throughput, note: String| {
            let server = t.server_cpu_us_per_event.map_or_else(|| "-".to_owned(), |us| format!("{us:.1}"));
            let meta = t.result_metadata_bytes.map_or_else(|| "-".to_owned(), |b| format!("{b:.0}"));
            let _ = writeln!(
                out,
                "{:<46} {:>8} {:>8.2} {:>9.0} {:>8.1} {:>8} {:>6} {:>4.0}%  {}",
                name,
                t.events,
                t.seconds,
                t.events_per_s,
                t.client_cpu_us_per_event,
                server,
                meta,
                t.machine_cpu_busy * 100.0,
                note
            );
        };
        let best = self.best_limit().map(|t| t.events_per_s);
        for run in &self.limit {
            let plural = if run.connections == 1 { "" } else { "s" };
            let note = if Some(run.drain.events_per_s) == best { "the limit" } else { "" };
            row(&format!("limit: SQL loop, {} connection{plural}", run.connections), &run.drain, note.into());
        }
        if let Some(p) = &self.processor {
            let mut note = self
                .ratios
                .processor_over_limit
                .map_or_else(String::new, |r| format!("{:.0}% of the limit, ", r * 100.0));
            let _ = write!(
                note,
                "peak RSS {:.1} MiB, started in {:.0} ms",
                p.peak_rss_kib as f64 / 1024.0,
                p.startup_s * 1000.0
            );
            row("hook-processor binary, default handlers", &p.drain, note);
        }
        if let Some(t) = &self.drain {
            let mut note = self
                .ratios
                .drain_over_limit
                .map_or_else(String::new, |r| format!("{:.0}% of the limit", r * 100.0));
            if let Some(r) = self.ratios.drain_over_one_connection_limit {
                let _ = write!(note, ", {:.0}% of 1 connection's", r * 100.0);
            }
            row("engine in process, no-op handler", t, note);
        }
        if let Some(t) = &self.jetstream {
            row("engine -> JetStream (nats sink, each acked)", t, String::new());
        }
        if let Some(t) = &self.webhook {
            row("engine -> webhook (loopback receiver)", t, String::new());
        }
        if let Some(b) = &self.baseline_drain {
            row(
                "original algorithm (1 s poll, commit per event)",
                &b.drain,
                format!("{:.0}/s between sleeps", b.busy_events_per_s),
            );
        }
        if self.floor.is_some() || self.latency.is_some() || self.baseline_latency.is_some() {
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "{:<46} {:>8} {:>9} {:>9} {:>9} {:>9}",
                format!("latency at {}/s for {} s", s.rate, s.duration_s),
                "events",
                "p50",
                "p95",
                "p99",
                "max"
            );
            let mut lat = |name: &str, events: u64, p: &Percentiles| {
                let _ = writeln!(
                    out,
                    "{:<46} {:>8} {:>9} {:>9} {:>9} {:>9}",
                    name,
                    events,
                    ms(p.p50_us),
                    ms(p.p95_us),
                    ms(p.p99_us),
                    ms(p.max_us)
                );
            };
            if let Some(p) = &self.floor {
                lat("producer alone: INSERT round trip (commit)", p.count, p);
            }
            if let Some(l) = &self.latency {
                lat("producer: INSERT round trip (incl. commit)", l.events, &l.producer_insert);
                lat("engine: handler start - created_at", l.events, &l.pickup);
                lat("engine: handler start - producer's commit ack", l.events, &l.pickup_after_commit);
                lat("engine: processed_at - created_at", l.processed.count, &l.processed);
            }
            if let Some(l) = &self.baseline_latency {
                if self.latency.is_none() {
                    lat("producer: INSERT round trip (incl. commit)", l.events, &l.producer_insert);
                }
                lat("original: handler start - created_at", l.events, &l.pickup);
                lat("original: handler start - producer's commit ack", l.events, &l.pickup_after_commit);
                lat("original: processed_at - created_at", l.processed.count, &l.processed);
            }
        }
        if let Some(ingest) = &self.ingest {
            let _ = writeln!(out);
            let _ = writeln!(out, "hook-ingest: {}", ingest.binary);
            let _ = writeln!(
                out,
                "{:<46} {:>8} {:>9} {:>9} {:>9} {:>9} {:>8}",
                format!("hook-ingest, spawn to exit ({} B input)", ingest.input_bytes),
                "calls",
                "p50",
                "p90",
                "p99",
                "max",
                "spooled"
            );
            for p in &ingest.paths {
                let _ = writeln!(
                    out,
                    "{:<46} {:>8} {:>9} {:>9} {:>9} {:>9} {:>8}",
                    p.path,
                    p.calls,
                    ms(p.p50_us),
                    ms(p.p90_us),
                    ms(p.p99_us),
                    ms(p.max_us),
                    p.spooled
                );
            }
            for p in &ingest.paths {
                if let Some(warning) = &p.warning {
                    let _ = writeln!(out, "  {}: {warning}", p.path.trim());
                }
            }
        }
        if let Some(w) = &self.waiting {
            let _ = writeln!(
                out,
                "\nwaiting: the trickle at {}/s for {} s, then with {} rows waiting for a retry",
                s.rate, s.duration_s, w.rows_waiting
            );
            plan_row(&mut out, "claim plan, empty table (generic)", &w.plan_empty);
            plan_row(&mut out, "claim plan, rows waiting (generic)", &w.plan_waiting);
            plan_row(&mut out, "claim plan, rows waiting (custom)", &w.plan_waiting_custom);
            pressure_table(&mut out, &w.empty);
            pressure_table(&mut out, &w.waiting);
        }
        if let Some(h) = &self.horizon {
            let mark = if h.low_water_mark { "low-water mark on" } else { "low-water mark OFF" };
            let _ = writeln!(out, "\nhorizon: producers at {}/s, {} ({mark})", h.run.rate, h.run.what);
            pressure_table(&mut out, &h.run);
            plan_row(&mut out, "claim plan after, from the beginning", &h.plan_from_beginning);
            plan_row(&mut out, "claim plan after, from a mark 1 s ago", &h.plan_from_mark);
        }
        if let Some(b) = &self.bloat {
            bloat_table(&mut out, b);
        }
        let r = &self.ratios;
        let mut ratios = Vec::new();
        if let Some(x) = r.drain_over_baseline_drain {
            ratios.push(format!("drain {x:.0}x the original's"));
        }
        if let Some(x) = r.baseline_p99_pickup_over_engine {
            ratios.push(format!("p99 pickup {x:.0}x shorter"));
        }
        if let Some(x) = r.baseline_p99_processed_over_engine {
            ratios.push(format!("p99 processed_at {x:.0}x shorter"));
        }
        if !ratios.is_empty() {
            let _ = writeln!(out, "\nagainst the original: {}", ratios.join(", "));
        }
        if !self.targets.is_empty() {
            let _ = writeln!(out, "\n{:<46} {:>10} {:>12}", "target", "wanted", "measured");
            for t in &self.targets {
                let _ = writeln!(
                    out,
                    "{:<46} {:>10} {:>12}  {}",
                    t.what,
                    t.target,
                    t.measured,
                    if t.met { "met" } else { "NOT MET" }
                );
            }
        }
        out
    }
}

fn plan_row(out: &mut String, name: &str, p: &crate::pressure::PlanFacts) {
    let _ = writeln!(
        out,
        "  {name:<40} {} buffers, {} rows removed by filters, {} seq scans, {} rows; {}",
        p.buffers,
        p.rows_removed,
        p.seq_scans,
        p.rows,
        p.indexes.join(", ")
    );
}

fn pressure_table(out: &mut String, p: &crate::pressure::Pressure) {
    let _ = writeln!(
        out,
        "  {}: {} inserted, {} processed in {:.0} s; pickup p50 {} p99 {} max {}",
        p.what,
        p.inserted,
        p.processed,
        p.seconds,
        ms(p.pickup.p50_us),
        ms(p.pickup.p99_us),
        ms(p.pickup.max_us)
    );
    let _ = writeln!(
        out,
        "  {:>8} {:>8} {:>10} {:>10} {:>14} {:>14} {:>11} {:>11}",
        "from s", "events", "p50", "p99", "server us/ev", "bench us/ev", "dead tuples", "ledger KiB"
    );
    for w in &p.windows {
        let server = w.server_cpu_us_per_event.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"));
        let _ = writeln!(
            out,
            "  {:>8.0} {:>8} {:>10} {:>10} {:>14} {:>14.0} {:>11} {:>11}",
            w.from_s,
            w.pickup.count,
            ms(w.pickup.p50_us),
            ms(w.pickup.p99_us),
            server,
            w.bench_cpu_us_per_event,
            w.dead_tuples,
            w.ledger_kib
        );
    }
}

fn ms(us: u64) -> String {
    let ms = us as f64 / 1000.0;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 1000.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{:.2} s", ms / 1000.0)
    }
}

fn loads(l: [f64; 3]) -> String {
    format!("{:.2}/{:.2}/{:.2}", l[0], l[1], l[2])
}

/// The 1, 5 and 15 minute load averages.
pub(crate) fn load() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut parts = text.split_whitespace().map(|p| p.parse().unwrap_or(0.0));
    [parts.next().unwrap_or(0.0), parts.next().unwrap_or(0.0), parts.next().unwrap_or(0.0)]
}

/// The value after `key` on the first line that starts with it (`/proc/meminfo`, `/proc/cpuinfo`).
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let line = text.lines().find(|line| line.starts_with(key))?;
    let value = line[key.len()..].trim();
    Some(value.split_whitespace().next().filter(|_| key.ends_with(':')).unwrap_or(value))
}

fn bloat_table(out: &mut String, b: &crate::bloat::Bloat) {
    let archive = match b.archive_after_s {
        Some(after) => format!("archiving events processed {after:.0} s ago"),
        None => "no archiving".to_owned(),
    };
    let vacuum = if b.vacuum_dead_tuples == 0 {
        "processor's vacuum task off".to_owned()
    } else {
        format!("processor vacuums at {} dead tuples", b.vacuum_dead_tuples)
    };
    let _ = writeln!(
        out,
        "\nbloat: producers at {}/s for {:.0} s ({} ids), {archive}, {vacuum}{}\n  inserted {:.0}/s, processed {:.0}/s, \
         {} left at the end; size {:.1} MiB at {:.0} s, {:.1} MiB at the end ({:.2}x); dead tuples median {}, \
         p90 {}, max {} ({} samples); HOT updates {:.1}%; {} VACUUMs by the processor, {} by autovacuum",
        b.rate,
        b.seconds,
        if b.time_ordered_ids { "time-ordered" } else { "random" },
        if b.snapshot_held { ", a REPEATABLE READ snapshot held throughout" } else { "" },
        b.inserted_per_s,
        b.processed_per_s,
        b.backlog_at_end,
        b.baseline_mib,
        b.baseline_s,
        b.end_mib,
        b.size_ratio,
        b.dead_tuples_median,
        b.dead_tuples_p90,
        b.dead_tuples_max,
        b.samples_taken,
        b.hot_update_share * 100.0,
        b.vacuums,
        b.autovacuums
    );
    let _ = writeln!(
        out,
        "  {:>7} {:>9} {:>9} {:>11} {:>9} {:>7} {:>7} {:>12} {:>6}",
        "from s", "ins/s", "proc/s", "dead (med)", "MiB", "vacuum", "auto", "server us/ev", "load"
    );
    for w in &b.windows {
        let _ = writeln!(
            out,
            "  {:>7.0} {:>9.0} {:>9.0} {:>11} {:>9.1} {:>7} {:>7} {:>12} {:>6.2}",
            w.from_s,
            w.inserted_per_s,
            w.processed_per_s,
            w.dead_tuples_median,
            w.total_mib,
            w.vacuums,
            w.autovacuums,
            w.server_cpu_us_per_event.map_or_else(|| "-".to_owned(), |c| format!("{c:.0}")),
            w.load1
        );
    }
    let indexes = |list: &[(String, i64)]| {
        list.iter()
            .map(|(name, bytes)| format!("{name} {:.1}", *bytes as f64 / 1_048_576.0))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(out, "  indexes at the baseline, MiB: {}", indexes(&b.indexes_baseline));
    let _ = writeln!(out, "  indexes at the end, MiB: {}", indexes(&b.indexes_end));
}
