//! Prints the device memory plan of the guide's two recipes as `lora-train` would run them on
//! a model config (default: google/gemma-3-4b-it's, committed at
//! recipes/configs/gemma-3-4b-it.config.json): QLoRA NF4, r 16 all-linear with the vision tower,
//! lm_head + embed_tokens in modules_to_save, dropout 0.05, gradient checkpointing, on a GPU
//! (no staging textures) with 128 MiB storage bindings —
//!
//! - MMIU (recipes/mmiu.toml): batch 1 of 2048 tokens holding 4 images;
//! - llava (recipes/llava.toml): batch 8 of 640 tokens with one image each (accumulation 4 does
//!   not change one micro-batch's memory) —
//!
//! with `optim = "adamw_torch"` (the recipes' default) and `"adamw_offload"`, next to the same
//! job on PyTorch + bitsandbytes + PEFT + TRL computed from its components, and as its last line
//! `guide plans: mmiu X GiB, llava Y GiB` (device totals with adamw_torch).
//!
//! `cargo run --release -p ops --example memory_plan -- [config.json]`

use ops::model::config::{FloatDtype, ModelConfig, GEMMA_3_4B_IT_CONFIG_JSON};
use ops::model::memory::{
    bnb_parameter_footprint, nf4_state_bytes, ActivationPlan, BaseFormat, LoraPlan, MemoryPlan,
};
use ops::model::names::{expected_tensors, TensorKind};
use ops::train::setup::plan_options;

const GIB: f64 = (1u64 << 30) as f64;

struct Guide {
    name: &'static str,
    batch: usize,
    seq_len: usize,
    images_per_sample: usize,
}

const GUIDES: [Guide; 3] = [
    Guide {
        name: "mmiu",
        batch: 1,
        seq_len: 2048,
        images_per_sample: 4,
    },
    Guide {
        name: "llava",
        batch: 8,
        seq_len: 640,
        images_per_sample: 1,
    },
    // the shape of the full-size step run on this machine (train_bench --seq 512 --images 1)
    Guide {
        name: "4b step",
        batch: 1,
        seq_len: 512,
        images_per_sample: 1,
    },
];

fn plan(config: &ModelConfig, g: &Guide, offload: bool) -> anyhow::Result<MemoryPlan> {
    MemoryPlan::build(
        config,
        &plan_options(
            // the quantize op's NF4 (absmax widened to f32 on the device); the tables are
            // bf16 under the recipes' `bf16 = true`
            BaseFormat::Nf4 {
                double_quant: false,
            },
            FloatDtype::BF16,
            LoraPlan {
                r: 16,
                modules_to_save: vec!["lm_head".into(), "embed_tokens".into()],
                // the guide recipes set `bf16 = true`
                modules_to_save_dtype: FloatDtype::BF16,
                vision: true,
                dropout: true,
                optimizer_offload: offload,
            },
            ActivationPlan {
                batch: g.batch,
                seq_len: g.seq_len,
                images_per_sample: g.images_per_sample,
                gradient_checkpointing: true,
                activation_dtype: FloatDtype::F32,
                max_binding_bytes: 128 << 20,
                staged_operands: false,
            },
        ),
    )
}

