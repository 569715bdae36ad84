"""What the training baselines (train_baseline.py on CPU, cuda_baselines.py train on CUDA) feed
the model: one example of `seq_len` tokens with one image, labelled as the guide's collate_fn
labels it, and the guide's LoRA config. One copy, so the two baselines time the same step."""

import torch
from peft import LoraConfig


def step_batch(config, seq_len, pixel_dtype=torch.float32):
    """input_ids with one image (boi, mm_tokens_per_image image tokens, eoi) after 4 text
    tokens; labels -100 on the image tokens and boi, as the guide's collate_fn masks them."""
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
    side = config.vision_config.image_size
    return dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        token_type_ids=token_type_ids,
        pixel_values=torch.randn(1, 3, side, side, dtype=pixel_dtype),
        labels=labels,
    )


def lora_config():
    """The guide's LoraConfig (r 16, all linear layers, lm_head and embed_tokens trained)."""
    return LoraConfig(
        r=16, lora_alpha=16, lora_dropout=0.05, bias="none", target_modules="all-linear",
        task_type="CAUSAL_LM", modules_to_save=["lm_head", "embed_tokens"],
    )
