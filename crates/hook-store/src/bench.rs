//! The SQL of `hook-bench` (feature `bench`): event generation, the database's own
//! claim-and-complete limit, the original service's algorithm, and the read-outs of a run.
//!
//! None of this is on the processor's path. It lives here because hook-store holds all SQL.
//! The limit uses the processor's order and index, and writes the columns the processor's success
//! update writes (`queries.rs`), `result_metadata` with what the default handlers report; like the
//! original's fetch (the baseline), it filters `retry_count < max` in SQL instead of setting
//! such rows aside, which makes no difference to the bench's rows (all at 0).

use deadpool_postgres::GenericClient;
use hook_core::HookEvent;
use uuid::Uuid;

use crate::error::StoreError;
use crate::queries::{event_columns, event_from_row};

// The SELECT of `INSERT_EVENTS`: (id, source, action, resource, resource_id, payload, metadata,
// created_at) of rows `$1..=$2`, the id from the SQL expression `$id` (see [`Ids`]).
macro_rules! event_mix {
    () => {
        event_mix!("gen_random_uuid()")
    };
    ($id:expr) => {
        concat!("SELECT ", $id, ", \
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
     FROM generate_series($1::int8, $2::int8) AS i")
    };
}

// A UUIDv7 of row `i` (RFC 9562: 48 bits of Unix milliseconds, the version, random bits) from
// its `created_at`, as `hook-ingest` makes ids (`NewEvent::new`, `Uuid::now_v7`), on PostgreSQL
// 15, which has no uuidv7(): the random UUID's first 6 bytes replaced by the milliseconds, its
// version nibble by 7 (its variant bits are already RFC 9562's). Unlike `Uuid::now_v7()`, which
// counts up within a millisecond, ids of one millisecond are in random order; the second
// `gen_random_uuid()` only supplies the 4 random bits beside the version.
macro_rules! time_ordered_id {
    () => {
        "encode(set_byte(overlay(uuid_send(gen_random_uuid()) placing \
             substring(int8send(floor(extract(epoch FROM now() - ($2 - i) * interval '1 microsecond') \
                 * 1000)::int8) FROM 3) FROM 1 FOR 6), \
             6, (get_byte(uuid_send(gen_random_uuid()), 6) & 15) | 112), 'hex')::uuid"
    };
}

/// How the bench makes the ids of the rows it inserts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ids {
    /// Random (version 4, `gen_random_uuid()`), as the original service's producers make them:
    /// each insert lands on a random page of the primary key.
    Random,
    /// Time-ordered (version 7), as `hook-ingest` makes them: inserts land at the primary key's
    /// right edge.
    TimeOrdered,
}

/// Rows `$1..=$2` of the benchmark's event mix: six hook types in turn, with payloads and
/// metadata shaped like the original producers' (tool calls with their input and output,
/// prompts, session starts and ends), 250 to 650 bytes of JSON each. `metadata.seq` is the
/// row's number, so the bench can match a handled event with its insert. `created_at` counts up
/// by 1 µs per row and ends at `now()`, so a one-row insert gets the column's default, `now()`.
const INSERT_EVENTS: &str = concat!(
    "INSERT INTO hook_events (id, source, action, resource, resource_id, payload, metadata, created_at) ",
    event_mix!()
);

/// [`INSERT_EVENTS`] with time-ordered ids ([`Ids::TimeOrdered`]).
const INSERT_EVENTS_V7: &str = concat!(
    "INSERT INTO hook_events (id, source, action, resource, resource_id, payload, metadata, created_at) ",
    event_mix!(time_ordered_id!())
);

/// Rows `$1..=$2` of the event mix as [`INSERT_EVENTS`] makes them, but each waiting for a
/// retry a day from now after one failed attempt: rows a claim cannot take.
const INSERT_WAITING: &str = concat!(
    "INSERT INTO hook_events (id, source, action, resource, resource_id, payload, metadata, created_at, \
         retry_count, processing_errors, next_attempt_at) \
     SELECT id, source, action, resource, resource_id, payload, metadata, created_at, \
         1, ARRAY['hook-bench: failed once, waiting for a retry'], now() + interval '1 day' \
     FROM (",
    event_mix!(),
    ") AS m(id, source, action, resource, resource_id, payload, metadata, created_at)"
);

/// SQL: the session of the row `e`, as the default handlers find it (`session_id` in the
/// payload, else the `resource_id` of a session row, else `session_id` in the metadata).
macro_rules! session {
    () => {
        "coalesce(e.payload->>'session_id', CASE WHEN e.resource = 'session' THEN e.resource_id END, \
         e.metadata->>'session_id')"
    };
}

