//! `hook-bench upgrade`: the migrations on a large install made the original's way, while a
//! producer inserts at a steady rate, measured from the producer's side.
//!
//! The install is what a user of the original service has: its DDL, `rows + archive_rows` events
//! inserted by its producers, then its README's archive SQL (`CREATE TABLE hook_events_archive AS
//! ...; DELETE ...`), which leaves `rows` events in `hook_events` and `archive_rows` in an archive
//! without a key. It is vacuumed and analyzed, as autovacuum would have done by then.
//!
//! A producer then inserts single-row, autocommitted events the way the original's hook logger
//! does, at `rate` per second, each from its scheduled time on one of 32 connections, so a
//! blocked insert does not delay the next one's start. An insert's wait is its round trip, from
//! sending it to the server's acknowledgement (a lock wait in the server is inside it); how late
//! inserts were sent because every connection was busy is reported apart, as is the longest
//! lock wait of any insert (`pg_locks.waitstart`, sampled). Two seconds in, the migrations run (this build's, or
//! with `--first-release` the texts of the first release, to compare); two seconds after they are
//! done the producer stops. Meanwhile a monitor samples, every 5 ms, which table locks the
//! migration's session holds or waits for and which migration is running, and keeps the longest
//! unbroken run of each. An optional blocker holds a transaction open on `hook_events` (a slow
//! report) while the migrations start, to show what `lock_timeout` and the retries do.
//!
//! It runs in a database of its own, `hook_bench_upgrade` (dropped and made again on each run) on
//! the embedded cluster or on the server of DATABASE_URL (which then needs CREATEDB).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use hook_store::migrate::{self, MigrateOptions};
use hook_store::seed::{self, Variant};
use hook_store::tokio_postgres::{Client, Config, NoTls};
use serde::Serialize;
use tokio::sync::watch;

use crate::report::Percentiles;

/// The database of the run.
pub(crate) const DATABASE: &str = "hook_bench_upgrade";
/// Rows per INSERT while seeding.
const SEED_CHUNK: i64 = 250_000;
/// How often the monitor samples the migration's locks.
const SAMPLE: Duration = Duration::from_millis(5);
/// Producing before the migrations start and after they end.
const MARGIN: Duration = Duration::from_secs(2);
/// Connections of the producer's pool.
const PRODUCER_CONNECTIONS: usize = 32;

/// What one run does.
#[derive(Debug, Clone)]
pub(crate) struct UpgradePlan {
    pub(crate) rows: i64,
    pub(crate) archive_rows: i64,
    pub(crate) rate: f64,
    pub(crate) first_release: bool,
    pub(crate) blocker: Option<Duration>,
    pub(crate) options: MigrateOptions,
}

/// The longest unbroken run of one lock the migration's session held or waited for.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LockRun {
    pub(crate) table: String,
    pub(crate) mode: String,
    pub(crate) granted: bool,
    /// Between the first and the last sample that saw it (0: seen once, held under 5 ms).
    pub(crate) longest_ms: f64,
}

/// One migration.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct MigrationRun {
    pub(crate) version: i32,
    pub(crate) name: String,
    pub(crate) elapsed_ms: f64,
    pub(crate) lock_timeouts: u32,
    pub(crate) locks: Vec<LockRun>,
}

/// The producer's side.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ProducerSide {
    pub(crate) inserts: u64,
    pub(crate) failed: u64,
    /// Each insert's round trip (sent to acknowledged), every insert of the run.
    pub(crate) wait: Percentiles,
    /// The same, for the inserts sent before the migrations started: the machine's normal.
    pub(crate) wait_before_migrations: Percentiles,
    /// The same, for the inserts sent while the migrations ran.
    pub(crate) wait_during_migrations: Percentiles,
    /// Inserts whose round trip took more than 1 s.
    pub(crate) over_1s: u64,
    /// When the longest round trip began, from the start of the migrations (negative: before).
    pub(crate) longest_began_ms: f64,
    /// The latest an insert was sent after its scheduled time (all 32 connections busy: the
    /// server was not keeping up, for whatever reason).
    pub(crate) latest_send_ms: f64,
    /// The longest any insert was seen waiting for a lock (`now() - pg_locks.waitstart`,
    /// sampled every 5 ms while the migrations ran): the part of the wait that the migrations'
    /// locks caused; the rest is the server being slow (WAL flushes, CPU) while indexes build.
    pub(crate) longest_lock_wait_ms: f64,
    /// Most inserts seen waiting for a lock at once.
    pub(crate) most_waiting_for_a_lock: i64,
}

