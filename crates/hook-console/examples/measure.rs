//! Server time of every console page on a table of 1,000,000 events from hook-bench's generator
//! (`hook_store::bench::insert_backlog`), shaped like a queue that has run for a while: 98.5 %
//! processed (5-50 ms after creation), 1 % dead and 0.25 % retrying with errors, 0.25 % pending.
//!
//! Two shapes of time: `week` spreads the events over the last 7 days (what a table of a million
//! events usually is), `burst` keeps the generator's timestamps (all created within a second and
//! processed in the last minutes: every "last hour" query sees all of them, the worst case).
//!
//! Each page is requested 20 times over loopback; the `Server-Timing` header (queries and
//! rendering, measured in the console's middleware) is read, and the median, the 95th
//! percentile (nearest rank: the 19th of 20) and the max printed, with the machine's load
//! average (`/proc/loadavg`) before and after each shape.
//!
//! ```text
//! TMPDIR=/tmp/... cargo run --release -p hook-console --example measure -- [events] [week,burst]
//! ```
//!
//! A measurement, not a test: it asserts nothing about speed (see docs/console.md for the
//! figures).

#![allow(clippy::print_stdout, clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use hook_console::{ConsoleConfig, ConsoleState, Token};
use hook_store::testing::TestDb;
use hook_store::StoreOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "measure-token-0123456789";
const RUNS: usize = 20;

/// The generator's rows, made into a queue that has run: outcomes by `metadata.seq`.
const OUTCOMES: &str = "UPDATE hook_events SET
      processed = (metadata->>'seq')::int8 % 400 >= 6,
      processed_at = CASE WHEN (metadata->>'seq')::int8 % 400 >= 6
                          THEN created_at + (5 + (metadata->>'seq')::int8 % 46) * interval '1 millisecond' END,
      retry_count = CASE WHEN (metadata->>'seq')::int8 % 400 < 4 THEN 3
                         WHEN (metadata->>'seq')::int8 % 400 < 5 THEN 1
                         WHEN (metadata->>'seq')::int8 % 100 = 50 THEN 1 ELSE 0 END,
      processing_errors = CASE
          WHEN (metadata->>'seq')::int8 % 400 < 4 THEN ARRAY['handler timed out after 30s', 'connection refused', 'tool output rejected: exit status ' || ((metadata->>'seq')::int8 % 7)]
          WHEN (metadata->>'seq')::int8 % 400 < 5 OR (metadata->>'seq')::int8 % 100 = 50 THEN ARRAY['connection refused'] END,
      dead_at = CASE WHEN (metadata->>'seq')::int8 % 400 < 4 THEN created_at + interval '2 minutes' END,
      next_attempt_at = CASE WHEN (metadata->>'seq')::int8 % 400 = 4 THEN now() + interval '5 minutes' END,
      result_metadata = CASE WHEN (metadata->>'seq')::int8 % 400 >= 6 THEN '{\"success\": true}'::jsonb END";

/// Spreads creation over the last 7 days, keeping the generator's order.
const WEEK: &str = "UPDATE hook_events SET
      created_at = now() - ($1::int8 - (metadata->>'seq')::int8) * (interval '7 days' / $1::int8),
      processed_at = CASE WHEN processed THEN now() - ($1::int8 - (metadata->>'seq')::int8) * (interval '7 days' / $1::int8)
                              + (5 + (metadata->>'seq')::int8 % 46) * interval '1 millisecond' END,
      dead_at = CASE WHEN dead_at IS NOT NULL THEN now() - ($1::int8 - (metadata->>'seq')::int8) * (interval '7 days' / $1::int8) + interval '2 minutes' END";

/// The overview's failure reads before migration 0014, for comparison on the same table: the
/// queue counts in one pass over the unprocessed rows, the failing routes and the retried count
/// from the heap rows of every event that ever failed (through `idx_hook_events_retry`).
const BEFORE_QUEUE_DEPTH: &str = "SELECT count(*) FILTER (WHERE dead_at IS NULL), \
         count(*) FILTER (WHERE dead_at IS NULL AND retry_count > 0), \
         count(*) FILTER (WHERE dead_at IS NULL AND next_attempt_at > now()), \
         count(*) FILTER (WHERE dead_at IS NOT NULL), \
         count(*) FILTER (WHERE dead_at >= now() - $1::int8 * interval '1 microsecond'), \
         date_part('epoch', now() - min(created_at) FILTER (WHERE dead_at IS NULL)) \
     FROM hook_events WHERE NOT processed";
