//! Session order in the claim (issue 12, item 3), against a real PostgreSQL: under an ordered
//! route a claim takes only each session's head (its oldest event neither processed nor dead),
//! one per session, none behind a head another claim holds; a failed event holds its session
//! back until it succeeds or dies while other sessions go on; events of unordered routes and
//! events without a session are not held back; and the claim reads a few buffers per session
//! with pending events, whatever their backlog (asserted on `EXPLAIN (ANALYZE, BUFFERS)`).

use std::time::Duration;

use hook_core::{ClaimRequest, ClaimedBatch, HookEvent, OrderRule, Outcome, Resolution, SessionOrder, Store};
use hook_store::testing::TestDb;
use hook_store::{bench, PgBatch, PgStore, StoreOptions};
use serde_json::Map;
use tokio_postgres::Client;
use uuid::Uuid;

/// `PreToolUse` events are ordered; every other source is not.
fn order() -> SessionOrder {
    SessionOrder {
        rules: vec![
            OrderRule { source: "PreToolUse".into(), action: "*".into(), ordered: true },
            OrderRule { source: "Stop".into(), action: "*".into(), ordered: false },
        ],
    }
}

/// A migrated database with session order's index, as an ordered store's `migrate` has it
/// built (in a task of its own; here at once).
async fn ordered_db(test: &str) -> TestDb {
    let db = TestDb::migrated(test).await;
    let built = db.store(options()).await.ensure_indexes(hook_store::indexes::SESSION_ORDER).await;
    assert_eq!(built.expect("built"), ["hook_events_order_idx"], "the migrations do not build it");
    db
}

fn options() -> StoreOptions {
    StoreOptions {
        listen: false,
        rescan_interval: Duration::from_secs(3600),
        session_order: order(),
        ..StoreOptions::default()
    }
}

/// docs/routes.md, "Unblocking a session": the heads that hold their sessions back.
const HEADS_WAITING: &str = "SELECT * FROM (
    SELECT DISTINCT ON (session) left(coalesce(metadata->>'session_id', payload->>'session_id'), 128) AS session,
           id, source, action, retry_count, next_attempt_at, processing_errors[cardinality(processing_errors)] AS last_error
    FROM hook_events
    WHERE NOT processed AND dead_at IS NULL
      AND left(coalesce(metadata->>'session_id', payload->>'session_id'), 128) IS NOT NULL
    ORDER BY 1, created_at, id) AS heads
WHERE next_attempt_at > now()";

fn request(limit: usize) -> ClaimRequest {
    ClaimRequest { limit, max_retry_count: 3, ..ClaimRequest::default() }
}

/// Inserts `per` events in each of `sessions` sessions (`s0`, `s1`, ...) of `source`,
/// interleaved (event 0 of every session, then event 1, ...), 1 µs apart; returns the ids by
/// session, each in created_at order.
async fn insert_sessions(client: &Client, sessions: usize, per: usize, source: &str) -> Vec<Vec<Uuid>> {
    let by_session: Vec<Vec<Uuid>> =
        (0..sessions).map(|_| (0..per).map(|_| Uuid::new_v4()).collect()).collect();
    let (mut ids, mut keys) = (Vec::new(), Vec::new());
    for i in 0..per {
        for (s, events) in by_session.iter().enumerate() {
            ids.push(events[i]);
            keys.push(format!("s{s}"));
        }
    }
    for (ids, keys) in ids.chunks(5_000).zip(keys.chunks(5_000)) {
        client
            .execute(
                "INSERT INTO hook_events (id, source, action, resource, resource_id, metadata, created_at)
                 SELECT id, $3, 'tool_invocation', 'tool', 'Bash', jsonb_build_object('session_id', key),
                        clock_timestamp() + ord * interval '1 microsecond'
                 FROM unnest($1::uuid[], $2::text[]) WITH ORDINALITY AS t(id, key, ord)",
                &[&ids, &keys, &source],
            )
            .await
            .expect("insert session events");
    }
    by_session
}

async fn claim(store: &PgStore, limit: usize) -> Option<(PgBatch, Vec<HookEvent>)> {
    let mut batch = store.claim(request(limit)).await.expect("the claim query")?;
    let events = batch.take_events();
    Some((batch, events))
}

