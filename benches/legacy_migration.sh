#!/usr/bin/env bash
# Benchmark of `synap-events migrate-events`: N generated legacy rows (default 1,000,000) in a
# schema of their own, migrated by the release binary; prints the CLI's report (rows/s).
#
#   DATABASE_URL=... benches/legacy_migration.sh [rows] [batch-size]
#
# Rows: 10 per aggregate (shared data.entityId), timestamps spread over a year and inserted in
# random order, ~120-byte data, one row in 1,000 with an invalid type (reported, skipped).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROWS="${1:-1000000}"
BATCH="${2:-5000}"
SCHEMA=bench_legacy
: "${DATABASE_URL:?set DATABASE_URL}"

cargo build --release -q -p synap-events-cli
BIN=target/release/synap-events

psql "$DATABASE_URL" -qX -v ON_ERROR_STOP=1 -c "SET client_min_messages = warning" -f - <<SQL
DROP SCHEMA IF EXISTS $SCHEMA CASCADE;
CREATE SCHEMA $SCHEMA;
SET search_path = $SCHEMA;
CREATE TABLE events (
    id uuid PRIMARY KEY, user_id text NOT NULL, "timestamp" timestamptz NOT NULL, type text NOT NULL,
    data jsonb NOT NULL, source text DEFAULT 'api', correlation_id uuid);
INSERT INTO events (id, user_id, "timestamp", type, data, source, correlation_id)
SELECT gen_random_uuid(),
       'user-' || (g % 1000),
       timestamptz '2024-01-01' + make_interval(secs => ((g::bigint * 7919) % 31536000)::double precision),
       CASE WHEN g % 1000 = 0 THEN 'Bad Type' WHEN g % 3 = 0 THEN 'entity.created' ELSE 'entity.updated' END,
       jsonb_build_object('entityId', md5((g % ($ROWS / 10))::text)::uuid, 'title', 'note ' || g,
                          'tags', jsonb_build_array('a', 'b'), 'n', g),
       'api',
       CASE WHEN g % 5 = 0 THEN gen_random_uuid() END
  FROM generate_series(1, $ROWS) g
 ORDER BY random();
ANALYZE events;
SQL
"$BIN" --schema "$SCHEMA" migrate
[ -n "${BENCH_ONLY_SETUP:-}" ] && exit 0
echo "== migrate-events: $ROWS rows, batch size $BATCH"
/usr/bin/time -f "wall %e s, max RSS %M KB" "$BIN" --schema "$SCHEMA" migrate-events --batch-size "$BATCH" --writers "${WRITERS:-2}" || true
echo "== verify"
/usr/bin/time -f "wall %e s" "$BIN" --schema "$SCHEMA" verify | head -3 || true
