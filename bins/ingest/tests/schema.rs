//! `hook-ingest` on tables that do not fit this build. As a hook it always exits 0 (exit 2 would
//! block the agent's tool call). A table it cannot insert into (a NOT NULL column of the user's
//! own without a default) gets one warning naming the column, without the server's DETAIL that
//! quotes the row, and the event waits in the spool; a table it can insert into (the database
//! converts the value) takes the event. Either way no row that was there changes.

use std::io::Write;
use std::process::{Command, Stdio};

use hook_store::seed::{self, Snapshot, Variant};

fn ingest(url: &str, spool: &str) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hook-ingest"))
        .env_clear()
        .env("DATABASE_URL", url)
        .env("HOOK_SPOOL", spool)
        .env("HOOK_INGEST_TIMEOUT", "10s")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hook-ingest");
    let input = br#"{"hook_event_name": "Stop", "session_id": "s1", "cwd": "/w"}"#;
    child.stdin.take().expect("stdin").write_all(input).expect("write stdin");
    child.wait_with_output().expect("wait for hook-ingest")
}

#[tokio::test]
async fn ingest_names_the_column_it_cannot_insert_past_and_changes_no_row() {
    let dir = std::env::temp_dir().join(format!("hook-ingest-schema-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    for variant in Variant::MISMATCHED {
        for migrated in [false, true] {
            let test = format!("ingest_schema_{}_{migrated}", variant.column());
            let (db, client, before) = seed::mismatched_database(&test, variant, migrated).await;
            let spool = dir.join(format!("{test}.jsonl")).display().to_string();
            let output = ingest(&db.url(), &spool);
            let stderr = String::from_utf8_lossy(&output.stderr);
            eprintln!("MSG {stderr}");
            assert_eq!(output.status.code(), Some(0), "{stderr}");
            assert!(output.stdout.is_empty());
            let changes = before.changes(&Snapshot::take(&client).await.unwrap());
            assert_eq!(changes.changed, Vec::<String>::new(), "{variant:?} migrated={migrated}");
            let spooled = std::fs::read_to_string(&spool).unwrap_or_default().lines().count();
            if variant == Variant::ExtraNotNullColumn {
                assert_eq!(stderr.lines().count(), 1, "{stderr}");
                assert!(stderr.starts_with("hook-ingest: warning: "), "{stderr}");
                assert!(stderr.contains("hook_events.tenant "), "{stderr}");
                assert!(
                    !stderr.contains("Failing row") && !stderr.contains("/w"),
                    "no row in the warning: {stderr}"
                );
                assert_eq!((changes.added.len(), spooled), (0, 1), "{stderr}");
            } else {
                assert_eq!(stderr, "", "{variant:?}");
                assert_eq!((changes.added.len(), spooled), (1, 0), "{variant:?} migrated={migrated}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
