//! The claim, completion and failure SQL against a real PostgreSQL, with fencing.

use std::time::Duration;

use hook_core::{ClaimRequest, ClaimedBatch, Outcome, Resolution, Store};
use hook_store::testing::TestDb;
use hook_store::{PgStore, StoreOptions};
use hook_tests::{count, insert_event, insert_events};
use serde_json::{json, Map};
use uuid::Uuid;

fn request(limit: usize) -> ClaimRequest {
    ClaimRequest {
        limit,
        max_retry_count: 3,
        claim_timeout: Duration::from_secs(60),
        ..ClaimRequest::default()
    }
}

fn no_listen() -> StoreOptions {
    StoreOptions { listen: false, ..StoreOptions::default() }
}

async fn claim(store: &PgStore, limit: usize) -> (hook_store::PgBatch, Vec<hook_core::HookEvent>) {
    let mut batch = store.claim(request(limit)).await.expect("the claim query").expect("a batch");
    let events = batch.take_events();
    (batch, events)
}

fn succeeded(id: Uuid) -> Outcome {
    Outcome { id, resolution: Resolution::Succeeded, metadata: Map::from_iter([("k".to_owned(), json!(1))]) }
}

fn failed(id: Uuid, retry_after: Option<Duration>) -> Outcome {
    Outcome { id, resolution: Resolution::Failed { error: "boom".into(), retry_after }, metadata: Map::new() }
}

#[tokio::test]
async fn claims_oldest_first_and_never_the_same_event_twice() {
    let db = TestDb::migrated("claims_oldest_first").await;
    let client = db.client().await;
    let ids = insert_events(&client, 10, "PreToolUse", "tool_invocation").await;
    let a = db.store(no_listen()).await;
    let b = db.store(no_listen()).await;

    let (batch_a, events_a) = claim(&a, 4).await;
    let (batch_b, events_b) = claim(&b, 100).await;
    let got_a: Vec<Uuid> = events_a.iter().map(|e| e.id).collect();
    let got_b: Vec<Uuid> = events_b.iter().map(|e| e.id).collect();
    assert_eq!(got_a, ids[..4], "oldest first");
    assert_eq!(got_b, ids[4..], "the second claim skips the first's rows");
    // Everything is held: a third claim finds nothing.
    assert!(a.claim(request(100)).await.unwrap().is_none());
    batch_a.finish(vec![]).await.unwrap();
    batch_b.finish(vec![]).await.unwrap();
    // Finishing without outcomes released the events unchanged.
    let (batch, events) = claim(&a, 100).await;
    assert_eq!(events.len(), 10);
    assert!(events.iter().all(|e| !e.processed && e.retry_count == 0));
    batch.finish(vec![]).await.unwrap();
}

