//! Versioned migrations, applied under an advisory lock and recorded in `hook_events_migrations`.
//!
//! The SQL files live in the workspace's `migrations/` folder and are compiled in. Each is applied
//! once; its checksum is recorded, and a recorded migration whose file changed is an error (a
//! released migration is never edited: add a new one). A file whose first line is
//! `-- hook-events: no-transaction` runs statement by statement outside a transaction (for
//! `CREATE INDEX CONCURRENTLY`); all others run in one transaction with their record.

use std::time::Duration;

use tokio_postgres::Client;
use tracing::info;

use crate::error::StoreError;

/// One migration file.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Version number, from the file name's prefix.
    pub version: i32,
    /// File name.
    pub name: &'static str,
    /// The SQL.
    pub sql: &'static str,
}

impl Migration {
    fn transactional(&self) -> bool {
        !self.sql.starts_with("-- hook-events: no-transaction")
    }

    /// FNV-1a over the file, as hex: enough to notice an edited file.
    fn checksum(&self) -> String {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in self.sql.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{hash:016x}")
    }
}

macro_rules! migration {
    ($version:literal, $name:literal) => {
        Migration {
            version: $version,
            name: $name,
            sql: include_str!(concat!("../../../migrations/", $name)),
        }
    };
}

/// Every migration of this build, in order.
pub const MIGRATIONS: &[Migration] = &[
    migration!(1, "0001_hook_events.sql"),
    migration!(2, "0002_processor_columns.sql"),
    migration!(3, "0003_claim_index.sql"),
    migration!(4, "0004_replay_and_archive.sql"),
    migration!(5, "0005_archive_index.sql"),
    migration!(6, "0006_console_indexes.sql"),
];

/// Advisory lock key of the migration runner ("hookmigr" in ASCII).
const MIGRATION_LOCK: i64 = 0x686f_6f6b_6d69_6772;

/// What [`migrate`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationReport {
    /// Versions applied by this call, in order.
    pub applied: Vec<i32>,
}

/// Applies every pending migration. Safe to call from several processes at once: they take turns
/// under an advisory lock, and all but the first find nothing to do.
///
/// Waiting for the lock polls `pg_try_advisory_lock` rather than blocking in
/// `pg_advisory_lock`: a blocked session holds a snapshot, and `CREATE INDEX CONCURRENTLY` in the
/// lock holder would wait for that snapshot forever.
///
/// When every migration is already recorded, nothing is locked or created: a role that may only
/// read `hook_events_migrations` (the least-privilege processor role) can start.
pub async fn migrate(client: &Client) -> Result<MigrationReport, StoreError> {
    if up_to_date(client).await? {
        return Ok(MigrationReport::default());
    }
    loop {
        let row = client.query_one("SELECT pg_try_advisory_lock($1)", &[&MIGRATION_LOCK]).await?;
        if row.get::<_, bool>(0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let result = apply_pending(client).await;
    let unlock = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await;
    let report = result?;
    unlock?;
    Ok(report)
}

/// Whether every migration of this build is recorded with its checksum.
async fn up_to_date(client: &Client) -> Result<bool, StoreError> {
    let exists: bool =
        client.query_one("SELECT to_regclass('hook_events_migrations') IS NOT NULL", &[]).await?.get(0);
    if !exists {
        return Ok(false);
    }
    let recorded = client.query("SELECT version, checksum FROM hook_events_migrations", &[]).await?;
    Ok(MIGRATIONS.iter().all(|m| {
        recorded.iter().any(|r| r.get::<_, i32>(0) == m.version && r.get::<_, String>(1) == m.checksum())
    }))
}

async fn apply_pending(client: &Client) -> Result<MigrationReport, StoreError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS hook_events_migrations (
                version INTEGER PRIMARY KEY,
                name TEXT NOT NULL,
                checksum TEXT NOT NULL,
                applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
            )",
        )
        .await?;
    let recorded = client.query("SELECT version, name, checksum FROM hook_events_migrations", &[]).await?;
    let mut report = MigrationReport::default();
    for migration in MIGRATIONS {
        let fail = |reason: String| StoreError::Migration {
            version: migration.version,
            name: migration.name.to_owned(),
            reason,
        };
        if let Some(row) = recorded.iter().find(|r| r.get::<_, i32>(0) == migration.version) {
            let checksum: String = row.get(2);
            if checksum != migration.checksum() {
                return Err(fail(format!(
                    "the applied migration's checksum {checksum} differs from this build's {}: \
                     a released migration file was edited",
                    migration.checksum()
                )));
            }
            continue;
        }
        info!(version = migration.version, name = migration.name, "applying migration");
        let record = "INSERT INTO hook_events_migrations (version, name, checksum) VALUES ($1, $2, $3)";
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
            [&migration.version, &migration.name, &migration.checksum()];
        if migration.transactional() {
            let run = async {
                client.batch_execute("BEGIN").await?;
                client.batch_execute(migration.sql).await?;
                client.execute(record, &params).await?;
                client.batch_execute("COMMIT").await
            };
            if let Err(error) = run.await {
                let _ = client.batch_execute("ROLLBACK").await;
                return Err(fail(db_error_text(&error)));
            }
        } else {
            for statement in split_statements(migration.sql) {
                client.batch_execute(statement).await.map_err(|e| fail(db_error_text(&e)))?;
            }
            client.execute(record, &params).await.map_err(|e| fail(db_error_text(&e)))?;
        }
        report.applied.push(migration.version);
    }
    Ok(report)
}

/// The server's message when there is one (it says what failed), else the client error.
pub(crate) fn db_error_text(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => error.to_string(),
    }
}

/// Splits a no-transaction migration into statements: on `;` at a line end, skipping comments.
/// Such files hold simple statements only (no function bodies).
fn split_statements(sql: &str) -> impl Iterator<Item = &str> {
    sql.split(";\n").map(str::trim).filter(|s| {
        s.lines().any(|line| {
            let line = line.trim();
            !line.is_empty() && !line.starts_with("--")
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_ordered_and_match_file_names() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1);
            assert!(m.name.starts_with(&format!("{:04}_", m.version)), "{}", m.name);
        }
    }

    #[test]
    fn no_transaction_files_split_into_statements() {
        let index = MIGRATIONS.iter().find(|m| !m.transactional()).expect("a no-transaction migration");
        let statements: Vec<_> = split_statements(index.sql).collect();
        assert_eq!(statements.len(), 2, "{statements:?}");
        assert!(statements[1].contains("CREATE INDEX CONCURRENTLY"));
    }
}
