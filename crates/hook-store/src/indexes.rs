//! Indexes built by the features that read them, not by the migrations: the console's
//! ([`CONSOLE`]) and session order's ([`SESSION_ORDER`]).
//!
//! Each of them holds an entry for every event (the console's two even one for every row
//! version: an event's completion is never a HOT update, so it adds a second entry to each),
//! which every producer writes and every vacuum walks. A queue that serves no console and has
//! no ordered route reads none of them, and at thousands of events per second they were most of
//! what its writes and vacuums cost (docs/benchmarks.md, "15,000 events/s"). So the migrations
//! of a fresh install no longer build them (0010 and 0013 were rewritten; see their files), and
//! whoever reads one builds it when it starts, with [`ensure`] (or [`build_logged`] in a task
//! beside its work): the processor with `--console` and `hook-console` build [`CONSOLE`], a
//! [`PgStore`](crate::PgStore) whose routes are ordered starts building [`SESSION_ORDER`] from
//! its `migrate`.
//!
//! An install whose migrations built them before keeps them: nothing here drops a valid index.
//! Each is built `CONCURRENTLY` (producers and processors go on writing), under the migration
//! runner's advisory lock (so two starting processes build it once, and never beside a
//! migration), after dropping an invalid one an interrupted build left. A valid index of the
//! name on `hook_events` is taken as is; one on another table is refused, never dropped.

use std::time::Instant;

use tokio_postgres::Client;
use tracing::info;

use crate::error::StoreError;
use crate::migrate::{db_error_text, under_migration_lock};

/// One index of `hook_events` that a feature reads and builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionalIndex {
    /// The index's name.
    pub name: &'static str,
    /// Its `CREATE INDEX CONCURRENTLY` statement: the definition its migration had.
    pub create: &'static str,
}

/// The console's indexes (docs/console.md): every event by age, newest first with keyset paging
/// on `(created_at, id)` (the events list, its time filter, the sessions list, arrivals per
/// minute), and an agent session's events in order (keyed by
/// [`SESSION_KEY`](crate::console::SESSION_KEY)). Built by migration 0010 until its second text.
pub const CONSOLE: &[OptionalIndex] = &[
    OptionalIndex {
        name: "hook_events_created_idx",
        create: "CREATE INDEX CONCURRENTLY hook_events_created_idx ON hook_events (created_at, id)",
    },
    OptionalIndex {
        name: "hook_events_session_idx",
        create: "CREATE INDEX CONCURRENTLY hook_events_session_idx \
                 ON hook_events ((left(coalesce(metadata->>'session_id', payload->>'session_id'), 128)), created_at, id) \
                 WHERE left(coalesce(metadata->>'session_id', payload->>'session_id'), 128) IS NOT NULL",
    },
];

/// Session order's index (docs/routes.md, "Session order"): each session's pending events in
/// order, partial to pending rows with a session; an ordered claim steps through it from one
/// session's head to the next. Built by migration 0013 until its second text.
pub const SESSION_ORDER: &[OptionalIndex] = &[OptionalIndex {
    name: "hook_events_order_idx",
    create: "CREATE INDEX CONCURRENTLY hook_events_order_idx \
             ON hook_events ((left(coalesce(metadata->>'session_id', payload->>'session_id'), 128)), created_at, id) \
             WHERE NOT processed AND dead_at IS NULL \
               AND left(coalesce(metadata->>'session_id', payload->>'session_id'), 128) IS NOT NULL",
}];

/// The indexes of `set` that are not valid indexes of `hook_events`: missing, invalid (an
/// interrupted concurrent build), or a name taken on another table.
pub async fn missing(client: &Client, set: &[OptionalIndex]) -> Result<Vec<OptionalIndex>, StoreError> {
    let mut missing = Vec::new();
    for index in set {
        if found(client, index.name).await? != (Found::OnHookEvents { valid: true }) {
            missing.push(*index);
        }
    }
    Ok(missing)
}

/// What the catalog holds under an index's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    /// No relation of that name.
    Nothing,
    /// An index of `hook_events`, valid or not (an interrupted or failed build leaves an
    /// invalid one, which every writer still maintains).
    OnHookEvents { valid: bool },
    /// An index of another table, the user's: never taken for ours, never dropped.
    Elsewhere,
}

async fn found(client: &Client, name: &str) -> Result<Found, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT indrelid = 'hook_events'::regclass, indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)",
            &[&name],
        )
        .await?;
    Ok(match row {
        None => Found::Nothing,
        Some(row) if row.get::<_, bool>(0) => Found::OnHookEvents { valid: row.get(1) },
        Some(_) => Found::Elsewhere,
    })
}

