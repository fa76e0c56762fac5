//! What a claim reads (issue 15, item 1), against a real PostgreSQL: rows waiting for a retry are
//! not walked (asserted on `EXPLAIN (ANALYZE, BUFFERS)`: buffers and rows read, not time), they
//! become claimable when due, the original's reset SQL still revives events, and the low-water
//! mark spares the claim the dead index entries a held snapshot leaves, without stranding an
//! event that commits late or comes back below it.

use std::time::Duration;

use hook_core::{ClaimRequest, ClaimedBatch, HookEvent, Outcome, Resolution, Store};
use hook_store::bench::{self, ClaimPlan};
use hook_store::testing::TestDb;
use hook_store::{PgBatch, PgStore, StoreOptions};
use hook_tests::{count, insert_events};
use serde_json::Map;
use tokio_postgres::Client;
use uuid::Uuid;

/// Rows waiting for a retry in the plan tests.
const WAITING: i64 = 100_000;

fn request(limit: usize) -> ClaimRequest {
    ClaimRequest { limit, max_retry_count: 3, ..ClaimRequest::default() }
}

/// A store that rescans below its mark only when told to (`PgStore::rescan`), so that what a
/// claim does not see is asserted without a race with the background rescan.
fn no_rescan() -> StoreOptions {
    StoreOptions { listen: false, rescan_interval: Duration::from_secs(3600), ..StoreOptions::default() }
}

async fn claim(store: &PgStore, limit: usize) -> Option<(PgBatch, Vec<HookEvent>)> {
    let mut batch = store.claim(request(limit)).await.expect("the claim query")?;
    let events = batch.take_events();
    Some((batch, events))
}

/// Claims up to `limit` events and commits them as processed; returns their ids.
async fn claim_and_succeed(store: &PgStore, limit: usize) -> Vec<Uuid> {
    let Some((batch, events)) = claim(store, limit).await else { return Vec::new() };
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    let outcomes = ids
        .iter()
        .map(|&id| Outcome { id, resolution: Resolution::Succeeded, metadata: Map::new() })
        .collect();
    batch.finish(outcomes).await.expect("the completion");
    ids
}

/// Inserts `n` events created `age_secs` seconds ago (1 µs apart, oldest first); returns their
/// ids in that order.
async fn insert_aged(client: &Client, n: usize, age_secs: i64) -> Vec<Uuid> {
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
    client
        .execute(
            "INSERT INTO hook_events (id, source, action, resource, resource_id, created_at)
             SELECT id, 'PreToolUse', 'tool_invocation', 'tool', 'Bash',
                    now() - $2::int8 * interval '1 second' + ord * interval '1 microsecond'
             FROM unnest($1::uuid[]) WITH ORDINALITY AS t(id, ord)",
            &[&ids, &age_secs],
        )
        .await
        .expect("insert aged events");
    ids
}

/// Fills the table with `n` rows waiting for a retry a day away (hook-bench's rows), analyzed.
async fn insert_waiting(db: &TestDb, store: &PgStore, n: i64) {
    let mut client = store.pool().get().await.expect("a pooled connection");
    let mut first = 1;
    while first <= n {
        let last = (first + 20_000 - 1).min(n);
        bench::insert_waiting(&mut client, first, last).await.expect("insert waiting rows");
        first = last + 1;
    }
    db.client().await.batch_execute("VACUUM (ANALYZE) hook_events").await.expect("vacuum");
}

async fn explain(
    store: &PgStore,
    limit: i64,
    floor: Option<time::OffsetDateTime>,
    generic: bool,
) -> ClaimPlan {
    let client = store.pool().get().await.expect("a pooled connection");
    bench::explain_claim(&client, limit, floor, generic).await.expect("explain the claim")
}