/// What `hook-bench upgrade` reports.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct UpgradeReport {
    pub(crate) migrations_from: &'static str,
    pub(crate) rows: i64,
    pub(crate) archive_rows: i64,
    pub(crate) seed_seconds: f64,
    pub(crate) hook_events_mb: f64,
    pub(crate) archive_mb: f64,
    pub(crate) rate: f64,
    pub(crate) blocker_seconds: Option<f64>,
    pub(crate) lock_timeout_ms: u64,
    pub(crate) max_lock_timeout_ms: u64,
    pub(crate) migrations_ms: f64,
    pub(crate) migrations: Vec<MigrationRun>,
    pub(crate) producer: ProducerSide,
}

async fn connect(config: &Config) -> anyhow::Result<Client> {
    let (client, connection) = config.connect(NoTls).await.context("connecting")?;
    tokio::spawn(connection);
    Ok(client)
}

/// Makes the run's database afresh next to `admin`'s, and returns its settings.
pub(crate) async fn fresh_database(admin: &Config) -> anyhow::Result<Config> {
    let client = connect(admin).await?;
    for statement in
        [format!("DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"), format!("CREATE DATABASE {DATABASE}")]
    {
        client
            .batch_execute(&statement)
            .await
            .with_context(|| format!("making the database {DATABASE} (needs CREATEDB)"))?;
    }
    let mut config = admin.clone();
    config.dbname(DATABASE);
    Ok(config)
}

/// Drops the run's database (its connections are closed by then).
pub(crate) async fn drop_database(admin: &Config) -> anyhow::Result<()> {
    let client = connect(admin).await?;
    client.batch_execute(&format!("DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")).await?;
    Ok(())
}

/// Runs the whole measurement on `config` (a fresh database).
pub(crate) async fn upgrade(config: &Config, plan: &UpgradePlan) -> anyhow::Result<UpgradeReport> {
    let client = connect(config).await?;
    let seeded = Instant::now();
    seed_install(&client, plan).await?;
    let seed_seconds = seeded.elapsed().as_secs_f64();
    let size = |table: &'static str| {
        let client = &client;
        async move {
            let bytes: i64 =
                client.query_one("SELECT pg_total_relation_size(to_regclass($1))", &[&table]).await?.get(0);
            Ok::<f64, anyhow::Error>(bytes as f64 / 1_048_576.0)
        }
    };
    let (hook_events_mb, archive_mb) = (size("hook_events").await?, size("hook_events_archive").await?);
    eprintln!(
        "hook-bench upgrade: seeded {} + {} rows ({hook_events_mb:.0} MB + {archive_mb:.0} MB) in {seed_seconds:.0} s",
        plan.rows, plan.archive_rows
    );

    let migrator = connect(config).await?;
    let pid: i32 = migrator.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    let producer = Producer::start(config, plan.rate).await?;
    tokio::time::sleep(MARGIN).await;

    let blocker = match plan.blocker {
        Some(hold) => {
            let blocker = connect(config).await?;
            blocker
                .batch_execute("BEGIN; SELECT count(*) FROM (SELECT 1 FROM hook_events LIMIT 1) AS t")
                .await?;
            Some(tokio::spawn(async move {
                tokio::time::sleep(hold).await;
                blocker.batch_execute("COMMIT").await
            }))
        }
        None => None,
    };
    let monitor = Monitor::start(config, pid).await?;
    let started = Instant::now();
    let report = if plan.first_release {
        migrate::migrate_these(&migrator, &migrate::first_released(5), &plan.options).await
    } else {
        migrate::migrate_with(&migrator, &plan.options).await
    }
    .context("migrating")?;
    let migrations_ms = started.elapsed().as_secs_f64() * 1e3;
    let ended = Instant::now();
    let sampled = monitor.stop().await?;
    if let Some(blocker) = blocker {
        blocker.await.context("the blocker")?.context("ending the blocker's transaction")?;
    }
    tokio::time::sleep(MARGIN).await;
    let mut producer = producer.stop(started, ended).await?;
    producer.longest_lock_wait_ms = sampled.longest_lock_wait.as_secs_f64() * 1e3;
    producer.most_waiting_for_a_lock = sampled.most_waiting;

    let migrations = report
        .details
        .iter()
        .map(|applied| MigrationRun {
            version: applied.version,
            name: applied.name.to_owned(),
            elapsed_ms: applied.elapsed.as_secs_f64() * 1e3,
            lock_timeouts: applied.lock_timeouts,
            locks: sampled.locks.get(&applied.version).cloned().unwrap_or_default(),
        })
        .collect();
    // The rows are all there.
    let events: i64 = client.query_one("SELECT count(*) FROM hook_events", &[]).await?.get(0);
    let archived: i64 = client.query_one("SELECT count(*) FROM hook_events_archive", &[]).await?.get(0);
    anyhow::ensure!(
        events == plan.rows + producer.inserts as i64 && archived == plan.archive_rows,
        "rows went missing: hook_events {events} (expected {} + {}), archive {archived} (expected {})",
        plan.rows,
        producer.inserts,
        plan.archive_rows
    );
    Ok(UpgradeReport {
        migrations_from: if plan.first_release { "the first release (0001-0005)" } else { "this build" },
        rows: plan.rows,
        archive_rows: plan.archive_rows,
        seed_seconds,
        hook_events_mb,
        archive_mb,
        rate: plan.rate,
        blocker_seconds: plan.blocker.map(|d| d.as_secs_f64()),
        lock_timeout_ms: plan.options.lock_timeout.as_millis() as u64,
        max_lock_timeout_ms: plan.options.max_lock_timeout.as_millis() as u64,
        migrations_ms,
        migrations,
        producer,
    })
}

