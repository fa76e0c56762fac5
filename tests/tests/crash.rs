//! Crash tests: processors killed with SIGKILL in the middle of a batch lose no event, and
//! processors running side by side handle every event exactly once.
//!
//! The processes under test are `hook-test-worker`s (see its docs): each handler invocation is
//! recorded in `test_invocations` outside the claim's transaction, so the table shows every
//! attempt, including those of a batch that never committed.

use std::time::Duration;

use hook_store::testing::TestDb;
use hook_tests::worker::{Deadline, Worker};
use tokio_postgres::Client;

const BATCH_SIZE: i64 = 100;
const BATCHES_IN_FLIGHT: i64 = 2;
/// Longest wait for anything in these tests (a drain, a process exit, sessions ending).
const PATIENCE: Duration = Duration::from_secs(60);

/// Starts a worker whose handlers take `delay_ms`, with this file's batch settings.
fn start_worker(db: &TestDb, delay_ms: u64) -> Worker {
    let (delay, batch, in_flight) =
        (delay_ms.to_string(), BATCH_SIZE.to_string(), BATCHES_IN_FLIGHT.to_string());
    Worker::start(
        env!("CARGO_BIN_EXE_hook-test-worker"),
        &db.url(),
        &["--delay-ms", &delay, "--batch-size", &batch, "--batches-in-flight", &in_flight],
    )
}

/// Inserts `count` events in one statement, with mixed sources and actions and distinct creation
/// times (so that claims, which go oldest first, take them in a known order).
async fn insert_events(client: &Client, count: i32) {
    let inserted = client
        .execute(
            "INSERT INTO hook_events (id, source, action, resource, resource_id, payload, created_at) \
             SELECT gen_random_uuid(), \
                    (ARRAY['PreToolUse', 'PostToolUse', 'UserPromptSubmit', 'Stop'])[1 + i % 4], \
                    (ARRAY['tool_invocation', 'prompt_submitted', 'session_end'])[1 + i % 3], \
                    'tool', 'r' || i, jsonb_build_object('n', i), \
                    now() - ($1 - i) * interval '1 millisecond' \
             FROM generate_series(1, $1) AS i",
            &[&count],
        )
        .await
        .expect("insert events");
    assert_eq!(inserted, u64::try_from(count).expect("count is positive"));
}

async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
}

async fn processed(client: &Client) -> i64 {
    count(client, "SELECT count(*) FROM hook_events WHERE processed").await
}

/// Invocations recorded so far (0 while no worker has created the table yet).
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

async fn wait_until_all_processed(client: &Client, total: i64) {
    let deadline = Deadline::new(PATIENCE, format!("all {total} events to be processed"));
    while processed(client).await < total {
        deadline.tick().await;
    }
}

/// Waits until the server has no session left of the worker with this pid: then whatever the
/// worker sent before it died has been executed or rolled back, and its row locks are gone.
async fn wait_for_sessions_to_end(client: &Client, pid: i32) {
    let name = format!("hook-test-worker-{pid}");
    let deadline = Deadline::new(PATIENCE, format!("the sessions of worker {pid} to end"));
    loop {
        let row = client
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", &[&name])
            .await
            .expect("read pg_stat_activity");
        if row.get::<_, i64>(0) == 0 {
            return;
        }
        deadline.tick().await;
    }
}

/// Rows of `hook_events` no transaction holds a lock on, seen from a fresh connection.
async fn unlocked_rows(db: &TestDb) -> i64 {
    let mut client = db.client().await;
    let tx = client.transaction().await.expect("begin");
    let row = tx
        .query_one("SELECT count(*) FROM (SELECT id FROM hook_events FOR UPDATE SKIP LOCKED) AS free", &[])
        .await
        .expect("count unlocked rows");
    tx.rollback().await.expect("rollback");
    row.get(0)
}

/// What a kill left behind, read once the killed worker's sessions are gone.
struct AfterKill {
    processed: i64,
    /// Events the killed worker had invoked whose batch never committed.
    mid_flight: i64,
}