/// The claim's plan reads a few pages, whatever waits behind what it takes.
fn check_small(plan: &ClaimPlan, rows: i64, what: &str) {
    assert_eq!(plan.rows, rows, "{what}: rows claimed\n{:#}", plan.json);
    assert_eq!(plan.seq_scans, 0, "{what}: a sequential scan of hook_events\n{:#}", plan.json);
    assert!(
        plan.rows_removed < 100,
        "{what}: {} rows read and discarded\n{:#}",
        plan.rows_removed,
        plan.json
    );
    // 100,000 rows fill thousands of heap pages and hundreds of index pages; the claim reads the
    // first pages of two indexes, the ledger and the heap pages of the rows it takes.
    assert!(plan.buffers < 100, "{what}: {} buffers\n{:#}", plan.buffers, plan.json);
}

#[tokio::test]
async fn a_claim_reads_none_of_100000_rows_waiting_for_a_retry() {
    let db = TestDb::migrated("claim_cost_waiting").await;
    let client = db.client().await;
    let store = db.store(no_rescan()).await;
    insert_waiting(&db, &store, WAITING).await;
    let fresh = insert_events(&client, 5, "PreToolUse", "tool_invocation").await;
    client.batch_execute("ANALYZE hook_events").await.unwrap();

    for generic in [true, false] {
        let plan = explain(&store, 100, None, generic).await;
        check_small(&plan, 5, if generic { "generic plan" } else { "custom plan" });
        assert!(
            plan.indexes.iter().any(|i| i == "hook_events_fresh_idx")
                && plan.indexes.iter().any(|i| i == "hook_events_due_idx"),
            "{:?}",
            plan.indexes
        );
    }
    // The claim itself: the fresh events, none of the waiting ones; and the next claim's plan,
    // from the store's mark, is as small.
    let claimed = claim_and_succeed(&store, 100).await;
    assert_eq!(claimed, fresh);
    let plan =
        explain(&store, 100, Some(time::OffsetDateTime::now_utc() - time::Duration::SECOND), true).await;
    check_small(&plan, 0, "from the mark, nothing claimable");
    assert_eq!(count(&client, "SELECT count(*) FROM hook_events WHERE NOT processed").await, WAITING);
}

#[tokio::test]
async fn waiting_retries_become_claimable_when_due_and_are_not_starved_by_fresh_events() {
    let db = TestDb::migrated("claim_cost_due").await;
    let client = db.client().await;
    let store = db.store(no_rescan()).await;
    let ids = insert_events(&client, 3, "PreToolUse", "tool_invocation").await;
    let (retry, waiting, fresh) = (ids[0], ids[1], ids[2]);
    // A failed attempt through the store: the event waits for its retry.
    let (batch, events) = claim(&store, 1).await.expect("a batch");
    assert_eq!(events[0].id, retry);
    let failure = Resolution::Failed { error: "boom".into(), retry_after: Some(Duration::from_secs(3600)) };
    batch.finish(vec![Outcome { id: retry, resolution: failure, metadata: Map::new() }]).await.unwrap();
    client
        .execute(
            "UPDATE hook_events SET retry_count = 1, next_attempt_at = now() + interval '1 hour' WHERE id = $1",
            &[&waiting],
        )
        .await
        .unwrap();
    // Neither is due: only the fresh event is claimed.
    assert_eq!(claim_and_succeed(&store, 10).await, [fresh]);
    assert!(claim(&store, 10).await.is_none(), "nothing is due");

    // Time passes (the schedule is moved, rather than waited for): the retry is due.
    client
        .execute("UPDATE hook_events SET next_attempt_at = now() - interval '1 ms' WHERE id = $1", &[&retry])
        .await
        .unwrap();
    // Behind 50 newer fresh events, the due retry is still in the first claim of 10.
    insert_events(&client, 50, "PreToolUse", "tool_invocation").await;
    let (batch, events) = claim(&store, 10).await.expect("a batch");
    assert!(events.iter().any(|e| e.id == retry), "the due retry was not claimed");
    assert!(events.iter().all(|e| e.id != waiting), "a retry that is not due was claimed");
    let retried = events.iter().find(|e| e.id == retry).unwrap();
    assert_eq!(retried.retry_count, 1);
    batch.finish(vec![]).await.unwrap();
}