/// Claims the heads on `store`, and kills its processor as the database sees it once their
/// batch's ledger row is written: the heads become suspects. Returns the heads' ids.
async fn kill_holding_the_heads(client: &Client, store: &PgStore) -> Vec<Uuid> {
    let (mut held, events) = claim(store, 100).await.expect("the heads");
    hook_tests::crash::registered(client).await;
    held.start().await.expect("the batch's ledger row");
    hook_tests::crash::kill_the_processor(client).await;
    drop(held);
    ids(&events)
}

/// An isolated claim on `store`: one suspect, started (its ledger row taken over); its ids.
async fn claim_isolated(store: &PgStore) -> (PgBatch, Vec<Uuid>) {
    let mut batch = store
        .claim(ClaimRequest { isolate: true, ..request(100) })
        .await
        .expect("the isolated claim")
        .expect("a suspect");
    let events = batch.take_events();
    assert!(batch.isolated(), "a suspect runs alone");
    batch.start().await.expect("start");
    (batch, ids(&events))
}

/// Inserts an event of `session` with a `created_at` an hour ago, as one committed late.
async fn insert_late(client: &Client, session: &str) -> Uuid {
    let late = Uuid::new_v4();
    client
        .execute(
            "INSERT INTO hook_events (id, source, action, resource, resource_id, metadata, created_at)
             VALUES ($1, 'PreToolUse', 'tool_invocation', 'tool', 'Bash', jsonb_build_object('session_id', $2::text),
                     clock_timestamp() - interval '1 hour')",
            &[&late, &session],
        )
        .await
        .expect("the late insert");
    late
}

fn ids(events: &[HookEvent]) -> Vec<Uuid> {
    events.iter().map(|e| e.id).collect()
}

fn succeeded(ids: &[Uuid]) -> Vec<Outcome> {
    ids.iter().map(|&id| Outcome { id, resolution: Resolution::Succeeded, metadata: Map::new() }).collect()
}

fn failed(id: Uuid, retry_after: Option<Duration>) -> Outcome {
    Outcome {
        id,
        resolution: Resolution::Failed { error: "sink down".into(), retry_after },
        metadata: Map::new(),
    }
}

#[tokio::test]
async fn a_claim_takes_each_sessions_head_and_nothing_behind_a_head_another_claim_holds() {
    let db = ordered_db("order_heads").await;
    let client = db.client().await;
    let sessions = insert_sessions(&client, 3, 3, "PreToolUse").await;
    // Not held back: an unordered route's events of the same session, and an ordered route's
    // event without a session.
    let unordered = insert_sessions(&client, 1, 2, "Stop").await;
    let lone =
        hook_tests::insert_event(&client, "PreToolUse", "tool_invocation", serde_json::json!({})).await;
    let (a, b) = (db.store(options()).await, db.store(options()).await);

    let (first, events) = claim(&a, 100).await.expect("a batch");
    let heads: Vec<Uuid> = sessions.iter().map(|s| s[0]).collect();
    let mut expected = heads.clone();
    expected.extend(&unordered[0]);
    expected.push(lone);
    assert_eq!(ids(&events), expected, "the heads, oldest first, and the events not held back");

    // Every head is held by `a`: `b` finds nothing, the heads' successors included.
    assert!(claim(&b, 100).await.is_none(), "a claim behind heads another claim holds");

    first.finish(succeeded(&ids(&events))).await.expect("the completion");
    let (second, events) = claim(&b, 100).await.expect("the next heads");
    assert_eq!(ids(&events), sessions.iter().map(|s| s[1]).collect::<Vec<_>>());
    second.finish(succeeded(&ids(&events))).await.expect("the completion");

    // A claim of one takes the oldest head.
    let (third, events) = claim(&a, 1).await.expect("one head");
    assert_eq!(ids(&events), [sessions[0][2]]);
    third.release().await;
}

