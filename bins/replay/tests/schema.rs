//! `hook-replay` on tables that do not fit this build: exit 2 with one line naming the column,
//! and every row unchanged, column by column (the tables hold failed events it would re-queue).

use std::process::Stdio;

use hook_store::seed::{self, Changes, Snapshot, Variant};

#[tokio::test]
async fn replay_refuses_a_mismatched_table_and_changes_no_row() {
    for variant in Variant::MISMATCHED {
        for migrated in [false, true] {
            let test = format!("replay_schema_{}_{migrated}", variant.column());
            let (db, client, before) = seed::mismatched_database(&test, variant, migrated).await;
            let output = hook_store::testing::binary_command(env!("CARGO_BIN_EXE_hook-replay"))
                .env("DATABASE_URL", db.url())
                .current_dir(std::env::temp_dir())
                .stdin(Stdio::null())
                .output()
                .expect("run hook-replay");
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(2), "{stderr}");
            assert_eq!(stderr.lines().count(), 1, "{stderr}");
            assert!(stderr.starts_with("hook-replay: error: "), "{stderr}");
            assert!(stderr.contains(&format!("hook_events.{} ", variant.column())), "{stderr}");
            let changes = before.changes(&Snapshot::take(&client).await.unwrap());
            assert_eq!(changes, Changes::default(), "{variant:?} migrated={migrated}");
        }
    }
}
