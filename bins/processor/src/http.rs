//! The operations endpoint (`--http-addr`): `/metrics` in Prometheus' text format, `/healthz`
//! (the process answers) and `/readyz` (see [`Health::readiness`]).
//!
//! Metrics are recorded by hook-core through the `metrics` facade; here the Prometheus recorder
//! is installed (before the engine is built, so the engine's handles point at it), histogram
//! buckets are chosen, and the queue-depth gauges are refreshed by a periodic query.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use hook_core::metric_names as names;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::{info, warn};

use crate::health::Health;

/// Handler durations, seconds: from sub-millisecond in-process handlers to the 30 s timeout.
const HANDLER_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Pickup latency, seconds: NOTIFY wakeups take milliseconds, the poll fallback a second, a
/// backlog minutes or hours.
const PICKUP_BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0];
/// Events per batch, up to the largest batch size allowed.
const BATCH_BUCKETS: &[f64] =
    &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0];

/// Installs the Prometheus recorder as the global `metrics` recorder. Call before building the
/// engine.
pub(crate) fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(names::HANDLER_DURATION.into()), HANDLER_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(names::PICKUP_LATENCY.into()), PICKUP_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(names::BATCH_SIZE.into()), BATCH_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(hook_sinks::metric_names::DURATION.into()), HANDLER_BUCKETS)?
        .install_recorder()
        .context("installing the Prometheus recorder")?;
    hook_core::describe_metrics();
    hook_sinks::describe_metrics();
    hook_ingest::server::describe_metrics();
    metrics::gauge!("hook_events_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(handle)
}

#[derive(Clone)]
struct Ops {
    health: Health,
    prometheus: PrometheusHandle,
}

/// Binds `addr` (failing at once if it is taken) and serves the endpoints, and the web console
/// at /console when given, until the runtime ends. Also runs the recorder's upkeep.
pub(crate) async fn serve(
    addr: SocketAddr,
    health: Health,
    prometheus: PrometheusHandle,
    console: Option<hook_console::ConsoleState>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the HTTP address {addr}"))?;
    let local = listener.local_addr().unwrap_or(addr);
    info!(addr = %local, "serving /metrics, /healthz and /readyz");
    let upkeep = prometheus.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    let mut app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Ops { health, prometheus });
    if let Some(console) = console {
        info!(addr = %local, writable = console.writable(), "serving the web console at /console");
        app = app.merge(hook_console::mount("/console", console));
    }
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            warn!(%error, "the HTTP endpoint stopped");
        }
    });
    Ok(())
}

async fn metrics(State(ops): State<Ops>) -> impl IntoResponse {
    let (ready, since) = match ops.health.metrics() {
        Some(m) => (m.is_ready(), m.since_progress().map_or(-1.0, |d| d.as_secs_f64())),
        None => (false, -1.0),
    };
    metrics::gauge!(names::READY).set(if ready { 1.0 } else { 0.0 });
    metrics::gauge!(names::SINCE_PROGRESS).set(since);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], ops.prometheus.render())
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(ops): State<Ops>) -> (StatusCode, String) {
    match ops.health.readiness().await {
        Ok(text) => (StatusCode::OK, text + "\n"),
        Err(text) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {text}\n")),
    }
}

/// Refreshes the queue-depth gauges every `every` through the probe pool. A failed refresh keeps
/// the previous values and is logged once until one succeeds again.
pub(crate) async fn refresh_gauges(health: Health, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        let Some(pool) = health.probe_pool() else { continue };
        let limit = every.max(Duration::from_secs(5));
        let query = async {
            let client = pool.get().await?;
            hook_store::stats::limit_statement_time(&client, limit).await?;
            hook_store::stats::queue_depth(&client, Duration::ZERO).await
        };
        // statement_timeout bounds a slow server; this, a silent network.
        let answer = match tokio::time::timeout(limit + Duration::from_secs(5), query).await {
            Ok(answer) => answer.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer from the database within {}s", limit.as_secs() + 5)),
        };
        match answer {
            Ok(depth) => {
                metrics::gauge!(names::PENDING).set(depth.pending as f64);
                metrics::gauge!(names::RETRYING).set(depth.retrying as f64);
                metrics::gauge!(names::DEAD_EVENTS).set(depth.dead as f64);
                metrics::gauge!(names::OLDEST_PENDING_AGE)
                    .set(depth.oldest_pending.map_or(0.0, |d| d.as_secs_f64()));
                if failing {
                    info!("queue-depth gauges refreshed again");
                    failing = false;
                }
            }
            Err(error) => {
                if !failing {
                    warn!(%error, "could not refresh the queue-depth gauges; keeping the last values");
                    failing = true;
                }
            }
        }
    }
}
