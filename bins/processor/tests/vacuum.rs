//! The processor's vacuum task against a real PostgreSQL: it vacuums `hook_events` once its dead
//! row versions pass `HOOK_VACUUM_DEAD_TUPLES`; it does not vacuum again and again while a held
//! snapshot keeps the rows (it waits for the snapshot's holder to change); it waits its turn while
//! another session holds the vacuum lock; a vacuum skipped for a lock on the table is not taken
//! for one under a held snapshot. (Without the right to vacuum: least_privilege.rs.)

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hook_store::testing::TestDb;
use hook_store::tokio_postgres::Client;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const PATIENCE: Duration = Duration::from_secs(60);
/// Dead row versions each round makes, and the task's threshold below it.
const ROWS: i64 = 3_000;
const THRESHOLD: &str = "1000";

/// The processor with its vacuum task at `THRESHOLD`, checking every 100 ms; stderr collected.
struct Processor {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Processor {
    fn start(db: &TestDb) -> Processor {
        let mut command = hook_store::testing::binary_command(env!("CARGO_BIN_EXE_hook-processor"));
        command
            .env("DATABASE_URL", db.url())
            .env("HOOK_VACUUM_DEAD_TUPLES", THRESHOLD)
            .env("HOOK_VACUUM_INTERVAL", "100ms")
            .env("LOG_LEVEL", "hook_processor=debug,info")
            .current_dir(std::env::temp_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("start hook-processor");
        let stderr = child.stderr.take().expect("stderr is piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        Processor { child, lines }
    }

    fn stderr(&self) -> String {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).join("\n")
    }

    fn count(&self, needle: &str) -> usize {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).iter().filter(|l| l.contains(needle)).count()
    }

