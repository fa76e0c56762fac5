-- The original service's table, exactly as its DDL, created only when it does not exist yet.
-- An existing table and its rows are left alone.
CREATE TABLE IF NOT EXISTS hook_events (
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

CREATE INDEX IF NOT EXISTS idx_hook_events_processed ON hook_events (processed, created_at DESC) WHERE NOT processed;
CREATE INDEX IF NOT EXISTS idx_hook_events_source_action ON hook_events (source, action);
CREATE INDEX IF NOT EXISTS idx_hook_events_retry ON hook_events (retry_count, created_at) WHERE retry_count > 0;
