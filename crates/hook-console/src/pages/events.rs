//! The events list (filter, keyset pages, selection for replay) and an event's page.

use std::collections::BTreeSet;

use axum::extract::{Path, RawQuery};
use axum::response::Response;
use hook_store::console::{self, Cursor, EventDetail, EventRow, PageAt};
use maud::{html, Markup};
use uuid::Uuid;

use super::{session_link, state_badge, Ctx, Nav};
use crate::error::ConsoleError;
use crate::params::{self, cursor_text, FilterForm, Params};
use crate::text::{self, shown};

/// How much of each JSON column an event's page shows, in characters.
pub(crate) const JSON_CHARS: usize = 256 * 1024;
/// How much of each error an event's page shows, in characters.
pub(crate) const ERROR_CHARS: usize = 16 * 1024;

pub(crate) async fn list(ctx: Ctx, RawQuery(query): RawQuery) -> Response {
    let params = Params::from_query(query.as_deref());
    let result = list_page(&ctx, &params).await;
    ctx.respond(result)
}

/// The filter form, `form` filled in; sources and actions offered from `routes`.
pub(crate) fn filter_form(ctx: &Ctx, form: &FilterForm, routes: &[(String, String)]) -> Markup {
    let sources: BTreeSet<&str> = routes.iter().map(|(s, _)| s.as_str()).collect();
    let actions: BTreeSet<&str> = routes.iter().map(|(_, a)| a.as_str()).collect();
    let states = ["pending", "retrying", "dead", "processed", "failed"];
    html! {
        form.filter method="get" action=(ctx.url("/events")) {
            label { "State "
                select name="state" {
                    option value="" { "any" }
                    @for s in states { option value=(s) selected[form.state == s] { (s) } }
                }
            }
            label { "Source "
                select name="source" {
                    option value="" { "any" }
                    @for s in &sources { option value=(s) selected[form.source == *s] { (shown(s)) } }
                    @if !form.source.is_empty() && !sources.contains(form.source.as_str()) {
                        option value=(form.source) selected { (shown(&form.source)) }
                    }
                }
            }
            label { "Action "
                select name="action" {
                    option value="" { "any" }
                    @for a in &actions { option value=(a) selected[form.action == *a] { (shown(a)) } }
                    @if !form.action.is_empty() && !actions.contains(form.action.as_str()) {
                        option value=(form.action) selected { (shown(&form.action)) }
                    }
                }
            }
            label { "Since (UTC) " input type="datetime-local" step="1" name="since" value=(form.since); }
            label { "Until (UTC) " input type="datetime-local" step="1" name="until" value=(form.until); }
            label { "Session " input type="text" name="session" value=(form.session) size="20"; }
            label { "Error contains " input type="search" name="q" value=(form.q) size="20"; }
            button type="submit" id="apply-filter" { "Filter" }
            " "
            a href=(ctx.url("/events")) { "Clear" }
        }
    }
}

async fn list_page(ctx: &Ctx, params: &Params) -> Result<Markup, ConsoleError> {
    let form = FilterForm::from_params(params);
    let filter = form.filter()?;
    let page = params::page_at(params)?;
    let size = ctx.state.config().page_size.max(1);
    let mut client = ctx.client().await?;
    let tx = console::read_only(&mut client, ctx.statement_timeout_ms()).await?;
    let mut rows = console::list_events(&tx, &filter, page, size + 1).await?;
    let routes = console::routes(&tx, 1000).await?;
    tx.commit().await?;

    let (newer, older) = match page {
        PageAt::Newest => (false, rows.len() > size),
        PageAt::Before(_) => (true, rows.len() > size),
        PageAt::After(_) => (rows.len() > size, true),
    };
    if rows.len() > size {
        if matches!(page, PageAt::After(_)) {
            rows.remove(0);
        } else {
            rows.truncate(size);
        }
    }
    let position = |row: &EventRow| cursor_text(Cursor { created_at: row.created_at, id: row.id });
    let link = |key: &str, row: Option<&EventRow>| {
        let mut pairs = form.pairs();
        if let Some(row) = row {
            pairs.push((if key == "after" { "after" } else { "before" }, position(row)));
        }
        format!("{}{}", ctx.url("/events"), params::query(&pairs))
    };
    let pager = html! {
        nav.pager {
            @if newer { a href=(link("", None)) { "⇤ Newest" } " " a rel="prev" href=(link("after", rows.first())) { "← Newer" } }
            @if older { " " a rel="next" href=(link("before", rows.last())) { "Older →" } }
        }
    };
    let body = html! {
        h1 { "Events" }
        (filter_form(ctx, &form, &routes))
        @if rows.is_empty() {
            p.empty { "No event matches." }
        } @else {
            form method="post" action=(ctx.url("/replay")) {
                @if let Some(csrf) = ctx.csrf() {
                    input type="hidden" name="csrf" value=(csrf);
                    input type="hidden" name="step" value="confirm";
                    @for (key, value) in form.pairs() {
                        @if !value.is_empty() { input type="hidden" name=(key) value=(value); }
                    }
                    div.actions {
                        button type="submit" name="scope" value="selected" id="replay-selected" { "Replay selected…" }
                        " "
                        button type="submit" name="scope" value="filter" id="replay-filter" {
                            @if form.is_empty() { "Replay all failed and dead…" } @else { "Replay all matching…" }
                        }
                    }
                } @else {
                    p.hint { (action_hint(ctx)) }
                }
                (events_table(ctx, &rows, true))
            }
            (pager)
        }
    };
    Ok(ctx.layout("Events", Nav::Events, body))
}