#[tokio::test]
async fn a_failed_event_holds_back_its_session_until_it_succeeds_or_dies_while_others_go_on() {
    let db = ordered_db("order_failed").await;
    let client = db.client().await;
    let sessions = insert_sessions(&client, 2, 3, "PreToolUse").await;
    let (held, other) = (&sessions[0], &sessions[1]);
    let store = db.store(options()).await;

    // The first attempt of the held session's head fails: it waits for a retry an hour away.
    let (batch, events) = claim(&store, 100).await.expect("a batch");
    assert_eq!(ids(&events), [held[0], other[0]]);
    batch
        .finish(vec![failed(held[0], Some(Duration::from_secs(3600))), succeeded(&[other[0]]).remove(0)])
        .await
        .expect("the completion");

    // The other session goes on to its end; the held one stays behind its failed event.
    for next in &other[1..] {
        let (batch, events) = claim(&store, 100).await.expect("the other session");
        assert_eq!(ids(&events), [*next], "only the session that is not held back");
        batch.finish(succeeded(&[*next])).await.expect("the completion");
    }
    assert!(claim(&store, 100).await.is_none(), "the held session's later events are claimed");

    // Its retry due: it is claimed again, alone; failing for good (dead) frees the session.
    client
        .execute("UPDATE hook_events SET next_attempt_at = now() WHERE id = $1", &[&held[0]])
        .await
        .expect("make the retry due");
    let (batch, events) = claim(&store, 100).await.expect("the retry");
    assert_eq!(ids(&events), [held[0]]);
    batch.finish(vec![failed(held[0], None)]).await.expect("the completion");
    let (batch, events) = claim(&store, 100).await.expect("the next event of the freed session");
    assert_eq!(ids(&events), [held[1]]);
    batch.finish(succeeded(&[held[1]])).await.expect("the completion");

    // An operator's unblock (docs/routes.md): mark the head processed by SQL.
    let (batch, events) = claim(&store, 100).await.expect("the last event");
    assert_eq!(ids(&events), [held[2]]);
    batch.finish(vec![failed(held[2], Some(Duration::from_secs(3600)))]).await.expect("the completion");
    // A new event of the held session (`s0`) waits behind it.
    let extra = insert_sessions(&client, 1, 1, "PreToolUse").await;
    assert!(claim(&store, 100).await.is_none(), "behind the waiting event");
    // The operator's query of docs/routes.md finds the head that holds its session back.
    let heads = client.query(HEADS_WAITING, &[]).await.expect("the heads query");
    let found: Vec<(String, Uuid)> = heads.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(found, [("s0".to_owned(), held[2])]);
    client
        .execute(
            "UPDATE hook_events SET processed = TRUE, processed_at = GREATEST(now(), created_at), next_attempt_at = NULL \
             WHERE id = $1 AND NOT processed",
            &[&held[2]],
        )
        .await
        .expect("the operator's unblock");
    let (batch, events) = claim(&store, 100).await.expect("unblocked");
    assert_eq!(ids(&events), [extra[0][0]]);
    batch.release().await;
}

#[tokio::test]
async fn without_an_ordered_route_nothing_is_held_back() {
    let db = ordered_db("order_off").await;
    let client = db.client().await;
    let sessions = insert_sessions(&client, 2, 3, "PreToolUse").await;
    let off = SessionOrder {
        rules: vec![OrderRule { source: "PreToolUse".into(), action: "*".into(), ordered: false }],
    };
    let store = db.store(StoreOptions { listen: false, session_order: off, ..StoreOptions::default() }).await;
    let (batch, events) = claim(&store, 100).await.expect("a batch");
    assert_eq!(events.len(), 6, "{sessions:?}");
    batch.release().await;
}

