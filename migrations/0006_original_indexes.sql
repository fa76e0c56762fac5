-- hook-events: no-transaction
-- The original DDL's three indexes, for a table that was made without them (migration 0001
-- builds them only with a new table). `hook-processor stats` and the original's queries rely on
-- them. Built CONCURRENTLY, so producers and processors keep writing while they build on a large
-- table. A table that has them (the usual case) is not changed: IF NOT EXISTS finds them by name.
-- An interrupted build leaves an invalid index of that name, which the first statement drops (a
-- catalog change, under the runner's lock_timeout) so that the re-run builds it again.
DO $$
DECLARE
    invalid text;
BEGIN
    FOR invalid IN
        SELECT c.relname FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indexrelid
        WHERE i.indrelid = 'hook_events'::regclass AND NOT i.indisvalid
          AND c.relname IN ('idx_hook_events_processed', 'idx_hook_events_source_action', 'idx_hook_events_retry')
    LOOP
        EXECUTE format('DROP INDEX %I', invalid);
    END LOOP;
END
$$;
CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_hook_events_processed ON hook_events (processed, created_at DESC) WHERE NOT processed;
CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_hook_events_source_action ON hook_events (source, action);
CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_hook_events_retry ON hook_events (retry_count, created_at) WHERE retry_count > 0;
