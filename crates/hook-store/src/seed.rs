//! The original service's table, made and filled the original's way, and variants of it that do
//! not fit this build; snapshots that tell, column by column, whether anything changed. For the
//! schema tests and `hook-bench upgrade` (features `test-support`, `bench`).

use std::collections::BTreeMap;

use serde_json::Value;
use tokio_postgres::Client;

use crate::error::StoreError;

/// The original's DDL, verbatim (its README's "Database Schema").
pub const ORIGINAL_DDL: &str = "
CREATE TABLE hook_events (
    id UUID PRIMARY KEY,
    source VARCHAR(255) NOT NULL,
    action VARCHAR(255) NOT NULL,
    resource VARCHAR(255) NOT NULL,
    resource_id VARCHAR(255) NOT NULL,
    payload JSONB NOT NULL DEFAULT '{}',
    metadata JSONB NOT NULL DEFAULT '{}',
    processed BOOLEAN NOT NULL DEFAULT FALSE,
    processing_errors TEXT[],
    retry_count INTEGER NOT NULL DEFAULT 0 CHECK (retry_count >= 0 AND retry_count <= 10),
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    processed_at TIMESTAMPTZ,
    CONSTRAINT processing_time_valid CHECK (processed_at IS NULL OR processed_at >= created_at),
    CONSTRAINT retry_count_limit CHECK (retry_count <= 10)
);
CREATE INDEX idx_hook_events_processed ON hook_events (processed, created_at DESC) WHERE NOT processed;
CREATE INDEX idx_hook_events_source_action ON hook_events (source, action);
CREATE INDEX idx_hook_events_retry ON hook_events (retry_count, created_at) WHERE retry_count > 0;
";

/// The original README's "Clear Old Events" SQL, verbatim: copies processed events older than 30
/// days into a new `hook_events_archive`, then deletes them.
pub const ORIGINAL_ARCHIVE_SQL: &str = "
CREATE TABLE hook_events_archive AS
SELECT * FROM hook_events
WHERE processed = TRUE
  AND processed_at < NOW() - INTERVAL '30 days';

DELETE FROM hook_events
WHERE processed = TRUE
  AND processed_at < NOW() - INTERVAL '30 days';
";

/// The original table, or one that differs from it the way users' tables do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// The original DDL.
    Original,
    /// `created_at TIMESTAMP` (without time zone).
    TimestampWithoutTimeZone,
    /// `id TEXT`.
    TextId,
    /// An extra `tenant TEXT NOT NULL` column of the user's own, without a default.
    ExtraNotNullColumn,
}

impl Variant {
    /// The three that do not fit.
    pub const MISMATCHED: [Variant; 3] =
        [Variant::TimestampWithoutTimeZone, Variant::TextId, Variant::ExtraNotNullColumn];

    /// The column the schema check must name.
    pub fn column(self) -> &'static str {
        match self {
            Variant::Original => "",
            Variant::TimestampWithoutTimeZone => "created_at",
            Variant::TextId => "id",
            Variant::ExtraNotNullColumn => "tenant",
        }
    }

    /// Its DDL: the original's with the one change.
    pub fn ddl(self) -> String {
        match self {
            Variant::Original => ORIGINAL_DDL.to_owned(),
            Variant::TimestampWithoutTimeZone => {
                ORIGINAL_DDL.replace("created_at TIMESTAMPTZ NOT NULL", "created_at TIMESTAMP NOT NULL")
            }
            Variant::TextId => ORIGINAL_DDL.replace("id UUID PRIMARY KEY", "id TEXT PRIMARY KEY"),
            Variant::ExtraNotNullColumn => ORIGINAL_DDL
                .replace("processed_at TIMESTAMPTZ,", "processed_at TIMESTAMPTZ,\n    tenant TEXT NOT NULL,"),
        }
    }

    /// The change as `ALTER TABLE` statements, for a table that was migrated first (a user who
    /// changes the table after installing).
    pub fn alter(self) -> &'static str {
        match self {
            Variant::Original => "",
            Variant::TimestampWithoutTimeZone => {
                "ALTER TABLE hook_events ALTER COLUMN created_at TYPE timestamp"
            }
            Variant::TextId => "ALTER TABLE hook_events ALTER COLUMN id TYPE text",
            Variant::ExtraNotNullColumn => {
                "ALTER TABLE hook_events ADD COLUMN tenant text NOT NULL DEFAULT 'acme'; \
                 ALTER TABLE hook_events ALTER COLUMN tenant DROP DEFAULT"
            }
        }
    }
}

