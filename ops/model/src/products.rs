//! The matrix products of a model's training step, as `runner gpu --tune` tunes them ahead of
//! the first run.

use std::collections::HashSet;

use engine::gpu::tune::{ShapeClass, TuneShape};

use crate::ModelConfig;

/// How the base's linear weights are stored, which decides the products' kernel variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseWeights {
    /// Dense, widened to f32 (f32 or f16 checkpoints).
    F32,
    /// Dense bf16, kept as stored (Gemma 3's Hub checkpoints).
    Bf16,
    /// bitsandbytes NF4 (QLoRA).
    Nf4,
}

/// The products of one training step of a Gemma 3 model over `tokens` text tokens and one
/// image per example: every linear layer's forward `x·Wᵀ` and input gradient `dy·W` on a base
/// stored as `base`, text decoder and SigLIP tower; one entry per shape class.
pub fn model_products(config: &ModelConfig, tokens: usize, base: BaseWeights) -> Vec<TuneShape> {
    let (nf4, bf16_b) = (base == BaseWeights::Nf4, base == BaseWeights::Bf16);
    let t = config.text();
    let mut layers = vec![
        (
            "text q_proj",
            tokens,
            t.hidden_size,
            t.num_attention_heads * t.head_dim,
        ),
        (
            "text k/v_proj",
            tokens,
            t.hidden_size,
            t.num_key_value_heads * t.head_dim,
        ),
        (
            "text o_proj",
            tokens,
            t.num_attention_heads * t.head_dim,
            t.hidden_size,
        ),
        (
            "text gate/up_proj",
            tokens,
            t.hidden_size,
            t.intermediate_size,
        ),
        ("text down_proj", tokens, t.intermediate_size, t.hidden_size),
    ];
    if let Some(v) = config.vision() {
        let patches = v.num_patches();
        layers.extend([
            (
                "vision q/k/v/out_proj",
                patches,
                v.hidden_size,
                v.hidden_size,
            ),
            ("vision fc1", patches, v.hidden_size, v.intermediate_size),
            ("vision fc2", patches, v.intermediate_size, v.hidden_size),
        ]);
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (name, rows, inputs, outputs) in layers {
        let (m, i, o) = (rows as u32, inputs as u32, outputs as u32);
        for (what, n, k, trans_b) in [("forward", o, i, true), ("input gradient", i, o, false)] {
            let shape = TuneShape {
                label: format!("{name}, {what}"),
                m,
                n,
                k,
                trans_a: false,
                trans_b,
                nf4,
                bf16_b,
            };
            let features: &[&str] = match base {
                BaseWeights::Nf4 => &["NF4"],
                BaseWeights::Bf16 => &["BF16B"],
                BaseWeights::F32 => &[],
            };
            if seen.insert(ShapeClass::new(m, n, k, false, trans_b, features).key()) {
                out.push(shape);
            }
        }
    }
    out
}
