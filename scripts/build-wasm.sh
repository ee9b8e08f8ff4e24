#!/usr/bin/env bash
# Builds the wasm package: wasm/pkg/web (ES module for browsers) and wasm/pkg/node (CommonJS).
# Uses cargo + the wasm-bindgen CLI of exactly the crate's wasm-bindgen version (installed here
# when missing; wasm-pack would try downloads that fail offline), then wasm-opt from the npm
# package `binaryen` when it is installed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

WANT="$(sed -n 's/^wasm-bindgen = "=\(.*\)"/\1/p' wasm/Cargo.toml)"
if ! command -v wasm-bindgen >/dev/null || [ "$(wasm-bindgen --version | awk '{print $2}')" != "$WANT" ]; then
    echo "build-wasm: installing wasm-bindgen-cli $WANT (a few minutes, once)" >&2
    # No --locked: its lockfile pins a webpki-roots that crates.io no longer resolves.
    cargo install wasm-bindgen-cli --version "$WANT"
fi
if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
    rustup target add wasm32-unknown-unknown
fi

cargo build --release --target wasm32-unknown-unknown -p synap-events-wasm
WASM=target/wasm32-unknown-unknown/release/synap_events_wasm.wasm
rm -rf wasm/pkg
wasm-bindgen --target web --out-dir wasm/pkg/web --out-name synap_events "$WASM"
wasm-bindgen --target nodejs --out-dir wasm/pkg/node --out-name synap_events "$WASM"
if [ -x node_modules/.bin/wasm-opt ]; then
    for dir in wasm/pkg/web wasm/pkg/node; do
        node_modules/.bin/wasm-opt -Os "$dir/synap_events_bg.wasm" -o "$dir/synap_events_bg.wasm"
    done
fi
echo "build-wasm: $(stat -c %s "$WASM") bytes from cargo, $(stat -c %s wasm/pkg/web/synap_events_bg.wasm) bytes in wasm/pkg/web ($(gzip -9c wasm/pkg/web/synap_events_bg.wasm | wc -c) gzipped)"
