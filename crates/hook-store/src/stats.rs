//! The operator's questions about the queue, one query each: how deep is it ([`queue_depth`]),
//! how many events were processed lately and how well ([`processed_since`]), how long the slow
//! ones took ([`p95_latency`]), what is failing ([`errors_by_route`]), and is the database there
//! at all ([`ping`]). `hook-processor stats` prints them as one report; the processor's
//! `/metrics` gauges come from [`queue_depth`].
//!
//! Each query reads only what an index narrows down, so the report stays fast on a table of
//! millions of rows:
//! - [`queue_depth`] counts index entries only (index-only scans): pending events in
//!   `hook_events_claim_idx`, retrying ones in `hook_events_retried_idx`, waiting ones in
//!   `hook_events_due_idx`, dead ones in `hook_events_dead_idx` (migration 0014), so a pile of
//!   dead events costs its index entries, not its rows;
//! - [`processed_since`] reads the rows processed in the window, through
//!   `hook_events_archive_idx (processed_at) WHERE processed` (a plain aggregate, so a window
//!   spanning most of the table is read by parallel workers);
//! - [`p95_latency`] reads at most the latest `n` of them, newest first through the same index,
//!   and sorts only those: a percentile needs a sort, and sorting a million values costs seconds;
//! - [`errors_by_route`] reads the index entries of the failed rows it counts (dead in the
//!   window from `hook_events_dead_idx`; retrying, and processed in the window after a failure,
//!   from `hook_events_retried_idx`), and one row per route shown for its latest error;
//! - [`errors_by_sink`] (which sinks of a routes file failed, from `result_metadata`) reads the
//!   rows that failed and are not processed, through
//!   `idx_hook_events_retry (retry_count, created_at) WHERE retry_count > 0`.
//!
//! Windows are counted back from the database's clock (`now()`), like everything else the
//! processor schedules.

use std::time::Duration;

use deadpool_postgres::GenericClient;
use time::OffsetDateTime;

use crate::error::StoreError;

const PING: &str = "SELECT 1";

const STATEMENT_TIMEOUT: &str = "SELECT set_config('statement_timeout', $1::int8::text, false)";

/// Pending (alive), retrying, waiting and dead counts, deaths within the window (`$1`,
/// microseconds), and the age of the oldest pending event: each an index-only count of the index
/// that holds exactly those rows (`hook_events_claim_idx`, `hook_events_retried_idx`,
/// `hook_events_due_idx`, `hook_events_dead_idx`), so that dead events piling up over months
/// cost their index entries, not their rows.
pub const QUEUE_DEPTH: &str = "SELECT \
         (SELECT count(*) FROM hook_events WHERE NOT processed AND dead_at IS NULL), \
         (SELECT count(*) FROM hook_events WHERE NOT processed AND dead_at IS NULL AND retry_count > 0), \
         (SELECT count(*) FROM hook_events WHERE NOT processed AND dead_at IS NULL \
                                             AND next_attempt_at IS NOT NULL AND next_attempt_at > now()), \
         (SELECT count(*) FROM hook_events WHERE NOT processed AND dead_at IS NOT NULL), \
         (SELECT count(*) FROM hook_events WHERE NOT processed AND dead_at IS NOT NULL \
                                             AND dead_at >= now() - $1::int8 * interval '1 microsecond'), \
         date_part('epoch', now() - (SELECT min(created_at) FROM hook_events WHERE NOT processed AND dead_at IS NULL))";

/// Events processed in the window (`$1`, microseconds back from now): count, count that needed
/// retries, mean and max of `processed_at - created_at` in seconds. `date_part` (float8) rather
/// than `extract` (numeric): numeric arithmetic over a million rows costs seconds.
pub const PROCESSED_SINCE: &str = "SELECT count(*), count(*) FILTER (WHERE retry_count > 0), avg(l), max(l) \
     FROM ( \
         SELECT date_part('epoch', processed_at - created_at) AS l, retry_count \
         FROM hook_events \
         WHERE processed AND processed_at >= now() - $1::int8 * interval '1 microsecond' \
     ) AS w";

