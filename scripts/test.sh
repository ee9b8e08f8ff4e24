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

# Every 5 seconds the run notes the memory and disk left. At the end it prints the lowest of each,
# and a failed run prints what the servers' logs say of a crash (a server killed by a signal, a
# PANIC, a full disk): a run that fails on another machine then says whether a server died and why.
mkdir -p .local
RESOURCES=.local/test-resources.log
(
    while :; do
        echo "$(date +%T) $(awk '/MemAvailable/ { print int($2 / 1024) }' /proc/meminfo) $(df -Pm . | awk 'NR == 2 { print $4 }')"
        sleep 5
    done
) >"$RESOURCES" 2>/dev/null &
WATCH_PID=$!
finish() {
    local status=$?
    kill "$WATCH_PID" 2>/dev/null || true
    scripts/db.sh stop --pooler >/dev/null 2>&1 || true
    scripts/db.sh stop >/dev/null 2>&1 || true
    scripts/db.sh stop --timescaledb >/dev/null 2>&1 || true
    scripts/db.sh stop --citus >/dev/null 2>&1 || true
    sort -k2,2n "$RESOURCES" | awk 'NR == 1 { print "test.sh: lowest memory available " $2 " MB (at " $1 ")" }' >&2
    sort -k3,3n "$RESOURCES" | awk 'NR == 1 { print "test.sh: lowest disk space available " $3 " MB (at " $1 ")" }' >&2
    if [ "$status" != 0 ]; then
        echo "test.sh: what the servers logged of a crash, if anything:" >&2
        find .local -name server.log -newer "$RESOURCES.start" -print0 2>/dev/null |
            xargs -0 -r grep -HE "PANIC|terminated by signal|No space left|out of memory|could not (write|extend)" 2>/dev/null |
            tail -n 40 >&2 || true
    fi
    exit "$status"
}
touch "$RESOURCES.start"
trap finish EXIT

DATABASE_URL="$(scripts/db.sh start)"
export DATABASE_URL
run_pass native
scripts/db.sh stop >/dev/null

if DATABASE_URL="$(scripts/db.sh start --timescaledb)"; then
    export DATABASE_URL
    run_pass timescaledb
    scripts/db.sh stop --timescaledb >/dev/null
    # CI's clusters are its own: the disk a passed pass's data takes is given back.
    if [ "${CI:-}" = true ]; then rm -rf .local/pg-timescaledb/data; fi
elif [ "${CI:-}" = true ]; then
    echo "test.sh: the TimescaleDB pass cannot run here (see above); CI requires it" >&2
    exit 1
else
    echo "== timescaledb pass skipped: TimescaleDB is not installed and cannot be installed here"
fi

# The fourth pass: PgBouncer in transaction mode (Debian's package, with its default settings) in
# front of the native cluster, as Neon's or Supabase's pooled URL puts one in front of theirs. The
# whole Node suite and the Rust tests that are not about the server itself go through it; the
# tests' own statements (session settings, LISTEN) go to the server (SYNAP_TEST_DIRECT_URL).
# The Rust tests run as the other passes built them (`cargo test --workspace`): naming them with
# `--test` would build them again, with the features of one package instead of the workspace's.
POOLER_TESTS="repository isolation replay feed filtered_feed groups injection retention erasure upcasting"
pooler_pass() {
    local direct pooled
    direct="$(scripts/db.sh start)"
    pooled="$(scripts/db.sh start --pooler)"
    echo "== pooler pass against $pooled (PgBouncer in transaction mode)"
    export DATABASE_URL="$pooled" SYNAP_TEST_DIRECT_URL="$direct" SYNAP_TEST_STORAGE_MODE=native
    echo "== pooler: Rust (${POOLER_TESTS// /, })"
    local bins
    bins="$(cargo test --workspace --no-run --message-format=json 2>/dev/null | POOLER_TESTS="$POOLER_TESTS" node -e '
        const want = new Set(process.env.POOLER_TESTS.split(" "))
        for (const line of require("fs").readFileSync(0, "utf8").split("\n")) {
          if (!line.startsWith("{")) continue
          const m = JSON.parse(line)
          if (m.reason === "compiler-artifact" && m.executable && m.target.kind.includes("test") && want.has(m.target.name)) {
            console.log(m.executable)
          }
        }')"
    [ "$(echo "$bins" | wc -w)" = "$(echo "$POOLER_TESTS" | wc -w)" ] || {
        echo "test.sh: the pooler pass found these test binaries: $bins" >&2
        return 1
    }
    for bin in $bins; do
        echo "     Running $bin"
        # As cargo runs them: from the package's directory.
        (cd core && "$bin")
    done
    echo "== pooler: Node (the built module through the pooler)"
    node --test __test__/
    scripts/db.sh stop --pooler >/dev/null
    scripts/db.sh stop >/dev/null
}

# The third and fourth passes run side by side: they use different clusters (the Citus pass its
# own three, the pooler pass the native one behind PgBouncer) and the test binaries built for the
# first pass, and each spends most of its time waiting on its servers. The pooler pass writes to
# a log of its own, printed when both have ended.
POOLER_LOG="$(mktemp)"
( set -e; pooler_pass ) >"$POOLER_LOG" 2>&1 &
POOLER_PID=$!

# The third pass: a coordinator and two workers (scripts/db.sh start --citus).
citus_status=0
if DATABASE_URL="$(scripts/db.sh start --citus)"; then
    export DATABASE_URL
    # Not `( ... ) || status=$?`: inside that, bash would ignore `set -e`.
    set +e
    ( set -e; run_pass citus )
    citus_status=$?
    set -e
    scripts/db.sh stop --citus >/dev/null
elif [ "${CI:-}" = true ]; then
    echo "test.sh: the Citus pass cannot run here (see above); CI requires it" >&2
    citus_status=1
else
    echo "== citus pass skipped: Citus is not installed and cannot be installed here"
fi

set +e
wait "$POOLER_PID"
pooler_status=$?
set -e
cat "$POOLER_LOG"
rm -f "$POOLER_LOG"
if [ "$citus_status" != 0 ] || [ "$pooler_status" != 0 ]; then
    echo "test.sh: citus pass exit $citus_status, pooler pass exit $pooler_status" >&2
    exit 1
fi
