//! Archive: move old processed events from `hook_events` to `hook_events_archive`, and purge the
//! archive by age.
//!
//! Each batch is **one statement**: a `DELETE ... RETURNING` feeding an `INSERT` into the archive.
//! A statement is atomic, so a run killed at any moment (SIGKILL, a lost connection, a crashed
//! server) has moved every row of a batch or none of it: no row is lost, none is duplicated, and a
//! re-run simply continues. The rows are chosen with `FOR UPDATE SKIP LOCKED`, oldest
//! `processed_at` first, through the partial index `hook_events_archive_idx (processed_at) WHERE
//! processed`. Only `processed` events are ever selected: pending, retrying and dead events stay
//! where the processors and `hook-replay` find them.
//!
//! Each batch works on a bounded window of that index: a read-only probe first finds the
//! `processed_at` of the batch-size-th row after the previous window (an index-only scan that
//! locks nothing), and the batch takes only rows between the two. So a batch never walks over the
//! index entries of rows already moved (dead until vacuumed), and its cost stays proportional to
//! the batch size whatever plan the statistics lead to: with stale statistics (a table bulk-loaded
//! and not analyzed yet) PostgreSQL may prefer to sort the whole remaining range, which made each
//! batch of an unbounded range scan everything left.
//!
//! An event whose id is already in the archive (re-inserted by a producer after it was archived,
//! or copied back by hand) is left in place rather than overwriting or dropping either copy; a
//! plain INSERT (no `ON CONFLICT`) makes any other collision fail the batch, which rolls back.
//!
//! Runs exclude each other with a session advisory lock ([`try_lock`]): a second run finds it
//! taken and does nothing, so overlapping cron or timer runs are harmless.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use deadpool_postgres::GenericClient;
use time::OffsetDateTime;

use crate::error::StoreError;

/// Session advisory lock key of hook-archive ("hookarch" in ASCII).
pub const ARCHIVE_LOCK: i64 = 0x686f_6f6b_6172_6368;

/// Every column of `hook_events`, as listed in both tables.
const COLUMNS: &str = "id, source, action, resource, resource_id, payload, metadata, processed, \
     processing_errors, retry_count, created_at, processed_at, result_metadata, next_attempt_at, \
     dead_at, replays";

/// The end of the next window: the `processed_at` of the `$2`-th processed event (counting from
/// 0) at or after `$1` (from the start when NULL). One-sided, so it is always an ordered scan of
/// the partial index that stops after `$2` entries.
const ARCHIVE_WINDOW: &str = "SELECT processed_at FROM hook_events \
     WHERE processed AND ($1::timestamptz IS NULL OR processed_at >= $1) \
     ORDER BY processed_at OFFSET $2 LIMIT 1";

/// The rows one archive batch takes: processed before `$1`, within the window `[$2, $3]` (a NULL
/// bound is open), not archived already, oldest first, at most `$4`, skipping rows someone holds.
fn archive_batch_sql() -> String {
    format!(
        "WITH moved AS ( \
             DELETE FROM hook_events WHERE id IN ( \
                 SELECT id FROM hook_events AS e \
                 WHERE processed AND processed_at < $1 \
                   AND ($2::timestamptz IS NULL OR processed_at >= $2) \
                   AND ($3::timestamptz IS NULL OR processed_at <= $3) \
                   AND NOT EXISTS (SELECT 1 FROM hook_events_archive AS a WHERE a.id = e.id) \
                 ORDER BY processed_at LIMIT $4 \
                 FOR UPDATE SKIP LOCKED) \
             RETURNING {COLUMNS}), \
         archived AS ( \
             INSERT INTO hook_events_archive ({COLUMNS}) SELECT {COLUMNS} FROM moved \
             RETURNING processed_at) \
         SELECT count(*) FROM archived"
    )
}

const COUNT_ARCHIVABLE: &str = "SELECT count(*) FROM hook_events AS e \
     WHERE processed AND processed_at < $1 \
       AND NOT EXISTS (SELECT 1 FROM hook_events_archive AS a WHERE a.id = e.id)";

/// As [`ARCHIVE_WINDOW`], for the archive's `archived_at`.
const PURGE_WINDOW: &str = "SELECT archived_at FROM hook_events_archive \
     WHERE ($1::timestamptz IS NULL OR archived_at >= $1) \
     ORDER BY archived_at OFFSET $2 LIMIT 1";

