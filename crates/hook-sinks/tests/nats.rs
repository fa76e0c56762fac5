//! The nats sink against a `nats-server -js` of the test's own: the stream's ack, the message
//! id that makes a re-publish a duplicate, stream creation, and the failures.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::event;
use hook_sinks::template::Template;
use hook_sinks::testing::NatsServer;
use hook_sinks::{Delivery, NamedSink, NatsConfig, NatsSink, StreamSpec};

fn stream(name: &str) -> StreamSpec {
    StreamSpec {
        name: name.into(),
        subjects: vec!["hooks.*.*".into()],
        duplicate_window: Duration::from_secs(120),
        replicas: 1,
    }
}

async fn sink(url: String, create: Option<StreamSpec>) -> NamedSink {
    let config = NatsConfig {
        create_stream: create,
        timeout: Duration::from_secs(3),
        ..NatsConfig::new(url, Template::parse("hooks.{source}.{action}").expect("template"))
    };
    NamedSink::new("bus", NatsSink::connect(config).await.expect("connect"), Duration::from_secs(4))
}

#[tokio::test]
async fn publishes_once_per_event_id_and_reports_the_stream_sequence() {
    let server = NatsServer::start("publish").await;
    let bus = sink(server.url(), Some(stream("HOOKS"))).await;
    let first = event("PreToolUse", "tool.invocation");
    let delivery = bus.deliver(Arc::clone(&first)).await;
    let Delivery::Delivered { facts } = &delivery else { panic!("{delivery:?}") };
    assert_eq!(facts["stream"], "HOOKS");
    assert_eq!(facts["seq"], 1);
    assert_eq!(facts["subject"], "hooks.PreToolUse.tool_invocation");
    assert!(facts.get("duplicate").is_none());

    // The same event again (a retry, or a processor that died before its commit): a duplicate.
    let again = bus.deliver(Arc::clone(&first)).await;
    let Delivery::Delivered { facts } = &again else { panic!("{again:?}") };
    assert_eq!(facts["duplicate"], true);
    assert_eq!(facts["seq"], 1);
    let other = bus.deliver(event("Stop", "response_completed")).await;
    assert!(other.is_delivered(), "{other:?}");

    let client = async_nats::connect(server.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("HOOKS").await.expect("the stream was created");
    let info = stream.info().await.expect("info");
    assert_eq!(info.state.messages, 2);
    let stored = stream.get_raw_message(1).await.expect("message 1");
    let id = stored.headers.get("Nats-Msg-Id").expect("msg id header").to_string();
    assert_eq!(id, first.id.to_string());
    let body: serde_json::Value = serde_json::from_slice(&stored.payload).expect("the event as JSON");
    assert_eq!(body["id"], first.id.to_string());
    assert_eq!(body["source"], "PreToolUse");
}

#[tokio::test]
async fn no_stream_for_the_subject_is_retryable_until_one_exists() {
    let server = NatsServer::start("nostream").await;
    let bus = sink(server.url(), None).await;
    let delivery = bus.deliver(event("Stop", "x")).await;
    let Delivery::Retryable { error, .. } = &delivery else { panic!("{delivery:?}") };
    assert!(error.contains("hooks.Stop.x"), "{error}");

    let client = async_nats::connect(server.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "LATE".into(),
        subjects: vec!["hooks.>".into()],
        ..Default::default()
    })
    .await
    .expect("create the stream");
    let delivery = bus.deliver(event("Stop", "x")).await;
    let Delivery::Delivered { facts } = &delivery else { panic!("{delivery:?}") };
    assert_eq!(facts["stream"], "LATE");
}

#[tokio::test]
async fn a_server_that_is_down_is_retryable_and_reconnected_to() {
    let port = hook_sinks::testing::free_port();
    let bus = sink(format!("nats://127.0.0.1:{port}"), Some(stream("HOOKS"))).await;
    let delivery = bus.deliver(event("Stop", "x")).await;
    assert!(matches!(delivery, Delivery::Retryable { .. }), "{delivery:?}");
    drop(bus);

    let server = NatsServer::start("down").await;
    let bus = sink(server.url(), Some(stream("HOOKS"))).await;
    let delivery = bus.deliver(event("Stop", "x")).await;
    assert!(delivery.is_delivered(), "{delivery:?}");
    drop(server); // the server goes away under a connected sink
    let delivery = bus.deliver(event("Stop", "x")).await;
    assert!(matches!(delivery, Delivery::Retryable { .. }), "{delivery:?}");
}
