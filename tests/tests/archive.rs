//! hook-store's archive against a real PostgreSQL: what is moved (old processed events, intact)
//! and what never is (pending, retrying, dead), conservation of rows batch by batch and while a
//! processor drains the table, the run lock, ids already archived, retention, and adoption of an
//! archive table made by the original service's SQL.
//!
//! The binary's behaviour under SIGKILL and concurrent runs is tested in `bins/archive/tests`.

use std::collections::BTreeSet;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use hook_core::{Engine, HandlerRegistry, HandlerResult, HookEvent};
use hook_store::archive::{self, ArchiveOptions, ArchiveReport};
use hook_store::testing::TestDb;
use hook_store::{PgStore, StoreOptions};
use hook_tests::{count, insert_events, test_config, wait_for_count, Running};
use serde_json::Value;
use tokio_postgres::Client;
use uuid::Uuid;

const LIVE: &str = "SELECT count(*) FROM hook_events";
const ARCHIVED: &str = "SELECT count(*) FROM hook_events_archive";

fn no_listen() -> StoreOptions {
    StoreOptions { listen: false, pool_size: 2, ..StoreOptions::default() }
}

fn older_than_days(days: u64, batch_size: usize) -> ArchiveOptions {
    ArchiveOptions { older_than: Duration::from_secs(days * 86_400), batch_size, purge_older_than: None }
}

/// Inserts `n` events processed `days_ago` days ago (one millisecond apart); returns their ids.
async fn insert_processed(client: &Client, n: i32, days_ago: i32) -> Vec<Uuid> {
    client
        .query(
            "INSERT INTO hook_events (id, source, action, resource, resource_id, payload, created_at, processed,
                                      processed_at, result_metadata)
             SELECT gen_random_uuid(), 'PostToolUse', 'tool_completion', 'tool', 'Bash', jsonb_build_object('n', g),
                    now() - $2 * interval '1 day' + g * interval '1 millisecond', TRUE,
                    now() - $2 * interval '1 day' + g * interval '1 millisecond' + interval '1 second',
                    '{\"tool_name\": \"Bash\"}'
             FROM generate_series(1, $1) AS g
             RETURNING id",
            &[&n, &f64::from(days_ago)],
        )
        .await
        .expect("insert processed events")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Inserts an unprocessed event created `days_ago` days ago in the given state; returns its id.
async fn insert_unprocessed(client: &Client, days_ago: i32, retry_count: i32, dead: bool) -> Uuid {
    let id = Uuid::new_v4();
    client
        .execute(
            "INSERT INTO hook_events (id, source, action, resource, resource_id, created_at, retry_count, dead_at,
                                      next_attempt_at)
             VALUES ($1, 'Stop', 'session_stopped', 'session', 's1', now() - $2 * interval '1 day', $3,
                     CASE WHEN $4 THEN now() END, CASE WHEN $3 > 0 AND NOT $4 THEN now() + interval '1 hour' END)",
            &[&id, &f64::from(days_ago), &retry_count, &dead],
        )
        .await
        .expect("insert an unprocessed event");
    id
}

async fn run_archive(store: &PgStore, options: &ArchiveOptions) -> ArchiveReport {
    let client = store.pool().get().await.expect("a connection");
    let cutoffs = archive::cutoffs(&client, options).await.expect("cutoffs");
    assert!(archive::try_lock(&client).await.expect("lock"), "no other run holds the lock");
    let report = archive::archive(&client, &cutoffs, options.batch_size, |_| ControlFlow::Continue(()))
        .await
        .expect("archive");
    archive::unlock(&client).await.expect("unlock");
    report
}

async fn ids(client: &Client, query: &str) -> BTreeSet<Uuid> {
    client.query(query, &[]).await.expect("ids").iter().map(|r| r.get(0)).collect()
}

