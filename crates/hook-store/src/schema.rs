//! The schema check: does the operator's `hook_events` (and `hook_events_archive`) fit what this
//! build reads and writes?
//!
//! hook-events adopts a table it did not create (the original service's, or one a user made by
//! hand), so it cannot assume the table is the original DDL. A column of another type is not a
//! problem of one row: `created_at TIMESTAMP` (without time zone) fails the decoding of *every*
//! row, so a processor that met it row by row would set the whole table aside as dead; `id TEXT`
//! would fail every claim; a NOT NULL column of the user's own without a default fails every
//! insert. So the binaries read the catalog first ([`check`]) and refuse, before they change
//! anything, with one error naming every column that does not fit, what it is, what is needed,
//! and the `ALTER TABLE` that fixes it where there is one.
//!
//! What is compared, for every column the project reads or writes: the type (the Rust decoders
//! accept exactly one PostgreSQL type per column; `VARCHAR(n)` columns may be `text` or longer),
//! the nullability (NOT NULL where the decoder cannot take NULL; nullable where hook-events
//! writes NULL), and the defaults the inserts rely on (`processed DEFAULT false`, `retry_count
//! DEFAULT 0`, the archive's `archived_at`). Columns the project does not know are fine if they
//! are nullable or have a default; a NOT NULL one without a default is named, since every insert
//! would fail on it. `id` must carry a primary key or a unique index (`ON CONFLICT (id)`).
//!
//! The check reads only `pg_catalog` (no privilege needed beyond connecting), resolves the
//! tables by `search_path` as the queries do, and takes no lock.
//!
//! Before the migrations ([`Scope::MIGRATIONS`], which [`migrate`](crate::migrate::migrate) runs
//! itself when something is pending) a missing table or a missing column that a migration adds
//! is fine, but one that exists must already fit: the migrations' `ADD COLUMN IF NOT EXISTS`
//! would leave a wrong one in place. After them ([`Scope::QUEUE`], [`Scope::ARCHIVE`]) everything
//! must be there.
//!
//! During a claim, a decode error caused by a column's type ([`type_mismatch`]) stops the claim
//! with the same error instead of setting the row aside: only a value of that one row (a NULL, a
//! JSON document nested too deep, a timestamp of `infinity`) is a reason to set a row aside.

use std::fmt;

use tokio_postgres::{Client, Row};

use crate::error::StoreError;

/// The events table.
pub const EVENTS: &str = "hook_events";
/// The archive table of `hook-archive`.
pub const ARCHIVE: &str = "hook_events_archive";

/// What the caller is about to do, which decides what [`check`] requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scope {
    /// Every migration is applied: the tables and the columns the migrations add must exist.
    /// When false (before migrating, or a producer that never migrates), a missing table or a
    /// missing migration-added column is fine, but whatever exists must fit.
    pub migrated: bool,
    /// Whether `hook_events_archive` is checked too.
    pub archive: bool,
}

impl Scope {
    /// Before the migrations run: both tables, as far as they exist.
    pub const MIGRATIONS: Scope = Scope { migrated: false, archive: true };
    /// A producer (`hook-ingest`): `hook_events` as far as it exists; it never migrates.
    pub const PRODUCER: Scope = Scope { migrated: false, archive: false };
    /// The processor, `hook-replay` and `hook-processor stats`: the migrated `hook_events`.
    pub const QUEUE: Scope = Scope { migrated: true, archive: false };
    /// `hook-archive`: the migrated `hook_events` and `hook_events_archive`.
    pub const ARCHIVE: Scope = Scope { migrated: true, archive: true };
}

/// The type a column must have, as the decoders and the SQL of this crate use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Uuid,
    /// `VARCHAR(255)` in the original; `text` or a longer `varchar` work as well.
    Text,
    Jsonb,
    Bool,
    TextArray,
    Int4,
    Timestamptz,
}

