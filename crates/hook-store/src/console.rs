//! The SQL of the web console (`hook-console`): one function per page query, each served by an
//! index so that every page stays fast on a table of millions of rows (checked with `EXPLAIN` in
//! `crates/hook-console/tests/plans.rs`).
//!
//! - [`list_events`] pages through events newest first by keyset `(created_at, id)`:
//!   `hook_events_created_idx` for every event or a time range, `hook_events_claim_idx` for
//!   pending ones, `hook_events_failed_idx` for dead and failed ones and the search in error texts,
//!   `hook_events_session_idx` for one session;
//! - [`event`] reads one row by its primary key, its JSON cut to a length on the server, so a
//!   20 MiB payload never crosses the wire whole;
//! - [`routes`] lists the `(source, action)` pairs by skipping through
//!   `idx_hook_events_source_action`, one probe per pair;
//! - [`processed_per_minute`], [`received_per_minute`] and [`latency_per_minute`] are the
//!   overview's charts, through `hook_events_archive_idx` and `hook_events_created_idx`;
//! - [`recent_sessions`], [`session_summary`] and [`session_events`] read sessions through
//!   `hook_events_session_idx` (the session key is [`SESSION_KEY`]);
//! - [`replayable_groups`] and [`replayable_page`] select what a console filter would replay;
//!   the replay itself is [`crate::replay`].
//!
//! Nothing here writes. Values from the table are returned as they are stored (the console
//! escapes them); texts that can be large are cut here, in SQL.

use deadpool_postgres::GenericClient;
use time::OffsetDateTime;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;
use uuid::Uuid;

use crate::error::StoreError;

/// The session an event belongs to: `metadata.session_id` (hook-ingest and the original
/// producers), else `payload.session_id` (Claude Code's input), cut to 128 characters. The
/// expression of `hook_events_session_idx`; a query must use it verbatim to be served by it.
pub const SESSION_KEY: &str = "left(coalesce(metadata->>'session_id', payload->>'session_id'), 128)";

/// The longest session key, in characters (see [`SESSION_KEY`]).
pub const SESSION_KEY_CHARS: usize = 128;

/// The rows that ever failed or died: the predicate of `hook_events_failed_idx`, repeated
/// verbatim in a query so that the planner may use that index.
const FAILED: &str = "(processing_errors IS NOT NULL OR dead_at IS NOT NULL)";

/// What [`crate::replay`] may re-queue: failed or dead and not processed, or (when asked)
/// processed. The same predicate as the replay's own filter, so a count shown before a replay
/// counts what the replay selects.
const REPLAYABLE: &str =
    "((processed AND $1::bool) OR (NOT processed AND (dead_at IS NOT NULL OR retry_count > 0)))";

/// An event's state, as the console filters and shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventState {
    /// Not processed and not dead: waiting for its first attempt or for a retry.
    Pending,
    /// Pending after at least one failed attempt.
    Retrying,
    /// Reached the retry limit, or set aside (`dead_at` set), and not processed.
    Dead,
    /// Processed successfully.
    Processed,
    /// Has at least one recorded error or died, whatever its state now.
    Failed,
}

impl EventState {
    /// The filter's name of the state (`pending`, `retrying`, `dead`, `processed`, `failed`).
    pub fn name(self) -> &'static str {
        match self {
            EventState::Pending => "pending",
            EventState::Retrying => "retrying",
            EventState::Dead => "dead",
            EventState::Processed => "processed",
            EventState::Failed => "failed",
        }
    }

    /// The state of that name.
    pub fn from_name(name: &str) -> Option<EventState> {
        [
            EventState::Pending,
            EventState::Retrying,
            EventState::Dead,
            EventState::Processed,
            EventState::Failed,
        ]
        .into_iter()
        .find(|s| s.name() == name)
    }

    fn predicate(self) -> String {
        match self {
            EventState::Pending => "NOT processed AND dead_at IS NULL".into(),
            EventState::Retrying => "NOT processed AND dead_at IS NULL AND retry_count > 0".into(),
            EventState::Dead => format!("{FAILED} AND NOT processed AND dead_at IS NOT NULL"),
            EventState::Processed => "processed".into(),
            EventState::Failed => FAILED.into(),
        }
    }
}

/// Which events a list shows. Every part that is set must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Only events in this state.
    pub state: Option<EventState>,
    /// Only this source.
    pub source: Option<String>,
    /// Only this action.
    pub action: Option<String>,
    /// Only events created at or after this time.
    pub since: Option<OffsetDateTime>,
    /// Only events created before this time.
    pub until: Option<OffsetDateTime>,
    /// Only the events of this session (see [`SESSION_KEY`]).
    pub session: Option<String>,
    /// Only events one of whose errors contains this text (case-insensitive).
    pub error_text: Option<String>,
}

