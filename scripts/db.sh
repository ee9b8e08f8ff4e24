#!/usr/bin/env bash
# Private PostgreSQL clusters for development and tests, one per storage mode.
#
#   scripts/db.sh start [--timescaledb|--citus]    initdb (first time) and start; prints the DATABASE_URL
#   scripts/db.sh stop [--timescaledb|--citus]     stop the server
#   scripts/db.sh status [--timescaledb|--citus]   running or not
#   scripts/db.sh url [--timescaledb|--citus]      print the DATABASE_URL
#   scripts/db.sh env [--timescaledb|--citus]      print `export DATABASE_URL=...` (for eval)
#   scripts/db.sh start --pooler                   PgBouncer in transaction mode in front of the
#                                                  native cluster (started too); prints its URL
#
# Without a flag: plain PostgreSQL in .local/pg on 127.0.0.1:${SYNAP_PG_PORT:-54329}, where
# `migrate()` picks native partitioning. With --timescaledb: a cluster in .local/pg-timescaledb on
# port ${SYNAP_PG_PORT:-54330} that preloads TimescaleDB (installed from ../shared/timescaledb
# when missing and possible), where `migrate()` makes a hypertable. With --citus: three clusters
# in .local/pg-citus (a coordinator on ${SYNAP_PG_PORT:-54331} and two workers on the next two
# ports) that preload Citus (installed from ../shared/citus when missing and possible), with the
# extension made and the workers registered in the `postgres` database; the URL is the
# coordinator's, where `migrate()` picks the citus storage mode (docs/scale-out.md). With
# --citus-node: one more server in .local/pg-citus-node on ${SYNAP_PG_PORT:-54334} that preloads
# Citus, for a test to add to a cluster as a new worker.
# Trust authentication; run as the `postgres` user when started by root (initdb refuses root).
# The PostgreSQL server is installed with apt when its binaries are missing.
# SYNAP_PG_FAST=1 turns off fsync and friends: for tests only. SYNAP_PG_DIR and SYNAP_PG_PORT
# place a cluster elsewhere; SYNAP_PG_NEXT_XID starts a new one at that transaction id.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMMAND="${1:-}"
MODE=native
case "${2:-}" in
    "") ;;
    --timescaledb) MODE=timescaledb ;;
    --citus) MODE=citus ;;
    --citus-node) MODE=citus-node ;;
    --pooler) MODE=pooler ;;
    *) echo "db.sh: unknown option ${2}" >&2; exit 2 ;;
esac
if [ "$MODE" = timescaledb ]; then
    PORT="${SYNAP_PG_PORT:-54330}"
    BASE="${SYNAP_PG_DIR:-$ROOT/.local/pg-timescaledb}"
elif [ "$MODE" = citus-node ]; then
    PORT="${SYNAP_PG_PORT:-54334}"
    BASE="${SYNAP_PG_DIR:-$ROOT/.local/pg-citus-node}"
elif [ "$MODE" = citus ]; then
    PORT="${SYNAP_PG_PORT:-54331}"
    TOP="${SYNAP_PG_DIR:-$ROOT/.local/pg-citus}"
    BASE="$TOP/coordinator"
elif [ "$MODE" = pooler ]; then
    PORT="${SYNAP_POOLER_PORT:-54339}"
    BASE="$ROOT/.local/pgbouncer"
else
    PORT="${SYNAP_PG_PORT:-54329}"
    # postgres must own its data, socket and log directories, all inside one directory of its own.
    BASE="${SYNAP_PG_DIR:-$ROOT/.local/pg}"
fi
DATA="$BASE/data"
LOG="$BASE/server.log"
URL="postgres://postgres@127.0.0.1:$PORT/postgres"
# The repository is told by the URL that it goes through a transaction-mode pooler.
if [ "$MODE" = pooler ]; then URL="$URL?pooler=transaction"; fi

find_bindir() {
    if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; then
        pg_config --bindir
        return
    fi
    local dir
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$dir/initdb" ]; then
            echo "$dir"
            return
        fi
    done
}