/// The claim's plan in session order reads a few buffers per session with pending events: not
/// per pending event, nor per processed one.
#[tokio::test]
async fn the_ordered_claim_reads_a_few_buffers_per_session_whatever_the_backlog() {
    let db = ordered_db("order_cost").await;
    let client = db.client().await;
    let store = db.store(options()).await;
    // 10 sessions with 2,000 pending events each, behind 20,000 processed ones.
    insert_sessions(&client, 10, 2_000, "PreToolUse").await;
    client
        .batch_execute("UPDATE hook_events SET processed = TRUE, processed_at = created_at")
        .await
        .expect("a processed history");
    let sessions = insert_sessions(&client, 10, 2_000, "PreToolUse").await;
    client.batch_execute("VACUUM (ANALYZE) hook_events").await.expect("vacuum");

    let check = |plan: &bench::ClaimPlan, rows: i64, what: &str| {
        assert_eq!(plan.rows, rows, "{what}: rows claimed\n{:#}", plan.json);
        assert_eq!(plan.seq_scans, 0, "{what}: a sequential scan\n{:#}", plan.json);
        assert!(plan.indexes.iter().any(|i| i == "hook_events_order_idx"), "{what}: {:?}", plan.indexes);
        // About five per session (an index descent and a heap page) and the pages of the
        // fresh and due indexes and the ledger: 40,000 rows fill hundreds of pages.
        assert!(plan.buffers < 200, "{what}: {} buffers\n{:#}", plan.buffers, plan.json);
        assert!(plan.rows_removed < 100, "{what}: {} rows discarded\n{:#}", plan.rows_removed, plan.json);
    };
    // From a low-water mark after the inserts: the fresh branch, which leaves ordered events
    // out by a filter, reads only the entries of the last second before the mark (see
    // docs/routes.md); the heads are found without the mark.
    let floor = Some(time::OffsetDateTime::now_utc());
    for generic in [true, false] {
        let conn = store.pool().get().await.expect("a connection");
        let plan = bench::explain_claim_ordered(&conn, 100, floor, generic, &order()).await.expect("explain");
        check(&plan, 10, if generic { "generic plan" } else { "custom plan" });
    }
    // With every head held by a claim, the next claim finds nothing, as cheaply.
    let (batch, events) = claim(&store, 100).await.expect("the heads");
    assert_eq!(ids(&events), sessions.iter().map(|s| s[0]).collect::<Vec<_>>());
    let conn = store.pool().get().await.expect("a connection");
    let plan = bench::explain_claim_ordered(&conn, 100, floor, true, &order()).await.expect("explain");
    check(&plan, 0, "behind held heads");
    drop(conn);
    batch.release().await;
}

/// A session's next event is claimed as soon as its head commits, not at the poll interval: the
/// commit of a batch that held heads sends `NOTIFY hook_events`, which wakes every processor.
#[tokio::test]
async fn a_sessions_next_event_is_claimed_when_its_head_commits_not_at_the_poll() {
    let db = ordered_db("order_wakeup").await;
    let client = db.client().await;
    let store = db.store(StoreOptions { listen: true, ..options() }).await;
    let invocations = hook_tests::Invocations::default();
    let engine = hook_core::Engine::builder(store)
        .handler("*", "*", invocations.handler())
        .config(hook_core::EngineConfig {
            poll_interval: Duration::from_secs(30),
            ..hook_tests::test_config()
        })
        .build()
        .expect("an engine");
    let running = hook_tests::Running::start(engine);
    // The engine's first claim finds nothing; then it waits for a wakeup or the poll.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    insert_sessions(&client, 1, 20, "PreToolUse").await;
    hook_tests::wait_for_count(
        &client,
        "SELECT count(*) FROM hook_events WHERE processed",
        20,
        Duration::from_secs(20),
    )
    .await;
    let took = started.elapsed();
    running.stop().await;
    assert_eq!(invocations.total(), 20);
    // 20 events one after the other, each woken by its predecessor's commit.
    assert!(took < Duration::from_secs(20), "{took:?}");
    eprintln!("20 events of one session in {took:?}");
}

