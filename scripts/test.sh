#!/usr/bin/env bash
# Runs the whole test suite (Rust and Node) once per storage mode, each against a private
# cluster started here: native partitioning on plain PostgreSQL, then TimescaleDB hypertables,
# then a three-node Citus cluster (a coordinator and two workers); then the Node suite and most of
# the Rust integration tests again through PgBouncer in transaction mode.
# Expects scripts/setup.sh to have run (it builds the Node module and the wasm package).
#
# The TimescaleDB pass needs the extension in the local PostgreSQL: it is installed from
# ../shared/timescaledb when that is there (as root). Where it cannot be, the pass is skipped with
# one line, except under CI=true, where that fails the run.
#
# With DATABASE_URL set, one pass runs against that server instead; say which storage mode it
# gives with SYNAP_TEST_STORAGE_MODE=native|timescaledb|citus (default native).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export SYNAP_PG_FAST="${SYNAP_PG_FAST:-1}"

echo "== TypeScript: the design's usage under strict + isolatedModules"
npx tsc -p __test__/tsconfig.json

run_pass() {
    local mode="$1"
    echo "== $mode pass against $DATABASE_URL"
    export SYNAP_TEST_STORAGE_MODE="$mode"
    echo "== $mode: Rust (unit, vectors, PostgreSQL integration)"
    cargo test --workspace
    echo "== $mode: Node (the built module, the wasm build, headless Chromium)"
    node --test __test__/
}

if [ -n "${DATABASE_URL:-}" ]; then
    export DATABASE_URL
    run_pass "${SYNAP_TEST_STORAGE_MODE:-native}"
    exit 0
fi

# The suite owns these clusters: the restart test may stop and start them. They are stopped at
# the end, also when a test fails.
export SYNAP_PG_CONTROL=1
trap 'scripts/db.sh stop --pooler >/dev/null 2>&1 || true; scripts/db.sh stop >/dev/null 2>&1 || true; scripts/db.sh stop --timescaledb >/dev/null 2>&1 || true; scripts/db.sh stop --citus >/dev/null 2>&1 || true' EXIT

DATABASE_URL="$(scripts/db.sh start)"
export DATABASE_URL
run_pass native
scripts/db.sh stop >/dev/null

if DATABASE_URL="$(scripts/db.sh start --timescaledb)"; then
    export DATABASE_URL
    run_pass timescaledb
    scripts/db.sh stop --timescaledb >/dev/null
elif [ "${CI:-}" = true ]; then
    echo "test.sh: the TimescaleDB pass cannot run here (see above); CI requires it" >&2
    exit 1
else
    echo "== timescaledb pass skipped: TimescaleDB is not installed and cannot be installed here"
fi

# The third pass: a coordinator and two workers (scripts/db.sh start --citus).
if DATABASE_URL="$(scripts/db.sh start --citus)"; then
    export DATABASE_URL
    run_pass citus
    scripts/db.sh stop --citus >/dev/null
elif [ "${CI:-}" = true ]; then
    echo "test.sh: the Citus pass cannot run here (see above); CI requires it" >&2
    exit 1
else
    echo "== citus pass skipped: Citus is not installed and cannot be installed here"
fi

# The fourth pass: PgBouncer in transaction mode (Debian's package, with its default settings) in
# front of the native cluster, as Neon's or Supabase's pooled URL puts one in front of theirs. The
# whole Node suite and the Rust tests that are not about the server itself go through it; the
# tests' own statements (session settings, LISTEN) go to the server (SYNAP_TEST_DIRECT_URL).
DIRECT_URL="$(scripts/db.sh start)"
POOLED_URL="$(scripts/db.sh start --pooler)"
echo "== pooler pass against $POOLED_URL (PgBouncer in transaction mode)"
export DATABASE_URL="$POOLED_URL" SYNAP_TEST_DIRECT_URL="$DIRECT_URL" SYNAP_TEST_STORAGE_MODE=native
echo "== pooler: Rust (repository, isolation, replay, feed, groups, injection, retention)"
cargo test -p synap-events --test repository --test isolation --test replay --test feed --test groups \
    --test injection --test retention
echo "== pooler: Node (the built module through the pooler)"
node --test __test__/
scripts/db.sh stop --pooler >/dev/null
scripts/db.sh stop >/dev/null