BINDIR="$(find_bindir)"
if [ -z "$BINDIR" ] && [ "$COMMAND" = start ]; then
    echo "db.sh: PostgreSQL server binaries not found; installing with apt" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq postgresql postgresql-contrib >/dev/null
    BINDIR="$(find_bindir)"
fi

as_pg() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

is_running() {
    [ -n "$BINDIR" ] && [ -f "$DATA/PG_VERSION" ] && as_pg "$BINDIR/pg_ctl" -D "$DATA" status >/dev/null 2>&1
}

# TimescaleDB for the hypertable pass: the library must be in PostgreSQL's lib directory. The
# build in ../shared/timescaledb is installed when it is there and we may write (root).
timescaledb_installed() {
    local libdir
    libdir="$("$BINDIR/pg_config" --pkglibdir 2>/dev/null || echo "$(dirname "$BINDIR")/lib")"
    if ls "$libdir"/timescaledb-*.so >/dev/null 2>&1; then
        return 0
    fi
    local shared="$ROOT/../shared/timescaledb/install.sh"
    if [ -x "$shared" ] && [ "$(id -u)" = 0 ]; then
        PG_BINDIR="$BINDIR" "$shared" >&2 || return 1
        ls "$libdir"/timescaledb-*.so >/dev/null 2>&1
    else
        return 1
    fi
}

# Citus for the distributed cluster, likewise from ../shared/citus.
citus_installed() {
    local shared="$ROOT/../shared/citus/install.sh"
    if [ -x "$shared" ]; then
        PG_BINDIR="$BINDIR" "$shared" --check && return 0
        [ "$(id -u)" = 0 ] && PG_BINDIR="$BINDIR" "$shared" >&2 && return 0
        return 1
    fi
    [ -f "$("$BINDIR/pg_config" --pkglibdir 2>/dev/null || echo "$(dirname "$BINDIR")/lib")/citus.so" ]
}

# The clusters' fixed ports (54329-54350) lie in Linux's ephemeral port range (32768-60999): a
# client connection made anywhere on the machine may take one as its local port, and a server
# started while it does cannot listen there ("could not bind ... Address already in use"; seen
# once in CI as the TimescaleDB pass began on 54330). Where we may (root), they are reserved:
# the kernel then never hands them out as ephemeral ports.
reserve_ports() {
    local f=/proc/sys/net/ipv4/ip_local_reserved_ports
    [ -w "$f" ] || return 0
    grep -q "54329-54360" "$f" 2>/dev/null && return 0
    local current
    current="$(cat "$f" 2>/dev/null || true)"
    echo "${current:+$current,}54329-54360" >"$f" 2>/dev/null || true
}

