//! Transactional enqueue on a real PostgreSQL: an event is committed if and only if the caller's
//! transaction is, through every kind of client a caller may hold; and the embedding example,
//! run end to end.

use std::sync::Arc;
use std::time::Duration;

use hook_core::{Engine, HandlerRegistry, HandlerResult, HookEvent, NewEvent};
use hook_store::testing::TestDb;
use hook_store::{enqueue, enqueue_many, StoreOptions};
use hook_tests::{count, test_config, wait_for_count, Running};
use serde_json::json;
use time::OffsetDateTime;

/// The example program, compiled into this test so that it runs against the test's database.
#[path = "../../crates/hook-store/examples/embedded_service.rs"]
#[allow(dead_code)]
mod embedded_service;

const ALL: &str = "SELECT count(*) FROM hook_events";

fn order_event(order: &str) -> NewEvent {
    NewEvent::new("OrderService", "order_placed", "order", order)
        .with_payload(json!({"item": "tea", "quantity": 2}))
        .with_metadata(json!({"request_id": "r-7"}))
}

#[tokio::test]
async fn a_rolled_back_transaction_leaves_no_event() {
    let db = TestDb::migrated("enqueue_rollback").await;
    let mut client = db.client().await;
    let tx = client.transaction().await.unwrap();
    assert!(enqueue(&tx, &order_event("o-1")).await.unwrap());
    assert_eq!(enqueue_many(&tx, &[order_event("o-2"), order_event("o-3")]).await.unwrap(), 2);
    tx.rollback().await.unwrap();
    assert_eq!(count(&client, ALL).await, 0);

    // The same through a pooled connection's transaction, dropped without a commit.
    let store = db.store(StoreOptions { listen: false, ..StoreOptions::default() }).await;
    let mut pooled = store.pool().get().await.unwrap();
    let tx = pooled.transaction().await.unwrap();
    enqueue(&tx, &order_event("o-4")).await.unwrap();
    drop(tx);
    assert_eq!(count(&client, ALL).await, 0);
}

#[tokio::test]
async fn a_committed_event_is_processed_and_not_before_the_commit() {
    let db = TestDb::migrated("enqueue_commit").await;
    let client = db.client().await;
    let seen = Arc::new(std::sync::Mutex::new(Vec::<HookEvent>::new()));
    let mut registry = HandlerRegistry::new();
    let record = Arc::clone(&seen);
    registry.register("OrderService", "order_placed", move |event: Arc<HookEvent>| {
        record.lock().unwrap().push((*event).clone());
        std::future::ready(HandlerResult::ok("confirmed"))
    });
    let store = db.store(StoreOptions::default()).await;
    let running =
        Running::start(Engine::builder(store).registry(registry).config(test_config()).build().unwrap());

    let store = db.store(StoreOptions { listen: false, ..StoreOptions::default() }).await;
    let mut pooled = store.pool().get().await.unwrap();
    let tx = pooled.transaction().await.unwrap();
    let event = order_event("o-1");
    enqueue(&tx, &event).await.unwrap();
    // Several polls of the processor pass: an uncommitted event is invisible to it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(seen.lock().unwrap().is_empty(), "handled before its transaction committed");
    tx.commit().await.unwrap();

    wait_for_count(&client, "SELECT count(*) FROM hook_events WHERE processed", 1, Duration::from_secs(10))
        .await;
    let totals = running.stop().await;
    assert_eq!((totals.succeeded, totals.failed), (1, 0));
    let handled = seen.lock().unwrap().clone();
    assert_eq!(handled.len(), 1);
    let got = &handled[0];
    assert_eq!(
        (got.id, got.source.as_str(), got.action.as_str(), got.resource.as_str(), got.resource_id.as_str()),
        (event.id, "OrderService", "order_placed", "order", "o-1")
    );
    assert_eq!((&got.payload, &got.metadata), (&event.payload, &event.metadata));
    assert!((got.processed, got.retry_count) == (false, 0));
}

#[tokio::test]
async fn every_kind_of_client_can_enqueue() {
    let db = TestDb::migrated("enqueue_clients").await;
    let mut client = db.client().await;
    let store = db.store(StoreOptions { listen: false, ..StoreOptions::default() }).await;

    assert!(enqueue(&client, &order_event("tokio-client")).await.unwrap());
    let tx = client.transaction().await.unwrap();
    assert!(enqueue(&tx, &order_event("tokio-transaction")).await.unwrap());
    tx.commit().await.unwrap();

    let mut pooled = store.pool().get().await.unwrap();
    assert!(enqueue(&pooled, &order_event("deadpool-object")).await.unwrap());
    assert!(enqueue(&*pooled, &order_event("deadpool-client-wrapper")).await.unwrap());
    let tx = pooled.transaction().await.unwrap();
    assert_eq!(enqueue_many(&tx, &[order_event("deadpool-transaction")]).await.unwrap(), 1);
    tx.commit().await.unwrap();

    let ids: Vec<String> = client
        .query("SELECT resource_id FROM hook_events ORDER BY resource_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        ids,
        [
            "deadpool-client-wrapper",
            "deadpool-object",
            "deadpool-transaction",
            "tokio-client",
            "tokio-transaction"
        ]
    );
}