/// The original's table, its producers' rows, its archive SQL; then VACUUM ANALYZE.
async fn seed_install(client: &Client, plan: &UpgradePlan) -> anyhow::Result<()> {
    client.batch_execute(seed::ORIGINAL_DDL).await.context("the original DDL")?;
    for (total, long_ago) in [(plan.archive_rows, true), (plan.rows, false)] {
        let mut left = total;
        while left > 0 {
            let n = left.min(SEED_CHUNK);
            seed::insert_rows(client, Variant::Original, n, long_ago).await.context("seeding")?;
            left -= n;
        }
    }
    client.batch_execute(seed::ORIGINAL_ARCHIVE_SQL).await.context("the original's archive SQL")?;
    for statement in ["VACUUM (ANALYZE) hook_events", "VACUUM (ANALYZE) hook_events_archive", "CHECKPOINT"] {
        client.batch_execute(statement).await.with_context(|| statement.to_owned())?;
    }
    Ok(())
}

/// One insert: when it was scheduled, when it was sent, and its round trip if it succeeded.
type Insert = (Instant, Instant, Option<Duration>);

/// Inserts at a steady rate, each insert from its scheduled time.
struct Producer {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<Vec<Insert>>>,
}

impl Producer {
    async fn start(config: &Config, rate: f64) -> anyhow::Result<Producer> {
        let mut clients = Vec::with_capacity(PRODUCER_CONNECTIONS);
        for _ in 0..PRODUCER_CONNECTIONS {
            clients.push(connect(config).await?);
        }
        let (idle_tx, idle_rx) = tokio::sync::mpsc::unbounded_channel::<Client>();
        for client in clients {
            let _ = idle_tx.send(client);
        }
        let idle_rx = Arc::new(tokio::sync::Mutex::new(idle_rx));
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let period = Duration::from_secs_f64(1.0 / rate);
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut inserts = Vec::new();
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    _ = stopped.changed() => break,
                }
                let scheduled = Instant::now();
                let (idle_rx, idle_tx) = (Arc::clone(&idle_rx), idle_tx.clone());
                inserts.push(tokio::spawn(async move {
                    let client = idle_rx.lock().await.recv().await?;
                    let sent = Instant::now();
                    let result = client
                        .execute(
                            "INSERT INTO hook_events (id, source, action, resource, resource_id, payload, metadata) \
                             VALUES (gen_random_uuid(), 'PostToolUse', 'tool_completion', 'tool', 'Bash', \
                                     '{\"tool_name\": \"Bash\"}', '{\"hook_type\": \"PostToolUse\"}')",
                            &[],
                        )
                        .await;
                    let waited = sent.elapsed();
                    let _ = idle_tx.send(client);
                    Some((scheduled, sent, result.ok().map(|_| waited)))
                }));
            }
            let mut done = Vec::with_capacity(inserts.len());
            for insert in inserts {
                if let Some(outcome) = insert.await.context("an insert task")? {
                    done.push(outcome);
                }
            }
            Ok(done)
        });
        Ok(Producer { stop, task })
    }

    async fn stop(self, started: Instant, ended: Instant) -> anyhow::Result<ProducerSide> {
        let _ = self.stop.send(true);
        let done = self.task.await.context("the producer")??;
        let histogram = || Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).context("histogram");
        let (mut all, mut before, mut during) = (histogram()?, histogram()?, histogram()?);
        let (mut failed, mut over_1s) = (0, 0);
        let mut longest = (Duration::ZERO, started);
        let mut latest_send = Duration::ZERO;
        for (scheduled, sent, waited) in &done {
            latest_send = latest_send.max(sent.duration_since(*scheduled));
            let Some(waited) = waited else {
                failed += 1;
                continue;
            };
            let us = waited.as_micros().clamp(1, 600_000_000) as u64;
            all.record(us).context("recording")?;
            if *sent < started {
                before.record(us).context("recording")?;
            } else if *sent <= ended {
                during.record(us).context("recording")?;
            }
            if *waited > Duration::from_secs(1) {
                over_1s += 1;
            }
            if *waited > longest.0 {
                longest = (*waited, *sent);
            }
        }
        let began = if longest.1 >= started {
            longest.1.duration_since(started).as_secs_f64()
        } else {
            -started.duration_since(longest.1).as_secs_f64()
        };
        Ok(ProducerSide {
            inserts: done.len() as u64 - failed,
            failed,
            wait: Percentiles::of(&all),
            wait_before_migrations: Percentiles::of(&before),
            wait_during_migrations: Percentiles::of(&during),
            over_1s,
            longest_began_ms: began * 1e3,
            latest_send_ms: latest_send.as_secs_f64() * 1e3,
            longest_lock_wait_ms: 0.0,
            most_waiting_for_a_lock: 0,
        })
    }
}

