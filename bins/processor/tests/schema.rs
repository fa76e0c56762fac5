//! `hook-processor` and `hook-processor stats` on tables that do not fit this build: each exits 2
//! with one line naming the column, and every row is unchanged, column by column.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use hook_store::seed::{self, Changes, Snapshot, Variant};
use hook_store::testing::TestDb;

fn processor(db: &TestDb, args: &[&str]) -> Command {
    let mut command = hook_store::testing::binary_command(env!("CARGO_BIN_EXE_hook-processor"));
    command
        .args(args)
        .env("DATABASE_URL", db.url())
        .env("POLL_INTERVAL", "0.1")
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Runs `command` to its end; a run that has not ended within a minute is killed and fails.
fn run(mut command: Command) -> Output {
    let mut child = command.spawn().expect("start hook-processor");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "hook-processor did not exit on a table that does not fit: {:?}",
                child.wait_with_output()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

fn assert_refused(output: &Output, column: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    eprintln!("MSG {last}");
    eprintln!("MSG {last}");
    assert!(last.starts_with("hook-processor: error: "), "{stderr}");
    assert!(
        last.contains("the tables do not fit") && last.contains(&format!("hook_events.{column} ")),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test]
async fn the_processor_and_stats_refuse_a_mismatched_table_and_change_no_row() {
    for variant in Variant::MISMATCHED {
        for migrated in [false, true] {
            let test = format!("processor_schema_{}_{migrated}", variant.column());
            let (db, client, before) = seed::mismatched_database(&test, variant, migrated).await;
            for args in [&[][..], &["stats"]] {
                let output = run(processor(&db, args));
                assert_refused(&output, variant.column());
                let changes = before.changes(&Snapshot::take(&client).await.unwrap());
                assert_eq!(changes, Changes::default(), "{variant:?} migrated={migrated} {args:?}");
            }
            assert_eq!(before.rows("hook_events"), 40);
        }
    }
}
