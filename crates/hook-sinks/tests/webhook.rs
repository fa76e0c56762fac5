//! The webhook sink against a real HTTP server on loopback: each status class and its outcome,
//! `Retry-After`, the signature (checked with the recipe of docs/routes.md), TLS with a private
//! CA, and, through the engine, a receiver that is down for 30 s.

mod common;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use common::{event, insert, registry, row, test_config, wait_for_count, Receiver, Running, UNDECIDED};
use hmac::{KeyInit, Mac};
use hook_core::{Handler, NewEvent, RetryHint};
use hook_sinks::{Delivery, NamedSink, Secret, WebhookConfig, WebhookSink};
use hook_store::testing::TestDb;
use serde_json::json;

fn sink(url: &str, timeout: Duration) -> NamedSink {
    let config = WebhookConfig { timeout, ..WebhookConfig::new(url.parse().expect("url")) };
    NamedSink::new("hook", WebhookSink::new(config).expect("sink"), timeout)
}

#[tokio::test]
async fn each_status_class_leads_to_its_outcome() {
    let receiver = Receiver::default();
    let addr = receiver.start().await;
    let at = |path: &str| sink(&format!("http://{addr}/{path}"), Duration::from_secs(2));

    let delivered = at("ok").deliver(event("Stop", "x")).await;
    let Delivery::Delivered { facts } = &delivered else { panic!("{delivered:?}") };
    assert_eq!(facts["status"], 200);

    for (path, status, text) in [("fail", 500, "database on fire")] {
        let outcome = at(path).deliver(event("Stop", "x")).await;
        let Delivery::Retryable { error, retry_after, .. } = &outcome else { panic!("{path}: {outcome:?}") };
        assert!(error.starts_with(&format!("HTTP {status}")) && error.ends_with(text), "{error}");
        assert_eq!(*retry_after, None);
    }

    let busy = at("busy").deliver(event("Stop", "x")).await;
    let Delivery::Retryable { error, retry_after, facts } = &busy else { panic!("{busy:?}") };
    assert!(error.starts_with("HTTP 429"), "{error}");
    assert_eq!(*retry_after, Some(Duration::from_secs(3)));
    assert_eq!(facts["retry_after_s"], 3.0);

    for (path, status) in [("bad", 400), ("gone", 410), ("redirect", 302), ("unknown", 404)] {
        let outcome = at(path).deliver(event("Stop", "x")).await;
        let Delivery::Permanent { error, facts } = &outcome else { panic!("{path}: {outcome:?}") };
        assert!(error.starts_with(&format!("HTTP {status}")), "{error}");
        assert_eq!(facts["status"], status);
    }

    // Slower than the timeout: retryable.
    let slow =
        sink(&format!("http://{addr}/slow"), Duration::from_millis(500)).deliver(event("Stop", "x")).await;
    let Delivery::Retryable { error, .. } = &slow else { panic!("{slow:?}") };
    assert!(error.contains("timed out after 0.500s"), "{error}");

    // Nobody listening: retryable.
    let down = sink(&format!("http://127.0.0.1:{}/ok", common::free_port()), Duration::from_secs(2))
        .deliver(event("Stop", "x"))
        .await;
    let Delivery::Retryable { error, .. } = &down else { panic!("{down:?}") };
    assert!(error.contains("onnect"), "{error}");

    // As a handler: a 429 asks the engine for its Retry-After, a 400 for no retry at all.
    let result = at("busy").handle(event("Stop", "x")).await;
    assert_eq!((result.success, result.retry), (false, RetryHint::After(Duration::from_secs(3))));
    let result = at("bad").handle(event("Stop", "x")).await;
    assert_eq!((result.success, result.retry), (false, RetryHint::Never));
    assert!(result
        .error_text()
        .contains("permanent failure: sink hook: HTTP 400 Bad Request: invalid_payload"));
}

/// The Python recipe of docs/routes.md, between its markers.
fn documented_recipe() -> String {
    let doc = include_str!("../../../docs/routes.md");
    let start = doc.find("<!-- verify-recipe -->").expect("recipe start marker in docs/routes.md");
    let block = &doc[start..];
    let code_start = block.find("```python\n").expect("python block") + "```python\n".len();
    let code_end = block[code_start..].find("```").expect("end of the python block");
    block[code_start..code_start + code_end].to_owned()
}

