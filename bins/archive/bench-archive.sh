#!/usr/bin/env bash
# Measures hook-archive: the time to archive N processed rows (default 1,000,000) and how long
# each batch statement took (each is its own transaction, so that is the longest any row lock
# of the run is held). Not part of CI: it loads a million rows and runs for minutes.
#
# Usage: [STALE_STATS=1] bins/archive/bench-archive.sh [rows] [batch-size]
# The server is libpq's PGHOST/PGPORT/PGUSER (default 127.0.0.1, 5432, postgres); the user must
# be allowed to create databases. A scratch database is created and dropped at the end.
# Method and results: docs/benchmarks.md, section "hook-archive".
set -euo pipefail

ROWS=${1:-1000000}
BATCH=${2:-1000}
export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-postgres}
DB="hook_archive_bench_$$"
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${HOOK_ARCHIVE_BIN:-$ROOT/target/release/hook-archive}

if [[ -z ${HOOK_ARCHIVE_BIN:-} ]]; then
    (cd "$ROOT" && cargo build --release -q -p hook-archive)
fi

psql -X -q -d postgres -c "CREATE DATABASE $DB"
trap 'psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)"' EXIT
export DATABASE_URL="host=$PGHOST port=$PGPORT user=$PGUSER dbname=$DB"
unset DB_PASSWORD POSTGRES_PASSWORD POSTGRES_HOST POSTGRES_PORT POSTGRES_DB POSTGRES_USER
psql() { command psql -X -q -v ON_ERROR_STOP=1 -d "$DB" "$@"; }

echo "== machine"
echo "cores: $(nproc); memory: $(free -h | awk '/^Mem:/ {print $2}'); load: $(cut -d' ' -f1-3 /proc/loadavg)"
psql -At -c "SELECT version()"
psql -At -c "SELECT 'fsync=' || current_setting('fsync') || ' synchronous_commit=' || current_setting('synchronous_commit') || ' shared_buffers=' || current_setting('shared_buffers')"

echo "== schema (hook-archive applies the migrations)"
"$BIN" --dry-run

echo "== load: $ROWS processed rows 31-60 days old, plus rows that must stay"
start=$(date +%s.%N)
psql <<SQL
SET hook_events.notify = off;
-- Processed 31 to 60 days ago, in processor-sized groups sharing one processed_at (as a
-- processor's batch transaction writes them), with payloads shaped like the hooks' own.
INSERT INTO hook_events (id, source, action, resource, resource_id, payload, metadata, created_at,
                         processed, processed_at, result_metadata)
SELECT gen_random_uuid(), 'PostToolUse', 'tool_completion', 'tool', 'Bash',
       jsonb_build_object('tool_name', 'Bash', 'tool_input', jsonb_build_object('command', 'cargo test -p crate' || g % 97),
                          'tool_response', jsonb_build_object('exit_code', 0, 'stdout', repeat('x', 80))),
       jsonb_build_object('session_id', 'session-' || g / 1000, 'cwd', '/work/project'),
       now() - interval '60 days' + (g / 100) * (interval '29 days' / ($ROWS / 100 + 1)),
       TRUE,
       now() - interval '60 days' + (g / 100) * (interval '29 days' / ($ROWS / 100 + 1)) + interval '50 milliseconds',
       '{"tool_name": "Bash"}'
FROM generate_series(1, $ROWS) AS g;
-- What must stay: recent processed events, and old pending, retrying and dead ones.
INSERT INTO hook_events (id, source, action, resource, resource_id, created_at, processed, processed_at)
SELECT gen_random_uuid(), 'Stop', 'session_stopped', 'session', 's', now() - interval '1 day', TRUE, now() - interval '1 day'
FROM generate_series(1, 100000);
INSERT INTO hook_events (id, source, action, resource, resource_id, created_at, retry_count, dead_at)
SELECT gen_random_uuid(), 'PreToolUse', 'tool_invocation', 'tool', 'Bash', now() - interval '45 days', g % 4,
       CASE WHEN g % 4 = 3 THEN now() - interval '44 days' END
FROM generate_series(1, 10000) AS g;
SQL
echo "loaded in $(echo "$(date +%s.%N) - $start" | bc) s"
# The state of a table whose old rows are 30+ days old: autovacuum has vacuumed and analyzed it.
# STALE_STATS=1 skips that (statistics of a freshly bulk-loaded table) to check that batches stay
# bounded whatever the planner believes.
if [[ -z ${STALE_STATS:-} ]]; then
    psql -c "VACUUM (ANALYZE) hook_events"
else
    echo "statistics left stale (STALE_STATS=1)"
fi
psql -c "CHECKPOINT"
psql -At -c "SELECT 'table: ' || pg_size_pretty(pg_total_relation_size('hook_events')) || ' with indexes'"

echo "== run"
"$BIN" --dry-run
start=$(date +%s.%N)
"$BIN" --older-than 30d --batch-size "$BATCH" --stats
echo "wall clock: $(echo "$(date +%s.%N) - $start" | bc) s (including connecting and counting)"

echo "== check"
psql -At <<SQL
SELECT 'live: ' || count(*) || ' (expected 110000), of which old processed: '
       || count(*) FILTER (WHERE processed AND processed_at < now() - interval '30 days') || ' (expected 0)'
FROM hook_events;
SELECT 'archived: ' || count(*) || ' (expected $ROWS), unprocessed: ' || count(*) FILTER (WHERE NOT processed) || ' (expected 0)'
FROM hook_events_archive;
SQL