/// SQL: the `result_metadata` the default handlers (`hook_core::handlers`) report for the row
/// `e` of the benchmark's mix: the same keys, values and size, built by the server from the
/// row's payload, so that the limit writes what the processor writes without any data leaving
/// the server. `tests/tests/handlers.rs` checks it against the handlers, row by row. (It reads
/// only the fields the bench's rows have; it is not a general port of the handlers.)
macro_rules! handler_metadata {
    () => {
        concat!(
            "CASE e.source \
             WHEN 'PreToolUse' THEN jsonb_build_object( \
                'tool_name', coalesce(e.payload->>'tool_name', e.metadata->>'tool_name', 'unknown'), \
                'quality_check_performed', coalesce(jsonb_typeof(e.payload->'quality_check') <> 'null', false), \
                'file_path', coalesce(e.payload->>'file_path', e.payload#>>'{tool_input,file_path}'), \
                'session_id', ", session!(), ", \
                'tool_use_id', e.payload->>'tool_use_id', \
                'target', left(coalesce(e.payload#>>'{tool_input,file_path}', e.payload#>>'{tool_input,command}', \
                                        e.payload#>>'{tool_input,description}', e.payload->>'file_path'), 200)) \
             WHEN 'PostToolUse' THEN jsonb_build_object( \
                'tool_name', coalesce(e.payload->>'tool_name', e.metadata->>'tool_name', 'unknown'), \
                'file_path', coalesce(e.payload->>'file_path', e.payload#>>'{tool_input,file_path}'), \
                'auto_fix_applied', coalesce(jsonb_typeof(e.payload->'auto_fix_details') <> 'null', false), \
                'session_id', ", session!(), ", \
                'tool_use_id', e.payload->>'tool_use_id', \
                'target', left(coalesce(e.payload#>>'{tool_input,file_path}', e.payload#>>'{tool_input,command}', \
                                        e.payload->>'file_path'), 200), \
                'success', CASE WHEN e.payload->'tool_output' IS NOT NULL \
                                THEN coalesce((e.payload#>>'{tool_output,success}')::bool, true) END, \
                'error', NULL::text, \
                'interrupted', (e.payload#>>'{tool_output,interrupted}')::bool) \
             WHEN 'UserPromptSubmit' THEN jsonb_build_object( \
                'agent_detected', e.payload->>'agent_detected', \
                'detection_method', e.payload->>'detection_method', \
                'confidence', e.payload->'confidence', \
                'prompt_length', char_length(e.payload->>'prompt'), \
                'session_id', ", session!(), ", \
                'slash_command', CASE WHEN left(e.payload->>'prompt', 1) = '/' \
                                      THEN split_part(e.payload->>'prompt', ' ', 1) END) \
             WHEN 'Stop' THEN jsonb_build_object( \
                'event', 'stop', \
                'session_id', ", session!(), ", \
                'completion_status', e.payload->>'completion_status', \
                'tool_count', e.payload->'tool_count', \
                'interrupted', e.payload->'interrupted', \
                'stop_hook_active', e.payload->'stop_hook_active') \
             WHEN 'SessionStart' THEN jsonb_build_object( \
                'event', 'session_start', \
                'session_id', ", session!(), ", \
                'cwd', coalesce(e.payload->>'cwd', e.metadata->>'cwd'), \
                'project_path', e.payload->>'project_path', \
                'git_branch', e.payload->>'git_branch', \
                'start_source', e.payload->>'source', \
                'model', e.payload->>'model', \
                'agent_type', e.payload->>'agent_type') \
             WHEN 'SessionEnd' THEN jsonb_build_object( \
                'event', 'session_end', \
                'session_id', ", session!(), ", \
                'reason', coalesce(e.payload->>'reason', e.metadata->>'reason')) \
             ELSE jsonb_build_object('unknown', true, 'source', e.source, 'action', e.action, \
                'session_id', ", session!(), ") \
             END"
        )
    };
}

