//! Replay from the console: a confirmation page with what would be re-queued, then the run,
//! both through [`hook_store::replay`] (the selected events by id, or a filter's selection
//! walked in pages whose ids go to the same function), so the console gives the replay's
//! guarantees: batches in short transactions, events a processor holds skipped and counted,
//! `NOTIFY` on commit, the replay history on each row.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use axum::body::Bytes;
use axum::response::Response;
use hook_store::console::{self, EventFilter};
use hook_store::replay::{self, ReplayFilter, ReplayOptions, ReplayReport};
use maud::{html, Markup};
use uuid::Uuid;

use super::{Ctx, Nav};
use crate::auth;
use crate::error::ConsoleError;
use crate::params::{FilterForm, Params};
use crate::text::{self, shown};

/// At most this many events can be selected by checkbox at once.
const MAX_SELECTED: usize = 1000;
/// A filter's count on the confirmation page stops here ("at least").
const COUNT_CAP: usize = 100_000;
/// Events per page when a filter's selection is walked.
const WALK_PAGE: usize = 500;

/// What a replay form asks for.
enum Scope {
    Selected(Vec<Uuid>),
    Filter(Box<(FilterForm, EventFilter)>),
}

pub(crate) async fn replay(ctx: Ctx, body: Bytes) -> Response {
    let params = Params::parse(&body);
    let result = run(&ctx, &params).await;
    ctx.respond(result)
}

async fn run(ctx: &Ctx, params: &Params) -> Result<Markup, ConsoleError> {
    auth::check_action(
        ctx.state.writable(),
        ctx.login.as_ref().map(|(_, l)| l),
        params.get("csrf"),
        &ctx.headers,
    )?;
    let scope = match params.get("scope") {
        Some("selected") => Scope::Selected(crate::params::ids(params, MAX_SELECTED)?),
        Some("filter") => {
            let form = FilterForm::from_params(params);
            let filter = form.filter()?;
            Scope::Filter(Box::new((form, filter)))
        }
        _ => return Err(ConsoleError::BadRequest("scope: selected or filter".into())),
    };
    let include_processed = params.get("include_processed") == Some("on");
    match params.get("step") {
        Some("confirm") => confirm(ctx, &scope, include_processed).await,
        Some("run") => execute(ctx, &scope, include_processed).await,
        _ => Err(ConsoleError::BadRequest("step: confirm or run".into())),
    }
}

/// The hidden fields that carry the scope to the next step.
fn scope_fields(ctx: &Ctx, scope: &Scope) -> Markup {
    html! {
        @if let Some(csrf) = ctx.csrf() { input type="hidden" name="csrf" value=(csrf); }
        @match scope {
            Scope::Selected(ids) => {
                input type="hidden" name="scope" value="selected";
                @for id in ids { input type="hidden" name="id" value=(id); }
            }
            Scope::Filter(filter) => {
                @let form = &filter.0;
                input type="hidden" name="scope" value="filter";
                @for (key, value) in form.pairs() {
                    @if !value.is_empty() { input type="hidden" name=(key) value=(value); }
                }
            }
        }
    }
}

fn groups_table(groups: &[((String, String), u64)]) -> Markup {
    html! {
        table.groups {
            thead { tr { th { "Source / action" } th.num { "Events" } } }
            tbody {
                @for ((source, action), n) in groups {
                    tr { td { (shown(source)) " / " (shown(action)) } td.num { (text::thousands(*n)) } }
                }
            }
        }
    }
}