start() {
    reserve_ports
    if [ -z "$BINDIR" ]; then
        echo "db.sh: cannot find initdb even after installing PostgreSQL" >&2
        exit 1
    fi
    mkdir -p "$BASE"
    if [ "$(id -u)" = 0 ]; then
        chown postgres:postgres "$BASE"
        # postgres must be able to reach $BASE through the project's directories.
        local dir="$BASE"
        while [ "$dir" != / ]; do
            dir="$(dirname "$dir")"
            chmod o+x "$dir" 2>/dev/null || true
        done
    fi
    chmod 700 "$BASE"
    if [ ! -f "$DATA/PG_VERSION" ]; then
        as_pg "$BINDIR/initdb" --no-sync -D "$DATA" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$BASE/initdb.log" 2>&1 || {
            cat "$BASE/initdb.log" >&2
            exit 1
        }
        if [ -n "${SYNAP_PG_NEXT_XID:-}" ]; then
            # An old cluster's transaction counter, for tests that cross a boundary of it. Above
            # 2^32 it is an epoch and a 32-bit id (the xid8 that pg_current_xact_id() gives).
            local epoch=$((SYNAP_PG_NEXT_XID >> 32)) xid=$((SYNAP_PG_NEXT_XID & 0xFFFFFFFF))
            as_pg "$BINDIR/pg_resetwal" -e "$epoch" -x "$xid" -D "$DATA" >/dev/null
            # pg_xact must hold the segment of the new id (32 pages of 32,768 ids).
            local segment
            segment="$(printf '%04X' $((xid / 1048576)))"
            [ -f "$DATA/pg_xact/$segment" ] ||
                as_pg dd if=/dev/zero of="$DATA/pg_xact/$segment" bs=8192 count=32 status=none
        fi
    fi
    if is_running; then
        echo "$URL"
        return
    fi
    local opts="-c listen_addresses=127.0.0.1 -c port=$PORT -c unix_socket_directories=$BASE -c max_connections=200 -c timezone=UTC"
    if [ "$MODE" = timescaledb ]; then
        if ! timescaledb_installed; then
            echo "db.sh: TimescaleDB is not installed for $("$BINDIR/postgres" --version) and cannot be installed here" >&2
            exit 4
        fi
        opts="$opts -c shared_preload_libraries=timescaledb -c timescaledb.telemetry_level=off"
    fi
    if [ "$MODE" = citus ] || [ "$MODE" = citus-node ]; then
        # A test cluster on one machine: four shards per table (two per worker) keep a store's
        # tables at a few hundred shards; SYNAP_CITUS_SHARDS=32 is Citus's own default.
        opts="$opts -c shared_preload_libraries=citus -c citus.shard_count=${SYNAP_CITUS_SHARDS:-4}"
    fi
    if [ "${SYNAP_PG_FAST:-0}" = 1 ]; then
        # And a small WAL: a test run's clusters then hold a few hundred MB of it, not gigabytes.
        opts="$opts -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_wal_size=256MB -c min_wal_size=32MB"
    fi
    if ! as_pg "$BINDIR/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 -o "$opts" start >/dev/null; then
        tail -n 30 "$LOG" >&2 || true
        exit 1
    fi
    echo "$URL"
}

# The coordinator and its two workers: each started as a cluster of its own, then the extension
# and the workers' registration in the `postgres` database (both idempotent).
start_citus() {
    if ! citus_installed; then
        echo "db.sh: Citus is not installed for $("$BINDIR/postgres" --version) and cannot be installed here" >&2
        exit 4
    fi
    mkdir -p "$TOP"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$TOP"
    chmod 700 "$TOP"
    local coordinator="$PORT" node
    for node in coordinator:$PORT worker1:$((PORT + 1)) worker2:$((PORT + 2)); do
        BASE="$TOP/${node%%:*}" PORT="${node##*:}"
        DATA="$BASE/data" LOG="$BASE/server.log" URL="postgres://postgres@127.0.0.1:$PORT/postgres"
        start >/dev/null
        as_pg "$BINDIR/psql" -qAt -h 127.0.0.1 -p "$PORT" -U postgres -d postgres \
            -c "SET client_min_messages = warning" -c "CREATE EXTENSION IF NOT EXISTS citus" >/dev/null
    done
    as_pg "$BINDIR/psql" -qAt -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$coordinator" -U postgres -d postgres \
        -c "SELECT citus_set_coordinator_host('127.0.0.1', $coordinator)" \
        -c "SELECT citus_add_node('127.0.0.1', $((coordinator + 1)))" \
        -c "SELECT citus_add_node('127.0.0.1', $((coordinator + 2)))" >/dev/null
    echo "postgres://postgres@127.0.0.1:$coordinator/postgres"
}

