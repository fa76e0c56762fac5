-- Least-privilege roles for hook-events. Run as a superuser (or the database owner) AFTER the
-- migrations have been applied by the owning role, and again after upgrades that add tables.
-- Idempotent. Sets no passwords: give each login role one with psql's \password, or use peer or
-- certificate authentication (see docs/security.md).
--
--   hook_owner        owns the tables and runs migrations (hook-processor's first start, or any
--                     start after an upgrade); not needed by the running processor
--   hook_processor    the running processor: reads events, marks outcomes; cannot insert,
--                     delete, or change payloads
--   hook_producer     hooks and other producers (hook-ingest): inserts events only
--   hook_maintenance  hook-replay and hook-archive: re-queues, moves and purges events

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'hook_owner') THEN
        CREATE ROLE hook_owner LOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'hook_processor') THEN
        CREATE ROLE hook_processor LOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'hook_producer') THEN
        CREATE ROLE hook_producer LOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'hook_maintenance') THEN
        CREATE ROLE hook_maintenance LOGIN;
    END IF;
END
$$;

DO $$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO hook_processor, hook_producer, hook_maintenance',
                   current_database());
END
$$;
GRANT USAGE ON SCHEMA public TO hook_processor, hook_producer, hook_maintenance;
-- The owner creates the tables (PostgreSQL 15 grants CREATE on public to nobody by default).
GRANT USAGE, CREATE ON SCHEMA public TO hook_owner;

-- The processor: claim (SELECT ... FOR UPDATE needs UPDATE on some column) and record outcomes.
-- Only the bookkeeping columns may change; payload, metadata, ids and times may not.
GRANT SELECT ON hook_events TO hook_processor;
GRANT UPDATE (processed, processed_at, retry_count, processing_errors,
              result_metadata, next_attempt_at, dead_at)
    ON hook_events TO hook_processor;
-- The claim ledger (migration 0009): the processor records, deletes and recovers its claims;
-- and the processors' presence (migration 0012): it registers itself, and strikes off those gone.
DO $$
BEGIN
    IF to_regclass('hook_events_claims') IS NOT NULL THEN
        GRANT SELECT, INSERT, UPDATE, DELETE ON hook_events_claims TO hook_processor;
    END IF;
    IF to_regclass('hook_events_processors') IS NOT NULL THEN
        GRANT SELECT, INSERT, DELETE ON hook_events_processors TO hook_processor;
    END IF;
END
$$;
-- The processor's vacuum task (HOOK_VACUUM_DEAD_TUPLES, docs/operations.md): VACUUM needs the
-- table's owner, or on PostgreSQL 17 and later the MAINTAIN privilege (VACUUM, ANALYZE, CLUSTER,
-- REINDEX, LOCK TABLE: no read or write of rows beyond the grants above; LOCK TABLE could stop
-- producers, as the processor's row locks could not). Before 17 the processor logs once that it
-- may not vacuum, and autovacuum alone does it.
DO $$
BEGIN
    IF current_setting('server_version_num')::int >= 170000 THEN
        EXECUTE 'GRANT MAINTAIN ON hook_events TO hook_processor';
    END IF;
END
$$;
-- Start-up checks that every migration is applied, without applying any.
GRANT SELECT ON hook_events_migrations TO hook_processor, hook_maintenance;

-- Producers: insert; SELECT (id) lets hook-ingest's INSERT ... ON CONFLICT (id) DO NOTHING
-- deduplicate a flushed spool.
GRANT INSERT ON hook_events TO hook_producer;
GRANT SELECT (id) ON hook_events TO hook_producer;

-- Maintenance: replay (UPDATE), archive (DELETE here, INSERT there), retention (DELETE there).
GRANT SELECT, UPDATE, DELETE ON hook_events TO hook_maintenance;
DO $$
BEGIN
    IF to_regclass('hook_events_archive') IS NOT NULL THEN
        GRANT SELECT, INSERT, DELETE ON hook_events_archive TO hook_maintenance;
    END IF;
END
$$;

-- Nobody but the owner may create objects in the schema.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
