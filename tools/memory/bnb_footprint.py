"""What transformers + bitsandbytes report for a Gemma 3 model loaded in 4-bit NF4
(`model.get_memory_footprint()`), computed without weights and without a GPU.

bitsandbytes quantizes only when weights are moved to a device, so the 4B model cannot be
loaded here; instead this script builds the model on the meta device and applies the rule
`get_memory_footprint` follows for a 4-bit model: sum over parameters of numel * element_size,
where each Linear that transformers converts (same `get_keys_to_not_convert` /
`should_convert_module` as `Bnb4BitHfQuantizer`) is a Params4bit holding the packed uint8 codes
([ceil(n/2), 1]); absmax and the rest of the quant state are not parameters and are not
counted; plus buffers. `--check` first validates that rule against a real 4-bit load
(`from_pretrained(..., quantization_config=BitsAndBytesConfig(...))` on CPU) of a tiny model.

Usage: /work/venv/bin/python tools/memory/bnb_footprint.py recipes/configs/gemma-3-4b-it.config.json [--check]
"""
import json
import sys
import tempfile

import torch
from transformers import BitsAndBytesConfig, Gemma3Config, Gemma3ForConditionalGeneration
from transformers.quantizers.base import get_keys_to_not_convert
from transformers.quantizers.quantizers_utils import should_convert_module


def footprint_rule(model):
    skip = get_keys_to_not_convert(model)
    quantized = {
        name + ".weight"
        for name, mod in model.named_modules()
        if type(mod) is torch.nn.Linear and should_convert_module(name, skip)
    }
    params = 0
    for name, p in model.named_parameters():
        params += (p.numel() + 1) // 2 if name in quantized else p.numel() * p.element_size()
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return params, buffers, len(quantized)


def buffer_dtype(name, buf):
    # from_pretrained(dtype=bfloat16) casts embed_scale with the weights but keeps RoPE's
    # inv_freq buffers in float32 (seen on the real load that --check runs).
    return torch.bfloat16 if name.endswith("embed_scale") else buf.dtype


def meta_model(config):
    with torch.device("meta"):
        model = Gemma3ForConditionalGeneration(config)
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    for mod in model.modules():
        for name, buf in list(mod._buffers.items()):
            if buf is not None:
                mod._buffers[name] = buf.to(buffer_dtype(name, buf))
    return model


def check():
    torch.manual_seed(0)
    cfg = Gemma3Config(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2, sliding_window_pattern=3,
                         num_key_value_heads=1, head_dim=32, vocab_size=1024, sliding_window=8),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                           image_size=56, patch_size=14, vision_use_head=False),
        mm_tokens_per_image=4,
    )
    with tempfile.TemporaryDirectory() as d:
        Gemma3ForConditionalGeneration(cfg).to(torch.bfloat16).save_pretrained(d)
        q = Gemma3ForConditionalGeneration.from_pretrained(
            d,
            dtype=torch.bfloat16,
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16),
        )
        real = q.get_memory_footprint()
        real_params = q.get_memory_footprint(return_buffers=False)
    p, b, n = footprint_rule(meta_model(cfg))
    print(f"check (tiny model, real CPU load): get_memory_footprint = {real} (params {real_params}); rule = {p + b} (params {p})")
    assert (p + b, p) == (real, real_params), "the rule does not reproduce get_memory_footprint"


def main():
    if "--check" in sys.argv:
        check()
    path = [a for a in sys.argv[1:] if not a.startswith("--")][0]
    cfg = Gemma3Config(**{k: v for k, v in json.load(open(path)).items() if k not in ("architectures",)})
    p, b, n = footprint_rule(meta_model(cfg))
    print(f"{path}: {n} Linear weights quantized")
    print(f"get_memory_footprint() = {p + b} bytes ({(p + b) / 2**30:.3f} GiB); return_buffers=False: {p} bytes")


if __name__ == "__main__":
    main()