/// The original's "Reset Failed Events" SQL, as its README gives it.
const RESET: &str = "UPDATE hook_events
SET retry_count = 0,
    processing_errors = NULL
WHERE retry_count >= 3
  AND source = 'PreToolUse'
  AND created_at > NOW() - INTERVAL '1 day'";

#[tokio::test]
async fn the_original_reset_sql_revives_dead_and_waiting_events_into_the_claim() {
    let db = TestDb::migrated("claim_cost_reset").await;
    let client = db.client().await;
    let store = db.store(no_rescan()).await;
    // An hour old: one dead at the limit, one waiting for a retry a day away.
    let old = insert_aged(&client, 2, 3600).await;
    client
        .execute(
            "UPDATE hook_events SET retry_count = 3, processing_errors = ARRAY['a', 'b', 'c'],
                    dead_at = CASE WHEN id = $1::uuid THEN now() END,
                    next_attempt_at = CASE WHEN id = $2::uuid THEN now() + interval '1 day' END
             WHERE id = ANY (ARRAY[$1::uuid, $2::uuid])",
            &[&old[0], &old[1]],
        )
        .await
        .unwrap();
    // The store's claims move its mark past them.
    let newer = insert_events(&client, 3, "PreToolUse", "tool_invocation").await;
    assert_eq!(claim_and_succeed(&store, 10).await, newer);
    assert!(claim(&store, 10).await.is_none());

    assert_eq!(client.execute(RESET, &[]).await.unwrap(), 2);
    let revived = count(
        &client,
        "SELECT count(*) FROM hook_events
         WHERE NOT processed AND dead_at IS NULL AND next_attempt_at IS NULL AND retry_count = 0",
    )
    .await;
    assert_eq!(revived, 2, "the trigger clears the dead mark and the schedule");
    // A processor without a mark yet claims them at once.
    let other = db.store(no_rescan()).await;
    let (batch, events) = claim(&other, 10).await.expect("a batch");
    assert_eq!(events.iter().map(|e| e.id).collect::<Vec<_>>(), old);
    batch.release().await;
    // Below this store's mark: its claims do not reach them, its rescan does.
    assert!(claim(&store, 10).await.is_none());
    assert!(store.rescan().await.unwrap(), "the rescan finds the revived events");
    assert_eq!(claim_and_succeed(&store, 10).await, old);
    assert!(!store.rescan().await.unwrap(), "nothing is left below the mark");
}

#[tokio::test]
async fn an_event_committed_late_below_the_mark_is_claimed_by_the_rescan_and_released_rows_at_once() {
    let db = TestDb::migrated("claim_cost_late").await;
    let client = db.client().await;
    let store = db.store(no_rescan()).await;
    // A producer's transaction starts (created_at is its start) and commits only after newer
    // events were inserted and claimed, later than the margin.
    let producer = db.client().await;
    let late = Uuid::new_v4();
    producer.batch_execute("BEGIN").await.unwrap();
    producer
        .execute(
            "INSERT INTO hook_events (id, source, action, resource, resource_id) VALUES ($1, 'Stop', 'x', 'r', 'r1')",
            &[&late],
        )
        .await
        .unwrap();
    tokio::time::sleep(hook_store::LATE_COMMIT_MARGIN + Duration::from_millis(500)).await;
    let newer = insert_events(&client, 3, "PreToolUse", "tool_invocation").await;
    assert_eq!(claim_and_succeed(&store, 10).await, newer);
    producer.batch_execute("COMMIT").await.unwrap();
    let late_created: time::OffsetDateTime =
        client.query_one("SELECT created_at FROM hook_events WHERE id = $1", &[&late]).await.unwrap().get(0);
    assert!(late_created < time::OffsetDateTime::now_utc() - hook_store::LATE_COMMIT_MARGIN);

    // Committed, but below the mark: the claims do not walk there; the rescan does.
    assert!(claim(&store, 10).await.is_none());
    assert!(store.rescan().await.unwrap());
    assert_eq!(claim_and_succeed(&store, 10).await, [late]);

    // Rows a batch locked and released come back at once, below the mark: another store, whose
    // first claim reads from the beginning.
    let old = insert_aged(&client, 6, 3600).await;
    let store = db.store(no_rescan()).await;
    let (first, events) = claim(&store, 3).await.expect("a batch");
    assert_eq!(events.iter().map(|e| e.id).collect::<Vec<_>>(), old[..3]);
    let second = claim_and_succeed(&store, 3).await;
    assert_eq!(second, old[3..]);
    assert!(claim(&store, 10).await.is_none(), "the first three are still held");
    first.release().await;
    assert_eq!(claim_and_succeed(&store, 10).await, old[..3], "released rows are claimed without a rescan");
}