/// The database's own ceiling: claim and complete up to `$2` events in one statement, with the
/// processor's order and indexes (due retries, then the fresh index oldest first), locking, and
/// its success update writing what the processor writes: `processed`, `processed_at`, the
/// handlers' `result_metadata` (see `handler_metadata!`), `next_attempt_at` and `dead_at`.
/// Nothing leaves the server.
const LIMIT_STEP: &str = concat!(
    "WITH due AS ( \
       SELECT id FROM hook_events \
       WHERE NOT processed AND dead_at IS NULL AND next_attempt_at IS NOT NULL \
         AND next_attempt_at <= now() AND retry_count < $1 \
       ORDER BY next_attempt_at LIMIT $2 FOR UPDATE SKIP LOCKED), \
     fresh AS ( \
       SELECT id FROM hook_events \
       WHERE NOT processed AND dead_at IS NULL AND next_attempt_at IS NULL AND retry_count < $1 \
       ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED), \
     claimed AS (SELECT id FROM due UNION ALL SELECT id FROM fresh LIMIT $2) \
     UPDATE hook_events AS e \
     SET processed = TRUE, processed_at = GREATEST(clock_timestamp(), e.created_at), \
         result_metadata = ",
    handler_metadata!(),
    ", next_attempt_at = NULL, dead_at = NULL \
     FROM claimed WHERE e.id = claimed.id"
);

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

/// Inserts events `first..=last` of the benchmark mix, each waiting for a retry a day from now
/// (`retry_count = 1`, `next_attempt_at = now() + 1 day`), in one transaction with NOTIFY silenced. Returns the number of rows.
pub async fn insert_waiting(
    client: &mut impl GenericClient,
    first: i64,
    last: i64,
) -> Result<u64, StoreError> {
    let tx = client.transaction().await?;
    tx.batch_execute("SET LOCAL hook_events.notify = off").await?;
    let inserted = tx.execute(INSERT_WAITING, &[&first, &last]).await?;
    tx.commit().await?;
    Ok(inserted)
}

/// What `EXPLAIN (ANALYZE, BUFFERS)` says of one run of the processor's claim statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimPlan {
    /// Shared buffers hit and read by the whole statement.
    pub buffers: i64,
    /// Rows its scans read and then discarded, summed over the plan's nodes ("Rows Removed by
    /// Filter", "Rows Removed by Index Recheck").
    pub rows_removed: i64,
    /// Sequential scans of `hook_events` in the plan.
    pub seq_scans: usize,
    /// The indexes it scanned, in plan order.
    pub indexes: Vec<String>,
    /// The rows it locked and returned.
    pub rows: i64,
    /// The plan as JSON, for a failing assertion's message.
    pub json: serde_json::Value,
}

/// Runs the processor's claim statement (see `queries::CLAIM`) of up to `limit` rows, reading
/// the fresh index from `floor`, under `EXPLAIN (ANALYZE, BUFFERS)` in a transaction that is
/// rolled back (nothing stays locked or changed). `generic` plans it as a prepared statement
/// reused many times is planned (`plan_cache_mode = force_generic_plan`), else for these values.
pub async fn explain_claim(
    client: &impl GenericClient,
    limit: i64,
    floor: Option<time::OffsetDateTime>,
    generic: bool,
) -> Result<ClaimPlan, StoreError> {
    explain_claim_ordered(client, limit, floor, generic, &hook_core::SessionOrder::default()).await
}

/// [`explain_claim`] of the claim in session order by `order` (`queries::CLAIM_ORDERED`), or of
/// the ordinary claim when `order` orders nothing.
pub async fn explain_claim_ordered(
    client: &impl GenericClient,
    limit: i64,
    floor: Option<time::OffsetDateTime>,
    generic: bool,
    order: &hook_core::SessionOrder,
) -> Result<ClaimPlan, StoreError> {
    let ordered = order.is_on();
    let text = |items: Vec<String>| {
        let quoted: Vec<String> = items.iter().map(|s| format!("'{}'", s.replace('\'', "''"))).collect();
        format!("ARRAY[{}]::text[]", quoted.join(", "))
    };
    let rules = if ordered {
        let flags: Vec<&str> = order.rules.iter().map(|r| if r.ordered { "true" } else { "false" }).collect();
        format!(
            ", {}, {}, ARRAY[{}]::bool[]",
            text(order.rules.iter().map(|r| r.source.clone()).collect()),
            text(order.rules.iter().map(|r| r.action.clone()).collect()),
            flags.join(", ")
        )
    } else {
        String::new()
    };
    let (types, statement) = if ordered {
        ("int8, int8, int8, timestamptz, text[], text[], bool[]", crate::queries::CLAIM_ORDERED)
    } else {
        ("int8, int8, int8, timestamptz", crate::queries::CLAIM)
    };
    let floor = match floor {
        Some(at) => format!(
            "('epoch'::timestamptz + {} * interval '1 microsecond')",
            at.unix_timestamp_nanos() / 1000
        ),
        None => "NULL::timestamptz".to_owned(),
    };
    let mode = if generic { "force_generic_plan" } else { "force_custom_plan" };
    explain_prepared(
        client,
        &format!(
            "BEGIN; SET LOCAL plan_cache_mode = {mode}; {}; \
             PREPARE hook_bench_claim ({types}) AS {statement}",
            crate::queries::CLAIM_PLANNER,
        ),
        "hook_bench_claim",
        &format!("{limit}, {}, {}, {floor}{rules}", i64::MAX, i64::MAX),
    )
    .await
}