/// Review finding (scenario 1): a processor dies while it holds its sessions' heads. The heads
/// become suspects of the claim ledger: an ordinary claim takes nothing of those sessions
/// (their heads are still pending, so nothing behind them is a head, and suspects are skipped);
/// isolated claims then run each head alone, and only after a head is done does its session's
/// next event come up, as that session's new head. Nothing is stuck, nothing runs out of order.
#[tokio::test]
async fn a_processor_killed_holding_heads_leaves_its_sessions_held_until_each_head_runs_alone() {
    let db = ordered_db("order_killed_holding_heads").await;
    let client = db.client().await;
    let sessions = insert_sessions(&client, 2, 3, "PreToolUse").await;
    let a = db.store(options()).await;
    assert_eq!(kill_holding_the_heads(&client, &a).await, [sessions[0][0], sessions[1][0]]);

    let (b, c) = (db.store(options()).await, db.store(options()).await);
    assert!(claim(&c, 100).await.is_none(), "nothing behind a dead processor's heads");
    let (batch, events) = claim_isolated(&b).await;
    assert_eq!(events, [sessions[0][0]], "the oldest head first");
    assert!(claim(&c, 100).await.is_none(), "while a head runs alone, its session's next waits");
    batch.finish(succeeded(&events)).await.expect("the completion");
    // Session 0 goes on; session 1 is still held by its suspect head.
    let (next, events) = claim(&c, 100).await.expect("session 0's next head");
    assert_eq!(ids(&events), [sessions[0][1]]);
    next.finish(succeeded(&ids(&events))).await.expect("the completion");
    let (batch, events) = claim_isolated(&b).await;
    assert_eq!(events, [sessions[1][0]]);
    batch.finish(succeeded(&events)).await.expect("the completion");
    let (next, events) = claim(&c, 100).await.expect("the sessions' next heads");
    assert_eq!(ids(&events), [sessions[1][1], sessions[0][2]], "oldest first");
    next.finish(succeeded(&ids(&events))).await.expect("the completion");
}

/// Review finding (scenario 5): an event committed late with an earlier `created_at` than its
/// session's head while that head is held by a claim. The late event becomes the session's
/// oldest pending event, so the order index shows it as a head; the session lock, which the
/// first claim holds until its batch ends, keeps a second claim off it until the held head is
/// done: one event of the session at a time, the late one next (docs/routes.md).
#[tokio::test]
async fn a_late_event_older_than_the_held_head_waits_for_it_by_the_session_lock() {
    let db = ordered_db("order_late_beside_head").await;
    let client = db.client().await;
    let sessions = insert_sessions(&client, 1, 2, "PreToolUse").await;
    let (a, b) = (db.store(options()).await, db.store(options()).await);

    let (first, events) = claim(&a, 100).await.expect("the head");
    assert_eq!(ids(&events), [sessions[0][0]]);

    let late = insert_late(&client, "s0").await;

    assert!(
        claim(&b, 100).await.is_none(),
        "an event of a session whose event another claim attempts is not claimed beside it"
    );
    first.finish(succeeded(&[sessions[0][0]])).await.expect("the completion");

    let (second, events) = claim(&b, 100).await.expect("the late event, once the head is done");
    assert_eq!(ids(&events), [late], "the late event is the head now");
    second.finish(succeeded(&[late])).await.expect("the completion");
    let (third, events) = claim(&b, 100).await.expect("the session's last event");
    assert_eq!(ids(&events), [sessions[0][1]]);
    third.release().await;
}

/// Review finding (scenario 4): the session key is the text of `session_id`, whatever its JSON
/// type: the number `42` and the string `"42"` are one session, an empty string is a session
/// (every event with `""` is held to one order), and a JSON null is no session.
#[tokio::test]
async fn session_keys_are_the_text_of_any_json_value_and_an_empty_string_is_a_session() {
    let db = ordered_db("order_key_types").await;
    let client = db.client().await;
    let mut inserted = Vec::new();
    for (i, session) in ["42", "\"42\"", "\"\"", "\"\"", "null", "null"].iter().enumerate() {
        let id = Uuid::new_v4();
        client
            .execute(
                &format!(
                    "INSERT INTO hook_events (id, source, action, resource, resource_id, metadata, created_at)
                     VALUES ($1, 'PreToolUse', 'tool_invocation', 'tool', 'Bash',
                             jsonb_build_object('session_id', '{session}'::jsonb),
                             clock_timestamp() + {i} * interval '1 millisecond')"
                ),
                &[&id],
            )
            .await
            .expect("insert");
        inserted.push(id);
    }
    let store = db.store(options()).await;
    let (batch, events) = claim(&store, 100).await.expect("a batch");
    // 42 and "42": one head; "" and "": one head; the two nulls: no session, both taken.
    assert_eq!(ids(&events), [inserted[0], inserted[2], inserted[4], inserted[5]]);
    batch.release().await;
}

