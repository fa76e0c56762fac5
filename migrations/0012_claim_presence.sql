-- The claim ledger without a read of every batch's row per claim (issue 15; ARCHITECTURE.md,
-- "The claim"). Before, every claim read hook_events_claims whole, twice; under a held snapshot
-- (a long report, an `idle in transaction` client) vacuum can remove none of the two row
-- versions each batch leaves there, so each claim read more of them than the last, and the
-- processor fell behind within minutes. Now:
--   processor  on a batch's row, the key of the processor that claimed it (see
--              hook_events_processors). Rows without one (queued and isolated suspects,
--              quarantined events, a batch whose outcomes are being written one at a time, and
--              the rows of processors before this migration) are the ones every claim reads,
--              through hook_events_claims_named_idx: a few rows, written only after a crash or
--              a refused outcome. A batch's row is inserted when its handlers start and deleted
--              by its commit, never updated, and read by no claim while its processor lives.
-- hook_events_processors: the processors that claim, one row each, written at start-up and at
-- a clean exit. Each holds a session advisory lock on its key for as long as it runs, so a
-- claim learns that a processor died (its lock is free) without reading any batch's row; only
-- then do claims and the recovery read the batch rows (see crate hook-store, queries.rs).
-- Both tables are UNLOGGED, like the ledger: a server crash ends every claim and every
-- processor's session anyway.
ALTER TABLE hook_events_claims ADD COLUMN IF NOT EXISTS processor BIGINT;

-- The cleared slots of the earlier layout: nothing names them any more.
DELETE FROM hook_events_claims WHERE holder IS NULL AND cardinality(event_ids) = 0 AND note IS NULL;

-- Rows are inserted and deleted now, not updated in place: no room is kept for new versions.
ALTER TABLE hook_events_claims RESET (fillfactor);

CREATE INDEX IF NOT EXISTS hook_events_claims_named_idx ON hook_events_claims (created_at)
    WHERE processor IS NULL;

CREATE UNLOGGED TABLE IF NOT EXISTS hook_events_processors (
    key BIGINT PRIMARY KEY,
    name TEXT NOT NULL DEFAULT '',
    started_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
