//! hook-store's replay against a real PostgreSQL: which events each filter selects, what
//! re-queuing writes, that a dry run writes nothing, that events a processor holds are left
//! alone, and that re-queued dead events are processed by a running engine, woken by NOTIFY.

use std::collections::BTreeSet;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hook_core::{
    ClaimRequest, ClaimedBatch, Engine, EngineConfig, HandlerRegistry, HandlerResult, HookEvent, Store,
};
use hook_store::replay::{self, ReplayFilter, ReplayOptions, ReplayReport};
use hook_store::testing::TestDb;
use hook_store::{PgStore, StoreOptions};
use hook_tests::{count, test_config, wait_for_count, Invocations, Running};
use serde_json::{json, Value};
use time::macros::datetime;
use time::OffsetDateTime;
use tokio_postgres::Client;
use uuid::Uuid;

fn no_listen() -> StoreOptions {
    StoreOptions { listen: false, pool_size: 2, ..StoreOptions::default() }
}

/// One row of the fixture: `(name, source, action, created_at hour, state)`.
#[derive(Clone, Copy)]
enum State {
    /// Never tried: eligible already.
    Pending,
    /// Failed once, waiting for its next attempt.
    Retrying,
    /// Reached the retry limit.
    Dead,
    /// The original's stranded kind: retry_count at the limit, no dead mark.
    Stranded,
    /// Succeeded the first time.
    Processed,
    /// Succeeded after two failures.
    ProcessedAfterFailures,
}

const FIXTURE: &[(&str, &str, &str, u8, State)] = &[
    ("pending", "A", "x", 0, State::Pending),
    ("retrying", "A", "x", 1, State::Retrying),
    ("dead_a", "A", "y", 2, State::Dead),
    ("dead_b", "B", "x", 3, State::Dead),
    ("stranded", "B", "y", 4, State::Stranded),
    ("processed", "A", "x", 5, State::Processed),
    ("processed_after_failures", "B", "x", 6, State::ProcessedAfterFailures),
];

fn at_hour(hour: u8) -> OffsetDateTime {
    datetime!(2025-10-19 00:00 UTC) + Duration::from_secs(u64::from(hour) * 3_600)
}

/// Inserts one event in `state`; returns its id.
async fn insert_in_state(
    client: &Client,
    source: &str,
    action: &str,
    created_at: OffsetDateTime,
    state: State,
) -> Uuid {
    let id = Uuid::new_v4();
    let (processed, retry_count, errors, next_attempt, dead): (bool, i32, Option<Vec<&str>>, bool, bool) =
        match state {
            State::Pending => (false, 0, None, false, false),
            State::Retrying => (false, 1, Some(vec!["e1"]), true, false),
            State::Dead => (false, 3, Some(vec!["e1", "e2", "e3"]), false, true),
            State::Stranded => (false, 3, Some(vec!["e1", "e2", "e3"]), false, false),
            State::Processed => (true, 0, None, false, false),
            State::ProcessedAfterFailures => (true, 2, Some(vec!["e1", "e2"]), false, false),
        };
    client
        .execute(
            "INSERT INTO hook_events (id, source, action, resource, resource_id, payload, created_at, processed,
                                      processed_at, retry_count, processing_errors, next_attempt_at, dead_at)
             VALUES ($1, $2, $3, 'tool', 'Bash', '{\"tool_name\": \"Bash\"}', $4, $5,
                     CASE WHEN $5 THEN $4::timestamptz + interval '1 second' END, $6, $7,
                     CASE WHEN $8 THEN now() + interval '1 hour' END, CASE WHEN $9 THEN now() END)",
            &[&id, &source, &action, &created_at, &processed, &retry_count, &errors, &next_attempt, &dead],
        )
        .await
        .expect("insert an event");
    id
}