#[tokio::test]
async fn the_background_rescan_claims_a_late_event_within_its_interval() {
    let db = TestDb::migrated("claim_cost_rescan").await;
    let client = db.client().await;
    let interval = Duration::from_secs(1);
    let store =
        db.store(StoreOptions { listen: false, rescan_interval: interval, ..StoreOptions::default() }).await;
    let newer = insert_events(&client, 2, "PreToolUse", "tool_invocation").await;
    assert_eq!(claim_and_succeed(&store, 10).await, newer);
    // An event created an hour ago (a producer's clock behind the database's, or a long
    // transaction) arrives after the claims moved on.
    let late = insert_aged(&client, 1, 3600).await;
    // Claims go on as the engine's would (it polls every second); the rescan, started by a claim
    // once its interval has passed, lowers the mark.
    let started = tokio::time::Instant::now();
    let mut claimed = Vec::new();
    while claimed.is_empty() {
        assert!(started.elapsed() < Duration::from_secs(60), "the late event was never claimed");
        tokio::time::sleep(Duration::from_millis(100)).await;
        claimed = claim_and_succeed(&store, 10).await;
    }
    assert_eq!(claimed, late);
}

#[tokio::test]
async fn under_a_held_snapshot_the_mark_spares_the_claim_the_dead_index_entries() {
    let db = TestDb::migrated("claim_cost_horizon").await;
    let client = db.client().await;
    let store = db.store(no_rescan()).await;
    let holder = store.pool().get().await.unwrap();
    bench::hold_snapshot(&holder).await.unwrap();
    // 20,000 events an hour old, processed while the snapshot is held: vacuum can remove none of
    // their index entries, and no scan can mark them dead.
    insert_aged(&client, 20_000, 3600).await;
    client.batch_execute("UPDATE hook_events SET processed = true, processed_at = now()").await.unwrap();
    client.batch_execute("VACUUM (ANALYZE) hook_events").await.unwrap();
    let fresh = insert_events(&client, 5, "PreToolUse", "tool_invocation").await;

    // The mark a claim that took the oldest of them would leave.
    let oldest: time::OffsetDateTime = client
        .query_one("SELECT min(created_at) FROM hook_events WHERE NOT processed", &[])
        .await
        .unwrap()
        .get(0);
    let beginning = explain(&store, 100, None, true).await;
    let mark = explain(&store, 100, Some(oldest), true).await;
    assert_eq!((beginning.rows, mark.rows), (5, 5));
    check_small(&mark, 5, "from the mark");
    assert!(
        beginning.buffers > 10 * mark.buffers,
        "from the beginning {} buffers, from the mark {}",
        beginning.buffers,
        mark.buffers
    );
    // The store's own claims: the first reads from the beginning, the next from its mark.
    assert_eq!(claim_and_succeed(&store, 100).await, fresh);
    let next = insert_events(&client, 2, "PreToolUse", "tool_invocation").await;
    assert_eq!(claim_and_succeed(&store, 100).await, next);
    bench::release_snapshot(&holder).await.unwrap();
}