/// The session lock also keeps a dead processor's head, a suspect to be run alone, off its
/// session while another claim attempts an event of that session (here one committed late with
/// an older `created_at`, the session's head by the order index): the isolated claim passes over
/// that suspect to the next, and takes it once the other event is done.
#[tokio::test]
async fn a_suspect_head_waits_for_its_sessions_event_that_another_claim_attempts() {
    let db = ordered_db("order_suspect_waits_for_lock").await;
    let client = db.client().await;
    let sessions = insert_sessions(&client, 2, 2, "PreToolUse").await;
    let a = db.store(options()).await;
    assert_eq!(kill_holding_the_heads(&client, &a).await, [sessions[0][0], sessions[1][0]]);

    let late = insert_late(&client, "s0").await;
    let (b, c) = (db.store(options()).await, db.store(options()).await);
    let (other, events) = claim(&c, 100).await.expect("the late event, session 0's head");
    assert_eq!(ids(&events), [late]);

    let (batch, events) = claim_isolated(&b).await;
    assert_eq!(events, [sessions[1][0]], "session 0's suspect waits for the event another claim attempts");
    batch.finish(succeeded(&events)).await.expect("the completion");
    other.finish(succeeded(&[late])).await.expect("the completion");
    let (batch, events) = claim_isolated(&b).await;
    assert_eq!(events, [sessions[0][0]], "then session 0's suspect");
    batch.finish(succeeded(&events)).await.expect("the completion");
    let (next, events) = claim(&c, 100).await.expect("the sessions' next heads");
    assert_eq!(ids(&events), [sessions[0][1], sessions[1][1]]);
    next.finish(succeeded(&ids(&events))).await.expect("the completion");
}

/// The session locks claims of `key`'s session hold, on any connection (see `lock_session!`).
async fn session_locks(client: &Client, key: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 AND granted \
               AND classid = 1751872367 AND objid::int8 = (hashtext($1) & 1023) \
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[&key],
        )
        .await
        .expect("pg_locks")
        .get(0)
}

/// Review finding (lock before row lock): the ordered claim asks for a session's lock in the
/// scan's filter, before `FOR UPDATE SKIP LOCKED` locks the head. A claim whose snapshot still
/// shows a head that another claim commits meanwhile takes the session's lock, then drops the
/// head (its new version is processed) and keeps the lock until its own batch ends: the
/// session's next event, now its head, is claimable by nobody else for that whole batch,
/// though no event of the session is attempted. Here the second claim's walk of 200,000
/// sessions of an unordered route gives the first claim's commit time to land in that window.
#[tokio::test]
async fn a_claim_that_finds_its_head_committed_meanwhile_does_not_keep_the_sessions_lock() {
    let db = ordered_db("order_lock_before_row").await;
    let client = db.client().await;
    let session = insert_sessions(&client, 1, 2, "PreToolUse").await.remove(0);
    insert_sessions(&client, 200_000, 1, "Stop").await;
    client.batch_execute("ANALYZE hook_events").await.expect("analyze");
    let (a, b, c) = (db.store(options()).await, db.store(options()).await, db.store(options()).await);
    let (first, events) = claim(&a, 1).await.expect("the head");
    assert_eq!(ids(&events), [session[0]]);

    let watch = db.client().await;
    let finish_while_b_claims = async {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let running: i64 = watch
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                       AND state = 'active' AND query LIKE 'WITH RECURSIVE named%' \
                       AND clock_timestamp() - query_start > interval '100 milliseconds'",
                    &[],
                )
                .await
                .expect("pg_stat_activity")
                .get(0);
            if running > 0 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the second claim to start");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        first.finish(succeeded(&[session[0]])).await.expect("the completion");
    };
    let (second, ()) = futures::join!(claim(&b, 1), finish_while_b_claims);
    let (second, events) = second.expect("an event of the unordered route");
    assert!(!ids(&events).contains(&session[1]), "its snapshot predates the head's commit");
    assert_eq!(
        session_locks(&watch, "s0").await,
        0,
        "a claim that attempts no event of s0 holds s0's session lock"
    );
    let (third, events) = claim(&c, 1).await.expect("the session's next event");
    assert_eq!(ids(&events), [session[1]], "s0's next event, its head now, is claimable at once");
    third.release().await;
    second.release().await;
}

