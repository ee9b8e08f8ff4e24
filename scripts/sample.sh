#!/usr/bin/env bash
# Sets everything up and runs the design document's sample script against the private cluster.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
export DATABASE_URL="${DATABASE_URL:-$(scripts/db.sh start)}"
cargo run -q -p synap-events --example sample
