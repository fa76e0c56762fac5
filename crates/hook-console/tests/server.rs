//! The console over HTTP on a real PostgreSQL: every page renders real-shaped data, hostile
//! values come out escaped, actions are refused without the token, a login or the right CSRF
//! value, and a replay re-queues exactly the selected or filtered events.

// Helpers of tests: a failed step is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use support::{seed, serve, Served, CLAUDE_SESSION, FAILURES, SESSION};

/// (id, source, processed, retry_count, dead) of every event, by creation.
async fn states(served: &Served) -> Vec<(String, String, bool, i32, bool)> {
    let client = served.db.client().await;
    client
        .query("SELECT id::text, source, processed, retry_count, dead_at IS NOT NULL FROM hook_events ORDER BY created_at, id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
}

async fn dead_ids(served: &Served) -> Vec<String> {
    states(served).await.into_iter().filter(|s| s.4).map(|s| s.0).collect()
}

#[tokio::test]
async fn every_page_renders_real_shaped_data() {
    let served = serve("console_pages", None).await;
    seed(&served.db, &[CLAUDE_SESSION, FAILURES]).await;

    let overview = served.get("").await;
    assert_eq!(overview.status, 200, "{}", overview.body);
    assert!(overview.body.contains("<svg"), "charts are inline SVG");
    // 3 dead; 2 retrying; pending = the 2 retrying (nothing else is unprocessed)
    assert!(
        overview.body.contains(r#"id="dead"><a href="/console/events?state=dead">3</a>"#),
        "{}",
        overview.body
    );
    assert!(overview.body.contains(r#"id="retrying"><a href="/console/events?state=retrying">2</a>"#));
    assert!(overview.body.contains("connection refused"), "failing routes show the latest error");
    assert!(overview.header("server-timing").is_some_and(|v| v.starts_with("app;dur=")));

    let events = served.get("/events").await;
    assert_eq!(events.status, 200);
    assert_eq!(events.body.matches("<tr>").count(), 1 + 16, "header + 16 events");
    assert!(!events.body.contains("name=\"id\""), "read-only: no selection");

    let dead = served.get("/events?state=dead").await;
    assert_eq!(dead.body.matches("badge dead").count(), 3, "{}", dead.body);
    let text = served.get("/events?q=CONNECTION+refused").await;
    assert_eq!(text.body.matches("<tr>").count(), 1 + 3, "error text search is case-insensitive");
    let by_session = served.get("/events?session=sess-7f3a").await;
    assert_eq!(by_session.body.matches("<tr>").count(), 1 + 9);
    let routed = served.get("/events?source=Stop&action=response_completed&state=retrying").await;
    assert_eq!(routed.body.matches("<tr>").count(), 1 + 2);
    let bad = served.get("/events?since=tomorrow").await;
    assert_eq!(bad.status, 400);

    // an event's page: payload pretty-printed, every error in order
    let id = served
        .db
        .client()
        .await
        .query_one("SELECT id::text FROM hook_events WHERE processing_errors[1] = 'timeout 1'", &[])
        .await
        .unwrap()
        .get::<_, String>(0);
    let event = served.get(&format!("/events/{id}")).await;
    assert_eq!(event.status, 200);
    let (a, b, c) =
        (event.body.find("timeout 1"), event.body.find("timeout 2"), event.body.find("connection refused"));
    assert!(a < b && b < c && a.is_some(), "errors in attempt order");
    assert!(event.body.contains("{\n  &quot;n&quot;: 1\n}"), "{}", event.body);
    assert_eq!(served.get("/events/00000000-0000-0000-0000-000000000000").await.status, 404);
    assert_eq!(served.get("/events/nope").await.status, 404);

    // sessions: the Claude Code session, counted
    let sessions = served.get("/sessions").await;
    assert_eq!(sessions.status, 200);
    assert!(sessions.body.contains("sess-7f3a") && sessions.body.contains("sess-old"));
    let timeline = served.get(&format!("/sessions/view?id={SESSION}")).await;
    assert_eq!(timeline.status, 200, "{}", timeline.body);
    assert!(timeline.body.contains(r#"id="session-events">9<"#));
    assert!(
        timeline.body.contains("<td>2.5 s</td>"),
        "Bash PreToolUse → PostToolUse: 2.5 s\n{}",
        timeline.body
    );
    assert!(timeline.body.contains("<td>250 ms</td>"), "Edit → PostToolUseFailure: 250 ms");
    assert!(timeline.body.contains("old_string not found"));
    assert!(timeline.body.contains("Run the tests and fix the failing one"));
    assert_eq!(served.get("/sessions/view?id=none").await.status, 404);
    assert_eq!(served.get("/nowhere").await.status, 404);
}

#[tokio::test]
async fn keyset_pages_walk_every_event_once() {
    let served = serve("console_paging", None).await;
    served
        .db
        .client()
        .await
        .batch_execute(
            "INSERT INTO hook_events (id, source, action, resource, resource_id, created_at)
             SELECT gen_random_uuid(), 'S', 'a', 'r', 'r' || i, now() - (i / 3) * interval '1 second'
             FROM generate_series(1, 120) AS i",
        )
        .await
        .unwrap();
    // 120 events, three per timestamp (ties broken by id), 50 per page
    let mut seen = Vec::new();
    let mut path = "/events".to_owned();
    loop {
        let page = served.get(&path).await;
        assert_eq!(page.status, 200);
        for part in page.body.split("href=\"/console/events/").skip(1) {
            seen.push(part[..36].to_owned());
        }
        match page.body.split("rel=\"next\" href=\"").nth(1) {
            Some(rest) => {
                path = rest[..rest.find('"').unwrap()].replace("&amp;", "&").replacen("/console", "", 1)
            }
            None => break,
        }
    }
    assert_eq!(seen.len(), 120);
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 120, "no event twice");
    // and back: the previous page of the last one is the middle one
    let second = served.get(&path).await;
    let prev = second.body.split("rel=\"prev\" href=\"").nth(1).unwrap();
    let prev = prev[..prev.find('"').unwrap()].replace("&amp;", "&").replacen("/console", "", 1);
    let middle = served.get(&prev).await;
    let first_of_middle = middle.body.split("href=\"/console/events/").nth(1).unwrap()[..36].to_owned();
    assert_eq!(first_of_middle, seen[50]);
}

/// Payloads are hostile input: markup, attribute breakouts, direction overrides, NUL-free
/// control characters, in every column the console shows.
#[tokio::test]
async fn hostile_values_are_escaped_everywhere() {
    let served = serve("console_hostile", None).await;
    let client = served.db.client().await;
    client
        .execute(
            "INSERT INTO hook_events (id, source, action, resource, resource_id, payload, metadata,
                                      retry_count, processing_errors, dead_at)
             VALUES (gen_random_uuid(), '<script>alert(1)</script>', '\"><img src=x onerror=alert(2)>', 'r',
                     'evil\u{202e}gnp.exe',
                     jsonb_build_object('session_id', '\"><script>alert(3)</script>', 'prompt', '</pre><script>alert(4)</script>',
                                        'tool_input', jsonb_build_object('command', '<img src=x onerror=alert(5)>')),
                     '{}', 3, ARRAY['<script>alert(6)</script>', '\u{200b}zero width\u{7}bell'], now())",
            &[],
        )
        .await
        .unwrap();
    let id: String = client.query_one("SELECT id::text FROM hook_events", &[]).await.unwrap().get(0);
    let session = "\"><script>alert(3)</script>";
    let session_q = form_urlencoded::byte_serialize(session.as_bytes()).collect::<String>();
    for path in [
        "".to_owned(),
        "/events".to_owned(),
        "/events?state=dead&q=%3Cscript".to_owned(),
        format!("/events/{id}"),
        "/sessions".to_owned(),
        format!("/sessions/view?id={session_q}"),
        format!("/events?source=%3Cscript%3Ealert(1)%3C%2Fscript%3E&session={session_q}"),
    ] {
        let page = served.get(&path).await;
        assert_eq!(page.status, 200, "{path}: {}", page.body);
        for n in 1..=6 {
            assert!(!page.body.contains(&format!("<script>alert({n})")), "{path}: unescaped script {n}");
        }
        assert!(!page.body.contains("<img"), "{path}: unescaped img");
        assert!(!page.body.contains("\u{202e}"), "{path}: raw direction override");
        assert!(
            page.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;") || path.starts_with("/sessions"),
            "{path}"
        );
        let csp = page.header("content-security-policy").unwrap_or_default();
        assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"), "{path}: {csp}");
        assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
    }
    let event = served.get(&format!("/events/{id}")).await;
    assert!(event.body.contains("evil⟦U+202E⟧gnp.exe"), "direction override shown as its code point");
    assert!(event.body.contains("⟦U+200B⟧zero width⟦U+0007⟧bell"));
    assert!(event.body.contains("&lt;/pre&gt;&lt;script&gt;alert(4)"));
    assert!(event.body.contains("&quot;&gt;&lt;img src=x onerror=alert(2)&gt;"));
    let timeline = served.get(&format!("/sessions/view?id={session_q}")).await;
    assert!(timeline.body.contains("&lt;img src=x onerror=alert(5)&gt;"), "{}", timeline.body);
    // the page's own script is the only one, served from the console's origin
    assert_eq!(event.body.matches("<script").count(), 1);
    assert!(event.body.contains(r#"<script src="/console/static/console.js" defer></script>"#));
}

#[tokio::test]
async fn a_20_mib_payload_is_shown_cut() {
    let served = serve("console_big", None).await;
    let client = served.db.client().await;
    client
        .execute(
            "INSERT INTO hook_events (id, source, action, resource, resource_id, payload)
             VALUES (gen_random_uuid(), 'PostToolUse', 'tool_completion', 'tool', 'Read',
                     jsonb_build_object('tool_response', jsonb_build_object('content', repeat('<x>', 7 * 1024 * 1024))))",
            &[],
        )
        .await
        .unwrap();
    let id: String = client.query_one("SELECT id::text FROM hook_events", &[]).await.unwrap().get(0);
    let page = served.get(&format!("/events/{id}")).await;
    assert_eq!(page.status, 200);
    assert!(page.body.len() < 2 * 1024 * 1024, "{} bytes", page.body.len());
    assert!(
        page.body.contains("Showing the first 262,144 of 22,020,") && page.body.contains("(21.0 MiB)"),
        "{}",
        &page.body[..3000.min(page.body.len())]
    );
    assert!(!page.body.contains("<x>"));
    assert!(served.get("/events").await.status == 200);
}

#[tokio::test]
async fn without_a_token_every_action_is_refused() {
    let served = serve("console_readonly", None).await;
    seed(&served.db, &[FAILURES]).await;
    let before = states(&served).await;
    let id = dead_ids(&served).await.remove(0);
    for step in ["confirm", "run"] {
        let response = served
            .post("/replay", &[], &[("step", step), ("scope", "selected"), ("id", &id), ("csrf", "x")])
            .await;
        assert_eq!(response.status, 403, "{}", response.body);
        assert!(response.body.contains("read-only"));
    }
    assert_eq!(served.post("/login", &[], &[("token", support::TOKEN)]).await.status, 403);
    assert!(served.get("/login").await.body.contains("read-only"));
    assert!(served.get("").await.body.contains("read-only"));
    assert_eq!(states(&served).await, before, "nothing changed");
}

#[tokio::test]
async fn with_a_token_actions_need_a_login_and_the_csrf_value() {
    let served = serve("console_csrf", Some(support::TOKEN)).await;
    seed(&served.db, &[FAILURES]).await;
    let before = states(&served).await;
    let id = dead_ids(&served).await.remove(0);
    let run = |csrf: &str| {
        vec![
            ("step", "run".to_owned()),
            ("scope", "selected".into()),
            ("id", id.clone()),
            ("csrf", csrf.to_owned()),
        ]
    };
    let form =
        |pairs: &Vec<(&'static str, String)>| pairs.iter().map(|(k, v)| (*k, v.clone())).collect::<Vec<_>>();

    // not logged in
    let pairs = form(&run("anything"));
    let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(served.post("/replay", &[], &pairs).await.status, 403);
    // a wrong token
    let wrong = served.post("/login", &[], &[("token", "not-the-token-at-all")]).await;
    assert_eq!(wrong.status, 403);
    assert!(wrong.header("set-cookie").is_none());
    // a forged cookie
    assert_eq!(
        served.post("/replay", &[("cookie", "hook_console_session=forged")], &pairs).await.status,
        403
    );

    let cookie = served.login().await;
    let csrf = served.csrf(&cookie).await;
    assert_eq!(csrf.len(), 64);
    // logged in, but a wrong, empty or missing CSRF value
    for bad in ["wrong", "", &csrf[..63]] {
        let pairs = form(&run(bad));
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let response = served.post("/replay", &[("cookie", &cookie)], &pairs).await;
        assert_eq!(response.status, 403, "csrf {bad:?}: {}", response.body);
    }
    let no_csrf = served
        .post("/replay", &[("cookie", &cookie)], &[("step", "run"), ("scope", "selected"), ("id", &id)])
        .await;
    assert_eq!(no_csrf.status, 403);
    // the right value from another origin
    let pairs = form(&run(&csrf));
    let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    for origin in [("origin", "http://evil.example"), ("sec-fetch-site", "cross-site")] {
        let response = served.post("/replay", &[("cookie", &cookie), origin], &pairs).await;
        assert_eq!(response.status, 403, "{origin:?}");
    }
    assert_eq!(states(&served).await, before, "no refused request changed anything");

    // all right: the event is re-queued
    let ok = served
        .post("/replay", &[("cookie", &cookie), ("origin", &format!("http://{}", served.addr))], &pairs)
        .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert!(ok.body.contains("Re-queued <strong>1</strong> events"), "{}", ok.body);
    assert!(!dead_ids(&served).await.contains(&id));

    // logging out ends the session: its cookie no longer acts
    let logout = served.post("/logout", &[("cookie", &cookie)], &[("csrf", &csrf)]).await;
    assert_eq!(logout.status, 303);
    let id2 = dead_ids(&served).await.remove(0);
    let again = served
        .post(
            "/replay",
            &[("cookie", &cookie)],
            &[("step", "run"), ("scope", "selected"), ("id", &id2), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(again.status, 403);
}

#[tokio::test]
async fn replay_requeues_exactly_the_selected_events() {
    let served = serve("console_replay_selected", Some(support::TOKEN)).await;
    seed(&served.db, &[CLAUDE_SESSION, FAILURES]).await;
    let cookie = served.login().await;
    let csrf = served.csrf(&cookie).await;
    let dead = dead_ids(&served).await;
    assert_eq!(dead.len(), 3);
    let processed: String = served
        .db
        .client()
        .await
        .query_one("SELECT id::text FROM hook_events WHERE source = 'SessionStart'", &[])
        .await
        .unwrap()
        .get(0);
    let before = states(&served).await;

    // the confirmation counts what will be re-queued: the two dead ones, not the processed one
    let chosen = [("id", dead[0].as_str()), ("id", dead[2].as_str()), ("id", processed.as_str())];
    let mut form = vec![("csrf", csrf.as_str()), ("step", "confirm"), ("scope", "selected")];
    form.extend_from_slice(&chosen);
    let confirm = served.post("/replay", &[("cookie", &cookie)], &form).await;
    assert_eq!(confirm.status, 200, "{}", confirm.body);
    assert!(confirm.body.contains(r#"id="replay-count">2<"#), "{}", confirm.body);
    assert_eq!(states(&served).await, before, "confirming changes nothing");

    form[1] = ("step", "run");
    let run = served.post("/replay", &[("cookie", &cookie)], &form).await;
    assert_eq!(run.status, 200, "{}", run.body);
    assert!(run.body.contains("Re-queued <strong>2</strong> events"));
    let after = states(&served).await;
    for (b, a) in before.iter().zip(&after) {
        if a.0 == dead[0] || a.0 == dead[2] {
            assert_eq!((a.2, a.3, a.4), (false, 0, false), "re-queued: {a:?}");
        } else {
            assert_eq!(a, b, "untouched");
        }
    }
    let history: serde_json::Value = served
        .db
        .client()
        .await
        .query_one("SELECT replays FROM hook_events WHERE id = $1::text::uuid", &[&dead[0]])
        .await
        .unwrap()
        .get(0);
    assert_eq!(history[0]["previous_retry_count"], 3, "hook_store::replay's history: {history}");

    // with include_processed the processed one is re-queued too
    let form = [
        ("csrf", csrf.as_str()),
        ("step", "run"),
        ("scope", "selected"),
        ("id", processed.as_str()),
        ("include_processed", "on"),
    ];
    let run = served.post("/replay", &[("cookie", &cookie)], &form).await;
    assert!(run.body.contains("Re-queued <strong>1</strong> events"), "{}", run.body);
}

#[tokio::test]
async fn replay_requeues_exactly_what_a_filter_matches() {
    let served = serve("console_replay_filter", Some(support::TOKEN)).await;
    seed(&served.db, &[CLAUDE_SESSION, FAILURES]).await;
    // 1200 more dead events of another route, to walk more than one page
    served.db.client().await
        .batch_execute(
            "INSERT INTO hook_events (id, source, action, resource, resource_id, retry_count, processing_errors, dead_at, created_at)
             SELECT gen_random_uuid(), 'Notification', 'notification', 'session', 's', 3, ARRAY['boom ' || i], now(),
                    now() - interval '1 hour' + i * interval '1 millisecond'
             FROM generate_series(1, 1200) AS i",
        )
        .await
        .unwrap();
    let cookie = served.login().await;
    let csrf = served.csrf(&cookie).await;
    let before = states(&served).await;

    // dead Notification events: 1200 of them, walked in pages; the dead PostToolUse ones and the
    // retrying ones stay as they are
    let form = [
        ("csrf", csrf.as_str()),
        ("step", "confirm"),
        ("scope", "filter"),
        ("state", "dead"),
        ("source", "Notification"),
    ];
    let confirm = served.post("/replay", &[("cookie", &cookie)], &form).await;
    assert!(confirm.body.contains(r#"id="replay-count">1,200<"#), "{}", confirm.body);
    let mut run = form;
    run[1] = ("step", "run");
    let result = served.post("/replay", &[("cookie", &cookie)], &run).await;
    assert_eq!(result.status, 200, "{}", result.body);
    assert!(result.body.contains("Re-queued <strong>1,200</strong> events"), "{}", result.body);
    let after = states(&served).await;
    let mut requeued = 0;
    for (b, a) in before.iter().zip(&after) {
        if b.1 == "Notification" && b.4 {
            assert_eq!((a.2, a.3, a.4), (false, 0, false));
            requeued += 1;
        } else {
            assert_eq!(a, b, "untouched: {b:?}");
        }
    }
    assert_eq!(requeued, 1200);

    // error text: the events whose errors mention "connection refused" and may be replayed:
    // two dead PostToolUse, one retrying Stop
    let form = [("csrf", csrf.as_str()), ("step", "run"), ("scope", "filter"), ("q", "connection refused")];
    let result = served.post("/replay", &[("cookie", &cookie)], &form).await;
    assert!(result.body.contains("Re-queued <strong>3</strong> events"), "{}", result.body);
    let left: Vec<String> = served.db.client().await
        .query("SELECT processing_errors[cardinality(processing_errors)] FROM hook_events WHERE dead_at IS NOT NULL", &[])
        .await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(left, ["disk full"]);
}
