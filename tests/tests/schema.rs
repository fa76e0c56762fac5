//! The schema check and the migrations on tables this build did not make: mismatched tables are
//! refused with nothing changed, a column's type never gets rows set aside, an install of the
//! first release upgrades to the same schema as a fresh one, and a migration waiting for a lock
//! never holds producers behind it.

use std::time::Duration;

use hook_core::{ClaimRequest, Store};
use hook_store::migrate::{self, MigrateOptions};
use hook_store::seed::{self, Snapshot, Variant};
use hook_store::testing::TestDb;
use hook_store::{StoreError, StoreOptions};
use hook_tests::{count, insert_events};
use tokio_postgres::Client;

fn no_listen() -> StoreOptions {
    StoreOptions { listen: false, ..StoreOptions::default() }
}

fn request() -> ClaimRequest {
    ClaimRequest {
        limit: 100,
        max_retry_count: 3,
        claim_timeout: Duration::from_secs(60),
        ..ClaimRequest::default()
    }
}

/// Asserts `error` is a schema mismatch whose message names `column` of `hook_events`.
fn assert_names(error: &StoreError, column: &str) {
    assert!(error.is_schema_mismatch(), "{error}");
    let text = error.to_string();
    assert!(text.contains(&format!("hook_events.{column} ")), "{text}");
    assert!(!text.contains('\n'), "one line: {text}");
}

#[tokio::test]
async fn migrations_refuse_a_mismatched_table_before_changing_anything() {
    for variant in Variant::MISMATCHED {
        let db = TestDb::empty(&format!("schema_refuse_{}", variant.column())).await;
        let client = db.client().await;
        seed::create(&client, variant, 30, 10).await.unwrap();
        let before = Snapshot::take(&client).await.unwrap();
        let error = migrate::migrate(&client).await.expect_err("a mismatched table is refused");
        assert_names(&error, variant.column());
        let changes = before.changes(&Snapshot::take(&client).await.unwrap());
        assert_eq!(changes, seed::Changes::default(), "{variant:?}");
    }
}

#[tokio::test]
async fn the_original_table_and_a_migrated_one_fit() {
    let db = TestDb::empty("schema_fits").await;
    let client = db.client().await;
    seed::create(&client, Variant::Original, 30, 10).await.unwrap();
    client.batch_execute(seed::ORIGINAL_ARCHIVE_SQL).await.unwrap();
    hook_store::schema::check(&client, hook_store::schema::Scope::MIGRATIONS).await.unwrap();
    let error = hook_store::schema::check(&client, hook_store::schema::Scope::ARCHIVE).await.unwrap_err();
    assert!(error.to_string().contains("hook_events.dead_at is missing"), "{error}");
    migrate::migrate(&client).await.unwrap();
    hook_store::schema::check(&client, hook_store::schema::Scope::ARCHIVE).await.unwrap();
    // Extra columns of the user's own are fine when nullable or defaulted.
    client
        .batch_execute(
            "ALTER TABLE hook_events ADD COLUMN note text, ADD COLUMN tenant text NOT NULL DEFAULT 'a', \
             ADD COLUMN seq bigint GENERATED ALWAYS AS IDENTITY",
        )
        .await
        .unwrap();
    hook_store::schema::check(&client, hook_store::schema::Scope::ARCHIVE).await.unwrap();
}

/// A column changed after the migrations: the claim stops and names it, and no row is set aside
/// (each would decode no better than the next).
#[tokio::test]
async fn a_type_error_during_a_claim_stops_claiming_and_sets_nothing_aside() {
    for variant in [Variant::TimestampWithoutTimeZone, Variant::TextId] {
        let db = TestDb::migrated(&format!("schema_claim_{}", variant.column())).await;
        let client = db.client().await;
        insert_events(&client, 20, "PreToolUse", "tool_invocation").await;
        client.batch_execute(variant.alter()).await.unwrap();
        let before = Snapshot::take(&client).await.unwrap();
        let store = db.store(no_listen()).await;
        for _ in 0..3 {
            let error = store.claim(request()).await.err().expect("the claim fails");
            assert_names(&error, variant.column());
        }
        assert_eq!(before.changes(&Snapshot::take(&client).await.unwrap()), seed::Changes::default());
        assert_eq!(count(&client, "SELECT count(*) FROM hook_events WHERE dead_at IS NOT NULL").await, 0);
    }
}

