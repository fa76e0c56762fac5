//! `hook-processor stats`: the original README's monitoring queries as one report, in text or
//! JSON. The queries are in `hook_store::stats`; this module only runs and prints them.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context;
use hook_store::stats::{self, Percentile, ProcessedWindow, QueueDepth, RouteErrors, SinkErrors};
use hook_store::{redacted, PgStore, StoreOptions};
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::config::StatsArgs;

/// Everything the report says.
struct Report {
    database: String,
    window: Duration,
    generated_at: OffsetDateTime,
    queue: QueueDepth,
    processed: ProcessedWindow,
    latency: Percentile,
    routes: Vec<RouteErrors>,
    sinks: Vec<SinkErrors>,
    elapsed: Duration,
}

/// Runs the queries against `config` and prints the report on stdout.
pub(crate) async fn run(
    config: hook_store::tokio_postgres::Config,
    password: &hook_store::PasswordSource,
    args: &StatsArgs,
) -> anyhow::Result<()> {
    let config = hook_store::with_service_defaults(config, "hook-processor stats");
    let shown = redacted(&config);
    let options = StoreOptions {
        pool_size: 1,
        listen: false,
        pool_timeout: Duration::from_secs(10),
        ..StoreOptions::default()
    };
    let store =
        PgStore::connect(config, options).await.with_context(|| hook_cli::connecting_to(&shown, password))?;
    let client = store.pool().get().await.with_context(|| format!("connecting to {shown}"))?;
    hook_store::schema::check(&client, hook_store::schema::Scope::QUEUE)
        .await
        .with_context(|| format!("checking the tables of {shown}"))?;
    let started = Instant::now();
    let context = || format!("querying {shown}");
    stats::limit_statement_time(&client, args.timeout).await.with_context(context)?;
    let queue = stats::queue_depth(&client, args.since).await.with_context(context)?;
    let processed = stats::processed_since(&client, args.since).await.with_context(context)?;
    let latency = stats::p95_latency(&client, args.since, args.p95_of).await.with_context(context)?;
    let routes = stats::errors_by_route(&client, args.since, args.routes).await.with_context(context)?;
    let sinks = stats::errors_by_sink(&client, args.since, args.routes).await.with_context(context)?;
    let report = Report {
        database: shown,
        window: args.since,
        generated_at: OffsetDateTime::now_utc(),
        queue,
        processed,
        latency,
        routes,
        sinks,
        elapsed: started.elapsed(),
    };
    let text = if args.json { format!("{:#}\n", report.json()) } else { report.text() };
    print(&text)
}

#[allow(clippy::print_stdout)] // the report is the program's output
fn print(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).and_then(|()| out.flush()).context("writing the report")
}

impl Report {
    fn json(&self) -> Value {
        let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
        let q = &self.queue;
        let p = &self.processed;
        json!({
            "database": self.database,
            "generated_at": rfc3339(self.generated_at),
            "window_seconds": self.window.as_secs_f64(),
            "queue": {
                "pending": q.pending,
                "retrying": q.retrying,
                "waiting_for_retry": q.waiting,
                "dead": q.dead,
                "died_in_window": q.died_in_window,
                "oldest_pending_seconds": secs(q.oldest_pending),
            },
            "processed": {
                "count": p.processed,
                "with_retries": p.with_retries,
                "error_rate": p.error_rate(),
                "latency_seconds": {
                    "avg": secs(p.avg),
                    "p95": secs(self.latency.p95),
                    "max": secs(p.max),
                    "p95_of_latest": self.latency.of,
                },
            },
            "failing_routes": self.routes.iter().map(|r| json!({
                "source": r.source,
                "action": r.action,
                "events": r.events,
                "failed_attempts": r.failed_attempts,
                "dead": r.dead,
                "retrying": r.retrying,
                "recovered": r.recovered,
                "latest_error": r.latest_error,
                "latest_at": r.latest_at.map(rfc3339),
            })).collect::<Vec<_>>(),
            "failing_sinks": self.sinks.iter().map(|s| json!({
                "sink": s.sink,
                "type": s.kind,
                "events": s.events,
                "dead": s.dead,
                "retrying": s.retrying,
                "latest_error": s.latest_error,
                "latest_at": s.latest_at.map(rfc3339),
            })).collect::<Vec<_>>(),
            "query_seconds": self.elapsed.as_secs_f64(),
        })
    }

