//! Fault injection: processors killed at random, the database restarted and stopped, sessions
//! terminated by the server during claims and completions, claims that lapse under a frozen
//! holder, handlers that panic, hang or return huge errors, and producer clocks far off.
//!
//! The processes under test are `hook-test-worker`s (see its docs): each handler invocation is
//! recorded in `test_invocations` outside the claim's transaction, with the worker's pid, so the
//! table shows every attempt, including those of batches that never committed. An audit trigger
//! installed by [`audit_outcomes`] records every committed write of an outcome, so "recorded
//! exactly once" is checked from the database itself: a fenced completion leaves no audit row.
//!
//! Random choices come from one seed, printed at the start of each test; set `HOOK_FAULT_SEED`
//! to replay a run.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hook_core::{Engine, EngineConfig, HandlerRegistry, HandlerResult, HookEvent, RetryPolicy};
use hook_store::testing::{config_to_url, TestDb};
use hook_store::tokio_postgres::{Client, Config, NoTls};
use hook_store::{ClusterOptions, EmbeddedCluster, StoreOptions};
use hook_tests::worker::{Deadline, Worker};
use hook_tests::{count, test_config, wait_for_count, Running};
use nix::sys::signal::Signal;
use uuid::Uuid;

/// Longest wait for anything in these tests (a drain, a process exit, sessions ending).
const PATIENCE: Duration = Duration::from_secs(90);

/// A small deterministic generator (SplitMix64), seeded from `HOOK_FAULT_SEED` or the clock.
struct Rng(u64);

impl Rng {
    fn from_env(test: &str) -> Rng {
        let seed = std::env::var("HOOK_FAULT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
        eprintln!("{test}: seed {seed} (replay with HOOK_FAULT_SEED={seed})");
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo).max(1)
    }
}

/// The `Errors=N` of the metrics line a worker logs when it stops.
fn errors_in(log: &str) -> u64 {
    log.lines()
        .rev()
        .find_map(|line| line.split("Errors=").nth(1))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metrics line in the log:\n{log}"))
}

/// Inserts `total` events in one statement, with mixed sources and distinct creation times.
async fn insert_events(client: &Client, total: i32) {
    client
        .execute(
            "INSERT INTO hook_events (id, source, action, resource, resource_id, payload, created_at) \
             SELECT gen_random_uuid(), \
                    (ARRAY['PreToolUse', 'PostToolUse', 'UserPromptSubmit', 'Stop'])[1 + i % 4], \
                    'tool_invocation', 'tool', 'r' || i, jsonb_build_object('n', i), \
                    now() - ($1 - i) * interval '1 millisecond' \
             FROM generate_series(1, $1) AS i",
            &[&total],
        )
        .await
        .expect("insert events");
}

/// The outcome audit of `hook_store::bench` (table `hook_outcome_audit_rows`): one row per
/// committed outcome. A completion that is fenced (rolled back with its claim) leaves none, so
/// each event of a run where every handler succeeds must have exactly one.
async fn audit_outcomes(client: &Client) {
    hook_store::bench::install_outcome_audit(client).await.expect("install the outcome audit");
}

/// Waits until `query` counts zero, checking on the way that no worker exited.
async fn wait_zero(client: &Client, workers: &mut [&mut Worker], query: &str) {
    let deadline = Deadline::new(PATIENCE, query);
    while count(client, query).await != 0 {
        for worker in workers.iter_mut() {
            worker.assert_running();
        }
        deadline.tick().await;
    }
}

async fn processed(client: &Client) -> i64 {
    count(client, "SELECT count(*) FROM hook_events WHERE processed").await
}

/// Waits until `processed` reaches `target`, checking on the way that no worker exited.
async fn wait_processed(client: &Client, workers: &mut [Worker], target: i64) {
    let deadline = Deadline::new(PATIENCE, format!("{target} events to be processed"));
    while processed(client).await < target {
        for worker in workers.iter_mut() {
            worker.assert_running();
        }
        deadline.tick().await;
    }
}

/// Waits until the server has no session left of the worker with this pid: whatever it sent
/// before it died has been executed or rolled back, and its row locks are gone.
async fn wait_for_sessions_to_end(client: &Client, pid: i32) {
    let name = format!("hook-test-worker-{pid}");
    let deadline = Deadline::new(PATIENCE, format!("the sessions of worker {pid} to end"));
    while count_sessions(client, &name, "true").await > 0 {
        deadline.tick().await;
    }
}

async fn count_sessions(client: &Client, application_name: &str, condition: &str) -> i64 {
    client
        .query_one(
            &format!(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND application_name = $1 AND ({condition})"
            ),
            &[&application_name],
        )
        .await
        .expect("read pg_stat_activity")
        .get(0)
}

/// Rows of `hook_events` no transaction holds a lock on, seen from a fresh connection.
async fn unlocked_rows(config: &Config) -> i64 {
    let client = connect(config).await;
    client.batch_execute("BEGIN").await.expect("begin");
    let free =
        count(&client, "SELECT count(*) FROM (SELECT id FROM hook_events FOR UPDATE SKIP LOCKED) AS free")
            .await;
    client.batch_execute("ROLLBACK").await.expect("rollback");
    free
}

