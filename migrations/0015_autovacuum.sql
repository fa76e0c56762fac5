-- Autovacuum of hook_events by count, not by share (issue 15, bloat under sustained load; see
-- ARCHITECTURE.md, "Dead row versions"). Every processed event leaves a dead row version and
-- dead index entries: its completion is an update that cannot be HOT (it changes `processed`,
-- which the claim's partial indexes are defined on), and hook-archive's move deletes the row.
-- The server's default starts a vacuum at 50 + 20% of the table's rows, so a table of a million
-- rows waits for 200,000 dead ones, and then vacuums slowly (2 ms of cost delay per 200 pages).
-- Here: at 10,000 dead row versions whatever the table's size, with no cost delay (the settings
-- Oban and River document), and an ANALYZE after 10,000 changes + 5% (the default waits for
-- 10% of the table; the claim's plans depend on how few rows wait). Autovacuum still looks at
-- the table at most once per autovacuum_naptime (a server-wide setting, one minute by
-- default), which at thousands of events per second is far too late: hook-processor's vacuum
-- task (HOOK_VACUUM_DEAD_TUPLES) vacuums between naps. Only the table's storage parameters change (no rewrite, no scan); the
-- statement takes a SHARE UPDATE EXCLUSIVE lock, which producers' and processors' writes pass,
-- but which waits behind a running VACUUM or index build: the runner's lock_timeout, with
-- retries, keeps it from queueing anyone behind it for long.
ALTER TABLE hook_events SET (
    autovacuum_vacuum_threshold = 10000,
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_cost_delay = 0,
    autovacuum_analyze_threshold = 10000,
    autovacuum_analyze_scale_factor = 0.05
);
