-- hook-events: no-transaction
-- Session order (docs/routes.md, "Session order"): the pending events of each agent session, in
-- order. A claim under `order = "session"` finds each session's head (its oldest event that is
-- neither processed nor dead) by stepping from one session to the next in this index (one probe
-- per pending session, not per pending event), and claims an ordered event only when it is its
-- session's head. Partial to pending rows, so a session's processed history costs nothing.
-- The session is the console's (migration 0010): metadata.session_id (what hook-ingest and the
-- original producers write), else payload.session_id (Claude Code's own input), cut to 128
-- characters so that a hostile value can never exceed a btree entry's size and fail an insert.
-- Built CONCURRENTLY so producers and processors keep writing while it builds on a large table;
-- that cannot run in a transaction, so this file runs statement by statement. An interrupted
-- build leaves an invalid index, which the DROP before it removes on the re-run.
DROP INDEX CONCURRENTLY IF EXISTS hook_events_order_idx;
CREATE INDEX CONCURRENTLY hook_events_order_idx
    ON hook_events ((left(coalesce(metadata->>'session_id', payload->>'session_id'), 128)), created_at, id)
    WHERE NOT processed AND dead_at IS NULL
      AND left(coalesce(metadata->>'session_id', payload->>'session_id'), 128) IS NOT NULL;