/// Runs `setup`, which opens a transaction and prepares the statement `name` (and may do more in
/// it), then `EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE name (args)`; then rolls the
/// transaction back and deallocates the statement, whatever failed. The plan.
async fn explain_prepared(
    client: &impl GenericClient,
    setup: &str,
    name: &str,
    args: &str,
) -> Result<ClaimPlan, StoreError> {
    if let Err(error) = client.batch_execute(setup).await {
        let _ = client.batch_execute("ROLLBACK").await;
        // PREPARE is not undone by the rollback; the statement may not exist (ignored).
        let _ = client.batch_execute(&format!("DEALLOCATE {name}")).await;
        return Err(error.into());
    }
    let explained = client
        .query_one(&format!("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE {name} ({args})"), &[])
        .await;
    let ended = client.batch_execute(&format!("ROLLBACK; DEALLOCATE {name}")).await;
    let explained = explained?;
    ended?;
    plan_of(&explained)
}

/// The rescan below the low-water mark `floor` (see `queries::RESCAN`), of every event below it
/// (`from` `None`, a full rescan) or of those created from `from` on (a recent one), planned as
/// the store plans it, under `EXPLAIN (ANALYZE, BUFFERS)` in a transaction that is rolled back.
pub async fn explain_rescan(
    client: &impl GenericClient,
    floor: time::OffsetDateTime,
    from: Option<time::OffsetDateTime>,
) -> Result<ClaimPlan, StoreError> {
    let at =
        |t: time::OffsetDateTime| format!("to_timestamp({}::numeric / 1e6)", t.unix_timestamp_nanos() / 1000);
    explain_prepared(
        client,
        &format!(
            "BEGIN; SET LOCAL plan_cache_mode = force_custom_plan; \
             PREPARE hook_bench_rescan (timestamptz, timestamptz) AS {}",
            crate::queries::RESCAN
        ),
        "hook_bench_rescan",
        &format!("{}, {}", at(floor), from.map_or_else(|| "NULL".to_owned(), at)),
    )
    .await
}

/// Runs the rescan below `floor` the store runs with the routes' `order` (see
/// [`explain_rescan`]; `queries::RESCAN_ORDERED` when some route is ordered): what it found, as
/// `PgStore::rescan` finds it (`Some(None)`: an event created at `-infinity`), or `None`.
pub async fn rescan(
    client: &impl GenericClient,
    floor: time::OffsetDateTime,
    from: Option<time::OffsetDateTime>,
    order: &hook_core::SessionOrder,
) -> Result<Option<Option<time::OffsetDateTime>>, StoreError> {
    let rules = crate::queries::OrderRules::new(order);
    crate::queries::rescan(client, floor, from, rules.as_ref()).await
}

/// The plan a batch's success statement (see `queries::SUCCEED`) runs with once the table has
/// grown by `rows` rows since its generic plan was made on the table as it is now (expected
/// empty and analyzed): prepared, planned by a first run on no events, then `rows` events
/// inserted and 100 of them completed under `EXPLAIN (ANALYZE, BUFFERS)`; all in a transaction
/// that is rolled back. `as_the_store_does` sets the planner settings the store sets before the
/// outcomes (`queries::OUTCOME_OPEN`); without them, the planner's own choice.
pub async fn explain_success_after_growth(
    client: &impl GenericClient,
    rows: i64,
    as_the_store_does: bool,
) -> Result<ClaimPlan, StoreError> {
    let settings = if as_the_store_does { crate::queries::OUTCOME_OPEN } else { "SELECT 1" };
    let completed: Vec<String> = (0..100).map(|_| Uuid::new_v4().to_string()).collect();
    let completed = format!("'{{{}}}'::uuid[]", completed.join(","));
    explain_prepared(
        client,
        &format!(
            "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan; {settings}; \
             PREPARE hook_bench_succeed (uuid[], jsonb[]) AS {}; \
             EXECUTE hook_bench_succeed ('{{}}', '{{}}'); \
             INSERT INTO hook_events (id, source, action, resource, resource_id) \
             SELECT gen_random_uuid(), 'PreToolUse', 'tool_invocation', 'tool', 'Bash' \
             FROM generate_series(101, {rows}); \
             INSERT INTO hook_events (id, source, action, resource, resource_id) \
             SELECT id, 'PreToolUse', 'tool_invocation', 'tool', 'Bash' FROM unnest({completed}) AS id",
            crate::queries::SUCCEED
        ),
        "hook_bench_succeed",
        &format!("{completed}, array_fill('{{}}'::jsonb, ARRAY[100])"),
    )
    .await
}