/// A position in the `(created_at, id)` order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// The event's creation time.
    pub created_at: OffsetDateTime,
    /// The event's id, which breaks ties.
    pub id: Uuid,
}

/// Which page of a list, in the newest-first order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PageAt {
    /// The newest events.
    #[default]
    Newest,
    /// The events older than this one.
    Before(Cursor),
    /// The events newer than this one (the previous page).
    After(Cursor),
}

/// One event of a list.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    /// The event.
    pub id: Uuid,
    /// Its source.
    pub source: String,
    /// Its action.
    pub action: String,
    /// Its resource.
    pub resource: String,
    /// Its resource id.
    pub resource_id: String,
    /// When it was created.
    pub created_at: OffsetDateTime,
    /// Whether it was processed.
    pub processed: bool,
    /// When it was processed.
    pub processed_at: Option<OffsetDateTime>,
    /// Failed attempts.
    pub retry_count: i32,
    /// When it died.
    pub dead_at: Option<OffsetDateTime>,
    /// When it is tried again.
    pub next_attempt_at: Option<OffsetDateTime>,
    /// Its session (see [`SESSION_KEY`]).
    pub session: Option<String>,
    /// Its last error, cut to 300 characters.
    pub last_error: Option<String>,
}

/// One event, whole, for its page. JSON columns come as text (PostgreSQL's `jsonb` output), cut
/// to the length asked for; the `*_chars` fields give the whole text's length.
#[derive(Debug, Clone, PartialEq)]
pub struct EventDetail {
    /// The columns shown in lists.
    pub row: EventRow,
    /// `payload`, as text, cut.
    pub payload: String,
    /// Characters of the whole `payload` text.
    pub payload_chars: i64,
    /// `metadata`, as text, cut.
    pub metadata: String,
    /// Characters of the whole `metadata` text.
    pub metadata_chars: i64,
    /// `result_metadata`, as text, cut; `None` when NULL.
    pub result_metadata: Option<String>,
    /// Characters of the whole `result_metadata` text.
    pub result_metadata_chars: i64,
    /// `replays` (the replay history), as text, cut; `None` when NULL.
    pub replays: Option<String>,
    /// Every recorded error, oldest first, each cut (at most the first 100).
    pub errors: Vec<Option<String>>,
    /// How many errors are recorded.
    pub errors_total: i64,
}

/// Events per minute over the last hour: `counts[0]` is the minute ending now, `counts[59]` the
/// one an hour ago.
pub type PerMinute = [u64; 60];

/// Pickup latency of one minute (created → processed, first attempts only).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LatencyMinute {
    /// Events measured.
    pub events: u64,
    /// Mean latency, seconds.
    pub avg_s: f64,
    /// Longest latency, seconds.
    pub max_s: f64,
}

/// One agent session, summed up.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionSummary {
    /// The session key.
    pub session: String,
    /// Its first event's creation time.
    pub started: OffsetDateTime,
    /// Its last event's creation time.
    pub ended: OffsetDateTime,
    /// Events counted (for a list: the latest of the session, at most the cap asked for).
    pub events: u64,
    /// Whether the session has more events than were counted.
    pub capped: bool,
    /// `UserPromptSubmit` events.
    pub prompts: u64,
    /// Tool calls (`PreToolUse`, or `PostToolUse`/`PostToolUseFailure` when more).
    pub tool_calls: u64,
    /// Failed tool calls: `PostToolUseFailure`, or a result with `success` false.
    pub tool_failures: u64,
    /// Events that are dead or waiting for a retry.
    pub failed_events: u64,
}

/// One event of a session's timeline.
#[derive(Debug, Clone, PartialEq)]
pub struct TimelineRow {
    /// The event.
    pub id: Uuid,
    /// When it was created.
    pub created_at: OffsetDateTime,
    /// Its source (the hook).
    pub source: String,
    /// Its action.
    pub action: String,
    /// Whether it was processed.
    pub processed: bool,
    /// Failed attempts.
    pub retry_count: i32,
    /// Whether it is dead.
    pub dead: bool,
    /// `payload.tool_name`.
    pub tool_name: Option<String>,
    /// `payload.tool_use_id`, which pairs `PreToolUse` with `PostToolUse`.
    pub tool_use_id: Option<String>,
    /// What the event touched or said: the handler's `target`, the tool's command or file, the
    /// prompt, the notification, the reason (cut to 200 characters).
    pub summary: Option<String>,
    /// The handler's `success` fact (`result_metadata.success`).
    pub success: Option<bool>,
    /// The tool's or handler's error (cut to 300 characters).
    pub error: Option<String>,
}