/// Deletes up to `$4` archived rows archived before `$1`, within the window `[$2, $3]`.
const PURGE_BATCH: &str = "DELETE FROM hook_events_archive WHERE id IN ( \
         SELECT id FROM hook_events_archive \
         WHERE archived_at < $1 \
           AND ($2::timestamptz IS NULL OR archived_at >= $2) \
           AND ($3::timestamptz IS NULL OR archived_at <= $3) \
         ORDER BY archived_at LIMIT $4)";

const COUNT_PURGEABLE: &str = "SELECT count(*) FROM hook_events_archive WHERE archived_at < $1";

/// What to archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveOptions {
    /// Move processed events whose `processed_at` is older than this. Default 30 days.
    pub older_than: Duration,
    /// Rows per batch (one statement each). Default 1,000.
    pub batch_size: usize,
    /// Also delete archived rows whose `archived_at` is older than this. Default: never.
    pub purge_older_than: Option<Duration>,
}

impl Default for ArchiveOptions {
    fn default() -> Self {
        Self { older_than: Duration::from_secs(30 * 86_400), batch_size: 1_000, purge_older_than: None }
    }
}

/// The time limits of one run, computed once on the database's clock at its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cutoffs {
    /// Events processed before this are archived.
    pub archive_before: OffsetDateTime,
    /// Archived rows archived before this are purged (when purging).
    pub purge_before: Option<OffsetDateTime>,
}

/// One committed batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchiveBatch {
    /// Whether this batch purged the archive rather than moving events into it.
    pub purge: bool,
    /// Rows moved (or purged).
    pub rows: u64,
    /// How long the statement took, from sending it to its commit being acknowledged: an upper
    /// bound of how long it held its row locks.
    pub elapsed: Duration,
}

/// What a whole [`archive`] run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiveReport {
    /// Rows moved into the archive.
    pub moved: u64,
    /// Archive batches that moved rows.
    pub batches: u64,
    /// Rows purged from the archive.
    pub purged: u64,
    /// Purge batches that deleted rows.
    pub purge_batches: u64,
    /// The duration of every statement that changed rows, in order (archive, then purge).
    pub statement_durations: Vec<Duration>,
    /// Whether the caller stopped the run early.
    pub stopped: bool,
}

/// Rows to purge or archive: what a dry run reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchivePlan {
    /// Processed events that would be moved.
    pub archivable: u64,
    /// Archived rows that would be purged (0 when not purging).
    pub purgeable: u64,
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

fn count(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// The cutoffs of a run, on the database's clock.
pub async fn cutoffs(client: &impl GenericClient, options: &ArchiveOptions) -> Result<Cutoffs, StoreError> {
    let purge = options.purge_older_than.map(micros);
    let row = client
        .query_one(
            "SELECT now() - $1::int8 * interval '1 microsecond', \
                    now() - $2::int8 * interval '1 microsecond'",
            &[&micros(options.older_than), &purge],
        )
        .await?;
    Ok(Cutoffs { archive_before: row.try_get(0)?, purge_before: row.try_get(1)? })
}

/// Takes the archive's session advisory lock if it is free; `false` when another session holds
/// it. The lock lasts until [`unlock`] or the end of the session.
pub async fn try_lock(client: &impl GenericClient) -> Result<bool, StoreError> {
    Ok(client.query_one("SELECT pg_try_advisory_lock($1)", &[&ARCHIVE_LOCK]).await?.try_get(0)?)
}

/// Releases the lock taken by [`try_lock`].
pub async fn unlock(client: &impl GenericClient) -> Result<(), StoreError> {
    client.execute("SELECT pg_advisory_unlock($1)", &[&ARCHIVE_LOCK]).await?;
    Ok(())
}

/// Counts what a run with these cutoffs would move and purge. Reads only.
pub async fn plan_archive(client: &impl GenericClient, cutoffs: &Cutoffs) -> Result<ArchivePlan, StoreError> {
    let archivable: i64 = client.query_one(COUNT_ARCHIVABLE, &[&cutoffs.archive_before]).await?.try_get(0)?;
    let purgeable: i64 = match cutoffs.purge_before {
        Some(before) => client.query_one(COUNT_PURGEABLE, &[&before]).await?.try_get(0)?,
        None => 0,
    };
    Ok(ArchivePlan { archivable: count(archivable), purgeable: count(purgeable) })
}

/// The window a batch works on: from `from` (inclusive; open when `None`) to `upto`
/// (inclusive; open when `None`, then the cutoff alone bounds it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Lower bound, inclusive.
    pub from: Option<OffsetDateTime>,
    /// Upper bound, inclusive.
    pub upto: Option<OffsetDateTime>,
}

