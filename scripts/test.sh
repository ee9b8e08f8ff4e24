#!/usr/bin/env bash
# Runs the whole test suite against the private PostgreSQL cluster (started here if needed).
# Expects scripts/setup.sh to have run (it builds the Node module).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export SYNAP_PG_FAST="${SYNAP_PG_FAST:-1}"
if [ -z "${DATABASE_URL:-}" ]; then
    DATABASE_URL="$(scripts/db.sh start)"
    # The suite owns this cluster: the restart test may stop and start it.
    export SYNAP_PG_CONTROL=1
fi
export DATABASE_URL
echo "== tests against $DATABASE_URL"

echo "== Rust: core (unit, vectors, PostgreSQL integration)"
cargo test --workspace

echo "== TypeScript: the design's usage under strict + isolatedModules"
npx tsc -p __test__/tsconfig.json

echo "== Node: the built module"
node --test __test__/