#[tokio::test]
async fn only_processed_events_older_than_the_cutoff_are_moved_intact() {
    let db = TestDb::migrated("archive_selects").await;
    let client = db.client().await;
    let old = insert_processed(&client, 5, 40).await;
    let recent = insert_processed(&client, 2, 1).await;
    let pending = insert_unprocessed(&client, 40, 0, false).await;
    let retrying = insert_unprocessed(&client, 40, 1, false).await;
    let dead = insert_unprocessed(&client, 40, 3, true).await;
    client
        .execute(
            "UPDATE hook_events SET processing_errors = ARRAY['e1'], retry_count = 1,
                    replays = '[{\"previous_retry_count\": 3}]' WHERE id = $1",
            &[&old[0]],
        )
        .await
        .unwrap();
    let before: Vec<Value> = client
        .query("SELECT to_jsonb(e) FROM hook_events AS e WHERE processed_at < now() - interval '30 days' ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();

    let store = db.store(no_listen()).await;
    let report = run_archive(&store, &older_than_days(30, 2)).await;
    assert_eq!((report.moved, report.batches), (5, 3));
    assert_eq!(report.statement_durations.len(), 3);

    let archived: Vec<Value> = client
        .query("SELECT to_jsonb(a) - 'archived_at' FROM hook_events_archive AS a ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(archived, before, "every column is copied as it was");
    let live = ids(&client, "SELECT id FROM hook_events").await;
    let expected: BTreeSet<Uuid> = recent.iter().copied().chain([pending, retrying, dead]).collect();
    assert_eq!(live, expected, "recent, pending, retrying and dead events stay");
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM hook_events_archive WHERE archived_at > now() - interval '1 minute'"
        )
        .await,
        5
    );

    // Nothing is left to do: a second run moves nothing.
    assert_eq!(run_archive(&store, &older_than_days(30, 2)).await.moved, 0);
}

#[tokio::test]
async fn batches_conserve_every_row() {
    let db = TestDb::migrated("archive_conserves").await;
    let client = db.client().await;
    let mut all: BTreeSet<Uuid> = insert_processed(&client, 2_500, 31).await.into_iter().collect();
    all.extend(insert_processed(&client, 100, 2).await);
    let store = db.store(no_listen()).await;
    let conn = store.pool().get().await.unwrap();
    let cutoffs = archive::cutoffs(&conn, &older_than_days(30, 1_000)).await.unwrap();
    let plan = archive::plan_archive(&conn, &cutoffs).await.unwrap();
    assert_eq!((plan.archivable, plan.purgeable), (2_500, 0));
    assert_eq!(count(&client, ARCHIVED).await, 0, "planning changes nothing");

    let mut sizes = Vec::new();
    let report = archive::archive(&conn, &cutoffs, 1_000, |batch| {
        sizes.push(batch.rows);
        ControlFlow::Continue(())
    })
    .await
    .unwrap();
    assert_eq!(sizes, [1_000, 1_000, 500]);
    assert_eq!((report.moved, report.batches, report.stopped), (2_500, 3, false));
    let live = ids(&client, "SELECT id FROM hook_events").await;
    let archived = ids(&client, "SELECT id FROM hook_events_archive").await;
    assert!(live.is_disjoint(&archived));
    assert_eq!(live.union(&archived).copied().collect::<BTreeSet<_>>(), all);
    assert_eq!((live.len(), archived.len()), (100, 2_500));

    // Stopping after a batch keeps what was committed.
    client
        .execute(
            "UPDATE hook_events SET created_at = created_at - interval '40 days',
                                    processed_at = processed_at - interval '40 days'",
            &[],
        )
        .await
        .unwrap();
    let cutoffs = archive::cutoffs(&conn, &older_than_days(30, 30)).await.unwrap();
    let report = archive::archive(&conn, &cutoffs, 30, |_| ControlFlow::Break(())).await.unwrap();
    assert_eq!((report.moved, report.stopped), (30, true));
    assert_eq!((count(&client, LIVE).await, count(&client, ARCHIVED).await), (70, 2_530));
}

#[tokio::test]
async fn one_run_at_a_time() {
    let db = TestDb::migrated("archive_lock").await;
    let store = db.store(no_listen()).await;
    let first = store.pool().get().await.unwrap();
    let second = store.pool().get().await.unwrap();
    assert!(archive::try_lock(&first).await.unwrap());
    assert!(!archive::try_lock(&second).await.unwrap(), "the second run finds the lock taken");
    archive::unlock(&first).await.unwrap();
    assert!(archive::try_lock(&second).await.unwrap());
    archive::unlock(&second).await.unwrap();
}