async fn confirm(ctx: &Ctx, scope: &Scope, include_processed: bool) -> Result<Markup, ConsoleError> {
    let mut client = ctx.client().await?;
    let tx = console::read_only(&mut client, ctx.statement_timeout_ms()).await?;
    let groups = match scope {
        Scope::Selected(ids) if ids.is_empty() => Vec::new(),
        Scope::Selected(ids) => {
            let filter = ReplayFilter { ids: ids.clone(), include_processed, ..ReplayFilter::default() };
            replay::plan_replay(&tx, &filter, 0).await?.groups
        }
        Scope::Filter(filter) => {
            console::replayable_groups(&tx, &filter.1, include_processed, COUNT_CAP).await?
        }
    };
    tx.commit().await?;
    let total: u64 = groups.iter().map(|(_, n)| n).sum();
    let what = match scope {
        Scope::Selected(ids) => format!("the {} selected events", ids.len()),
        Scope::Filter(filter) if filter.0.is_empty() => "all events".into(),
        Scope::Filter(..) => "the events matching the filter".into(),
    };
    let body = html! {
        h1 { "Replay" }
        p { "Of " (what) ", " strong id="replay-count" { (text::thousands(total)) @if total >= COUNT_CAP as u64 { " or more" } }
            " would be re-queued: failed and dead events"
            @if include_processed { ", and processed ones" } "." }
        @if let Scope::Filter(filter) = scope {
            @let form = &filter.0;
            @if !form.is_empty() {
                ul.filter-summary {
                    @for (key, value) in form.pairs() { @if !value.is_empty() { li { (key) ": " code { (shown(&value)) } } } }
                }
            }
        }
        @if let Scope::Selected(ids) = scope {
            details { summary { "Selected ids" } ul { @for id in ids { li { a href=(ctx.url(&format!("/events/{id}"))) { code { (id) } } } } } }
        }
        (groups_table(&groups))
        form.actions method="post" action=(ctx.url("/replay")) {
            (scope_fields(ctx, scope))
            input type="hidden" name="step" value="confirm";
            @if !include_processed { input type="hidden" name="include_processed" value="on"; }
            button type="submit" id="toggle-processed" {
                @if include_processed { "Count without processed events" } @else { "Count processed events too" }
            }
        }
        @if total > 0 {
            form.actions method="post" action=(ctx.url("/replay")) {
                (scope_fields(ctx, scope))
                input type="hidden" name="step" value="run";
                @if include_processed { input type="hidden" name="include_processed" value="on"; }
                p { "Re-queuing sets each event's failed attempts to 0 and makes it eligible now; its errors are kept, and the replay is recorded on the row. Events a processor holds right now are skipped and counted." }
                button.danger type="submit" id="confirm-replay" { "Replay " (text::thousands(total)) @if total >= COUNT_CAP as u64 { "+" } " events" }
                " "
                a href=(ctx.url("/events")) { "Cancel" }
            }
        } @else {
            p.empty { "Nothing to replay"
                @if !include_processed { " (processed events are replayed only when counted too)" } "." }
        }
    };
    Ok(ctx.layout("Replay", Nav::Events, body))
}

fn add(total: &mut ReplayReport, report: ReplayReport) {
    total.replayed += report.replayed;
    total.batches += report.batches;
    total.skipped_held += report.skipped_held;
    for (kind, n) in report.by_kind {
        *total.by_kind.entry(kind).or_default() += n;
    }
}

async fn execute(ctx: &Ctx, scope: &Scope, include_processed: bool) -> Result<Markup, ConsoleError> {
    let mut client = ctx.client().await?;
    let options = ReplayOptions::default();
    let by_ids = |ids: Vec<Uuid>| ReplayFilter { ids, include_processed, ..ReplayFilter::default() };
    let mut total = ReplayReport { by_kind: BTreeMap::new(), ..ReplayReport::default() };
    match scope {
        Scope::Selected(ids) => {
            if !ids.is_empty() {
                let report =
                    replay::replay(
                        &mut client,
                        &by_ids(ids.clone()),
                        &options,
                        |_| ControlFlow::Continue(()),
                    )
                    .await?;
                add(&mut total, report);
            }
        }
        Scope::Filter(filter) => {
            let filter = &filter.1;
            let mut after = None;
            loop {
                let page =
                    console::replayable_page(&client, filter, include_processed, after, WALK_PAGE).await?;
                let Some(last) = page.last().copied() else { break };
                let ids = page.iter().map(|c| c.id).collect();
                let report =
                    replay::replay(&mut client, &by_ids(ids), &options, |_| ControlFlow::Continue(()))
                        .await?;
                add(&mut total, report);
                if page.len() < WALK_PAGE {
                    break;
                }
                after = Some(last);
            }
        }
    }
    tracing::info!(replayed = total.replayed, skipped_held = total.skipped_held, "replay from the console");
    let groups: Vec<((String, String), u64)> = total.by_kind.iter().map(|(k, n)| (k.clone(), *n)).collect();
    let body = html! {
        h1 { "Replayed" }
        p id="replay-result" { "Re-queued " strong { (text::thousands(total.replayed)) } " events"
            @if total.skipped_held > 0 { "; " (text::thousands(total.skipped_held)) " skipped because a processor held them (run the replay again for those)" }
            "." }
        (groups_table(&groups))
        p { a href=(ctx.url("/events?state=pending")) { "See pending events" } }
    };
    Ok(ctx.layout("Replayed", Nav::Events, body))
}