    fn text(&self) -> String {
        let window = span(self.window);
        let q = &self.queue;
        let p = &self.processed;
        let mut out = String::new();
        let _ = writeln!(out, "hook_events at {} ({})", self.database, rfc3339(self.generated_at));
        let _ = writeln!(out);
        let _ = writeln!(out, "now");
        let _ = writeln!(
            out,
            "  pending         {:>10}   retrying {}, waiting for a retry {}",
            num(q.pending),
            num(q.retrying),
            num(q.waiting)
        );
        let _ = writeln!(
            out,
            "  dead            {:>10}   {} died in the last {window}",
            num(q.dead),
            num(q.died_in_window)
        );
        let _ = writeln!(out, "  oldest pending  {:>10}", q.oldest_pending.map_or("-".to_owned(), human));
        let _ = writeln!(out);
        let _ = writeln!(out, "processed in the last {window}");
        let _ = writeln!(out, "  processed       {:>10}", num(p.processed));
        let of = if self.latency.of < p.processed {
            format!(" (p95 of the latest {})", num(self.latency.of))
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "  time to process (processed_at - created_at): avg {}, p95 {}, max {}{of}",
            p.avg.map_or("-".to_owned(), human),
            self.latency.p95.map_or("-".to_owned(), human),
            p.max.map_or("-".to_owned(), human)
        );
        let _ = writeln!(
            out,
            "  error rate      {:>10}   {} of {} needed a retry",
            p.error_rate().map_or("-".to_owned(), |r| format!("{:.2}%", r * 100.0)),
            num(p.with_retries),
            num(p.processed)
        );
        let _ = writeln!(out);
        if self.routes.is_empty() {
            let _ = writeln!(out, "failing routes: none (no event pending after a failure, or failed and done in the last {window})");
        } else {
            let _ = writeln!(out, "failing routes (failed at least once: still pending, or processed or dead in the last {window})");
            let width = |f: fn(&RouteErrors) -> usize, title: &str| {
                self.routes.iter().map(f).max().unwrap_or(0).max(title.len())
            };
            let ws = width(|r| r.source.chars().count(), "SOURCE");
            let wa = width(|r| r.action.chars().count(), "ACTION");
            let _ = writeln!(
                out,
                "  {:<ws$}  {:<wa$}  {:>8}  {:>8}  {:>6}  {:>8}  {:>9}  LATEST ERROR",
                "SOURCE", "ACTION", "EVENTS", "ATTEMPTS", "DEAD", "RETRYING", "RECOVERED"
            );
            for r in &self.routes {
                let when =
                    r.latest_at.map(|at| format!(" ({})", ago(self.generated_at, at))).unwrap_or_default();
                let _ = writeln!(
                    out,
                    "  {:<ws$}  {:<wa$}  {:>8}  {:>8}  {:>6}  {:>8}  {:>9}  {}{when}",
                    r.source,
                    r.action,
                    num(r.events),
                    num(r.failed_attempts),
                    num(r.dead),
                    num(r.retrying),
                    num(r.recovered),
                    one_line(r.latest_error.as_deref().unwrap_or("-"), 100),
                );
            }
        }
        let _ = writeln!(out);
        self.sinks_text(&mut out, &window);
        let _ = writeln!(out);
        let _ = writeln!(out, "queries took {}", human(self.elapsed));
        out
    }
}