/// Another event of a tool call, found outside a timeline page.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolPartner {
    /// `payload.tool_use_id`.
    pub tool_use_id: String,
    /// `PreToolUse`, `PostToolUse` or `PostToolUseFailure`.
    pub source: String,
    /// When it was created.
    pub created_at: OffsetDateTime,
    /// The handler's `success` fact.
    pub success: Option<bool>,
}

/// A query under construction: clauses and their parameters, numbered in order.
struct Query {
    clauses: Vec<String>,
    params: Vec<Box<dyn ToSql + Sync + Send>>,
}

impl Query {
    /// Starts with `first` parameters already taken by the statement around the clauses.
    fn new(first: Vec<Box<dyn ToSql + Sync + Send>>) -> Query {
        Query { clauses: Vec::new(), params: first }
    }

    /// Adds a parameter and returns its placeholder.
    fn param(&mut self, value: impl ToSql + Sync + Send + 'static) -> String {
        self.params.push(Box::new(value));
        format!("${}", self.params.len())
    }

    fn filter(&mut self, filter: &EventFilter) {
        if let Some(state) = filter.state {
            self.clauses.push(state.predicate());
        }
        if let Some(source) = &filter.source {
            let p = self.param(source.clone());
            self.clauses.push(format!("source = {p}"));
        }
        if let Some(action) = &filter.action {
            let p = self.param(action.clone());
            self.clauses.push(format!("action = {p}"));
        }
        if let Some(since) = filter.since {
            let p = self.param(since);
            self.clauses.push(format!("created_at >= {p}"));
        }
        if let Some(until) = filter.until {
            let p = self.param(until);
            self.clauses.push(format!("created_at < {p}"));
        }
        if let Some(session) = &filter.session {
            let p = self.param(session_key(session));
            self.clauses.push(format!("{SESSION_KEY} = {p}"));
        }
        if let Some(text) = &filter.error_text {
            let p = self.param(format!("%{}%", like_escaped(text)));
            self.clauses.push(format!("{FAILED} AND array_to_string(processing_errors, ' ') ILIKE {p}"));
        }
    }

    fn page(&mut self, page: PageAt) -> &'static str {
        match page {
            PageAt::Newest => "DESC",
            PageAt::Before(c) | PageAt::After(c) => {
                let (at, id) = (self.param(c.created_at), self.param(c.id));
                let op = if matches!(page, PageAt::Before(_)) { "<" } else { ">" };
                self.clauses.push(format!("(created_at, id) {op} ({at}, {id})"));
                if op == "<" {
                    "DESC"
                } else {
                    "ASC"
                }
            }
        }
    }

    fn where_clause(&self) -> String {
        if self.clauses.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", self.clauses.join(" AND "))
        }
    }
}

/// `text` cut to the session key's length, as [`SESSION_KEY`] cuts it.
pub fn session_key(text: &str) -> String {
    text.chars().take(SESSION_KEY_CHARS).collect()
}