impl Kind {
    /// Whether a column of type `typname` (`pg_type.typname`) with `typmod` fits. `typmod` is
    /// -1 when unknown (a result column), which skips the length check.
    fn accepts(self, typname: &str, typmod: i32) -> bool {
        match self {
            Kind::Uuid => typname == "uuid",
            Kind::Text => typname == "text" || (typname == "varchar" && (typmod < 0 || typmod - 4 >= 255)),
            Kind::Jsonb => typname == "jsonb",
            Kind::Bool => typname == "bool",
            // The decoder takes either; array_append(varchar[], text) assigns back.
            Kind::TextArray => typname == "_text" || typname == "_varchar",
            Kind::Int4 => typname == "int4",
            Kind::Timestamptz => typname == "timestamptz",
        }
    }

    /// The type in an `ALTER TABLE`.
    fn sql(self) -> &'static str {
        match self {
            Kind::Uuid => "uuid",
            Kind::Text => "varchar(255)",
            Kind::Jsonb => "jsonb",
            Kind::Bool => "boolean",
            Kind::TextArray => "text[]",
            Kind::Int4 => "integer",
            Kind::Timestamptz => "timestamptz",
        }
    }

    /// The type as a person reads it (`format_type`'s spelling).
    fn describe(self) -> &'static str {
        match self {
            Kind::Uuid => "uuid",
            Kind::Text => "character varying(255) or text",
            Kind::Jsonb => "jsonb",
            Kind::Bool => "boolean",
            Kind::TextArray => "text[]",
            Kind::Int4 => "integer",
            Kind::Timestamptz => "timestamp with time zone",
        }
    }
}

/// Whether a column may, or must, hold NULL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Nulls {
    /// NOT NULL: the decoder cannot take NULL.
    Refused,
    /// Nullable: hook-events writes NULL into it.
    Allowed,
    /// Either.
    Any,
}

/// The default a column needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Needs {
    /// None: every insert names the column, or NULL is fine.
    Nothing,
    /// Exactly this default (`pg_get_expr`'s text): inserts leave the column out.
    Default(&'static str),
    /// Some default: inserts leave the column out, any value will do.
    AnyDefault,
}

/// One column hook-events reads or writes.
#[derive(Debug, Clone, Copy)]
struct Column {
    name: &'static str,
    kind: Kind,
    nulls: Nulls,
    default: Needs,
    /// Added by the migrations (not in the original DDL): may be missing before them.
    migration: bool,
    /// A definition for `ADD COLUMN` when the column is missing, if one is safe.
    add: Option<&'static str>,
}

const fn col(name: &'static str, kind: Kind, nulls: Nulls) -> Column {
    Column { name, kind, nulls, default: Needs::Nothing, migration: false, add: None }
}

const fn added(name: &'static str, kind: Kind, add: &'static str) -> Column {
    Column { name, kind, nulls: Nulls::Allowed, default: Needs::Nothing, migration: true, add: Some(add) }
}

/// `hook_events`: the original's twelve columns, then the migrations' four.
const EVENT_COLUMNS: &[Column] = &[
    col("id", Kind::Uuid, Nulls::Refused),
    col("source", Kind::Text, Nulls::Refused),
    col("action", Kind::Text, Nulls::Refused),
    col("resource", Kind::Text, Nulls::Refused),
    col("resource_id", Kind::Text, Nulls::Refused),
    Column { add: Some("jsonb NOT NULL DEFAULT '{}'"), ..col("payload", Kind::Jsonb, Nulls::Refused) },
    Column { add: Some("jsonb NOT NULL DEFAULT '{}'"), ..col("metadata", Kind::Jsonb, Nulls::Refused) },
    Column {
        default: Needs::Default("false"),
        add: Some("boolean NOT NULL DEFAULT false"),
        ..col("processed", Kind::Bool, Nulls::Refused)
    },
    Column { add: Some("text[]"), ..col("processing_errors", Kind::TextArray, Nulls::Allowed) },
    Column {
        default: Needs::Default("0"),
        add: Some("integer NOT NULL DEFAULT 0"),
        ..col("retry_count", Kind::Int4, Nulls::Refused)
    },
    Column {
        add: Some("timestamptz NOT NULL DEFAULT now()"),
        ..col("created_at", Kind::Timestamptz, Nulls::Refused)
    },
    Column { add: Some("timestamptz"), ..col("processed_at", Kind::Timestamptz, Nulls::Allowed) },
    added("result_metadata", Kind::Jsonb, "jsonb"),
    added("next_attempt_at", Kind::Timestamptz, "timestamptz"),
    added("dead_at", Kind::Timestamptz, "timestamptz"),
    added("replays", Kind::Jsonb, "jsonb"),
];

