-- hook-events: no-transaction
-- The primary key and the retention index of hook_events_archive, for an archive adopted by
-- migration 0007. An archive created by this project has both already, and each step below then
-- finds its work done without locking anything. Nothing here locks hook_events. The scans of the
-- archive run without a lock that stops hook-archive (the duplicate check reads; VALIDATE and the
-- index builds take SHARE UPDATE EXCLUSIVE); only the two catalog changes of step 4 take ACCESS
-- EXCLUSIVE on hook_events_archive, for milliseconds, under the runner's lock_timeout.
--
-- 1. An id held twice, or a row without an id, stops the migration with the query that finds
--    them; nothing is changed.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_constraint WHERE conrelid = 'hook_events_archive'::regclass AND contype = 'p'
    ) THEN
        IF EXISTS (SELECT 1 FROM hook_events_archive GROUP BY id HAVING count(*) > 1) THEN
            RAISE EXCEPTION 'hook_events_archive holds the same id more than once; remove the duplicates '
                'and start again (SELECT id FROM hook_events_archive GROUP BY id HAVING count(*) > 1)';
        END IF;
        IF EXISTS (SELECT 1 FROM hook_events_archive WHERE id IS NULL) THEN
            RAISE EXCEPTION 'hook_events_archive holds rows without an id; remove them and start again '
                '(SELECT * FROM hook_events_archive WHERE id IS NULL)';
        END IF;
    END IF;
END
$$;
-- 2. "id is never NULL" as a CHECK, added NOT VALID (a catalog change) and then validated by a
--    scan that lets writers go on, so that SET NOT NULL in step 4 needs no scan under its lock.
DO $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM pg_attribute
        WHERE attrelid = 'hook_events_archive'::regclass AND attname = 'id' AND NOT attnotnull
    ) AND NOT EXISTS (
        SELECT 1 FROM pg_constraint
        WHERE conrelid = 'hook_events_archive'::regclass AND conname = 'hook_events_archive_id_not_null'
    ) THEN
        ALTER TABLE hook_events_archive
            ADD CONSTRAINT hook_events_archive_id_not_null CHECK (id IS NOT NULL) NOT VALID;
    END IF;
END
$$;
DO $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM pg_constraint
        WHERE conrelid = 'hook_events_archive'::regclass AND conname = 'hook_events_archive_id_not_null'
          AND NOT convalidated
    ) THEN
        ALTER TABLE hook_events_archive VALIDATE CONSTRAINT hook_events_archive_id_not_null;
    END IF;
END
$$;
-- 3. The unique index behind the key, built concurrently (an interrupted build leaves an invalid
--    index of that name: dropped first, so that the re-run builds it again).
DO $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM pg_index WHERE indexrelid = to_regclass('hook_events_archive_pkey') AND NOT indisvalid
    ) THEN
        DROP INDEX hook_events_archive_pkey;
    END IF;
END
$$;
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS hook_events_archive_pkey ON hook_events_archive (id);
-- 4. The key from that index, and NOT NULL from the validated check: catalog changes.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_constraint WHERE conrelid = 'hook_events_archive'::regclass AND contype = 'p'
    ) THEN
        ALTER TABLE hook_events_archive ALTER COLUMN id SET NOT NULL;
        ALTER TABLE hook_events_archive
            ADD CONSTRAINT hook_events_archive_pkey PRIMARY KEY USING INDEX hook_events_archive_pkey;
    END IF;
    IF EXISTS (
        SELECT 1 FROM pg_constraint
        WHERE conrelid = 'hook_events_archive'::regclass AND conname = 'hook_events_archive_id_not_null'
    ) THEN
        ALTER TABLE hook_events_archive DROP CONSTRAINT hook_events_archive_id_not_null;
    END IF;
END
$$;
-- 5. Retention (hook-archive --purge-archive-older-than) deletes the oldest archived rows first.
DO $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM pg_index
        WHERE indexrelid = to_regclass('hook_events_archive_archived_at_idx') AND NOT indisvalid
    ) THEN
        DROP INDEX hook_events_archive_archived_at_idx;
    END IF;
END
$$;
CREATE INDEX CONCURRENTLY IF NOT EXISTS hook_events_archive_archived_at_idx ON hook_events_archive (archived_at);