/// `text` for a `LIKE` pattern that matches it literally (`\`, `%` and `_` escaped).
fn like_escaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '\\' | '%' | '_') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn count(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

const ROW_COLUMNS: &str = "id, source, action, resource, resource_id, created_at, processed, processed_at, \
     retry_count, dead_at, next_attempt_at";

fn list_columns() -> String {
    format!(
        "{ROW_COLUMNS}, {SESSION_KEY}, \
         left(processing_errors[cardinality(processing_errors)], 300)"
    )
}

fn event_row(row: &Row) -> Result<EventRow, StoreError> {
    Ok(EventRow {
        id: row.try_get(0)?,
        source: row.try_get(1)?,
        action: row.try_get(2)?,
        resource: row.try_get(3)?,
        resource_id: row.try_get(4)?,
        created_at: row.try_get(5)?,
        processed: row.try_get(6)?,
        processed_at: row.try_get(7)?,
        retry_count: row.try_get(8)?,
        dead_at: row.try_get(9)?,
        next_attempt_at: row.try_get(10)?,
        session: row.try_get(11)?,
        last_error: row.try_get(12)?,
    })
}

/// The SQL and parameters of [`list_events`], for `EXPLAIN` in tests.
pub fn list_events_query(
    filter: &EventFilter,
    page: PageAt,
    limit: usize,
) -> (String, Vec<Box<dyn ToSql + Sync + Send>>) {
    let mut query = Query::new(Vec::new());
    query.filter(filter);
    let order = query.page(page);
    let limit = query.param(i64::try_from(limit).unwrap_or(i64::MAX));
    let sql = format!(
        "SELECT {} FROM hook_events{} ORDER BY created_at {order}, id {order} LIMIT {limit}",
        list_columns(),
        query.where_clause()
    );
    (sql, query.params)
}

/// Up to `limit` events matching `filter` on the page `page`, newest first (ask for one more
/// than shown to know whether there is a next page).
pub async fn list_events(
    client: &impl GenericClient,
    filter: &EventFilter,
    page: PageAt,
    limit: usize,
) -> Result<Vec<EventRow>, StoreError> {
    let (sql, params) = list_events_query(filter, page, limit);
    let params: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
    let rows = client.query(sql.as_str(), &params).await?;
    let mut events = rows.iter().map(event_row).collect::<Result<Vec<_>, _>>()?;
    if matches!(page, PageAt::After(_)) {
        events.reverse();
    }
    Ok(events)
}

/// One event by id, each JSON text cut to `chars` characters and each error to `error_chars`.
/// `$1` id, `$2` chars, `$3` error_chars.
pub fn event_query() -> String {
    format!(
        "SELECT {}, left(p, $2), length(p), left(m, $2), length(m), left(r, $2), coalesce(length(r), 0), \
                left(replays::text, $2), \
                ARRAY(SELECT left(e, $3) FROM unnest(processing_errors) AS e LIMIT 100), \
                coalesce(cardinality(processing_errors), 0)::int8 \
         FROM (SELECT *, payload::text AS p, metadata::text AS m, result_metadata::text AS r \
               FROM hook_events WHERE id = $1 OFFSET 0) AS e",
        list_columns()
    )
}

/// The event `id` (see [`EventDetail`]), or `None` when there is none.
pub async fn event(
    client: &impl GenericClient,
    id: Uuid,
    chars: usize,
    error_chars: usize,
) -> Result<Option<EventDetail>, StoreError> {
    let chars = i32::try_from(chars).unwrap_or(i32::MAX);
    let error_chars = i32::try_from(error_chars).unwrap_or(i32::MAX);
    let Some(row) = client.query_opt(event_query().as_str(), &[&id, &chars, &error_chars]).await? else {
        return Ok(None);
    };
    let length = |i: usize| -> Result<i64, StoreError> { Ok(i64::from(row.try_get::<_, i32>(i)?)) };
    Ok(Some(EventDetail {
        row: event_row(&row)?,
        payload: row.try_get(13)?,
        payload_chars: length(14)?,
        metadata: row.try_get(15)?,
        metadata_chars: length(16)?,
        result_metadata: row.try_get(17)?,
        result_metadata_chars: length(18)?,
        replays: row.try_get(19)?,
        errors: row.try_get(20)?,
        errors_total: row.try_get(21)?,
    }))
}

/// Every `(source, action)` pair in the table, by skipping through
/// `idx_hook_events_source_action`: one index probe per pair, whatever the table's size.
pub const ROUTES: &str = "WITH RECURSIVE r AS ( \
       (SELECT source, action FROM hook_events ORDER BY source, action LIMIT 1) \
       UNION ALL \
       SELECT n.source, n.action FROM r, LATERAL ( \
           SELECT source, action FROM hook_events \
           WHERE (source, action) > (r.source, r.action) \
           ORDER BY source, action LIMIT 1) AS n) \
     SELECT source, action FROM r LIMIT $1";

/// The `(source, action)` pairs of the table, at most `limit`, in order.
pub async fn routes(client: &impl GenericClient, limit: usize) -> Result<Vec<(String, String)>, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = client.query(ROUTES, &[&limit]).await?;
    rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect()
}

/// Events processed in the window (`$1`, microseconds back from now), counted up to `$2`
/// through `hook_events_archive_idx` alone (an index-only range), and those that needed
/// retries, an index-only range of `hook_events_retried_idx` (which holds only rows that
/// failed at least once).
pub const PROCESSED_IN_WINDOW: &str = "SELECT \
       (SELECT count(*) FROM (SELECT 1 FROM hook_events \
        WHERE processed AND processed_at >= now() - $1::int8 * interval '1 microsecond' LIMIT $2) AS x), \
       (SELECT count(*) FROM hook_events \
        WHERE processed AND dead_at IS NULL AND retry_count > 0 \
          AND processed_at >= now() - $1::int8 * interval '1 microsecond')";

