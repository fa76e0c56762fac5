//! The queries behind `hook-processor stats` and the queue-depth gauges, on a table whose every
//! row is known: each number of the report is checked, and each query is checked to be served by
//! the index it was written for.

use std::time::Duration;

use hook_store::stats::{self, ERRORS_BY_ROUTE, P95_LATENCY, PROCESSED_SINCE, QUEUE_DEPTH};
use hook_store::testing::TestDb;
use hook_store::{PgStore, StoreOptions};

const HOUR: Duration = Duration::from_secs(3600);

/// One row per line: (source, action, retry_count, errors, created ago, processed after creation,
/// next attempt from now, dead ago), times in seconds.
const ROWS: &str = "
    INSERT INTO hook_events (id, source, action, resource, resource_id, payload, processed, retry_count,
                             processing_errors, created_at, processed_at, next_attempt_at, dead_at)
    SELECT gen_random_uuid(), source, action, 'r', 'r1', '{}', processed_after IS NOT NULL, retry_count,
           errors, now() - created_ago * interval '1 second',
           now() - created_ago * interval '1 second' + processed_after * interval '1 second',
           now() + next_attempt_in * interval '1 second',
           now() - dead_ago * interval '1 second'
    FROM (VALUES
        -- processed in the last hour, 1 s, 2 s, 3 s and 100 s after creation; one needed a retry
        ('PreToolUse',  'tool_invocation', 0, NULL::text[], 600, 1.0, NULL::float8, NULL::float8),
        ('PreToolUse',  'tool_invocation', 0, NULL, 600, 2.0, NULL, NULL),
        ('PreToolUse',  'tool_invocation', 1, ARRAY['first try failed'], 600, 3.0, NULL, NULL),
        ('Stop',        'session_stopped', 0, NULL, 600, 100.0, NULL, NULL),
        -- processed two hours ago: outside the window
        ('Stop',        'session_stopped', 2, ARRAY['old', 'older'], 7200, 50.0, NULL, NULL),
        -- pending: eligible; failed once and waiting an hour; failed twice and due
        ('SessionEnd',  'session_ended',   0, NULL, 1200, NULL, NULL, NULL),
        ('PostToolUse', 'tool_completion', 1, ARRAY['boom 1'], 300, NULL, 3600, NULL),
        ('PostToolUse', 'tool_completion', 2, ARRAY['boom 1', 'boom 2'], 300, NULL, -1, NULL),
        -- dead five minutes ago, and three hours ago
        ('PostToolUse', 'tool_completion', 3, ARRAY['a', 'b', 'final'], 900, NULL, NULL, 300),
        ('Stop',        'session_stopped', 3, ARRAY['x', 'y', 'z'], 20000, NULL, NULL, 10800)
    ) AS t(source, action, retry_count, errors, created_ago, processed_after, next_attempt_in, dead_ago)";

async fn seeded(test: &str) -> (TestDb, PgStore) {
    let db = TestDb::migrated(test).await;
    db.client().await.batch_execute(ROWS).await.expect("insert the known rows");
    let store = db.store(StoreOptions { listen: false, ..StoreOptions::default() }).await;
    (db, store)
}

fn close(got: Option<Duration>, want_s: f64, tolerance: f64) -> bool {
    got.is_some_and(|d| (d.as_secs_f64() - want_s).abs() <= tolerance)
}

#[tokio::test]
async fn queue_depth_counts_pending_retrying_waiting_and_dead() {
    let (_db, store) = seeded("stats_queue_depth").await;
    let client = store.pool().get().await.unwrap();
    let depth = stats::queue_depth(&client, HOUR).await.unwrap();
    assert_eq!(
        (depth.pending, depth.retrying, depth.waiting, depth.dead, depth.died_in_window),
        (3, 2, 1, 2, 1),
        "{depth:?}"
    );
    assert!(close(depth.oldest_pending, 1200.0, 30.0), "{depth:?}");

    let empty = TestDb::migrated("stats_queue_depth_empty").await;
    let store = empty.store(StoreOptions { listen: false, ..StoreOptions::default() }).await;
    let depth = stats::queue_depth(&store.pool().get().await.unwrap(), HOUR).await.unwrap();
    assert_eq!(depth, stats::QueueDepth::default());
}

#[tokio::test]
async fn processed_since_gives_counts_error_rate_and_latencies_of_the_window() {
    let (_db, store) = seeded("stats_processed").await;
    let client = store.pool().get().await.unwrap();
    let window = stats::processed_since(&client, HOUR).await.unwrap();
    assert_eq!((window.processed, window.with_retries), (4, 1), "{window:?}");
    assert_eq!(window.error_rate(), Some(0.25));
    assert!(close(window.avg, 26.5, 0.001), "{window:?}");
    assert!(close(window.max, 100.0, 0.001), "{window:?}");

    let wider = stats::processed_since(&client, 3 * HOUR).await.unwrap();
    assert_eq!((wider.processed, wider.with_retries), (5, 2), "{wider:?}");
    let none = stats::processed_since(&client, Duration::from_secs(1)).await.unwrap();
    assert_eq!(none, stats::ProcessedWindow::default());
}