#[tokio::test]
async fn enqueue_is_idempotent_by_id_and_stores_every_field() {
    let db = TestDb::migrated("enqueue_fields").await;
    let client = db.client().await;
    let at = OffsetDateTime::from_unix_timestamp(1_760_000_000).unwrap();
    let dated = order_event("o-1").with_created_at(at);
    let undated = order_event("o-2");

    assert!(enqueue(&client, &dated).await.unwrap());
    assert!(!enqueue(&client, &dated).await.unwrap(), "the same id again is skipped");
    let changed = dated.clone().with_payload(json!({"changed": true}));
    assert!(!enqueue(&client, &changed).await.unwrap(), "and leaves the stored event alone");
    // A batch with a stored id, a repeated id and two new ones.
    let third = order_event("o-3");
    let batch = [dated.clone(), undated.clone(), undated.clone(), third.clone()];
    assert_eq!(enqueue_many(&client, &batch).await.unwrap(), 2);
    assert_eq!(enqueue_many(&client, &[]).await.unwrap(), 0);
    assert_eq!(count(&client, ALL).await, 3);

    let row = client
        .query_one(
            "SELECT source, action, resource, resource_id, payload, metadata, created_at, processed, \
                    retry_count, processing_errors IS NULL, next_attempt_at IS NULL, dead_at IS NULL \
             FROM hook_events WHERE id = $1",
            &[&dated.id],
        )
        .await
        .unwrap();
    let text: [String; 4] = [row.get(0), row.get(1), row.get(2), row.get(3)];
    assert_eq!(text, ["OrderService", "order_placed", "order", "o-1"]);
    assert_eq!(row.get::<_, serde_json::Value>(4), json!({"item": "tea", "quantity": 2}));
    assert_eq!(row.get::<_, serde_json::Value>(5), json!({"request_id": "r-7"}));
    assert_eq!(row.get::<_, OffsetDateTime>(6), at);
    let fresh: (bool, i32, bool, bool, bool) = (row.get(7), row.get(8), row.get(9), row.get(10), row.get(11));
    assert_eq!(fresh, (false, 0, true, true, true));
    // Undated events get the database's clock.
    let recent: bool = client
        .query_one(
            "SELECT created_at > now() - interval '1 minute' FROM hook_events WHERE id = $1",
            &[&undated.id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(recent);
    assert_eq!(NewEvent::new("a", "b", "c", "d").id.get_version_num(), 7);
}

#[tokio::test]
async fn a_bad_event_fails_the_batch_and_inserts_nothing() {
    let db = TestDb::migrated("enqueue_bad").await;
    let client = db.client().await;
    let too_long = NewEvent::new("OrderService", "order_placed", "order", "x".repeat(256));
    let nul = order_event("o-nul").with_payload(json!({"text": "a\u{0}b"}));
    for bad in [too_long, nul] {
        let error = enqueue_many(&client, &[order_event("ok"), bad.clone()]).await.unwrap_err();
        assert!(matches!(error, hook_store::StoreError::Db(_)), "{error}");
        assert!(enqueue(&client, &bad).await.is_err());
    }
    assert_eq!(count(&client, ALL).await, 0);
    // After the failures, a large batch goes in whole, in one statement.
    let events: Vec<NewEvent> = (0..1000).map(|n| order_event(&format!("o-{n}"))).collect();
    assert_eq!(enqueue_many(&client, &events).await.unwrap(), 1000);
    assert_eq!(count(&client, ALL).await, 1000);
}

#[tokio::test]
async fn the_embedded_service_example_runs() {
    let db = TestDb::migrated("example_service").await;
    let service = embedded_service::run(db.config(), 4, std::future::pending());
    let report =
        tokio::time::timeout(Duration::from_secs(60), service).await.expect("the service finished").unwrap();
    assert_eq!(report.confirmed, 4, "{report:?}");
    assert_eq!(report.notes, 4, "one note per committed order: {report:?}");
    assert_eq!(report.others, 4, "one billing event per committed order: {report:?}");
    assert_eq!((report.totals.succeeded, report.totals.failed), (12, 0), "{report:?}");

    let client = db.client().await;
    let orders: Vec<String> = client
        .query("SELECT status FROM example_orders WHERE run = $1", &[&report.run])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(orders, ["confirmed"; 4], "the rolled-back fifth order left nothing");
    assert_eq!(count(&client, ALL).await, 12, "nor any of its events");
    assert_eq!(count(&client, "SELECT count(*) FROM hook_events WHERE NOT processed").await, 0);
}
