-- The claim ledger: which events each claim hands to handlers, so that an event whose handler
-- takes its processor down with it (an abort, a stack overflow, an OOM kill) is counted as a
-- failed attempt instead of coming back unchanged forever. See ARCHITECTURE.md, "The claim".
--
-- A row is written (autocommitted, on another connection) just before a batch's handlers start,
-- and cleared by the batch's own transaction together with its outcomes, so a batch that commits
-- leaves nothing. A row whose holder transaction is no longer in progress names suspect events:
-- ordinary claims leave them alone, and they are retried one at a time.
--   holder    the claim's transaction id; NULL for a queued suspect (no one holds it)
--   event_ids the events handed to handlers (one for a queued or isolated suspect)
--   isolated  the holder ran this one event alone: if it died, the crash was the event's
--   note      set for an event whose outcome could not be written at all: kept out of every
--             claim until an operator deletes the row (docs/operations.md)
--
-- UNLOGGED: its writes cost no WAL and no flush. It only has to survive a processor's crash,
-- not the server's: a server crash aborts every claim anyway (their events come back, not
-- suspect), and empties this table.
--
-- Every claim reads this table, so it must stay small: an ordinary batch's row is one of its
-- processor's slots, overwritten by the next batch and cleared (no holder, no events) by the
-- batch's commit, never inserted and deleted per batch. Those updates change no indexed column,
-- so they are HOT updates, pruned within the page; fillfactor 50 leaves room in each page for
-- the new versions. Autovacuum is told to visit often: the table is tiny, a visit costs nothing.
CREATE UNLOGGED TABLE IF NOT EXISTS hook_events_claims (
    id UUID PRIMARY KEY,
    holder XID8,
    event_ids UUID[] NOT NULL,
    isolated BOOLEAN NOT NULL DEFAULT FALSE,
    note TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
) WITH (fillfactor = 50, autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 500);