#[tokio::test]
async fn success_and_failure_are_recorded_in_one_batch() {
    let db = TestDb::migrated("success_and_failure").await;
    let client = db.client().await;
    let ids = insert_events(&client, 3, "Stop", "session_stopped").await;
    let store = db.store(no_listen()).await;
    let (batch, _) = claim(&store, 10).await;
    batch
        .finish(vec![succeeded(ids[0]), failed(ids[1], Some(Duration::from_secs(30))), failed(ids[2], None)])
        .await
        .unwrap();

    let row = client
        .query_one(
            "SELECT processed, processed_at >= created_at, result_metadata, retry_count, processing_errors
             FROM hook_events WHERE id = $1",
            &[&ids[0]],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    assert!(row.get::<_, bool>(1));
    assert_eq!(row.get::<_, serde_json::Value>(2), json!({"k": 1}));
    assert_eq!(row.get::<_, i32>(3), 0);
    assert_eq!(row.get::<_, Option<Vec<String>>>(4), None);

    let row = client
        .query_one(
            "SELECT processed, retry_count, processing_errors, dead_at IS NULL,
                    next_attempt_at BETWEEN now() + interval '25 s' AND now() + interval '35 s'
             FROM hook_events WHERE id = $1",
            &[&ids[1]],
        )
        .await
        .unwrap();
    assert!(!row.get::<_, bool>(0));
    assert_eq!(row.get::<_, i32>(1), 1);
    assert_eq!(row.get::<_, Vec<String>>(2), ["boom"]);
    assert!(row.get::<_, bool>(3), "a retried event is not dead");
    assert!(row.get::<_, bool>(4), "next attempt scheduled by the given delay");

    let row = client
        .query_one(
            "SELECT processed, retry_count, dead_at IS NOT NULL FROM hook_events WHERE id = $1",
            &[&ids[2]],
        )
        .await
        .unwrap();
    assert!(!row.get::<_, bool>(0), "dead events stay unprocessed, as in the original");
    assert_eq!(row.get::<_, i32>(1), 1);
    assert!(row.get::<_, bool>(2), "dead events are marked");

    // Neither the scheduled nor the dead event is claimable now.
    assert!(store.claim(request(10)).await.unwrap().is_none());
}

#[tokio::test]
async fn a_lost_claim_writes_nothing_and_its_events_return() {
    let db = TestDb::migrated("lost_claim").await;
    let client = db.client().await;
    let ids = insert_events(&client, 5, "PreToolUse", "tool_invocation").await;
    let store = db.store(no_listen()).await;
    let (batch, events) = claim(&store, 10).await;
    assert_eq!(events.len(), 5);

    // The server kills the claim's session (as when a processor's connection dies).
    let killed = count(
        &client,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid() AND state = 'idle in transaction'",
    )
    .await;
    assert_eq!(killed, 1);

    // Fencing: the holder's completion fails and writes nothing.
    let result = batch.finish(ids.iter().map(|&id| succeeded(id)).collect()).await;
    assert!(result.is_err(), "completion after the claim was lost must fail");
    assert_eq!(count(&client, "SELECT count(*) FROM hook_events WHERE processed").await, 0);

    // The events are claimable again at once.
    let other = db.store(no_listen()).await;
    let (batch, events) = claim(&other, 10).await;
    assert_eq!(events.len(), 5);
    batch.finish(events.iter().map(|e| succeeded(e.id)).collect()).await.unwrap();
    assert_eq!(count(&client, "SELECT count(*) FROM hook_events WHERE processed").await, 5);
}

#[tokio::test]
async fn a_dropped_batch_releases_its_events() {
    let db = TestDb::migrated("dropped_batch").await;
    let client = db.client().await;
    insert_events(&client, 3, "PreToolUse", "tool_invocation").await;
    let store = db.store(no_listen()).await;
    let (batch, _) = claim(&store, 10).await;
    drop(batch);
    // The pool must not hand out the dropped batch's connection with its transaction open.
    let (batch, events) = claim(&store, 10).await;
    assert_eq!(events.len(), 3);
    batch.finish(vec![]).await.unwrap();
}

#[tokio::test]
async fn a_silent_holder_loses_its_claim_after_the_claim_timeout() {
    let db = TestDb::migrated("claim_timeout").await;
    let client = db.client().await;
    insert_events(&client, 2, "PreToolUse", "tool_invocation").await;
    let store = db.store(no_listen()).await;
    let short = ClaimRequest { claim_timeout: Duration::from_millis(300), ..request(10) };
    let mut batch = store.claim(short).await.unwrap().unwrap();
    let events = batch.take_events();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The server ended the idle transaction: another claimer gets the events.
    let (other, again) = claim(&store, 10).await;
    assert_eq!(again.len(), 2);
    assert!(batch.finish(events.iter().map(|e| succeeded(e.id)).collect()).await.is_err());
    other.finish(vec![]).await.unwrap();
}

#[tokio::test]
async fn eligibility_respects_schedule_limit_and_dead_mark() {
    let db = TestDb::migrated("eligibility").await;
    let client = db.client().await;
    let due = insert_event(&client, "A", "a", json!({})).await;
    let later = insert_event(&client, "A", "a", json!({})).await;
    let at_limit = insert_event(&client, "A", "a", json!({})).await;
    let dead = insert_event(&client, "A", "a", json!({})).await;
    let done = insert_event(&client, "A", "a", json!({})).await;
    client
        .batch_execute(&format!(
            "UPDATE hook_events SET next_attempt_at = now() - interval '1 s', retry_count = 1 WHERE id = '{due}';
             UPDATE hook_events SET next_attempt_at = now() + interval '1 h' WHERE id = '{later}';
             UPDATE hook_events SET retry_count = 10 WHERE id = '{at_limit}';
             UPDATE hook_events SET dead_at = now() WHERE id = '{dead}';
             UPDATE hook_events SET processed = true, processed_at = now() WHERE id = '{done}';"
        ))
        .await
        .unwrap();
    let store = db.store(no_listen()).await;
    let (batch, events) = claim(&store, 10).await;
    assert_eq!(events.iter().map(|e| e.id).collect::<Vec<_>>(), [due]);
    batch.finish(vec![]).await.unwrap();
    // The row at the limit was not handed out, but set aside in the claim: dead, with the reason.
    let row = client
        .query_one(
            "SELECT dead_at IS NOT NULL, processing_errors FROM hook_events WHERE id = $1",
            &[&at_limit],
        )
        .await
        .unwrap();
    let errors: Vec<String> = row.get(1);
    assert!(row.get::<_, bool>(0));
    assert!(errors.len() == 1 && errors[0].starts_with("retry_count 10 is at MAX_RETRY_COUNT"), "{errors:?}");
}

#[tokio::test]
async fn odd_rows_are_claimed_and_recorded() {
    let db = TestDb::migrated("odd_rows").await;
    let client = db.client().await;
    // NULL elements in processing_errors, a created_at far in the future (producer clock skew),
    // and an error text holding everything PostgreSQL text can.
    let nulls = insert_event(&client, "A", "a", json!(null)).await;
    let future = insert_event(&client, "A", "a", json!("just a string")).await;
    client
        .batch_execute(&format!(
            "UPDATE hook_events SET processing_errors = ARRAY[NULL, 'x'] WHERE id = '{nulls}';
             UPDATE hook_events SET created_at = now() + interval '2 hours' WHERE id = '{future}';"
        ))
        .await
        .unwrap();
    let store = db.store(no_listen()).await;
    let (batch, events) = claim(&store, 10).await;
    assert_eq!(events.len(), 2);
    let with_nulls = events.iter().find(|e| e.id == nulls).unwrap();
    assert_eq!(with_nulls.processing_errors.as_deref(), Some(&["x".to_owned()][..]));
    batch
        .finish(vec![
            failed(nulls, Some(Duration::ZERO)),
            Outcome { id: future, resolution: Resolution::Succeeded, metadata: Map::new() },
        ])
        .await
        .unwrap();
    let ok: bool = client
        .query_one(
            "SELECT processed AND processed_at >= created_at FROM hook_events WHERE id = $1",
            &[&future],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ok, "an event from the future is processed without breaking processing_time_valid");
    let errors: Vec<Option<String>> = client
        .query_one("SELECT processing_errors FROM hook_events WHERE id = $1", &[&nulls])
        .await
        .unwrap()
        .get(0);
    assert_eq!(errors, [None, Some("x".into()), Some("boom".into())]);
}

#[tokio::test]
async fn migrations_are_idempotent_and_concurrent_runs_take_turns() {
    let db = TestDb::empty("migrations_concurrent").await;
    let stores: Vec<PgStore> = futures::future::join_all((0..4).map(|_| db.store(no_listen()))).await;
    let reports = futures::future::join_all(stores.iter().map(|s| s.migrate())).await;
    let applied: Vec<Vec<i32>> = reports.into_iter().map(|r| r.unwrap().applied).collect();
    assert_eq!(
        applied.iter().filter(|a| !a.is_empty()).count(),
        1,
        "exactly one runner applies: {applied:?}"
    );
    assert_eq!(applied.iter().flatten().count(), hook_store::migrate::MIGRATIONS.len());
    assert!(stores[0].migrate().await.unwrap().applied.is_empty(), "re-running is a no-op");
    let client = db.client().await;
    assert_eq!(
        count(&client, "SELECT count(*) FROM hook_events_migrations").await,
        hook_store::migrate::MIGRATIONS.len() as i64
    );
    for index in
        ["hook_events_claim_idx", "hook_events_fresh_idx", "hook_events_due_idx", "hook_events_failed_idx"]
    {
        assert!(valid_index(&client, index).await, "{index}");
    }
}

fn ordered_options() -> StoreOptions {
    let order = hook_core::SessionOrder {
        rules: vec![hook_core::OrderRule { source: "*".into(), action: "*".into(), ordered: true }],
    };
    StoreOptions { session_order: order, ..no_listen() }
}

/// Waits (up to 30 s) for `index` to be valid.
async fn until_valid(client: &tokio_postgres::Client, index: &str) {
    for _ in 0..300 {
        if valid_index(client, index).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{index} was not built within 30 s");
}

/// Whether `index` exists and is valid.
async fn valid_index(client: &tokio_postgres::Client, index: &str) -> bool {
    client
        .query_one(
            "SELECT coalesce((SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)), false)",
            &[&index],
        )
        .await
        .expect("read pg_index")
        .get(0)
}

/// The console's and session order's indexes are built by them, not by the migrations: a queue
/// with neither does not write them. Concurrent builders build each once; an invalid leftover of
/// an interrupted build is rebuilt; a build that fails says which index and why, and the next
/// call builds it.
#[tokio::test]
async fn indexes_a_feature_reads_are_built_by_it_once_and_not_by_the_migrations() {
    use hook_store::indexes::{self, CONSOLE, SESSION_ORDER};
    let db = TestDb::migrated("optional_indexes").await;
    let client = db.client().await;
    for index in CONSOLE.iter().chain(SESSION_ORDER) {
        assert!(!valid_index(&client, index.name).await, "{} is not built by the migrations", index.name);
    }
    insert_events(&client, 50, "PreToolUse", "tool_invocation").await;

    // Three processes start a console at once: one builds, the others find them built.
    let clients = futures::future::join_all((0..3).map(|_| db.client())).await;
    let built = futures::future::join_all(clients.iter().map(|c| indexes::ensure(c, CONSOLE))).await;
    let built: Vec<Vec<&str>> = built.into_iter().map(Result::unwrap).collect();
    assert_eq!(built.iter().flatten().count(), 2, "each index built once: {built:?}");
    for index in CONSOLE {
        assert!(valid_index(&client, index.name).await, "{}", index.name);
    }
    assert!(indexes::ensure(&client, CONSOLE).await.unwrap().is_empty(), "built: nothing to do");
    assert!(!valid_index(&client, "hook_events_order_idx").await, "only the set asked for");

    // An ordered store's migrate builds session order's (in a task of its own); an unordered
    // one's does not.
    let plain = db.store(no_listen()).await;
    plain.migrate().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!valid_index(&client, "hook_events_order_idx").await);
    let ordered = db.store(ordered_options()).await;
    ordered.migrate().await.unwrap();
    until_valid(&client, "hook_events_order_idx").await;

    // What an interrupted CREATE INDEX CONCURRENTLY leaves: an invalid index of that name.
    client
        .batch_execute(
            "UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'hook_events_session_idx'::regclass",
        )
        .await
        .unwrap();
    assert_eq!(indexes::missing(&client, CONSOLE).await.unwrap(), [CONSOLE[1]]);
    assert_eq!(indexes::ensure(&client, CONSOLE).await.unwrap(), ["hook_events_session_idx"]);
    assert!(valid_index(&client, "hook_events_session_idx").await);

    // A role that may not build it: the error names the index and the server's reason.
    client.batch_execute("DROP INDEX hook_events_created_idx").await.unwrap();
    let role = format!("optional_indexes_reader_{}", std::process::id());
    client
        .batch_execute(&format!("CREATE ROLE {role}; GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}"))
        .await
        .unwrap();
    let reader = db.client().await;
    reader.batch_execute(&format!("SET ROLE {role}")).await.unwrap();
    let error = indexes::ensure(&reader, CONSOLE).await.expect_err("no right to build").to_string();
    assert!(error.contains("building index hook_events_created_idx") && error.contains("owner"), "{error}");
    assert!(!valid_index(&client, "hook_events_created_idx").await);
    assert_eq!(indexes::ensure(&client, CONSOLE).await.unwrap(), ["hook_events_created_idx"]);
    drop(reader);
    client.batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}")).await.unwrap();
}