async fn connect(config: &Config) -> Client {
    let (client, connection) = config.connect(NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

/// Asserts that each query counts zero, naming the first that does not.
async fn expect_zero(client: &Client, checks: &[(&str, String)]) {
    for (what, sql) in checks {
        let got = count(client, sql).await;
        assert_eq!(got, 0, "{what}: {got}\n{sql}");
    }
}

/// The checks every run ends with: all `total` events processed once, with one committed
/// outcome each, each invoked at least once, by no stranger, and no row left locked.
///
/// `killed` are the workers killed on purpose. A kill that lands while a worker runs a suspect
/// alone (the crash-loop guard, see docs/operations.md "Processor crash loops") is, to the next
/// processor, the event's own crash: it records one failed attempt, `processor died while this
/// event was being handled`, and handles it again. Such an event may end with `retry_count`
/// up to the number of its invocations by killed workers, that error, and one committed outcome
/// per attempt; nothing else may be retried or fail.
async fn check_exactly_once_outcomes(
    client: &Client,
    config: &Config,
    total: i64,
    pids: &[i32],
    killed: &[i32],
) {
    let pids = pids.iter().map(i32::to_string).collect::<Vec<_>>().join(",");
    let killed_pids = killed.iter().map(i32::to_string).chain(["0".into()]).collect::<Vec<_>>().join(",");
    let crash_counted = format!(
        "(e.processing_errors[cardinality(e.processing_errors)] LIKE 'processor died while this event was being handled%' \
          AND e.retry_count <= (SELECT count(*) FROM test_invocations AS i \
                                WHERE i.event_id = e.id AND i.pid IN ({killed_pids})))"
    );
    expect_zero(
        client,
        &[
            (
                "events unprocessed, dead, processed before they were created, or failed but not by a kill",
                format!(
                    "SELECT count(*) FROM hook_events AS e WHERE NOT processed OR processed_at IS NULL \
                     OR processed_at < created_at OR dead_at IS NOT NULL \
                     OR ((retry_count <> 0 OR processing_errors IS NOT NULL) AND NOT {crash_counted})"
                ),
            ),
            (
                "events whose committed outcomes are not exactly one success after one per counted attempt",
                "SELECT count(*) FROM hook_events AS e \
                 LEFT JOIN (SELECT event_id, count(*) AS n, count(*) FILTER (WHERE processed) AS ok \
                            FROM hook_outcome_audit_rows GROUP BY event_id) AS o ON o.event_id = e.id \
                 WHERE o.ok IS DISTINCT FROM 1 OR o.n IS DISTINCT FROM 1 + e.retry_count"
                    .into(),
            ),
            (
                "events never invoked",
                "SELECT count(*) FROM hook_events AS e \
                 WHERE NOT EXISTS (SELECT 1 FROM test_invocations AS i WHERE i.event_id = e.id)"
                    .into(),
            ),
            (
                "invocations by a process that was not one of the workers",
                format!("SELECT count(*) FROM test_invocations WHERE pid NOT IN ({pids})"),
            ),
        ],
    )
    .await;
    // Each kill ends at most one attempt that runs alone.
    let counted = count(client, "SELECT count(*) FROM hook_events WHERE retry_count <> 0").await;
    assert!(
        counted <= killed.len() as i64,
        "{counted} events with a counted crash after {} kills",
        killed.len()
    );
    assert_eq!(count(client, "SELECT count(*) FROM hook_events").await, total);
    assert_eq!(unlocked_rows(config).await, total, "rows still locked");
}

/// The index in `workers` of one that has handled several events still unprocessed: a batch of
/// its has not committed yet. (Not one running a suspect alone: killing those again and again
/// would charge one event up to its death.)
async fn mid_batch(client: &Client, workers: &[Worker]) -> Option<usize> {
    let pids: Vec<i32> = workers.iter().map(|w| w.pid).collect();
    let row = client
        .query_opt(
            "SELECT i.pid FROM test_invocations AS i JOIN hook_events AS e ON e.id = i.event_id \
             WHERE NOT e.processed AND i.pid = ANY ($1) GROUP BY i.pid HAVING count(*) > 1 LIMIT 1",
            &[&pids],
        )
        .await
        .expect("find a worker mid-batch")?;
    let pid: i32 = row.get(0);
    workers.iter().position(|w| w.pid == pid)
}

/// Events handled more than once.
async fn reinvoked(client: &Client) -> i64 {
    count(
        client,
        "SELECT count(*) FROM (SELECT 1 FROM test_invocations GROUP BY event_id HAVING count(*) > 1) AS r",
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// 1. SIGKILL at random points
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn processors_killed_at_random_points_lose_nothing_and_never_handle_an_event_twice_under_a_live_claim()
{
    const TOTAL: i64 = 50_000;
    const WORKERS: usize = 4;
    const KILLS: usize = 8;
    const BATCH: i64 = 50;
    const IN_FLIGHT: i64 = 2;
    let mut rng = Rng::from_env("random_kills");
    let db = TestDb::migrated("faults_random_kills").await;
    let client = db.client().await;
    audit_outcomes(&client).await;
    insert_events(&client, TOTAL as i32).await;
    let url = db.url();
    let flags = ["--batch-size", "50", "--batches-in-flight", "2", "--delay-ms", "1"];

    let begun = Instant::now();
    let mut workers: Vec<Worker> =
        (0..WORKERS).map(|_| Worker::start(env!("CARGO_BIN_EXE_hook-test-worker"), &url, &flags)).collect();
    let mut started: Vec<i32> = workers.iter().map(|w| w.pid).collect();
    // Kill when the drain passes random points between 5% and 90%, a random few ms later.
    let points: BTreeSet<i64> =
        (0..KILLS).map(|_| rng.range(TOTAL as u64 / 20, TOTAL as u64 * 9 / 10) as i64).collect();
    let mut killed: Vec<(i32, String)> = Vec::new();
    for point in points {
        wait_processed(&client, &mut workers, point).await;
        tokio::time::sleep(Duration::from_millis(rng.range(0, 40))).await;
        // Preferably a worker caught mid-batch (it handled an event whose outcome has not
        // committed), so that the kills test what they are for; else one at random.
        let victim = match mid_batch(&client, &workers).await {
            Some(victim) => victim,
            None => rng.range(0, WORKERS as u64) as usize,
        };
        let mut worker = std::mem::replace(
            &mut workers[victim],
            Worker::start(env!("CARGO_BIN_EXE_hook-test-worker"), &url, &flags),
        );
        started.push(workers[victim].pid);
        worker.kill_9().await;
        wait_for_sessions_to_end(&client, worker.pid).await;
        // From here on nothing the killed worker sent can still commit.
        let ended: String = client.query_one("SELECT clock_timestamp()::text", &[]).await.unwrap().get(0);
        eprintln!("killed worker {} at {} processed events", worker.pid, processed(&client).await);
        killed.push((worker.pid, ended));
    }
    wait_processed(&client, &mut workers, TOTAL).await;
    let drained = begun.elapsed();
    for worker in &mut workers {
        worker.terminate().await;
        wait_for_sessions_to_end(&client, worker.pid).await;
    }

    let killed_pids: Vec<i32> = killed.iter().map(|(pid, _)| *pid).collect();
    check_exactly_once_outcomes(&client, &db.config(), TOTAL, &started, &killed_pids).await;
    let killed_pids = killed_pids.iter().map(i32::to_string).collect::<Vec<_>>().join(",");
    let killed_at =
        killed.iter().map(|(pid, at)| format!("({pid}, '{at}'::timestamptz)")).collect::<Vec<_>>().join(",");
    expect_zero(
        &client,
        &[
            (
                // An event may be handled again only after the process handling it died without
                // committing: every invocation but the last must be a killed process's.
                "events handled again after an invocation by a process that was not killed",
                format!(
                    "SELECT count(*) FROM (SELECT pid, row_number() OVER (PARTITION BY event_id ORDER BY at DESC) AS nth \
                                           FROM test_invocations) AS i \
                     WHERE nth > 1 AND pid NOT IN ({killed_pids})"
                ),
            ),
            (
                // When a killed process handled an event last, its outcome committed before
                // its sessions ended.
                "events last handled by a killed process and processed after its sessions ended",
                format!(
                    "SELECT count(*) FROM (SELECT DISTINCT ON (event_id) event_id, pid FROM test_invocations \
                                           ORDER BY event_id, at DESC) AS last \
                     JOIN (VALUES {killed_at}) AS k(pid, ended) ON k.pid = last.pid \
                     JOIN hook_events AS e ON e.id = last.event_id \
                     WHERE e.processed_at > k.ended"
                ),
            ),
        ],
    )
    .await;
    let again = reinvoked(&client).await;
    assert!(again > 0, "no kill landed while a batch was in flight: the checks above had nothing to catch");
    assert!(
        again <= killed.len() as i64 * BATCH * IN_FLIGHT,
        "{again} events handled more than once: more than the kills' batches in flight"
    );
    eprintln!(
        "{TOTAL} events drained by {WORKERS} workers in {drained:?} through {} SIGKILLs; {again} handled twice",
        killed.len()
    );
}

// ---------------------------------------------------------------------------------------------
// 2. The database restarted, and stopped for 10 s
// ---------------------------------------------------------------------------------------------

/// A cluster of the test's own, removed when dropped.
struct OwnCluster {
    cluster: Option<EmbeddedCluster>,
    dir: PathBuf,
}

impl OwnCluster {
    async fn start(tag: &str) -> OwnCluster {
        let dir = std::env::temp_dir().join(format!("hook-faults-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cluster = EmbeddedCluster::start(ClusterOptions {
            data_dir: dir.clone(),
            database: "faults".into(),
            durable: false,
            max_connections: 60,
        })
        .await
        .expect("start the test's own cluster");
        OwnCluster { cluster: Some(cluster), dir }
    }

    fn get(&self) -> &EmbeddedCluster {
        self.cluster.as_ref().expect("cluster")
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        if let Some(cluster) = self.cluster.take() {
            let dir = self.dir.clone();
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                runtime.block_on(async move {
                    let _ = cluster.stop_server().await;
                });
                let _ = std::fs::remove_dir_all(&dir);
                Ok::<(), std::io::Error>(())
            })
            .join();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_restart_and_a_ten_second_outage_are_ridden_out_and_listen_resumes() {
    const TOTAL: i64 = 6_000;
    let own = OwnCluster::start("restart").await;
    let config = own.get().config("faults");
    let url = config_to_url(&config);
    let mut client = connect(&config).await;
    hook_store::migrate::migrate(&client).await.expect("migrate");
    audit_outcomes(&client).await;
    insert_events(&client, TOTAL as i32).await;
    // Polling every 5 s: anything picked up sooner came through LISTEN/NOTIFY.
    let flags = ["--poll-ms", "5000", "--batch-size", "50", "--delay-ms", "5", "--concurrency", "16"];
    let mut workers: Vec<Worker> =
        (0..3).map(|_| Worker::start(env!("CARGO_BIN_EXE_hook-test-worker"), &url, &flags)).collect();
    let pids: Vec<i32> = workers.iter().map(|w| w.pid).collect();

    wait_processed(&client, &mut workers, TOTAL / 5).await;
    let began = Instant::now();
    own.get().stop_server().await.expect("stop -m fast");
    own.get().start_server().await.expect("start");
    eprintln!("restarted in {:?}", began.elapsed());
    client = connect(&config).await;

    wait_processed(&client, &mut workers, TOTAL / 2).await;
    own.get().stop_server().await.expect("stop -m fast");
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(10) {
        for worker in &mut workers {
            worker.assert_running();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    own.get().start_server().await.expect("start");
    client = connect(&config).await;
    let back = Instant::now();
    wait_processed(&client, &mut workers, TOTAL).await;
    eprintln!("drained {:?} after the outage", back.elapsed());

    // LISTEN resumed: each worker has its LISTEN session back, and a new event is picked up
    // well within the 5 s poll interval, three times in a row.
    for &pid in &pids {
        let name = format!("hook-test-worker-{pid}");
        let deadline = Deadline::new(PATIENCE, format!("worker {pid} to LISTEN again"));
        while count_sessions(&client, &name, "query = 'LISTEN hook_events'").await == 0 {
            deadline.tick().await;
        }
    }
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let inserted = Instant::now();
        insert_events(&client, 1).await;
        wait_for_count(
            &client,
            "SELECT count(*) FROM hook_events WHERE NOT processed",
            0,
            Duration::from_secs(10),
        )
        .await;
        let latency = inserted.elapsed();
        assert!(
            latency < Duration::from_millis(1500),
            "round {round}: picked up after {latency:?}: by polling, not NOTIFY"
        );
        eprintln!("after the outage, a new event was processed {latency:?} after its insert");
    }

    let mut errors = Vec::new();
    for worker in &mut workers {
        errors.push(errors_in(&worker.terminate().await));
        wait_for_sessions_to_end(&client, worker.pid).await;
    }
    assert!(errors.iter().all(|&e| e > 0), "every worker noticed the outage: {errors:?}");
    check_exactly_once_outcomes(&client, &config, TOTAL + 3, &pids, &[]).await;
    // Only batches in flight when the server went down were handled again: 2 outages x 3
    // workers x 2 batches x 50 events at most.
    let again = reinvoked(&client).await;
    assert!(again <= 2 * 3 * 2 * 50, "{again} events handled more than once");
    eprintln!("errors per worker {errors:?}; {again} events handled more than once");
}

/// Session order (docs/routes.md) across a database restart: two engines with every route
/// ordered, 20 sessions of 30 events, the server restarted while they work. Batches in flight
/// at the restart are handled again, but within each session the events are attempted in
/// `created_at` order: the sequence of attempts of a session never goes back to an earlier
/// event (a repeat of the head is the only repeat), and every event is processed.
#[tokio::test(flavor = "multi_thread")]
async fn a_database_restart_mid_session_keeps_every_sessions_order() {
    const SESSIONS: i64 = 20;
    const PER: i64 = 30;
    let own = OwnCluster::start("order_restart").await;
    let config = own.get().config("faults");
    let mut client = connect(&config).await;
    hook_store::migrate::migrate(&client).await.expect("migrate");
    client
        .execute(
            "INSERT INTO hook_events (id, source, action, resource, resource_id, payload, metadata, created_at)
             SELECT gen_random_uuid(), 'PreToolUse', 'tool_invocation', 'tool', 'Bash',
                    jsonb_build_object('n', i / $1::int8), jsonb_build_object('session_id', 's' || (i % $1::int8)),
                    clock_timestamp() + i * interval '1 microsecond'
             FROM generate_series(0, $1::int8 * $2::int8 - 1) AS i",
            &[&SESSIONS, &PER],
        )
        .await
        .expect("insert the sessions");
    let attempts: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let options = StoreOptions {
        session_order: hook_core::SessionOrder {
            rules: vec![hook_core::OrderRule { source: "*".into(), action: "*".into(), ordered: true }],
        },
        ..StoreOptions::default()
    };
    let mut runs = Vec::new();
    for _ in 0..2 {
        let seen = Arc::clone(&attempts);
        let mut registry = HandlerRegistry::new();
        registry.register("*", "*", move |event: Arc<HookEvent>| {
            let seen = Arc::clone(&seen);
            async move {
                let session = event.metadata["session_id"].as_str().unwrap_or_default().to_owned();
                let n = event.payload["n"].as_i64().unwrap_or(-1);
                seen.lock().expect("attempts lock").push((session, n));
                tokio::time::sleep(Duration::from_millis(5 + (n * 7 % 11) as u64)).await;
                HandlerResult::ok("done")
            }
        });
        let store = hook_store::PgStore::connect(config.clone(), options.clone()).await.expect("a store");
        runs.push(Running::start(
            Engine::builder(store).registry(registry).config(test_config()).build().expect("an engine"),
        ));
    }
    let total = SESSIONS * PER;
    let deadline = Deadline::new(PATIENCE, "a third of the sessions' events to be processed");
    while count(&client, "SELECT count(*) FROM hook_events WHERE processed").await < total / 3 {
        deadline.tick().await;
    }
    own.get().stop_server().await.expect("stop -m fast");
    own.get().start_server().await.expect("start");
    client = connect(&config).await;
    wait_for_count(&client, "SELECT count(*) FROM hook_events WHERE NOT processed", 0, PATIENCE).await;
    for run in runs {
        run.stop().await;
    }
    let attempts = attempts.lock().expect("attempts lock").clone();
    let mut by_session: std::collections::HashMap<String, Vec<i64>> = std::collections::HashMap::new();
    for (session, n) in attempts {
        by_session.entry(session).or_default().push(n);
    }
    assert_eq!(by_session.len(), SESSIONS as usize);
    let mut repeats = 0;
    for (session, seq) in &by_session {
        assert!(seq.windows(2).all(|w| w[0] <= w[1]), "session {session} went back: {seq:?}");
        let distinct: BTreeSet<i64> = seq.iter().copied().collect();
        assert_eq!(distinct, (0..PER).collect::<BTreeSet<i64>>(), "session {session}: every event");
        repeats += seq.len() - distinct.len();
    }
    eprintln!("{repeats} attempts repeated after the restart, none out of order");
}

// ---------------------------------------------------------------------------------------------
// 3. Sessions terminated by the server during claims, handlers and completions
// ---------------------------------------------------------------------------------------------

/// Makes every completion wait on advisory lock `GATE` (shared), so a test holding it
/// exclusively catches completions in the act.
async fn install_completion_gate(client: &Client) {
    client
        .batch_execute(
            "CREATE FUNCTION test_completion_gate() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 PERFORM pg_advisory_xact_lock_shared(4711);
                 RETURN NEW;
             END $$;
             CREATE TRIGGER test_completion_gate BEFORE UPDATE ON hook_events
                 FOR EACH ROW EXECUTE FUNCTION test_completion_gate();",
        )
        .await
        .expect("install the completion gate");
}

/// Terminates the workers' sessions that match `condition`, once at least one does (bounded);
/// returns how many were terminated.
async fn terminate_when(client: &Client, what: &str, condition: &str) -> i64 {
    let sql = format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name LIKE 'hook-test-worker-%' AND ({condition})"
    );
    let deadline = Deadline::new(PATIENCE, format!("a session {what}"));
    loop {
        let n = count(client, &sql).await;
        if n > 0 {
            return n;
        }
        deadline.tick().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_terminated_during_claims_handlers_and_completions_lose_nothing() {
    const TOTAL: i64 = 5_000;
    const ROUNDS: usize = 3;
    let db = TestDb::migrated("faults_terminate").await;
    let client = db.client().await;
    let gate = db.client().await;
    audit_outcomes(&client).await;
    install_completion_gate(&client).await;
    insert_events(&client, TOTAL as i32).await;
    let url = db.url();
    let flags = ["--batch-size", "25", "--delay-ms", "20", "--concurrency", "32"];
    let mut workers: Vec<Worker> =
        (0..3).map(|_| Worker::start(env!("CARGO_BIN_EXE_hook-test-worker"), &url, &flags)).collect();
    let pids: Vec<i32> = workers.iter().map(|w| w.pid).collect();

    // The claim's text is longer than pg_stat_activity keeps (track_activity_query_size, 1 kB):
    // found by its start, or by its locking clause where the text is short enough to show it.
    let claim_sql = "(query LIKE 'WITH named AS%' OR query LIKE '%FOR UPDATE%SKIP LOCKED%')";
    let mut terminated = [0i64; 4];
    for round in 0..ROUNDS {
        // Spread the rounds over the drain: at 10%, 40% and 70%.
        wait_processed(&client, &mut workers, TOTAL * (1 + 3 * round as i64) / 10).await;
        // During a claim: an exclusive table lock makes the next claims wait in the act.
        gate.batch_execute("BEGIN; LOCK TABLE hook_events IN EXCLUSIVE MODE").await.expect("lock the table");
        terminated[0] +=
            terminate_when(&client, "waiting in a claim", &format!("state = 'active' AND {claim_sql}")).await;
        gate.batch_execute("ROLLBACK").await.expect("unlock the table");

        // During a completion: the gate holds the outcome updates in the act.
        gate.batch_execute("SELECT pg_advisory_lock(4711)").await.expect("close the gate");
        terminated[1] += terminate_when(
            &client,
            "writing outcomes",
            "state = 'active' AND query LIKE 'UPDATE hook_events%' AND wait_event_type = 'Lock'",
        )
        .await;
        gate.batch_execute("SELECT pg_advisory_unlock(4711)").await.expect("open the gate");

        // While handlers run: the claim's transaction is idle.
        terminated[2] += terminate_when(&client, "holding a claim", "state = 'idle in transaction'").await;

        // Anything: pooled, LISTEN and recording connections too.
        terminated[3] += terminate_when(&client, "of any kind", "true").await;
        for worker in &mut workers {
            worker.assert_running();
        }
        eprintln!("round {round}: {} of {TOTAL} processed", processed(&client).await);
    }
    wait_processed(&client, &mut workers, TOTAL).await;
    let mut errors = Vec::new();
    for worker in &mut workers {
        errors.push(errors_in(&worker.terminate().await));
        wait_for_sessions_to_end(&client, worker.pid).await;
    }
    check_exactly_once_outcomes(&client, &db.config(), TOTAL, &pids, &[]).await;
    assert!(
        errors.iter().sum::<u64>() >= ROUNDS as u64 * 2,
        "failed claims and completions are counted: {errors:?}"
    );
    eprintln!(
        "terminated {} sessions in claims, {} in completions, {} holding claims, {} of any kind; \
         errors per worker {errors:?}; {} events handled more than once",
        terminated[0],
        terminated[1],
        terminated[2],
        terminated[3],
        reinvoked(&client).await
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Claims that lapse: short claim timeouts, a frozen holder
// ---------------------------------------------------------------------------------------------

/// Tracks which events are being handled right now, and every time one was handled by two
/// handlers at once.
#[derive(Clone, Default)]
struct Overlaps {
    active: Arc<Mutex<BTreeSet<Uuid>>>,
    overlaps: Arc<Mutex<Vec<Uuid>>>,
    invocations: Arc<AtomicU32>,
}

/// Marks an event active for as long as it lives (a timed-out handler is dropped, not finished).
struct ActiveGuard(Overlaps, Uuid);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.lock().expect("lock").remove(&self.1);
    }
}

impl Overlaps {
    fn enter(&self, id: Uuid) -> ActiveGuard {
        self.invocations.fetch_add(1, Ordering::SeqCst);
        if !self.active.lock().expect("lock").insert(id) {
            self.overlaps.lock().expect("lock").push(id);
        }
        ActiveGuard(self.clone(), id)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_short_claim_timeout_no_event_is_handled_by_two_engines_at_once() {
    const TOTAL: i64 = 300;
    let db = TestDb::migrated("faults_short_claim").await;
    let client = db.client().await;
    audit_outcomes(&client).await;
    insert_events(&client, TOTAL as i32).await;
    let overlaps = Overlaps::default();
    // Handlers take 0-450 ms (a few hang past the 500 ms handler timeout and are retried), in
    // claims that lapse after 1 s. Enough handler slots for every claimed event: a handler starts
    // as soon as it is claimed.
    let config = EngineConfig {
        batch_size: 16,
        batches_in_flight: 2,
        concurrency: 32,
        handler_timeout: Duration::from_millis(500),
        claim_timeout: Duration::from_secs(1),
        drain_timeout: Duration::from_millis(500),
        retry: RetryPolicy {
            base_delay: Duration::from_millis(50),
            max_retry_count: 10,
            ..test_config().retry
        },
        ..test_config()
    };
    let mut runs = Vec::new();
    for _ in 0..2 {
        let tracker = overlaps.clone();
        let mut registry = HandlerRegistry::new();
        registry.register("*", "*", move |event: Arc<HookEvent>| {
            let tracker = tracker.clone();
            async move {
                let _active = tracker.enter(event.id);
                let n: i64 = event.payload["n"].as_i64().unwrap_or(0);
                let first_try = event.retry_count == 0;
                let ms = if n % 37 == 0 && first_try { 5_000 } else { (n * 7919 % 450) as u64 };
                tokio::time::sleep(Duration::from_millis(ms)).await;
                HandlerResult::ok("done")
            }
        });
        let store = db.store(StoreOptions::default()).await;
        runs.push(Running::start(
            Engine::builder(store).registry(registry).config(config.clone()).build().unwrap(),
        ));
    }
    wait_for_count(&client, "SELECT count(*) FROM hook_events WHERE NOT processed", 0, PATIENCE).await;
    let mut metrics = Vec::new();
    for run in runs {
        metrics.push(run.stop().await);
    }
    let overlapping = overlaps.overlaps.lock().unwrap().clone();
    assert!(overlapping.is_empty(), "handled by two at once: {overlapping:?}");
    assert!(metrics.iter().all(|m| m.errors == 0), "no claim lapsed: {metrics:?}");
    let timed_out = TOTAL / 37;
    assert_eq!(metrics.iter().map(|m| m.succeeded).sum::<u64>(), TOTAL as u64);
    assert_eq!(
        metrics.iter().map(|m| m.retried).sum::<u64>(),
        timed_out as u64,
        "the hanging ones timed out once"
    );
    let outcomes = count(&client, "SELECT count(*) FROM hook_outcome_audit_rows").await;
    assert_eq!(outcomes, TOTAL + timed_out, "one committed outcome per attempt");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_holder_loses_its_claim_and_its_late_completion_is_fenced_and_counted() {
    let db = TestDb::migrated("faults_frozen_holder").await;
    let client = db.client().await;
    audit_outcomes(&client).await;
    // Every event's handler records its invocation, then sleeps 300 ms.
    client
        .batch_execute(
            "INSERT INTO hook_events (id, source, action, resource, resource_id) \
             SELECT gen_random_uuid(), 'Slow', 'a', 'r', 'r' || i FROM generate_series(1, 40) AS i",
        )
        .await
        .unwrap();
    let url = db.url();
    let flags = [
        "--fault",
        "Slow=sleep:300",
        "--batch-size",
        "10",
        "--batches-in-flight",
        "1",
        "--handler-timeout-ms",
        "500",
        "--claim-timeout-ms",
        "1000",
        "--drain-timeout-ms",
        "500",
    ];
    let mut frozen = Worker::start(env!("CARGO_BIN_EXE_hook-test-worker"), &url, &flags);
    let name = format!("hook-test-worker-{}", frozen.pid);
    // Freeze it while its handlers run, with the claim held (as a stopped VM would).
    let deadline = Deadline::new(PATIENCE, "the worker to hold a claim with handlers running");
    loop {
        let running = count(
            &client,
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' \
                                       AND application_name LIKE 'hook-test-worker-%'",
        )
        .await;
        if running > 0 && count(&client, "SELECT count(*) FROM test_invocations").await > 0 {
            break;
        }
        frozen.assert_running();
        deadline.tick().await;
    }
    frozen.signal(Signal::SIGSTOP);
    let held: Vec<Uuid> = client
        .query("SELECT event_id FROM test_invocations", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // The server ends the frozen holder's claim after the claim timeout.
    let deadline = Deadline::new(PATIENCE, "the frozen worker's claim to lapse");
    while count_sessions(&client, &name, "state = 'idle in transaction'").await > 0 {
        deadline.tick().await;
    }
    let lapsed: String = client.query_one("SELECT clock_timestamp()::text", &[]).await.unwrap().get(0);

    // Another worker takes over and handles everything.
    let mut other = Worker::start(env!("CARGO_BIN_EXE_hook-test-worker"), &url, &flags);
    wait_zero(&client, &mut [&mut other], "SELECT count(*) FROM hook_events WHERE NOT processed").await;
    // The frozen one wakes up and finds its claim lost: either its next keep-alive fails (and it
    // cancels the handlers) or its handlers finish first and the completion is fenced.
    frozen.signal(Signal::SIGCONT);
    let deadline = Deadline::new(PATIENCE, "the woken worker to notice its lost claim");
    while !["recording outcomes failed", "claim lost while handlers ran"]
        .iter()
        .any(|m| frozen.log().contains(m))
    {
        deadline.tick().await;
    }
    let frozen_errors = errors_in(&frozen.terminate().await);
    let other_log = other.terminate().await;
    wait_for_sessions_to_end(&client, frozen.pid).await;
    wait_for_sessions_to_end(&client, other.pid).await;

    assert!(frozen_errors >= 1, "the fenced completion is counted in Errors");
    assert_eq!(errors_in(&other_log), 0);
    check_exactly_once_outcomes(&client, &db.config(), 40, &[frozen.pid, other.pid], &[]).await;
    // The events the frozen worker held were handled by the other only after the claim lapsed.
    let early: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM test_invocations WHERE pid = {} AND event_id = ANY($1) AND at < '{lapsed}'::timestamptz",
                other.pid
            ),
            &[&held],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(early, 0, "an event was taken over while the frozen worker's claim was alive");
    assert!(!held.is_empty());
}

// ---------------------------------------------------------------------------------------------
// 5. Handlers that panic, hang or return huge errors, in a real process
// ---------------------------------------------------------------------------------------------

/// The resident and peak memory of a process, in KiB.
fn memory_kib(pid: i32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/<pid>/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_processor_whose_handlers_panic_hang_and_return_huge_errors_stays_healthy() {
    const HUGE: usize = 20 * 1024 * 1024;
    let db = TestDb::migrated("faults_bad_handlers").await;
    let client = db.client().await;
    let url = db.url();
    let huge = format!("Huge=huge-error:{HUGE}");
    // Small batches: the engine keeps every handler result of a batch (a failed one holds its
    // error twice, as `error` and `message`) until the whole batch is done, so the peak grows
    // with batch size x batches in flight x error size (about 1.4 GiB at batch size 20).
    let flags = [
        "--fault",
        "Panic=panic",
        "--fault",
        "Hang=hang",
        "--fault",
        huge.as_str(),
        // The handler's time includes the worker's own record of the invocation, a round trip
        // to a server that is writing the huge errors beside it (and, in CI, every other test):
        // at 1 s, a Panic event's record was seen to outlast it ("handler timed out"). 3 s.
        "--handler-timeout-ms",
        "3000",
        "--claim-timeout-ms",
        "8000",
        "--drain-timeout-ms",
        "1000",
        "--max-retry-count",
        "2",
        "--retry-base-ms",
        "50",
        "--concurrency",
        "8",
        "--batch-size",
        "4",
    ];
    let mut worker = Worker::start(env!("CARGO_BIN_EXE_hook-test-worker"), &url, &flags);
    let insert = |source: &'static str, n: i32| {
        let client = &client;
        async move {
            client
                .execute(
                    "INSERT INTO hook_events (id, source, action, resource, resource_id) \
                     SELECT gen_random_uuid(), $1, 'a', 'r', 'r' || i FROM generate_series(1, $2) AS i",
                    &[&source, &n],
                )
                .await
                .unwrap();
        }
    };
    let undecided = "SELECT count(*) FROM hook_events WHERE NOT processed AND dead_at IS NULL";
    let mut rss_after = Vec::new();
    for wave in 0..3 {
        insert("Panic", 20).await;
        insert("Hang", 8).await;
        insert("Huge", 16).await;
        insert("Fine", 20).await;
        wait_zero(&client, &mut [&mut worker], undecided).await;
        let (rss, peak) = memory_kib(worker.pid);
        eprintln!("wave {wave}: RSS {} MiB, peak {} MiB", rss / 1024, peak / 1024);
        rss_after.push(rss);
    }
    // The huge errors are not kept: the three waves' errors add up to 1.9 GiB (16 events x 2
    // attempts x 20 MiB each), while what stays resident is what the allocator keeps for reuse.
    assert!(rss_after.iter().all(|&kib| kib < 512 * 1024), "RSS after each wave: {rss_after:?} KiB");

    // Later events are processed at once.
    let began = Instant::now();
    insert("Fine", 20).await;
    wait_for_count(&client, undecided, 0, Duration::from_secs(10)).await;
    assert!(began.elapsed() < Duration::from_secs(3), "later events waited {:?}", began.elapsed());
    let log = worker.terminate().await;
    assert_eq!(errors_in(&log), 0, "no database error");

    let reasons = |source: &'static str| {
        let client = &client;
        async move {
            client
                .query(
                    "SELECT processing_errors, retry_count, dead_at IS NOT NULL FROM hook_events WHERE source = $1",
                    &[&source],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get::<_, Vec<String>>(0), r.get::<_, i32>(1), r.get::<_, bool>(2)))
                .collect::<Vec<_>>()
        }
    };
    for (errors, retries, dead) in reasons("Panic").await {
        assert_eq!((retries, dead, errors.len()), (2, true, 2));
        assert!(errors.iter().all(|e| e.starts_with("handler panicked: injected panic for ")), "{errors:?}");
    }
    for (errors, retries, dead) in reasons("Hang").await {
        assert_eq!((retries, dead), (2, true));
        assert!(errors.iter().all(|e| e == "handler timed out after 3.000s"), "{errors:?}");
    }
    for (errors, retries, dead) in reasons("Huge").await {
        assert_eq!((retries, dead), (2, true));
        for error in errors {
            assert!(error.len() <= hook_core::MAX_ERROR_BYTES, "{} bytes", error.len());
            assert!(error.ends_with(&format!("[truncated, {HUGE} bytes in all]")));
        }
    }
    assert_eq!(
        count(&client, "SELECT count(*) FROM hook_events WHERE source = 'Fine' AND processed").await,
        80
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Producer clocks far off
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn created_at_far_in_the_future_or_past_neither_stalls_nor_breaks_processed_at() {
    let db = TestDb::migrated("faults_clock_skew").await;
    let client = db.client().await;
    let offsets =
        ["1000 years", "100 years", "1 day", "1 minute", "-1 minute", "-1 day", "-100 years", "-1000 years"];
    for offset in offsets {
        for source in ["Works", "FailsOnce"] {
            client
                .execute(
                    "INSERT INTO hook_events (id, source, action, resource, resource_id, created_at) \
                     SELECT gen_random_uuid(), $1, 'a', 'r', $2, now() + $3::text::interval FROM generate_series(1, 5)",
                    &[&source, &offset, &offset],
                )
                .await
                .unwrap_or_else(|e| panic!("{offset}: {e}"));
        }
    }
    client
        .batch_execute(
            "INSERT INTO hook_events (id, source, action, resource, resource_id, created_at) \
             VALUES (gen_random_uuid(), 'Works', 'a', 'r', 'epoch', 'epoch')",
        )
        .await
        .unwrap();
    let failed_once: Arc<Mutex<BTreeSet<Uuid>>> = Arc::default();
    let mut registry = HandlerRegistry::new();
    let seen = Arc::clone(&failed_once);
    registry.register("FailsOnce", "*", move |event: Arc<HookEvent>| {
        let first = seen.lock().unwrap().insert(event.id);
        async move {
            if first {
                Err("first attempt fails")
            } else {
                Ok(HandlerResult::ok("second attempt"))
            }
        }
    });
    registry.register("*", "*", |_e: Arc<HookEvent>| async move { HandlerResult::ok("fine") });
    let config = EngineConfig {
        retry: RetryPolicy { base_delay: Duration::from_millis(300), ..test_config().retry },
        ..test_config()
    };
    let began = Instant::now();
    let store = db.store(StoreOptions::default()).await;
    let running = Running::start(Engine::builder(store).registry(registry).config(config).build().unwrap());
    wait_for_count(
        &client,
        "SELECT count(*) FROM hook_events WHERE NOT processed",
        0,
        Duration::from_secs(30),
    )
    .await;
    let took = began.elapsed();
    let metrics = running.stop().await;
    // One retry 300 ms after the failure, wherever created_at is: no wait for created_at.
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!((metrics.succeeded, metrics.retried, metrics.errors), (81, 40, 0));
    let bad = count(
        &client,
        "SELECT count(*) FROM hook_events WHERE processed_at < created_at \
         OR (created_at <= now() AND processed_at > clock_timestamp()) \
         OR (created_at > clock_timestamp() AND processed_at <> created_at)",
    )
    .await;
    assert_eq!(bad, 0, "processed_at is the processing time, or created_at when that is later");
    let retried_ok = count(
        &client,
        "SELECT count(*) FROM hook_events WHERE source = 'FailsOnce' AND retry_count = 1 AND processed",
    )
    .await;
    assert_eq!(retried_ok, 40);
}

/// Five events, one handler slot, 0.4 s each, a 1 s claim timeout: draining takes 2 s, twice the
/// claim timeout. A claim takes no more events than there are free slots, so the events are
/// claimed one at a time and none waits for a slot inside a claim (before, all five were claimed
/// at once and the claim had to be kept alive while they waited); each is handled once and
/// commits.
#[tokio::test(flavor = "multi_thread")]
async fn five_events_with_one_handler_slot_are_claimed_one_at_a_time_and_each_commits_once() {
    let db = TestDb::migrated("faults_lease_extension").await;
    let client = db.client().await;
    hook_tests::insert_events(&client, 5, "Slow", "op").await;
    let invocations = Arc::new(AtomicU32::new(0));
    let seen = Arc::clone(&invocations);
    let mut registry = HandlerRegistry::new();
    registry.register("*", "*", move |_e: Arc<HookEvent>| {
        let seen = Arc::clone(&seen);
        async move {
            seen.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(400)).await;
            HandlerResult::ok("slow but fine")
        }
    });
    let config = EngineConfig {
        batch_size: 5,
        batches_in_flight: 1,
        concurrency: 1,
        handler_timeout: Duration::from_millis(500),
        claim_timeout: Duration::from_secs(1),
        drain_timeout: Duration::from_millis(500),
        ..test_config()
    };
    let store = db.store(StoreOptions::default()).await;
    let running = Running::start(Engine::builder(store).registry(registry).config(config).build().unwrap());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while count(&client, "SELECT count(*) FROM hook_events WHERE NOT processed").await > 0
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = running.stop().await;
    let pending = count(&client, "SELECT count(*) FROM hook_events WHERE NOT processed").await;
    assert_eq!(
        (pending, invocations.load(Ordering::SeqCst), metrics.succeeded, metrics.errors),
        (0, 5, 5, 0),
        "(unprocessed, invocations, succeeded, errors) after 15 s"
    );
    // Five batches of one event: each row was written by a transaction of its own.
    let writers = count(&client, "SELECT count(DISTINCT xmin::text) FROM hook_events").await;
    assert_eq!(writers, 5, "one event per claim");
}
