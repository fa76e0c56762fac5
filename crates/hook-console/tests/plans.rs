//! Every query of the console is served by an index: `EXPLAIN` on a table shaped like a real
//! one (a week of processed events in sessions, a few failures, a small backlog) never shows a
//! sequential scan of `hook_events`, and names the index each query was written for.

// Helpers of tests: a failed step is a failed test.
#![allow(clippy::unwrap_used)]

use hook_store::console::{self, Cursor, EventFilter, EventState, PageAt};
use hook_store::stats;
use hook_store::testing::TestDb;
use time::OffsetDateTime;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

/// A week of processed events, one every 30 s, in sessions of 200 (payload and metadata shaped
/// like hook-ingest's), 1% failed once, 50 dead, 30 retrying, 100 pending.
const TABLE: &str = "
    INSERT INTO hook_events (id, source, action, resource, resource_id, payload, metadata, processed,
                             retry_count, processing_errors, created_at, processed_at, dead_at, next_attempt_at)
    SELECT gen_random_uuid(),
           (ARRAY['PreToolUse','PostToolUse','UserPromptSubmit','Stop'])[1 + i % 4],
           (ARRAY['tool_invocation','tool_completion','prompt_submitted','response_completed'])[1 + i % 4],
           'tool', 'Bash',
           jsonb_build_object('session_id', 's-' || (i / 200), 'tool_name', 'Bash', 'tool_use_id', 'toolu_' || (i / 2),
                              'tool_input', jsonb_build_object('command', 'cargo test ' || i)),
           jsonb_build_object('session_id', 's-' || (i / 200), 'hook_type', 'PreToolUse'),
           i > 180, CASE WHEN i % 100 = 0 OR i <= 80 THEN 1 ELSE 0 END,
           CASE WHEN i % 100 = 0 OR i <= 80 THEN ARRAY['boom ' || i] END,
           now() - i * interval '30 seconds',
           CASE WHEN i > 180 THEN now() - i * interval '30 seconds' + interval '20 milliseconds' END,
           CASE WHEN i <= 50 THEN now() END,
           CASE WHEN i > 50 AND i <= 80 THEN now() + interval '1 minute' END
    FROM generate_series(1, 20000) AS i";

fn boxed(params: &[Box<dyn ToSql + Sync + Send>]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect()
}

async fn plan(client: &tokio_postgres::Client, sql: &str, params: &[&(dyn ToSql + Sync)]) -> String {
    let rows = client.query(&format!("EXPLAIN {sql}"), params).await.unwrap_or_else(|e| panic!("{e}: {sql}"));
    rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>().join("\n")
}

static FAILURES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn check(name: &str, plan: &str, index: &str) {
    // `a|b`: either index serves the query well
    if plan.contains("Seq Scan on hook_events") || !index.split('|').any(|i| plan.contains(i)) {
        FAILURES.lock().unwrap().push(format!("{name}: wanted {index}, no sequential scan\n{plan}"));
    }
}

