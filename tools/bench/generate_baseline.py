"""transformers baseline for ops/examples/generate_bench.rs (issue #15's benchmark).

    python tools/bench/generate_baseline.py CONFIG_JSON PROMPT_LEN NEW_TOKENS THREADS

Builds Gemma3ForConditionalGeneration from CONFIG_JSON with random weights (f32, eager attention), and times
greedy `model.generate` on one prompt of PROMPT_LEN tokens holding one image, on the CPU with THREADS threads:
time to first token (generate with max_new_tokens=1: the vision tower, the prompt forward and one token) and
decode speed ((time for NEW_TOKENS) - (time for 1)) / (NEW_TOKENS - 1) per token; `min_new_tokens` forces every
step. Prints one JSON line: {"ttft_s": .., "decode_tokens_per_s": .., "new_tokens": ..}.
"""
import json
import sys
import time

import torch
from transformers import Gemma3Config, Gemma3ForConditionalGeneration

config_path, prompt_len, new_tokens, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
torch.manual_seed(0)
config = Gemma3Config.from_dict(json.load(open(config_path)))
config._attn_implementation = "eager"
model = Gemma3ForConditionalGeneration(config).eval()

mm = config.mm_tokens_per_image
ids = torch.randint(10, config.boi_token_index, (1, prompt_len))
ids[0, 0] = 2
ids[0, 4] = config.boi_token_index
ids[0, 5 : 5 + mm] = config.image_token_index
ids[0, 5 + mm] = config.eoi_token_index
side = config.vision_config.image_size
inputs = {
    "input_ids": ids,
    "attention_mask": torch.ones_like(ids),
    "token_type_ids": (ids == config.image_token_index).long(),
    "pixel_values": torch.rand(1, 3, side, side) * 2 - 1,
}


def timed(n):
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(**inputs, do_sample=False, max_new_tokens=n, min_new_tokens=n, top_k=None, top_p=None)
    return time.perf_counter() - start


timed(2)  # warm-up
ttft = timed(1)
total = timed(new_tokens)
print(json.dumps({"ttft_s": ttft, "decode_tokens_per_s": (new_tokens - 1) / (total - ttft), "new_tokens": new_tokens}))
