#!/usr/bin/env bash
# Runs the whole test suite against the private PostgreSQL cluster (started here if needed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export SYNAP_PG_FAST="${SYNAP_PG_FAST:-1}"
export DATABASE_URL="${DATABASE_URL:-$(scripts/db.sh start)}"
echo "== tests against $DATABASE_URL"

echo "== Rust: core (unit + PostgreSQL integration)"
cargo test --workspace