/// A value of one row that cannot be decoded still sets that row aside, and only it.
#[tokio::test]
async fn an_undecodable_value_sets_only_its_row_aside() {
    let db = TestDb::migrated("schema_claim_value").await;
    let client = db.client().await;
    let ids = insert_events(&client, 5, "PreToolUse", "tool_invocation").await;
    client
        .execute("UPDATE hook_events SET created_at = '-infinity' WHERE id = $1", &[&ids[0]])
        .await
        .unwrap();
    let store = db.store(no_listen()).await;
    let mut batch = store.claim(request()).await.unwrap().expect("a batch");
    let events = hook_core::ClaimedBatch::take_events(&mut batch);
    assert_eq!(events.len(), 4);
    hook_core::ClaimedBatch::finish(batch, vec![]).await.unwrap();
    assert_eq!(count(&client, "SELECT count(*) FROM hook_events WHERE dead_at IS NOT NULL").await, 1);
}

/// The catalog of the tables: columns, indexes, constraints, triggers.
async fn catalog(client: &Client) -> Vec<String> {
    client
        .query(
            "SELECT 'column ' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod) \
                    || CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END \
                    || coalesce(' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid), '') \
             FROM pg_attribute AS a JOIN pg_class AS c ON c.oid = a.attrelid \
             LEFT JOIN pg_attrdef AS d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
             WHERE c.relname IN ('hook_events', 'hook_events_archive') AND a.attnum > 0 AND NOT a.attisdropped \
             UNION ALL \
             SELECT 'index ' || indexrelid::regclass::text || ' ' || pg_get_indexdef(indexrelid) || ' valid=' || indisvalid \
             FROM pg_index WHERE indrelid IN ('hook_events'::regclass, 'hook_events_archive'::regclass) \
             UNION ALL \
             SELECT 'constraint ' || conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid) \
             FROM pg_constraint WHERE conrelid IN ('hook_events'::regclass, 'hook_events_archive'::regclass) \
             UNION ALL \
             SELECT 'trigger ' || tgname || ' ' || pg_get_triggerdef(oid) FROM pg_trigger \
             WHERE tgrelid = 'hook_events'::regclass AND NOT tgisinternal \
             ORDER BY 1",
            &[],
        )
        .await
        .expect("the catalog query")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test]
async fn an_install_of_the_first_release_upgrades_to_the_schema_of_a_fresh_one() {
    // Fresh, on an empty database and on the original's table with an archive made by its SQL.
    for with_seed in [false, true] {
        let fresh = TestDb::empty(&format!("schema_fresh_{with_seed}")).await;
        let upgraded = TestDb::empty(&format!("schema_upgraded_{with_seed}")).await;
        let (a, b) = (fresh.client().await, upgraded.client().await);
        if with_seed {
            for client in [&a, &b] {
                seed::create(client, Variant::Original, 30, 10).await.unwrap();
                client.batch_execute(seed::ORIGINAL_ARCHIVE_SQL).await.unwrap();
            }
        }
        let report = migrate::migrate(&a).await.unwrap();
        assert_eq!(report.applied.len(), migrate::MIGRATIONS.len());

        // The first release applied its own texts (and recorded their checksums).
        let options = MigrateOptions::default();
        let old = migrate::migrate_these(&b, &migrate::first_released(5), &options).await.unwrap();
        assert_eq!(old.applied, [1, 2, 3, 4, 5]);
        let report = migrate::migrate(&b).await.expect("the old checksums are accepted");
        assert_eq!(report.applied, since(6), "only the new migrations run");
        assert_eq!(catalog(&a).await, catalog(&b).await, "with_seed={with_seed}");
        assert!(migrate::migrate(&b).await.unwrap().applied.is_empty());
        if with_seed {
            assert_eq!(count(&b, "SELECT count(*) FROM hook_events_archive").await, 10);
            assert_eq!(
                count(&a, "SELECT count(*) FROM hook_events_archive WHERE archived_at IS NOT NULL").await,
                10
            );
        }
    }
}