#[tokio::test]
async fn requests_carry_the_id_and_a_signature_that_verifies_with_the_documented_recipe() {
    let receiver = Receiver::default();
    let addr = receiver.start().await;
    let secret_text = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let config = WebhookConfig {
        secret: Some(Secret::from_text(secret_text).expect("secret")),
        headers: vec![("x-team".parse().expect("name"), "agents".parse().expect("value"))],
        ..WebhookConfig::new(format!("http://{addr}/ok").parse().expect("url"))
    };
    let named = NamedSink::new("hook", WebhookSink::new(config).expect("sink"), Duration::from_secs(2));
    let sent = event("PreToolUse", "tool_invocation");
    assert!(named.deliver(Arc::clone(&sent)).await.is_delivered());
    let got = receiver.requests().pop().expect("one request");

    assert_eq!(got.header("webhook-id"), sent.id.to_string());
    assert_eq!(got.header("idempotency-key"), sent.id.to_string());
    assert_eq!(got.header("hook-attempt"), "1");
    assert_eq!(got.header("content-type"), "application/json");
    assert_eq!(got.header("x-team"), "agents");
    let timestamp: i64 = got.header("webhook-timestamp").parse().expect("unix seconds");
    assert!((time::OffsetDateTime::now_utc().unix_timestamp() - timestamp).abs() < 60);
    assert_eq!(got.json()["id"], sent.id.to_string());
    assert_eq!(got.json()["payload"], sent.payload);

    // The recipe, by hand: base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")).
    let key = base64::engine::general_purpose::STANDARD.decode(&secret_text[6..]).expect("base64");
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).expect("key");
    mac.update(format!("{}.{}.", sent.id, timestamp).as_bytes());
    mac.update(&got.body);
    let expected =
        format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()));
    assert_eq!(got.header("webhook-signature"), expected);
    assert!(hook_sinks::webhook::verify(&key, &sent.id.to_string(), timestamp, &got.body, &expected));

    // And the documented Python recipe, run as a receiver would: it accepts the request as sent,
    // and refuses it with one byte of the body changed.
    let run_recipe = |body: &[u8]| {
        let mut program = documented_recipe();
        program.push_str(
            "\nimport json, os, sys\nheaders = json.loads(os.environ['HEADERS'])\n\
             sys.exit(0 if verify(os.environ['SECRET'], headers, sys.stdin.buffer.read()) else 1)\n",
        );
        let headers = json!({
            "webhook-id": got.header("webhook-id"),
            "webhook-timestamp": got.header("webhook-timestamp"),
            "webhook-signature": got.header("webhook-signature"),
        });
        let mut child = std::process::Command::new("python3")
            .args(["-c", &program])
            .env("HEADERS", headers.to_string())
            .env("SECRET", secret_text)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs the documented recipe (install python3)");
        use std::io::Write as _;
        child.stdin.take().expect("stdin").write_all(body).expect("write body");
        child.wait().expect("python3 exit").code()
    };
    assert_eq!(run_recipe(&got.body), Some(0), "the documented recipe verifies the signature");
    let mut tampered = got.body.clone();
    tampered[1] ^= 1;
    assert_eq!(run_recipe(&tampered), Some(1), "and refuses a changed body");
}

#[tokio::test]
async fn a_body_template_sends_what_the_receiver_expects() {
    let receiver = Receiver::default();
    let addr = receiver.start().await;
    let text = format!(
        "[sinks.slack]\ntype = \"webhook\"\nurl = \"http://{addr}/ok\"\n\
         body = {{ text = \"{{source}} in {{session_id}} (attempt {{attempt}})\", blocks = [{{ payload = \"{{payload}}\" }}] }}\n\n\
         [[routes]]\nsource = \"*\"\naction = \"*\"\nsinks = [\"slack\"]\n"
    );
    let registry = registry(&text, &test_config()).await;
    let handler = registry.resolve("Stop", "x").expect("route");
    let result = handler.handle(event("Stop", "x")).await;
    assert!(result.success, "{result:?}");
    let got = receiver.requests().pop().expect("one request").json();
    assert_eq!(
        got,
        json!({"text": "Stop in s-1 (attempt 1)", "blocks": [{"payload": {"session_id": "s-1"}}]})
    );
}