/// The 95th percentile (`percentile_disc`) of `processed_at - created_at` over the latest `$2`
/// events processed in the window (`$1`, microseconds), and how many that were.
pub const P95_LATENCY: &str = "SELECT percentile_disc(0.95) WITHIN GROUP (ORDER BY l), count(*) \
     FROM ( \
         SELECT date_part('epoch', processed_at - created_at) AS l \
         FROM hook_events \
         WHERE processed AND processed_at >= now() - $1::int8 * interval '1 microsecond' \
         ORDER BY processed_at DESC \
         LIMIT $2 \
     ) AS w";

/// Events that failed at least once and are still pending, or were processed or died in the
/// window (`$1`, microseconds), grouped by route, at most `$2` routes. "Latest" is the event with
/// the most recent activity (death, next attempt, processing, creation).
///
/// The three parts are index-only ranges of the failed rows' indexes (`hook_events_dead_idx`
/// from the window's start, `hook_events_retried_idx` for the retrying and for the window's
/// processed ones), whose entries carry the route, the attempts, the activity and the id; only
/// the latest event of each route shown is read from the table, for its last error. The
/// counts are a plain (hashed) aggregate and the latest event is found by joining the routes
/// shown back to their latest activity, so no sort of all the failures is needed.
pub const ERRORS_BY_ROUTE: &str = "WITH f AS ( \
         SELECT source, action, retry_count, 1 AS dead, 0 AS retrying, 0 AS recovered, dead_at AS at, id \
         FROM hook_events \
         WHERE NOT processed AND dead_at IS NOT NULL AND retry_count > 0 \
           AND dead_at >= now() - $1::int8 * interval '1 microsecond' \
         UNION ALL \
         SELECT source, action, retry_count, 0, 1, 0, coalesce(next_attempt_at, created_at), id \
         FROM hook_events \
         WHERE NOT processed AND dead_at IS NULL AND retry_count > 0 \
         UNION ALL \
         SELECT source, action, retry_count, 0, 0, 1, processed_at, id \
         FROM hook_events \
         WHERE processed AND dead_at IS NULL AND retry_count > 0 \
           AND processed_at >= now() - $1::int8 * interval '1 microsecond'), \
     g AS ( \
         SELECT source, action, count(*) AS events, sum(retry_count)::int8 AS attempts, \
                sum(dead)::int8 AS dead, sum(retrying)::int8 AS retrying, sum(recovered)::int8 AS recovered, \
                max(at) AS at \
         FROM f \
         GROUP BY source, action \
         ORDER BY count(*) DESC, source, action \
         LIMIT $2), \
     latest AS ( \
         SELECT DISTINCT ON (g.source, g.action) g.*, f.id \
         FROM g JOIN f ON f.source = g.source AND f.action = g.action AND f.at = g.at \
         ORDER BY g.source, g.action, f.id) \
     SELECT l.source, l.action, l.events, l.attempts, l.dead, l.retrying, l.recovered, \
            (SELECT e.processing_errors[cardinality(e.processing_errors)] FROM hook_events AS e WHERE e.id = l.id), \
            l.at \
     FROM latest AS l \
     ORDER BY l.events DESC, l.source, l.action";

/// Sinks (of a routes file, see hook-sinks) whose latest delivery failed, from
/// `result_metadata->'sinks'`: events still pending after a failure, or dead within the window
/// (`$1`, microseconds), counted per sink whose entry says `"ok": false`, at most `$2` sinks.
/// Read through `idx_hook_events_retry` (every failed event has `retry_count > 0`).
pub const ERRORS_BY_SINK: &str = "SELECT s.key, max(s.value->>'type'), count(*), \
         count(*) FILTER (WHERE e.dead_at IS NOT NULL), \
         count(*) FILTER (WHERE e.dead_at IS NULL), \
         (array_agg(s.value->>'error' ORDER BY coalesce(e.dead_at, e.next_attempt_at, e.created_at) DESC))[1], \
         max(coalesce(e.dead_at, e.next_attempt_at, e.created_at)) \
     FROM hook_events AS e \
     CROSS JOIN LATERAL jsonb_each(CASE WHEN jsonb_typeof(e.result_metadata->'sinks') = 'object' \
                                        THEN e.result_metadata->'sinks' ELSE '{}'::jsonb END) AS s(key, value) \
     WHERE e.retry_count > 0 AND NOT e.processed \
       AND (e.dead_at IS NULL OR e.dead_at >= now() - $1::int8 * interval '1 microsecond') \
       AND s.value->>'ok' = 'false' \
     GROUP BY s.key \
     ORDER BY count(*) DESC, s.key \
     LIMIT $2";