/// The next window of about `size` rows starting at `from`: its end is the time of the
/// `size`-th row at or after `from`, or `None` when fewer rows are left. Reads the index only.
pub async fn next_window(
    client: &impl GenericClient,
    purge: bool,
    from: Option<OffsetDateTime>,
    size: usize,
) -> Result<Window, StoreError> {
    let offset = i64::try_from(size.saturating_sub(1)).unwrap_or(i64::MAX);
    let sql = if purge { PURGE_WINDOW } else { ARCHIVE_WINDOW };
    let upto = client.query_opt(sql, &[&from, &offset]).await?.map(|row| row.try_get(0)).transpose()?;
    Ok(Window { from, upto })
}

/// Moves up to `limit` processed events processed before `before` and inside `window` into the
/// archive, in one statement. Returns the rows moved.
pub async fn archive_batch(
    client: &impl GenericClient,
    before: OffsetDateTime,
    window: Window,
    limit: usize,
) -> Result<u64, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let row = client
        .query_one(archive_batch_sql().as_str(), &[&before, &window.from, &window.upto, &limit])
        .await?;
    Ok(count(row.try_get(0)?))
}

/// Deletes up to `limit` archived rows archived before `before` and inside `window`, in one
/// statement. Returns the rows deleted.
pub async fn purge_batch(
    client: &impl GenericClient,
    before: OffsetDateTime,
    window: Window,
    limit: usize,
) -> Result<u64, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    Ok(client.execute(PURGE_BATCH, &[&before, &window.from, &window.upto, &limit]).await?)
}

/// Archives (then, when `cutoffs.purge_before` is set, purges) window by window until the cutoff
/// is reached, calling `on_batch` after each batch that changed rows; `ControlFlow::Break` stops
/// the run there.
///
/// `client` must not be inside a transaction: each statement commits on its own, which is what
/// keeps every lock short. Take the advisory lock ([`try_lock`]) on the same client first.
/// Rows a batch skips (held by someone, or their id already archived) wait for the next run.
pub async fn archive(
    client: &impl GenericClient,
    cutoffs: &Cutoffs,
    batch_size: usize,
    mut on_batch: impl FnMut(&ArchiveBatch) -> ControlFlow<()>,
) -> Result<ArchiveReport, StoreError> {
    let limit = batch_size.max(1);
    let mut report = ArchiveReport::default();
    let phases = [Some(cutoffs.archive_before), cutoffs.purge_before];
    for (phase, before) in phases.into_iter().enumerate() {
        let Some(before) = before else { continue };
        let purge = phase == 1;
        let mut from = None;
        loop {
            let window = next_window(client, purge, from, limit).await?;
            let started = Instant::now();
            let rows = if purge {
                purge_batch(client, before, window, limit).await?
            } else {
                archive_batch(client, before, window, limit).await?
            };
            let elapsed = started.elapsed();
            if rows > 0 {
                report.statement_durations.push(elapsed);
                if purge {
                    report.purged += rows;
                    report.purge_batches += 1;
                } else {
                    report.moved += rows;
                    report.batches += 1;
                }
                if on_batch(&ArchiveBatch { purge, rows, elapsed }).is_break() {
                    report.stopped = true;
                    return Ok(report);
                }
            }
            match window.upto {
                // The window reached the cutoff (or the end): this phase is done.
                None => break,
                Some(upto) if upto >= before => break,
                // Rows left at the window's end (ties beyond the batch size) are taken by the
                // next window, which starts there; if nothing could be moved from a window that
                // did not advance, step past it so the run always ends.
                Some(upto) if rows == 0 && Some(upto) == window.from => {
                    from = Some(upto + time::Duration::MICROSECOND);
                }
                Some(upto) => from = Some(upto),
            }
        }
    }
    Ok(report)
}
