"""One markdown table from the JSON lines of tools/gpu-check.sh: runner's measurements
(gpu_bench, train_bench with RUNNER_BENCH_JSON) beside PyTorch's on CUDA
(cuda_baselines.py), with their ratios and peak memory.

    python gpu_check_report.py RUNNER_JSONL TORCH_JSONL
"""
import json
import sys


def lines(path):
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


ours, theirs = lines(sys.argv[1]), lines(sys.argv[2])
no_cuda = next((t["why"] for t in theirs if t.get("cuda") is False), None)
adapter = next((o["adapter"] for o in ours if "adapter" in o), "?")
device = next((t["device"] for t in theirs if "device" in t), None)
gib = 1 << 30


def peer(**match):
    for t in theirs:
        if all(t.get(k) == v for k, v in match.items()):
            return t
    return None


def cuda_cell(text):
    return text if device else f"no CUDA ({no_cuda or 'not measured'})"


print(f"runner on **{adapter}**; PyTorch on **{device or 'no CUDA'}**\n")
print("| measurement | runner | PyTorch (CUDA) | runner / PyTorch time | runner peak | PyTorch peak |")
print("| --- | --- | --- | --- | --- | --- |")
# The peer of each runner matmul: f32 against torch f32 (TF32 off), f16 operands and NF4
# against torch bf16 (tensor cores), the math a PyTorch user runs.
peer_kernel = {"f32": "f32", "f16": "bf16", "nf4": "bf16"}
for o in ours:
    if o.get("bench") != "matmul":
        continue
    shape = f"{o['m']}×{o['n']}×{o['k']}"
    t = peer(bench="matmul", kernel=peer_kernel[o["kernel"]], m=o["m"], n=o["n"], k=o["k"])
    flops = 2 * o["m"] * o["n"] * o["k"]
    ours_cell = f"{o['ms']:.3f} ms ({flops / o['ms'] / 1e6:.1f} GFLOP/s)"
    theirs_cell = cuda_cell(t and f"{t['ms']:.3f} ms {t['kernel']} ({flops / t['ms'] / 1e6:.1f} GFLOP/s)")
    ratio = f"{o['ms'] / t['ms']:.2f}×" if t else "–"
    print(f"| matmul {o['kernel']} x·Wᵀ {shape} | {ours_cell} | {theirs_cell} | {ratio} | | |")
for o in ours:
    if o.get("bench") != "train":
        continue
    what = (f"train step {o['config']} seq {o['seq']}"
            + (" NF4" if o["nf4"] else "") + (" bf16" if o["bf16"] else "")
            + (" checkpointing" if o["checkpointing"] else ""))
    t = peer(bench="train", config=o["config"], seq=o["seq"], nf4=o["nf4"], bf16=o["bf16"],
             checkpointing=o["checkpointing"])
    ratio = f"{o['step_s'] / t['step_s']:.2f}×" if t else "–"
    plan = f" (plan {o['plan_bytes'] / gib:.2f})" if "plan_bytes" in o else ""
    theirs_time = cuda_cell(t and f"{t['step_s']:.3f} s")
    theirs_peak = f"{t['peak_bytes'] / gib:.2f} GiB" if t else "–"
    print(f"| {what} | {o['step_s']:.3f} s | {theirs_time} | {ratio} "
          f"| {o['peak_bytes'] / gib:.2f} GiB{plan} | {theirs_peak} |")