#[tokio::test]
async fn through_the_engine_retry_after_delays_the_retry_and_4xx_is_dead_at_once() {
    let db = TestDb::migrated("webhook_engine").await;
    let client = db.client().await;
    let receiver = Receiver::default();
    let addr = receiver.start().await;
    let text = format!(
        "[sinks.busy]\ntype = \"webhook\"\nurl = \"http://{addr}/busy\"\n\n\
         [sinks.bad]\ntype = \"webhook\"\nurl = \"http://{addr}/bad\"\n\n\
         [sinks.flaky]\ntype = \"webhook\"\nurl = \"http://{addr}/flaky\"\n\n\
         [[routes]]\nsource = \"Busy\"\naction = \"*\"\nsinks = [\"busy\"]\n\n\
         [[routes]]\nsource = \"Bad\"\naction = \"*\"\nsinks = [\"bad\"]\n\n\
         [[routes]]\nsource = \"Flaky\"\naction = \"*\"\nsinks = [\"flaky\"]\n"
    );
    let config = test_config();
    let registry = registry(&text, &config).await;
    let [busy, bad, flaky]: [uuid::Uuid; 3] = insert(
        &client,
        vec![
            NewEvent::new("Busy", "a", "r", "1"),
            NewEvent::new("Bad", "a", "r", "1"),
            NewEvent::new("Flaky", "a", "r", "1"),
        ],
    )
    .await
    .try_into()
    .expect("three ids");
    let running = Running::start(&db, registry, config).await;
    // The flaky receiver answers 503 twice, then 200: processed on the third attempt.
    wait_for_count(
        &client,
        "SELECT count(*) FROM hook_events WHERE processed OR dead_at IS NOT NULL",
        2,
        Duration::from_secs(30),
    )
    .await;
    // The 429's retry waits for Retry-After (3 s), not the policy's 100 ms.
    let wait: f64 = client
        .query_one(
            "SELECT date_part('epoch', next_attempt_at - now()) FROM hook_events WHERE id = $1 AND retry_count = 1",
            &[&busy],
        )
        .await
        .expect("the 429 was recorded once")
        .get(0);
    assert!(wait > 2.0 && wait <= 3.1, "next attempt in {wait}s");
    running.stop().await;

    let r = row(&client, bad).await;
    assert!(r.dead && r.retry_count == 1, "a 400 is dead after one attempt: {r:?}");
    assert!(r.errors[0].contains("HTTP 400 Bad Request: invalid_payload"), "{:?}", r.errors);
    let r = row(&client, flaky).await;
    assert!(r.processed && r.retry_count == 2, "{r:?}");
    let ids: Vec<String> = receiver
        .requests()
        .iter()
        .filter(|q| q.path == "flaky")
        .map(|q| q.header("webhook-id").to_owned())
        .collect();
    assert_eq!(ids, vec![flaky.to_string(); 3], "the same id on every attempt");
    let attempts: Vec<String> = receiver
        .requests()
        .iter()
        .filter(|q| q.path == "flaky")
        .map(|q| q.header("hook-attempt").to_owned())
        .collect();
    assert_eq!(attempts, ["1", "2", "3"]);
}

#[tokio::test]
async fn a_receiver_down_for_30_seconds_loses_nothing() {
    // 30 s is the acceptance criterion's outage; the retry policy below spreads ten attempts over
    // about a minute, so every event is still alive when the receiver comes back.
    let db = TestDb::migrated("webhook_down").await;
    let client = db.client().await;
    let port = common::free_port();
    let text = format!(
        "[sinks.hook]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:{port}/ok\"\ntimeout = \"2s\"\n\n\
         [[routes]]\nsource = \"*\"\naction = \"*\"\nsinks = [\"hook\"]\n"
    );
    let config = hook_core::EngineConfig {
        retry: hook_core::RetryPolicy {
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(8),
            max_retry_count: 10,
            jitter: 0.0,
        },
        ..test_config()
    };
    let registry = registry(&text, &config).await;
    let ids = insert(
        &client,
        (0..20).map(|i| NewEvent::new("Stop", "response_completed", "session", format!("s-{i}"))).collect(),
    )
    .await;
    let running = Running::start(&db, registry, config).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let failed: i64 = client
        .query_one(
            "SELECT count(*) FROM hook_events WHERE retry_count >= 3 AND NOT processed AND dead_at IS NULL",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(failed, 20, "every event was tried and is waiting for a retry");

    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("the port is still free");
    receiver.serve(listener);
    wait_for_count(&client, UNDECIDED, 0, Duration::from_secs(60)).await;
    running.stop().await;

    let processed: i64 = client
        .query_one("SELECT count(*) FROM hook_events WHERE processed", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(processed, 20, "nothing lost, nothing dead");
    let requests = receiver.requests();
    for id in &ids {
        let got: Vec<_> = requests.iter().filter(|q| q.header("webhook-id") == id.to_string()).collect();
        assert!(!got.is_empty(), "event {id} never arrived");
        assert!(got.iter().all(|q| q.json()["id"] == id.to_string()), "the id header matches the body");
        let attempt: i32 = got[0].header("hook-attempt").parse().expect("attempt");
        assert!(attempt >= 4, "delivered on a retry, attempt {attempt}");
    }
    assert_eq!(requests.len(), 20, "each event delivered once after the outage");
}
