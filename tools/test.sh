#!/usr/bin/env bash
# The test command of the README: installs what the machine lacks, then runs every test of the
# workspace. Extra arguments go to `cargo test` (e.g. `tools/test.sh -p runner`).
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup.sh

ensure_rust
ensure_c_toolchain
ensure_vulkan
# Graphviz: the CLI tests check that `runner graph` output is accepted by `dot -Tsvg`.
command -v dot >/dev/null 2>&1 || ensure_packages graphviz

cargo test --workspace "$@"