/// A build waits for the transactions older than it. A session's own `lock_timeout` or
/// `statement_timeout` does not cancel it halfway (which would leave an invalid index that every
/// writer still maintains); the session's settings are back afterwards. And an ordered store's
/// `migrate` does not wait for it: it returns, and the index is there once the old snapshot is
/// gone.
#[tokio::test]
async fn a_build_outlasts_session_timeouts_and_a_held_snapshot_holds_up_no_start() {
    use hook_store::indexes::{self, CONSOLE};
    for setting in ["lock_timeout", "statement_timeout"] {
        let db = TestDb::migrated(&format!("index_build_{setting}")).await;
        let admin = db.client().await;
        insert_events(&admin, 200, "PreToolUse", "tool_invocation").await;
        let mut config = db.config();
        config.options(format!("-c {setting}=500"));
        let (console, connection) = config.connect(tokio_postgres::NoTls).await.expect("connect");
        tokio::spawn(connection);
        let console = std::sync::Arc::new(console);
        let snapshot = db.client().await;
        snapshot
            .batch_execute(
                "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM hook_events_migrations",
            )
            .await
            .unwrap();
        let building = console.clone();
        let task =
            tokio::spawn(async move { indexes::ensure(&building, CONSOLE).await.map_err(|e| e.to_string()) });

        // Meanwhile an ordered store starts: its migrate does not wait for the snapshot.
        let ordered = db.store(ordered_options()).await;
        tokio::time::timeout(Duration::from_secs(5), ordered.migrate())
            .await
            .expect("an ordered store's migrate returns while a snapshot holds its build")
            .unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!task.is_finished(), "{setting}: waiting for the snapshot, not cancelled");
        assert!(!valid_index(&admin, "hook_events_order_idx").await);
        snapshot.batch_execute("COMMIT").await.unwrap();
        let built = task.await.unwrap().expect("built once the snapshot is gone");
        assert_eq!(built, ["hook_events_created_idx", "hook_events_session_idx"], "{setting}");
        let shown: String = console.query_one(&format!("SHOW {setting}"), &[]).await.unwrap().get(0);
        assert_eq!(shown, "500ms", "{setting}: the session's own value is back");
        until_valid(&admin, "hook_events_order_idx").await;
    }
}