/// Under a held snapshot a full rescan walks every dead index entry below the mark; a recent one
/// (what the store runs between full ones when those are slow, see `PgStore`'s `Mark`) reads
/// only the window it looks at, and still finds a late event there.
#[tokio::test]
async fn under_a_held_snapshot_a_recent_rescan_reads_its_window_and_a_full_one_everything() {
    let db = TestDb::migrated("claim_cost_rescan_window").await;
    let client = db.client().await;
    let store = db.store(no_rescan()).await;
    let (holder, pooled) = (store.pool().get().await.unwrap(), store.pool().get().await.unwrap());
    bench::hold_snapshot(&holder).await.unwrap();
    insert_aged(&client, 20_000, 3600).await;
    client.batch_execute("UPDATE hook_events SET processed = true, processed_at = now()").await.unwrap();
    client.batch_execute("VACUUM (ANALYZE) hook_events").await.unwrap();
    // Two events below the mark: one created half an hour ago (a replay, say), one 5 s ago (a
    // producer's transaction that committed late).
    let old = insert_aged(&client, 1, 1800).await;
    let late = insert_aged(&client, 1, 5).await;
    let floor = created_at(&client, late[0]).await + time::Duration::SECOND;

    let recent =
        bench::explain_rescan(&pooled, floor, Some(floor - time::Duration::seconds(20))).await.unwrap();
    let full = bench::explain_rescan(&pooled, floor, None).await.unwrap();
    assert_eq!(recent.rows, 1, "the recent rescan finds the late event\n{:#}", recent.json);
    assert_eq!(full.rows, 1, "{:#}", full.json);
    assert_eq!(recent.seq_scans + full.seq_scans, 0);
    assert!(recent.buffers < 50, "the recent rescan read {} buffers\n{:#}", recent.buffers, recent.json);
    // 20,000 dead entries: their index pages and the heap pages behind them.
    assert!(
        full.buffers > 200 && full.buffers > 10 * recent.buffers,
        "the full rescan read {} buffers (the dead entries), the recent one {}",
        full.buffers,
        recent.buffers
    );
    // What each finds: the recent one the late event, the full one the oldest.
    let none = hook_core::SessionOrder::default();
    let found = |from| bench::rescan(&pooled, floor, from, &none);
    let late_at = created_at(&client, late[0]).await;
    assert_eq!(found(Some(floor - time::Duration::seconds(20))).await.unwrap(), Some(Some(late_at)));
    assert_eq!(found(None).await.unwrap(), Some(Some(created_at(&client, old[0]).await)));
    assert_eq!(claim_and_succeed(&store, 10).await, [old[0], late[0]], "both claimable, the oldest first");
    bench::release_snapshot(&holder).await.unwrap();
}

/// Issue 15: under a held snapshot, the rows batches leave in the claim ledger (one inserted and
/// deleted per batch, none of which vacuum may remove) are not read by the claim while their
/// processors live: thousands of batches later, the claim reads what it read after the first.
#[tokio::test]
async fn under_a_held_snapshot_the_rows_of_thousands_of_batches_cost_the_claim_nothing() {
    let db = TestDb::migrated("claim_cost_ledger_horizon").await;
    let client = db.client().await;
    let store = db.store(no_rescan()).await;
    let holder = store.pool().get().await.unwrap();
    bench::hold_snapshot(&holder).await.unwrap();
    let presence = hook_tests::worker::Deadline::new(Duration::from_secs(60), "the store's presence");
    let mut batches = 0;
    let mut first = None;
    while batches < 3_000 {
        let ids = insert_events(&client, 1, "PreToolUse", "tool_invocation").await;
        let (mut batch, events) = claim(&store, 100).await.expect("a batch");
        assert_eq!(events.iter().map(|e| e.id).collect::<Vec<_>>(), ids);
        batch.start().await.unwrap();
        let outcomes = vec![Outcome { id: ids[0], resolution: Resolution::Succeeded, metadata: Map::new() }];
        batch.finish(outcomes).await.unwrap();
        if first.is_none() {
            // Counted from the first batch recorded under the store's presence key.
            if count(&client, "SELECT count(*) FROM hook_events_processors").await == 0 {
                presence.tick().await;
                continue;
            }
            let next = insert_events(&client, 1, "PreToolUse", "tool_invocation").await;
            let floor = created_at(&client, next[0]).await;
            first = Some((explain(&store, 100, Some(floor), true).await, next));
            assert_eq!(claim_and_succeed(&store, 100).await, first.as_ref().unwrap().1);
        }
        batches += 1;
    }
    let (before, _) = first.unwrap();
    let pages: i64 =
        client.query_one("SELECT pg_relation_size('hook_events_claims') / 8192", &[]).await.unwrap().get(0);
    assert!(pages >= 20, "the ledger holds the batches' dead rows: {pages} pages");
    let next = insert_events(&client, 1, "PreToolUse", "tool_invocation").await;
    let after = explain(&store, 100, Some(created_at(&client, next[0]).await), true).await;
    check_small(&after, 1, "after 3,000 batches");
    assert!(
        after.buffers <= before.buffers + 5,
        "the claim read {} buffers after 3,000 batches and {} after the first; the ledger is {pages} pages",
        after.buffers,
        before.buffers
    );
    bench::release_snapshot(&holder).await.unwrap();
}

