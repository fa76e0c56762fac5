//! The operator's questions about the queue, one query each: how deep is it ([`queue_depth`]),
//! how fast and how well were events processed lately ([`processed_since`]), what is failing
//! ([`errors_by_route`]), and is the database there at all ([`ping`]). `hook-processor stats`
//! prints them as one report; the processor's `/metrics` gauges come from [`queue_depth`].
//!
//! Each query reads only what an index narrows down, so the report stays fast on a table of
//! millions of rows:
//! - [`queue_depth`] reads the unprocessed rows only, through `idx_hook_events_processed`
//!   (`WHERE NOT processed`);
//! - [`processed_since`] reads the rows processed in the window, through
//!   `hook_events_archive_idx (processed_at) WHERE processed`;
//! - [`errors_by_route`] reads the rows that ever failed, through
//!   `idx_hook_events_retry (retry_count, created_at) WHERE retry_count > 0`.
//!
//! Windows are counted back from the database's clock (`now()`), like everything else the
//! processor schedules.

use std::time::Duration;

use deadpool_postgres::GenericClient;
use time::OffsetDateTime;

use crate::error::StoreError;

/// Latency buckets per decade of [`processed_since`]'s histogram: neighbouring bounds differ by
/// 4.7%, which bounds the error of the p95 estimate.
pub const BUCKETS_PER_DECADE: u32 = 50;

/// Latencies below this (seconds) share one bucket.
const SMALLEST_BUCKET_S: f64 = 0.001;

const PING: &str = "SELECT 1";

const STATEMENT_TIMEOUT: &str = "SELECT set_config('statement_timeout', $1::int8::text, false)";

/// Pending (alive), retrying, waiting and dead counts, and the oldest pending event, in one pass
/// over the unprocessed rows.
pub const QUEUE_DEPTH: &str = "SELECT \
         count(*) FILTER (WHERE dead_at IS NULL), \
         count(*) FILTER (WHERE dead_at IS NULL AND retry_count > 0), \
         count(*) FILTER (WHERE dead_at IS NULL AND next_attempt_at > now()), \
         count(*) FILTER (WHERE dead_at IS NOT NULL), \
         count(*) FILTER (WHERE dead_at >= now() - $1::int8 * interval '1 microsecond'), \
         date_part('epoch', now() - min(created_at) FILTER (WHERE dead_at IS NULL)) \
     FROM hook_events \
     WHERE NOT processed";

/// A histogram of `processed_at - created_at` over the window: per bucket, the count, the count
/// that needed retries, the sum and the max. `date_part` (float8) rather than `extract` (numeric):
/// numeric arithmetic over a million rows costs seconds.
pub const PROCESSED_SINCE: &str = "SELECT \
         CASE WHEN l < $2::float8 THEN -1000 ELSE floor(log(l) * $3::int4)::int4 END AS bucket, \
         count(*), count(*) FILTER (WHERE retry_count > 0), sum(l), max(l) \
     FROM ( \
         SELECT date_part('epoch', processed_at - created_at) AS l, retry_count \
         FROM hook_events \
         WHERE processed AND processed_at >= now() - $1::int8 * interval '1 microsecond' \
     ) AS w \
     GROUP BY bucket";

/// Events that failed at least once and are still pending, or were processed or died in the
/// window, grouped by route. "Latest" is the event with the most recent activity (death, next
/// attempt, processing, creation).
pub const ERRORS_BY_ROUTE: &str = "SELECT source, action, count(*), sum(retry_count)::int8, \
         count(*) FILTER (WHERE dead_at IS NOT NULL), \
         count(*) FILTER (WHERE NOT processed AND dead_at IS NULL), \
         count(*) FILTER (WHERE processed), \
         (array_agg(processing_errors[cardinality(processing_errors)] \
              ORDER BY coalesce(dead_at, next_attempt_at, processed_at, created_at) DESC))[1], \
         max(coalesce(dead_at, next_attempt_at, processed_at, created_at)) \
     FROM hook_events \
     WHERE retry_count > 0 \
       AND ((NOT processed AND dead_at IS NULL) \
            OR processed_at >= now() - $1::int8 * interval '1 microsecond' \
            OR dead_at >= now() - $1::int8 * interval '1 microsecond') \
     GROUP BY source, action \
     ORDER BY count(*) DESC, source, action \
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
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProcessedWindow {
    /// Events processed in the window.
    pub processed: u64,
    /// Of those, events that failed at least once first (the original's error-rate numerator).
    pub with_retries: u64,
    /// Mean latency; `None` when nothing was processed.
    pub avg: Option<Duration>,
    /// 95th percentile latency, estimated from the histogram (within 4.7%); `None` when nothing
    /// was processed.
    pub p95: Option<Duration>,
    /// Longest latency; `None` when nothing was processed.
    pub max: Option<Duration>,
}