impl Report {
    /// The sinks of a routes file whose latest delivery failed.
    fn sinks_text(&self, out: &mut String, window: &str) {
        if self.sinks.is_empty() {
            let _ = writeln!(out, "failing sinks: none (no event waiting for a retry, or dead in the last {window}, after a sink failed)");
            return;
        }
        let _ = writeln!(
            out,
            "failing sinks (latest attempt failed there: waiting for a retry, or dead in the last {window})"
        );
        let ws = self.sinks.iter().map(|s| s.sink.chars().count()).max().unwrap_or(0).max("SINK".len());
        let wt = self
            .sinks
            .iter()
            .map(|s| s.kind.as_deref().unwrap_or("-").len())
            .max()
            .unwrap_or(0)
            .max("TYPE".len());
        let _ = writeln!(
            out,
            "  {:<ws$}  {:<wt$}  {:>8}  {:>6}  {:>8}  LATEST ERROR",
            "SINK", "TYPE", "EVENTS", "DEAD", "RETRYING"
        );
        for s in &self.sinks {
            let when = s.latest_at.map(|at| format!(" ({})", ago(self.generated_at, at))).unwrap_or_default();
            let _ = writeln!(
                out,
                "  {:<ws$}  {:<wt$}  {:>8}  {:>6}  {:>8}  {}{when}",
                s.sink,
                s.kind.as_deref().unwrap_or("-"),
                num(s.events),
                num(s.dead),
                num(s.retrying),
                one_line(s.latest_error.as_deref().unwrap_or("-"), 100),
            );
        }
    }
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap_or_else(|_| at.to_string())
}

/// 1234567 → "1,234,567".
fn num(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// "0.4ms", "12ms", "1.53s", "4m 12s", "2h 03m", "3d 04h".
fn human(d: Duration) -> String {
    let s = d.as_secs_f64();
    let whole = d.as_secs();
    if s < 0.01 {
        format!("{:.1}ms", s * 1000.0)
    } else if s < 1.0 {
        format!("{:.0}ms", s * 1000.0)
    } else if s < 60.0 {
        format!("{s:.2}s")
    } else if whole < 3600 {
        format!("{}m {:02}s", whole / 60, whole % 60)
    } else if whole < 86400 {
        format!("{}h {:02}m", whole / 3600, whole % 3600 / 60)
    } else {
        format!("{}d {:02}h", whole / 86400, whole % 86400 / 3600)
    }
}

/// A window as it was likely given: "1h", "30m", "7d"; else as [`human`].
fn span(d: Duration) -> String {
    let s = d.as_secs();
    if d.subsec_nanos() != 0 || s == 0 {
        human(d)
    } else if s.is_multiple_of(86400) {
        format!("{}d", s / 86400)
    } else if s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// "3m 12s ago", or "retry in 20s" for a next attempt still to come.
fn ago(now: OffsetDateTime, at: OffsetDateTime) -> String {
    let delta = now - at;
    let secs = delta.whole_seconds().unsigned_abs();
    let magnitude = if secs < 60 { format!("{secs}s") } else { human(Duration::from_secs(secs)) };
    if delta.is_negative() {
        format!("retry in {magnitude}")
    } else {
        format!("{magnitude} ago")
    }
}

/// The text on one line, cut to `max` characters.
fn one_line(text: &str, max: usize) -> String {
    let flat: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if flat.chars().count() <= max {
        return flat;
    }
    let cut: String = flat.chars().take(max.saturating_sub(1)).collect();
    format!("{cut}…")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_durations_read_well() {
        assert_eq!(num(0), "0");
        assert_eq!(num(999), "999");
        assert_eq!(num(1000), "1,000");
        assert_eq!(num(1_234_567), "1,234,567");
        assert_eq!(human(Duration::from_micros(400)), "0.4ms");
        assert_eq!(human(Duration::from_millis(12)), "12ms");
        assert_eq!(human(Duration::from_millis(1530)), "1.53s");
        assert_eq!(human(Duration::from_secs(252)), "4m 12s");
        assert_eq!(human(Duration::from_secs(7380)), "2h 03m");
        assert_eq!(human(Duration::from_secs(3 * 86400 + 4 * 3600)), "3d 04h");
        assert_eq!(span(Duration::from_secs(3600)), "1h");
        assert_eq!(span(Duration::from_secs(7 * 86400)), "7d");
        assert_eq!(span(Duration::from_secs(90)), "90s");
        assert_eq!(span(Duration::from_secs(1800)), "30m");
        let now = OffsetDateTime::now_utc();
        assert_eq!(ago(now, now - time::Duration::seconds(4)), "4s ago");
        assert_eq!(ago(now, now - time::Duration::seconds(192)), "3m 12s ago");
        assert_eq!(ago(now, now + time::Duration::seconds(20)), "retry in 20s");
        assert_eq!(one_line("a\nb", 10), "a b");
        assert_eq!(one_line("abcdef", 4), "abc…");
    }
}
