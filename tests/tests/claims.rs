//! The claim path's guarantees for events that hurt their processor, with real processes
//! (`hook-test-worker`, see its docs) on a real PostgreSQL:
//!
//! - an event whose handler aborts the process is counted: after `MAX_RETRY_COUNT` crashes it is
//!   dead with the crash in `processing_errors`, and its batch-mates are handled at most twice;
//! - a drain starts nothing new: a claim takes no more events than free handler slots, no
//!   handler starts after SIGTERM, and a claim that returns after it is released unstarted;
//! - an outcome the database refuses (a user's trigger) is set aside with the reason and its
//!   batch-mates commit, and the batch is not handled again.
//!
//! Each invocation of the worker's handler is recorded in `test_invocations` before the fault is
//! injected, outside the claim's transaction, so the table counts every handling, including
//! those of batches that never committed.

#![allow(clippy::unwrap_used)]

use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use hook_core::{ClaimRequest, ClaimedBatch, Store};
use hook_store::testing::TestDb;
use hook_store::StoreOptions;
use hook_tests::worker::{Deadline, Worker};
use hook_tests::{count, insert_events};
use nix::sys::signal::Signal;
use tokio_postgres::Client;
use uuid::Uuid;

/// Longest wait for anything in these tests.
const PATIENCE: Duration = Duration::from_secs(90);

const WORKER: &str = env!("CARGO_BIN_EXE_hook-test-worker");

/// Events neither processed nor dead.
const UNDECIDED: &str = "SELECT count(*) FROM hook_events WHERE NOT processed AND dead_at IS NULL";

/// Ledger rows that name events (a batch's slot, once its batch ended, is kept clear).
const LEDGER_ROWS: &str =
    "SELECT count(*) FROM hook_events_claims WHERE holder IS NOT NULL OR cardinality(event_ids) > 0 OR note IS NOT NULL";

/// How a run of restarts went.
#[derive(Debug, Default)]
struct Restarts {
    /// Starts that ended with the process aborting (SIGABRT).
    aborted: usize,
    /// Starts in all (the last one was stopped with SIGTERM once nothing was left).
    starts: usize,
}

/// Starts workers one after another, as systemd's `Restart=always` would, until every event is
/// processed or dead; then stops the last one. At most `max_starts` starts.
async fn restart_until_decided(
    db: &TestDb,
    client: &Client,
    flags: &[&str],
    limits: &[&str],
    max_starts: usize,
) -> Restarts {
    let mut restarts = Restarts::default();
    while restarts.starts < max_starts {
        restarts.starts += 1;
        let mut worker = Worker::start_limited(WORKER, &db.url(), flags, limits);
        let deadline =
            Deadline::new(PATIENCE, format!("start {} to exit or decide every event", restarts.starts));
        loop {
            if let Some(status) = worker.exited() {
                assert_eq!(status.signal(), Some(Signal::SIGABRT as i32), "{status:?}\n{}", worker.log());
                restarts.aborted += 1;
                eprintln!(
                    "start {}: aborted; {} events undecided",
                    restarts.starts,
                    count(client, UNDECIDED).await
                );
                break;
            }
            if count(client, UNDECIDED).await == 0 {
                worker.terminate().await;
                return restarts;
            }
            deadline.tick().await;
        }
    }
    panic!(
        "after {max_starts} starts, {} events are still undecided: {restarts:?}",
        count(client, UNDECIDED).await
    );
}

/// Handler invocations so far (0 while no worker has created the table yet).
async fn invocations(client: &Client) -> i64 {
    let exists: bool = client
        .query_one("SELECT to_regclass('test_invocations') IS NOT NULL", &[])
        .await
        .expect("look for test_invocations")
        .get(0);
    if exists {
        count(client, "SELECT count(*) FROM test_invocations").await
    } else {
        0
    }
}

