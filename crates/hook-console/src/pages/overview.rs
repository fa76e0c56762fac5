//! The overview: the queue right now, what was processed in a window, throughput and pickup
//! latency over the last hour, and the failing routes with their latest error.

use std::time::Duration;

use axum::extract::RawQuery;
use axum::response::Response;
use hook_store::{console, stats};
use maud::{html, Markup};

use super::{Ctx, Nav};
use crate::chart;
use crate::error::ConsoleError;
use crate::params::{self, Params};
use crate::text::{self, shown};

/// The windows offered, by name.
const WINDOWS: [(&str, u64); 4] = [("1h", 3600), ("24h", 86_400), ("7d", 7 * 86_400), ("30d", 30 * 86_400)];
/// The latency chart is drawn from at most this many of the latest events of each minute.
const LATENCY_SAMPLE: u64 = 100;
/// The processed count of the window stops here (shown as "20,000+"). Each counted event is an
/// index entry read, so this bounds the page's cost on a busy table; `hook-processor stats`
/// counts all.
const PROCESSED_CAP: u64 = 20_000;
/// A minute of the throughput chart is counted up to this many events (167 a second).
const MINUTE_CAP: u64 = 10_000;

pub(crate) async fn page(ctx: Ctx, RawQuery(query): RawQuery) -> Response {
    let params = Params::from_query(query.as_deref());
    let result = overview(&ctx, &params).await;
    ctx.respond(result)
}

fn count_link(ctx: &Ctx, state: &str, n: u64) -> Markup {
    let href = format!("{}{}", ctx.url("/events"), params::query(&[("state", state.to_owned())]));
    html! { a href=(href) { (text::thousands(n)) } }
}

async fn overview(ctx: &Ctx, params: &Params) -> Result<Markup, ConsoleError> {
    let window_name = params.get("window").unwrap_or("24h");
    let (window_name, seconds) = WINDOWS
        .iter()
        .find(|(name, _)| *name == window_name)
        .copied()
        .ok_or_else(|| ConsoleError::BadRequest("window: one of 1h, 24h, 7d, 30d".into()))?;
    let window = Duration::from_secs(seconds);
    let mut client = ctx.client().await?;
    let tx = console::read_only(&mut client, ctx.statement_timeout_ms()).await?;
    let depth = stats::queue_depth(&tx, window).await?;
    let (processed, with_retries) = console::processed_in_window(&tx, window, PROCESSED_CAP).await?;
    let capped = processed >= PROCESSED_CAP;
    let per_minute = console::processed_per_minute(&tx, MINUTE_CAP).await?;
    let received = console::received_per_minute(&tx, MINUTE_CAP).await?;
    let latency = console::latency_per_minute(&tx, LATENCY_SAMPLE).await?;
    let routes = stats::errors_by_route(&tx, window, 20).await?;
    tx.commit().await?;

    let avg: [Option<f64>; 60] = std::array::from_fn(|m| (latency[m].events > 0).then_some(latency[m].avg_s));
    let max: [Option<f64>; 60] = std::array::from_fn(|m| (latency[m].events > 0).then_some(latency[m].max_s));
    let sampled: u64 = latency.iter().map(|m| m.events).sum();
    let sample_mean = (sampled > 0).then(|| {
        let total: f64 = latency.iter().map(|m| m.avg_s * m.events as f64).sum();
        Duration::from_secs_f64((total / sampled as f64).max(0.0))
    });
    let hour: u64 = per_minute.iter().sum();
    let received_hour: u64 = received.iter().sum();
    let body = html! {
        h1 { "Overview" }
        nav.windows { "Window: "
            @for (name, _) in WINDOWS {
                @if name == window_name { strong { (name) } } @else { a href=(format!("{}?window={name}", ctx.url("/"))) { (name) } }
                " "
            }
        }
        section.cards {
            div.card { div.label { "Pending" } div.value #pending { (count_link(ctx, "pending", depth.pending)) }
                div.note { @if let Some(age) = depth.oldest_pending { "oldest " (text::duration(age)) } @else { "none waiting" } } }
            div.card { div.label { "Retrying" } div.value #retrying { (count_link(ctx, "retrying", depth.retrying)) }
                div.note { (text::thousands(depth.waiting)) " in backoff" } }
            div.card { div.label { "Dead" } div.value #dead { (count_link(ctx, "dead", depth.dead)) }
                div.note { (text::thousands(depth.died_in_window)) " died in " (window_name) } }
            div.card { div.label { "Processed in " (window_name) } div.value #processed { (text::thousands(processed)) @if capped { "+" } }
                div.note {
                    @if capped { (text::thousands(with_retries)) " needed retries" }
                    @else if processed > 0 { (format!("{:.2}", with_retries as f64 * 100.0 / processed as f64)) "% needed retries" }
                    @if let Some(mean) = sample_mean { " · mean latency " (text::duration(mean)) " (latest " (text::thousands(sampled)) ")" }
                } }
        }
        section.charts {
            div {
                h2 { "Throughput, last hour" }
                p.legend { span.key-bar {} " processed per minute (" (text::thousands(hour)) ")  " span.key-line {} " received per minute (" (text::thousands(received_hour)) ")" }
                (chart::bars("Events processed and received per minute over the last hour", &per_minute, &received, "received"))
                @if per_minute.iter().chain(received.iter()).any(|n| *n >= MINUTE_CAP) {
                    p.hint { "A minute is counted up to " (text::thousands(MINUTE_CAP)) " events; more show as that." }
                }
            }
            div {
                h2 { "Pickup latency, last hour" }
                p.legend { span.key-avg {} " mean  " span.key-max {} " max, created → processed, first attempts (latest "
                    (text::thousands(LATENCY_SAMPLE)) " events of each minute)" }
                (chart::latency("Pickup latency per minute over the last hour", &avg, &max))
            }
        }
        section {
            h2 { "Failing routes (" (window_name) ")" }
            @if routes.is_empty() {
                p.empty { "No failures." }
            } @else {
                table.routes {
                    thead { tr { th { "Source / action" } th.num { "Events" } th.num { "Dead" } th.num { "Retrying" }
                        th.num { "Recovered" } th.num { "Failed attempts" } th { "Latest error" } th { "At" } } }
                    tbody {
                        @for r in &routes {
                            @let href = format!("{}{}", ctx.url("/events"), params::query(&[
                                ("state", "failed".to_owned()), ("source", r.source.clone()), ("action", r.action.clone())]));
                            tr {
                                td { a href=(href) { (shown(&r.source)) " / " (shown(&r.action)) } }
                                td.num { (text::thousands(r.events)) } td.num { (text::thousands(r.dead)) }
                                td.num { (text::thousands(r.retrying)) } td.num { (text::thousands(r.recovered)) }
                                td.num { (text::thousands(r.failed_attempts)) }
                                td.error { @if let Some(e) = &r.latest_error { (shown(&text::cut(e, 200))) } }
                                td.time { @if let Some(at) = r.latest_at { (text::time(at)) } }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(ctx.layout("Overview", Nav::Overview, body))
}
