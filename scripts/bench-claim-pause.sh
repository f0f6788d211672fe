#!/usr/bin/env bash
# The claim statement with and without the pause checks (issue 16), side by side on one server:
# pgbench runs each claim of 100 jobs from a 200k backlog inside a transaction that rolls back (so
# every run sees the same table; a queue and a kind other than the benchmarked ones are paused),
# alternating the two statements ROUNDS times. Prints tps per run.
# Usage: scripts/bench-claim-pause.sh postgres://postgres@127.0.0.1:5432/postgres [ROUNDS] [SECONDS]
set -euo pipefail
url=${1:?database URL}
rounds=${2:-3}
secs=${3:-10}
db=oncely_claim_bench_$$
here=$(cd "$(dirname "$0")/.." && pwd)
psql -q "$url" -c "CREATE DATABASE $db"
trap 'psql -q "$url" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"' EXIT
dburl=${url%/*}/$db
for f in "$here"/migrations/*.sql; do psql -q -v ON_ERROR_STOP=1 "$dburl" -f "$f"; done
psql -q "$dburl" -c "INSERT INTO oncely.jobs (kind, queue) SELECT 'noop', 'bench' FROM generate_series(1, 200000)"
psql -q "$dburl" -c "INSERT INTO oncely.pauses (scope, name) VALUES ('queue', 'other'), ('kind', 'other')"
psql -q "$dburl" -c "VACUUM ANALYZE oncely.jobs"
tmp=$(mktemp -d)
claim() { # $1: extra WHERE lines
cat <<SQL
BEGIN;
WITH next AS MATERIALIZED (
    SELECT id FROM oncely.jobs
    WHERE state = 'available' AND queue = 'bench' AND run_at <= now()
    $1
    ORDER BY priority DESC, run_at, id LIMIT 100 FOR UPDATE SKIP LOCKED
)
UPDATE oncely.jobs AS j SET state = 'running', attempt = j.attempt + 1, attempted_at = now(),
    lease_expires_at = now() + make_interval(secs => 30), worker_id = 'w'
WHERE j.id = ANY (ARRAY(SELECT id FROM next)) RETURNING j.id, j.args;
ROLLBACK;
SQL
}
claim "" > "$tmp/plain.sql"
claim "AND NOT EXISTS (SELECT 1 FROM oncely.pauses WHERE scope = 'queue' AND name = 'bench')
    AND (kind || '') <> ALL (ARRAY(SELECT name FROM oncely.pauses WHERE scope = 'kind'))" > "$tmp/pause.sql"
for r in $(seq 1 "$rounds"); do
  for s in plain pause; do
    tps=$(pgbench -n -M prepared -c 4 -j 2 -T "$secs" -f "$tmp/$s.sql" "$dburl" 2>/dev/null | awk '/^tps/ {print $3}')
    echo "round $r $s tps $tps"
  done
done
rm -rf "$tmp"