#[tokio::test]
async fn an_event_whose_id_is_already_archived_stays_live() {
    let db = TestDb::migrated("archive_id_taken").await;
    let client = db.client().await;
    let old = insert_processed(&client, 3, 40).await;
    // A copy of the first event is already in the archive (archived, then re-sent by a producer).
    client
        .execute(
            "INSERT INTO hook_events_archive (id, source, action, resource, resource_id, payload, metadata,
                                              processed, retry_count, created_at, processed_at, archived_at)
             SELECT id, source, action, resource, resource_id, '{\"old\": true}', metadata, processed, retry_count,
                    created_at, processed_at, now() - interval '1 day'
             FROM hook_events WHERE id = $1",
            &[&old[0]],
        )
        .await
        .unwrap();
    let store = db.store(no_listen()).await;
    let report = run_archive(&store, &older_than_days(30, 10)).await;
    assert_eq!(report.moved, 2);
    assert_eq!(
        ids(&client, "SELECT id FROM hook_events").await,
        BTreeSet::from([old[0]]),
        "neither copy is lost"
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM hook_events_archive WHERE payload = '{\"old\": true}'").await,
        1
    );
    assert_eq!(run_archive(&store, &older_than_days(30, 10)).await.moved, 0);
}

#[tokio::test]
async fn archiving_while_a_processor_drains_loses_none_and_moves_only_processed_events() {
    let db = TestDb::migrated("archive_while_draining").await;
    let client = db.client().await;
    let mut registry = HandlerRegistry::new();
    registry.register("*", "*", |event: Arc<HookEvent>| {
        let result = if event.source == "Bad" {
            HandlerResult::failed("always fails")
        } else {
            HandlerResult::ok("ok")
        };
        std::future::ready(result)
    });
    let engine = Engine::builder(db.store(StoreOptions::default()).await)
        .registry(registry)
        .config(hook_core::EngineConfig { batch_size: 50, ..test_config() })
        .build()
        .expect("valid config");
    let mut inserted: BTreeSet<Uuid> =
        insert_events(&client, 3_000, "PreToolUse", "tool_invocation").await.into_iter().collect();
    let bad: BTreeSet<Uuid> = insert_events(&client, 100, "Bad", "op").await.into_iter().collect();
    inserted.extend(&bad);
    let running = Running::start(engine);

    // Archive everything processed, again and again, while the engine works through the table.
    let store = db.store(no_listen()).await;
    let options = ArchiveOptions { older_than: Duration::ZERO, batch_size: 100, purge_older_than: None };
    let mut moved = 0;
    let mut runs = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let report = run_archive(&store, &options).await;
        moved += report.moved;
        runs += 1;
        let unfinished =
            count(&client, "SELECT count(*) FROM hook_events WHERE NOT processed AND dead_at IS NULL").await;
        let processed_left = count(&client, "SELECT count(*) FROM hook_events WHERE processed").await;
        if unfinished == 0 && processed_left == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {unfinished} unfinished, {processed_left} processed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.stop().await;
    assert!(runs > 1, "the archive ran while the processor worked");

    let live = ids(&client, "SELECT id FROM hook_events").await;
    let archived = ids(&client, "SELECT id FROM hook_events_archive").await;
    assert!(live.is_disjoint(&archived), "no row in both tables");
    assert_eq!(live.union(&archived).copied().collect::<BTreeSet<_>>(), inserted, "no row lost");
    assert_eq!(archived.len() as u64, moved);
    assert_eq!(live, bad, "only the dead events stay live");
    assert_eq!(count(&client, "SELECT count(*) FROM hook_events_archive WHERE NOT processed").await, 0);
    assert_eq!(count(&client, "SELECT count(*) FROM hook_events WHERE dead_at IS NULL").await, 0);
    wait_for_count(&client, ARCHIVED, 3_000, Duration::from_secs(1)).await;
}

