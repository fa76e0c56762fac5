#!/usr/bin/env bash
# Builds a 1,000,000-row hook_events table shaped like a live one and times `hook-processor
# stats` on it (the figures in docs/operations.md). Needs psql and a SCRATCH database:
#
#   DATABASE_URL=postgres://postgres@localhost/stats_bench bins/processor/bench/stats-1m.sh
#
# The table: events every 0.604 s over the last 7 days; 1% processed after one retry, 2,000 dead
# after three attempts, a few retrying in the last hour, the last 200 still pending. Processing
# took 5 ms to 2 s. Run it right after loading: the windows are counted back from now.
set -euo pipefail
cd "$(dirname "$0")/../../.."
: "${DATABASE_URL:?set DATABASE_URL to a scratch database}"
bin=${HOOK_PROCESSOR:-target/release/hook-processor}
[ -x "$bin" ] || cargo build --release -p hook-processor

for migration in migrations/*.sql; do
    psql -q -v ON_ERROR_STOP=1 "$DATABASE_URL" -f "$migration" >/dev/null 2>&1 || psql -q "$DATABASE_URL" -f "$migration"
done
psql -q -v ON_ERROR_STOP=1 "$DATABASE_URL" <<'SQL'
TRUNCATE hook_events;
SET hook_events.notify = off;
INSERT INTO hook_events (id, source, action, resource, resource_id, payload, metadata, processed,
                         processing_errors, retry_count, created_at, processed_at, next_attempt_at, dead_at)
SELECT gen_random_uuid(),
       (ARRAY['PreToolUse','PostToolUse','UserPromptSubmit','Stop','SessionEnd'])[1 + (i % 5)],
       (ARRAY['tool_invocation','tool_completion','prompt_submitted','session_stopped','session_ended'])[1 + (i % 5)],
       'tool', 'Bash',
       jsonb_build_object('tool_name', 'Bash', 'tool_input', jsonb_build_object('command', 'ls -la /some/dir/' || i)),
       '{}',
       kind = 'done',
       CASE WHEN kind = 'dead' THEN ARRAY['err a', 'err b', 'err c: connection reset ' || (i % 7)]
            WHEN kind = 'retrying' THEN ARRAY['timeout after 30s']
            WHEN kind = 'done' AND i % 100 = 0 THEN ARRAY['transient failure ' || (i % 3)] END,
       CASE WHEN kind = 'dead' THEN 3 WHEN kind = 'retrying' THEN 1 WHEN kind = 'done' AND i % 100 = 0 THEN 1 ELSE 0 END,
       created,
       CASE WHEN kind = 'done' THEN created + (0.005 + random() * random() * 2) * interval '1 second' END,
       CASE WHEN kind = 'retrying' THEN now() + interval '30 seconds' END,
       CASE WHEN kind = 'dead' THEN created + interval '10 seconds' END
FROM (
    SELECT i,
           now() - (1000000 - i) * interval '604 milliseconds' AS created,
           CASE WHEN i > 999800 THEN 'pending'
                WHEN i % 500 = 1 THEN 'dead'
                WHEN i % 1000 = 2 AND i > 994000 THEN 'retrying'
                ELSE 'done' END AS kind
    FROM generate_series(1, 1000000) AS i
) AS s;
VACUUM ANALYZE hook_events;
SQL
psql -Atq "$DATABASE_URL" -c "SELECT count(*) || ' rows, ' || pg_size_pretty(pg_total_relation_size('hook_events')) FROM hook_events"

"$bin" stats
for window in 1h 1h 1h 24h 7d 7d 7d; do
    /usr/bin/time -f "--since $window: %es wall" "$bin" stats --since "$window" | grep 'queries took'
done