# PgBouncer 1.18 (Debian 12's package) in transaction mode, with its default startup parameter
# handling, in front of the native cluster: every role of the server logs in (trust, looked up with
# auth_query), as Neon's or Supabase's pooled URL lets every role of the database in.
start_pooler() {
    if ! command -v pgbouncer >/dev/null 2>&1; then
        echo "db.sh: pgbouncer not found; installing it with apt" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq pgbouncer >/dev/null
    fi
    local backend backend_port
    backend="$(SYNAP_PG_PORT="${SYNAP_PG_PORT:-54329}" "$ROOT/scripts/db.sh" start)"
    backend_port="${backend##*:}"
    backend_port="${backend_port%%/*}"
    mkdir -p "$BASE"
    if [ "$(id -u)" = 0 ]; then chown postgres:postgres "$BASE"; fi
    chmod 700 "$BASE"
    if [ -f "$BASE/pgbouncer.pid" ] && kill -0 "$(cat "$BASE/pgbouncer.pid")" 2>/dev/null; then
        echo "$URL"
        return
    fi
    {
        echo "[databases]"
        echo "* = host=127.0.0.1 port=$backend_port"
        # One server connection for every client: tests interleave users on it.
        echo "postgres_one = host=127.0.0.1 port=$backend_port dbname=postgres pool_size=1"
        echo
        echo "[pgbouncer]"
        echo "listen_addr = 127.0.0.1"
        echo "listen_port = $PORT"
        echo "unix_socket_dir = $BASE"
        echo "auth_type = trust"
        echo "auth_file = $BASE/userlist.txt"
        echo "auth_user = postgres"
        echo 'auth_query = SELECT usename, passwd FROM pg_shadow WHERE usename = $1'
        echo "pool_mode = transaction"
        echo "max_client_conn = 2000"
        echo "default_pool_size = 60"
        echo "logfile = $BASE/pgbouncer.log"
        echo "pidfile = $BASE/pgbouncer.pid"
    } >"$BASE/pgbouncer.ini"
    echo '"postgres" ""' >"$BASE/userlist.txt"
    if [ "$(id -u)" = 0 ]; then chown postgres:postgres "$BASE/pgbouncer.ini" "$BASE/userlist.txt"; fi
    as_pg pgbouncer -d "$BASE/pgbouncer.ini" >/dev/null
    local i
    for i in $(seq 1 50); do
        if as_pg "$BINDIR/psql" -qAt -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -c "SELECT 1" >/dev/null 2>&1; then
            echo "$URL"
            return
        fi
        sleep 0.1
    done
    tail -n 20 "$BASE/pgbouncer.log" >&2 || true
    exit 1
}

stop_pooler() {
    if [ -f "$BASE/pgbouncer.pid" ] && kill "$(cat "$BASE/pgbouncer.pid")" 2>/dev/null; then
        rm -f "$BASE/pgbouncer.pid"
        echo "stopped"
    else
        echo "not running"
    fi
}

# Stops the coordinator and the workers.
stop_citus() {
    local node stopped=0
    for node in coordinator worker1 worker2; do
        BASE="$TOP/$node" DATA="$TOP/$node/data"
        if is_running; then
            as_pg "$BINDIR/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null
            stopped=1
        fi
    done
    if [ "$stopped" = 1 ]; then echo "stopped"; else echo "not running"; fi
}

stop() {
    if is_running; then
        as_pg "$BINDIR/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null
        echo "stopped"
    else
        echo "not running"
    fi
}

case "$COMMAND" in
    start)
        if [ "$MODE" = pooler ]; then
            start_pooler
        elif [ "$MODE" = citus ]; then
            start_citus
        elif [ "$MODE" = citus-node ]; then
            # One more node that preloads Citus, for a test to add to a cluster as a worker.
            citus_installed || { echo "db.sh: Citus is not installed and cannot be installed here" >&2; exit 4; }
            start
        else
            start
        fi
        ;;
    stop)
        if [ "$MODE" = citus ]; then stop_citus
        elif [ "$MODE" = pooler ]; then stop_pooler
        else stop; fi ;;
    status) if is_running; then echo "running: $URL"; else echo "not running"; exit 3; fi ;;
    url) echo "$URL" ;;
    env) echo "export DATABASE_URL=$URL" ;;
    *)
        echo "usage: scripts/db.sh start|stop|status|url|env [--timescaledb|--citus|--citus-node|--pooler]" >&2
        exit 2
        ;;
esac