/// The plan of a batch's success statement (`queries::SUCCEED`, planned as the store plans it:
/// `queries::OUTCOME_OPEN`) completing `ids`, under `EXPLAIN (ANALYZE, BUFFERS)` in a
/// transaction that is rolled back. `as_before` runs it as it was phrased before it looked the
/// events up with `processed IS NOT TRUE` (`NOT e.processed`), to show what that phrasing costs
/// when the statistics say few rows are pending and a held snapshot keeps the entries of every
/// processed event in the partial indexes of pending rows.
pub async fn explain_success(
    client: &impl GenericClient,
    ids: &[Uuid],
    as_before: bool,
) -> Result<ClaimPlan, StoreError> {
    let statement = if as_before {
        crate::queries::SUCCEED.replace("e.processed IS NOT TRUE", "NOT e.processed")
    } else {
        crate::queries::SUCCEED.to_owned()
    };
    let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    explain_prepared(
        client,
        &format!(
            "BEGIN; {}; PREPARE hook_bench_succeed_one (uuid[], jsonb[]) AS {statement}",
            crate::queries::OUTCOME_OPEN
        ),
        "hook_bench_succeed_one",
        &format!("'{{{}}}'::uuid[], array_fill('{{}}'::jsonb, ARRAY[{}])", ids.join(","), ids.len()),
    )
    .await
}

/// A [`ClaimPlan`] from the row of an `EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)`.
fn plan_of(explained: &tokio_postgres::Row) -> Result<ClaimPlan, StoreError> {
    // The plan's column is `json`; read as text, should a server send it so.
    let json: serde_json::Value = match explained.try_get(0) {
        Ok(json) => json,
        Err(_) => serde_json::from_str(&explained.try_get::<_, String>(0)?)
            .map_err(|e| StoreError::Config(format!("EXPLAIN returned no JSON: {e}")))?,
    };
    let root = &json[0]["Plan"];
    let mut plan = ClaimPlan {
        buffers: root["Shared Hit Blocks"].as_i64().unwrap_or(0)
            + root["Shared Read Blocks"].as_i64().unwrap_or(0),
        rows_removed: 0,
        seq_scans: 0,
        indexes: Vec::new(),
        rows: root["Actual Rows"].as_i64().unwrap_or(0),
        json: json.clone(),
    };
    walk_plan(root, &mut plan);
    Ok(plan)
}

fn walk_plan(node: &serde_json::Value, plan: &mut ClaimPlan) {
    for key in ["Rows Removed by Filter", "Rows Removed by Index Recheck"] {
        plan.rows_removed += node[key].as_i64().unwrap_or(0);
    }
    if node["Node Type"] == "Seq Scan" && node["Relation Name"] == "hook_events" {
        plan.seq_scans += 1;
    }
    if let Some(index) = node["Index Name"].as_str() {
        plan.indexes.push(index.to_owned());
    }
    if let Some(children) = node["Plans"].as_array() {
        for child in children {
            walk_plan(child, plan);
        }
    }
}

/// Processed events.
pub async fn processed_count(client: &impl GenericClient) -> Result<i64, StoreError> {
    Ok(client.query_one("SELECT count(*) FROM hook_events WHERE processed", &[]).await?.get(0))
}

/// The statistics collector's dead row versions of `hook_events` (`n_dead_tup`).
pub async fn dead_tuples(client: &impl GenericClient) -> Result<i64, StoreError> {
    Ok(client
        .query_one(
            "SELECT coalesce((SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'hook_events'::regclass), 0)",
            &[],
        )
        .await?
        .get(0))
}

