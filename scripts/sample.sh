#!/usr/bin/env bash
# The main job: builds what the sample needs (the Node module), starts the private PostgreSQL
# cluster (unless DATABASE_URL is set) and runs the design document's sample script.
# The test suite's setup (wasm, Chromium, TimescaleDB) is scripts/setup.sh; this needs none of it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

for tool in cargo npm node; do
    if ! command -v "$tool" >/dev/null; then
        echo "sample: $tool not found; install Rust (rustup) and Node.js 18 or later first" >&2
        exit 1
    fi
done
if [ ! -d node_modules/@napi-rs/cli ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    npm ci --no-audit --no-fund --loglevel=error
fi
# The native module (release), unless it is newer than every source it is built from.
module=$(ls synap-database.*.node 2>/dev/null | head -n 1 || true)
if [ -z "$module" ] || [ -n "$(find core node migrations Cargo.toml Cargo.lock package.json \
        -newer "$module" -type f -print -quit)" ]; then
    npm run --silent build
fi
export DATABASE_URL="${DATABASE_URL:-$(scripts/db.sh start)}"
node examples/test-event-repository.mjs