/// Events processed within `window` (counted up to `cap`: a count of `cap` means "at least"),
/// and how many of them needed retries. Unlike [`crate::stats::processed_since`] it reads no
/// latencies, so its cost is bounded by `cap` and the failed rows.
pub async fn processed_in_window(
    client: &impl GenericClient,
    window: std::time::Duration,
    cap: u64,
) -> Result<(u64, u64), StoreError> {
    let micros = i64::try_from(window.as_micros()).unwrap_or(i64::MAX);
    let cap = i64::try_from(cap).unwrap_or(i64::MAX);
    let row = client.query_one(PROCESSED_IN_WINDOW, &[&micros, &cap]).await?;
    Ok((count(row.try_get(0)?), count(row.try_get(1)?)))
}

/// Events processed in each minute of the last hour (`m` minutes ago), each minute counted up to
/// `$1` through `hook_events_archive_idx` (an index-only range): bounded work even when a
/// million events were processed within the hour.
pub const PROCESSED_PER_MINUTE: &str = "SELECT m, (SELECT count(*) FROM ( \
         SELECT 1 FROM hook_events WHERE processed \
           AND processed_at > now() - (m + 1) * interval '1 minute' \
           AND processed_at <= now() - m * interval '1 minute' LIMIT $1) AS x) \
     FROM generate_series(0, 59) AS m";

/// Events created in each minute of the last hour, each counted up to `$1` through
/// `hook_events_created_idx`.
pub const RECEIVED_PER_MINUTE: &str = "SELECT m, (SELECT count(*) FROM ( \
         SELECT 1 FROM hook_events \
         WHERE created_at > now() - (m + 1) * interval '1 minute' \
           AND created_at <= now() - m * interval '1 minute' LIMIT $1) AS x) \
     FROM generate_series(0, 59) AS m";

/// Latency (created → processed) per minute of the last hour, over the latest `$1` first-attempt
/// successes of each minute, newest first through `hook_events_archive_idx`: at most 60 × `$1`
/// rows read, whatever the rate, and a minute of a million events costs what a quiet one does.
pub const LATENCY_PER_MINUTE: &str = "SELECT m, count(*), avg(l), max(l) FROM ( \
         SELECT m, date_part('epoch', x.processed_at - x.created_at) AS l \
         FROM generate_series(0, 59) AS m \
         CROSS JOIN LATERAL (SELECT processed_at, created_at FROM hook_events \
             WHERE processed AND retry_count = 0 \
               AND processed_at > now() - (m + 1) * interval '1 minute' \
               AND processed_at <= now() - m * interval '1 minute' \
             ORDER BY processed_at DESC LIMIT $1) AS x) AS w \
     GROUP BY m";

async fn per_minute(client: &impl GenericClient, sql: &str, cap: u64) -> Result<PerMinute, StoreError> {
    let mut counts = [0u64; 60];
    let cap = i64::try_from(cap).unwrap_or(i64::MAX);
    for row in client.query(sql, &[&cap]).await? {
        let minute: i32 = row.try_get(0)?;
        if let Some(slot) = usize::try_from(minute).ok().and_then(|m| counts.get_mut(m)) {
            *slot += count(row.try_get(1)?);
        }
    }
    Ok(counts)
}

/// Events processed in each minute of the last hour, each minute counted up to `cap`.
pub async fn processed_per_minute(client: &impl GenericClient, cap: u64) -> Result<PerMinute, StoreError> {
    per_minute(client, PROCESSED_PER_MINUTE, cap).await
}

/// Events created in each minute of the last hour, each minute counted up to `cap`.
pub async fn received_per_minute(client: &impl GenericClient, cap: u64) -> Result<PerMinute, StoreError> {
    per_minute(client, RECEIVED_PER_MINUTE, cap).await
}

/// Pickup latency in each minute of the last hour, over the latest `latest` first-attempt
/// successes of each minute (`[0]` is the minute ending now).
pub async fn latency_per_minute(
    client: &impl GenericClient,
    latest: u64,
) -> Result<[LatencyMinute; 60], StoreError> {
    let mut minutes = [LatencyMinute::default(); 60];
    let limit = i64::try_from(latest).unwrap_or(i64::MAX);
    for row in client.query(LATENCY_PER_MINUTE, &[&limit]).await? {
        let minute: i32 = row.try_get(0)?;
        if let Some(slot) = usize::try_from(minute).ok().and_then(|m| minutes.get_mut(m)) {
            *slot = LatencyMinute {
                events: count(row.try_get(1)?),
                avg_s: row.try_get::<_, Option<f64>>(2)?.unwrap_or(0.0),
                max_s: row.try_get::<_, Option<f64>>(3)?.unwrap_or(0.0),
            };
        }
    }
    Ok(minutes)
}