/// The size of the claim ledger, `hook_events_claims`, in bytes (its dead row versions stay
/// while a snapshot older than them is held).
pub async fn ledger_bytes(client: &impl GenericClient) -> Result<i64, StoreError> {
    Ok(client.query_one("SELECT pg_relation_size('hook_events_claims')", &[]).await?.get(0))
}

/// The process id of this session's server process (`pg_backend_pid()`).
pub async fn backend_pid(client: &impl GenericClient) -> Result<i32, StoreError> {
    Ok(client.query_one("SELECT pg_backend_pid()", &[]).await?.get(0))
}

/// Opens a transaction on `client` that holds a `REPEATABLE READ` snapshot (taken by a read of
/// `hook_events`) until [`release_snapshot`]: while it is open, vacuum can remove no row version
/// that died after it began, as with a long report, a stuck `idle in transaction` client or a
/// backup. Returns the rows it saw.
pub async fn hold_snapshot(client: &impl GenericClient) -> Result<i64, StoreError> {
    client
        .batch_execute(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SET LOCAL idle_in_transaction_session_timeout = 0",
        )
        .await?;
    Ok(client.query_one("SELECT count(*) FROM hook_events", &[]).await?.get(0))
}

/// Ends the transaction of [`hold_snapshot`].
pub async fn release_snapshot(client: &impl GenericClient) -> Result<(), StoreError> {
    client.batch_execute("ROLLBACK").await?;
    Ok(())
}

/// Inserts event `i` of the benchmark mix as a producer does: one autocommitted statement, whose
/// trigger sends NOTIFY. `created_at` is the statement's `now()`.
pub async fn insert_one(client: &impl GenericClient, i: i64) -> Result<(), StoreError> {
    insert_range(client, i, i, Ids::Random).await.map(drop)
}

/// Inserts events `first..=last` of the benchmark mix in one autocommitted statement, whose
/// trigger sends one NOTIFY, as a producer writing a few events at once does. Returns the number
/// of rows.
pub async fn insert_range(
    client: &impl GenericClient,
    first: i64,
    last: i64,
    ids: Ids,
) -> Result<u64, StoreError> {
    let sql = match ids {
        Ids::Random => INSERT_EVENTS,
        Ids::TimeOrdered => INSERT_EVENTS_V7,
    };
    let statement = client.prepare_cached(sql).await?;
    Ok(client.execute(&statement, &[&first, &last]).await?)
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

/// Whether any live event is still unprocessed (one probe of the claim index, cheap enough to
/// poll while a drain runs).
pub async fn any_unprocessed(client: &impl GenericClient) -> Result<bool, StoreError> {
    let statement = client
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM hook_events WHERE NOT processed AND dead_at IS NULL)")
        .await?;
    Ok(client.query_one(&statement, &[]).await?.get(0))
}

/// The `result_metadata` of every processed event, by id, in no order.
pub async fn result_metadata(
    client: &impl GenericClient,
) -> Result<Vec<(Uuid, Option<serde_json::Value>)>, StoreError> {
    let rows = client.query("SELECT id, result_metadata FROM hook_events WHERE processed", &[]).await?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
}

