-- Session order (docs/routes.md, "Session order") reads `hook_events_order_idx`, the pending
-- events of each agent session in order. This migration built it until this text replaced the
-- first one (kept in migrations/history/0013_session_order.v1.sql; an install that applied it
-- keeps the index). It holds an entry for every event inserted with a session, which a queue
-- with no ordered route should not write and vacuum: it is now built by a store whose routes
-- are ordered, when it migrates (hook_store::indexes, SESSION_ORDER; ARCHITECTURE.md, "Indexes
-- built by their users"). Nothing is left to do here.
SELECT 1;