/// Builds `index` (not valid on `hook_events`) on `client`'s session, with no lock or statement
/// timeout (see [`ensure`]): drops an invalid leftover first, and what a failed build left.
async fn build(client: &Client, index: &OptionalIndex) -> Result<(), StoreError> {
    let fail = |error: tokio_postgres::Error| StoreError::IndexBuild {
        name: index.name,
        reason: db_error_text(&error),
    };
    let drop = format!("DROP INDEX CONCURRENTLY IF EXISTS {}", index.name);
    match found(client, index.name).await.map_err(fail)? {
        Found::Elsewhere => {
            return Err(StoreError::IndexBuild {
                name: index.name,
                reason: "an index of this name exists on another table; rename it".into(),
            })
        }
        Found::OnHookEvents { valid: false } => client.batch_execute(&drop).await.map_err(fail)?,
        Found::Nothing | Found::OnHookEvents { valid: true } => {}
    }
    if let Err(error) = client.batch_execute(index.create).await {
        if let Ok(Found::OnHookEvents { valid: false }) = found(client, index.name).await {
            let _ = client.batch_execute(&drop).await;
        }
        return Err(fail(error));
    }
    Ok(())
}

/// Builds the indexes of `set` that are missing or invalid, and returns their names (empty when
/// every one was there: then nothing is locked or written, so a role that may not create indexes
/// gets through). Runs on `client`'s session outside a transaction; `hook_events` must exist
/// (run the migrations first). A build takes one scan of the table and waits for the
/// transactions running when it starts (a held snapshot holds it up); producers and processors
/// go on meanwhile.
///
/// # Errors
///
/// [`StoreError::IndexBuild`] when a build fails (no right to create an index on the table, a
/// cancelled build, ...): the index is left missing, and the next call tries again.
pub async fn ensure(client: &Client, set: &[OptionalIndex]) -> Result<Vec<&'static str>, StoreError> {
    if missing(client, set).await?.is_empty() {
        return Ok(Vec::new());
    }
    under_migration_lock(client, async {
        let mut built = Vec::new();
        // Again under the lock: another process may have built them meanwhile.
        for index in missing(client, set).await? {
            info!(index = index.name, "building index (concurrently: writers go on)");
            let started = Instant::now();
            // As the migration runner does for its concurrent builds: a build waits for every
            // older snapshot, which a role's or a connection's lock_timeout / statement_timeout
            // would cancel halfway. Restored (to the session's own values) whatever happened.
            client.batch_execute("SET lock_timeout = 0; SET statement_timeout = 0").await?;
            let result = build(client, &index).await;
            let reset = client.batch_execute("RESET lock_timeout; RESET statement_timeout").await;
            result?;
            reset?;
            info!(index = index.name, elapsed_ms = started.elapsed().as_millis() as u64, "index built");
            built.push(index.name);
        }
        Ok(built)
    })
    .await
}

/// Builds the missing indexes of `set` ([`ensure`]) on a connection of `pool`, and logs the
/// outcome: `index built` for each, or one warning that names the index, the server's reason and
/// `consequence` (what goes slow until it is built), and points to the statements an owner can
/// run. For a build beside serving or claiming, in a task of its own.
pub async fn build_logged(pool: &deadpool_postgres::Pool, set: &[OptionalIndex], consequence: &str) {
    let built = async {
        let client = pool.get().await?;
        ensure(&client, set).await
    }
    .await;
    if let Err(error) = built {
        tracing::warn!(
            %error,
            "an index is missing and could not be built: {consequence} (docs/operations.md, \
             \"Indexes built by their users\", gives the statements)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(sql: &str) -> String {
        sql.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    /// Each index is built exactly as its migration's first text built it: an install that
    /// applied that text and one that built the index here have the same index.
    #[test]
    fn the_definitions_are_the_first_migrations() {
        let old_0010 = words(include_str!("../../../migrations/history/0010_console_indexes.v1.sql"));
        let old_0013 = words(include_str!("../../../migrations/history/0013_session_order.v1.sql"));
        for index in CONSOLE {
            assert!(old_0010.contains(&words(index.create)), "{}", index.name);
        }
        for index in SESSION_ORDER {
            assert!(old_0013.contains(&words(index.create)), "{}", index.name);
        }
        let session = format!("(({}), created_at, id)", crate::console::SESSION_KEY);
        assert!(words(CONSOLE[1].create).contains(&session));
        assert!(words(SESSION_ORDER[0].create).contains(&session));
    }
}