/// The mean stored size (`pg_column_size`) of `result_metadata` over the processed events, in
/// bytes; `None` when there are none.
pub async fn mean_result_metadata_bytes(client: &impl GenericClient) -> Result<Option<f64>, StoreError> {
    Ok(client
        .query_one(
            "SELECT avg(pg_column_size(result_metadata))::float8 FROM hook_events WHERE processed",
            &[],
        )
        .await?
        .get(0))
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

/// `processed_at - created_at` in microseconds of every processed event created outside the
/// windows `[from[i], until[i]]`, in no order.
pub async fn completion_latencies_outside_us(
    client: &impl GenericClient,
    from: &[time::OffsetDateTime],
    until: &[time::OffsetDateTime],
) -> Result<Vec<i64>, StoreError> {
    let rows = client
        .query(
            "SELECT (EXTRACT(EPOCH FROM processed_at - created_at) * 1000000)::int8 \
             FROM hook_events AS e WHERE processed AND NOT EXISTS ( \
                 SELECT 1 FROM unnest($1::timestamptz[], $2::timestamptz[]) AS w(a, b) \
                 WHERE e.created_at BETWEEN w.a AND w.b)",
            &[&from, &until],
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

// ---------------------------------------------------------------------------------------------
// The soak's read-outs
// ---------------------------------------------------------------------------------------------

/// Records every committed write of an outcome in `hook_outcome_audit_rows` (used by the soak and
/// by the fault tests): one row when an event is
/// marked processed, one per failed attempt, one when it is set aside dead. A completion fenced
/// off (rolled back with its claim, say because its process was killed) leaves none, so in a run
/// whose handlers all succeed every event must end with exactly one success row.
const INSTALL_OUTCOME_AUDIT: &str = "\
     DROP TRIGGER IF EXISTS hook_outcome_audit ON hook_events; \
     DROP FUNCTION IF EXISTS hook_outcome_audit(); \
     DROP TABLE IF EXISTS hook_outcome_audit_rows; \
     CREATE TABLE hook_outcome_audit_rows ( \
         event_id uuid NOT NULL, processed bool NOT NULL, retry_count int NOT NULL, dead bool NOT NULL, \
         at timestamptz NOT NULL DEFAULT clock_timestamp()); \
     CREATE FUNCTION hook_outcome_audit() RETURNS trigger LANGUAGE plpgsql AS $$ \
     BEGIN \
         IF NEW.processed IS DISTINCT FROM OLD.processed OR NEW.retry_count IS DISTINCT FROM OLD.retry_count \
            OR NEW.dead_at IS DISTINCT FROM OLD.dead_at THEN \
             INSERT INTO hook_outcome_audit_rows (event_id, processed, retry_count, dead) \
             VALUES (NEW.id, NEW.processed, NEW.retry_count, NEW.dead_at IS NOT NULL); \
         END IF; \
         RETURN NEW; \
     END $$; \
     CREATE TRIGGER hook_outcome_audit AFTER UPDATE ON hook_events \
         FOR EACH ROW EXECUTE FUNCTION hook_outcome_audit();";

const REMOVE_OUTCOME_AUDIT: &str = "\
     DROP TRIGGER IF EXISTS hook_outcome_audit ON hook_events; \
     DROP FUNCTION IF EXISTS hook_outcome_audit(); \
     DROP TABLE IF EXISTS hook_outcome_audit_rows;";

/// Installs the soak's audit of committed outcomes (see [`outcome_audit`]), replacing any left
/// by an earlier run.
pub async fn install_outcome_audit(client: &tokio_postgres::Client) -> Result<(), StoreError> {
    client.batch_execute(INSTALL_OUTCOME_AUDIT).await?;
    Ok(())
}

/// Removes the soak's audit trigger and its table.
pub async fn remove_outcome_audit(client: &tokio_postgres::Client) -> Result<(), StoreError> {
    client.batch_execute(REMOVE_OUTCOME_AUDIT).await?;
    Ok(())
}

/// What the audit recorded: every outcome that committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutcomeAudit {
    /// Commits that marked an event processed.
    pub successes: i64,
    /// Commits of a failed attempt or of a dead event.
    pub failures: i64,
    /// Events whose successful completion did not commit exactly once (none or several).
    pub events_without_one_success: i64,
}

/// Reads the audit installed by [`install_outcome_audit`].
pub async fn outcome_audit(client: &tokio_postgres::Client) -> Result<OutcomeAudit, StoreError> {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM hook_outcome_audit_rows WHERE processed), \
                    (SELECT count(*) FROM hook_outcome_audit_rows WHERE NOT processed), \
                    (SELECT count(*) FROM hook_events AS e \
                       LEFT JOIN (SELECT event_id, count(*) AS n FROM hook_outcome_audit_rows WHERE processed \
                                  GROUP BY event_id) AS o ON o.event_id = e.id \
                     WHERE o.n IS DISTINCT FROM 1)",
            &[],
        )
        .await?;
    Ok(OutcomeAudit { successes: row.get(0), failures: row.get(1), events_without_one_success: row.get(2) })
}

/// `metadata.seq` of every row (the number [`insert_range`] gave it; -1 for a row without one),
/// in no order.
pub async fn sequence_numbers(client: &impl GenericClient) -> Result<Vec<i64>, StoreError> {
    let rows = client.query("SELECT coalesce((metadata->>'seq')::int8, -1) FROM hook_events", &[]).await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// How the rows of `hook_events` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EndStates {
    /// Processed.
    pub processed: i64,
    /// Set aside dead.
    pub dead: i64,
    /// Neither processed nor dead: still queued.
    pub queued: i64,
    /// Processed with `processed_at < created_at`, which the seed's checks reject.
    pub processed_before_created: i64,
}