/// `hook_events_archive`: every column of `hook_events` with its type (rows are copied as they
/// are; whatever may be NULL there must be nullable here), plus `archived_at`, which inserts
/// leave to its default. A table made by the original's `CREATE TABLE ... AS` has the first
/// twelve, all nullable; the migrations add the rest.
fn archive_columns() -> Vec<Column> {
    let mut columns: Vec<Column> = EVENT_COLUMNS
        .iter()
        .enumerate()
        .map(|(i, c)| Column {
            nulls: if c.nulls == Nulls::Allowed { Nulls::Allowed } else { Nulls::Any },
            default: Needs::Nothing,
            migration: i >= 12,
            add: None,
            ..*c
        })
        .collect();
    columns.push(Column {
        name: "archived_at",
        kind: Kind::Timestamptz,
        nulls: Nulls::Any,
        default: Needs::AnyDefault,
        migration: true,
        add: None,
    });
    columns
}

/// One way a table differs from what this build needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The table.
    pub table: &'static str,
    /// The column (for a missing key: `id`).
    pub column: String,
    /// What it is: a type, `nullable`, `missing`, ...
    pub found: String,
    /// What this build needs instead.
    pub needed: String,
    /// The statement that fixes it, where one exists.
    pub fix: Option<String>,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{} is {}, needs {}", self.table, self.column, self.found, self.needed)?;
        if let Some(fix) = &self.fix {
            write!(f, " (fix: {fix})")?;
        }
        Ok(())
    }
}

/// Every [`Mismatch`] of a check: the tables do not fit this build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaMismatch {
    /// What does not fit, table by table, in column order.
    pub mismatches: Vec<Mismatch>,
}

impl fmt::Display for SchemaMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the tables do not fit this build of hook-events, so nothing was changed: ")?;
        for (i, mismatch) in self.mismatches.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{mismatch}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SchemaMismatch {}

/// One column as the catalog describes it.
#[derive(Debug, Clone)]
struct Found {
    name: String,
    typname: String,
    typmod: i32,
    shown: String,
    not_null: bool,
    default: Option<String>,
    /// An identity or generated column: it fills itself.
    fills_itself: bool,
}

const COLUMNS: &str =
    "SELECT a.attname::text, t.typname::text, a.atttypmod, format_type(a.atttypid, a.atttypmod), \
            a.attnotnull, pg_get_expr(d.adbin, d.adrelid), a.attidentity <> '' OR a.attgenerated <> '' \
     FROM pg_attribute AS a \
     JOIN pg_type AS t ON t.oid = a.atttypid \
     LEFT JOIN pg_attrdef AS d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
     WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped \
     ORDER BY a.attnum";

const EXISTS: &str = "SELECT to_regclass($1) IS NOT NULL";

/// A valid, non-partial unique index on exactly `(id)`: what `ON CONFLICT (id)` infers.
const ID_KEY: &str = "SELECT EXISTS ( \
         SELECT 1 FROM pg_index AS i \
         JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
         WHERE i.indrelid = to_regclass($1) AND i.indisunique AND i.indisvalid \
           AND i.indnkeyatts = 1 AND i.indpred IS NULL AND i.indexprs IS NULL AND a.attname = 'id')";

/// Compares the tables with what `scope` needs; `Err(StoreError::Schema)` names every column that
/// does not fit. Reads the catalog only.
pub async fn check(client: &Client, scope: Scope) -> Result<(), StoreError> {
    let mut mismatches = Vec::new();
    check_table(client, EVENTS, EVENT_COLUMNS, scope.migrated, &mut mismatches).await?;
    if scope.archive {
        check_table(client, ARCHIVE, &archive_columns(), scope.migrated, &mut mismatches).await?;
    }
    if mismatches.is_empty() {
        Ok(())
    } else {
        Err(StoreError::Schema(SchemaMismatch { mismatches }))
    }
}