#[tokio::test]
async fn each_console_query_is_served_by_an_index() {
    let db = TestDb::migrated("console_plans").await;
    let client = db.client().await;
    let built = hook_store::indexes::ensure(&client, hook_store::indexes::CONSOLE).await.unwrap();
    assert_eq!(built, ["hook_events_created_idx", "hook_events_session_idx"], "the migrations build neither");
    client.batch_execute(TABLE).await.unwrap();
    client.batch_execute("VACUUM ANALYZE hook_events").await.unwrap();
    let cursor =
        Cursor { created_at: OffsetDateTime::now_utc() - time::Duration::hours(30), id: Uuid::nil() };
    let day_ago = OffsetDateTime::now_utc() - time::Duration::days(1);
    let state = |s| EventFilter { state: Some(s), ..EventFilter::default() };

    let lists: Vec<(&str, EventFilter, PageAt, &str)> = vec![
        ("all, newest", EventFilter::default(), PageAt::Newest, "hook_events_created_idx"),
        ("all, older page", EventFilter::default(), PageAt::Before(cursor), "hook_events_created_idx"),
        ("all, newer page", EventFilter::default(), PageAt::After(cursor), "hook_events_created_idx"),
        ("pending", state(EventState::Pending), PageAt::Newest, "hook_events_claim_idx"),
        (
            "retrying",
            state(EventState::Retrying),
            PageAt::Newest,
            "hook_events_claim_idx|hook_events_retried_idx",
        ),
        ("dead", state(EventState::Dead), PageAt::Newest, "hook_events_failed_idx|hook_events_dead_idx"),
        (
            "dead, older page",
            state(EventState::Dead),
            PageAt::Before(cursor),
            "hook_events_failed_idx|idx_hook_events_processed|hook_events_dead_idx",
        ),
        ("failed", state(EventState::Failed), PageAt::Newest, "hook_events_failed_idx"),
        ("processed", state(EventState::Processed), PageAt::Newest, "hook_events_created_idx"),
        (
            "error text",
            EventFilter { error_text: Some("boom 1".into()), ..EventFilter::default() },
            PageAt::Newest,
            "hook_events_failed_idx",
        ),
        (
            "session",
            EventFilter { session: Some("s-42".into()), ..EventFilter::default() },
            PageAt::Before(cursor),
            "hook_events_session_idx",
        ),
        (
            "route",
            EventFilter {
                source: Some("Stop".into()),
                action: Some("response_completed".into()),
                ..EventFilter::default()
            },
            PageAt::Newest,
            "hook_events_",
        ),
        (
            "time range",
            EventFilter {
                since: Some(day_ago - time::Duration::hours(2)),
                until: Some(day_ago),
                ..EventFilter::default()
            },
            PageAt::Newest,
            "hook_events_created_idx",
        ),
    ];
    for (name, filter, page, index) in &lists {
        let (sql, params) = console::list_events_query(filter, *page, 51);
        check(name, &plan(&client, &sql, &boxed(&params)).await, index);
    }

    let (id, chars, error_chars) = (Uuid::nil(), 262_144i32, 16_384i32);
    check(
        "event",
        &plan(&client, &console::event_query(), &[&id, &chars, &error_chars]).await,
        "hook_events_pkey",
    );
    let limit = 1000i64;
    check("routes", &plan(&client, console::ROUTES, &[&limit]).await, "idx_hook_events_source_action");
    let cap = 100_000i64;
    let day = 86_400_000_000i64;
    let in_window = plan(&client, console::PROCESSED_IN_WINDOW, &[&day, &cap]).await;
    check("processed in window", &in_window, "Index Only Scan using hook_events_archive_idx");
    check("processed in window", &in_window, "Index Only Scan using hook_events_retried_idx");
    // The overview's queue counts and failing routes (shared with `hook-processor stats`): the
    // failed rows' indexes alone, read index-only (migration 0014).
    let depth = plan(&client, stats::QUEUE_DEPTH, &[&day]).await;
    for index in
        ["hook_events_claim_idx", "hook_events_retried_idx", "hook_events_due_idx", "hook_events_dead_idx"]
    {
        check("queue depth", &depth, &format!("Index Only Scan using {index}"));
    }
    let routes_shown = 20i64;
    let failing = plan(&client, stats::ERRORS_BY_ROUTE, &[&day, &routes_shown]).await;
    check("failing routes", &failing, "Index Only Scan using hook_events_dead_idx");
    check("failing routes", &failing, "Index Only Scan using hook_events_retried_idx");
    check("failing routes", &failing, "hook_events_pkey");
    check(
        "processed per minute",
        &plan(&client, console::PROCESSED_PER_MINUTE, &[&cap]).await,
        "hook_events_archive_idx",
    );
    check(
        "received per minute",
        &plan(&client, console::RECEIVED_PER_MINUTE, &[&cap]).await,
        "hook_events_created_idx",
    );
    let sample = 10_000i64;
    check(
        "latency per minute",
        &plan(&client, console::LATENCY_PER_MINUTE, &[&sample]).await,
        "hook_events_archive_idx",
    );

    let (none, scan, n, cap): (Option<OffsetDateTime>, i64, i64, i64) = (None, 5000, 25, 1000);
    let recent = plan(&client, &console::recent_sessions_query(), &[&none, &scan, &n, &cap]).await;
    check("recent sessions", &recent, "hook_events_session_idx");
    check("recent sessions", &recent, "hook_events_created_idx");
    let older = Some(day_ago);
    check(
        "recent sessions, older",
        &plan(&client, &console::recent_sessions_query(), &[&older, &scan, &n, &cap]).await,
        "hook_events_created_idx",
    );
    let session = "s-42".to_owned();
    check(
        "session summary",
        &plan(&client, &console::session_summary_query(), &[&session]).await,
        "hook_events_session_idx",
    );
    let (at, uid, page) = (Some(day_ago), Some(Uuid::nil()), 201i64);
    check(
        "session events",
        &plan(&client, &console::session_events_query(), &[&session, &at, &uid, &page]).await,
        "hook_events_session_idx",
    );
    let ids = vec!["toolu_1".to_owned()];
    let (from, to) = (day_ago - time::Duration::days(1), day_ago + time::Duration::days(1));
    check(
        "tool partners",
        &plan(&client, &console::tool_partners_query(), &[&session, &from, &to, &ids]).await,
        "hook_events_session_idx",
    );

    let replays: Vec<(&str, EventFilter, bool, &str)> = vec![
        ("dead", state(EventState::Dead), false, "hook_events_failed_idx|hook_events_dead_idx"),
        ("failed, with processed", state(EventState::Failed), true, "hook_events_failed_idx"),
        (
            "error text",
            EventFilter { error_text: Some("boom".into()), ..EventFilter::default() },
            false,
            "hook_events_failed_idx",
        ),
        (
            "session",
            EventFilter { session: Some("s-0".into()), ..EventFilter::default() },
            true,
            "hook_events_session_idx",
        ),
        ("no filter", EventFilter::default(), false, "idx_hook_events_"),
    ];
    for (name, filter, include_processed, index) in &replays {
        let (sql, params) = console::replayable_groups_query(filter, *include_processed, 100_000);
        check(&format!("replay count: {name}"), &plan(&client, &sql, &boxed(&params)).await, index);
        let (sql, params) = console::replayable_page_query(filter, *include_processed, Some(cursor), 500);
        check(&format!("replay walk: {name}"), &plan(&client, &sql, &boxed(&params)).await, "hook_events_");
    }
    let failures = FAILURES.lock().unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
