//! The processor's hot queries. Every SQL text of the claim path lives here.

use std::time::Duration;

use deadpool_postgres::GenericClient;
use hook_core::{HookEvent, Outcome, Resolution};
use serde_json::Value;
use tokio_postgres::Row;
use tracing::warn;
use uuid::Uuid;

use crate::error::StoreError;

/// The columns of a [`HookEvent`], in the order [`event_from_row`] reads them.
macro_rules! event_columns {
    () => {
        "id, source, action, resource, resource_id, payload, metadata, \
         processed, processing_errors, retry_count, created_at, processed_at"
    };
}
#[cfg_attr(not(feature = "bench"), allow(unused_imports))]
pub(crate) use event_columns;

/// Locks up to `$1` live events that are due, oldest first, skipping rows another claim holds.
/// The locks last until the claiming transaction ends; that transaction is the claim.
///
/// Rows whose `retry_count` is already at the limit are claimed too, and set aside as dead by
/// [`claim_events`]: left out here they would never be decided, and would lie at the head of
/// the claim index for every claim to step over.
const CLAIM: &str = concat!(
    "SELECT ",
    event_columns!(),
    " FROM hook_events \
     WHERE NOT processed AND dead_at IS NULL \
       AND (next_attempt_at IS NULL OR next_attempt_at <= now()) \
     ORDER BY created_at \
     LIMIT $1 \
     FOR UPDATE SKIP LOCKED"
);

/// Marks claimed rows that cannot be attempted dead, recording why.
const SET_ASIDE: &str = "UPDATE hook_events AS e \
     SET dead_at = now(), next_attempt_at = NULL, \
         processing_errors = array_append(e.processing_errors, r.reason) \
     FROM unnest($1::uuid[], $2::text[]) AS r(id, reason) \
     WHERE e.id = r.id";

/// Marks events processed. `processed_at` is when the outcome is written (`clock_timestamp()`,
/// not the claim transaction's start, `now()`, which is before the handler ran), as in the
/// original, which set it in its own transaction after the handler. `GREATEST` keeps the table's
/// `processed_at >= created_at` check true when a producer's clock ran ahead of the database's.
const SUCCEED: &str = "UPDATE hook_events AS e \
     SET processed = TRUE, processed_at = GREATEST(clock_timestamp(), e.created_at), \
         result_metadata = r.metadata, next_attempt_at = NULL, dead_at = NULL \
     FROM unnest($1::uuid[], $2::jsonb[]) AS r(id, metadata) \
     WHERE e.id = r.id AND NOT e.processed";

/// Counts a failed attempt, appends its error and schedules the next attempt (or marks it dead).
/// The delay counts from when the failure is written (`clock_timestamp()`), not from the claim's
/// start (`now()`), so a retry never comes earlier than the policy says.
const FAIL: &str = "UPDATE hook_events AS e \
     SET retry_count = LEAST(e.retry_count + 1, 10), \
         processing_errors = array_append(e.processing_errors, r.error), \
         result_metadata = r.metadata, \
         next_attempt_at = CASE WHEN r.dead THEN NULL ELSE clock_timestamp() + r.delay_ms * interval '1 millisecond' END, \
         dead_at = CASE WHEN r.dead THEN clock_timestamp() END \
     FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::int8[], $5::bool[]) AS r(id, error, metadata, delay_ms, dead) \
     WHERE e.id = r.id AND NOT e.processed";

/// Decodes one `hook_events` row selected in the column order of [`HookEvent`]. Tolerates NULL elements in
/// `processing_errors` (a hand-written row may hold them), so no row can wedge the claim loop.
pub(crate) fn event_from_row(row: &Row) -> Result<HookEvent, StoreError> {
    let errors: Option<Vec<Option<String>>> = row.try_get(8)?;
    Ok(HookEvent {
        id: row.try_get(0)?,
        source: row.try_get(1)?,
        action: row.try_get(2)?,
        resource: row.try_get(3)?,
        resource_id: row.try_get(4)?,
        payload: row.try_get(5)?,
        metadata: row.try_get(6)?,
        processed: row.try_get(7)?,
        processing_errors: errors.map(|e| e.into_iter().flatten().collect()),
        retry_count: row.try_get(9)?,
        created_at: row.try_get(10)?,
        processed_at: row.try_get(11)?,
    })
}

/// What one claim took: the events to attempt, and how many rows it set aside instead.
#[derive(Debug, Default)]
pub struct Claimed {
    /// The events to hand to handlers, oldest first.
    pub events: Vec<HookEvent>,
    /// Rows the claim took but marked dead instead of returning (see [`claim_events`]). They
    /// count toward the claim's `limit`: when `events.len() + set_aside` reaches it, more rows
    /// may be waiting.
    pub set_aside: usize,
}