#[tokio::test]
async fn p95_is_taken_over_the_latest_events_of_the_window() {
    let (db, store) = seeded("stats_p95").await;
    let client = store.pool().get().await.unwrap();
    // 1 s, 2 s, 3 s, 100 s: with four values the 95th percentile (percentile_disc) is the largest.
    let all = stats::p95_latency(&client, HOUR, 100_000).await.unwrap();
    assert_eq!(all.of, 4);
    assert!(close(all.p95, 100.0, 0.001), "{all:?}");
    // 100 latencies of 1..=100 ms processed in the last 10 s, the newest the fastest: over the
    // latest 20 (1..=20 ms) the p95 is 19 ms; over all 105 events of the 3 h window (those, the
    // five seeded ones of 1 s to 100 s) it is the 100th value, 100 ms.
    db.client()
        .await
        .batch_execute(
            "INSERT INTO hook_events (id, source, action, resource, resource_id, payload, processed, created_at, processed_at)
             SELECT gen_random_uuid(), 'PreToolUse', 'tool_invocation', 'r', 'r1', '{}', true,
                    now() - i * interval '100 milliseconds' - i * interval '1 millisecond',
                    now() - i * interval '100 milliseconds'
             FROM generate_series(1, 100) AS i",
        )
        .await
        .unwrap();
    let latest = stats::p95_latency(&client, 3 * HOUR, 20).await.unwrap();
    assert_eq!(latest.of, 20);
    assert!(close(latest.p95, 0.019, 0.0001), "{latest:?}");
    let window = stats::p95_latency(&client, 3 * HOUR, 100_000).await.unwrap();
    assert_eq!(window.of, 105);
    assert!(close(window.p95, 0.100, 0.0001), "{window:?}");
    let none = stats::p95_latency(&client, Duration::from_millis(50), 10).await.unwrap();
    assert_eq!(none, stats::Percentile::default());
}

#[tokio::test]
async fn errors_by_route_groups_live_failures_with_their_latest_error() {
    let (_db, store) = seeded("stats_errors").await;
    let client = store.pool().get().await.unwrap();
    let routes = stats::errors_by_route(&client, HOUR, 10).await.unwrap();
    let summary: Vec<_> = routes
        .iter()
        .map(|r| {
            (
                r.source.as_str(),
                r.action.as_str(),
                r.events,
                r.failed_attempts,
                r.dead,
                r.retrying,
                r.recovered,
                r.latest_error.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            // the waiting retry is the most recent activity (its next attempt is in an hour)
            ("PostToolUse", "tool_completion", 3, 6, 1, 2, 0, Some("boom 1")),
            ("PreToolUse", "tool_invocation", 1, 1, 0, 0, 1, Some("first try failed")),
        ]
    );
    assert_eq!(stats::errors_by_route(&client, HOUR, 1).await.unwrap().len(), 1);
}

#[tokio::test]
async fn ping_and_statement_limit() {
    let (_db, store) = seeded("stats_ping").await;
    let client = store.pool().get().await.unwrap();
    stats::ping(&client).await.unwrap();
    stats::limit_statement_time(&client, Duration::from_millis(50)).await.unwrap();
    let slow = client.simple_query("SELECT pg_sleep(1)").await;
    assert!(slow.is_err(), "statement_timeout applies");
}

/// Filler: processed events spread over a week, none failed, as most of a real table is.
const FILLER: &str = "
    INSERT INTO hook_events (id, source, action, resource, resource_id, payload, processed, created_at, processed_at)
    SELECT gen_random_uuid(), 'PreToolUse', 'tool_invocation', 'r', 'r1', '{}', true,
           now() - i * interval '30 seconds', now() - i * interval '30 seconds' + interval '5 milliseconds'
    FROM generate_series(1, 20000) AS i";

/// Each query must be served by its index (the point of the design: a report on millions of rows
/// reads only the rows it needs), on a table shaped like a real one: mostly old processed events.
#[tokio::test]
async fn each_query_is_served_by_its_index() {
    let (db, _store) = seeded("stats_plans").await;
    let client = db.client().await;
    client.batch_execute(FILLER).await.unwrap();
    client.batch_execute("VACUUM ANALYZE hook_events").await.unwrap();
    let window = 3_600_000_000i64;
    let limit = 20i64;
    let cases: [(&str, &str, Vec<&(dyn tokio_postgres::types::ToSql + Sync)>); 4] = [
        (QUEUE_DEPTH, "Index Only Scan using hook_events_dead_idx", vec![&window]),
        (PROCESSED_SINCE, "hook_events_archive_idx", vec![&window]),
        (P95_LATENCY, "hook_events_archive_idx", vec![&window, &limit]),
        (ERRORS_BY_ROUTE, "Index Only Scan using hook_events_retried_idx", vec![&window, &limit]),
    ];
    for (query, index, params) in cases {
        let rows = client.query(&format!("EXPLAIN {query}"), &params).await.unwrap();
        let plan: Vec<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
        let plan = plan.join("\n");
        assert!(plan.contains(index), "{index} not used:\n{plan}");
        assert!(!plan.contains("Seq Scan on hook_events"), "sequential scan:\n{plan}");
    }
}
