#!/usr/bin/env bash
# Installs what building and testing need and builds the Node module; idempotent, quick when
# everything is present.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v cargo >/dev/null; then
    echo "setup: cargo not found; install Rust with rustup first" >&2
    exit 1
fi
if ! command -v npm >/dev/null; then
    echo "setup: npm not found; install Node.js 18 or later first" >&2
    exit 1
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true
if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
    rustup target add wasm32-unknown-unknown
fi
if [ ! -d node_modules/@napi-rs/cli ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    npm ci --no-audit --no-fund
fi
# Headless Chromium for the browser test (Debian's package; nothing downloads its own browser).
if [ ! -x /usr/bin/chromium ] && [ -z "${CHROMIUM_PATH:-}" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq chromium >/dev/null
    else
        echo "setup: install Debian's chromium (or set CHROMIUM_PATH) for the browser test" >&2
    fi
fi
# PgBouncer for the pooler test pass (Debian's package; scripts/db.sh start --pooler runs it).
if ! command -v pgbouncer >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq pgbouncer >/dev/null
    else
        echo "setup: install Debian's pgbouncer for the pooler test pass" >&2
    fi
fi
# TimescaleDB for the hypertable test pass: no registry ships it, so the build in
# ../shared/timescaledb is installed when it is there (root; idempotent).
if [ -x ../shared/timescaledb/install.sh ] && [ "$(id -u)" = 0 ]; then
    ../shared/timescaledb/install.sh
fi
# The native module (release build; regenerates index.js and index.d.ts).
npm run --silent build
# The wasm package (wasm/pkg/web and wasm/pkg/node).
scripts/build-wasm.sh
