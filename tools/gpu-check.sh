#!/usr/bin/env bash
# The device check: one command on a machine with a GPU (and, to know it works, here on
# lavapipe). It prints `runner gpu`, runs every GPU kernel test on that adapter (f32 and f16
# operands, cooperative matrices where the adapter has them), times the matmuls (gpu_bench)
# beside torch.matmul on CUDA in f32 and bf16, and lora-train's step (train_bench: the small
# bench config, and the Gemma 3 4B guide config with an NF4 base) beside PyTorch + PEFT
# (+ bitsandbytes) on CUDA, and writes one markdown table of times, ratios and peak memory.
# Without CUDA the PyTorch column says "no CUDA".
#
#   tools/gpu-check.sh --prepare     # here (cargo): build the binaries into .gpu-check/, fetch
#                                    # the Vulkan loader packages and the bitsandbytes wheel
#   tools/gpu-check.sh [--skip-4b] [--out DIR]
#
# On a machine without cargo (a lent GPU machine) it runs the binaries that --prepare left in
# .gpu-check/ (carry that folder there; it is git-ignored). With cargo and no prepared binaries
# it builds them first. The 4B step needs ~20 GiB of host memory and a GPU: it is skipped on
# CPU adapters (README, Performance, has the by-hand number) and with --skip-4b.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
kit=$root/.gpu-check
out=${OUT:-$root/gpu-check-out}
skip_4b=0
prepare=0
while [ $# -gt 0 ]; do
    case $1 in
        --prepare) prepare=1 ;;
        --skip-4b) skip_4b=1 ;;
        --out) out=$2; shift ;;
        *) echo "usage: tools/gpu-check.sh [--prepare] [--skip-4b] [--out DIR]" >&2; exit 2 ;;
    esac
    shift
done