/// An index of one of the names on another table is neither taken for it nor dropped: the
/// build says why, and builds the others.
#[tokio::test]
async fn an_index_of_the_name_on_another_table_is_refused_not_dropped() {
    use hook_store::indexes::{self, CONSOLE};
    let db = TestDb::migrated("index_name_taken").await;
    let client = db.client().await;
    client.batch_execute("CREATE INDEX hook_events_session_idx ON hook_events_archive (id)").await.unwrap();
    let error = indexes::ensure(&client, CONSOLE).await.expect_err("refused").to_string();
    assert!(error.contains("hook_events_session_idx") && error.contains("another table"), "{error}");
    assert!(valid_index(&client, "hook_events_created_idx").await, "the other one was built");
    let table: String = client
        .query_one("SELECT indrelid::regclass::text FROM pg_index WHERE indexrelid = 'hook_events_session_idx'::regclass", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(table, "hook_events_archive", "the user's index is still there");
}

#[tokio::test]
async fn an_edited_migration_is_refused() {
    let db = TestDb::migrated("edited_migration").await;
    let client = db.client().await;
    client
        .batch_execute("UPDATE hook_events_migrations SET checksum = 'edited' WHERE version = 2")
        .await
        .unwrap();
    let store = db.store(no_listen()).await;
    let error = store.migrate().await.unwrap_err().to_string();
    assert!(error.contains("migration 2") && error.contains("edited"), "{error}");
}

#[tokio::test]
async fn an_insert_wakes_the_listener_once_per_statement() {
    let db = TestDb::migrated("notify").await;
    let client = db.client().await;
    let store = db.store(StoreOptions::default()).await;
    let mut wakeups = store.wakeups().expect("listening");
    // The first wakeup comes when LISTEN is established.
    tokio::time::timeout(Duration::from_secs(10), wakeups.changed()).await.unwrap().unwrap();
    wakeups.borrow_and_update();
    insert_events(&client, 1000, "PreToolUse", "tool_invocation").await;
    tokio::time::timeout(Duration::from_secs(5), wakeups.changed()).await.expect("woken by NOTIFY").unwrap();
    // A raw listener counts notifications: one multi-row statement sends one.
    let (listener, mut connection) = db.config().connect(tokio_postgres::NoTls).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        use futures::StreamExt;
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                let _ = tx.send(n.channel().to_owned());
            }
        }
    });
    listener.batch_execute("LISTEN hook_events").await.unwrap();
    insert_events(&client, 5000, "PreToolUse", "tool_invocation").await;
    listener.batch_execute("SELECT 1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut received = Vec::new();
    while let Ok(channel) = rx.try_recv() {
        received.push(channel);
    }
    assert_eq!(received, ["hook_events"], "5,000 rows in one statement send one notification");
}

