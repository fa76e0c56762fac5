//! Agent sessions: the recent ones summed up, and one session's timeline with each tool call's
//! duration (`PreToolUse` → `PostToolUse`, paired by `tool_use_id`) and result.

use std::collections::HashMap;

use axum::extract::RawQuery;
use axum::response::Response;
use hook_store::console::{self, Cursor, SessionSummary, TimelineRow};
use maud::{html, Markup};
use time::OffsetDateTime;

use super::{session_link, Ctx, Nav};
use crate::error::ConsoleError;
use crate::params::{self, cursor_text, Params};
use crate::text::{self, shown};

/// Sessions per page.
const SESSIONS_PER_PAGE: usize = 25;
/// The sessions list looks for sessions among this many of the latest events.
const SCAN: usize = 5000;
/// A session in the list is counted over at most its latest this many events.
const PER_SESSION: usize = 500;
/// Events per timeline page.
const TIMELINE_PAGE: usize = 200;
/// How far before and after a page the other half of a cut tool call is looked for.
const PARTNER_REACH: time::Duration = time::Duration::days(1);

pub(crate) async fn list(ctx: Ctx, RawQuery(query): RawQuery) -> Response {
    let params = Params::from_query(query.as_deref());
    let result = list_page(&ctx, &params).await;
    ctx.respond(result)
}

fn count(n: u64, capped: bool) -> String {
    format!("{}{}", text::thousands(n), if capped { "+" } else { "" })
}

async fn list_page(ctx: &Ctx, params: &Params) -> Result<Markup, ConsoleError> {
    let before = match params.get("before") {
        None => None,
        Some(micros) => {
            let micros: i128 =
                micros.parse().map_err(|_| ConsoleError::BadRequest("malformed page position".into()))?;
            Some(
                OffsetDateTime::from_unix_timestamp_nanos(micros * 1000)
                    .map_err(|_| ConsoleError::BadRequest("malformed page position".into()))?,
            )
        }
    };
    let mut client = ctx.client().await?;
    let tx = console::read_only(&mut client, ctx.statement_timeout_ms()).await?;
    let sessions = console::recent_sessions(&tx, before, SCAN, SESSIONS_PER_PAGE, PER_SESSION).await?;
    tx.commit().await?;
    let older = sessions
        .last()
        .filter(|_| sessions.len() == SESSIONS_PER_PAGE)
        .map(|s| format!("{}?before={}", ctx.url("/sessions"), s.ended.unix_timestamp_nanos() / 1000));
    let body = html! {
        h1 { "Sessions" }
        p.hint { "Sessions active among the latest " (text::thousands(SCAN as u64)) " events, latest activity first. "
            "Counts are over each session's latest " (text::thousands(PER_SESSION as u64)) " events (“+”: it has more); a session's page counts all." }
        @if sessions.is_empty() {
            p.empty { "No session found (events carry their session in metadata.session_id or payload.session_id)." }
        } @else {
            table.sessions {
                thead { tr { th { "Session" } th { "Start" } th { "End" } th { "Duration" } th.num { "Events" }
                    th.num { "Prompts" } th.num { "Tool calls" } th.num { "Failed tools" } th.num { "Failed events" } } }
                tbody {
                    @for s in &sessions {
                        tr {
                            td { (session_link(ctx, &s.session)) }
                            td.time { (text::time(s.started)) }
                            td.time { (text::time(s.ended)) }
                            td { (text::duration(text::between(s.started, s.ended))) }
                            td.num { (count(s.events, s.capped)) }
                            td.num { (count(s.prompts, s.capped)) }
                            td.num { (count(s.tool_calls, s.capped)) }
                            td.num.bad[s.tool_failures > 0] { (count(s.tool_failures, s.capped)) }
                            td.num.bad[s.failed_events > 0] { (count(s.failed_events, s.capped)) }
                        }
                    }
                }
            }
        }
        nav.pager {
            @if before.is_some() { a href=(ctx.url("/sessions")) { "⇤ Latest" } " " }
            @if let Some(href) = older { a rel="next" href=(href) { "Older →" } }
        }
    };
    Ok(ctx.layout("Sessions", Nav::Sessions, body))
}

pub(crate) async fn timeline(ctx: Ctx, RawQuery(query): RawQuery) -> Response {
    let params = Params::from_query(query.as_deref());
    let result = timeline_page(&ctx, &params).await;
    ctx.respond(result)
}

/// The other half of a tool call.
#[derive(Debug, Clone, Copy)]
struct Half {
    at: OffsetDateTime,
    failed: bool,
    success: Option<bool>,
}

fn is_post(source: &str) -> bool {
    source == "PostToolUse" || source == "PostToolUseFailure"
}

fn half(source: &str, at: OffsetDateTime, success: Option<bool>) -> Half {
    Half { at, failed: source == "PostToolUseFailure" || success == Some(false), success }
}

/// What a tool call's post event says of its outcome.
fn outcome(post: Half) -> Markup {
    html! {
        @if post.failed { span.badge.dead { "failed" } }
        @else if post.success == Some(true) { span.badge.processed { "ok" } }
        @else { span.badge.pending { "done" } }
    }
}

