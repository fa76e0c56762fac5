-- hook-events: no-transaction
-- The archive index: processed events by processed_at, so that hook-archive finds the oldest
-- processed events without scanning the table, and so that its batches stay short. Built
-- CONCURRENTLY so producers and processors keep writing while it builds on a large table; that
-- cannot run in a transaction, so this file runs statement by statement. An interrupted build
-- leaves an invalid index, which the DROP below removes on the re-run.
DROP INDEX CONCURRENTLY IF EXISTS hook_events_archive_idx;
CREATE INDEX CONCURRENTLY hook_events_archive_idx ON hook_events (processed_at) WHERE processed;
