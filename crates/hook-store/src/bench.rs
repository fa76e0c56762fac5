//! The SQL of `hook-bench` (feature `bench`): event generation, the database's own
//! claim-and-complete limit, the original service's algorithm, and the read-outs of a run.
//!
//! None of this is on the processor's path. It lives here because hook-store holds all SQL.
//! The limit and the baseline use the same eligibility and order as the processor's claim
//! (`queries.rs`), so the three are measured on equal terms.

use deadpool_postgres::GenericClient;
use hook_core::HookEvent;
use uuid::Uuid;

use crate::error::StoreError;
use crate::queries::{event_columns, event_from_row};

/// Rows `$1..=$2` of the benchmark's event mix: six hook types in turn, with payloads and
/// metadata shaped like the original producers' (tool calls with their input and output,
/// prompts, session starts and ends), 250 to 650 bytes of JSON each. `metadata.seq` is the
/// row's number, so the bench can match a handled event with its insert. `created_at` counts up
/// by 1 µs per row and ends at `now()`, so a one-row insert gets the column's default, `now()`.
const INSERT_EVENTS: &str = "INSERT INTO hook_events \
       (id, source, action, resource, resource_id, payload, metadata, created_at) \
     SELECT gen_random_uuid(), \
       (ARRAY['PreToolUse','PostToolUse','UserPromptSubmit','Stop','SessionStart','SessionEnd'])[1 + i % 6], \
       (ARRAY['tool_invocation','tool_completion','prompt_submitted','response_completed', \
              'session_initialized','session_completed'])[1 + i % 6], \
       (ARRAY['tool','tool','prompt','session','session','session'])[1 + i % 6], \
       CASE WHEN i % 6 < 2 THEN (ARRAY['Bash','Edit','Read','Write','Grep'])[1 + i % 5] \
            ELSE 'session-' || (i % 97) END, \
       CASE i % 6 \
         WHEN 0 THEN jsonb_build_object('tool_name', (ARRAY['Bash','Edit','Read','Write','Grep'])[1 + i % 5], \
              'tool_input', jsonb_build_object('command', 'cargo test -p hook-core --release -- --nocapture ' || i, \
                                               'description', 'Run the core crate tests'), \
              'quality_check', jsonb_build_object('passed', i % 10 <> 0, 'violations', '[]'::jsonb)) \
         WHEN 1 THEN jsonb_build_object('tool_name', (ARRAY['Bash','Edit','Read','Write','Grep'])[1 + i % 5], \
              'tool_output', jsonb_build_object('stdout', repeat('test result: ok. ', 8), 'exit_code', 0), \
              'file_path', '/work/main/crates/hook-core/src/file' || (i % 50) || '.rs', \
              'auto_fix_details', CASE WHEN i % 20 = 1 THEN jsonb_build_object('fixes', 2) END) \
         WHEN 2 THEN jsonb_build_object('prompt', 'Please refactor the claim loop and keep the tests green. ' \
                                        || repeat('More context. ', (5 + i % 20)::int), \
              'agent_detected', CASE WHEN i % 3 = 0 THEN 'agent-code-quality' END, \
              'detection_method', 'pattern', 'confidence', 0.75) \
         WHEN 3 THEN jsonb_build_object('session_id', 'session-' || (i % 97), 'completion_status', 'complete', \
              'tool_count', i % 30, 'interrupted', false, 'response_length', 1000 + i % 4000) \
         WHEN 4 THEN jsonb_build_object('session_id', 'session-' || (i % 97), 'cwd', '/work/main', \
              'project_path', '/work/main', 'git_branch', 'main', 'git_dirty', i % 2 = 0) \
         ELSE jsonb_build_object('session_id', 'session-' || (i % 97), 'reason', 'exit', \
              'duration_seconds', i % 7200, 'tools_used', i % 40) \
       END, \
       jsonb_build_object('session_id', 'session-' || (i % 97), 'hook_type', \
              (ARRAY['PreToolUse','PostToolUse','UserPromptSubmit','Stop','SessionStart','SessionEnd'])[1 + i % 6], \
              'cwd', '/work/main', 'correlation_id', gen_random_uuid(), 'user', 'dev', 'seq', i), \
       now() - ($2 - i) * interval '1 microsecond' \
     FROM generate_series($1::int8, $2::int8) AS i";

/// The database's own ceiling: claim and complete up to `$2` events in one statement, with the
/// processor's eligibility, order and success update, and nothing in between.
const LIMIT_STEP: &str = "WITH claimed AS ( \
       SELECT id FROM hook_events \
       WHERE NOT processed AND dead_at IS NULL AND retry_count < $1 \
         AND (next_attempt_at IS NULL OR next_attempt_at <= now()) \
       ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
     UPDATE hook_events AS e \
     SET processed = TRUE, processed_at = GREATEST(clock_timestamp(), e.created_at), \
         result_metadata = '{}'::jsonb, next_attempt_at = NULL, dead_at = NULL \
     FROM claimed WHERE e.id = claimed.id";

/// The original service's fetch: the oldest unprocessed events, locked only for the duration of
/// this statement (it ran in autocommit, so the locks ended with the SELECT).
const BASELINE_FETCH: &str = concat!(
    "SELECT ",
    event_columns!(),
    " FROM hook_events WHERE processed = FALSE AND retry_count < $1 \
     ORDER BY created_at ASC LIMIT $2 FOR UPDATE SKIP LOCKED"
);

