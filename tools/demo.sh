#!/usr/bin/env bash
# The demo of the README: installs what the machine lacks, builds `runner` (release) and runs
# recipes/demo.toml end to end (offline, tiny). Extra arguments go to `runner run`.
set -euo pipefail
cd "$(dirname "$0")/.."

recipe=recipes/demo.toml
if [ ! -f "$recipe" ]; then
    echo "tools/demo.sh: $recipe is missing from this checkout; the demo recipe has not been added yet" >&2
    exit 1
fi

source tools/setup.sh
ensure_rust
ensure_c_toolchain
ensure_vulkan

# The demo runs offline on the miniature Hub repos the project ships.
export HF_HUB_CACHE="${HF_HUB_CACHE:-$PWD/tests/fixtures/hf-cache/hub}"
export HF_HUB_OFFLINE=1

cargo build --release -p runner
cargo run --release -q -p runner -- run "$recipe" "$@"