# Release builds of runner, gpu_bench, train_bench and the unit tests of the engine crate (the
# kernel tests) and the model crate (the model's GPU passes), stripped, into $kit/bin; the checkout they were built in (their tests find fixtures
# by that path) in $kit/build-root.
build_binaries() {
    mkdir -p "$kit/bin"
    cargo build --release -p runner
    cargo build --release -p ops --example gpu_bench --example train_bench
    local crate tests
    cp target/release/runner target/release/examples/gpu_bench target/release/examples/train_bench "$kit/bin/"
    for crate in engine model; do
        tests=$(cargo test --release -p $crate --lib --no-run --message-format=json 2>/dev/null \
            | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["lib"]:
        print(m["executable"])')
        cp "$tests" "$kit/bin/$crate-tests"
    done
    strip "$kit/bin/"* 2>/dev/null || true
    echo "$root" >"$kit/build-root"
}

if [ $prepare = 1 ]; then
    build_binaries
    # The Vulkan loader, as the device README brings it (amd64 packages, unpacked there).
    mkdir -p "$kit/gl" /tmp/amd64/partial
    o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
    # shellcheck disable=SC2086
    apt-get $o update -qq && (cd "$kit/gl" && apt-get $o download -qq libvulkan1)
    # bitsandbytes for the NF4 PyTorch peer (the GPU image has torch, transformers, peft).
    mkdir -p "$kit/wheels"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$kit/wheels" bitsandbytes==0.50.2 ||
        echo "warning: no bitsandbytes wheel: the NF4 PyTorch column will say so" >&2
    # A lent machine takes 64 MiB of working tree: keep the wheel's CPU and CUDA 13 libraries
    # (the GPU image's torch is cu130) and pack the binaries with xz.
    for whl in "$kit"/wheels/*.whl; do
        python3 - "$whl" <<'PY'
import re, sys, zipfile
path = sys.argv[1]
with zipfile.ZipFile(path) as src:
    items = [(i, src.read(i)) for i in src.infolist()
             if not re.search(r"libbitsandbytes_(cuda1[12]\d|rocm|xpu)", i.filename)]
with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
    for info, data in items:
        dst.writestr(info, data)
PY
    done
    tar -C "$kit" -cJf "$kit/bin.tar.xz" bin
    du -sh "$kit/bin.tar.xz" "$kit/wheels" "$kit/gl"
    echo "on a lent machine, carry .gpu-check/bin.tar.xz .gpu-check/build-root .gpu-check/gl .gpu-check/wheels"
    exit 0
fi

# --- the Vulkan loader and driver ---
if ! ldconfig -p | grep -q 'libvulkan.so.1'; then
    if ls "$kit"/gl/*.deb >/dev/null 2>&1; then
        for f in "$kit"/gl/*.deb; do dpkg -x "$f" /; done
        ldconfig
    else
        source tools/setup.sh
        ensure_vulkan
    fi
fi
nvidia_icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [ -z "${VK_DRIVER_FILES:-}" ] && [ -f $nvidia_icd ] && ! ls /usr/share/vulkan/icd.d/nvidia* >/dev/null 2>&1; then
    export VK_DRIVER_FILES=$nvidia_icd
    export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
fi

# --- the binaries ---
if [ ! -x "$kit/bin/runner" ] && [ -f "$kit/bin.tar.xz" ]; then
    tar -C "$kit" -xJf "$kit/bin.tar.xz"
fi
if [ ! -x "$kit/bin/runner" ]; then
    command -v cargo >/dev/null || { echo "no cargo and no $kit/bin: run tools/gpu-check.sh --prepare where cargo is, and bring .gpu-check" >&2; exit 1; }
    build_binaries
fi
built_in=$(cat "$kit/build-root")
if [ "$built_in" != "$root" ] && [ ! -e "$built_in" ]; then
    # the tests read fixtures by the path they were built at
    mkdir -p "$(dirname "$built_in")" && ln -s "$root" "$built_in"
fi

# --- bitsandbytes from the carried wheel, where python lacks it ---
python=${RUNNER_BENCH_PYTHON:-python3}
if ! $python -c 'import bitsandbytes' 2>/dev/null && ls "$kit"/wheels/*.whl >/dev/null 2>&1; then
    $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu-check-site "$kit"/wheels/*.whl && export PYTHONPATH=/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}
fi

mkdir -p "$out"
rm -f "$out/runner.jsonl" "$out/torch.jsonl"
export RUNNER_BENCH_JSON=$out/runner.jsonl
status=0
step() { echo; echo "== $*"; }

step "runner gpu"
"$kit/bin/runner" gpu | tee "$out/gpu.txt"
cpu_adapter=0
grep -q '^adapter:.*(Cpu,' "$out/gpu.txt" && cpu_adapter=1

step "kernel tests on this adapter (every family; f32 and f16 operands; cooperative matrices where present)"
if (cd "$root/ops/engine" && "$kit/bin/engine-tests" gpu:: && cd "$root/ops/model" && "$kit/bin/model-tests" gpu::) >"$out/kernel-tests.txt" 2>&1; then
    grep '^test result' "$out/kernel-tests.txt"
else
    status=1
    grep -E '^test .*FAILED|^test result|panicked' "$out/kernel-tests.txt" | head -40
fi

shapes=${RUNNER_BENCH_SHAPES:-1024x1024x1024,2048x2048x2048,512x10240x2560}
step "matmul: runner (gpu_bench) and torch.matmul"
RUNNER_BENCH_SHAPES=$shapes RUNNER_BENCH_PYTHON=/nonexistent "$kit/bin/gpu_bench" | tee "$out/gpu_bench.txt"
$python tools/bench/cuda_baselines.py matmul "$shapes" 5 | tee -a "$out/torch.jsonl"

small=recipes/configs/bench-small-gemma-3.config.json
step "train step, small bench config: runner (train_bench) and PyTorch + PEFT"
RUNNER_BENCH_PYTHON=/nonexistent "$kit/bin/train_bench" 512 3 | tee "$out/train_small.txt"
for ckpt in "" --checkpointing; do
    # shellcheck disable=SC2086
    $python tools/bench/cuda_baselines.py train $small 512 3 $ckpt | tee -a "$out/torch.jsonl"
done

if [ $skip_4b = 1 ] || [ $cpu_adapter = 1 ]; then
    step "4B step skipped ($([ $skip_4b = 1 ] && echo --skip-4b || echo 'CPU adapter: an hour here; README has the by-hand number'))"
else
    big=recipes/configs/gemma-3-4b-it.config.json
    step "train step, Gemma 3 4B (NF4 base, bf16 tables, checkpointing): runner and PyTorch + PEFT + bitsandbytes"
    "$kit/bin/train_bench" --config $big --seq 512 --steps 2 --nf4 --bf16 --checkpointing | tee "$out/train_4b.txt"
    $python tools/bench/cuda_baselines.py train $big 512 2 --nf4 --bf16 --checkpointing | tee -a "$out/torch.jsonl"
fi

step "table"
$python tools/bench/gpu_check_report.py "$out/runner.jsonl" "$out/torch.jsonl" | tee "$out/gpu-check.md"
exit $status
