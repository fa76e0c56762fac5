-- hook-events: no-transaction
-- What the web console (hook-console) reads, each page through an index, on a table of millions
-- of rows. Built CONCURRENTLY so producers and processors keep writing while they build; that
-- cannot run in a transaction, so this file runs statement by statement. An interrupted build
-- leaves an invalid index, which the DROP before it removes on the re-run.
--
-- Every event by age, newest first with keyset paging on (created_at, id): the events list, its
-- time-range filter, the latest events that the sessions list starts from, and arrivals per minute.
DROP INDEX CONCURRENTLY IF EXISTS hook_events_created_idx;
CREATE INDEX CONCURRENTLY hook_events_created_idx ON hook_events (created_at, id);
-- Events that ever failed (an error recorded) or died, by age: the dead / failed filters and the
-- search in error texts read only these rows, however large the table is.
DROP INDEX CONCURRENTLY IF EXISTS hook_events_failed_idx;
CREATE INDEX CONCURRENTLY hook_events_failed_idx ON hook_events (created_at, id)
    WHERE processing_errors IS NOT NULL OR dead_at IS NOT NULL;
-- An agent session's events in order. The session is metadata.session_id (hook-ingest and the
-- original producers write it), else payload.session_id (Claude Code's own input), cut to 128
-- characters so that a hostile value can never exceed a btree entry's size and fail an insert.
DROP INDEX CONCURRENTLY IF EXISTS hook_events_session_idx;
CREATE INDEX CONCURRENTLY hook_events_session_idx
    ON hook_events ((left(coalesce(metadata->>'session_id', payload->>'session_id'), 128)), created_at, id)
    WHERE left(coalesce(metadata->>'session_id', payload->>'session_id'), 128) IS NOT NULL;