async fn check_table(
    client: &Client,
    table: &'static str,
    needed: &[Column],
    migrated: bool,
    out: &mut Vec<Mismatch>,
) -> Result<(), StoreError> {
    let exists: bool = client.query_one(EXISTS, &[&table]).await?.try_get(0)?;
    if !exists {
        if migrated {
            out.push(Mismatch {
                table,
                column: "*".into(),
                found: "missing (no such table on the search_path)".into(),
                needed: "the table".into(),
                fix: Some("apply the migrations: start hook-processor once as the table's owner".into()),
            });
        }
        return Ok(());
    }
    let rows = client.query(COLUMNS, &[&table]).await?;
    let found = rows.iter().map(found_from_row).collect::<Result<Vec<_>, _>>()?;
    compare(table, needed, &found, migrated, out);
    let key_needed = table == EVENTS || migrated;
    if key_needed && found.iter().any(|f| f.name == "id") {
        let keyed: bool = client.query_one(ID_KEY, &[&table]).await?.try_get(0)?;
        if !keyed {
            out.push(Mismatch {
                table,
                column: "id".into(),
                found: "without a primary key or unique index".into(),
                needed: "a primary key (inserts skip an id already stored with ON CONFLICT (id))".into(),
                fix: Some(format!("ALTER TABLE {table} ADD PRIMARY KEY (id)")),
            });
        }
    }
    Ok(())
}

fn found_from_row(row: &Row) -> Result<Found, StoreError> {
    Ok(Found {
        name: row.try_get(0)?,
        typname: row.try_get(1)?,
        typmod: row.try_get(2)?,
        shown: row.try_get(3)?,
        not_null: row.try_get(4)?,
        default: row.try_get(5)?,
        fills_itself: row.try_get(6)?,
    })
}

/// The comparison itself, over what the catalog said.
fn compare(table: &'static str, needed: &[Column], found: &[Found], migrated: bool, out: &mut Vec<Mismatch>) {
    let mismatch = |column: &str, found: String, needed: String, fix: Option<String>| Mismatch {
        table,
        column: column.to_owned(),
        found,
        needed,
        fix,
    };
    for column in needed {
        let name = column.name;
        let Some(f) = found.iter().find(|f| f.name == name) else {
            if migrated || !column.migration {
                let fix = if column.migration {
                    Some("apply the migrations: start hook-processor once as the table's owner".to_owned())
                } else {
                    column.add.map(|definition| format!("ALTER TABLE {table} ADD COLUMN {name} {definition}"))
                };
                out.push(mismatch(name, "missing".into(), column.kind.describe().into(), fix));
            }
            continue;
        };
        if !column.kind.accepts(&f.typname, f.typmod) {
            let fix = retype(table, name, column.kind, &f.typname);
            out.push(mismatch(name, f.shown.clone(), column.kind.describe().into(), Some(fix)));
        }
        match (column.nulls, f.not_null) {
            (Nulls::Refused, false) => out.push(mismatch(
                name,
                "nullable".into(),
                "NOT NULL".into(),
                Some(format!("ALTER TABLE {table} ALTER COLUMN {name} SET NOT NULL")),
            )),
            (Nulls::Allowed, true) => out.push(mismatch(
                name,
                "NOT NULL".into(),
                "nullable (hook-events writes NULL into it)".into(),
                Some(format!("ALTER TABLE {table} ALTER COLUMN {name} DROP NOT NULL")),
            )),
            _ => {}
        }
        let has_default = f.default.is_some() || f.fills_itself;
        match column.default {
            Needs::Default(value) if f.default.as_deref() != Some(value) => out.push(mismatch(
                name,
                f.default.as_ref().map_or_else(|| "without a default".to_owned(), |d| format!("DEFAULT {d}")),
                format!("DEFAULT {value} (inserts leave it out)"),
                Some(format!("ALTER TABLE {table} ALTER COLUMN {name} SET DEFAULT {value}")),
            )),
            Needs::AnyDefault if !has_default => out.push(mismatch(
                name,
                "without a default".into(),
                "a default (inserts leave it out)".into(),
                Some(format!("ALTER TABLE {table} ALTER COLUMN {name} SET DEFAULT now()")),
            )),
            _ => {}
        }
    }
    for f in found {
        let known = needed.iter().any(|c| c.name == f.name);
        if !known && f.not_null && f.default.is_none() && !f.fills_itself {
            let name = &f.name;
            out.push(mismatch(
                name,
                format!("{} NOT NULL without a default, a column hook-events does not write", f.shown),
                "nullable or a default (every insert leaves it out)".into(),
                Some(format!(
                    "ALTER TABLE {table} ALTER COLUMN {name} DROP NOT NULL, or ALTER TABLE {table} ALTER \
                     COLUMN {name} SET DEFAULT <a value>"
                )),
            ));
        }
    }
}