#[tokio::test]
async fn an_original_archive_with_duplicate_ids_is_refused_clearly_and_left_alone() {
    let db = TestDb::empty("schema_archive_duplicates").await;
    let client = db.client().await;
    seed::create(&client, Variant::Original, 5, 5).await.unwrap();
    client.batch_execute(seed::ORIGINAL_ARCHIVE_SQL).await.unwrap();
    client
        .batch_execute("INSERT INTO hook_events_archive SELECT * FROM hook_events_archive LIMIT 1")
        .await
        .unwrap();
    let error = migrate::migrate(&client).await.expect_err("duplicates are refused").to_string();
    assert!(error.contains("migration 8") && error.contains("same id more than once"), "{error}");
    assert_eq!(count(&client, "SELECT count(*) FROM hook_events_archive").await, 6);
    assert_eq!(
        count(&client, "SELECT count(*) FROM pg_indexes WHERE tablename = 'hook_events_archive'").await,
        0,
        "no index was left behind"
    );
    // Fixed, the next run goes on from there.
    client
        .batch_execute(
            "DELETE FROM hook_events_archive a USING hook_events_archive b WHERE a.id = b.id AND a.ctid > b.ctid",
        )
        .await
        .unwrap();
    assert_eq!(migrate::migrate(&client).await.unwrap().applied, since(8));
    let key = count(
        &client,
        "SELECT count(*) FROM pg_constraint WHERE conrelid = 'hook_events_archive'::regclass AND contype = 'p'",
    )
    .await;
    assert_eq!(key, 1);
}

/// A session that keeps a transaction open on `hook_events` (a slow report, a stuck client):
/// the migration's ALTER TABLE must not wait for it with producers queued behind.
async fn hold_table(db: &TestDb) -> Client {
    let blocker = db.client().await;
    blocker.batch_execute("BEGIN; SELECT count(*) FROM hook_events").await.expect("hold the table");
    blocker
}

/// One insert, as a producer does it.
async fn produce(client: &Client, n: i32) {
    client
        .execute(
            "INSERT INTO hook_events (id, source, action, resource, resource_id) \
             VALUES (gen_random_uuid(), 'Stop', 'session_stopped', 'session', $1)",
            &[&format!("p{n}")],
        )
        .await
        .expect("a producer's insert");
}

#[tokio::test]
async fn a_migration_waiting_for_a_lock_lets_producers_insert_and_retries() {
    let db = TestDb::empty("schema_lock_retry").await;
    let client = db.client().await;
    seed::create(&client, Variant::Original, 10, 0).await.unwrap();
    let blocker = hold_table(&db).await;
    let migrator = db.client().await;
    let migrating = tokio::spawn(async move { migrate::migrate(&migrator).await });
    // Wait until the migration has met the lock at least once.
    hook_tests::wait_for_count(
        &client,
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
         AND query LIKE '%ADD COLUMN IF NOT EXISTS result_metadata%'",
        1,
        Duration::from_secs(30),
    )
    .await;
    // Producers go on while the blocker still holds the table and the migration keeps trying:
    // each insert is at most one lock_timeout behind it, never behind the blocker.
    let producer = db.client().await;
    for n in 0..30 {
        tokio::time::timeout(Duration::from_secs(20), produce(&producer, n))
            .await
            .expect("an insert was held behind the waiting migration");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!migrating.is_finished(), "the migration waits for the blocker");
    blocker.batch_execute("COMMIT").await.unwrap();
    let report = migrating.await.unwrap().expect("the migration gets the lock after the blocker ends");
    let waited: Vec<(i32, u32)> =
        report.details.iter().filter(|a| a.lock_timeouts > 0).map(|a| (a.version, a.lock_timeouts)).collect();
    assert!(waited.first().is_some_and(|&(version, _)| version == 2), "{:?}", report.details);
    assert_eq!(count(&client, "SELECT count(*) FROM hook_events WHERE resource_id LIKE 'p%'").await, 30);
}

