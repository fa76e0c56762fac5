//! The console in a real headless Chromium, driven through WebDriver (chromedriver, fantoccini):
//! every page loads on real-shaped data; filter → event → replay by clicking, checked in the
//! table; a hostile payload renders as text and none of its scripts runs (checked in the
//! browser). Once with JavaScript on, once with it off (everything but "select all" works).
//!
//! Screenshots of each page are saved under `target/console-screenshots/` (printed at the end).
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them when missing).

// Helpers of tests: a failed step is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use support::{seed, serve, Served, CLAUDE_SESSION, FAILURES, SESSION, TOKEN};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Scripts a hostile payload tries to run; each would set `window.__pwned`.
const HOSTILE: &str = "
    INSERT INTO hook_events (id, source, action, resource, resource_id, payload, metadata, retry_count,
                             processing_errors, dead_at, created_at)
    VALUES ('0190a000-0000-7000-8000-00000000beef', 'PostToolUse', 'tool_completion', 'tool', 'Bash',
            jsonb_build_object(
              'session_id', 'sess-7f3a',
              'tool_name', 'Bash',
              'tool_input', jsonb_build_object('command', '<img src=x onerror=\"window.__pwned=1\">'),
              'tool_response', jsonb_build_object('stdout', '</pre><script>window.__pwned=2</script>',
                                                  'note', '\"><svg onload=window.__pwned=3>', 'rtl', 'abc\u{202e}txt.exe')),
            '{}', 3, ARRAY['<script>window.__pwned=4</script>'], now(), now() - interval '1 minute')";

struct Driver {
    child: tokio::process::Child,
    port: u16,
    profile: PathBuf,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
    listener.local_addr().expect("its address").port()
}

