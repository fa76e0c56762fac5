-- What hook-replay and hook-archive need. Additive and cheap on a table with millions of rows: one
-- nullable column without a default on hook_events (no rewrite), and a new table. lock_timeout
-- keeps the brief ACCESS EXCLUSIVE lock of ADD COLUMN from queueing behind a long transaction and
-- stalling producers; the migration fails instead and can simply be re-run.
SET LOCAL lock_timeout = '10s';

-- Every replay of the event, oldest first: a JSON array of
-- {"at", "previous_retry_count", "previous_errors_count", "previous_dead_at", "cleared_errors",
--  "processed_before"}. NULL when the event was never replayed.
ALTER TABLE hook_events ADD COLUMN IF NOT EXISTS replays JSONB;

-- Processed events moved out of hook_events by hook-archive: every column of hook_events, plus
-- when the row was moved. Rows are never updated here, only inserted and (by retention) deleted.
CREATE TABLE IF NOT EXISTS hook_events_archive (
    id UUID PRIMARY KEY,
    source VARCHAR(255) NOT NULL,
    action VARCHAR(255) NOT NULL,
    resource VARCHAR(255) NOT NULL,
    resource_id VARCHAR(255) NOT NULL,
    payload JSONB NOT NULL,
    metadata JSONB NOT NULL,
    processed BOOLEAN NOT NULL,
    processing_errors TEXT[],
    retry_count INTEGER NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    processed_at TIMESTAMPTZ,
    result_metadata JSONB,
    next_attempt_at TIMESTAMPTZ,
    dead_at TIMESTAMPTZ,
    replays JSONB,
    archived_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The original's archive SQL (`CREATE TABLE hook_events_archive AS SELECT * FROM hook_events ...`)
-- may have made this table already, with the original's twelve columns and no key. Adopt it: add
-- the missing columns (rows already there get the migration's time as archived_at: now() is
-- evaluated once, so this does not rewrite the table) and the primary key hook-archive relies on.
ALTER TABLE hook_events_archive
    ADD COLUMN IF NOT EXISTS result_metadata JSONB,
    ADD COLUMN IF NOT EXISTS next_attempt_at TIMESTAMPTZ,
    ADD COLUMN IF NOT EXISTS dead_at TIMESTAMPTZ,
    ADD COLUMN IF NOT EXISTS replays JSONB,
    ADD COLUMN IF NOT EXISTS archived_at TIMESTAMPTZ NOT NULL DEFAULT now();

DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_constraint
        WHERE conrelid = 'hook_events_archive'::regclass AND contype = 'p'
    ) THEN
        IF EXISTS (SELECT 1 FROM hook_events_archive GROUP BY id HAVING count(*) > 1) THEN
            RAISE EXCEPTION 'hook_events_archive holds the same id more than once; remove the duplicates '
                'and start again (SELECT id FROM hook_events_archive GROUP BY id HAVING count(*) > 1)';
        END IF;
        ALTER TABLE hook_events_archive ADD PRIMARY KEY (id);
    END IF;
END
$$;

-- Retention (hook-archive --purge-archive-older-than) deletes the oldest archived rows first.
CREATE INDEX IF NOT EXISTS hook_events_archive_archived_at_idx ON hook_events_archive (archived_at);
