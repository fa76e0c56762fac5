//! Replay: make failed, dead (or, on request, processed) events eligible again.
//!
//! The selection is a [`ReplayFilter`]; its parts combine with AND. By default it selects the
//! events that failed at least once and are not processed (retrying or dead); with
//! `include_processed` it also selects events that succeeded.
//!
//! [`replay`] walks the selection in `(created_at, id)` order, in batches. Each batch is its own
//! short transaction: it locks its rows with `FOR UPDATE SKIP LOCKED`, so an event that a
//! processor holds (its claim is a row lock) is never touched nor waited for; it resets them,
//! appends an entry to their `replays` history, and sends `NOTIFY hook_events` on commit so idle
//! processors wake at once. The next batch starts after the last row of the previous one (keyset
//! pagination), so an event replayed, failed again and matching again during the same run is not
//! replayed twice, and the run ends even while processors keep failing events.
//!
//! Re-queuing sets `retry_count = 0`, `next_attempt_at = NULL` (try now), `dead_at = NULL`,
//! `processed = false`, `processed_at = NULL`; `processing_errors` is kept unless
//! [`ReplayOptions::clear_errors`]. The `replays` entry records when, and what the row was before:
//! `{"at", "previous_retry_count", "previous_errors_count", "previous_dead_at", "cleared_errors",
//! "processed_before"}`.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use deadpool_postgres::GenericClient;
use time::OffsetDateTime;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::error::StoreError;

/// Which events to replay. Every part that is set must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayFilter {
    /// Only these sources (empty: any).
    pub sources: Vec<String>,
    /// Only these actions (empty: any).
    pub actions: Vec<String>,
    /// Only events created at or after this time.
    pub since: Option<OffsetDateTime>,
    /// Only events created before this time.
    pub until: Option<OffsetDateTime>,
    /// Only these events (empty: any).
    pub ids: Vec<Uuid>,
    /// Also events that were processed successfully (by default only failed and dead ones).
    pub include_processed: bool,
}

/// How to replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayOptions {
    /// Events per batch (each batch is one short transaction). Default 500.
    pub batch_size: usize,
    /// Set `processing_errors` to NULL instead of keeping the old errors.
    pub clear_errors: bool,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        Self { batch_size: 500, clear_errors: false }
    }
}

/// The events a filter selects right now, counted by `(source, action)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayPlan {
    /// Matching events per `(source, action)`, most first.
    pub groups: Vec<((String, String), u64)>,
    /// The first few matching ids, oldest first.
    pub sample_ids: Vec<Uuid>,
}

impl ReplayPlan {
    /// All matching events.
    pub fn total(&self) -> u64 {
        self.groups.iter().map(|(_, n)| n).sum()
    }
}

/// One re-queued event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayedEvent {
    /// The event.
    pub id: Uuid,
    /// Its source.
    pub source: String,
    /// Its action.
    pub action: String,
    /// Its creation time (the pagination key, with the id).
    pub created_at: OffsetDateTime,
}

/// What one batch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayBatch {
    /// Events re-queued by the batch.
    pub replayed: Vec<ReplayedEvent>,
    /// Matching events in the batch's range that a processor held, left alone.
    pub skipped_held: u64,
}

/// What a whole [`replay`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Events re-queued.
    pub replayed: u64,
    /// Batches run (committed).
    pub batches: u64,
    /// Matching events left alone because a processor held them at the time.
    pub skipped_held: u64,
    /// Re-queued events per `(source, action)`.
    pub by_kind: BTreeMap<(String, String), u64>,
    /// Whether the caller stopped the run before the selection was exhausted.
    pub stopped: bool,
}

/// Where the next batch starts: after this `(created_at, id)`.
type Cursor = Option<(OffsetDateTime, Uuid)>;

/// The selection. `$1` include_processed, `$2` sources, `$3` actions, `$4` since, `$5` until,
/// `$6` ids; a NULL parameter matches everything. The statements are planned per execution with
/// the actual values, so the NULL tests fold away and the planner sees the real predicate.
const FILTER: &str = "((processed AND $1::bool) \
       OR (NOT processed AND (dead_at IS NOT NULL OR retry_count > 0))) \
     AND ($2::text[] IS NULL OR source = ANY($2)) \
     AND ($3::text[] IS NULL OR action = ANY($3)) \
     AND ($4::timestamptz IS NULL OR created_at >= $4) \
     AND ($5::timestamptz IS NULL OR created_at < $5) \
     AND ($6::uuid[] IS NULL OR id = ANY($6))";