async fn created_at(client: &Client, id: Uuid) -> time::OffsetDateTime {
    client
        .query_one("SELECT created_at FROM hook_events WHERE id = $1", &[&id])
        .await
        .expect("the event")
        .get(0)
}

/// The outcome statements are prepared once per connection, and their generic plan is made
/// under the statistics of that moment: made when the table was empty, the success statement
/// joins the batch to a sequential scan of `hook_events`, and keeps doing so for as long as no
/// `ANALYZE` comes (for ever on a server with autovacuum off): every completion reading the
/// whole table. Planned as the store plans it (at each run), it probes the primary key.
#[tokio::test]
async fn completions_probe_the_primary_key_however_the_table_grew_after_their_plan_was_made() {
    let db = TestDb::migrated("claim_cost_outcome_plans").await;
    let client = db.client().await;
    // As on a server with autovacuum off: no ANALYZE comes between the steps.
    client
        .batch_execute("ALTER TABLE hook_events SET (autovacuum_enabled = false); ANALYZE hook_events")
        .await
        .unwrap();
    let store = db.store(no_rescan()).await;
    let pooled = store.pool().get().await.expect("a pooled connection");
    const GROWN: i64 = 200_000;

    // What the setting prevents: the generic plan made on the empty table (a walk of the whole
    // table, by a sequential scan or a full index scan, with the batch probed for each row).
    let unplanned = bench::explain_success_after_growth(&pooled, GROWN, false).await.unwrap();
    assert!(rows_read(&unplanned.json[0]["Plan"]) >= GROWN, "{:#}", unplanned.json);

    // The rows rolled back are still in the table's file, which the planner sees: empty it.
    client.batch_execute("TRUNCATE hook_events; ANALYZE hook_events").await.unwrap();
    let planned = bench::explain_success_after_growth(&pooled, GROWN, true).await.unwrap();
    assert_eq!(planned.rows, 0, "{:#}", planned.json);
    assert_eq!(planned.seq_scans, 0, "{:#}", planned.json);
    assert_eq!(planned.indexes, ["hook_events_pkey"], "{:#}", planned.json);
    assert_eq!(rows_read(&planned.json[0]["Plan"]), 100, "{:#}", planned.json);
}

/// The rows a plan's scans of `hook_events` returned, over all their loops.
fn rows_read(node: &serde_json::Value) -> i64 {
    let own = if node["Relation Name"] == "hook_events" && node["Node Type"] != "ModifyTable" {
        node["Actual Rows"].as_i64().unwrap_or(0) * node["Actual Loops"].as_i64().unwrap_or(1)
    } else {
        0
    };
    own + node["Plans"].as_array().map_or(0, |children| children.iter().map(rows_read).sum())
}