#[tokio::test]
async fn a_lock_that_never_comes_free_fails_the_migration_with_nothing_applied() {
    let db = TestDb::empty("schema_lock_gives_up").await;
    let client = db.client().await;
    seed::create(&client, Variant::Original, 10, 0).await.unwrap();
    let blocker = hold_table(&db).await;
    let options = MigrateOptions {
        lock_timeout: Duration::from_millis(50),
        retry_for: Duration::from_secs(1),
        ..MigrateOptions::default()
    };
    let error = migrate::migrate_with(&client, &options).await.expect_err("gives up").to_string();
    assert!(error.starts_with("migration 2 (0002_processor_columns.sql): ERROR: "), "{error}");
    assert!(error.contains("lock timeout") && error.contains("long transaction"), "{error}");
    assert!(error.contains("nothing of it was applied"), "{error}");
    assert_eq!(count(&client, "SELECT count(*) FROM hook_events_migrations WHERE version >= 2").await, 0);
    let columns = count(
        &client,
        "SELECT count(*) FROM pg_attribute WHERE attrelid = 'hook_events'::regclass AND attname = 'dead_at'",
    )
    .await;
    assert_eq!(columns, 0);
    blocker.batch_execute("COMMIT").await.unwrap();
    assert_eq!(migrate::migrate(&client).await.unwrap().applied, since(2));
}

/// The one-statement archive SQL that docs/compatibility.md and docs/maintenance.md give in place
/// of the original's snippet.
fn documented_archive_sql(doc: &str) -> String {
    doc.lines()
        .map(|line| line.trim_start_matches('>').trim())
        .find(|line| line.starts_with("WITH moved AS (DELETE FROM hook_events"))
        .expect("the one-statement archive SQL")
        .to_owned()
}

#[tokio::test]
async fn the_documented_archive_statement_moves_old_processed_rows_and_nothing_else() {
    let sql = documented_archive_sql(include_str!("../../docs/compatibility.md"));
    assert_eq!(
        sql,
        documented_archive_sql(include_str!("../../docs/maintenance.md")),
        "both pages give the same"
    );
    let db = TestDb::empty("schema_documented_archive").await;
    let client = db.client().await;
    seed::create(&client, Variant::Original, 30, 10).await.unwrap();
    client.batch_execute(seed::ORIGINAL_ARCHIVE_SQL).await.unwrap();
    migrate::migrate(&client).await.unwrap();
    seed::insert_rows(&client, Variant::Original, 5, true).await.unwrap();
    // One of the new old rows was archived already (a producer re-sent it): it stays put.
    client
        .batch_execute(
            "INSERT INTO hook_events_archive (id, source, action, resource, resource_id, payload, metadata, processed, \
                                              retry_count, created_at) \
             SELECT id, source, action, resource, resource_id, payload, metadata, processed, retry_count, created_at \
             FROM hook_events WHERE processed_at < now() - interval '30 days' LIMIT 1",
        )
        .await
        .unwrap();
    let expected: Vec<String> = client
        .query(
            "SELECT (to_jsonb(e) - 'archived_at')::text FROM hook_events AS e \
             WHERE processed_at < now() - interval '30 days' \
               AND id NOT IN (SELECT id FROM hook_events_archive) ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(expected.len(), 4);
    let before = count(&client, "SELECT count(*) FROM hook_events").await;
    client.batch_execute(&sql).await.expect("the documented statement runs");
    assert_eq!(count(&client, "SELECT count(*) FROM hook_events").await, before - 4, "only the four moved");
    let moved: Vec<String> = client
        .query(
            "SELECT (to_jsonb(a) - 'archived_at')::text FROM hook_events_archive AS a \
             WHERE archived_at > now() - interval '1 minute' AND id NOT IN (SELECT id FROM hook_events) ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let moved: Vec<String> = moved.into_iter().filter(|row| expected.contains(row)).collect();
    assert_eq!(moved, expected, "every column copied as it was");
    assert_eq!(
        count(&client, "SELECT count(*) FROM hook_events WHERE processed_at < now() - interval '30 days'")
            .await,
        1
    );
    // Run again: nothing left to move, nothing fails.
    client.batch_execute(&sql).await.unwrap();
    assert_eq!(count(&client, "SELECT count(*) FROM hook_events").await, before - 4);
}

/// The versions of this build's migrations from `first` on.
fn since(first: i32) -> Vec<i32> {
    migrate::MIGRATIONS.iter().map(|m| m.version).filter(|v| *v >= first).collect()
}
