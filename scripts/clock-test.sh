#!/usr/bin/env bash
# Runs the test suite with the clock at hours where a test that passes at a lucky hour fails:
# the first minutes of a UTC day, and the last minutes of a month (the run crosses into the next
# day and month). The server and the tests see the same clock: libfaketime (Debian's `faketime`
# package, installed here when missing) shifts the wall clock of every process by one offset;
# monotonic clocks (timeouts) stay real.
#
#   scripts/clock-test.sh                 both instants, native storage, Rust and Node
#   scripts/clock-test.sh --timescaledb   the same on TimescaleDB
#   CLOCK_AT="2027-06-30 23:58:00" scripts/clock-test.sh   one instant of your choosing (UTC)
#
# Each run starts a private cluster of its own (in a temporary directory, port 54350), so the
# clusters of scripts/db.sh are left alone. Expects scripts/setup.sh to have run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

MODE_FLAG="${1:-}"
MODE=native
[ "$MODE_FLAG" = --timescaledb ] && MODE=timescaledb

LIB=/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1
if [ ! -f "$LIB" ]; then
    echo "clock-test: installing faketime" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq faketime >/dev/null
fi

# Built before the clock moves: cargo's own freshness checks use the real clock.
cargo test --workspace --lib --bins --tests --no-run -q 2>/dev/null || cargo test --workspace --lib --bins --tests --no-run

if [ -n "${CLOCK_AT:-}" ]; then
    INSTANTS=("$CLOCK_AT")
else
    # 30 seconds into a UTC day, and 3 minutes before the end of next January (a month's and a
    # day's boundary during the run).
    INSTANTS=("$(date -u -d tomorrow +%F) 00:00:30" "$(($(date -u +%Y) + 1))-01-31 23:57:00")
fi

for at in "${INSTANTS[@]}"; do
    offset=$(($(date -u -d "$at UTC" +%s) - $(date -u +%s)))
    if [ "$offset" -ge 0 ]; then shift_by="+${offset}s"; else shift_by="${offset}s"; fi
    echo "== clock at $at UTC (shifted by $shift_by), $MODE"
    dir="$(mktemp -d /tmp/synap-clock-XXXXXX)"
    chmod 755 "$dir"
    export LD_PRELOAD="$LIB" FAKETIME="$shift_by" FAKETIME_DONT_FAKE_MONOTONIC=1 FAKETIME_DONT_RESET=1
    args=()
    [ "$MODE" = timescaledb ] && args=(--timescaledb)
    url="$(SYNAP_PG_FAST=1 SYNAP_PG_DIR="$dir/pg" SYNAP_PG_PORT=54350 scripts/db.sh start "${args[@]}")"
    status=0
    (
        export DATABASE_URL="$url" SYNAP_TEST_STORAGE_MODE="$MODE"
        date -u
        # Not the doc-tests: rustdoc deadlocks under libfaketimeMT (blocked on a futex at start,
        # no CPU), and they hold no clock-dependent code.
        cargo test --workspace --lib --bins --tests && node --test __test__/
    ) || status=$?
    SYNAP_PG_DIR="$dir/pg" SYNAP_PG_PORT=54350 scripts/db.sh stop "${args[@]}" >/dev/null || true
    unset LD_PRELOAD FAKETIME FAKETIME_DONT_FAKE_MONOTONIC FAKETIME_DONT_RESET
    rm -rf "$dir"
    if [ "$status" != 0 ]; then
        echo "clock-test: the suite failed with the clock at $at UTC" >&2
        exit "$status"
    fi
done
echo "== clock-test: passed at ${INSTANTS[*]}"