/// The aggregate of one session's events `x` (columns source, processed, retry_count, dead_at,
/// success), as `count, prompts, pre, post, tool failures, failed events`.
const SESSION_COUNTS: &str = "count(*), \
     count(*) FILTER (WHERE x.source = 'UserPromptSubmit'), \
     count(*) FILTER (WHERE x.source = 'PreToolUse'), \
     count(*) FILTER (WHERE x.source IN ('PostToolUse', 'PostToolUseFailure')), \
     count(*) FILTER (WHERE x.source = 'PostToolUseFailure' \
                      OR (x.source = 'PostToolUse' AND x.success = 'false')), \
     count(*) FILTER (WHERE NOT x.processed AND (x.dead_at IS NOT NULL OR x.retry_count > 0))";

/// The sessions seen among the latest `$2` events before `$1` (all when NULL), the `$3` with the
/// most recent activity, each with its first and last event and counts over its latest `$4`
/// events. Every part is an index probe or a bounded index range; the counts are taken for the
/// sessions shown only.
pub fn recent_sessions_query() -> String {
    format!(
        "WITH latest AS ( \
             SELECT {SESSION_KEY} AS s, created_at FROM hook_events \
             WHERE ($1::timestamptz IS NULL OR created_at < $1) \
             ORDER BY created_at DESC LIMIT $2), \
         candidates AS ( \
             SELECT s FROM latest WHERE s IS NOT NULL GROUP BY s ORDER BY max(created_at) DESC LIMIT $3::int8 * 2), \
         shown AS ( \
             SELECT c.s, l.created_at AS last FROM candidates AS c \
             CROSS JOIN LATERAL (SELECT created_at FROM hook_events \
                 WHERE {SESSION_KEY} = c.s ORDER BY created_at DESC, id DESC LIMIT 1) AS l \
             WHERE ($1::timestamptz IS NULL OR l.created_at < $1) \
             ORDER BY l.created_at DESC, c.s LIMIT $3) \
         SELECT c.s, f.created_at, c.last, a.* FROM shown AS c \
         CROSS JOIN LATERAL (SELECT created_at FROM hook_events \
             WHERE {SESSION_KEY} = c.s ORDER BY created_at, id LIMIT 1) AS f \
         CROSS JOIN LATERAL (SELECT {SESSION_COUNTS} FROM ( \
             SELECT source, processed, retry_count, dead_at, result_metadata->>'success' AS success \
             FROM hook_events WHERE {SESSION_KEY} = c.s \
             ORDER BY created_at DESC, id DESC LIMIT $4::int8 + 1) AS x) AS a \
         ORDER BY c.last DESC, c.s"
    )
}

fn session_summary_from(row: &Row, cap: Option<i64>) -> Result<SessionSummary, StoreError> {
    let events: i64 = row.try_get(3)?;
    let capped = cap.is_some_and(|cap| events > cap);
    let pre = count(row.try_get(5)?);
    let post = count(row.try_get(6)?);
    Ok(SessionSummary {
        session: row.try_get(0)?,
        started: row.try_get(1)?,
        ended: row.try_get(2)?,
        events: count(cap.map_or(events, |cap| events.min(cap))),
        capped,
        prompts: count(row.try_get(4)?),
        tool_calls: pre.max(post),
        tool_failures: count(row.try_get(7)?),
        failed_events: count(row.try_get(8)?),
    })
}

/// Recent sessions (see [`recent_sessions_query`]): those active among the latest `scan` events
/// before `before`, at most `limit`, latest activity first, counted over their latest
/// `per_session` events ([`SessionSummary::capped`] says when a session has more).
pub async fn recent_sessions(
    client: &impl GenericClient,
    before: Option<OffsetDateTime>,
    scan: usize,
    limit: usize,
    per_session: usize,
) -> Result<Vec<SessionSummary>, StoreError> {
    let int = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    let (scan, limit, cap) = (int(scan), int(limit), int(per_session));
    let rows = client.query(recent_sessions_query().as_str(), &[&before, &scan, &limit, &cap]).await?;
    rows.iter().map(|row| session_summary_from(row, Some(cap))).collect()
}

