-- hook-events: no-transaction
-- The claim's two indexes, which hold only rows a claim can take now or later, so that a claim
-- never walks rows it cannot take (see ARCHITECTURE.md, "What a claim reads"):
--   hook_events_fresh_idx  events never tried, or tried again at once (next_attempt_at NULL), in
--                          age order: the claim reads its head, from the processor's low-water
--                          mark on;
--   hook_events_due_idx    events waiting for a retry, by when it is due: the claim reads the
--                          range next_attempt_at <= now() and stops at the first that is not,
--                          however many are waiting.
-- hook_events_claim_idx (migration 0003) stays: the claim no longer reads it, but hook-console's
-- list of pending events does. Built CONCURRENTLY so producers and processors keep writing while
-- they build on a large table; that cannot run in a transaction, so this file runs statement by
-- statement. An interrupted build leaves an invalid index, which the DROP before it removes on
-- the re-run.
DROP INDEX CONCURRENTLY IF EXISTS hook_events_fresh_idx;
CREATE INDEX CONCURRENTLY hook_events_fresh_idx ON hook_events (created_at)
    WHERE NOT processed AND dead_at IS NULL AND next_attempt_at IS NULL;
DROP INDEX CONCURRENTLY IF EXISTS hook_events_due_idx;
CREATE INDEX CONCURRENTLY hook_events_due_idx ON hook_events (next_attempt_at)
    WHERE NOT processed AND dead_at IS NULL AND next_attempt_at IS NOT NULL;