/// The outcome fallback returns to the claim's savepoint, which releases the session locks the
/// claim took; `RELOCK` takes them again, so the outcomes written one at a time are written
/// with the session still held. Seen from a trigger on the row written in the fallback.
#[tokio::test]
async fn the_outcome_fallback_holds_the_session_lock_again_while_it_writes() {
    let db = ordered_db("order_relock_session").await;
    let client = db.client().await;
    let session = insert_sessions(&client, 1, 2, "PreToolUse").await.remove(0);
    client
        .batch_execute(
            "CREATE TABLE review_probe (locks int8);
             CREATE FUNCTION review_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.result_metadata ? 'refuse' THEN
                     RAISE EXCEPTION 'refused';
                 END IF;
                 INSERT INTO review_probe SELECT count(*) FROM pg_locks
                     WHERE pid = pg_backend_pid() AND locktype = 'advisory' AND objsubid = 2 AND granted
                       AND classid = 1751872367 AND objid::int8 = (hashtext('s0') & 1023);
                 RETURN NEW;
             END $$;
             CREATE TRIGGER review_refuse BEFORE UPDATE OF processed ON hook_events
                 FOR EACH ROW WHEN (NEW.processed) EXECUTE FUNCTION review_refuse();",
        )
        .await
        .expect("the trigger");
    let store = db.store(options()).await;
    let (mut batch, events) = claim(&store, 10).await.expect("the head");
    assert_eq!(ids(&events), [session[0]]);
    batch.start().await.expect("start");
    let mut metadata = Map::new();
    metadata.insert("refuse".into(), serde_json::json!(true));
    batch
        .finish(vec![Outcome { id: session[0], resolution: Resolution::Succeeded, metadata }])
        .await
        .expect("the completion, written without its metadata");
    let probes: Vec<i64> = client
        .query("SELECT locks FROM review_probe", &[])
        .await
        .expect("probe")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(probes, [1], "written one at a time with s0's session lock held");
    assert_eq!(session_locks(&client, "s0").await, 0, "released at the batch's end");
}

/// Review of f1b7157: the rescan with ordered routes (`RESCAN_ORDERED`, its parameters
/// renumbered to `$2` the window and `$3`..`$5` the rules), full and recent: it leaves out an
/// event held to its session's order, finds the oldest other one below the mark (full), and only
/// those in its window (recent).
#[tokio::test]
async fn the_ordered_rescan_keeps_its_rules_and_its_window() {
    let db = ordered_db("session_order_rescan_window").await;
    let client = db.client().await;
    let store = db.store(options()).await;
    let pooled = store.pool().get().await.unwrap();
    let insert = |source: &'static str, age_secs: i64| {
        let client = &client;
        async move {
            let id = Uuid::new_v4();
            let created: time::OffsetDateTime = client
                .query_one(
                    "INSERT INTO hook_events (id, source, action, resource, resource_id, metadata, created_at)
                     VALUES ($1, $2, 'tool_invocation', 'tool', 'Bash', '{\"session_id\": \"s0\"}',
                             now() - $3::int8 * interval '1 second')
                     RETURNING created_at",
                    &[&id, &source, &age_secs],
                )
                .await
                .unwrap()
                .get(0);
            created
        }
    };
    // Held to its session's order (an ordered route with a session): never a rescan's find.
    let _ordered_old = insert("PreToolUse", 3600).await;
    let free_old = insert("Stop", 1800).await;
    let late = insert("Stop", 5).await;
    let floor = time::OffsetDateTime::now_utc() + time::Duration::SECOND;
    let rules = order();
    let found = |from| bench::rescan(&pooled, floor, from, &rules);
    assert_eq!(found(None).await.unwrap(), Some(Some(free_old)), "full: the oldest not held to order");
    assert_eq!(found(Some(floor - time::Duration::seconds(20))).await.unwrap(), Some(Some(late)), "recent");
    assert_eq!(found(Some(late + time::Duration::MICROSECOND)).await.unwrap(), None, "nothing in the window");
    assert_eq!(
        found(Some(free_old - time::Duration::seconds(1))).await.unwrap(),
        Some(Some(free_old)),
        "a window that reaches the old one"
    );
}
