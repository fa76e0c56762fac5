//! Versioned migrations, applied under an advisory lock and recorded in `hook_events_migrations`.
//!
//! The SQL files live in the workspace's `migrations/` folder and are compiled in. Each is applied
//! once; its checksum is recorded, and a recorded migration whose file changed is an error (a
//! released migration is never edited: add a new one). The one exception is a file whose earlier
//! text is kept in `migrations/history/` and listed in its [`Migration::previous`]: an install
//! that applied that text is up to date with it, because the migrations after it bring both to
//! the same schema (this is how 0001, 0002 and 0004 stopped holding locks on a large table).
//!
//! A file whose first line is `-- hook-events: no-transaction` runs statement by statement
//! outside a transaction (for `CREATE INDEX CONCURRENTLY`); all others run in one transaction
//! with their record.
//!
//! **Locks.** A migration that waits for a table lock makes everyone who asks for that table after
//! it wait behind it: an `ALTER TABLE hook_events` queued behind a long transaction would stop
//! every producer's INSERT until that transaction ends. So every statement that may need a
//! strong lock runs under a short `lock_timeout` ([`MigrateOptions::lock_timeout`], 100 ms by
//! default): if the lock is not free by then the statement (with its transaction) gives up, the
//! queued sessions go on, and the runner tries again after a pause, for up to
//! [`MigrateOptions::retry_for`]. Each repeat waits twice as long as the one before, up to
//! [`MigrateOptions::max_lock_timeout`] (800 ms): even the lock of an `ALTER TABLE` must wait
//! for the inserts already running, and on a busy, slow server those may take longer than the
//! first attempt allows. Statements that build or drop an index `CONCURRENTLY` take only locks
//! that let writers go on, so they wait without a timeout.
//!
//! **Nothing on a table that does not fit.** Before applying anything, the runner checks the
//! tables ([`schema::check`] with [`Scope::MIGRATIONS`]): a mismatched table is refused with
//! [`StoreError::Schema`] before any migration has changed it.

use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tracing::{info, warn};

use crate::error::StoreError;
use crate::schema::{self, Scope};

/// One migration file.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Version number, from the file name's prefix.
    pub version: i32,
    /// File name.
    pub name: &'static str,
    /// The SQL.
    pub sql: &'static str,
    /// Earlier released texts of this file (in `migrations/history/`), whose checksums are
    /// accepted as this migration applied.
    pub previous: &'static [&'static str],
}

impl Migration {
    fn transactional(&self) -> bool {
        !self.sql.starts_with("-- hook-events: no-transaction")
    }

    /// FNV-1a over the file, as hex: enough to notice an edited file.
    fn checksum(&self) -> String {
        checksum(self.sql)
    }

    /// Whether a recorded checksum is this file's, or one of its earlier released texts'.
    fn accepts(&self, recorded: &str) -> bool {
        recorded == self.checksum() || self.previous.iter().any(|text| checksum(text) == recorded)
    }
}