const BEFORE_ERRORS_BY_ROUTE: &str = "SELECT source, action, count(*), sum(retry_count)::int8, \
         count(*) FILTER (WHERE dead_at IS NOT NULL), \
         count(*) FILTER (WHERE NOT processed AND dead_at IS NULL), \
         count(*) FILTER (WHERE processed), \
         (array_agg(processing_errors[cardinality(processing_errors)] \
              ORDER BY coalesce(dead_at, next_attempt_at, processed_at, created_at) DESC))[1], \
         max(coalesce(dead_at, next_attempt_at, processed_at, created_at)) \
     FROM hook_events \
     WHERE retry_count > 0 \
       AND ((NOT processed AND dead_at IS NULL) \
            OR processed_at >= now() - $1::int8 * interval '1 microsecond' \
            OR dead_at >= now() - $1::int8 * interval '1 microsecond') \
     GROUP BY source, action ORDER BY count(*) DESC, source, action LIMIT $2";
const BEFORE_PROCESSED_IN_WINDOW: &str = "SELECT \
       (SELECT count(*) FROM (SELECT 1 FROM hook_events \
        WHERE processed AND processed_at >= now() - $1::int8 * interval '1 microsecond' LIMIT $2) AS x), \
       (SELECT count(*) FROM (SELECT processed, processed_at FROM hook_events WHERE retry_count > 0 OFFSET 0) AS f \
        WHERE processed AND processed_at >= now() - $1::int8 * interval '1 microsecond')";