#[tokio::test]
async fn outcomes_are_written_inside_the_claiming_transaction() {
    // Regression: COMMIT once overtook the completion UPDATEs on a connection whose statements
    // were not prepared yet, so the updates ran after the locks were released (unfenced). The
    // claim transaction's SET LOCAL is visible only inside it; this trigger refuses any update
    // of hook_events that runs outside a claim.
    let db = TestDb::migrated("completion_fenced").await;
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE FUNCTION only_in_claim() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF current_setting('idle_in_transaction_session_timeout') = '0' THEN
                     RAISE EXCEPTION 'hook_events updated outside the claiming transaction';
                 END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER only_in_claim BEFORE UPDATE ON hook_events
                 FOR EACH ROW EXECUTE FUNCTION only_in_claim();",
        )
        .await
        .unwrap();
    let ids = insert_events(&client, 4, "PreToolUse", "tool_invocation").await;
    for round in 0..2 {
        // A new store each round: nothing is prepared on its connections yet.
        let store = db.store(no_listen()).await;
        let (batch, events) = claim(&store, 2).await;
        let outcomes = events
            .iter()
            .enumerate()
            .map(|(i, e)| if i == 0 { succeeded(e.id) } else { failed(e.id, Some(Duration::ZERO)) })
            .collect();
        batch.finish(outcomes).await.unwrap_or_else(|e| panic!("round {round}: {e}"));
    }
    assert_eq!(count(&client, "SELECT count(*) FROM hook_events WHERE processed").await, 2);
    assert_eq!(count(&client, "SELECT count(*) FROM hook_events WHERE retry_count = 1").await, 2);
    assert_eq!(ids.len(), 4);
}

#[tokio::test]
async fn processed_at_is_when_the_outcome_is_written_not_when_the_claim_began() {
    let db = TestDb::migrated("processed_at_clock").await;
    let client = db.client().await;
    let ids = insert_events(&client, 1, "PreToolUse", "tool_invocation").await;
    let store = db.store(no_listen()).await;
    let (batch, _) = claim(&store, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let finishing = std::time::SystemTime::now();
    batch.finish(vec![succeeded(ids[0])]).await.unwrap();
    let processed_at: std::time::SystemTime = client
        .query_one("SELECT processed_at FROM hook_events WHERE id = $1", &[&ids[0]])
        .await
        .unwrap()
        .get(0);
    // Same machine, same clock: the outcome was written after the handler's 300 ms, not at the
    // claim's start (allow 50 ms for clock granularity and scheduling).
    let lag = finishing.duration_since(processed_at).unwrap_or_default();
    assert!(lag < Duration::from_millis(50), "processed_at is {lag:?} before the outcome was written");
}