async fn start_driver(name: &str) -> Driver {
    for binary in [CHROMIUM, CHROMEDRIVER] {
        assert!(
            Path::new(binary).exists(),
            "{binary} is missing: install Debian's chromium and chromium-driver \
             (apt-get install -y chromium chromium-driver; .ci/run does it)"
        );
    }
    let port = free_port();
    let child = tokio::process::Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start chromedriver");
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not listen on {port} within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let profile = std::env::temp_dir().join(format!("hook-console-chromium-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&profile);
    Driver { child, port, profile }
}

async fn browser(driver: &Driver, javascript: bool) -> Client {
    let mut options = json!({
        "binary": CHROMIUM,
        "args": [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--window-size=1280,1000",
            format!("--user-data-dir={}", driver.profile.display()),
        ],
    });
    if !javascript {
        options["prefs"] = json!({"profile.managed_default_content_settings.javascript": 2});
    }
    let mut capabilities = serde_json::Map::new();
    capabilities.insert("goog:chromeOptions".into(), options);
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a Chromium session through chromedriver")
}

fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let dir = target.join("console-screenshots");
    std::fs::create_dir_all(&dir).expect("create the screenshot folder");
    dir
}

async fn shoot(client: &Client, name: &str) {
    let png = client.screenshot().await.expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG"), "{name}: a PNG");
    std::fs::write(screenshot_dir().join(format!("{name}.png")), png).expect("save the screenshot");
}

/// No script of a payload ran on this page: `window.__pwned` is unset, and the only script
/// elements are the console's own.
async fn assert_no_script_ran(client: &Client, page: &str) {
    let pwned = client.execute("return window.__pwned === undefined ? null : window.__pwned;", vec![]).await;
    assert_eq!(pwned.expect("run a check script"), json!(null), "{page}: a payload's script ran");
    let scripts = client
        .execute(
            "return Array.from(document.querySelectorAll('script, img, svg [onload], iframe, object, embed'))
                 .filter(e => !(e.tagName === 'SCRIPT' && e.src.endsWith('/static/console.js'))).length;",
            vec![],
        )
        .await
        .expect("count elements");
    assert_eq!(scripts, json!(0), "{page}: an element from a payload");
}

async fn text(client: &Client, css: &str) -> String {
    client
        .wait()
        .at_most(std::time::Duration::from_secs(15))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .text()
        .await
        .expect("its text")
}

async fn click(client: &Client, css: &str) {
    client
        .wait()
        .at_most(std::time::Duration::from_secs(15))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .expect("click");
}

/// The page's URL once it satisfies `ready`, waiting up to 15 s: a click that submits a form
/// returns before the browser has followed the answer, and on a busy machine that takes a while.
async fn url_when(client: &Client, ready: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let url = client.current_url().await.unwrap().to_string();
        if ready(&url) || std::time::Instant::now() > deadline {
            return url;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn dead(served: &Served) -> Vec<String> {
    served
        .db
        .client()
        .await
        .query("SELECT id::text FROM hook_events WHERE dead_at IS NOT NULL ORDER BY created_at", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn pending_ids(served: &Served) -> Vec<String> {
    served
        .db
        .client()
        .await
        .query(
            "SELECT id::text FROM hook_events WHERE NOT processed AND dead_at IS NULL AND retry_count = 0",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The whole walk through the console; screenshots named `<prefix>-<page>.png`.
async fn walk(served: &Served, client: &Client, javascript: bool, prefix: &str) {
    let shot = |name: &str| format!("{prefix}-{name}");
    // overview
    client.goto(&served.url("")).await.expect("open the overview");
    assert_eq!(text(client, "#dead").await, "4");
    assert!(client.find(Locator::Css("svg.chart rect.bar")).await.is_ok(), "a chart");
    assert_no_script_ran(client, "overview").await;
    shoot(client, &shot("overview")).await;

    // read-only until logged in: no selection boxes
    client.goto(&served.url("/events")).await.unwrap();
    assert!(client.find_all(Locator::Css("input[name=id]")).await.unwrap().is_empty());
    click(client, "header .mode a").await;
    client.find(Locator::Css("input[name=token]")).await.unwrap().send_keys(TOKEN).await.unwrap();
    click(client, "#login").await;
    let url = url_when(client, |u| u.split('?').next().unwrap_or(u).ends_with("/events")).await;
    assert!(
        url.split('?').next().unwrap_or(&url).ends_with("/events"),
        "logged in, on the events: {url} {}",
        client.source().await.unwrap_or_default()
    );

    // filter: dead events
    client.find(Locator::Css("select[name=state]")).await.unwrap().select_by_value("dead").await.unwrap();
    click(client, "#apply-filter").await;
    let url = url_when(client, |u| u.contains("state=dead")).await;
    assert!(url.contains("state=dead"), "{url}");
    let rows = client.find_all(Locator::Css("table.events tbody tr")).await.unwrap();
    assert_eq!(rows.len(), 4, "the four dead events");
    assert_no_script_ran(client, "events").await;
    shoot(client, &shot("events")).await;

    // the hostile event: its payload is text
    client.goto(&served.url("/events/0190a000-0000-7000-8000-00000000beef")).await.unwrap();
    let payload = text(client, "section.json pre").await;
    assert!(payload.contains("</pre><script>window.__pwned=2</script>"), "{payload}");
    assert!(payload.contains("<img src=x onerror=\\\"window.__pwned=1\\\">"), "{payload}");
    assert!(payload.contains("abc⟦U+202E⟧txt.exe"));
    assert!(text(client, "section.errors").await.contains("<script>window.__pwned=4</script>"));
    assert_no_script_ran(client, "hostile event").await;
    shoot(client, &shot("event-hostile")).await;

    // filter → event → replay by clicking
    client.goto(&served.url("/events?state=dead&q=connection+refused")).await.unwrap();
    let first = client.find(Locator::Css("table.events tbody tr td.time a")).await.unwrap();
    let href = first.attr("href").await.unwrap().unwrap_or_default();
    let id = href.rsplit('/').next().unwrap_or_default().to_owned();
    first.click().await.unwrap();
    assert!(text(client, "h1").await.contains(&id));
    shoot(client, &shot("event")).await;
    click(client, "#replay-one").await;
    assert_eq!(text(client, "#replay-count").await, "1");
    shoot(client, &shot("replay-confirm")).await;
    assert!(dead(served).await.contains(&id), "confirming changes nothing");
    click(client, "#confirm-replay").await;
    assert!(text(client, "#replay-result").await.starts_with("Re-queued 1 events"));
    shoot(client, &shot("replay-done")).await;
    assert!(!dead(served).await.contains(&id), "re-queued in the table");
    assert!(pending_ids(served).await.contains(&id));

    // select two of the remaining dead events, replay them
    client.goto(&served.url("/events?state=dead")).await.unwrap();
    let boxes = client.find_all(Locator::Css("input[name=id]")).await.unwrap();
    assert_eq!(boxes.len(), 3);
    let mut chosen = Vec::new();
    if javascript {
        click(client, "#select-all").await;
        for b in &boxes {
            assert_eq!(
                b.prop("checked").await.unwrap().as_deref(),
                Some("true"),
                "select all ticked every box"
            );
        }
        // untick the last: two stay selected
        boxes[2].click().await.unwrap();
        for b in &boxes[..2] {
            chosen.push(b.attr("value").await.unwrap().unwrap_or_default());
        }
    } else {
        for b in &boxes[..2] {
            b.click().await.unwrap();
            chosen.push(b.attr("value").await.unwrap().unwrap_or_default());
        }
    }
    let left = boxes[2].attr("value").await.unwrap().unwrap_or_default();
    click(client, "#replay-selected").await;
    assert_eq!(text(client, "#replay-count").await, "2");
    click(client, "#confirm-replay").await;
    assert!(text(client, "#replay-result").await.starts_with("Re-queued 2 events"));
    let still_dead = dead(served).await;
    assert_eq!(still_dead, std::slice::from_ref(&left), "exactly the selected ones were re-queued");
    let pending = pending_ids(served).await;
    assert!(chosen.iter().all(|c| pending.contains(c)));

    // everything a filter matches: the two Stop events waiting for a retry, not the processed
    // Stop event that once failed, not the dead event left
    client.goto(&served.url("/events?state=retrying&source=Stop")).await.unwrap();
    click(client, "#replay-filter").await;
    assert_eq!(text(client, "#replay-count").await, "2");
    click(client, "#confirm-replay").await;
    assert!(text(client, "#replay-result").await.starts_with("Re-queued 2 events"));
    let stop: Vec<(bool, i32, bool)> = served
        .db
        .client()
        .await
        .query(
            "SELECT processed, retry_count, next_attempt_at IS NULL FROM hook_events
             WHERE source = 'Stop' AND processing_errors IS NOT NULL ORDER BY processed, created_at",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(stop, [(false, 0, true), (false, 0, true), (true, 1, true)], "exactly the filter's events");
    assert_eq!(dead(served).await, [left], "the dead event is not the filter's");

    // sessions and a timeline
    client.goto(&served.url("/sessions")).await.unwrap();
    assert!(text(client, "table.sessions").await.contains(SESSION));
    assert_no_script_ran(client, "sessions").await;
    shoot(client, &shot("sessions")).await;
    click(client, "table.sessions tbody tr td a.session").await;
    let timeline = text(client, "table.timeline").await;
    assert!(timeline.contains("2.5 s") && timeline.contains("old_string not found"), "{timeline}");
    assert_no_script_ran(client, "session").await;
    shoot(client, &shot("session")).await;
}

async fn run(name: &str, javascript: bool) {
    let served = serve(name, Some(TOKEN)).await;
    seed(&served.db, &[CLAUDE_SESSION, FAILURES, HOSTILE]).await;
    let driver = start_driver(name).await;
    let client = browser(&driver, javascript).await;
    let prefix = if javascript { "js" } else { "nojs" };
    walk(&served, &client, javascript, prefix).await;
    client.close().await.expect("end the browser session");
    // Written to the process's stderr directly, so that it shows past the test harness's capture.
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "console screenshots: {}",
        screenshot_dir().join(format!("{prefix}-*.png")).display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_chromium_with_javascript() {
    run("console_browser_js", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_chromium_without_javascript() {
    run("console_browser_nojs", false).await;
}