/// The queue right now.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct QueueDepth {
    /// Events neither processed nor dead: eligible now or waiting for a retry.
    pub pending: u64,
    /// Pending events that failed at least once.
    pub retrying: u64,
    /// Pending events whose next attempt is scheduled in the future (backoff).
    pub waiting: u64,
    /// Events that reached the retry limit (`dead_at` set) and are not processed.
    pub dead: u64,
    /// Dead events that died within the window asked for.
    pub died_in_window: u64,
    /// Age of the oldest pending event; `None` when nothing is pending.
    pub oldest_pending: Option<Duration>,
}

/// Events processed within a window: how many, how many needed retries, and how long they took
/// from `created_at` to `processed_at`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ProcessedWindow {
    /// Events processed in the window.
    pub processed: u64,
    /// Of those, events that failed at least once first (the original's error-rate numerator).
    pub with_retries: u64,
    /// Mean latency; `None` when nothing was processed.
    pub avg: Option<Duration>,
    /// Longest latency; `None` when nothing was processed.
    pub max: Option<Duration>,
}

impl ProcessedWindow {
    /// `with_retries / processed`, the original's error rate; `None` when nothing was processed.
    pub fn error_rate(&self) -> Option<f64> {
        (self.processed > 0).then(|| self.with_retries as f64 / self.processed as f64)
    }
}

/// The 95th percentile latency of the latest events of a window.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Percentile {
    /// The value (`percentile_disc`: one of the measured latencies); `None` when nothing was
    /// processed.
    pub p95: Option<Duration>,
    /// How many events it was taken over: all of the window's, or the latest `n`.
    pub of: u64,
}

/// The failures of one `(source, action)` route.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteErrors {
    /// The events' source.
    pub source: String,
    /// The events' action.
    pub action: String,
    /// Events that failed at least once (pending, processed in the window, or died in it).
    pub events: u64,
    /// Their failed attempts, in all.
    pub failed_attempts: u64,
    /// Of them, dead.
    pub dead: u64,
    /// Of them, still pending (will be retried).
    pub retrying: u64,
    /// Of them, processed after all.
    pub recovered: u64,
    /// The last error of the event with the most recent activity.
    pub latest_error: Option<String>,
    /// That activity's time (death, next attempt, processing or creation).
    pub latest_at: Option<OffsetDateTime>,
}

/// A sink whose latest delivery failed for some events (see [`errors_by_sink`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SinkErrors {
    /// The sink's name in the routes file.
    pub sink: String,
    /// Its type (`webhook`, `command`, `nats`).
    pub kind: Option<String>,
    /// Events whose latest attempt failed at this sink: still pending, or dead in the window.
    pub events: u64,
    /// Of them, dead.
    pub dead: u64,
    /// Of them, waiting for a retry.
    pub retrying: u64,
    /// The sink's error of the event with the most recent activity.
    pub latest_error: Option<String>,
    /// That activity's time (death, next attempt or creation).
    pub latest_at: Option<OffsetDateTime>,
}