/// Samples the migration session's table locks and its running migration.
struct Monitor {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<Sampled>>,
}

/// What the monitor saw.
struct Sampled {
    locks: BTreeMap<i32, Vec<LockRun>>,
    longest_lock_wait: Duration,
    most_waiting: i64,
}

/// The producer's inserts waiting for a lock right now: how many, and the longest wait so far.
const PRODUCERS_WAITING: &str = "SELECT count(*), \
            coalesce(date_part('epoch', max(clock_timestamp() - l.waitstart)), 0)::float8 \
     FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid \
     WHERE NOT l.granted AND l.waitstart IS NOT NULL AND a.query LIKE 'INSERT INTO hook_events%' AND l.pid <> $1";

/// Which migration a running query belongs to: the first whose text contains its start.
fn migration_of(query: &str) -> Option<i32> {
    let probe: String = query.trim().chars().take(120).collect();
    if probe.is_empty() {
        return None;
    }
    let all = migrate::MIGRATIONS.iter().map(|m| (m.version, m.sql));
    let first = migrate::first_released(5).into_iter().map(|m| (m.version, m.sql));
    all.chain(first).find(|(_, sql)| sql.contains(probe.as_str())).map(|(version, _)| version)
}

impl Monitor {
    async fn start(config: &Config, pid: i32) -> anyhow::Result<Monitor> {
        let client = connect(config).await?;
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            type Key = (i32, String, String, bool);
            // The run going on of each lock (first and last sample that saw it, with no sample
            // between them that did not), and the longest finished run.
            let mut current: BTreeMap<Key, (Instant, Instant)> = BTreeMap::new();
            let (mut longest_lock_wait, mut most_waiting) = (Duration::ZERO, 0i64);
            let mut longest: BTreeMap<Key, Duration> = BTreeMap::new();
            let finish =
                |longest: &mut BTreeMap<Key, Duration>, key: Key, (first, last): (Instant, Instant)| {
                    let run = longest.entry(key).or_default();
                    *run = (*run).max(last.duration_since(first));
                };
            let mut ticks = tokio::time::interval(SAMPLE);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    _ = stopped.changed() => break,
                }
                let rows = client
                    .query(
                        "SELECT a.query, l.relation::regclass::text, l.mode, l.granted \
                         FROM pg_stat_activity AS a \
                         JOIN pg_locks AS l ON l.pid = a.pid AND l.locktype = 'relation' \
                         WHERE a.pid = $1 \
                           AND l.relation IN (to_regclass('hook_events'), to_regclass('hook_events_archive'))",
                        &[&pid],
                    )
                    .await?;
                let waiting = client.query_one(PRODUCERS_WAITING, &[&pid]).await?;
                most_waiting = most_waiting.max(waiting.get(0));
                let waited: f64 = waiting.get(1);
                longest_lock_wait = longest_lock_wait.max(Duration::from_secs_f64(waited.max(0.0)));
                let now = Instant::now();
                let mut seen = Vec::new();
                for row in rows {
                    let Some(version) = migration_of(row.get::<_, &str>(0)) else { continue };
                    let key =
                        (version, row.get::<_, String>(1), row.get::<_, String>(2), row.get::<_, bool>(3));
                    current.entry(key.clone()).or_insert((now, now)).1 = now;
                    seen.push(key);
                }
                let gone: Vec<Key> = current.keys().filter(|k| !seen.contains(k)).cloned().collect();
                for key in gone {
                    if let Some(run) = current.remove(&key) {
                        finish(&mut longest, key, run);
                    }
                }
            }
            for (key, run) in std::mem::take(&mut current) {
                finish(&mut longest, key, run);
            }
            let runs = longest;
            let mut by_version: BTreeMap<i32, Vec<LockRun>> = BTreeMap::new();
            for ((version, table, mode, granted), longest) in runs {
                by_version.entry(version).or_default().push(LockRun {
                    table,
                    mode,
                    granted,
                    longest_ms: longest.as_secs_f64() * 1e3,
                });
            }
            Ok(Sampled { locks: by_version, longest_lock_wait, most_waiting })
        });
        Ok(Monitor { stop, task })
    }

    async fn stop(self) -> anyhow::Result<Sampled> {
        let _ = self.stop.send(true);
        self.task.await.context("the lock monitor")?
    }
}

