#!/usr/bin/env python3
"""PEFT compatibility proof for issue 8 (run by hand; CI never needs Python).

Loads the adapter folder that `runner run recipes/demo.toml` saved, with PEFT, onto the same
base model, replays the inputs the runner's `eval` op recorded (logits.safetensors), and compares
PEFT's logits with the runner's. Writes the result and the adapter's layout (keys, shapes,
config keys) as a golden JSON that `runner/tests/demo.rs` checks every saved folder against.

    /work/venv/bin/python tools/peft_compat/check.py \
        --adapter recipes/demo-tiny-gemma-3-MMIU \
        --eval <cache>/<eval op key> \
        --model tests/fixtures/hf-cache/hub/models--runner-test--tiny-gemma-3/snapshots/<rev> \
        --out tests/fixtures/golden/peft_compat.json

Fails (exit 1) when PEFT warns while loading, when a key is missing or unexpected, or when the
logits differ by more than 1e-4 relative Frobenius error.
"""

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

TOLERANCE = 1e-4


class Capture(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


def rel_frobenius(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float(torch.linalg.norm(got - want) / torch.linalg.norm(want))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", required=True, type=Path, help="the folder `save` wrote")
    ap.add_argument("--eval", required=True, type=Path, help="the `eval` op's output folder")
    ap.add_argument("--model", required=True, type=Path, help="the base model folder")
    ap.add_argument("--out", required=True, type=Path, help="the golden JSON to write")
    ap.add_argument(
        "--peft-reference",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "tests/fixtures/golden/lora/adapter_init",
        help="an adapter PEFT saved for the same base (its load warnings are PEFT's own)",
    )
    args = ap.parse_args()

    import peft
    import transformers
    from peft import PeftModel
    from transformers import Gemma3ForConditionalGeneration

    capture = Capture()
    for name in ("peft", "transformers"):
        logging.getLogger(name).addHandler(capture)
    transformers.logging.set_verbosity_warning()

    torch.manual_seed(0)
    def load_capturing(adapter_dir):
        capture.records.clear()
        model = Gemma3ForConditionalGeneration.from_pretrained(
            args.model, dtype=torch.float32, attn_implementation="eager"
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = PeftModel.from_pretrained(model, adapter_dir)
        return model, [str(w.message) for w in caught] + list(capture.records)

    # What PEFT says about an adapter PEFT itself saved with the guide's LoraConfig (e.g. that a
    # tied layer is in modules_to_save) is not a fault of ours: only warnings beyond those count.
    _, peft_own_warnings = load_capturing(args.peft_reference)
    model, all_warnings = load_capturing(args.adapter)
    model.eval()
    load_warnings = [w for w in all_warnings if w not in peft_own_warnings]

    recorded = load_file(args.eval / "logits.safetensors")
    batches = sorted({k.split(".")[1] for k in recorded if k.startswith("batch.")}, key=int)
    errors = {}
    with torch.no_grad():
        for i in batches:
            p = f"batch.{i}."
            kwargs = {
                "input_ids": recorded[p + "input_ids"],
                "attention_mask": recorded[p + "attention_mask"],
                "token_type_ids": recorded[p + "token_type_ids"],
            }
            if p + "pixel_values" in recorded:
                kwargs["pixel_values"] = recorded[p + "pixel_values"]
            logits = model(**kwargs).logits
            errors[i] = rel_frobenius(recorded[p + "logits"], logits)

    tensors = {}
    with safe_open(args.adapter / "adapter_model.safetensors", "pt") as f:
        for k in f.keys():
            t = f.get_slice(k)
            tensors[k] = {"shape": list(t.get_shape()), "dtype": t.get_dtype()}
    config = json.loads((args.adapter / "adapter_config.json").read_text())

    result = {
        "generator": "tools/peft_compat/check.py",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "tolerance": TOLERANCE,
        "logits_rel_frobenius": errors,
        "load_warnings": load_warnings,
        "peft_own_warnings": peft_own_warnings,
        "adapter_tensors": tensors,
        "adapter_config_keys": sorted(config.keys()),
        "adapter_config": {
            k: config[k]
            for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias",
                      "use_rslora", "target_modules", "modules_to_save")
        },
    }
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    ok = not load_warnings and errors and max(errors.values()) <= TOLERANCE
    print(json.dumps({"logits_rel_frobenius": errors, "load_warnings": load_warnings}, indent=2))
    print("PEFT compatibility:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