async fn timeline_page(ctx: &Ctx, params: &Params) -> Result<Markup, ConsoleError> {
    let session =
        params.get("id").ok_or_else(|| ConsoleError::BadRequest("id: the session".into()))?.to_owned();
    let after = params.get("after").map(params::parse_cursor).transpose()?;
    let mut client = ctx.client().await?;
    let tx = console::read_only(&mut client, ctx.statement_timeout_ms()).await?;
    let Some(summary) = console::session_summary(&tx, &session).await? else {
        return Err(ConsoleError::NotFound);
    };
    let mut rows = console::session_events(&tx, &session, after, TIMELINE_PAGE + 1).await?;
    let more = rows.len() > TIMELINE_PAGE;
    rows.truncate(TIMELINE_PAGE);

    let mut pre: HashMap<&str, OffsetDateTime> = HashMap::new();
    let mut post: HashMap<&str, Half> = HashMap::new();
    for row in &rows {
        if let Some(id) = row.tool_use_id.as_deref() {
            if row.source == "PreToolUse" {
                pre.entry(id).or_insert(row.created_at);
            } else if is_post(&row.source) {
                post.entry(id).or_insert(half(&row.source, row.created_at, row.success));
            }
        }
    }
    let cut: Vec<String> = rows
        .iter()
        .filter_map(|r| {
            let id = r.tool_use_id.as_deref()?;
            let lonely = (r.source == "PreToolUse" && !post.contains_key(id))
                || (is_post(&r.source) && !pre.contains_key(id));
            lonely.then(|| id.to_owned())
        })
        .collect();
    let partners = match (rows.first(), rows.last()) {
        (Some(first), Some(last)) if !cut.is_empty() => {
            console::tool_partners(
                &tx,
                &session,
                first.created_at - PARTNER_REACH,
                last.created_at + PARTNER_REACH,
                &cut,
            )
            .await?
        }
        _ => Vec::new(),
    };
    tx.commit().await?;
    let mut pre: HashMap<String, OffsetDateTime> = pre.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    let mut post: HashMap<String, Half> = post.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    for p in partners {
        if p.source == "PreToolUse" {
            pre.entry(p.tool_use_id).or_insert(p.created_at);
        } else {
            post.entry(p.tool_use_id.clone()).or_insert(half(&p.source, p.created_at, p.success));
        }
    }
    let next = more.then(|| {
        rows.last().map(|r| {
            let cursor = cursor_text(Cursor { created_at: r.created_at, id: r.id });
            format!(
                "{}{}",
                ctx.url("/sessions/view"),
                params::query(&[("id", session.clone()), ("after", cursor)])
            )
        })
    });
    let events_href = format!("{}{}", ctx.url("/events"), params::query(&[("session", session.clone())]));
    let body = html! {
        h1 { "Session " code { (shown(&text::cut(&session, 80))) } }
        (summary_facts(&summary))
        p { a href=(events_href) { "This session's events in the events list" } " (filter, replay)" }
        table.timeline {
            thead { tr { th { "Time" } th { "+" } th { "Hook" } th { "Tool" } th { "What" } th { "Duration" } th { "Result" } th { "Processing" } } }
            tbody {
                @for row in &rows {
                    (timeline_row(ctx, row, summary.started, &pre, &post))
                }
            }
        }
        nav.pager { @if let Some(Some(href)) = next { a rel="next" href=(href) { "Later events →" } } }
    };
    Ok(ctx.layout("Session", Nav::Sessions, body))
}

fn summary_facts(s: &SessionSummary) -> Markup {
    html! {
        dl.facts {
            dt { "Start" } dd { (text::time(s.started)) }
            dt { "End" } dd { (text::time(s.ended)) }
            dt { "Duration" } dd { (text::duration(text::between(s.started, s.ended))) }
            dt { "Events" } dd #session-events { (text::thousands(s.events)) }
            dt { "Prompts" } dd { (text::thousands(s.prompts)) }
            dt { "Tool calls" } dd { (text::thousands(s.tool_calls)) }
            dt { "Failed tool calls" } dd { (text::thousands(s.tool_failures)) }
            dt { "Failed events" } dd { (text::thousands(s.failed_events)) }
        }
    }
}

fn timeline_row(
    ctx: &Ctx,
    row: &TimelineRow,
    start: OffsetDateTime,
    pre: &HashMap<String, OffsetDateTime>,
    post: &HashMap<String, Half>,
) -> Markup {
    let id = row.tool_use_id.as_deref();
    let (duration, result) = match id {
        Some(id) if row.source == "PreToolUse" => match post.get(id) {
            Some(p) => (Some(text::between(row.created_at, p.at)), Some(outcome(*p))),
            None => (None, Some(html! { span.badge.retrying { "no result yet" } })),
        },
        Some(id) if is_post(&row.source) => {
            let me = half(&row.source, row.created_at, row.success);
            (pre.get(id).map(|at| text::between(*at, row.created_at)), Some(outcome(me)))
        }
        _ => (None, None),
    };
    let processing = if row.dead {
        html! { span.badge.dead { "dead" } }
    } else if row.processed {
        html! { span.badge.processed { "processed" } }
    } else if row.retry_count > 0 {
        html! { span.badge.retrying { "retrying" } }
    } else {
        html! { span.badge.pending { "pending" } }
    };
    html! {
        tr class=(if is_post(&row.source) { "post" } else { "" }) {
            td.time { a href=(ctx.url(&format!("/events/{}", row.id))) { (text::time(row.created_at)) } }
            td { (text::duration(text::between(start, row.created_at))) }
            td { (shown(&row.source)) }
            td { @if let Some(t) = &row.tool_name { (shown(t)) } }
            td.what { @if let Some(s) = &row.summary { (shown(s)) } @if let Some(e) = &row.error { div.error { (shown(e)) } } }
            td { @if let Some(d) = duration { (text::duration(d)) } }
            td { @if let Some(r) = result { (r) } }
            td { (processing) }
        }
    }
}