/// Why this page offers no action.
pub(crate) fn action_hint(ctx: &Ctx) -> Markup {
    html! {
        @if ctx.state.writable() {
            a href=(ctx.url("/login")) { "Log in" } " to replay events."
        } @else {
            "Read-only: replay is enabled when the console has a token (HOOK_CONSOLE_TOKEN)."
        }
    }
}

/// A table of events; with checkboxes when the user may replay.
pub(crate) fn events_table(ctx: &Ctx, rows: &[EventRow], selectable: bool) -> Markup {
    let selectable = selectable && ctx.can_act();
    html! {
        table.events {
            thead { tr {
                @if selectable { th { input type="checkbox" id="select-all" title="Select all"; } }
                th { "Created" } th { "State" } th { "Source / action" } th { "Resource" }
                th { "Session" } th { "Last error" }
            } }
            tbody {
                @for row in rows {
                    tr {
                        @if selectable {
                            td { input type="checkbox" name="id" value=(row.id) aria-label="select"; }
                        }
                        td.time { a href=(ctx.url(&format!("/events/{}", row.id))) { (text::time(row.created_at)) } }
                        td { (state_badge(row)) }
                        td { (shown(&row.source)) " / " (shown(&row.action)) }
                        td { (shown(&text::cut(&row.resource_id, 60))) }
                        td { @if let Some(s) = &row.session { (session_link(ctx, s)) } }
                        td.error { @if let Some(e) = &row.last_error { (shown(&text::cut(e, 160))) } }
                    }
                }
            }
        }
    }
}

pub(crate) async fn detail(ctx: Ctx, Path(id): Path<String>) -> Response {
    let result = detail_page(&ctx, &id).await;
    ctx.respond(result)
}

/// A JSON column, indented, with a note when it was cut.
fn json_block(name: &str, text: Option<&str>, chars: i64) -> Markup {
    html! {
        section.json {
            h2 { (name) }
            @match text {
                None => p.empty { "NULL" },
                Some(text) => {
                    @if chars > JSON_CHARS as i64 {
                        p.warn { "Showing the first " (text::thousands(JSON_CHARS as u64)) " of "
                            (text::thousands(chars as u64)) " characters (" (text::size(chars)) ")." }
                    }
                    pre { code { (shown(&text::pretty_json(text))) @if chars > JSON_CHARS as i64 { "\n… (cut)" } } }
                }
            }
        }
    }
}

async fn detail_page(ctx: &Ctx, id: &str) -> Result<Markup, ConsoleError> {
    let id = Uuid::parse_str(id).map_err(|_| ConsoleError::NotFound)?;
    let mut client = ctx.client().await?;
    let tx = console::read_only(&mut client, ctx.statement_timeout_ms()).await?;
    let event = console::event(&tx, id, JSON_CHARS, ERROR_CHARS).await?;
    tx.commit().await?;
    let Some(event) = event else { return Err(ConsoleError::NotFound) };
    Ok(ctx.layout(&format!("Event {id}"), Nav::Events, event_body(ctx, &event)))
}

fn event_body(ctx: &Ctx, event: &EventDetail) -> Markup {
    let row = &event.row;
    let route_link = format!(
        "{}{}",
        ctx.url("/events"),
        params::query(&[("source", row.source.clone()), ("action", row.action.clone())])
    );
    html! {
        h1 { "Event " code { (row.id) } }
        dl.facts {
            dt { "State" } dd { (state_badge(row)) }
            dt { "Route" } dd { a href=(route_link) { (shown(&row.source)) " / " (shown(&row.action)) } }
            dt { "Resource" } dd { (shown(&row.resource)) " " code { (shown(&row.resource_id)) } }
            dt { "Session" } dd { @if let Some(s) = &row.session { (session_link(ctx, s)) } @else { "—" } }
            dt { "Created" } dd { (text::time(row.created_at)) }
            dt { "Processed" } dd {
                @if let Some(at) = row.processed_at {
                    (text::time(at)) " (" (text::duration(text::between(row.created_at, at))) " after creation)"
                } @else { "—" }
            }
            dt { "Failed attempts" } dd { (row.retry_count) }
            @if let Some(at) = row.next_attempt_at { dt { "Next attempt" } dd { (text::time(at)) } }
            @if let Some(at) = row.dead_at { dt { "Dead since" } dd { (text::time(at)) } }
        }
        @if let Some(csrf) = ctx.csrf() {
            form.actions method="post" action=(ctx.url("/replay")) {
                input type="hidden" name="csrf" value=(csrf);
                input type="hidden" name="step" value="confirm";
                input type="hidden" name="scope" value="selected";
                input type="hidden" name="id" value=(row.id);
                button type="submit" id="replay-one" { "Replay this event…" }
            }
        } @else {
            p.hint { (super::events::action_hint(ctx)) }
        }
        section.errors {
            h2 { "Errors" }
            @if event.errors.is_empty() {
                p.empty { "None recorded." }
            } @else {
                ol {
                    @for error in &event.errors {
                        li { pre { (shown(error.as_deref().unwrap_or("(NULL)"))) } }
                    }
                }
                @if event.errors_total > event.errors.len() as i64 {
                    p.warn { "Showing " (event.errors.len()) " of " (event.errors_total) " errors." }
                }
            }
        }
        (json_block("Payload", Some(&event.payload), event.payload_chars))
        (json_block("Metadata", Some(&event.metadata), event.metadata_chars))
        (json_block("Result metadata", event.result_metadata.as_deref(), event.result_metadata_chars))
        @if let Some(replays) = &event.replays {
            (json_block("Replays", Some(replays), replays.chars().count() as i64))
        }
    }
}