impl UpgradeReport {
    /// The report as a table.
    pub(crate) fn table(&self) -> String {
        use std::fmt::Write as _;
        let ms = |us: u64| us as f64 / 1e3;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "hook-bench upgrade: migrations of {} on {} rows ({:.0} MB) + an archive of {} rows ({:.0} MB) made \
             by the original's SQL; producer {:.0} inserts/s; lock_timeout {} ms, doubling up to {} ms{}",
            self.migrations_from,
            self.rows,
            self.hook_events_mb,
            self.archive_rows,
            self.archive_mb,
            self.rate,
            self.lock_timeout_ms,
            self.max_lock_timeout_ms,
            self.blocker_seconds.map_or(String::new(), |s| format!("; a transaction holding hook_events for {s:.0} s as they start")),
        );
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<32} {:>10} {:>9}  locks (longest unbroken run seen, sampled every 5 ms)",
            "migration", "took", "timeouts"
        );
        for m in &self.migrations {
            let locks: Vec<String> = m
                .locks
                .iter()
                .filter(|l| l.mode != "AccessShareLock" || !l.granted)
                .map(|l| {
                    format!(
                        "{} {}{} {:.0} ms",
                        l.table,
                        l.mode,
                        if l.granted { "" } else { " WAITING" },
                        l.longest_ms
                    )
                })
                .collect();
            let _ = writeln!(
                out,
                "{:<32} {:>7.0} ms {:>9}  {}",
                m.name,
                m.elapsed_ms,
                m.lock_timeouts,
                if locks.is_empty() { "-".to_owned() } else { locks.join(", ") }
            );
        }
        let _ = writeln!(out, "{:<32} {:>7.0} ms", "all", self.migrations_ms);
        let p = &self.producer;
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "producer: {} inserts ({} failed); round trip p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms \
             (sent {:.0} ms after the migrations started); {} over 1 s; sent at most {:.0} ms late",
            p.inserts,
            p.failed,
            ms(p.wait.p50_us),
            ms(p.wait.p99_us),
            ms(p.wait.max_us),
            p.longest_began_ms,
            p.over_1s,
            p.latest_send_ms
        );
        let _ = writeln!(
            out,
            "  waiting for a lock (pg_locks.waitstart, sampled): the longest {:.0} ms, at most {} inserts at once",
            p.longest_lock_wait_ms, p.most_waiting_for_a_lock
        );
        for (when, d) in [("before", &p.wait_before_migrations), ("during", &p.wait_during_migrations)] {
            let _ = writeln!(
                out,
                "  {when} the migrations: {} inserts, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                d.count,
                ms(d.p50_us),
                ms(d.p99_us),
                ms(d.max_us)
            );
        }
        out
    }
}
