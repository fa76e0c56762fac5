-- hook-events: no-transaction
-- The failures the console's overview and `hook-processor stats` count (the queue's dead and
-- retrying events, the failing routes, the share of processed events that needed retries), read
-- from two small indexes alone (index-only scans) instead of from the heap rows of every event
-- that ever failed. Both hold only failed rows, so an event that succeeds at its first attempt
-- (nearly all of them) never writes an entry: only failed attempts, deaths and successes after a
-- failure pay. The columns the counts need are carried in the entries (INCLUDE); `id` finds the
-- one row per route whose latest error is shown.
--
-- Built CONCURRENTLY so producers and processors keep writing while they build on a large table;
-- that cannot run in a transaction, so this file runs statement by statement. An interrupted
-- build leaves an invalid index, which the DROP before it removes on the re-run.
--
-- Dead events by when they died: how many are dead, how many died in a window, and by route.
DROP INDEX CONCURRENTLY IF EXISTS hook_events_dead_idx;
CREATE INDEX CONCURRENTLY hook_events_dead_idx ON hook_events (dead_at)
    INCLUDE (source, action, retry_count, id)
    WHERE dead_at IS NOT NULL AND NOT processed;
-- Events alive after a failed attempt: retrying ones (processed false) and those processed after
-- all, by when (processed true, processed_at): how many are retrying, how many of a window's
-- processed events needed retries, and by route with their latest activity.
DROP INDEX CONCURRENTLY IF EXISTS hook_events_retried_idx;
CREATE INDEX CONCURRENTLY hook_events_retried_idx ON hook_events (processed, processed_at)
    INCLUDE (source, action, retry_count, next_attempt_at, created_at, id)
    WHERE retry_count > 0 AND dead_at IS NULL;
