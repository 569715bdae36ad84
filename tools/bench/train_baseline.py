"""PyTorch + PEFT baseline for ops/examples/train_bench.rs (issue 7's benchmark).

    python tools/bench/train_baseline.py CONFIG_JSON SEQ_LEN STEPS THREADS

Builds Gemma3ForConditionalGeneration from CONFIG_JSON with random weights (f32, eager
attention), wraps it in PEFT as the guide does (r 16, alpha 16, dropout 0.05, all-linear,
modules_to_save lm_head + embed_tokens), and times optimizer steps of AdamW on one example of
SEQ_LEN tokens holding one image (batch 1), on the CPU with THREADS threads, with and without
gradient checkpointing. Prints one JSON line per setting:
{"gradient_checkpointing": .., "step_s": .., "tokens_per_s": .., "peak_rss_bytes": ..}
(peak RSS is the process maximum so far: the second setting reports the larger of the two).
"""
import json
import resource
import sys
import time

import torch
from peft import get_peft_model
from transformers import Gemma3Config, Gemma3ForConditionalGeneration

from bench_batch import lora_config, step_batch

config_path, seq_len, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
torch.manual_seed(0)
config = Gemma3Config.from_dict(json.load(open(config_path)))
config._attn_implementation = "eager"


for checkpointing in (False, True):
    model = Gemma3ForConditionalGeneration(config).float()
    model = get_peft_model(model, lora_config())
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)
    data = step_batch(config, seq_len)
    times = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        loss = model(**data).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step > 0:  # the first step warms up allocators and lazy init
            times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    print(json.dumps({
        "gradient_checkpointing": checkpointing,
        "step_s": step_s,
        "tokens_per_s": seq_len / step_s,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "loss": float(loss),
    }), flush=True)