/// Inserts `n` rows the way the original's producers and processor left them. With
/// `processed_long_ago`, all are events processed 40 days ago (what the original's archive SQL
/// moves); otherwise a mix: a third pending, a third failed (one error; `retry_count` 1, or 3 for
/// half of them, stranded at the original's limit), a third processed an hour ago. Returns the
/// rows inserted.
pub async fn insert_rows(
    client: &Client,
    variant: Variant,
    n: i64,
    processed_long_ago: bool,
) -> Result<u64, StoreError> {
    let (tenant_column, tenant_value) =
        if variant == Variant::ExtraNotNullColumn { (", tenant", ", 'acme'") } else { ("", "") };
    let id = if variant == Variant::TextId { "gen_random_uuid()::text" } else { "gen_random_uuid()" };
    let sql = format!(
        "INSERT INTO hook_events (id, source, action, resource, resource_id, payload, metadata, processed, \
                                  processing_errors, retry_count, created_at, processed_at{tenant_column})
         SELECT {id},
                (ARRAY['PreToolUse','PostToolUse','UserPromptSubmit','Stop','SessionStart','SessionEnd'])[1 + i % 6],
                (ARRAY['tool_invocation','tool_completion','prompt_submitted','session_stopped','session_started',
                       'session_ended'])[1 + i % 6],
                'tool', 'r' || i,
                jsonb_build_object('tool_name', 'Bash', 'session_id', 's' || (i % 7), 'n', i),
                jsonb_build_object('hook_type', 'x'),
                k = 2,
                CASE WHEN k = 1 THEN ARRAY['old error'] END,
                CASE WHEN k = 1 AND i % 6 = 1 THEN 3 WHEN k = 1 THEN 1 ELSE 0 END,
                t, CASE WHEN k = 2 THEN t + interval '1 second' END{tenant_value}
         FROM generate_series(1::int8, $1::int8) AS i,
              LATERAL (SELECT CASE WHEN $2::bool THEN 2 ELSE i % 3 END AS k) AS kind,
              LATERAL (SELECT CASE WHEN $2::bool THEN now() - interval '40 days'
                                   WHEN i % 3 = 2 THEN now() - interval '1 hour'
                                   ELSE now() - interval '2 days' END + i * interval '1 millisecond' AS t) AS at"
    );
    Ok(client.execute(sql.as_str(), &[&n, &processed_long_ago]).await?)
}

/// Creates the variant's table with `rows` mixed rows and `old` rows processed long ago.
pub async fn create(client: &Client, variant: Variant, rows: i64, old: i64) -> Result<(), StoreError> {
    client.batch_execute(&variant.ddl()).await?;
    insert_rows(client, variant, rows, false).await?;
    insert_rows(client, variant, old, true).await?;
    Ok(())
}

/// One table: its columns as the catalog shows them, and its rows by id, column by column.
#[derive(Debug, Clone, PartialEq)]
struct TableSnapshot {
    columns: Vec<String>,
    rows: BTreeMap<String, serde_json::Map<String, Value>>,
}

/// The tables of hook-events (and the names of every relation in the schema) at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    relations: Vec<String>,
    tables: BTreeMap<String, TableSnapshot>,
}

/// What changed between two snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Each difference of the catalog or of a row that was there before, one line each
    /// (`hook_events row <id> column retry_count: 0 -> 1`).
    pub changed: Vec<String>,
    /// Rows that were not there before, as `table <id>`.
    pub added: Vec<String>,
}

const TABLES: [&str; 3] = ["hook_events", "hook_events_archive", "hook_events_migrations"];

