//! The token login: a form that posts the token once and gets a session cookie.

use axum::body::Bytes;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use maud::{html, Markup};

use super::{Ctx, Nav};
use crate::auth;
use crate::error::ConsoleError;
use crate::params::Params;

fn form_page(ctx: &Ctx, message: Option<&str>) -> Markup {
    let body = html! {
        h1 { "Log in" }
        @if !ctx.state.writable() {
            p { "This console is read-only: no token is configured (HOOK_CONSOLE_TOKEN), so there is nothing to log in to." }
        } @else {
            @if let Some(message) = message { p.error { (message) } }
            form.login method="post" action=(ctx.url("/login")) {
                label { "Console token " input type="password" name="token" autocomplete="current-password" required; }
                button type="submit" id="login" { "Log in" }
            }
            p.hint { "The token enables replay for 8 hours in this browser (an HttpOnly, SameSite=Strict cookie)." }
        }
    };
    ctx.layout("Log in", Nav::None, body)
}

pub(crate) async fn form(ctx: Ctx) -> Response {
    Html(form_page(&ctx, None).into_string()).into_response()
}

pub(crate) async fn login(ctx: Ctx, body: Bytes) -> Response {
    let Some(token) = ctx.state.config().token.clone() else {
        return ctx.error_page(&ConsoleError::Forbidden("this console is read-only".into()));
    };
    if let Err(error) = auth::same_origin(&ctx.headers) {
        return ctx.error_page(&error);
    }
    let params = Params::parse(&body);
    if !params.get("token").is_some_and(|given| token.matches(given)) {
        tracing::warn!("console login with a wrong token");
        let page = form_page(&ctx, Some("Wrong token."));
        return (StatusCode::FORBIDDEN, Html(page.into_string())).into_response();
    }
    let lifetime = ctx.state.config().session_lifetime;
    let (id, _) = ctx.state.sessions().create(lifetime);
    let cookie = auth::login_cookie(&id, &ctx.cookie_path(), lifetime);
    ([(header::SET_COOKIE, cookie)], Redirect::to(&ctx.url("/events"))).into_response()
}

pub(crate) async fn logout(ctx: Ctx, body: Bytes) -> Response {
    let params = Params::parse(&body);
    let check = auth::check_action(
        ctx.state.writable(),
        ctx.login.as_ref().map(|(_, l)| l),
        params.get("csrf"),
        &ctx.headers,
    );
    if let Err(error) = check {
        return ctx.error_page(&error);
    }
    if let Some((id, _)) = &ctx.login {
        ctx.state.sessions().remove(id);
    }
    let cookie = auth::logout_cookie(&ctx.cookie_path());
    ([(header::SET_COOKIE, cookie)], Redirect::to(&ctx.url("/"))).into_response()
}
