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
from peft import LoraConfig, get_peft_model
from transformers import Gemma3Config, Gemma3ForConditionalGeneration

config_path, seq_len, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
torch.manual_seed(0)
config = Gemma3Config.from_dict(json.load(open(config_path)))
config._attn_implementation = "eager"
text, vision = config.text_config, config.vision_config


def batch():
    mm = config.mm_tokens_per_image
    ids = torch.randint(10, config.boi_token_index, (1, seq_len))
    start = 4
    ids[0, start] = config.boi_token_index
    ids[0, start + 1 : start + 1 + mm] = config.image_token_index
    ids[0, start + 1 + mm] = config.eoi_token_index
    token_type_ids = (ids == config.image_token_index).long()
    labels = ids.clone()
    labels[token_type_ids == 1] = -100
    labels[ids == config.boi_token_index] = -100
    pixels = torch.randn(1, 3, vision.image_size, vision.image_size)
    return dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        token_type_ids=token_type_ids,
        pixel_values=pixels,
        labels=labels,
    )


for checkpointing in (False, True):
    model = Gemma3ForConditionalGeneration(config).float()
    peft_config = LoraConfig(
        r=16, lora_alpha=16, lora_dropout=0.05, bias="none", target_modules="all-linear",
        task_type="CAUSAL_LM", modules_to_save=["lm_head", "embed_tokens"],
    )
    model = get_peft_model(model, peft_config)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)
    data = batch()
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