/// Handler invocations of `id`.
async fn invocations_of(client: &Client, id: Uuid) -> i64 {
    client
        .query_one("SELECT count(*) FROM test_invocations WHERE event_id = $1", &[&id])
        .await
        .expect("count invocations")
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_that_aborts_its_processor_dies_after_max_retry_count_crashes_and_spares_its_batch_mates() {
    const MAX_RETRY_COUNT: i64 = 3;
    const BATCH: i64 = 50;
    const IN_FLIGHT: i64 = 2;
    let db = TestDb::migrated("claims_abort_loop").await;
    let client = db.client().await;
    // The poison event sits in the middle of the backlog, so it is first met in an ordinary batch
    // with batch-mates around it and another batch in flight.
    let mut fine = insert_events(&client, 150, "Fine", "a").await;
    let poison = insert_events(&client, 1, "Poison", "a").await[0];
    fine.extend(insert_events(&client, 249, "Fine", "a").await);
    let flags = [
        // It aborts after its batch-mates (5 ms each) are done and recorded, so that some are
        // handled again.
        "--fault",
        "Poison=abort-after:100",
        "--batch-size",
        "50",
        "--batches-in-flight",
        "2",
        "--delay-ms",
        "5",
        "--max-retry-count",
        "3",
        "--retry-base-ms",
        "100",
        "--poll-ms",
        "100",
    ];
    let max_starts = usize::try_from(MAX_RETRY_COUNT).unwrap() + 2;
    let restarts = restart_until_decided(&db, &client, &flags, &["--core=0"], max_starts).await;

    // One crash in an ordinary batch (not charged: which event did it is not known), then one
    // per attempt of the poison event alone, each charged.
    assert_eq!(restarts.aborted, 1 + usize::try_from(MAX_RETRY_COUNT).unwrap(), "{restarts:?}");
    let row = client
        .query_one(
            "SELECT dead_at IS NOT NULL, retry_count, processing_errors FROM hook_events WHERE id = $1",
            &[&poison],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "the poison event is dead");
    assert_eq!(i64::from(row.get::<_, i32>(1)), MAX_RETRY_COUNT);
    let expected: Vec<String> = (1..=MAX_RETRY_COUNT)
        .map(|n| format!("processor died while this event was being handled (attempt {n})"))
        .collect();
    assert_eq!(row.get::<_, Vec<String>>(2), expected);
    assert_eq!(invocations_of(&client, poison).await, 1 + MAX_RETRY_COUNT);

    let not_clean = count(
        &client,
        "SELECT count(*) FROM hook_events WHERE source = 'Fine' AND (NOT processed OR retry_count <> 0 \
         OR processing_errors IS NOT NULL OR dead_at IS NOT NULL)",
    )
    .await;
    assert_eq!(not_clean, 0, "every other event is processed, with retry_count 0 and no error");
    let per_event = "SELECT e.id, count(i.event_id) AS n FROM hook_events AS e \
                     LEFT JOIN test_invocations AS i ON i.event_id = e.id WHERE e.source = 'Fine' GROUP BY e.id";
    let most = count(&client, &format!("SELECT max(n) FROM ({per_event}) AS c")).await;
    let never = count(&client, &format!("SELECT count(*) FROM ({per_event}) AS c WHERE n = 0")).await;
    let twice = count(&client, &format!("SELECT count(*) FROM ({per_event}) AS c WHERE n = 2")).await;
    assert_eq!(never, 0);
    assert!(most <= 2, "an event was handled {most} times");
    // Handled twice: only batch-mates of the one crash in an ordinary batch (its batches in
    // flight), each once more, alone.
    assert!(twice > 0 && twice <= BATCH * IN_FLIGHT, "{twice} events handled twice");
    assert_eq!(count(&client, LEDGER_ROWS).await, 0, "the ledger is empty");
    eprintln!("{restarts:?}; {twice} batch-mates handled twice, {} events in all", fine.len() + 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_one_handler_slot_starts_nothing_new_and_leaves_the_rest_claimable() {
    let db = TestDb::migrated("claims_drain_one_slot").await;
    let client = db.client().await;
    insert_events(&client, 20, "Slow", "a").await;
    // One slot, a 1 s handler (it records its start, then sleeps).
    let flags = ["--concurrency", "1", "--fault", "Slow=sleep:1000", "--poll-ms", "100"];
    let mut worker = Worker::start(WORKER, &db.url(), &flags);
    let deadline = Deadline::new(PATIENCE, "the first handler to start");
    while invocations(&client).await == 0 {
        worker.assert_running();
        deadline.tick().await;
    }
    let free = "SELECT count(*) FROM (SELECT id FROM hook_events FOR UPDATE SKIP LOCKED) AS free";
    let mut tx_client = db.client().await;
    let tx = tx_client.transaction().await.unwrap();
    let unlocked: i64 = tx.query_one(free, &[]).await.unwrap().get(0);
    tx.rollback().await.unwrap();
    assert_eq!(unlocked, 19, "with one free handler slot, one event is claimed");

    worker.signal(Signal::SIGTERM);
    let signalled = Instant::now();
    // Another processor claims the other 19 at once: no wait, no retry.
    let other = db.store(StoreOptions { listen: false, ..StoreOptions::default() }).await;
    let request = ClaimRequest { limit: 100, ..ClaimRequest::default() };
    let mut batch = other.claim(request).await.unwrap().expect("a batch");
    let claimed = batch.take_events().len();
    let took = signalled.elapsed();
    assert_eq!(claimed, 19, "the unstarted events are claimable by another processor");
    batch.release().await;

    let status = worker.wait().await;
    assert!(status.success(), "{status:?}\n{}", worker.log());
    assert_eq!(
        count(&client, "SELECT count(*) FROM test_invocations").await,
        1,
        "no handler started after SIGTERM"
    );
    let finished = count(
        &client,
        "SELECT count(*) FROM hook_events AS e JOIN test_invocations AS i ON i.event_id = e.id WHERE e.processed",
    )
    .await;
    assert_eq!(finished, 1, "the running handler's outcome is committed");
    assert_eq!(count(&client, "SELECT count(*) FROM hook_events WHERE processed").await, 1);
    assert_eq!(count(&client, LEDGER_ROWS).await, 0);
    eprintln!("19 events claimed by another processor {took:?} after SIGTERM");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_claim_that_returns_after_sigterm_is_released_without_starting_a_handler() {
    let db = TestDb::migrated("claims_claim_after_signal").await;
    let client = db.client().await;
    insert_events(&client, 5, "Fine", "a").await;
    // Hold the claim ledger, so the worker's first claim waits in the act.
    let blocker = db.client().await;
    blocker.batch_execute("BEGIN; LOCK TABLE hook_events_claims IN ACCESS EXCLUSIVE MODE").await.unwrap();
    let mut worker = Worker::start(WORKER, &db.url(), &["--poll-ms", "100"]);
    let name = format!("hook-test-worker-{}", worker.pid);
    let deadline = Deadline::new(PATIENCE, "the worker's claim to wait for the ledger");
    loop {
        let waiting: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'",
                &[&name],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        worker.assert_running();
        deadline.tick().await;
    }
    worker.signal(Signal::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    blocker.batch_execute("COMMIT").await.unwrap();

    let status = worker.wait().await;
    let log = worker.log();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(log.contains("releasing the claimed events unstarted"), "{log}");
    assert_eq!(invocations(&client).await, 0, "no handler started");
    assert_eq!(
        count(&client, "SELECT count(*) FROM hook_events WHERE NOT processed AND retry_count = 0").await,
        5
    );
    assert_eq!(count(&client, LEDGER_ROWS).await, 0);
}

/// Installs a user trigger on `hook_events` that raises when `condition` holds (in terms of
/// `OLD` and `NEW`).
async fn refuse_updates(client: &Client, name: &str, condition: &str) {
    client
        .batch_execute(&format!(
            "CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 RAISE EXCEPTION 'refused by the user trigger {name}';
             END $$;
             CREATE TRIGGER {name} BEFORE UPDATE ON hook_events FOR EACH ROW
                 WHEN ({condition}) EXECUTE FUNCTION {name}();"
        ))
        .await
        .expect("install the trigger");
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

#[tokio::test(flavor = "multi_thread")]
async fn outcomes_a_user_trigger_refuses_are_set_aside_and_their_batch_mates_commit_once() {
    let db = TestDb::migrated("claims_refused_outcome").await;
    let client = db.client().await;
    let fine = insert_events(&client, 30, "Fine", "a").await;
    let failing = insert_events(&client, 10, "Failing", "a").await;
    // A success the trigger refuses (marking it processed), a failure it refuses (counting the
    // attempt), and an event no update may touch at all.
    let (refused_success, refused_failure, untouchable) = (fine[7], failing[3], fine[20]);
    refuse_updates(&client, "refuse_success", &format!("NEW.processed AND OLD.id = '{refused_success}'"))
        .await;
    refuse_updates(
        &client,
        "refuse_failure",
        &format!("NEW.retry_count > OLD.retry_count AND OLD.id = '{refused_failure}'"),
    )
    .await;
    refuse_updates(&client, "refuse_all", &format!("OLD.id = '{untouchable}'")).await;

    // One batch holds them all.
    let flags =
        ["--fault", "Failing=fail", "--batch-size", "100", "--retry-base-ms", "60000", "--poll-ms", "100"];
    let mut worker = Worker::start(WORKER, &db.url(), &flags);
    let settled =
        "SELECT count(*) FROM hook_events WHERE NOT processed AND dead_at IS NULL AND retry_count = 0";
    let deadline = Deadline::new(PATIENCE, "every outcome to be written or set aside");
    // Everything but the untouchable event ends processed, failed (retry_count 1) or dead.
    while count(&client, settled).await > 1 {
        worker.assert_running();
        deadline.tick().await;
    }
    // A few more polls: nothing is handled again.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let log = worker.terminate().await;
    assert_eq!(errors_in(&log), 0, "no batch failed:\n{log}");

    let each_once = count(
        &client,
        "SELECT count(*) FROM hook_events AS e \
         WHERE (SELECT count(*) FROM test_invocations AS i WHERE i.event_id = e.id) <> 1",
    )
    .await;
    assert_eq!(each_once, 0, "every event was handled exactly once: the batch was not handled again");
    assert_eq!(
        count(&client, "SELECT count(*) FROM hook_events WHERE source = 'Fine' AND processed").await,
        28
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM hook_events WHERE source = 'Failing' AND retry_count = 1 AND dead_at IS NULL").await,
        9,
        "the other failures are counted and scheduled"
    );
    let errors_of = |id: Uuid| {
        let client = &client;
        async move {
            let row = client
                .query_one(
                    "SELECT dead_at IS NOT NULL, processed, processing_errors FROM hook_events WHERE id = $1",
                    &[&id],
                )
                .await
                .unwrap();
            (
                row.get::<_, bool>(0),
                row.get::<_, bool>(1),
                row.get::<_, Option<Vec<String>>>(2).unwrap_or_default(),
            )
        }
    };
    let (dead, processed, errors) = errors_of(refused_success).await;
    assert!(dead && !processed, "the refused success is set aside dead");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with("the handler succeeded, but the outcome could not be written")
            && errors[0].contains("refused by the user trigger refuse_success"),
        "{errors:?}"
    );
    let (dead, _, errors) = errors_of(refused_failure).await;
    assert!(dead, "the refused failure is set aside dead");
    assert!(
        errors[0].starts_with("the handler failed (injected failure), and the outcome could not be written"),
        "{errors:?}"
    );
    // Nothing could be written to the untouchable event: it is quarantined in the ledger.
    let (dead, processed, _) = errors_of(untouchable).await;
    assert!(!dead && !processed);
    let note: String = client
        .query_one("SELECT note FROM hook_events_claims WHERE event_ids = ARRAY[$1::uuid]", &[&untouchable])
        .await
        .expect("a quarantine row")
        .get(0);
    assert!(note.contains("kept out of every claim"), "{note}");
    assert_eq!(count(&client, LEDGER_ROWS).await, 1);
}

/// Inserts `count` events of source `Big` whose payload is `mib` MiB of JSON text: an array of
/// 1 MiB strings (a tool's output, say), compressible as such text is. Built by the server.
async fn insert_big_events(client: &Client, count: i32, mib: i32) {
    for _ in 0..count {
        client
            .execute(
                "INSERT INTO hook_events (id, source, action, resource, resource_id, payload, created_at) \
                 SELECT gen_random_uuid(), 'Big', 'a', 'r', 'r', \
                        jsonb_build_object('lines', (SELECT jsonb_agg(repeat('test result: ok. ' || i || ' passed; ', 36000)) \
                                                     FROM generate_series(1, $1) AS i)), \
                        clock_timestamp()",
                &[&mib],
            )
            .await
            .expect("insert a big event");
    }
}

/// The case the issue measured: 1,000 events and one of about 120 MB of JSON, the processor
/// under a 400 MiB address-space limit and restarted whenever it exits. Before the byte budget
/// it aborted on every start ("memory allocation failed") and never got past the big one.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_too_large_to_hold_is_set_aside_dead_under_a_400_mib_address_space_limit() {
    let db = TestDb::migrated("claims_large_payload").await;
    let client = db.client().await;
    insert_events(&client, 400, "Fine", "a").await;
    insert_big_events(&client, 1, 120).await;
    insert_events(&client, 600, "Fine", "a").await;
    let (text, stored): (i64, i32) = {
        let row = client
            .query_one("SELECT octet_length(payload::text)::int8, pg_column_size(payload) FROM hook_events WHERE source = 'Big'", &[])
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    eprintln!("the big payload: {} MB of JSON, {} MB stored", text / 1_000_000, stored / 1_000_000);
    let flags = ["--batch-size", "100", "--poll-ms", "100", "--max-retry-count", "3"];
    let limits = ["--as=419430400", "--core=0"];
    let restarts = restart_until_decided(&db, &client, &flags, &limits, 3 + 2).await;
    assert_eq!(restarts.aborted, 0, "{restarts:?}");
    let clean = count(
        &client,
        "SELECT count(*) FROM hook_events WHERE source = 'Fine' AND processed AND retry_count = 0 AND processing_errors IS NULL",
    )
    .await;
    assert_eq!(clean, 1000, "every other event is processed, with retry_count 0");
    let row = client
        .query_one("SELECT dead_at IS NOT NULL, retry_count, processing_errors FROM hook_events WHERE source = 'Big'", &[])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "the big one is dead");
    assert_eq!(row.get::<_, i32>(1), 0, "without an attempt");
    let errors = row.get::<_, Vec<String>>(2);
    assert!(
        errors.len() == 1 && errors[0].contains("bytes of JSON, more than the processor may hold at once"),
        "{errors:?}"
    );
    eprintln!("{restarts:?}; the big one's reason: {}", errors[0]);
}

/// A processor stopped with SIGTERM leaves no row in `hook_events_processors`: a row left behind,
/// its lock free, reads as a processor gone, and sends every other processor's next claims to
/// read every batch's row and recover (an isolated claim each) for nothing.
#[tokio::test]
async fn a_processor_stopped_with_sigterm_strikes_itself_off() {
    let db = TestDb::migrated("claims_presence_exit").await;
    let client = db.client().await;
    insert_events(&client, 5, "Fine", "a").await;
    let mut worker = Worker::start(WORKER, &db.url(), &["--poll-ms", "100"]);
    let deadline = Deadline::new(PATIENCE, "the worker to register and handle the events");
    while count(&client, "SELECT count(*) FROM hook_events WHERE processed").await < 5
        || count(&client, "SELECT count(*) FROM hook_events_processors").await == 0
    {
        worker.assert_running();
        deadline.tick().await;
    }
    worker.signal(Signal::SIGTERM);
    let status = worker.wait().await;
    assert!(status.success(), "{status:?}\n{}", worker.log());
    assert_eq!(
        count(&client, "SELECT count(*) FROM hook_events_processors").await,
        0,
        "the registry row of a processor that exited cleanly\n{}",
        worker.log()
    );
}
