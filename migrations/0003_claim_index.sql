-- hook-events: no-transaction
-- The claim index: live, unprocessed events in age order. Dead events are left out, so a pile of
-- them never slows a claim. Built CONCURRENTLY so producers keep inserting while it builds on a
-- large table; that cannot run in a transaction, so this file runs statement by statement. If a
-- build is interrupted it leaves an invalid index, which the DROP below removes on the re-run.
DROP INDEX CONCURRENTLY IF EXISTS hook_events_claim_idx;
CREATE INDEX CONCURRENTLY hook_events_claim_idx ON hook_events (created_at) WHERE NOT processed AND dead_at IS NULL;
