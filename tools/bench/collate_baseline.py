"""Python baseline for ops/examples/collate_bench.rs: the guide's collate_fn (MMIU branch) with
the HF processor, over the same JPEG files and conversations.

    python tools/bench/collate_baseline.py EXAMPLES_JSON MODEL_DIR

Per batch of 1 (the guide's MMIU setting) it opens each image and converts it to RGB (the guide's
format_data), applies the chat template and .strip(), calls processor(text, images,
padding=True, return_tensors="pt") and builds the labels exactly as the guide does. Prints
examples/s ("RATE <x>"), the CPU time it used (how many cores it kept busy) and peak RSS.
"""
import json, os, resource, sys, time

import torch
from PIL import Image
from transformers import AutoProcessor

examples_json, model_dir = sys.argv[1], sys.argv[2]
spec = json.load(open(examples_json))
root = spec["files_root"]
processor = AutoProcessor.from_pretrained(model_dir)
processor.tokenizer.padding_side = "right"
print(f"python: transformers image processor backend = {type(processor.image_processor).__name__}")


def collate_fn(examples):
    texts = [processor.apply_chat_template(e["messages"], tokenize=False, add_generation_prompt=False).strip() for e in examples]
    images = [[Image.open(os.path.join(root, p)).convert("RGB") for p in e["images"]] for e in examples]
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
    labels = batch["input_ids"].clone()
    image_token_id = [processor.tokenizer.convert_tokens_to_ids(processor.tokenizer.special_tokens_map["boi_token"])]
    labels[labels == processor.tokenizer.pad_token_id] = -100
    labels[labels == image_token_id] = -100
    labels[labels == 262144] = -100
    batch["labels"] = labels
    return batch


examples = spec["examples"]
collate_fn(examples[:1])  # warm-up (lazy imports)
t0 = time.perf_counter()
cpu0 = time.process_time()
checksum = 0.0
for e in examples:
    b = collate_fn([e])
    pv = b["pixel_values"].reshape(-1)
    checksum += float(pv[pv.numel() // 2])
dt = time.perf_counter() - t0
cpu = time.process_time() - cpu0
rate = len(examples) / dt
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
threads = f"torch threads {torch.get_num_threads()}"
print(f"python 1 process : {rate:8.2f} examples/s ({dt:.2f} s, CPU {cpu:.2f} s = {cpu / dt:.2f} cores busy, {threads}, peak RSS {peak:.0f} MiB, checksum {checksum:.3f})")
print(f"RATE {rate}")