/// One session's first and last event and counts over all its events. `$1` the session key.
pub fn session_summary_query() -> String {
    format!(
        "SELECT $1::text, min(x.created_at), max(x.created_at), {SESSION_COUNTS} FROM ( \
             SELECT created_at, source, processed, retry_count, dead_at, \
                    result_metadata->>'success' AS success \
             FROM hook_events WHERE {SESSION_KEY} = $1) AS x \
         HAVING count(*) > 0"
    )
}

/// The session `session` summed up over all its events, or `None` when it has none.
pub async fn session_summary(
    client: &impl GenericClient,
    session: &str,
) -> Result<Option<SessionSummary>, StoreError> {
    let key = session_key(session);
    let row = client.query_opt(session_summary_query().as_str(), &[&key]).await?;
    row.map(|row| session_summary_from(&row, None)).transpose()
}

/// What a timeline row says the event touched or said.
const SUMMARY: &str = "left(coalesce(result_metadata->>'target', payload->'tool_input'->>'command', \
     payload->'tool_input'->>'file_path', payload->'tool_input'->>'pattern', payload->'tool_input'->>'url', \
     payload->'tool_input'->>'description', payload->>'prompt', payload->>'message', payload->>'reason', \
     payload->>'trigger', payload->>'file_path'), 200)";

/// A session's events after `($2, $3)` (from the start when NULL), oldest first, at most `$4`.
pub fn session_events_query() -> String {
    format!(
        "SELECT id, created_at, source, action, processed, retry_count, dead_at IS NOT NULL, \
                left(payload->>'tool_name', 200), left(payload->>'tool_use_id', 200), {SUMMARY}, \
                CASE result_metadata->>'success' WHEN 'true' THEN true WHEN 'false' THEN false END, \
                left(coalesce(result_metadata->>'error', payload->>'error', \
                              payload->'tool_response'->>'error'), 300) \
         FROM hook_events \
         WHERE {SESSION_KEY} = $1 AND ($2::timestamptz IS NULL OR (created_at, id) > ($2, $3::uuid)) \
         ORDER BY created_at, id LIMIT $4"
    )
}

/// Up to `limit` events of `session` after `after`, oldest first.
pub async fn session_events(
    client: &impl GenericClient,
    session: &str,
    after: Option<Cursor>,
    limit: usize,
) -> Result<Vec<TimelineRow>, StoreError> {
    let key = session_key(session);
    let (at, id) = (after.map(|c| c.created_at), after.map(|c| c.id));
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = client.query(session_events_query().as_str(), &[&key, &at, &id, &limit]).await?;
    rows.iter()
        .map(|row| {
            Ok(TimelineRow {
                id: row.try_get(0)?,
                created_at: row.try_get(1)?,
                source: row.try_get(2)?,
                action: row.try_get(3)?,
                processed: row.try_get(4)?,
                retry_count: row.try_get(5)?,
                dead: row.try_get(6)?,
                tool_name: row.try_get(7)?,
                tool_use_id: row.try_get(8)?,
                summary: row.try_get(9)?,
                success: row.try_get(10)?,
                error: row.try_get(11)?,
            })
        })
        .collect()
}

/// The tool events of session `$1` created in `[$2, $3]` whose `tool_use_id` is one of `$4`.
pub fn tool_partners_query() -> String {
    format!(
        "SELECT payload->>'tool_use_id', source, created_at, \
                CASE result_metadata->>'success' WHEN 'true' THEN true WHEN 'false' THEN false END \
         FROM hook_events \
         WHERE {SESSION_KEY} = $1 AND created_at >= $2 AND created_at <= $3 \
           AND source IN ('PreToolUse', 'PostToolUse', 'PostToolUseFailure') \
           AND payload->>'tool_use_id' = ANY($4)"
    )
}

/// The other halves of tool calls cut by a timeline page's edge: the tool events of `session`
/// created between `from` and `to` whose `tool_use_id` is in `ids`.
pub async fn tool_partners(
    client: &impl GenericClient,
    session: &str,
    from: OffsetDateTime,
    to: OffsetDateTime,
    ids: &[String],
) -> Result<Vec<ToolPartner>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let key = session_key(session);
    let rows = client.query(tool_partners_query().as_str(), &[&key, &from, &to, &ids]).await?;
    rows.iter()
        .map(|row| {
            Ok(ToolPartner {
                tool_use_id: row.try_get(0)?,
                source: row.try_get(1)?,
                created_at: row.try_get(2)?,
                success: row.try_get(3)?,
            })
        })
        .collect()
}

