-- hook-events: no-transaction
-- What the web console (hook-console) reads of the events that ever failed. Built CONCURRENTLY
-- so producers and processors keep writing while it builds; that cannot run in a transaction, so
-- this file runs statement by statement. An interrupted build leaves an invalid index, which the
-- DROP before it removes on the re-run.
--
-- The console's two other indexes, `hook_events_created_idx` (every event by age) and
-- `hook_events_session_idx` (an agent session's events), were built here until this text
-- replaced the first one (kept in migrations/history/0010_console_indexes.v1.sql; an install
-- that applied it keeps them). They hold an entry for every row version of every event, two
-- per processed event, which a queue that never shows a console should not write and vacuum:
-- they are now built by whoever serves the console, when it starts (hook_store::indexes,
-- CONSOLE; ARCHITECTURE.md, "Indexes built by their users").
--
-- Events that ever failed (an error recorded) or died, by age: the dead / failed filters and the
-- search in error texts read only these rows, however large the table is.
DROP INDEX CONCURRENTLY IF EXISTS hook_events_failed_idx;
CREATE INDEX CONCURRENTLY hook_events_failed_idx ON hook_events (created_at, id)
    WHERE processing_errors IS NOT NULL OR dead_at IS NOT NULL;