/// The same job on PyTorch + bitsandbytes + PEFT + TRL with the guide's settings (NF4 double
/// quant, bf16 compute and storage, `bf16=True`, gradient checkpointing), from its components:
/// `(part, what, bytes)`. Assumptions, each a rule of that stack, not a measurement:
/// - weights: `get_memory_footprint` (packed NF4 + bf16 others) plus the NF4 quant state
///   bitsandbytes keeps per Linear (u8 absmax, nested f32 absmax, code tables);
/// - LoRA pairs: f32 (PEFT's `autocast_adapter_dtype` upcasts them) with f32 grads and AdamW m, v;
/// - modules_to_save copies: bf16 params and grads, AdamW m, v in the param dtype (bf16);
/// - activations: bf16 layer inputs of every checkpointed text and SigLIP layer, one text
///   layer's recomputed working set (the bf16 tensors its backward reads, about the same
///   buffers as ours at half width), and the logits: bf16 `[tokens, vocab]`, upcast to f32 for
///   the loss, and the f32 gradient of that upcast (transformers computes all logits at once).
fn pytorch_stack(config: &ModelConfig, g: &Guide) -> Vec<(&'static str, String, u64)> {
    let t = config.text();
    let tokens = (g.batch * g.seq_len) as u64;
    let (h, vocab) = (t.hidden_size as u64, t.vocab_size as u64);
    let mut rows = Vec::new();
    let weights = bnb_parameter_footprint(config, FloatDtype::BF16);
    rows.push((
        "weights",
        "NF4 model (get_memory_footprint)".into(),
        weights,
    ));
    let state: u64 = expected_tensors(config)
        .iter()
        .filter(|e| e.kind == TensorKind::LinearWeight)
        .map(|e| nf4_state_bytes(e.numel() as u64, true).1)
        .sum();
    rows.push(("weights", "NF4 quant state (double quant)".into(), state));
    let lora: u64 = expected_tensors(config)
        .iter()
        .filter(|e| e.kind == TensorKind::LinearWeight)
        .map(|e| 16 * (e.shape[0] + e.shape[1]) as u64)
        .sum();
    rows.push((
        "trainable",
        "LoRA r16 f32 (params + grads + AdamW m, v)".into(),
        lora * 4 * 4,
    ));
    let table = vocab * h;
    rows.push((
        "trainable",
        "lm_head + embed_tokens copies bf16 (params + grads + AdamW m, v)".into(),
        2 * table * 2 * 4,
    ));
    let layers = t.num_hidden_layers as u64;
    rows.push((
        "activations",
        format!("{layers} checkpointed text layer inputs, bf16"),
        layers * tokens * h * 2,
    ));
    if let Some(v) = config.vision() {
        let n = (g.batch * g.images_per_sample * v.num_patches()) as u64;
        let vl = v.num_hidden_layers as u64;
        rows.push((
            "activations",
            format!("{vl} checkpointed SigLIP layer inputs, bf16"),
            vl * n * v.hidden_size as u64 * 2,
        ));
    }
    let (q, kv) = (
        (t.num_attention_heads * t.head_dim()) as u64,
        (t.num_key_value_heads * t.head_dim()) as u64,
    );
    let inter = t.intermediate_size as u64;
    // A decoder layer's saved tensors: 2 norms' outputs + q, k, v (pre and post norm),
    // attention output, o_proj out, residual, gate, up, gelu·up, down, in bf16.
    let layer = tokens * (5 * h + 3 * q + 3 * kv + 3 * inter) * 2;
    rows.push((
        "activations",
        "one text layer recomputed in the backward, bf16".into(),
        layer,
    ));
    rows.push((
        "activations",
        format!("logits [{tokens}, {vocab}]: bf16, f32 upcast, f32 gradient"),
        tokens * vocab * (2 + 4 + 4),
    ));
    rows
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / GIB
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = match args.first() {
        Some(path) => ModelConfig::from_file(std::path::Path::new(path))?,
        None => ModelConfig::from_json(GEMMA_3_4B_IT_CONFIG_JSON)?,
    };
    let mut totals = Vec::new();
    for g in &GUIDES {
        let torch = plan(&config, g, false)?;
        let offload = plan(&config, g, true)?;
        println!(
            "== {}: batch {} x {} tokens, {} image(s) per example, gradient checkpointing, optim adamw_torch ==",
            g.name, g.batch, g.seq_len, g.images_per_sample
        );
        println!("{}", torch.table());
        println!("== {}: the same with optim adamw_offload ==", g.name);
        println!("{}", offload.table());
        let stack = pytorch_stack(&config, g);
        println!("== {}: side by side (GiB) ==", g.name);
        println!(
            "{:<12} {:>12} {:>14} {:>10}",
            "part", "runner", "runner+offl.", "PyTorch"
        );
        for part in ["weights", "trainable", "activations", "staging"] {
            let torch_part: u64 = stack
                .iter()
                .filter(|(p, _, _)| *p == part)
                .map(|r| r.2)
                .sum();
            println!(
                "{part:<12} {:>12.2} {:>14.2} {:>10.2}",
                gib(torch.device_part_total(part)),
                gib(offload.device_part_total(part)),
                gib(torch_part)
            );
        }
        let stack_total: u64 = stack.iter().map(|r| r.2).sum();
        println!(
            "{:<12} {:>12.2} {:>14.2} {:>10.2}",
            "total",
            gib(torch.device_total()),
            gib(offload.device_total()),
            gib(stack_total)
        );
        println!("PyTorch components:");
        for (part, what, bytes) in &stack {
            println!("  {part:<12} {what:<72} {:>8.2} GiB", gib(*bytes));
        }
        println!();
        totals.push(torch.device_total());
    }
    println!(
        "guide plans: mmiu {:.1} GiB, llava {:.1} GiB",
        gib(totals[0]),
        gib(totals[1])
    );
    Ok(())
}