#[tokio::test]
async fn purge_deletes_only_rows_archived_before_its_cutoff() {
    let db = TestDb::migrated("archive_purge").await;
    let client = db.client().await;
    insert_processed(&client, 10, 40).await;
    let store = db.store(no_listen()).await;
    run_archive(&store, &older_than_days(30, 100)).await;
    client
        .execute(
            "UPDATE hook_events_archive SET archived_at = now() - interval '400 days'
             WHERE id IN (SELECT id FROM hook_events_archive ORDER BY id LIMIT 6)",
            &[],
        )
        .await
        .unwrap();
    insert_processed(&client, 3, 40).await;

    let options = ArchiveOptions {
        purge_older_than: Some(Duration::from_secs(365 * 86_400)),
        ..older_than_days(30, 4)
    };
    let conn = store.pool().get().await.unwrap();
    let cutoffs = archive::cutoffs(&conn, &options).await.unwrap();
    let plan = archive::plan_archive(&conn, &cutoffs).await.unwrap();
    assert_eq!((plan.archivable, plan.purgeable), (3, 6));
    let report = run_archive(&store, &options).await;
    assert_eq!((report.moved, report.batches, report.purged, report.purge_batches), (3, 1, 6, 2));
    assert_eq!(count(&client, ARCHIVED).await, 7);
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM hook_events_archive WHERE archived_at < now() - interval '1 day'"
        )
        .await,
        0
    );

    // Off by default: nothing is purged without the option.
    client
        .execute("UPDATE hook_events_archive SET archived_at = now() - interval '4000 days'", &[])
        .await
        .unwrap();
    let report = run_archive(&store, &older_than_days(30, 4)).await;
    assert_eq!(report.purged, 0);
    assert_eq!(count(&client, ARCHIVED).await, 7);
}

/// The original service's table, and its README's archive SQL.
async fn original_table_with_archive(db: &TestDb) -> Client {
    let client = db.client().await;
    client.batch_execute(hook_store::migrate::MIGRATIONS[0].sql).await.expect("the original DDL");
    client
        .batch_execute(
            "INSERT INTO hook_events (id, source, action, resource, resource_id, created_at, processed, processed_at)
             SELECT gen_random_uuid(), 'Stop', 'session_stopped', 'session', 's' || g,
                    now() - interval '40 days', TRUE, now() - interval '40 days'
             FROM generate_series(1, 5) AS g;
             CREATE TABLE hook_events_archive AS
             SELECT * FROM hook_events WHERE processed = TRUE AND processed_at < NOW() - INTERVAL '30 days';
             DELETE FROM hook_events WHERE processed = TRUE AND processed_at < NOW() - INTERVAL '30 days';",
        )
        .await
        .expect("the original's archive SQL");
    client
}

#[tokio::test]
async fn an_archive_table_made_by_the_original_sql_is_adopted() {
    let db = TestDb::empty("archive_adopts_original").await;
    let client = original_table_with_archive(&db).await;
    let legacy = ids(&client, "SELECT id FROM hook_events_archive").await;
    assert_eq!(legacy.len(), 5);
    hook_store::migrate::migrate(&client).await.expect("migrations adopt the table");
    let key = count(
        &client,
        "SELECT count(*) FROM pg_constraint WHERE conrelid = 'hook_events_archive'::regclass AND contype = 'p'",
    )
    .await;
    assert_eq!(key, 1, "the adopted table has a primary key");
    assert_eq!(
        count(&client, "SELECT count(*) FROM hook_events_archive WHERE archived_at IS NOT NULL").await,
        5
    );

    let new = insert_processed(&client, 4, 40).await;
    let report = run_archive(&db.store(no_listen()).await, &older_than_days(30, 3)).await;
    assert_eq!(report.moved, 4);
    let archived = ids(&client, "SELECT id FROM hook_events_archive").await;
    assert_eq!(archived, legacy.iter().chain(&new).copied().collect());
}

#[tokio::test]
async fn an_original_archive_table_with_duplicate_ids_is_refused_clearly() {
    let db = TestDb::empty("archive_refuses_duplicates").await;
    let client = original_table_with_archive(&db).await;
    client
        .batch_execute("INSERT INTO hook_events_archive SELECT * FROM hook_events_archive LIMIT 1")
        .await
        .unwrap();
    let error = hook_store::migrate::migrate(&client).await.expect_err("duplicates are refused").to_string();
    assert!(error.contains("migration 8") && error.contains("same id more than once"), "{error}");
    assert_eq!(count(&client, "SELECT count(*) FROM hook_events_archive").await, 6, "nothing was changed");
}