impl Snapshot {
    /// Reads the relations of the current schema, and every row and column of `hook_events`,
    /// `hook_events_archive` and `hook_events_migrations` where they exist.
    pub async fn take(client: &Client) -> Result<Snapshot, StoreError> {
        let relations = client
            .query(
                "SELECT c.relkind::text || ' ' || c.relname::text FROM pg_class AS c \
                 WHERE c.relnamespace = current_schema()::regnamespace ORDER BY 1",
                &[],
            )
            .await?
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<Vec<String>, _>>()?;
        let mut tables = BTreeMap::new();
        for table in TABLES {
            let exists: bool =
                client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table]).await?.try_get(0)?;
            if !exists {
                continue;
            }
            let columns = client
                .query(
                    "SELECT a.attname || ' ' || format_type(a.atttypid, a.atttypmod) \
                            || CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END \
                            || coalesce(' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid), '') \
                     FROM pg_attribute AS a LEFT JOIN pg_attrdef AS d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
                     WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                    &[&table],
                )
                .await?
                .iter()
                .map(|row| row.try_get(0))
                .collect::<Result<Vec<String>, _>>()?;
            let key = if table == "hook_events_migrations" { "version" } else { "id" };
            let rows = client.query(&format!("SELECT to_jsonb(t) FROM {table} AS t"), &[]).await?;
            let mut by_id = BTreeMap::new();
            for (n, row) in rows.iter().enumerate() {
                let Value::Object(map) = row.try_get::<_, Value>(0)? else { continue };
                let id = map.get(key).map_or_else(|| format!("#{n}"), |v| v.to_string());
                by_id.insert(id, map);
            }
            tables.insert(table.to_owned(), TableSnapshot { columns, rows: by_id });
        }
        Ok(Snapshot { relations, tables })
    }

    /// Rows in `table`.
    pub fn rows(&self, table: &str) -> usize {
        self.tables.get(table).map_or(0, |t| t.rows.len())
    }

    /// What changed from `self` to `after`.
    pub fn changes(&self, after: &Snapshot) -> Changes {
        let mut changes = Changes::default();
        if self.relations != after.relations {
            changes.changed.push(format!("relations: {:?} -> {:?}", self.relations, after.relations));
        }
        for table in TABLES {
            match (self.tables.get(table), after.tables.get(table)) {
                (None, None) => {}
                (Some(_), None) => changes.changed.push(format!("{table} was dropped")),
                (None, Some(_)) => changes.changed.push(format!("{table} was created")),
                (Some(before), Some(now)) => {
                    if before.columns != now.columns {
                        changes
                            .changed
                            .push(format!("{table} columns: {:?} -> {:?}", before.columns, now.columns));
                    }
                    for (id, row) in &before.rows {
                        let Some(new) = now.rows.get(id) else {
                            changes.changed.push(format!("{table} row {id} is gone"));
                            continue;
                        };
                        for (column, value) in row {
                            let now_value = new.get(column).unwrap_or(&Value::Null);
                            if now_value != value {
                                changes.changed.push(format!(
                                    "{table} row {id} column {column}: {value} -> {now_value}"
                                ));
                            }
                        }
                    }
                    for id in now.rows.keys().filter(|id| !before.rows.contains_key(*id)) {
                        changes.added.push(format!("{table} {id}"));
                    }
                }
            }
        }
        changes
    }
}

/// A database holding `variant`'s table with 30 mixed rows and 10 processed 40 days ago, so
/// that the processor, `hook-replay` and `hook-archive` would each find work in it: made that way
/// (`migrated == false`, a user's table this project has not seen yet), or migrated as the
/// original and then changed ([`Variant::alter`]). Returns it, a client, and its snapshot.
///
/// # Panics
/// When the database cannot be made.
#[cfg(feature = "test-support")]
pub async fn mismatched_database(
    test: &str,
    variant: Variant,
    migrated: bool,
) -> (crate::testing::TestDb, Client, Snapshot) {
    let db = crate::testing::TestDb::empty(test).await;
    let client = db.client().await;
    if migrated {
        create(&client, Variant::Original, 30, 10).await.expect("the original table");
        crate::migrate::migrate(&client).await.expect("migrate the original table");
        client.batch_execute(variant.alter()).await.expect("change the table");
    } else {
        create(&client, variant, 30, 10).await.expect("the variant's table");
    }
    let snapshot = Snapshot::take(&client).await.expect("snapshot");
    (db, client, snapshot)
}