/// The fixture in a fresh database; returns it and the ids by name.
async fn fixture(test: &str) -> (TestDb, Vec<(&'static str, Uuid)>) {
    let db = TestDb::migrated(test).await;
    let client = db.client().await;
    let mut ids = Vec::new();
    for &(name, source, action, hour, state) in FIXTURE {
        ids.push((name, insert_in_state(&client, source, action, at_hour(hour), state).await));
    }
    (db, ids)
}

/// Every row, as text, by id: to see what changed.
async fn rows(client: &Client) -> Vec<(Uuid, String)> {
    client
        .query("SELECT id, t::text FROM hook_events AS t ORDER BY id", &[])
        .await
        .expect("read rows")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn run_replay(store: &PgStore, filter: &ReplayFilter, options: &ReplayOptions) -> ReplayReport {
    let mut client = store.pool().get().await.expect("a connection");
    replay::replay(&mut client, filter, options, |_| ControlFlow::Continue(())).await.expect("replay")
}

/// Checks that `filter`, with the fixture rows named `ids` as its ids, selects exactly the rows
/// named `expected`: in the dry-run plan, and in what a replay changes (those rows re-queued,
/// every other row untouched).
async fn check(case: &str, filter: ReplayFilter, ids_named: &[&str], expected: &[&str]) {
    let (db, ids) = fixture(case).await;
    let client = db.client().await;
    let store = db.store(no_listen()).await;
    let id_of = |name: &str| ids.iter().find(|(n, _)| *n == name).map(|(_, id)| *id).expect("a fixture name");
    let name_of = |id: Uuid| ids.iter().find(|(_, i)| *i == id).map(|(n, _)| *n).expect("a fixture id");
    let expected: BTreeSet<&str> = expected.iter().copied().collect();
    let filter = ReplayFilter { ids: ids_named.iter().map(|name| id_of(name)).collect(), ..filter };

    let conn = store.pool().get().await.expect("a connection");
    let plan = replay::plan_replay(&conn, &filter, 100).await.expect("plan");
    let planned: BTreeSet<&str> = plan.sample_ids.iter().map(|id| name_of(*id)).collect();
    assert_eq!(planned, expected, "{case}: planned");
    assert_eq!(plan.total(), expected.len() as u64, "{case}: planned total");

    let before = rows(&client).await;
    let report =
        run_replay(&store, &filter, &ReplayOptions { batch_size: 2, ..ReplayOptions::default() }).await;
    assert_eq!(report.replayed, expected.len() as u64, "{case}: replayed");
    let after = rows(&client).await;
    let changed: BTreeSet<&str> =
        before.iter().zip(&after).filter(|(b, a)| b.1 != a.1).map(|(b, _)| name_of(b.0)).collect();
    assert_eq!(changed, expected, "{case}: changed rows");
    let requeued = count(
        &client,
        "SELECT count(*) FROM hook_events WHERE replays IS NOT NULL AND NOT processed AND retry_count = 0
           AND dead_at IS NULL AND next_attempt_at IS NULL AND processed_at IS NULL",
    )
    .await;
    assert_eq!(requeued, expected.len() as i64, "{case}: re-queued state");
}

#[tokio::test]
async fn filters_select_exactly_the_expected_rows() {
    let all = ReplayFilter::default;
    let none: &[&str] = &[];
    let cases: Vec<(&str, ReplayFilter, &[&str], &[&str])> = vec![
        ("default", all(), none, &["retrying", "dead_a", "dead_b", "stranded"]),
        ("source", ReplayFilter { sources: vec!["A".into()], ..all() }, none, &["retrying", "dead_a"]),
        ("action", ReplayFilter { actions: vec!["x".into()], ..all() }, none, &["retrying", "dead_b"]),
        ("since", ReplayFilter { since: Some(at_hour(2)), ..all() }, none, &["dead_a", "dead_b", "stranded"]),
        ("until", ReplayFilter { until: Some(at_hour(3)), ..all() }, none, &["retrying", "dead_a"]),
        ("ids", all(), &["dead_b", "pending", "processed"], &["dead_b"]),
        (
            "include_processed",
            ReplayFilter { include_processed: true, ..all() },
            none,
            &["retrying", "dead_a", "dead_b", "stranded", "processed", "processed_after_failures"],
        ),
        (
            "combined",
            ReplayFilter {
                include_processed: true,
                sources: vec!["B".into()],
                actions: vec!["x".into()],
                since: Some(at_hour(3)),
                until: Some(at_hour(7)),
                ..all()
            },
            none,
            &["dead_b", "processed_after_failures"],
        ),
        (
            "combined_ids",
            ReplayFilter {
                include_processed: true,
                sources: vec!["A".into(), "B".into()],
                until: Some(at_hour(5)),
                ..all()
            },
            &["processed", "stranded", "pending"],
            &["stranded"],
        ),
        ("nothing", ReplayFilter { sources: vec!["C".into()], ..all() }, none, none),
    ];
    for (case, filter, ids, expected) in cases {
        check(case, filter, ids, expected).await;
    }
}

#[tokio::test]
async fn requeuing_resets_the_schedule_keeps_errors_and_records_each_replay() {
    let (db, ids) = fixture("requeue_state").await;
    let client = db.client().await;
    let store = db.store(no_listen()).await;
    let dead = ids[2].1;
    let processed = ids[6].1;
    let filter =
        ReplayFilter { ids: vec![dead, processed], include_processed: true, ..ReplayFilter::default() };
    run_replay(&store, &filter, &ReplayOptions::default()).await;

    let row = client
        .query_one(
            "SELECT processed, processed_at IS NULL, retry_count, dead_at IS NULL, next_attempt_at IS NULL,
                    processing_errors, replays
             FROM hook_events WHERE id = $1",
            &[&dead],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, bool>(0), row.get::<_, bool>(1), row.get::<_, i32>(2)), (false, true, 0));
    assert!(row.get::<_, bool>(3) && row.get::<_, bool>(4), "dead mark and schedule cleared");
    assert_eq!(row.get::<_, Option<Vec<String>>>(5), Some(vec!["e1".into(), "e2".into(), "e3".into()]));
    let replays: Value = row.get(6);
    assert_eq!(replays.as_array().map(Vec::len), Some(1), "{replays}");
    let entry = &replays[0];
    assert_eq!(entry["previous_retry_count"], json!(3));
    assert_eq!(entry["previous_errors_count"], json!(3));
    assert_eq!(entry["cleared_errors"], json!(false));
    assert_eq!(entry["processed_before"], json!(false));
    assert!(entry["previous_dead_at"].is_string() && entry["at"].is_string(), "{entry}");

    let entry: Value = client
        .query_one(
            "SELECT replays->0 FROM hook_events WHERE id = $1 AND NOT processed AND processed_at IS NULL",
            &[&processed],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(entry["processed_before"], json!(true));
    assert_eq!(entry["previous_retry_count"], json!(2));

    // The event fails again and is replayed again, clearing its errors: the history grows.
    client
        .execute(
            "UPDATE hook_events SET retry_count = 3, dead_at = now(), processing_errors = ARRAY['e4'] WHERE id = $1",
            &[&dead],
        )
        .await
        .unwrap();
    let clear = ReplayOptions { clear_errors: true, ..ReplayOptions::default() };
    let report =
        run_replay(&store, &ReplayFilter { ids: vec![dead], ..ReplayFilter::default() }, &clear).await;
    assert_eq!(report.replayed, 1);
    let row = client
        .query_one("SELECT processing_errors, replays FROM hook_events WHERE id = $1", &[&dead])
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<Vec<String>>>(0), None);
    let replays: Value = row.get(1);
    assert_eq!(replays.as_array().map(Vec::len), Some(2), "{replays}");
    assert_eq!(replays[1]["cleared_errors"], json!(true));
    assert_eq!(replays[1]["previous_errors_count"], json!(1));
}

#[tokio::test]
async fn a_dry_run_changes_nothing() {
    let (db, _) = fixture("dry_run").await;
    let client = db.client().await;
    let store = db.store(no_listen()).await;
    let before = rows(&client).await;
    let conn = store.pool().get().await.unwrap();
    for filter in
        [ReplayFilter::default(), ReplayFilter { include_processed: true, ..ReplayFilter::default() }]
    {
        let plan = replay::plan_replay(&conn, &filter, 3).await.unwrap();
        assert!(plan.total() >= 4);
        assert_eq!(plan.sample_ids.len(), 3, "the sample is bounded");
        let groups: u64 = plan.groups.iter().map(|(_, n)| n).sum();
        assert_eq!(groups, plan.total());
    }
    assert_eq!(rows(&client).await, before);
}

#[tokio::test]
async fn events_held_by_a_processor_are_skipped_not_waited_for() {
    let db = TestDb::migrated("replay_skips_held").await;
    let client = db.client().await;
    // Three retrying events that are eligible right now (their next attempt is due).
    let mut ids = Vec::new();
    for hour in 0..3 {
        let id = insert_in_state(&client, "A", "x", at_hour(hour), State::Retrying).await;
        client.execute("UPDATE hook_events SET next_attempt_at = NULL WHERE id = $1", &[&id]).await.unwrap();
        ids.push(id);
    }
    // A processor claims the oldest and holds it.
    let processor = db.store(no_listen()).await;
    let request = ClaimRequest {
        limit: 1,
        max_retry_count: 3,
        claim_timeout: Duration::from_secs(60),
        ..ClaimRequest::default()
    };
    let mut held = processor.claim(request).await.unwrap().expect("a claim");
    assert_eq!(held.take_events().iter().map(|e| e.id).collect::<Vec<_>>(), [ids[0]]);

    let store = db.store(no_listen()).await;
    let report = tokio::time::timeout(
        Duration::from_secs(10),
        run_replay(
            &store,
            &ReplayFilter::default(),
            &ReplayOptions { batch_size: 1, ..ReplayOptions::default() },
        ),
    )
    .await
    .expect("replay does not wait for held rows");
    assert_eq!((report.replayed, report.skipped_held), (2, 1));
    let untouched = count(
        &client,
        &format!(
            "SELECT count(*) FROM hook_events WHERE id = '{}' AND retry_count = 1 AND replays IS NULL",
            ids[0]
        ),
    )
    .await;
    assert_eq!(untouched, 1, "the held event was not touched");
    held.finish(vec![]).await.unwrap();

    // Once released, the event is replayed like any other.
    let report = run_replay(&store, &ReplayFilter::default(), &ReplayOptions::default()).await;
    assert_eq!((report.replayed, report.skipped_held), (1, 0));
}

#[tokio::test]
async fn batches_walk_the_selection_once_in_creation_order() {
    let db = TestDb::migrated("replay_keyset").await;
    let client = db.client().await;
    let mut ids = Vec::new();
    for hour in 0..7 {
        ids.push(insert_in_state(&client, "A", "x", at_hour(hour), State::Dead).await);
    }
    let store = db.store(no_listen()).await;
    let mut conn = store.pool().get().await.unwrap();
    let mut seen = Vec::new();
    let mut batches = 0;
    let options = ReplayOptions { batch_size: 3, ..ReplayOptions::default() };
    let report = replay::replay(&mut conn, &ReplayFilter::default(), &options, |batch| {
        batches += 1;
        let mut batch_ids: Vec<_> = batch.replayed.iter().map(|e| (e.created_at, e.id)).collect();
        batch_ids.sort();
        seen.extend(batch_ids.into_iter().map(|(_, id)| id));
        ControlFlow::Continue(())
    })
    .await
    .unwrap();
    assert_eq!(seen, ids, "every event once, oldest first");
    assert_eq!((report.replayed, report.batches, batches), (7, 3, 3));
    assert!(!report.stopped);

    // Breaking stops after the batch in progress, which stays committed.
    client.execute("UPDATE hook_events SET retry_count = 3, dead_at = now()", &[]).await.unwrap();
    let report = replay::replay(&mut conn, &ReplayFilter::default(), &options, |_| ControlFlow::Break(()))
        .await
        .unwrap();
    assert_eq!((report.replayed, report.batches, report.stopped), (3, 1, true));
    assert_eq!(count(&client, "SELECT count(*) FROM hook_events WHERE dead_at IS NOT NULL").await, 4);
}

#[tokio::test]
async fn dead_events_replayed_by_default_are_processed_on_the_next_claim() {
    let db = TestDb::migrated("replay_dead_processed").await;
    let client = db.client().await;
    let invocations = Invocations::default();
    let failing = Arc::new(AtomicBool::new(true));
    let mut registry = HandlerRegistry::new();
    let (seen, fail) = (invocations.clone(), Arc::clone(&failing));
    registry.register("*", "*", move |event: Arc<HookEvent>| {
        seen.record(&event);
        let result = if fail.load(Ordering::SeqCst) {
            HandlerResult::failed("downstream unavailable")
        } else {
            HandlerResult::ok("done")
        };
        std::future::ready(result)
    });
    // One attempt, then dead; a poll so long that only NOTIFY can wake the idle engine in time.
    let mut config = EngineConfig { poll_interval: Duration::from_secs(120), ..test_config() };
    config.retry.max_retry_count = 1;
    let engine = Engine::builder(db.store(StoreOptions::default()).await)
        .registry(registry)
        .config(config)
        .build()
        .expect("valid config");
    let running = Running::start(engine);
    let ids = hook_tests::insert_events(&client, 20, "PreToolUse", "tool_invocation").await;
    wait_for_count(
        &client,
        "SELECT count(*) FROM hook_events WHERE dead_at IS NOT NULL",
        20,
        Duration::from_secs(30),
    )
    .await;

    failing.store(false, Ordering::SeqCst);
    let store = db.store(no_listen()).await;
    let report = run_replay(&store, &ReplayFilter::default(), &ReplayOptions::default()).await;
    assert_eq!(report.replayed, 20);
    wait_for_count(&client, "SELECT count(*) FROM hook_events WHERE processed", 20, Duration::from_secs(20))
        .await;
    let metrics = running.stop().await;
    assert_eq!((metrics.failed, metrics.succeeded), (20, 20));
    let attempts = invocations.snapshot();
    assert!(ids.iter().all(|id| attempts.get(id) == Some(&2)), "each event failed once, then succeeded once");
    let kept = count(
        &client,
        "SELECT count(*) FROM hook_events
         WHERE processing_errors = ARRAY['downstream unavailable'] AND jsonb_array_length(replays) = 1",
    )
    .await;
    assert_eq!(kept, 20, "errors kept and the replay recorded");
}
