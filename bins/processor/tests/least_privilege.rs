//! `hook-processor` runs under the least-privilege `hook_processor` role of docs/roles.sql, while
//! producers insert as `hook_producer`; neither can do more than its job.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hook_store::testing::{config_to_url, TestDb};
use hook_store::tokio_postgres::{Client, NoTls};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const ROLES_SQL: &str = include_str!("../../../docs/roles.sql");

async fn connect_as(db: &TestDb, user: &str) -> Client {
    let mut config = db.config();
    config.user(user);
    let (client, connection) = config.connect(NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

fn processor_as(db: &TestDb, user: &str) -> Command {
    let mut config = db.config();
    config.user(user);
    let mut command = hook_store::testing::binary_command(env!("CARGO_BIN_EXE_hook-processor"));
    command
        .env("DATABASE_URL", config_to_url(&config))
        .env("POLL_INTERVAL", "0.1")
        .current_dir(std::env::temp_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

async fn setup(test: &str) -> (TestDb, Client) {
    let db = TestDb::migrated(test).await;
    let admin = db.client().await;
    // Roles are global to the cluster and several tests (each in its own database, so an
    // advisory lock would not serialize them) may create them at once: the script's
    // `IF NOT EXISTS` checks can race, and the loser of a race sees a unique violation. The
    // script is idempotent, so run it again.
    let mut attempt = 0;
    loop {
        match admin.batch_execute(ROLES_SQL).await {
            Ok(()) => break,
            Err(error)
                if attempt < 5
                    && error.code()
                        == Some(&hook_store::tokio_postgres::error::SqlState::UNIQUE_VIOLATION) =>
            {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("docs/roles.sql applies: {error}"),
        }
    }
    (db, admin)
}

/// Waits up to a minute until no event is unprocessed, the processor running all along.
async fn processed_all(admin: &Client, child: &mut std::process::Child, while_what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pending: i64 = admin
            .query_one("SELECT count(*) FROM hook_events WHERE NOT processed", &[])
            .await
            .expect("count the unprocessed events")
            .get(0);
        if pending == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{pending} events still pending {while_what}");
        assert!(child.try_wait().expect("the processor's status").is_none(), "the processor exited early");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stops the processor with SIGTERM; it must exit 0 having processed the tests' twenty events.
/// Returns its stderr.
fn stop_after_twenty(child: std::process::Child) -> String {
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM the processor");
    let output = child.wait_with_output().expect("the processor's output");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("Succeeded=20"), "{stderr}");
    stderr
}

#[tokio::test]
async fn the_processor_runs_as_hook_processor_and_producers_only_insert() {
    let (db, admin) = setup("least_privilege").await;
    let producer = connect_as(&db, "hook_producer").await;
    for i in 0..20 {
        producer
            .execute(
                "INSERT INTO hook_events (id, source, action, resource, resource_id, payload)
                 VALUES (gen_random_uuid(), 'PreToolUse', 'tool_invocation', 'tool', $1, '{}')",
                &[&format!("r{i}")],
            )
            .await
            .expect("hook_producer may insert");
    }
    let denied = producer.execute("UPDATE hook_events SET processed = true", &[]).await.unwrap_err();
    assert!(denied.to_string().contains("permission denied") || format!("{denied:?}").contains("42501"));

    let mut child = processor_as(&db, "hook_processor").spawn().unwrap();
    processed_all(&admin, &mut child, "under hook_processor").await;
    stop_after_twenty(child);

    // The processor's role cannot insert, delete or rewrite payloads.
    let processor = connect_as(&db, "hook_processor").await;
    for statement in [
        "INSERT INTO hook_events (id, source, action, resource, resource_id) VALUES (gen_random_uuid(), 'a', 'b', 'c', 'd')",
        "DELETE FROM hook_events",
        "UPDATE hook_events SET payload = '{}'",
        "CREATE TABLE sneaky (x int)",
    ] {
        let error = processor.batch_execute(statement).await.unwrap_err();
        assert!(format!("{error:?}").contains("42501"), "{statement}: {error:?}");
    }
}

#[tokio::test]
async fn a_pending_migration_under_hook_processor_fails_with_one_clear_line() {
    let (db, admin) = setup("least_privilege_pending").await;
    // As if this build brought a migration the owner has not applied yet.
    admin.batch_execute("DELETE FROM hook_events_migrations WHERE version = 1").await.unwrap();
    let output = processor_as(&db, "hook_processor").output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("hook-processor: error: migrating"), "{stderr}");
    assert!(last.contains("permission denied"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A processor whose role may not register its presence (here: no `INSERT` on
/// `hook_events_processors`, as under a roles script older than migration 0012) still processes
/// every event, says once what is wrong, and does not ask the server again every second.
#[tokio::test]
async fn a_presence_the_server_refuses_is_reported_once_and_not_retried_every_second() {
    let (db, admin) = setup("least_privilege_presence").await;
    admin.batch_execute("REVOKE INSERT ON hook_events_processors FROM hook_processor").await.unwrap();
    for i in 0..20 {
        admin
            .execute(
                "INSERT INTO hook_events (id, source, action, resource, resource_id, payload)
                 VALUES (gen_random_uuid(), 'PreToolUse', 'tool_invocation', 'tool', $1, '{}')",
                &[&format!("r{i}")],
            )
            .await
            .unwrap();
    }
    let mut child = processor_as(&db, "hook_processor").env("LOG_LEVEL", "debug").spawn().unwrap();
    processed_all(&admin, &mut child, "without a presence").await;
    // Retrying every second, as before, would have logged four or five attempts by now.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let stderr = stop_after_twenty(child);
    let attempts: Vec<&str> = stderr.lines().filter(|line| line.contains("hook_store::presence")).collect();
    assert_eq!(attempts.len(), 1, "one refused registration, reported once: {attempts:#?}");
    assert!(attempts[0].contains("WARN") && attempts[0].contains("docs/roles.sql"), "{}", attempts[0]);
    assert!(attempts[0].contains("permission denied"), "{}", attempts[0]);
    let registered: i64 =
        admin.query_one("SELECT count(*) FROM hook_events_processors", &[]).await.unwrap().get(0);
    assert_eq!(registered, 0);
}

#[tokio::test]
async fn without_the_right_to_vacuum_the_processor_warns_once_and_goes_on_processing() {
    let (db, admin) = setup("least_privilege_vacuum").await;
    let mut command = processor_as(&db, "hook_processor");
    command.env("HOOK_VACUUM_INTERVAL", "100ms").env("HOOK_VACUUM_DEAD_TUPLES", "100");
    let mut child = command.spawn().unwrap();
    // Dead row versions past the threshold, and events to process.
    admin
        .batch_execute(
            "INSERT INTO hook_events (id, source, action, resource, resource_id, payload, processed, processed_at)
             SELECT gen_random_uuid(), 'test', 'dead', 'row', i::text, '{}', true, now() FROM generate_series(1, 500) AS i;
             DELETE FROM hook_events WHERE source = 'test';
             INSERT INTO hook_events (id, source, action, resource, resource_id, payload)
             SELECT gen_random_uuid(), 'PreToolUse', 'tool_invocation', 'tool', i::text, '{}' FROM generate_series(1, 20) AS i",
        )
        .await
        .unwrap();
    processed_all(&admin, &mut child, "under hook_processor").await;
    // Twenty intervals more: still one warning, and no vacuum.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stderr = stop_after_twenty(child);
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("may not VACUUM hook_events")).collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(warnings[0].contains("WARN"), "{}", warnings[0]);
    assert!(
        warnings[0].contains("MAINTAIN") && warnings[0].contains("HOOK_VACUUM_DEAD_TUPLES=0"),
        "{}",
        warnings[0]
    );
    let vacuums: i64 = admin
        .query_one("SELECT vacuum_count FROM pg_stat_user_tables WHERE relid = 'hook_events'::regclass", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(vacuums, 0);
}
