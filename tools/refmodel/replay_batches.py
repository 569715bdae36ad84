"""Collates the MMIU micro-batches of the recorded SFTTrainer run (tests/fixtures/golden/lora/train.json,
`micro_batch_rows_in_order`) with the guide's collate_fn from tools/fixtures/make.py, so the Rust reference
can replay the 3 optimizer steps. Writes ops/tests/data/replay_batches.safetensors with, per micro-batch i,
`mb{i}.{input_ids,attention_mask,token_type_ids,labels}` (I64 [B, T]) and `mb{i}.pixel_values` (F32).

Run from the repository root: /work/venv/bin/python tools/refmodel/replay_batches.py
"""

import json
import os
import sys
import tempfile
from pathlib import Path

root = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(root / "tools" / "fixtures"))
import make  # noqa: E402  (its main() is guarded)

from safetensors.torch import save_file  # noqa: E402


def main():
    fixtures = root / "tests" / "fixtures"
    order = json.loads((fixtures / "golden" / "lora" / "train.json").read_text())["micro_batch_rows_in_order"]
    with tempfile.TemporaryDirectory(prefix="replay-batches-") as tmp:
        work = Path(tmp)
        os.environ["HF_HOME"] = str(work / "hf-home")
        os.environ["HF_HUB_CACHE"] = str(fixtures / "hf-cache" / "hub")
        os.environ["HF_DATASETS_CACHE"] = str(work / "datasets-cache")
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        processor, _, _, _, _ = make.load_everything(work)
        # format_data ran inside load_everything's chdir; redo it there to get the formatted rows.
        import contextlib
        import datasets
        from huggingface_hub import snapshot_download

        mmiu = datasets.load_dataset(snapshot_download(make.MMIU_REPO, repo_type="dataset"))
        with contextlib.chdir(work / "mmiu-extract"):
            formatted = make.format_data(mmiu["test"][:])["messages"]
        collate = make.make_collate_fn(processor, "intended")
        out = {}
        for i, rows in enumerate(order):
            b = collate([{"messages": formatted[r]} for r in rows])
            for k in ("input_ids", "attention_mask", "token_type_ids", "labels"):
                out[f"mb{i}.{k}"] = b[k].to(make.torch.int64).contiguous()
            out[f"mb{i}.pixel_values"] = b["pixel_values"].to(make.torch.float32).contiguous()
        dst = root / "ops" / "tests" / "data" / "replay_batches.safetensors"
        save_file(out, str(dst), metadata={"order": json.dumps(order)})
        print("wrote", dst, sum(t.numel() * t.element_size() for t in out.values()), "bytes")


if __name__ == "__main__":
    main()
