-- What the processor needs beyond the original table. Every change is additive and cheap on a
-- table with millions of rows: nullable columns without defaults (no rewrite) and triggers.
-- lock_timeout keeps the brief ACCESS EXCLUSIVE lock of ADD COLUMN from queueing behind a long
-- transaction and stalling producers; the migration fails instead and can simply be re-run.
SET LOCAL lock_timeout = '10s';

-- The handler's result metadata of the last attempt (the original threw it away).
ALTER TABLE hook_events ADD COLUMN IF NOT EXISTS result_metadata JSONB;
-- When a failed event may be tried again; NULL means now.
ALTER TABLE hook_events ADD COLUMN IF NOT EXISTS next_attempt_at TIMESTAMPTZ;
-- When the event reached the retry limit; NULL while it is alive. Dead events stay unprocessed,
-- as in the original, but are no longer silently stranded: they are marked and queryable.
ALTER TABLE hook_events ADD COLUMN IF NOT EXISTS dead_at TIMESTAMPTZ;

-- The original's "Reset Failed Events" SQL sets retry_count = 0 (and processing_errors = NULL).
-- It must keep meaning "make these events eligible again": lowering retry_count clears the dead
-- mark and the retry schedule. The trigger fires only for UPDATEs that name retry_count.
CREATE OR REPLACE FUNCTION hook_events_revive() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.dead_at := NULL;
    NEW.next_attempt_at := NULL;
    RETURN NEW;
END
$$;
DROP TRIGGER IF EXISTS hook_events_revive ON hook_events;
CREATE TRIGGER hook_events_revive
    BEFORE UPDATE OF retry_count ON hook_events
    FOR EACH ROW WHEN (NEW.retry_count < OLD.retry_count)
    EXECUTE FUNCTION hook_events_revive();

-- Wake idle processors when events are inserted. One NOTIFY per INSERT statement (not per row),
-- and PostgreSQL folds identical notifications of one transaction into one, so a bulk load of
-- 100,000 rows sends a single notification. A producer that wants no NOTIFY at all (a bulk
-- loader) runs `SET hook_events.notify = off`; processors then find its rows by polling.
CREATE OR REPLACE FUNCTION hook_events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('hook_events.notify', true), '') <> 'off' THEN
        PERFORM pg_notify('hook_events', '');
    END IF;
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS hook_events_notify ON hook_events;
CREATE TRIGGER hook_events_notify
    AFTER INSERT ON hook_events
    FOR EACH STATEMENT
    EXECUTE FUNCTION hook_events_notify();