/// The original service's success update, one statement and one commit per event.
const BASELINE_MARK: &str =
    "UPDATE hook_events SET processed = TRUE, processed_at = NOW(), processing_errors = NULL WHERE id = $1";

/// Inserts events `first..=last` of the benchmark mix in one transaction with NOTIFY silenced
/// (`hook_events.notify = off`), as a bulk loader should. Returns the number of rows.
pub async fn insert_backlog(
    client: &mut impl GenericClient,
    first: i64,
    last: i64,
) -> Result<u64, StoreError> {
    let tx = client.transaction().await?;
    tx.batch_execute("SET LOCAL hook_events.notify = off").await?;
    let inserted = tx.execute(INSERT_EVENTS, &[&first, &last]).await?;
    tx.commit().await?;
    Ok(inserted)
}

/// Inserts event `i` of the benchmark mix as a producer does: one autocommitted statement, whose
/// trigger sends NOTIFY. `created_at` is the statement's `now()`.
pub async fn insert_one(client: &impl GenericClient, i: i64) -> Result<(), StoreError> {
    let statement = client.prepare_cached(INSERT_EVENTS).await?;
    client.execute(&statement, &[&i, &i]).await?;
    Ok(())
}

/// Empties `hook_events` (the bench's own database only; the caller checks).
pub async fn truncate(client: &impl GenericClient) -> Result<(), StoreError> {
    client.batch_execute("TRUNCATE hook_events").await?;
    Ok(())
}

/// Rows in `hook_events`, processed or not.
pub async fn row_count(client: &impl GenericClient) -> Result<i64, StoreError> {
    Ok(client.query_one("SELECT count(*) FROM hook_events", &[]).await?.get(0))
}

/// Live unprocessed events (served by the claim index).
pub async fn unprocessed_count(client: &impl GenericClient) -> Result<i64, StoreError> {
    Ok(client
        .query_one("SELECT count(*) FROM hook_events WHERE NOT processed AND dead_at IS NULL", &[])
        .await?
        .get(0))
}

/// Puts the table in the same state before every phase: vacuumed and analyzed, then a
/// checkpoint, so that no phase inherits another's dead rows or pays for its checkpoint.
/// Returns whether the checkpoint ran (it needs superuser or `pg_checkpoint`).
pub async fn settle(client: &impl GenericClient) -> Result<bool, StoreError> {
    client.batch_execute("VACUUM (ANALYZE) hook_events").await?;
    Ok(client.batch_execute("CHECKPOINT").await.is_ok())
}

/// One step of the limit loop: claims and completes up to `limit` events in one statement;
/// returns how many. The loop ends when a step returns 0.
pub async fn limit_step(
    client: &impl GenericClient,
    limit: i64,
    max_retry_count: i32,
) -> Result<u64, StoreError> {
    let statement = client.prepare_cached(LIMIT_STEP).await?;
    Ok(client.execute(&statement, &[&max_retry_count, &limit]).await?)
}

/// The original service's fetch of up to `limit` events (see [`baseline_mark_processed`]).
pub async fn baseline_fetch(
    client: &impl GenericClient,
    limit: i64,
    max_retry_count: i32,
) -> Result<Vec<HookEvent>, StoreError> {
    let statement = client.prepare_cached(BASELINE_FETCH).await?;
    let rows = client.query(&statement, &[&max_retry_count, &limit]).await?;
    rows.iter().map(event_from_row).collect()
}

/// The original service's success update and commit of one event.
pub async fn baseline_mark_processed(client: &impl GenericClient, id: Uuid) -> Result<u64, StoreError> {
    let statement = client.prepare_cached(BASELINE_MARK).await?;
    Ok(client.execute(&statement, &[&id]).await?)
}

/// `processed_at - created_at` in microseconds of every processed event, in no order.
pub async fn completion_latencies_us(client: &impl GenericClient) -> Result<Vec<i64>, StoreError> {
    let rows = client
        .query(
            "SELECT (EXTRACT(EPOCH FROM processed_at - created_at) * 1000000)::int8 \
             FROM hook_events WHERE processed",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Facts about the server that a benchmark report should state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFacts {
    /// `server_version`.
    pub version: String,
    /// `synchronous_commit`.
    pub synchronous_commit: String,
    /// `fsync`.
    pub fsync: String,
    /// `shared_buffers`.
    pub shared_buffers: String,
    /// `wal_sync_method`.
    pub wal_sync_method: String,
}

/// Reads [`ServerFacts`].
pub async fn server_facts(client: &impl GenericClient) -> Result<ServerFacts, StoreError> {
    let row = client
        .query_one(
            "SELECT current_setting('server_version'), current_setting('synchronous_commit'), \
                    current_setting('fsync'), current_setting('shared_buffers'), \
                    current_setting('wal_sync_method')",
            &[],
        )
        .await?;
    Ok(ServerFacts {
        version: row.get(0),
        synchronous_commit: row.get(1),
        fsync: row.get(2),
        shared_buffers: row.get(3),
        wal_sync_method: row.get(4),
    })
}