/// Claims up to `limit` eligible rows with `FOR UPDATE SKIP LOCKED`. Must run inside a
/// transaction, which then holds the claim.
///
/// Claimed rows that cannot be attempted are set aside as dead in the same transaction, with
/// the reason appended to `processing_errors`, and not returned: rows this build cannot decode,
/// and rows whose `retry_count` is already `max_retry_count` or more (inserted that way, left by
/// the original service, or by a processor with a higher limit).
pub async fn claim_events(
    client: &impl GenericClient,
    limit: usize,
    max_retry_count: u32,
) -> Result<Claimed, StoreError> {
    let statement = client.prepare_cached(CLAIM).await?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = client.query(&statement, &[&limit]).await?;
    let mut events = Vec::with_capacity(rows.len());
    let (mut set_aside, mut reasons) = (Vec::new(), Vec::new());
    for row in &rows {
        let (id, reason) = match event_from_row(row) {
            Ok(event) if u32::try_from(event.retry_count).unwrap_or(u32::MAX) < max_retry_count => {
                events.push(event);
                continue;
            }
            Ok(event) => (
                event.id,
                format!(
                    "retry_count {} is at MAX_RETRY_COUNT ({max_retry_count}) or past it before an attempt; \
                     set aside as dead",
                    event.retry_count
                ),
            ),
            // A row this build cannot represent (jsonb nested deeper than serde_json's limit,
            // a created_at of 'infinity', ...) would otherwise stay first in line and fail
            // every claim.
            Err(error) => {
                // A column of another type fails every row alike: stop claiming and name it,
                // rather than set the table aside row by row (see crate::schema).
                if let Some(mismatch) = crate::schema::type_mismatch(row, &error) {
                    return Err(mismatch);
                }
                let id: Uuid = row.try_get(0)?;
                warn!(event_id = %id, error = %error, "claimed a row that cannot be decoded; setting it aside as dead");
                (id, format!("undecodable row, set aside as dead: {error}"))
            }
        };
        set_aside.push(id);
        reasons.push(hook_core::bound_text(&reason));
    }
    if !set_aside.is_empty() {
        // One line per claim, not per row: after an upgrade a claim may meet thousands of rows
        // the original left at the limit. Each row's reason is in its processing_errors.
        warn!(rows = set_aside.len(), first = %set_aside[0], reason = %reasons[0], "set aside rows that cannot be attempted");
        let statement = client.prepare_cached(SET_ASIDE).await?;
        client.execute(&statement, &[&set_aside, &reasons]).await?;
    }
    Ok(Claimed { events, set_aside: set_aside.len() })
}

/// The parameters of the two completion statements, split from a batch of outcomes.
#[derive(Debug, Default)]
pub(crate) struct Completion {
    ok_ids: Vec<Uuid>,
    ok_metadata: Vec<Value>,
    failed_ids: Vec<Uuid>,
    errors: Vec<String>,
    failed_metadata: Vec<Value>,
    delays_ms: Vec<i64>,
    dead: Vec<bool>,
}

impl Completion {
    pub(crate) fn new(outcomes: Vec<Outcome>) -> Self {
        let mut c = Completion::default();
        for Outcome { id, resolution, metadata } in outcomes {
            match resolution {
                Resolution::Succeeded => {
                    c.ok_ids.push(id);
                    c.ok_metadata.push(Value::Object(metadata));
                }
                Resolution::Failed { error, retry_after } => {
                    c.failed_ids.push(id);
                    c.errors.push(error);
                    c.failed_metadata.push(Value::Object(metadata));
                    c.delays_ms.push(retry_after.map_or(0, duration_ms));
                    c.dead.push(retry_after.is_none());
                }
            }
        }
        c
    }

    pub(crate) fn len(&self) -> usize {
        self.ok_ids.len() + self.failed_ids.len()
    }
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Writes a batch of outcomes and commits the claim's transaction: one statement for the
/// successes, one for the failures, and COMMIT, pipelined into one round trip.
///
/// The statements are prepared first, on purpose. A statement still being prepared is sent only
/// after its Parse round trip, so COMMIT would overtake it and the update would run after the
/// claim's locks were released, unfenced. Executes of prepared statements go out on their first
/// poll, and `join!` polls in order, so the server sees the updates before COMMIT. If an update
/// fails, the transaction is aborted and COMMIT rolls it back: nothing is written.
pub(crate) async fn record_outcomes_and_commit(
    client: &impl GenericClient,
    c: &Completion,
) -> Result<u64, StoreError> {
    let succeed_statement = client.prepare_cached(SUCCEED).await?;
    let fail_statement = client.prepare_cached(FAIL).await?;
    let succeed = async {
        if c.ok_ids.is_empty() {
            return Ok(0);
        }
        client.execute(&succeed_statement, &[&c.ok_ids, &c.ok_metadata]).await
    };
    let fail = async {
        if c.failed_ids.is_empty() {
            return Ok(0);
        }
        client
            .execute(&fail_statement, &[&c.failed_ids, &c.errors, &c.failed_metadata, &c.delays_ms, &c.dead])
            .await
    };
    let (succeeded, failed, committed) = futures::join!(succeed, fail, client.batch_execute("COMMIT"));
    let written = succeeded? + failed?;
    committed?;
    Ok(written)
}
