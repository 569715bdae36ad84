"""PyTorch peers on CUDA for tools/gpu-check.sh, measured on the same GPU as runner's kernels.

    python cuda_baselines.py matmul MxNxK[,MxNxK...] REPS
        torch.matmul x @ w.T in f32 (TF32 off: the same arithmetic as runner's f32 kernels)
        and in bf16 (cuBLAS tensor cores), median milliseconds per shape.
    python cuda_baselines.py train CONFIG_JSON SEQ STEPS [--nf4] [--bf16] [--checkpointing]
        one PyTorch + PEFT training step of the guide's LoRA (r 16, alpha 16, dropout 0.05,
        all-linear, modules_to_save lm_head + embed_tokens) on random weights of CONFIG_JSON's
        shape, batch 1 x SEQ tokens holding one image; --nf4 loads the base through
        bitsandbytes with the guide's BitsAndBytesConfig (NF4, double quant, bf16 compute and
        storage), --bf16 keeps the model in bfloat16 as the guide's bf16=True run does. Median
        step seconds and torch.cuda.max_memory_allocated.

Each prints one JSON line per measurement; without CUDA (or without bitsandbytes for --nf4)
one line {"cuda": false, "why": ...} so the table can say "no CUDA".
"""
import json
import sys
import tempfile
import time


def no_cuda(why):
    print(json.dumps({"cuda": False, "why": why}))
    sys.exit(0)


try:
    import torch
except ImportError:
    no_cuda("torch is not installed")
if not torch.cuda.is_available():
    no_cuda("torch sees no CUDA device")
DEVICE = torch.cuda.get_device_name(0)


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def matmul(shapes, reps):
    torch.backends.cuda.matmul.allow_tf32 = False
    for shape in shapes.split(","):
        m, n, k = (int(v) for v in shape.split("x"))
        for dtype, name in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            w = torch.randn(n, k, device="cuda", dtype=dtype)
            x @ w.T
            torch.cuda.synchronize()
            times = []
            for _ in range(max(reps, 3)):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                x @ w.T
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            print(json.dumps({"bench": "matmul", "peer": "torch", "kernel": name, "m": m, "n": n,
                              "k": k, "ms": median(times), "device": DEVICE}), flush=True)


def train(config_path, seq, steps, nf4, bf16, checkpointing):
    from peft import get_peft_model
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from bench_batch import lora_config, step_batch

    config = Gemma3Config.from_dict(json.load(open(config_path)))
    config._attn_implementation = "eager"
    dtype = torch.bfloat16 if (bf16 or nf4) else torch.float32
    torch.manual_seed(0)
    if nf4:
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            no_cuda("bitsandbytes is not installed (carry its wheel: tools/gpu-check.sh --prepare)")
        # The guide's loading path: a checkpoint quantized as from_pretrained loads it.
        with tempfile.TemporaryDirectory() as tmp:
            Gemma3ForConditionalGeneration._from_config(config, torch_dtype=dtype).save_pretrained(tmp)
            bnb = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16,
            )
            model = Gemma3ForConditionalGeneration.from_pretrained(
                tmp, quantization_config=bnb, torch_dtype=dtype, device_map="cuda",
                attn_implementation="eager",
            )
    else:
        model = Gemma3ForConditionalGeneration._from_config(config, torch_dtype=dtype).cuda()
    model = get_peft_model(model, lora_config())
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-5)
    data = {k: v.cuda() for k, v in step_batch(config, seq, pixel_dtype=dtype).items()}
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 or nf4):
            loss = model(**data).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step > 0 or steps == 0:  # the first step warms up allocators and lazy init
            times.append(time.perf_counter() - t0)
    print(json.dumps({
        "bench": "train", "peer": "torch", "config": config_path.rsplit("/", 1)[-1], "seq": seq,
        "nf4": nf4, "bf16": bf16, "checkpointing": checkpointing, "step_s": median(times),
        "peak_bytes": torch.cuda.max_memory_allocated(), "device": DEVICE,
    }), flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("matmul", "train"):
        sys.exit(__doc__)
    if sys.argv[1] == "matmul":
        matmul(sys.argv[2], int(sys.argv[3]))
    else:
        flags = set(sys.argv[5:])
        train(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), "--nf4" in flags, "--bf16" in flags,
              "--checkpointing" in flags)