fn checksum(sql: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in sql.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

macro_rules! migration {
    ($version:literal, $name:literal) => {
        migration!($version, $name, [])
    };
    ($version:literal, $name:literal, [$($previous:literal),*]) => {
        Migration {
            version: $version,
            name: $name,
            sql: include_str!(concat!("../../../migrations/", $name)),
            previous: &[$(include_str!(concat!("../../../migrations/history/", $previous))),*],
        }
    };
}

/// Every migration of this build, in order.
pub const MIGRATIONS: &[Migration] = &[
    migration!(1, "0001_hook_events.sql", ["0001_hook_events.v1.sql"]),
    migration!(2, "0002_processor_columns.sql", ["0002_processor_columns.v1.sql"]),
    migration!(3, "0003_claim_index.sql"),
    migration!(4, "0004_replay_and_archive.sql", ["0004_replay_and_archive.v1.sql"]),
    migration!(5, "0005_archive_index.sql"),
    migration!(6, "0006_original_indexes.sql"),
    migration!(7, "0007_archive_table.sql"),
    migration!(8, "0008_archive_key.sql"),
    migration!(9, "0009_claim_ledger.sql"),
    migration!(10, "0010_console_indexes.sql", ["0010_console_indexes.v1.sql"]),
    migration!(11, "0011_claim_split.sql"),
    migration!(12, "0012_claim_presence.sql"),
    migration!(13, "0013_session_order.sql", ["0013_session_order.v1.sql"]),
    migration!(14, "0014_console_failures.sql"),
    migration!(15, "0015_autovacuum.sql"),
];

/// The migrations up to `version` as they were first released (each file's oldest text): what
/// an install made by an earlier build has applied. For tests and `hook-bench upgrade`, which
/// compare an upgrade of such an install with a fresh one.
#[cfg(any(feature = "test-support", feature = "bench"))]
pub fn first_released(version: i32) -> Vec<Migration> {
    MIGRATIONS
        .iter()
        .filter(|m| m.version <= version)
        .map(|m| Migration { sql: m.previous.first().copied().unwrap_or(m.sql), previous: &[], ..*m })
        .collect()
}

/// Advisory lock key of the migration runner ("hookmigr" in ASCII).
const MIGRATION_LOCK: i64 = 0x686f_6f6b_6d69_6772;

/// How the runner waits for table locks (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrateOptions {
    /// How long the first attempt of a statement waits for a table lock (`lock_timeout`) before
    /// it gives up and lets the sessions queued behind it go on. Default 100 ms.
    pub lock_timeout: Duration,
    /// The longest any repeat waits (each waits twice as long as the one before, up to this):
    /// how long, at most, a session queues behind a migration. Default 800 ms.
    pub max_lock_timeout: Duration,
    /// How long attempts that ran out of `lock_timeout` are repeated (pauses from 200 ms,
    /// doubling up to 5 s) before the migration fails. Default 5 minutes.
    pub retry_for: Duration,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            lock_timeout: Duration::from_millis(100),
            max_lock_timeout: Duration::from_millis(800),
            retry_for: Duration::from_secs(300),
        }
    }
}

/// One migration a [`migrate`] call applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The migration's version.
    pub version: i32,
    /// Its file name.
    pub name: &'static str,
    /// From its first statement to its record, lock waits and pauses included.
    pub elapsed: Duration,
    /// Attempts that ran out of `lock_timeout` and were repeated.
    pub lock_timeouts: u32,
}

/// What [`migrate`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationReport {
    /// Versions applied by this call, in order.
    pub applied: Vec<i32>,
    /// The same migrations, with how long each took.
    pub details: Vec<Applied>,
}

/// Applies every pending migration with the default [`MigrateOptions`]; see [`migrate_with`].
pub async fn migrate(client: &Client) -> Result<MigrationReport, StoreError> {
    migrate_with(client, &MigrateOptions::default()).await
}

/// Applies every pending migration. Safe to call from several processes at once: they take turns
/// under an advisory lock, and all but the first find nothing to do.
///
/// Waiting for the lock polls `pg_try_advisory_lock` rather than blocking in
/// `pg_advisory_lock`: a blocked session holds a snapshot, and `CREATE INDEX CONCURRENTLY` in the
/// lock holder would wait for that snapshot forever.
///
/// When every migration is already recorded, nothing is locked, created or checked: a role that
/// may only read `hook_events_migrations` (the least-privilege processor role) can start.
/// Otherwise the tables are checked first ([`Scope::MIGRATIONS`]), and a mismatch is returned as
/// [`StoreError::Schema`] with nothing changed.
pub async fn migrate_with(client: &Client, options: &MigrateOptions) -> Result<MigrationReport, StoreError> {
    apply(client, MIGRATIONS, options).await
}

/// Applies `migrations` (in order) as [`migrate_with`] does: for tests and `hook-bench upgrade`,
/// which also apply [`first_released`].
#[cfg(any(feature = "test-support", feature = "bench"))]
pub async fn migrate_these(
    client: &Client,
    migrations: &[Migration],
    options: &MigrateOptions,
) -> Result<MigrationReport, StoreError> {
    apply(client, migrations, options).await
}

