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

# The GPU kernels at the other subgroup widths lavapipe executes: 4 and 16 lanes (128- and
# 512-bit vectors; the run above has 8). The variable only affects llvmpipe; on a GPU driver
# these reruns see the same adapter. RUNNER_TEST_WIDTHS=0 skips them.
if [ $# -eq 0 ] && [ "${RUNNER_TEST_WIDTHS:-1}" != 0 ]; then
    for bits in 128 512; do
        echo "== GPU kernel tests with LP_NATIVE_VECTOR_WIDTH=$bits"
        LP_NATIVE_VECTOR_WIDTH=$bits cargo test --workspace --lib -- gpu::
    done
fi