impl ProcessedWindow {
    /// `with_retries / processed`, the original's error rate; `None` when nothing was processed.
    pub fn error_rate(&self) -> Option<f64> {
        (self.processed > 0).then(|| self.with_retries as f64 / self.processed as f64)
    }
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
    let per_decade = i32::try_from(BUCKETS_PER_DECADE).unwrap_or(50);
    let rows = client.query(PROCESSED_SINCE, &[&micros(window), &SMALLEST_BUCKET_S, &per_decade]).await?;
    let mut buckets = Vec::with_capacity(rows.len());
    for row in &rows {
        let bucket: i32 = row.try_get(0)?;
        let n = count(row.try_get(1)?);
        let retried = count(row.try_get(2)?);
        let sum: f64 = row.try_get::<_, Option<f64>>(3)?.unwrap_or(0.0);
        let max: f64 = row.try_get::<_, Option<f64>>(4)?.unwrap_or(0.0);
        buckets.push(Bucket { index: bucket, count: n, with_retries: retried, sum, max });
    }
    Ok(summarize(buckets))
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

/// One bucket of the latency histogram.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// `floor(log10(latency) * BUCKETS_PER_DECADE)`, or -1000 for latencies below 1 ms.
    index: i32,
    count: u64,
    with_retries: u64,
    sum: f64,
    max: f64,
}

impl Bucket {
    /// The bucket's bounds in seconds.
    fn bounds(&self) -> (f64, f64) {
        if self.index == -1000 {
            return (0.0, SMALLEST_BUCKET_S);
        }
        let per = f64::from(BUCKETS_PER_DECADE);
        (10f64.powf(f64::from(self.index) / per), 10f64.powf(f64::from(self.index + 1) / per))
    }
}

/// Totals, mean and max exactly; the p95 by interpolating within the bucket where the
/// cumulative count crosses 95% (geometrically, as the buckets are), capped by the bucket's max.
fn summarize(mut buckets: Vec<Bucket>) -> ProcessedWindow {
    buckets.sort_by_key(|b| b.index);
    let processed: u64 = buckets.iter().map(|b| b.count).sum();
    if processed == 0 {
        return ProcessedWindow::default();
    }
    let with_retries = buckets.iter().map(|b| b.with_retries).sum();
    let sum: f64 = buckets.iter().map(|b| b.sum).sum();
    let max = buckets.iter().map(|b| b.max).fold(0.0, f64::max);
    // The rank of the 95th percentile, as percentile_disc counts it (1-based).
    let rank = ((processed as f64) * 0.95).ceil().max(1.0);
    let mut below = 0u64;
    let mut p95 = max;
    for bucket in &buckets {
        if (below + bucket.count) as f64 >= rank {
            let (low, high) = bucket.bounds();
            let fraction = (rank - below as f64) / bucket.count as f64;
            let estimate = if low <= 0.0 { high * fraction } else { low * (high / low).powf(fraction) };
            p95 = estimate.min(bucket.max);
            break;
        }
        below += bucket.count;
    }
    ProcessedWindow {
        processed,
        with_retries,
        avg: seconds(sum / processed as f64),
        p95: seconds(p95),
        max: seconds(max),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram(latencies: &[f64]) -> Vec<Bucket> {
        let per = f64::from(BUCKETS_PER_DECADE);
        let mut buckets: Vec<Bucket> = Vec::new();
        for &l in latencies {
            let index = if l < SMALLEST_BUCKET_S { -1000 } else { (l.log10() * per).floor() as i32 };
            match buckets.iter_mut().find(|b| b.index == index) {
                Some(b) => {
                    b.count += 1;
                    b.sum += l;
                    b.max = b.max.max(l);
                }
                None => buckets.push(Bucket { index, count: 1, with_retries: 0, sum: l, max: l }),
            }
        }
        buckets
    }

    #[test]
    fn p95_is_within_a_bucket_of_the_exact_value() {
        // 1..=1000 ms: the exact p95 (percentile_disc) is 950 ms.
        let latencies: Vec<f64> = (1..=1000).map(|ms| f64::from(ms) / 1000.0).collect();
        let summary = summarize(histogram(&latencies));
        assert_eq!(summary.processed, 1000);
        let p95 = summary.p95.unwrap().as_secs_f64();
        assert!((p95 - 0.95).abs() / 0.95 < 0.047, "{p95}");
        assert!((summary.avg.unwrap().as_secs_f64() - 0.5005).abs() < 1e-9);
        assert_eq!(summary.max.unwrap(), Duration::from_secs(1));
    }

    #[test]
    fn p95_never_exceeds_the_max_and_handles_tiny_latencies() {
        let summary = summarize(histogram(&[0.0, 0.0002, 0.0004, 0.0005]));
        assert!(summary.p95.unwrap() <= summary.max.unwrap());
        let one = summarize(histogram(&[2.5]));
        assert_eq!(one.p95, Some(Duration::from_secs_f64(2.5)));
        assert_eq!(summarize(Vec::new()), ProcessedWindow::default());
        assert_eq!(ProcessedWindow::default().error_rate(), None);
    }
}
