//! The sink phases: the engine draining the backlog through a `nats` route into a JetStream
//! stream (each event acknowledged by the stream before it is marked processed), and through a
//! `webhook` route into an HTTP receiver on loopback in this process.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hook_core::{Engine, HandlerRegistry};
use hook_sinks::template::Template;
use hook_sinks::{NamedSink, NatsConfig, NatsSink, StreamSpec, WebhookConfig, WebhookSink};
use hook_store::bench;

use crate::phases::{backlog, Db};
use crate::report::Throughput;
use crate::Plan;

/// The engine through a nats route into a stream of its own on `url`, deleted afterwards.
pub(crate) async fn jetstream_drain(db: &Db, plan: &Plan, url: &str) -> anyhow::Result<Throughput> {
    let tag = std::process::id();
    let stream = format!("HOOKBENCH_{tag}");
    let config = NatsConfig {
        create_stream: Some(StreamSpec {
            name: stream.clone(),
            subjects: vec![format!("hookbench.{tag}.>")],
            duplicate_window: Duration::from_secs(120),
            replicas: 1,
        }),
        max_in_flight: 4096,
        ..NatsConfig::new(url, Template::parse(&format!("hookbench.{tag}.{{source}}.{{action}}"))?)
    };
    let sink = NatsSink::connect(config).await.context("connecting to NATS")?;
    let js = sink.jetstream().clone();
    // One round trip first, so a missing server fails here rather than as 100,000 retries.
    tokio::time::timeout(Duration::from_secs(5), js.client().flush())
        .await
        .map_err(|_| anyhow::anyhow!("no NATS server answers at {url} (start one: nats-server -js)"))?
        .with_context(|| format!("NATS at {url}"))?;
    let named = NamedSink::new("jetstream", sink, Duration::from_secs(10));
    let drain = drain(db, plan, named).await;
    let stored = async {
        let mut info = js.get_stream(&stream).await?;
        let messages = info.info().await?.state.messages;
        js.delete_stream(&stream).await?;
        Ok::<u64, anyhow::Error>(messages)
    }
    .await
    .context("reading the bench stream back");
    let drain = drain?;
    let stored = stored?;
    anyhow::ensure!(stored == plan.events, "the stream holds {stored} messages, expected {}", plan.events);
    Ok(drain)
}

/// The engine through a webhook route into an axum receiver on loopback (in this process, so it
/// shares the CPUs with the engine and the database).
pub(crate) async fn webhook_drain(db: &Db, plan: &Plan) -> anyhow::Result<Throughput> {
    let received = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&received);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let counter = Arc::clone(&counter);
            async move {
                counter.fetch_add(u64::from(!body.is_empty()), Ordering::Relaxed);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding the receiver")?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let config = WebhookConfig::new(format!("http://{addr}/hook").parse()?);
    let named = NamedSink::new("webhook", WebhookSink::new(config)?, Duration::from_secs(10));
    let drain = drain(db, plan, named).await;
    server.abort();
    let drain = drain?;
    let got = received.load(Ordering::Relaxed);
    anyhow::ensure!(got >= plan.events, "the receiver got {got} requests, expected {}", plan.events);
    Ok(drain)
}

/// Drains a fresh backlog with `sink` on every route, timed like the engine drain.
async fn drain(db: &Db, plan: &Plan, sink: NamedSink) -> anyhow::Result<Throughput> {
    backlog(db, plan.events).await?;
    let store = db.store(plan).await?;
    let mut registry = HandlerRegistry::new();
    registry.register("*", "*", sink);
    let engine = Engine::builder(store).registry(registry).config(plan.engine.clone()).build()?;
    let metrics = engine.metrics();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let clock = db.clock();
    let task = tokio::spawn(engine.run(async move {
        let _ = stopped.await;
    }));
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let snapshot = metrics.snapshot();
        if snapshot.succeeded >= plan.events {
            break;
        }
        anyhow::ensure!(snapshot.failed == 0, "deliveries failed: {snapshot}");
        anyhow::ensure!(Instant::now() < deadline, "the engine did not drain the backlog in 10 minutes");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drain = Throughput::new(plan.events, clock);
    let _ = stop.send(());
    let totals = task.await.context("engine task")?;
    let client = db.connect().await?;
    let left = bench::unprocessed_count(&client).await?;
    anyhow::ensure!(left == 0 && totals.succeeded == plan.events, "sink drain: {left} left, {totals}");
    Ok(drain)
}