/// Found by the horizon phase (docs/benchmarks.md): from minute 7, with 200,000 events processed
/// under a held snapshot, each one-event completion took milliseconds and read thousands of
/// buffers. The success statement's `NOT e.processed` let the planner serve the lookup by id with
/// a partial index of pending rows (`idx_hook_events_processed`), which the statistics said held
/// almost nothing and which, under the snapshot, still held an entry for every processed event.
/// Phrased `processed IS NOT TRUE`, the lookup probes the primary key whatever the statistics.
#[tokio::test]
async fn a_completion_under_a_held_snapshot_probes_the_primary_key_not_the_pending_indexes() {
    const PROCESSED: i64 = 50_000;
    let db = TestDb::migrated("claim_cost_completion_horizon").await;
    let client = db.client().await;
    client.batch_execute("ALTER TABLE hook_events SET (autovacuum_enabled = false)").await.unwrap();
    let reader = db.client().await;
    reader
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM hook_events")
        .await
        .expect("the held snapshot");
    client
        .execute(
            "INSERT INTO hook_events (id, source, action, resource, resource_id)
             SELECT gen_random_uuid(), 'PreToolUse', 'tool_invocation', 'tool', 'Bash'
             FROM generate_series(1, $1::int8)",
            &[&PROCESSED],
        )
        .await
        .unwrap();
    client
        .batch_execute("UPDATE hook_events SET processed = TRUE, processed_at = clock_timestamp()")
        .await
        .unwrap();
    // Vacuum can remove none of the 50,000 dead versions; the statistics say nothing is pending.
    client.batch_execute("VACUUM hook_events").await.unwrap();
    client.batch_execute("ANALYZE hook_events").await.unwrap();
    let fresh = Uuid::new_v4();
    client
        .execute(
            "INSERT INTO hook_events (id, source, action, resource, resource_id)
             VALUES ($1, 'PreToolUse', 'tool_invocation', 'tool', 'Bash')",
            &[&fresh],
        )
        .await
        .unwrap();

    let store = db.store(no_rescan()).await;
    let pooled = store.pool().get().await.expect("a pooled connection");
    let plan = bench::explain_success(&pooled, &[fresh], false).await.unwrap();
    assert_eq!(plan.indexes, ["hook_events_pkey"], "{:#}", plan.json);
    assert_eq!(plan.seq_scans, 0, "{:#}", plan.json);
    assert!(plan.buffers < 100, "{} buffers: {:#}", plan.buffers, plan.json);
    assert_eq!(rows_read(&plan.json[0]["Plan"]), 1, "{:#}", plan.json);
    // What the phrasing before did here (a walk of the index of pending rows, whose 50,000
    // entries of processed events the snapshot keeps): if PostgreSQL stops choosing it, this
    // test no longer shows the hazard, and says so.
    let before = bench::explain_success(&pooled, &[fresh], true).await.unwrap();
    assert!(
        before.indexes != ["hook_events_pkey"] && before.buffers > 10 * plan.buffers,
        "the phrasing before reads the pending rows' index, dead entries and all ({} buffers against {}): {:#}",
        before.buffers,
        plan.buffers,
        before.json
    );
    reader.batch_execute("ROLLBACK").await.unwrap();
}

