//! `hook-archive` on tables that do not fit this build: exit 2 with one line naming the column,
//! and every row unchanged, column by column (the tables hold processed events old enough to
//! move).

use std::process::Stdio;

use hook_store::seed::{self, Changes, Snapshot, Variant};

#[tokio::test]
async fn archive_refuses_a_mismatched_table_and_changes_no_row() {
    for variant in Variant::MISMATCHED {
        for migrated in [false, true] {
            let test = format!("archive_schema_{}_{migrated}", variant.column());
            let (db, client, before) = seed::mismatched_database(&test, variant, migrated).await;
            let output = hook_store::testing::binary_command(env!("CARGO_BIN_EXE_hook-archive"))
                .args(["--older-than", "30d"])
                .env("DATABASE_URL", db.url())
                .current_dir(std::env::temp_dir())
                .stdin(Stdio::null())
                .output()
                .expect("run hook-archive");
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(2), "{stderr}");
            assert_eq!(stderr.lines().count(), 1, "{stderr}");
            assert!(stderr.starts_with("hook-archive: error: "), "{stderr}");
            assert!(stderr.contains(&format!("hook_events.{} ", variant.column())), "{stderr}");
            let changes = before.changes(&Snapshot::take(&client).await.unwrap());
            assert_eq!(changes, Changes::default(), "{variant:?} migrated={migrated}");
        }
    }
}

/// The archive table itself is checked too: one made by the original's SQL from a table whose
/// `created_at` had no time zone keeps that type after hook_events is fixed.
#[tokio::test]
async fn archive_refuses_an_archive_whose_column_does_not_fit() {
    let (db, client, _) =
        seed::mismatched_database("archive_schema_archive", Variant::TimestampWithoutTimeZone, false).await;
    client.batch_execute(seed::ORIGINAL_ARCHIVE_SQL).await.unwrap();
    client.batch_execute("ALTER TABLE hook_events ALTER COLUMN created_at TYPE timestamptz").await.unwrap();
    let before = Snapshot::take(&client).await.unwrap();
    let output = hook_store::testing::binary_command(env!("CARGO_BIN_EXE_hook-archive"))
        .args(["--older-than", "1s"])
        .env("DATABASE_URL", db.url())
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .output()
        .expect("run hook-archive");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("hook_events_archive.created_at is timestamp without time zone"), "{stderr}");
    assert!(!stderr.contains("hook_events.created_at"), "{stderr}");
    assert_eq!(before.changes(&Snapshot::take(&client).await.unwrap()), Changes::default());
}