async fn apply(
    client: &Client,
    migrations: &[Migration],
    options: &MigrateOptions,
) -> Result<MigrationReport, StoreError> {
    if up_to_date(client, migrations).await? {
        return Ok(MigrationReport::default());
    }
    under_migration_lock(client, async {
        schema::check(client, Scope::MIGRATIONS).await?;
        apply_pending(client, migrations, options).await
    })
    .await
}

/// Runs `work` holding the migration runner's advisory lock on `client`'s session, so that no
/// migration and no index build of [`crate::indexes`] runs beside it. The lock is polled
/// (see [`migrate_with`] for why) and released whatever `work` returned.
pub(crate) async fn under_migration_lock<T>(
    client: &Client,
    work: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    loop {
        let row = client.query_one("SELECT pg_try_advisory_lock($1)", &[&MIGRATION_LOCK]).await?;
        if row.get::<_, bool>(0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let result = work.await;
    let unlock = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await;
    let value = result?;
    unlock?;
    Ok(value)
}

/// Whether every migration of `migrations` is recorded with an accepted checksum.
async fn up_to_date(client: &Client, migrations: &[Migration]) -> Result<bool, StoreError> {
    let exists: bool =
        client.query_one("SELECT to_regclass('hook_events_migrations') IS NOT NULL", &[]).await?.get(0);
    if !exists {
        return Ok(false);
    }
    let recorded = client.query("SELECT version, checksum FROM hook_events_migrations", &[]).await?;
    Ok(migrations.iter().all(|m| {
        recorded.iter().any(|r| r.get::<_, i32>(0) == m.version && m.accepts(&r.get::<_, String>(1)))
    }))
}

async fn apply_pending(
    client: &Client,
    migrations: &[Migration],
    options: &MigrateOptions,
) -> Result<MigrationReport, StoreError> {
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
    for migration in migrations {
        let fail = |reason: String| StoreError::Migration {
            version: migration.version,
            name: migration.name.to_owned(),
            reason,
        };
        if let Some(row) = recorded.iter().find(|r| r.get::<_, i32>(0) == migration.version) {
            let checksum: String = row.get(2);
            if !migration.accepts(&checksum) {
                return Err(fail(format!(
                    "the applied migration's checksum {checksum} is neither this build's {} nor \
                     one of its earlier texts': a released migration file was edited, or a newer \
                     build migrated this database (run that build or a newer one)",
                    migration.checksum()
                )));
            }
            continue;
        }
        info!(version = migration.version, name = migration.name, "applying migration");
        let started = Instant::now();
        let mut retry = LockRetry::new(options);
        if migration.transactional() {
            apply_in_transaction(client, migration, &mut retry).await.map_err(fail)?;
        } else {
            apply_statements(client, migration, &mut retry).await.map_err(fail)?;
        }
        let elapsed = started.elapsed();
        info!(
            version = migration.version,
            elapsed_ms = elapsed.as_millis() as u64,
            lock_timeouts = retry.timeouts,
            "migration applied"
        );
        report.applied.push(migration.version);
        report.details.push(Applied {
            version: migration.version,
            name: migration.name,
            elapsed,
            lock_timeouts: retry.timeouts,
        });
    }
    Ok(report)
}

const RECORD: &str = "INSERT INTO hook_events_migrations (version, name, checksum) VALUES ($1, $2, $3)";

async fn record(client: &Client, migration: &Migration) -> Result<u64, tokio_postgres::Error> {
    client.execute(RECORD, &[&migration.version, &migration.name, &migration.checksum()]).await
}

/// The whole file and its record in one transaction, repeated while it runs out of
/// `lock_timeout`: each attempt rolls back entirely, so a repeat starts from scratch.
async fn apply_in_transaction(
    client: &Client,
    migration: &Migration,
    retry: &mut LockRetry,
) -> Result<(), String> {
    loop {
        let begin = format!("BEGIN; SET LOCAL lock_timeout = {}", millis(retry.lock_timeout));
        let run = async {
            client.batch_execute(&begin).await?;
            client.batch_execute(migration.sql).await?;
            record(client, migration).await?;
            client.batch_execute("COMMIT").await
        };
        let Err(error) = run.await else { return Ok(()) };
        let _ = client.batch_execute("ROLLBACK").await;
        if !(is_lock_timeout(&error) && retry.again(migration).await) {
            return Err(retry.explain(&error, "nothing of it was applied"));
        }
    }
}

/// Statement by statement outside a transaction; each statement that may wait for a strong lock
/// runs under `lock_timeout` and is repeated alone (the files' statements are each atomic and
/// safe to run again).
async fn apply_statements(
    client: &Client,
    migration: &Migration,
    retry: &mut LockRetry,
) -> Result<(), String> {
    let run = async {
        for statement in split_statements(migration.sql) {
            loop {
                // A concurrent index build or drop waits only for locks that let writers go on,
                // and cannot be repeated halfway: no timeout for it.
                let timeout = if concurrent(statement) { 0 } else { millis(retry.lock_timeout) };
                client
                    .batch_execute(&format!("SET lock_timeout = {timeout}"))
                    .await
                    .map_err(|e| db_error_text(&e))?;
                let Err(error) = client.batch_execute(statement).await else { break };
                if !(is_lock_timeout(&error) && retry.again(migration).await) {
                    return Err(retry.explain(
                        &error,
                        "the statements before it were applied, and are safe to run again",
                    ));
                }
            }
        }
        record(client, migration).await.map_err(|e| db_error_text(&e))?;
        Ok(())
    };
    let result = run.await;
    let reset = client.batch_execute("RESET lock_timeout").await;
    result?;
    reset.map_err(|e| db_error_text(&e))
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// SQLSTATE 55P03 `lock_not_available`: `lock_timeout` ran out.
fn is_lock_timeout(error: &tokio_postgres::Error) -> bool {
    error.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE)
}

/// The repeats of one migration that ran out of `lock_timeout`.
struct LockRetry {
    started: Instant,
    deadline: Instant,
    pause: Duration,
    /// The next attempt's `lock_timeout`.
    lock_timeout: Duration,
    max_lock_timeout: Duration,
    timeouts: u32,
}

impl LockRetry {
    fn new(options: &MigrateOptions) -> Self {
        let started = Instant::now();
        Self {
            started,
            deadline: started + options.retry_for,
            pause: Duration::from_millis(200),
            lock_timeout: options.lock_timeout,
            max_lock_timeout: options.max_lock_timeout.max(options.lock_timeout),
            timeouts: 0,
        }
    }

    /// Counts a timeout and, if there is time left, pauses before the next attempt (with some
    /// jitter, so that it does not keep meeting the same periodic transaction), which will wait
    /// twice as long for its lock (up to the maximum). `false` when the time is up.
    async fn again(&mut self, migration: &Migration) -> bool {
        self.timeouts += 1;
        let jitter = rand::random::<f64>() * 0.4 + 0.8;
        let pause = self.pause.mul_f64(jitter);
        if Instant::now() + pause >= self.deadline {
            return false;
        }
        // The first, then every tenth: a busy table may take a few attempts, which is normal.
        if self.timeouts == 1 || self.timeouts.is_multiple_of(10) {
            warn!(
                version = migration.version,
                name = migration.name,
                attempts = self.timeouts,
                lock_timeout_ms = self.lock_timeout.as_millis() as u64,
                "a migration could not take its lock within lock_timeout (a transaction holds the table); \
                 letting queued sessions go on and trying again"
            );
        }
        tokio::time::sleep(pause).await;
        self.pause = (self.pause * 2).min(Duration::from_secs(5));
        self.lock_timeout = (self.lock_timeout * 2).min(self.max_lock_timeout);
        true
    }

    /// The reason of a failed migration: the server's message, and after lock timeouts, what
    /// they mean.
    fn explain(&self, error: &tokio_postgres::Error, partial: &str) -> String {
        let text = db_error_text(error);
        if !is_lock_timeout(error) {
            return text;
        }
        format!(
            "{text}: {} attempts, waiting up to {} ms each for a table lock, over {:.0} s; a long \
             transaction holds a lock on the table (see pg_stat_activity, oldest xact_start first): \
             end it, or start again when it is over ({partial})",
            self.timeouts,
            self.lock_timeout.as_millis(),
            self.started.elapsed().as_secs_f64()
        )
    }
}

/// The server's message when there is one (it says what failed), else the client error.
pub(crate) fn db_error_text(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => error.to_string(),
    }
}

/// Whether a statement builds or drops an index `CONCURRENTLY` (outside its comments).
fn concurrent(statement: &str) -> bool {
    statement
        .lines()
        .map(str::trim)
        .filter(|line| !line.starts_with("--"))
        .any(|line| line.to_ascii_uppercase().contains(" CONCURRENTLY "))
}

/// Splits a no-transaction migration into statements: on `;` at a line end outside `$$` quotes
/// (so a `DO $$ ... $$;` block is one statement), skipping chunks that hold only comments.
fn split_statements(sql: &str) -> Vec<&str> {
    let mut statements = Vec::new();
    let (mut start, mut offset, mut quoted) = (0, 0, false);
    for line in sql.split_inclusive('\n') {
        offset += line.len();
        if line.matches("$$").count() % 2 == 1 {
            quoted = !quoted;
        }
        if !quoted && line.trim_end().ends_with(';') {
            statements.push(&sql[start..offset]);
            start = offset;
        }
    }
    statements.push(&sql[start..]);
    statements
        .into_iter()
        .map(str::trim)
        .filter(|s| {
            s.lines().any(|line| {
                let line = line.trim();
                !line.is_empty() && !line.starts_with("--")
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_ordered_and_match_file_names() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(usize::try_from(m.version).ok(), Some(i + 1), "{}", m.name);
        }
        for m in MIGRATIONS {
            assert!(m.name.starts_with(&format!("{:04}_", m.version)), "{}", m.name);
        }
        assert_eq!(MIGRATIONS[0].version, 1);
    }

    #[test]
    fn no_transaction_files_split_into_statements() {
        let index = MIGRATIONS.iter().find(|m| m.version == 3).expect("migration 3");
        assert!(!index.transactional());
        let statements = split_statements(index.sql);
        assert_eq!(statements.len(), 2, "{statements:?}");
        assert!(statements[1].contains("CREATE INDEX CONCURRENTLY"));
        assert!(concurrent(statements[0]) && concurrent(statements[1]));

        // DO blocks stay whole; only the index builds run without lock_timeout.
        let key = MIGRATIONS.iter().find(|m| m.version == 8).expect("migration 8");
        let statements = split_statements(key.sql);
        let kinds: Vec<(bool, bool)> = statements
            .iter()
            .map(|s| (s.starts_with("DO $$") || s.contains("\nDO $$"), concurrent(s)))
            .collect();
        assert_eq!(
            kinds,
            [
                (true, false),
                (true, false),
                (true, false),
                (true, false),
                (false, true),
                (true, false),
                (true, false),
                (false, true)
            ],
            "{statements:#?}"
        );
        assert!(statements.iter().all(|s| s.trim_end().ends_with(';')), "{statements:#?}");
    }

    /// The released texts in migrations/history/ are accepted, and nothing else is: an edit of a
    /// file must come with its earlier text there.
    #[test]
    fn earlier_released_texts_are_accepted_by_their_checksums() {
        for m in MIGRATIONS {
            assert!(m.accepts(&m.checksum()));
            for text in m.previous {
                assert_ne!(*text, m.sql);
                assert!(m.accepts(&checksum(text)), "{}", m.name);
            }
            assert!(!m.accepts("edited"));
        }
        let released: Vec<(i32, usize)> = MIGRATIONS
            .iter()
            .filter(|m| !m.previous.is_empty())
            .map(|m| (m.version, m.previous.len()))
            .collect();
        assert_eq!(released, [(1, 1), (2, 1), (4, 1), (10, 1), (13, 1)]);
    }
}