async fn get(
    addr: std::net::SocketAddr,
    target: &str,
    cookie: &str,
    body: Option<&str>,
) -> (u16, f64, usize) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (method, extra) = match body {
        Some(b) => (
            "POST",
            format!("content-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\n", b.len()),
        ),
        None => ("GET", String::new()),
    };
    let head = format!(
        "{method} {target} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncookie: {cookie}\r\n{extra}\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    if let Some(b) = body {
        stream.write_all(b.as_bytes()).await.unwrap();
    }
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw);
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let dur = text
        .lines()
        .find_map(|l| l.strip_prefix("server-timing: app;dur="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN);
    (status, dur, raw.len())
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

async fn measure(addr: std::net::SocketAddr, cookie: &str, pages: &[(String, String, Option<String>)]) {
    println!("load average (1, 5, 15 min) before: {}\n", load_average());
    println!("| page | request | status | median ms | p95 ms | max ms | bytes |");
    println!("|---|---|---|---|---|---|---|");
    for (name, target, body) in pages {
        let mut times = Vec::new();
        let mut last = (0, 0.0, 0);
        for _ in 0..RUNS {
            last = get(addr, target, cookie, body.as_deref()).await;
            times.push(last.1);
        }
        times.sort_by(f64::total_cmp);
        println!(
            "| {name} | `{}{}` | {} | {:.1} | {:.1} | {:.1} | {} |",
            if body.is_some() { "POST " } else { "" },
            target,
            last.0,
            times[RUNS / 2],
            times[(RUNS * 95).div_ceil(100) - 1],
            times[RUNS - 1],
            last.2
        );
    }
    println!("\nload average (1, 5, 15 min) after: {}", load_average());
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let events: i64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    let db = TestDb::migrated("console_measure").await;
    let store = db.store(StoreOptions { listen: false, pool_size: 4, ..StoreOptions::default() }).await;
    let started = Instant::now();
    {
        let mut client = store.pool().get().await.unwrap();
        let mut first = 1;
        while first <= events {
            let last = (first + 99_999).min(events);
            hook_store::bench::insert_backlog(&mut client, first, last).await.unwrap();
            first = last + 1;
        }
    }
    let admin = db.client().await;
    admin.batch_execute("SET maintenance_work_mem = '256MB'").await.unwrap();
    admin.execute(OUTCOMES, &[]).await.unwrap();
    admin.batch_execute("VACUUM ANALYZE hook_events").await.unwrap();
    println!("{events} events generated and given outcomes in {:.0} s", started.elapsed().as_secs_f64());

    let state = ConsoleState::new(
        store.pool().clone(),
        ConsoleConfig { token: Some(Token::new(TOKEN).unwrap()), ..ConsoleConfig::default() },
    );
    let app = hook_console::mount("/console", state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    // log in: the replay confirmation needs the session and its CSRF value
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = format!("token={TOKEN}");
    let head = format!(
        "POST /console/login HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let cookie = raw
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET /console/events HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncookie: {cookie}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut page = String::new();
    stream.read_to_string(&mut page).await.unwrap();
    let marker = "name=\"csrf\" value=\"";
    let at = page.find(marker).unwrap() + marker.len();
    let csrf = page[at..at + 64].to_owned();

    // `measure [events] [shapes]`: shapes `week,burst` (the default), or one of them
    let shapes = std::env::args().nth(2).unwrap_or_else(|| "week,burst".to_owned());
    for shape in shapes.split(',') {
        if shape == "week" {
            let started = Instant::now();
            admin.execute(WEEK, &[&events]).await.unwrap();
            admin.batch_execute("VACUUM ANALYZE hook_events").await.unwrap();
            println!(
                "\nshape: week (spread over 7 days; re-timed in {:.0} s)\n",
                started.elapsed().as_secs_f64()
            );
        } else {
            let started = Instant::now();
            admin
                .execute(
                    "UPDATE hook_events SET created_at = now() - ($1::int8 - (metadata->>'seq')::int8) * interval '1 microsecond',
                         processed_at = CASE WHEN processed THEN now() - ($1::int8 - (metadata->>'seq')::int8) * interval '1 microsecond'
                                            + (5 + (metadata->>'seq')::int8 % 46) * interval '1 millisecond' END,
                         dead_at = CASE WHEN dead_at IS NOT NULL THEN now() END",
                    &[&events],
                )
                .await
                .unwrap();
            admin.batch_execute("VACUUM ANALYZE hook_events").await.unwrap();
            println!("\nshape: burst (all created within a second, processed in the last minute; re-timed in {:.0} s)\n", started.elapsed().as_secs_f64());
        }
        let row = admin
            .query_one(
                "SELECT (SELECT id::text FROM hook_events WHERE dead_at IS NOT NULL ORDER BY created_at DESC LIMIT 1),
                        (SELECT (extract(epoch FROM created_at) * 1000000)::int8 || '_' || id FROM hook_events
                         ORDER BY created_at DESC, id DESC OFFSET 500000 LIMIT 1)",
                &[],
            )
            .await
            .unwrap();
        let (dead_id, middle): (String, String) = (row.get(0), row.get(1));
        let page = |name: &str, target: String| (name.to_owned(), target, None);
        let pages = vec![
            page("overview (24h)", "/console".into()),
            page("overview (1h)", "/console?window=1h".into()),
            page("overview (7d)", "/console?window=7d".into()),
            page("events: newest", "/console/events".into()),
            page("events: older page, mid-table", format!("/console/events?before={middle}")),
            page("events: dead", "/console/events?state=dead".into()),
            page("events: pending", "/console/events?state=pending".into()),
            page("events: retrying", "/console/events?state=retrying".into()),
            page("events: processed", "/console/events?state=processed".into()),
            page("events: error text", "/console/events?q=exit+status+3".into()),
            page("events: route", "/console/events?source=Stop&action=response_completed".into()),
            page("events: session", "/console/events?session=session-5".into()),
            page("event page", format!("/console/events/{dead_id}")),
            page("sessions", "/console/sessions".into()),
            page("session timeline (10,309 events)", "/console/sessions/view?id=session-5".into()),
            (
                "replay confirmation: all dead".into(),
                "/console/replay".into(),
                Some(format!("csrf={csrf}&step=confirm&scope=filter&state=dead")),
            ),
            (
                "replay confirmation: a route's failures".into(),
                "/console/replay".into(),
                Some(format!("csrf={csrf}&step=confirm&scope=filter&state=failed&source=PostToolUse")),
            ),
        ];
        measure(addr, &cookie, &pages).await;
        // where the overview's time goes: each of its queries alone
        // the widest window offered but 30 d: on the `week` table it holds every failure
        let window = 7 * 86_400_000_000i64;
        // the overview's caps (crates/hook-console/src/pages/overview.rs)
        let (cap, minute_cap, sample, routes) = (20_000i64, 10_000i64, 100i64, 20i64);
        let queries: [(&str, &str, Vec<&(dyn tokio_postgres::types::ToSql + Sync)>); 9] = [
            ("stats::queue_depth", hook_store::stats::QUEUE_DEPTH, vec![&window]),
            ("stats::queue_depth before 0014", BEFORE_QUEUE_DEPTH, vec![&window]),
            ("stats::errors_by_route", hook_store::stats::ERRORS_BY_ROUTE, vec![&window, &routes]),
            ("stats::errors_by_route before 0014", BEFORE_ERRORS_BY_ROUTE, vec![&window, &routes]),
            ("console::processed_in_window", hook_store::console::PROCESSED_IN_WINDOW, vec![&window, &cap]),
            ("console::processed_in_window before 0014", BEFORE_PROCESSED_IN_WINDOW, vec![&window, &cap]),
            ("console::processed_per_minute", hook_store::console::PROCESSED_PER_MINUTE, vec![&minute_cap]),
            ("console::received_per_minute", hook_store::console::RECEIVED_PER_MINUTE, vec![&minute_cap]),
            ("console::latency_per_minute", hook_store::console::LATENCY_PER_MINUTE, vec![&sample]),
        ];
        println!("\noverview (7d), each query alone (EXPLAIN ANALYZE execution time):\n");
        for (name, sql, params) in queries {
            let rows = admin.query(&format!("EXPLAIN (ANALYZE) {sql}"), &params).await.unwrap();
            let time = rows
                .iter()
                .map(|r| r.get::<_, String>(0))
                .find(|l| l.starts_with("Execution Time"))
                .unwrap_or_default();
            println!("- {name}: {time}");
        }
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
}
