#!/usr/bin/env bash
# Sets everything up and runs the design document's sample script against the private cluster
# (or against DATABASE_URL when it is set).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
export DATABASE_URL="${DATABASE_URL:-$(scripts/db.sh start)}"
node examples/test-event-repository.mjs