/// Review of f1b7157: the duration a full rescan records (`rescan_done`'s `took`) counts its wait
/// for a pooled connection. One wait of 3 s (the pool's connections held by batches in flight),
/// on a database with nothing vacuum cannot remove (a full walk takes a millisecond), makes every
/// rescan of the next 300 s a recent one: an event revived an hour below the mark (a replay, the
/// reset SQL, a producer's clock behind) waits minutes, not an interval.
#[tokio::test]
async fn a_full_rescan_that_waited_for_a_connection_does_not_postpone_the_next() {
    let db = TestDb::migrated("claim_cost_rescan_pool_wait").await;
    let client = db.client().await;
    let interval = Duration::from_secs(1);
    let store = db
        .store(StoreOptions {
            listen: false,
            rescan_interval: interval,
            pool_size: 1,
            ..StoreOptions::default()
        })
        .await;
    let first = insert_events(&client, 1, "PreToolUse", "tool_invocation").await;
    assert_eq!(claim_and_succeed(&store, 10).await, first);
    tokio::time::sleep(interval + Duration::from_millis(100)).await;
    // This claim starts the first rescan (a full one), which waits 3 s for the only connection:
    // the batch holds it.
    let held = insert_events(&client, 1, "PreToolUse", "tool_invocation").await;
    let (batch, events) = claim(&store, 10).await.expect("a batch");
    assert_eq!(events.iter().map(|e| e.id).collect::<Vec<_>>(), held);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let outcomes =
        held.iter().map(|&id| Outcome { id, resolution: Resolution::Succeeded, metadata: Map::new() });
    batch.finish(outcomes.collect()).await.expect("the completion");
    // Let that rescan run (it finds nothing) before the event comes back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let revived = insert_aged(&client, 1, 3600).await;
    let started = tokio::time::Instant::now();
    let mut claimed = Vec::new();
    while claimed.is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "an event an hour below the mark not claimed in 15 rescan intervals of 1 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        claimed = claim_and_succeed(&store, 10).await;
    }
    assert_eq!(claimed, revived);
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_a_failed_claim_locked_are_claimed_next_though_a_claim_beside_it_moved_the_mark_past_them() {
    let db = TestDb::migrated("claim_cost_failed_beside").await;
    let client = db.client().await;
    let store = db.store(no_rescan()).await;
    // The first set-aside waits half a second, then fails: the claim that makes it has its rows
    // locked all that time, then fails and leaves them unlocked.
    client
        .batch_execute(
            "CREATE SEQUENCE fail_once; \
             CREATE FUNCTION fail_once() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN \
                 IF nextval('fail_once') = 1 THEN \
                     PERFORM pg_sleep(0.5); \
                     RAISE EXCEPTION 'injected: the set-aside failed'; \
                 END IF; \
                 RETURN NEW; \
             END $$; \
             CREATE TRIGGER fail_once BEFORE UPDATE ON hook_events FOR EACH ROW \
                 WHEN (NEW.dead_at IS NOT NULL) EXECUTE FUNCTION fail_once();",
        )
        .await
        .unwrap();
    // An event too large for the first claim (which sets it aside) ahead of 10, then 10 more,
    // all older than the late-commit margin, so that a claim's mark is the oldest row it locked.
    let large = Uuid::new_v4();
    client
        .execute(
            "INSERT INTO hook_events (id, source, action, resource, resource_id, payload, created_at) \
             VALUES ($1, 'PreToolUse', 'tool_invocation', 'tool', 'Bash', \
                     jsonb_build_object('text', repeat('x', 2000)), now() - interval '2 hours')",
            &[&large],
        )
        .await
        .unwrap();
    let first = insert_aged(&client, 10, 3600).await;
    let second = insert_aged(&client, 10, 1800).await;

    let failing = ClaimRequest { limit: 11, max_bytes: 1000, max_event_bytes: 1000, ..request(11) };
    let beside = async {
        // Once the failing claim sits in its trigger, with its 11 rows locked, a claim beside it
        // takes the next 10 and moves the mark past all of them.
        while count(&client, "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'").await == 0
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        claim_and_succeed(&store, 10).await
    };
    let (failed, took) = tokio::join!(store.claim(failing), beside);
    assert!(failed.is_err(), "the injected failure fails the claim");
    assert_eq!(took, second, "the claim beside it skipped the locked rows");

    // No rescan runs: the next claim finds the failed claim's rows because its failure lowered
    // the mark again.
    let next = claim_and_succeed(&store, 20).await;
    let expected: Vec<Uuid> = std::iter::once(large).chain(first).collect();
    assert_eq!(next, expected, "the rows the failed claim had locked");
}