/// Counts the rows of `hook_events` by how they ended.
pub async fn end_states(client: &impl GenericClient) -> Result<EndStates, StoreError> {
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE processed), \
                    count(*) FILTER (WHERE NOT processed AND dead_at IS NOT NULL), \
                    count(*) FILTER (WHERE NOT processed AND dead_at IS NULL), \
                    count(*) FILTER (WHERE processed AND (processed_at IS NULL OR processed_at < created_at)) \
             FROM hook_events",
            &[],
        )
        .await?;
    Ok(EndStates {
        processed: row.get(0),
        dead: row.get(1),
        queued: row.get(2),
        processed_before_created: row.get(3),
    })
}

/// Rows of `hook_events` some transaction holds a lock on: a claim that was not released.
pub async fn locked_rows(client: &mut impl GenericClient) -> Result<i64, StoreError> {
    let tx = client.transaction().await?;
    let row = tx
        .query_one(
            "SELECT (SELECT count(*) FROM hook_events) \
                  - (SELECT count(*) FROM (SELECT id FROM hook_events FOR UPDATE SKIP LOCKED) AS free)",
            &[],
        )
        .await?;
    tx.rollback().await?;
    Ok(row.get(0))
}

/// Sessions on this database with this `application_name`.
pub async fn sessions(client: &impl GenericClient, application_name: &str) -> Result<i64, StoreError> {
    Ok(client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = $1",
            &[&application_name],
        )
        .await?
        .get(0))
}

/// What the statistics and the catalog say of `hook_events` at one moment: its dead and live
/// row versions, its updates (and how many were HOT), its vacuums, and its size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableFacts {
    /// `n_dead_tup`.
    pub dead_tuples: i64,
    /// `n_live_tup`.
    pub live_tuples: i64,
    /// `n_tup_upd`, `n_tup_hot_upd`.
    pub updates: i64,
    /// Of which HOT (no new index entries).
    pub hot_updates: i64,
    /// `vacuum_count` (by hand: the processor's vacuum task), `autovacuum_count`.
    pub vacuums: i64,
    /// Vacuums by autovacuum.
    pub autovacuums: i64,
    /// The heap (main fork, free space map, visibility map), bytes.
    pub heap_bytes: i64,
    /// Every index, bytes.
    pub index_bytes: i64,
    /// The TOAST table and its index, bytes.
    pub toast_bytes: i64,
}

impl TableFacts {
    /// The table and its indexes (and TOAST): `pg_total_relation_size`.
    pub fn total_bytes(&self) -> i64 {
        self.heap_bytes + self.index_bytes + self.toast_bytes
    }
}

/// The [`TableFacts`] of `hook_events` now.
pub async fn table_facts(client: &impl GenericClient) -> Result<TableFacts, StoreError> {
    let row = client
        .query_one(
            "SELECT s.n_dead_tup, s.n_live_tup, s.n_tup_upd, s.n_tup_hot_upd, s.vacuum_count, \
                    s.autovacuum_count, pg_table_size('hook_events') - pg_total_relation_size(c.reltoastrelid), \
                    pg_indexes_size('hook_events'), pg_total_relation_size(c.reltoastrelid) \
               FROM pg_stat_user_tables AS s JOIN pg_class AS c ON c.oid = s.relid \
              WHERE s.relid = 'hook_events'::regclass",
            &[],
        )
        .await?;
    Ok(TableFacts {
        dead_tuples: row.try_get(0)?,
        live_tuples: row.try_get(1)?,
        updates: row.try_get(2)?,
        hot_updates: row.try_get(3)?,
        vacuums: row.try_get(4)?,
        autovacuums: row.try_get(5)?,
        heap_bytes: row.try_get(6)?,
        index_bytes: row.try_get(7)?,
        toast_bytes: row.try_get(8)?,
    })
}

/// Every index of `hook_events` with its size in bytes, largest first.
pub async fn index_sizes(client: &impl GenericClient) -> Result<Vec<(String, i64)>, StoreError> {
    let rows = client
        .query(
            "SELECT c.relname::text, pg_relation_size(c.oid) FROM pg_index AS i \
               JOIN pg_class AS c ON c.oid = i.indexrelid \
              WHERE i.indrelid = 'hook_events'::regclass ORDER BY 2 DESC, 1",
            &[],
        )
        .await?;
    rows.iter().map(|row| Ok((row.try_get(0)?, row.try_get(1)?))).collect()
}

/// Empties `hook_events_archive` (the bench's own database only).
pub async fn truncate_archive(client: &impl GenericClient) -> Result<(), StoreError> {
    client.batch_execute("TRUNCATE hook_events_archive").await?;
    Ok(())
}