/// After the keyset position `($7, $8)`, when `$7` is not NULL.
const AFTER: &str = "($7::timestamptz IS NULL OR (created_at, id) > ($7, $8::uuid))";

fn plan_groups_sql() -> String {
    format!(
        "SELECT source, action, count(*) FROM hook_events WHERE {FILTER} \
         GROUP BY source, action ORDER BY count(*) DESC, source, action"
    )
}

fn plan_sample_sql() -> String {
    format!("SELECT id FROM hook_events WHERE {FILTER} ORDER BY created_at, id LIMIT $7")
}

/// Locks the next `$9` matching events after the cursor, skipping held ones, and re-queues them.
/// `$10` clear_errors. Column references on the right of SET are the row's old values.
fn replay_batch_sql() -> String {
    format!(
        "WITH picked AS ( \
             SELECT id FROM hook_events WHERE {FILTER} AND {AFTER} \
             ORDER BY created_at, id LIMIT $9 \
             FOR UPDATE SKIP LOCKED) \
         UPDATE hook_events AS e SET \
             retry_count = 0, next_attempt_at = NULL, dead_at = NULL, \
             processed = FALSE, processed_at = NULL, \
             processing_errors = CASE WHEN $10::bool THEN NULL ELSE e.processing_errors END, \
             replays = CASE WHEN jsonb_typeof(e.replays) = 'array' THEN e.replays ELSE '[]'::jsonb END \
                 || jsonb_build_array(jsonb_build_object( \
                     'at', now(), \
                     'previous_retry_count', e.retry_count, \
                     'previous_errors_count', coalesce(cardinality(e.processing_errors), 0), \
                     'previous_dead_at', e.dead_at, \
                     'cleared_errors', $10::bool, \
                     'processed_before', e.processed)) \
         FROM picked WHERE e.id = picked.id \
         RETURNING e.id, e.source, e.action, e.created_at"
    )
}

/// Matching events after the cursor and up to `($9, $10)` (to the end when `$9` is NULL).
/// Run after the batch in its transaction, where the re-queued rows no longer match: what is
/// left in the range is what the batch skipped because a processor held it.
fn count_range_sql() -> String {
    format!(
        "SELECT count(*) FROM hook_events WHERE {FILTER} AND {AFTER} \
         AND ($9::timestamptz IS NULL OR (created_at, id) <= ($9, $10::uuid))"
    )
}

/// The filter's parameters, owned, in the order of [`FILTER`].
struct FilterParams {
    include_processed: bool,
    sources: Option<Vec<String>>,
    actions: Option<Vec<String>>,
    since: Option<OffsetDateTime>,
    until: Option<OffsetDateTime>,
    ids: Option<Vec<Uuid>>,
}

impl FilterParams {
    fn new(filter: &ReplayFilter) -> Self {
        let non_empty = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
        Self {
            include_processed: filter.include_processed,
            sources: non_empty(&filter.sources),
            actions: non_empty(&filter.actions),
            since: filter.since,
            until: filter.until,
            ids: (!filter.ids.is_empty()).then(|| filter.ids.clone()),
        }
    }

    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![&self.include_processed, &self.sources, &self.actions, &self.since, &self.until, &self.ids]
    }
}

fn split_cursor(cursor: Cursor) -> (Option<OffsetDateTime>, Option<Uuid>) {
    (cursor.map(|c| c.0), cursor.map(|c| c.1))
}