fn count(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn micros(window: Duration) -> i64 {
    i64::try_from(window.as_micros()).unwrap_or(i64::MAX)
}

fn seconds(value: f64) -> Option<Duration> {
    Duration::try_from_secs_f64(value.max(0.0)).ok()
}

/// `SELECT 1`: whether the database answers.
pub async fn ping(client: &impl GenericClient) -> Result<(), StoreError> {
    client.query_one(PING, &[]).await?;
    Ok(())
}

/// Bounds every later statement of this session to `limit` (`statement_timeout`), so a report
/// can never load the database for long. Zero removes the bound.
pub async fn limit_statement_time(client: &impl GenericClient, limit: Duration) -> Result<(), StoreError> {
    let ms = i64::try_from(limit.as_millis()).unwrap_or(i64::MAX);
    client.query_one(STATEMENT_TIMEOUT, &[&ms]).await?;
    Ok(())
}

/// The queue right now; [`QueueDepth::died_in_window`] counts deaths within `window`.
pub async fn queue_depth(client: &impl GenericClient, window: Duration) -> Result<QueueDepth, StoreError> {
    let row = client.query_one(QUEUE_DEPTH, &[&micros(window)]).await?;
    let oldest: Option<f64> = row.try_get(5)?;
    Ok(QueueDepth {
        pending: count(row.try_get(0)?),
        retrying: count(row.try_get(1)?),
        waiting: count(row.try_get(2)?),
        dead: count(row.try_get(3)?),
        died_in_window: count(row.try_get(4)?),
        oldest_pending: oldest.and_then(seconds),
    })
}

/// Events processed within the last `window`.
pub async fn processed_since(
    client: &impl GenericClient,
    window: Duration,
) -> Result<ProcessedWindow, StoreError> {
    let row = client.query_one(PROCESSED_SINCE, &[&micros(window)]).await?;
    let avg: Option<f64> = row.try_get(2)?;
    let max: Option<f64> = row.try_get(3)?;
    Ok(ProcessedWindow {
        processed: count(row.try_get(0)?),
        with_retries: count(row.try_get(1)?),
        avg: avg.and_then(seconds),
        max: max.and_then(seconds),
    })
}

/// The 95th percentile latency over the latest `latest` events processed within `window` (all
/// of them when there are fewer). Bounded work whatever the window: the newest events come first
/// from the index, and only those are sorted.
pub async fn p95_latency(
    client: &impl GenericClient,
    window: Duration,
    latest: u64,
) -> Result<Percentile, StoreError> {
    let limit = i64::try_from(latest).unwrap_or(i64::MAX);
    let row = client.query_one(P95_LATENCY, &[&micros(window), &limit]).await?;
    let p95: Option<f64> = row.try_get(0)?;
    Ok(Percentile { p95: p95.and_then(seconds), of: count(row.try_get(1)?) })
}

/// Failures by route (see [`RouteErrors`]), most failing events first, at most `limit` routes.
pub async fn errors_by_route(
    client: &impl GenericClient,
    window: Duration,
    limit: usize,
) -> Result<Vec<RouteErrors>, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = client.query(ERRORS_BY_ROUTE, &[&micros(window), &limit]).await?;
    rows.iter()
        .map(|row| {
            Ok(RouteErrors {
                source: row.try_get(0)?,
                action: row.try_get(1)?,
                events: count(row.try_get(2)?),
                failed_attempts: count(row.try_get(3)?),
                dead: count(row.try_get(4)?),
                retrying: count(row.try_get(5)?),
                recovered: count(row.try_get(6)?),
                latest_error: row.try_get(7)?,
                latest_at: row.try_get(8)?,
            })
        })
        .collect()
}

/// Sinks whose latest delivery failed, most failing events first, at most `limit` sinks.
pub async fn errors_by_sink(
    client: &impl GenericClient,
    window: Duration,
    limit: usize,
) -> Result<Vec<SinkErrors>, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = client.query(ERRORS_BY_SINK, &[&micros(window), &limit]).await?;
    rows.iter()
        .map(|row| {
            Ok(SinkErrors {
                sink: row.try_get(0)?,
                kind: row.try_get(1)?,
                events: count(row.try_get(2)?),
                dead: count(row.try_get(3)?),
                retrying: count(row.try_get(4)?),
                latest_error: row.try_get(5)?,
                latest_at: row.try_get(6)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_rate_and_conversions() {
        assert_eq!(ProcessedWindow::default().error_rate(), None);
        let window = ProcessedWindow { processed: 4, with_retries: 1, ..ProcessedWindow::default() };
        assert_eq!(window.error_rate(), Some(0.25));
        assert_eq!(seconds(-1.0), Some(Duration::ZERO), "clock noise never goes negative");
        assert_eq!(micros(Duration::from_secs(3600)), 3_600_000_000);
        assert_eq!(count(-5), 0);
    }
}
