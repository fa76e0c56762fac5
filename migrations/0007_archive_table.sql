-- The archive of hook-archive: processed events moved out of hook_events, with every column of
-- hook_events plus when the row was moved. Rows are never updated here, only inserted and (by
-- retention) deleted. Nothing here locks hook_events.
--
-- A new archive is created with its key (instant: it is empty). An archive the original's
-- archive SQL made (`CREATE TABLE hook_events_archive AS SELECT * FROM hook_events ...`: the
-- original's twelve columns, no key) is adopted: the missing columns are added, a catalog change
-- that holds ACCESS EXCLUSIVE on hook_events_archive for milliseconds whatever its size (rows
-- already there get the migration's time as archived_at: now() is evaluated once, so nothing is
-- rewritten). Its key and index are built concurrently by migration 0008.
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

ALTER TABLE hook_events_archive
    ADD COLUMN IF NOT EXISTS result_metadata JSONB,
    ADD COLUMN IF NOT EXISTS next_attempt_at TIMESTAMPTZ,
    ADD COLUMN IF NOT EXISTS dead_at TIMESTAMPTZ,
    ADD COLUMN IF NOT EXISTS replays JSONB,
    ADD COLUMN IF NOT EXISTS archived_at TIMESTAMPTZ NOT NULL DEFAULT now();