/// Counts what `filter` selects, by `(source, action)`, and lists its first `sample` ids. Reads
/// only: nothing is locked or changed (the dry run).
pub async fn plan_replay(
    client: &impl GenericClient,
    filter: &ReplayFilter,
    sample: usize,
) -> Result<ReplayPlan, StoreError> {
    let filter = FilterParams::new(filter);
    let rows = client.query(plan_groups_sql().as_str(), &filter.params()).await?;
    let groups = rows
        .iter()
        .map(|row| {
            let count: i64 = row.try_get(2)?;
            Ok(((row.try_get(0)?, row.try_get(1)?), u64::try_from(count).unwrap_or(0)))
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let limit = i64::try_from(sample).unwrap_or(i64::MAX);
    let mut params = filter.params();
    params.push(&limit);
    let rows = client.query(plan_sample_sql().as_str(), &params).await?;
    let sample_ids = rows.iter().map(|row| row.try_get(0)).collect::<Result<_, _>>()?;
    Ok(ReplayPlan { groups, sample_ids })
}

/// Re-queues the next `limit` matching events after `after`, skipping events held by others.
/// Run it inside a transaction (see [`replay`]); the rows stay locked until it ends.
pub async fn replay_batch(
    client: &impl GenericClient,
    filter: &ReplayFilter,
    after: Option<(OffsetDateTime, Uuid)>,
    limit: usize,
    clear_errors: bool,
) -> Result<Vec<ReplayedEvent>, StoreError> {
    let filter = FilterParams::new(filter);
    let (after_at, after_id) = split_cursor(after);
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut params = filter.params();
    params.extend([&after_at as &(dyn ToSql + Sync), &after_id, &limit, &clear_errors]);
    let rows = client.query(replay_batch_sql().as_str(), &params).await?;
    rows.iter()
        .map(|row| {
            Ok(ReplayedEvent {
                id: row.try_get(0)?,
                source: row.try_get(1)?,
                action: row.try_get(2)?,
                created_at: row.try_get(3)?,
            })
        })
        .collect()
}

/// Counts the events matching `filter` after `after` and up to `upto` (to the end when `None`).
pub async fn count_matching_in_range(
    client: &impl GenericClient,
    filter: &ReplayFilter,
    after: Option<(OffsetDateTime, Uuid)>,
    upto: Option<(OffsetDateTime, Uuid)>,
) -> Result<u64, StoreError> {
    let filter = FilterParams::new(filter);
    let (after_at, after_id) = split_cursor(after);
    let (upto_at, upto_id) = split_cursor(upto);
    let mut params = filter.params();
    params.extend([&after_at as &(dyn ToSql + Sync), &after_id, &upto_at, &upto_id]);
    let count: i64 = client.query_one(count_range_sql().as_str(), &params).await?.try_get(0)?;
    Ok(u64::try_from(count).unwrap_or(0))
}

/// Wakes idle processors (`NOTIFY hook_events`). Inside a transaction, sent at its commit.
pub async fn notify_processors(client: &impl GenericClient) -> Result<(), StoreError> {
    client.execute("SELECT pg_notify($1, '')", &[&crate::CHANNEL]).await?;
    Ok(())
}

/// Re-queues every event `filter` selects, batch by batch (see the module docs), calling
/// `on_batch` after each committed batch; returning `ControlFlow::Break` stops the run there
/// (what was committed stays). Safe while processors run: held events are skipped and counted.
pub async fn replay(
    client: &mut deadpool_postgres::Client,
    filter: &ReplayFilter,
    options: &ReplayOptions,
    mut on_batch: impl FnMut(&ReplayBatch) -> ControlFlow<()>,
) -> Result<ReplayReport, StoreError> {
    let limit = options.batch_size.max(1);
    let mut report = ReplayReport::default();
    let mut cursor: Cursor = None;
    loop {
        let tx = client.transaction().await?;
        let replayed = replay_batch(&tx, filter, cursor, limit, options.clear_errors).await?;
        // A short batch reached the end of the selection; a full one ends at its last row.
        let upto =
            if replayed.len() < limit { None } else { replayed.iter().map(|e| (e.created_at, e.id)).max() };
        let skipped_held = count_matching_in_range(&tx, filter, cursor, upto).await?;
        if !replayed.is_empty() {
            notify_processors(&tx).await?;
        }
        tx.commit().await?;

        let batch = ReplayBatch { replayed, skipped_held };
        if !batch.replayed.is_empty() {
            report.batches += 1;
        }
        report.replayed += batch.replayed.len() as u64;
        report.skipped_held += batch.skipped_held;
        for event in &batch.replayed {
            *report.by_kind.entry((event.source.clone(), event.action.clone())).or_default() += 1;
        }
        let flow = on_batch(&batch);
        match upto {
            None => break,
            Some(last) => cursor = Some(last),
        }
        if flow.is_break() {
            report.stopped = true;
            break;
        }
    }
    Ok(report)
}