/// The SQL and parameters of [`replayable_groups`].
pub fn replayable_groups_query(
    filter: &EventFilter,
    include_processed: bool,
    cap: usize,
) -> (String, Vec<Box<dyn ToSql + Sync + Send>>) {
    let mut query = Query::new(vec![Box::new(include_processed)]);
    query.clauses.push(REPLAYABLE.into());
    query.filter(filter);
    let cap = query.param(i64::try_from(cap).unwrap_or(i64::MAX));
    let sql = format!(
        "SELECT source, action, count(*) FROM (SELECT source, action FROM hook_events{} LIMIT {cap}) AS m \
         GROUP BY source, action ORDER BY count(*) DESC, source, action",
        query.where_clause()
    );
    (sql, query.params)
}

/// What a replay of everything `filter` matches would re-queue now, by `(source, action)`, most
/// first, counting at most `cap` events (a total of `cap` means "at least").
pub async fn replayable_groups(
    client: &impl GenericClient,
    filter: &EventFilter,
    include_processed: bool,
    cap: usize,
) -> Result<Vec<((String, String), u64)>, StoreError> {
    let (sql, params) = replayable_groups_query(filter, include_processed, cap);
    let params: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
    let rows = client.query(sql.as_str(), &params).await?;
    rows.iter().map(|r| Ok(((r.try_get(0)?, r.try_get(1)?), count(r.try_get(2)?)))).collect()
}

/// The SQL and parameters of [`replayable_page`].
pub fn replayable_page_query(
    filter: &EventFilter,
    include_processed: bool,
    after: Option<Cursor>,
    limit: usize,
) -> (String, Vec<Box<dyn ToSql + Sync + Send>>) {
    let mut query = Query::new(vec![Box::new(include_processed)]);
    query.clauses.push(REPLAYABLE.into());
    query.filter(filter);
    if let Some(after) = after {
        query.page(PageAt::After(after));
    }
    let limit = query.param(i64::try_from(limit).unwrap_or(i64::MAX));
    let sql = format!(
        "SELECT created_at, id FROM hook_events{} ORDER BY created_at, id LIMIT {limit}",
        query.where_clause()
    );
    (sql, query.params)
}

/// The next `limit` replayable events matching `filter` after `after`, oldest first: the console
/// walks a filter's selection with it and hands each page's ids to [`crate::replay::replay`].
pub async fn replayable_page(
    client: &impl GenericClient,
    filter: &EventFilter,
    include_processed: bool,
    after: Option<Cursor>,
    limit: usize,
) -> Result<Vec<Cursor>, StoreError> {
    let (sql, params) = replayable_page_query(filter, include_processed, after, limit);
    let params: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
    let rows = client.query(sql.as_str(), &params).await?;
    rows.iter().map(|r| Ok(Cursor { created_at: r.try_get(0)?, id: r.try_get(1)? })).collect()
}

/// Runs `BEGIN READ ONLY` with a statement timeout of `timeout_ms` for the rest of the
/// transaction: every console page reads in one such transaction (one snapshot, no writes, a
/// bounded cost). Returns the transaction; dropping it rolls back.
pub async fn read_only<'a>(
    client: &'a mut deadpool_postgres::Client,
    timeout_ms: u64,
) -> Result<deadpool_postgres::Transaction<'a>, StoreError> {
    let tx = client.build_transaction().read_only(true).start().await?;
    let ms = i64::try_from(timeout_ms).unwrap_or(i64::MAX);
    tx.query_one("SELECT set_config('statement_timeout', $1::int8::text, true)", &[&ms]).await?;
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_patterns_and_session_keys() {
        assert_eq!(like_escaped(r"50%_off\"), r"50\%\_off\\");
        assert_eq!(session_key(&"é".repeat(200)).chars().count(), 128);
        assert_eq!(EventState::from_name("dead"), Some(EventState::Dead));
        assert_eq!(EventState::from_name("x"), None);
    }

    #[test]
    fn filters_number_their_parameters_in_order() {
        let filter = EventFilter {
            state: Some(EventState::Dead),
            source: Some("Stop".into()),
            error_text: Some("boom".into()),
            ..EventFilter::default()
        };
        let (sql, params) = list_events_query(&filter, PageAt::Newest, 51);
        assert_eq!(params.len(), 3);
        assert!(sql.contains("source = $1"), "{sql}");
        assert!(sql.contains("ILIKE $2"), "{sql}");
        assert!(sql.ends_with("LIMIT $3"), "{sql}");
        let (sql, params) = replayable_groups_query(&filter, true, 10);
        assert_eq!(params.len(), 4);
        assert!(sql.contains("source = $2") && sql.contains("LIMIT $4"), "{sql}");
    }
}
