//! A network that goes silent under the store: a [`SilentProxy`] between [`PgStore`] and the
//! test server stops forwarding (no RST, no FIN; the kernel keeps acknowledging), and every call
//! on a silent connection must fail within the store's call timeout with
//! [`StoreError::Timeout`], the connection must never be reused, and once the network is back
//! the store must work on fresh connections with nothing lost or recorded twice. The processor
//! binary's side (detection in its log, recovery, SIGTERM during the silence) is in
//! `bins/processor/tests/silent_network.rs`.

use std::time::{Duration, Instant};

use hook_core::{ClaimRequest, ClaimedBatch, Outcome, Resolution, Store};
use hook_store::testing::{SilentProxy, TestDb};
use hook_store::{PgBatch, PgStore, StoreError, StoreOptions};
use hook_tests::{count, insert_events, wait_for_count};
use serde_json::Map;

/// The call timeout of these tests' stores.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// How much later than its deadline a call may fail on a busy machine.
const SLACK: Duration = Duration::from_secs(3);

fn request(limit: usize) -> ClaimRequest {
    ClaimRequest {
        limit,
        max_retry_count: 3,
        claim_timeout: Duration::from_secs(60),
        ..ClaimRequest::default()
    }
}

fn succeeded(batch: &[hook_core::HookEvent]) -> Vec<Outcome> {
    batch
        .iter()
        .map(|e| Outcome { id: e.id, resolution: Resolution::Succeeded, metadata: Map::new() })
        .collect()
}

async fn claim(store: &PgStore, limit: usize) -> (PgBatch, Vec<hook_core::HookEvent>) {
    let mut batch = store.claim(request(limit)).await.expect("the claim").expect("a batch");
    let events = batch.take_events();
    (batch, events)
}

/// Asserts that `call` fails with a timeout naming `what`, within the call timeout and slack.
async fn times_out<T>(what: &str, call: impl std::future::Future<Output = Result<T, StoreError>>) {
    let started = Instant::now();
    let result = tokio::time::timeout(CALL_TIMEOUT * 10, call).await.unwrap_or_else(|_| {
        panic!("{what}: still waiting after {:?} on a silent network", CALL_TIMEOUT * 10)
    });
    let elapsed = started.elapsed();
    match result {
        Err(StoreError::Timeout { what: got, after }) => {
            assert_eq!(got, what);
            assert_eq!(after, CALL_TIMEOUT);
        }
        // A claim that had to open a connection first fails on the pool's connect deadline,
        // which is the same call timeout.
        Err(StoreError::Pool(message)) if what == "claim" => {
            assert!(message.contains("no answer from the database within the call timeout"), "{message}");
        }
        Err(other) => panic!("{what}: expected a timeout, got {other}"),
        Ok(_) => panic!("{what}: succeeded on a silent network"),
    }
    assert!(elapsed >= CALL_TIMEOUT, "{what} failed before its deadline: {elapsed:?}");
    assert!(elapsed < CALL_TIMEOUT + SLACK, "{what} failed only after {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_on_a_silent_network_time_out_and_the_store_recovers_on_fresh_connections() {
    let db = TestDb::migrated("silent_store").await;
    let client = db.client().await;
    hook_store::bench::install_outcome_audit(&client).await.expect("install the outcome audit");
    insert_events(&client, 12, "PreToolUse", "tool_invocation").await;
    let proxy = SilentProxy::start(&db.config()).await;
    let options = StoreOptions { pool_size: 4, call_timeout: CALL_TIMEOUT, ..StoreOptions::default() };
    let store =
        PgStore::connect(proxy.config(&db.config()), options).await.expect("connect through the proxy");
    let mut wakeups = store.wakeups().expect("the store listens");
    let (a, events_a) = claim(&store, 4).await;
    let (b, events_b) = claim(&store, 4).await;
    assert_eq!((events_a.len(), events_b.len()), (4, 4));
    let accepted_before = proxy.accepted();

    proxy.freeze();
    // A completion sent into the silence: it fails, and whether its COMMIT lands is unknown.
    times_out("recording outcomes", a.finish(succeeded(&events_a))).await;
    // A keep-alive: fails; the batch is dropped, its connection closed with it.
    times_out("keep-alive", b.keep_alive()).await;
    drop(b);
    // A new claim, on an idle pooled connection or a new one: fails too.
    times_out("claim", store.claim(request(4))).await;
    // The LISTEN connection pings every half call timeout: it has noticed and is reconnecting.
    let until = Instant::now() + CALL_TIMEOUT * 10;
    while proxy.accepted() <= accepted_before + 1 {
        assert!(Instant::now() < until, "no reconnect attempt through the proxy while it was silent");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Back: the LISTEN connection is re-established, which marks a wakeup.
    wakeups.borrow_and_update();
    proxy.thaw();
    tokio::time::timeout(CALL_TIMEOUT * 10, wakeups.changed())
        .await
        .expect("a wakeup after the LISTEN connection is back")
        .expect("the store is alive");
    insert_events(&client, 2, "Stop", "session_stopped").await;
    // Everything not processed is claimable again on fresh connections (the late COMMIT of `a`
    // may or may not have landed; b's session is rolled back once the server hears from it).
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let left = count(&client, "SELECT count(*) FROM hook_events WHERE NOT processed").await;
        if left == 0 {
            break;
        }
        assert!(Instant::now() < until, "{left} events never became claimable again");
        match store.claim(request(100)).await.expect("claims work again") {
            Some(mut batch) => {
                let events = batch.take_events();
                batch.finish(succeeded(&events)).await.expect("completions work again");
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    wait_for_count(&client, "SELECT count(*) FROM hook_events WHERE processed", 14, Duration::from_secs(5))
        .await;
    let audit = hook_store::bench::outcome_audit(&client).await.expect("read the audit");
    assert_eq!(audit.successes, 14, "{audit:?}");
    assert_eq!(audit.events_without_one_success, 0, "{audit:?}");
    assert_eq!(audit.failures, 0, "{audit:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn connecting_to_a_silent_server_fails_within_the_call_timeout() {
    let db = TestDb::migrated("silent_connect").await;
    let proxy = SilentProxy::start(&db.config()).await;
    proxy.freeze();
    let options = StoreOptions { listen: false, call_timeout: CALL_TIMEOUT, ..StoreOptions::default() };
    let started = Instant::now();
    let connected =
        tokio::time::timeout(CALL_TIMEOUT * 10, PgStore::connect(proxy.config(&db.config()), options))
            .await
            .expect("connect gave up on its own");
    let error = connected.expect_err("no connection through a silent proxy");
    assert!(error.to_string().contains("connect: no answer from the database"), "{error}");
    assert!(started.elapsed() < CALL_TIMEOUT + SLACK, "{:?}", started.elapsed());
    assert_eq!(proxy.accepted(), 1, "the TCP connect succeeded; the startup got no answer");
}