    fn stop(mut self) -> String {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits"));
        kill(pid, Signal::SIGTERM).expect("SIGTERM");
        let status = self.child.wait().expect("wait");
        std::thread::sleep(Duration::from_millis(100));
        let stderr = self.stderr();
        assert!(status.success(), "{stderr}");
        stderr
    }
}

impl Drop for Processor {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `ROWS` processed events inserted and deleted: dead row versions no claim touches.
async fn make_dead_rows(client: &Client) {
    client
        .execute(
            "INSERT INTO hook_events (id, source, action, resource, resource_id, payload, processed, processed_at)
             SELECT gen_random_uuid(), 'test', 'dead', 'row', i::text, '{}', true, now()
               FROM generate_series(1, $1::int8) AS i",
            &[&ROWS],
        )
        .await
        .expect("insert");
    client.execute("DELETE FROM hook_events WHERE source = 'test'", &[]).await.expect("delete");
}

/// (`vacuum_count`, `n_dead_tup`) of hook_events.
async fn stats(client: &Client) -> (i64, i64) {
    let row = client
        .query_one(
            "SELECT vacuum_count, n_dead_tup FROM pg_stat_user_tables WHERE relid = 'hook_events'::regclass",
            &[],
        )
        .await
        .expect("stats");
    (row.get(0), row.get(1))
}

/// A migrated database whose `hook_events` autovacuum leaves alone: the rows these tests make
/// pass its insert threshold (1,000 + 20% of an empty table), and a vacuum of its own takes the
/// dead rows away before the task's, whose `vacuum_count` the tests read (a CI run failed so).
async fn database(name: &str) -> TestDb {
    let db = TestDb::migrated(name).await;
    db.client()
        .await
        .batch_execute("ALTER TABLE hook_events SET (autovacuum_enabled = false)")
        .await
        .expect("autovacuum off");
    db
}

async fn until(what: &str, processor: &Processor, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !check().await {
        assert!(Instant::now() < deadline, "{what} did not happen:\n{}", processor.stderr());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_task_vacuums_past_the_threshold_and_not_again_while_a_snapshot_holds_the_rows() {
    let db = database("vacuum_task").await;
    let client = db.client().await;
    let processor = Processor::start(&db);

    // Past the threshold: vacuumed, the dead row versions gone.
    make_dead_rows(&client).await;
    until("a vacuum removing the dead rows", &processor, async || {
        let (vacuums, dead) = stats(&client).await;
        vacuums >= 1 && dead < 1_000
    })
    .await;

    // A snapshot held from before the next dead rows: one vacuum finds it can remove nothing,
    // and the task then waits for the holder to change instead of vacuuming every 100 ms.
    let holder = db.client().await;
    holder.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ").await.unwrap();
    holder.query_one("SELECT count(*) FROM hook_events", &[]).await.unwrap();
    let (before, _) = stats(&client).await;
    make_dead_rows(&client).await;
    until("a vacuum under the held snapshot", &processor, async || {
        processor.count("could not remove the dead row versions") == 1
    })
    .await;
    let (stuck_at, dead) = stats(&client).await;
    assert_eq!(stuck_at, before + 1, "{}", processor.stderr());
    assert!(dead >= 1_000, "the held snapshot keeps the rows: {dead}");
    // 30 intervals: no further vacuum.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (vacuums, _) = stats(&client).await;
    assert_eq!(vacuums, stuck_at, "vacuumed again under the same snapshot:\n{}", processor.stderr());

    // Released: the holder changed, the next check vacuums and the rows go.
    holder.batch_execute("ROLLBACK").await.unwrap();
    until("a vacuum after the snapshot's release", &processor, async || {
        let (vacuums, dead) = stats(&client).await;
        vacuums > stuck_at && dead < 1_000
    })
    .await;
    let stderr = processor.stop();
    assert_eq!(stderr.matches("could not remove the dead row versions").count(), 1, "{stderr}");
    assert!(!stderr.contains("may not VACUUM"), "{stderr}");
}

#[tokio::test]
async fn the_task_skips_its_turn_while_another_processor_vacuums() {
    let db = database("vacuum_task_lock").await;
    let client = db.client().await;
    // Another processor's vacuum, as far as the lock says.
    let other = db.client().await;
    other.query_one("SELECT pg_advisory_lock($1)", &[&hook_store::vacuum::VACUUM_LOCK]).await.unwrap();
    let processor = Processor::start(&db);
    make_dead_rows(&client).await;
    until("the statistics seeing the dead rows", &processor, async || stats(&client).await.1 >= 1_000).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(stats(&client).await.0, 0, "vacuumed while the lock was held:\n{}", processor.stderr());

    other.query_one("SELECT pg_advisory_unlock($1)", &[&hook_store::vacuum::VACUUM_LOCK]).await.unwrap();
    until("a vacuum once the lock is free", &processor, async || {
        let (vacuums, dead) = stats(&client).await;
        vacuums >= 1 && dead < 1_000
    })
    .await;
    processor.stop();
}

#[tokio::test]
async fn a_vacuum_skipped_for_a_lock_is_not_taken_for_a_held_snapshot() {
    let db = database("vacuum_task_skipped").await;
    let client = db.client().await;
    // A session holding the lock autovacuum and ANALYZE take (idle in a READ COMMITTED
    // transaction: no snapshot), so that `VACUUM (SKIP_LOCKED)` skips the table.
    let locker = db.client().await;
    locker.batch_execute("BEGIN; LOCK TABLE hook_events IN SHARE UPDATE EXCLUSIVE MODE").await.unwrap();
    make_dead_rows(&client).await;
    // A snapshot taken after the rows died: it does not keep them, but it is the oldest holder
    // before and after each try, as a held snapshot would be. Its xmin must be past the rows'
    // deletion: a transaction of a test beside this one (the cluster's xids are shared) can hold
    // it back, so it is taken again until it is.
    let dead_by: i64 = client.query_one("SELECT pg_current_xact_id()::text::int8", &[]).await.unwrap().get(0);
    let holder = db.client().await;
    let deadline = Instant::now() + PATIENCE;
    loop {
        assert!(Instant::now() < deadline, "no snapshot newer than the dead rows in {PATIENCE:?}");
        holder.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ").await.unwrap();
        let xmin: i64 = holder
            .query_one("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::int8", &[])
            .await
            .unwrap()
            .get(0);
        if xmin > dead_by {
            break;
        }
        holder.batch_execute("ROLLBACK").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let processor = Processor::start(&db);
    until("the statistics seeing the dead rows", &processor, async || stats(&client).await.1 >= 1_000).await;
    // 20 checks of the task: each VACUUM skipped, none taken for a held snapshot.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(processor.count("could not remove the dead row versions"), 0, "{}", processor.stderr());
    assert!(processor.count("VACUUM hook_events skipped") >= 1, "{}", processor.stderr());
    assert_eq!(stats(&client).await.0, 0, "vacuumed through the lock:\n{}", processor.stderr());

    // The lock released, the snapshot still held: the next try (the skips' backoff is at most
    // a few seconds here, not the held snapshot's minute) vacuums, and the rows go, since the
    // snapshot is newer than them.
    locker.batch_execute("COMMIT").await.unwrap();
    let released = Instant::now();
    until("a vacuum once the lock is free", &processor, async || {
        let (vacuums, dead) = stats(&client).await;
        vacuums >= 1 && dead < 1_000
    })
    .await;
    assert!(
        released.elapsed() < Duration::from_secs(10),
        "waited {:?}:\n{}",
        released.elapsed(),
        processor.stderr()
    );
    holder.batch_execute("ROLLBACK").await.unwrap();
    let stderr = processor.stop();
    assert!(!stderr.contains("could not remove the dead row versions"), "{stderr}");
}