/// Starts a worker on `total` fresh events and SIGKILLs it once it has committed about a third
/// of them (well into its run, past each pooled connection's first batch). Returns `None` when
/// the kill came too late (everything was processed) or landed between batches, so the caller
/// can try again.
async fn kill_mid_batch(db: &TestDb, client: &Client, total: i64) -> Option<(Worker, AfterKill)> {
    let mut worker = start_worker(db, 20);
    let deadline = Deadline::new(PATIENCE, "the first worker to process a third of the events");
    loop {
        let done = processed(client).await;
        if done >= total / 3 && invocations(client).await > done {
            break;
        }
        worker.assert_running();
        deadline.tick().await;
    }
    worker.kill_9().await; // asserts that SIGKILL ended it
    wait_for_sessions_to_end(client, worker.pid).await;

    client
        .batch_execute(&format!(
            "CREATE TABLE processed_at_kill AS SELECT id FROM hook_events WHERE processed; \
             CREATE TABLE mid_flight AS \
                 SELECT DISTINCT i.event_id AS id FROM test_invocations AS i \
                 JOIN hook_events AS e ON e.id = i.event_id \
                 WHERE i.pid = {} AND NOT e.processed",
            worker.pid
        ))
        .await
        .expect("snapshot the state after the kill");
    let after = AfterKill {
        processed: count(client, "SELECT count(*) FROM processed_at_kill").await,
        mid_flight: count(client, "SELECT count(*) FROM mid_flight").await,
    };
    if after.processed == total || after.mid_flight == 0 {
        eprintln!(
            "kill did not land mid-batch ({} of {total} processed, {} mid-flight); trying again",
            after.processed, after.mid_flight
        );
        return None;
    }
    Some((worker, after))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_processor_killed_mid_batch_loses_no_event() {
    const TOTAL: i64 = 3_000;
    const ATTEMPTS: usize = 5;
    for _ in 0..ATTEMPTS {
        let db = TestDb::migrated("crash_kill_mid_batch").await;
        let client = db.client().await;
        insert_events(&client, TOTAL as i32).await;
        let Some((killed, after)) = kill_mid_batch(&db, &client, TOTAL).await else {
            continue;
        };
        // At most the batches in flight were lost with the process.
        assert!(after.mid_flight <= BATCH_SIZE * BATCHES_IN_FLIGHT, "{} mid-flight", after.mid_flight);
        // Their row locks went with its sessions.
        assert_eq!(unlocked_rows(&db).await, TOTAL, "rows still locked after the kill");

        let mut second = start_worker(&db, 20);
        wait_until_all_processed(&client, TOTAL).await;
        second.terminate().await; // asserts a clean exit
        wait_for_sessions_to_end(&client, second.pid).await;

        check_after_recovery(&db, &client, killed.pid, second.pid, &after, TOTAL).await;
        return;
    }
    panic!("in {ATTEMPTS} attempts, no SIGKILL landed while a batch was in flight");
}

async fn check_after_recovery(
    db: &TestDb,
    client: &Client,
    killed: i32,
    second: i32,
    after: &AfterKill,
    total: i64,
) {
    let expect_zero = [
        (
            "events not processed, or processed without a valid processed_at, or with a failed attempt",
            "SELECT count(*) FROM hook_events WHERE NOT processed OR processed_at IS NULL \
             OR processed_at < created_at OR retry_count <> 0 OR processing_errors IS NOT NULL \
             OR dead_at IS NOT NULL"
                .to_owned(),
        ),
        (
            "events never invoked",
            "SELECT count(*) FROM hook_events AS e \
             WHERE NOT EXISTS (SELECT 1 FROM test_invocations AS i WHERE i.event_id = e.id)"
                .to_owned(),
        ),
        (
            "invocations by a process other than the two workers",
            format!("SELECT count(*) FROM test_invocations WHERE pid NOT IN ({killed}, {second})"),
        ),
        (
            "events one process invoked more than once",
            "SELECT count(*) FROM (SELECT 1 FROM test_invocations GROUP BY event_id, pid \
             HAVING count(*) > 1) AS twice"
                .to_owned(),
        ),
        (
            // Exactly the events left unprocessed by the kill went to the second worker: none
            // that the killed worker had committed was handled again.
            "events whose handling by the second worker disagrees with their state after the kill",
            format!(
                "SELECT count(*) FROM hook_events AS e \
                 WHERE (e.id IN (SELECT id FROM processed_at_kill)) = \
                       EXISTS (SELECT 1 FROM test_invocations AS i \
                               WHERE i.event_id = e.id AND i.pid = {second})"
            ),
        ),
        (
            // Events handled twice are exactly those of the batches the kill interrupted.
            "events invoked more than once that were not mid-flight at the kill, or the reverse",
            "SELECT count(*) FROM ( \
                 (SELECT event_id FROM test_invocations GROUP BY event_id HAVING count(*) > 1 \
                  EXCEPT SELECT id FROM mid_flight) \
                 UNION ALL \
                 (SELECT id FROM mid_flight \
                  EXCEPT SELECT event_id FROM test_invocations GROUP BY event_id HAVING count(*) > 1) \
             ) AS diff"
                .to_owned(),
        ),
    ];
    for (what, sql) in &expect_zero {
        assert_eq!(count(client, sql).await, 0, "{what}");
    }

    let twice = count(
        client,
        "SELECT count(*) FROM (SELECT 1 FROM test_invocations GROUP BY event_id \
         HAVING count(*) > 1) AS twice",
    )
    .await;
    assert!(twice > 0, "the kill interrupted a batch, so some event was invoked twice");
    assert!(twice <= BATCH_SIZE * BATCHES_IN_FLIGHT, "{twice} events invoked more than once");
    assert_eq!(twice, after.mid_flight);
    let by_second =
        count(client, &format!("SELECT count(*) FROM test_invocations WHERE pid = {second}")).await;
    assert_eq!(by_second, total - after.processed, "the second worker handled what was left, once each");
    assert_eq!(unlocked_rows(db).await, total, "rows still locked after the second worker stopped");
    eprintln!(
        "killed worker committed {} events, {} were mid-flight; the second worker handled {by_second}",
        after.processed, after.mid_flight
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_processors_side_by_side_handle_every_event_exactly_once() {
    const TOTAL: i64 = 10_000;
    let db = TestDb::migrated("crash_two_workers").await;
    let client = db.client().await;
    insert_events(&client, TOTAL as i32).await;

    let mut workers = [start_worker(&db, 1), start_worker(&db, 1)];
    let deadline = Deadline::new(PATIENCE, "two workers to process every event");
    while processed(&client).await < TOTAL {
        for worker in &mut workers {
            worker.assert_running();
        }
        deadline.tick().await;
    }
    for worker in &mut workers {
        worker.terminate().await; // asserts a clean exit
        wait_for_sessions_to_end(&client, worker.pid).await;
    }

    let [a, b] = [workers[0].pid, workers[1].pid];
    assert_eq!(count(&client, "SELECT count(*) FROM test_invocations").await, TOTAL);
    let not_once = "SELECT count(*) FROM hook_events AS e \
                    LEFT JOIN (SELECT event_id, count(*) AS n FROM test_invocations GROUP BY event_id) AS c \
                    ON c.event_id = e.id \
                    WHERE c.n IS DISTINCT FROM 1";
    assert_eq!(count(&client, not_once).await, 0, "events not invoked exactly once");
    let strangers = format!("SELECT count(*) FROM test_invocations WHERE pid NOT IN ({a}, {b})");
    assert_eq!(count(&client, &strangers).await, 0);
    let unfinished = "SELECT count(*) FROM hook_events \
                      WHERE NOT processed OR processed_at < created_at OR retry_count <> 0";
    assert_eq!(count(&client, unfinished).await, 0);
    assert_eq!(unlocked_rows(&db).await, TOTAL);
    let by_a = count(&client, &format!("SELECT count(*) FROM test_invocations WHERE pid = {a}")).await;
    eprintln!("worker {a} handled {by_a} events, worker {b} handled {}", TOTAL - by_a);
}