/// The `ALTER TABLE` that gives column `name`, now of type `typname`, the type `kind`.
fn retype(table: &str, name: &str, kind: Kind, typname: &str) -> String {
    let to = kind.sql();
    if kind == Kind::Text && typname == "varchar" {
        // Lengthening a varchar changes the catalog only.
        format!("ALTER TABLE {table} ALTER COLUMN {name} TYPE {to}")
    } else {
        format!(
            "ALTER TABLE {table} ALTER COLUMN {name} TYPE {to} USING {name}::{to}, which rewrites the table \
             under an exclusive lock"
        )
    }
}

/// When `error` (from decoding `row`, a row of `hook_events` selected by the claim) comes from a
/// column's type rather than from this row's value, the mismatch of every claimed column whose
/// type does not fit: every row would fail the same way, so the claim must stop, not set the
/// row aside. `None` for an error of the value (a NULL, an unrepresentable value).
pub fn type_mismatch(row: &Row, error: &StoreError) -> Option<StoreError> {
    let StoreError::Db(error) = error else { return None };
    let source = std::error::Error::source(error)?;
    if !source.is::<tokio_postgres::types::WrongType>() {
        return None;
    }
    let mismatches: Vec<Mismatch> = row
        .columns()
        .iter()
        .filter_map(|c| {
            let column = EVENT_COLUMNS.iter().find(|n| n.name == c.name())?;
            let found = c.type_().name();
            (!column.kind.accepts(found, -1)).then(|| Mismatch {
                table: EVENTS,
                column: c.name().to_owned(),
                found: found.to_owned(),
                needed: column.kind.describe().to_owned(),
                fix: Some(retype(EVENTS, c.name(), column.kind, found)),
            })
        })
        .collect();
    let mismatches = if mismatches.is_empty() {
        // A type the list above accepts but the decoder did not: say what the driver said.
        vec![Mismatch {
            table: EVENTS,
            column: "?".into(),
            found: source.to_string(),
            needed: "the types of the original DDL".into(),
            fix: None,
        }]
    } else {
        mismatches
    };
    Some(StoreError::Schema(SchemaMismatch { mismatches }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(name: &str, typname: &str, shown: &str, not_null: bool, default: Option<&str>) -> Found {
        let typmod = if typname == "varchar" { 255 + 4 } else { -1 };
        Found {
            name: name.into(),
            typname: typname.into(),
            typmod,
            shown: shown.into(),
            not_null,
            default: default.map(Into::into),
            fills_itself: false,
        }
    }

    /// The original DDL as the catalog describes it.
    fn original() -> Vec<Found> {
        vec![
            found("id", "uuid", "uuid", true, None),
            found("source", "varchar", "character varying(255)", true, None),
            found("action", "varchar", "character varying(255)", true, None),
            found("resource", "varchar", "character varying(255)", true, None),
            found("resource_id", "varchar", "character varying(255)", true, None),
            found("payload", "jsonb", "jsonb", true, Some("'{}'::jsonb")),
            found("metadata", "jsonb", "jsonb", true, Some("'{}'::jsonb")),
            found("processed", "bool", "boolean", true, Some("false")),
            found("processing_errors", "_text", "text[]", false, None),
            found("retry_count", "int4", "integer", true, Some("0")),
            found("created_at", "timestamptz", "timestamp with time zone", true, Some("now()")),
            found("processed_at", "timestamptz", "timestamp with time zone", false, None),
        ]
    }

    fn check(found: &[Found], migrated: bool) -> Vec<Mismatch> {
        let mut out = Vec::new();
        compare(EVENTS, EVENT_COLUMNS, found, migrated, &mut out);
        out
    }

    #[test]
    fn the_original_ddl_fits_before_the_migrations_and_lacks_their_columns_after() {
        assert_eq!(check(&original(), false), []);
        let missing: Vec<String> = check(&original(), true).into_iter().map(|m| m.column).collect();
        assert_eq!(missing, ["result_metadata", "next_attempt_at", "dead_at", "replays"]);
    }

    #[test]
    fn each_difference_is_named_with_its_fix() {
        let mut table = original();
        table[10] = found("created_at", "timestamp", "timestamp without time zone", true, Some("now()"));
        table[0] = found("id", "text", "text", true, None);
        table[7].default = Some("true".into());
        table[2] = found("action", "varchar", "character varying(100)", true, None);
        table[2].typmod = 104;
        table.push(found("tenant", "text", "text", true, None));
        table.push(found("note", "text", "text", false, None));
        table.push(Found { fills_itself: true, ..found("seq", "int8", "bigint", true, None) });
        table.push(found("dead_at", "timestamptz", "timestamp with time zone", true, None));
        let text: Vec<String> = check(&table, false).iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "hook_events.id is text, needs uuid (fix: ALTER TABLE hook_events ALTER COLUMN id TYPE uuid \
                 USING id::uuid, which rewrites the table under an exclusive lock)",
                "hook_events.action is character varying(100), needs character varying(255) or text (fix: \
                 ALTER TABLE hook_events ALTER COLUMN action TYPE varchar(255))",
                "hook_events.processed is DEFAULT true, needs DEFAULT false (inserts leave it out) (fix: \
                 ALTER TABLE hook_events ALTER COLUMN processed SET DEFAULT false)",
                "hook_events.created_at is timestamp without time zone, needs timestamp with time zone (fix: \
                 ALTER TABLE hook_events ALTER COLUMN created_at TYPE timestamptz USING \
                 created_at::timestamptz, which rewrites the table under an exclusive lock)",
                "hook_events.dead_at is NOT NULL, needs nullable (hook-events writes NULL into it) (fix: \
                 ALTER TABLE hook_events ALTER COLUMN dead_at DROP NOT NULL)",
                "hook_events.tenant is text NOT NULL without a default, a column hook-events does not write, \
                 needs nullable or a default (every insert leaves it out) (fix: ALTER TABLE hook_events \
                 ALTER COLUMN tenant DROP NOT NULL, or ALTER TABLE hook_events ALTER COLUMN tenant SET \
                 DEFAULT <a value>)",
            ]
        );
    }

    #[test]
    fn a_missing_original_column_is_named_before_the_migrations_too() {
        let table: Vec<Found> =
            original().into_iter().filter(|f| f.name != "payload" && f.name != "source").collect();
        let text: Vec<String> = check(&table, false).iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "hook_events.source is missing, needs character varying(255) or text",
                "hook_events.payload is missing, needs jsonb (fix: ALTER TABLE hook_events ADD COLUMN payload \
                 jsonb NOT NULL DEFAULT '{}')",
            ]
        );
    }

    #[test]
    fn an_archive_made_by_create_table_as_fits_before_the_migrations() {
        // CREATE TABLE AS copies types but no NOT NULL and no default.
        let table: Vec<Found> =
            original().into_iter().map(|f| Found { not_null: false, default: None, ..f }).collect();
        let mut out = Vec::new();
        compare(ARCHIVE, &archive_columns(), &table, false, &mut out);
        assert_eq!(out, []);
        compare(ARCHIVE, &archive_columns(), &table, true, &mut out);
        let missing: Vec<&str> = out.iter().map(|m| m.column.as_str()).collect();
        assert_eq!(missing, ["result_metadata", "next_attempt_at", "dead_at", "replays", "archived_at"]);
    }
}
