-- The original service's table, exactly as its DDL, created only when there is no hook_events
-- yet; then its indexes are built at once, on the empty table. An existing table and its rows are
-- left alone, without taking a lock on it: if it lacks the original's indexes, migration 0006
-- builds them concurrently. (The first release of this file ran the DDL with IF NOT EXISTS,
-- which locks an existing table and builds a missing index under that lock; see
-- migrations/history/.)
DO $$
BEGIN
    IF to_regclass('hook_events') IS NULL THEN
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
    END IF;
END
$$;
