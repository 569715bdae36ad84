//! Canonical tensor names and the tensors a config implies.
//!
//! Checkpoints name the same tensor differently, by the transformers version that wrote them:
//!
//! | layout | text | vision | projector | head |
//! |---|---|---|---|---|
//! | Hub (transformers 4.50 conversion) | `language_model.model.X` | `vision_tower.vision_model.X` | `multi_modal_projector.X` | `language_model.lm_head.weight` (optional) |
//! | transformers 5 `save_pretrained` | `language_model.model.X` | `vision_tower.X` | `multi_modal_projector.X` | none (tied) |
//! | in-memory / new conversion script | `model.language_model.X` | `model.vision_tower[.vision_model].X` | `model.multi_modal_projector.X` | `lm_head.weight` |
//! | text-only `Gemma3ForCausalLM` | `model.X` | — | — | `lm_head.weight` |
//!
//! Every layout is normalised to ONE canonical naming, the module paths transformers 5 uses in
//! memory for `Gemma3ForConditionalGeneration` (so PEFT adapter keys are
//! `base_model.model.` + canonical module path):
//!
//! - `model.language_model.embed_tokens.weight`, `model.language_model.norm.weight`,
//!   `model.language_model.layers.{i}.{input_layernorm,post_attention_layernorm,pre_feedforward_layernorm,post_feedforward_layernorm}.weight`,
//!   `model.language_model.layers.{i}.self_attn.{q,k,v,o}_proj.weight`, `...self_attn.{q,k}_norm.weight`,
//!   `model.language_model.layers.{i}.mlp.{gate,up,down}_proj.weight`
//! - `model.vision_tower.embeddings.{patch_embedding.{weight,bias},position_embedding.weight}`,
//!   `model.vision_tower.encoder.layers.{i}.{layer_norm1,layer_norm2}.{weight,bias}`,
//!   `model.vision_tower.encoder.layers.{i}.self_attn.{q,k,v,out}_proj.{weight,bias}`,
//!   `model.vision_tower.encoder.layers.{i}.mlp.{fc1,fc2}.{weight,bias}`,
//!   `model.vision_tower.post_layernorm.{weight,bias}`
//! - `model.multi_modal_projector.{mm_input_projection_weight,mm_soft_emb_norm.weight}`
//! - `lm_head.weight` (only when the checkpoint has one; tied to embed_tokens otherwise)
//!
//! The text-only model uses the same `model.language_model.*` names (its transformers module
//! paths are `model.*`; [`hf_module_path`] maps back).

use super::config::ModelConfig;

pub const TEXT: &str = "model.language_model.";
pub const VISION: &str = "model.vision_tower.";
pub const PROJECTOR: &str = "model.multi_modal_projector.";
pub const LM_HEAD: &str = "lm_head.weight";
pub const EMBED_TOKENS: &str = "model.language_model.embed_tokens.weight";

/// Maps a checkpoint key to its canonical name, or `None` if it belongs to no known part.
/// `causal_lm` selects the text-only layout (`model.X` is the text decoder).
pub fn canonical_name(key: &str, causal_lm: bool) -> Option<String> {
    if matches!(
        key,
        "lm_head.weight" | "language_model.lm_head.weight" | "model.lm_head.weight"
    ) {
        return Some(LM_HEAD.to_string());
    }
    let rules: &[(&str, &str)] = if causal_lm {
        &[
            ("model.language_model.", TEXT),
            ("language_model.model.", TEXT),
            ("model.", TEXT),
        ]
    } else {
        &[
            ("model.language_model.", TEXT),
            ("language_model.model.", TEXT),
            ("language_model.", TEXT),
            ("model.vision_tower.vision_model.", VISION),
            ("model.vision_tower.", VISION),
            ("vision_tower.vision_model.", VISION),
            ("vision_tower.", VISION),
            ("model.multi_modal_projector.", PROJECTOR),
            ("multi_modal_projector.", PROJECTOR),
        ]
    };
    rules.iter().find_map(|(prefix, canon)| {
        key.strip_prefix(prefix)
            .map(|rest| format!("{canon}{rest}"))
    })
}

/// The module path transformers 5 gives a canonical module (for skip-module patterns and PEFT).
pub fn hf_module_path(canonical_module: &str, causal_lm: bool) -> String {
    match (causal_lm, canonical_module.strip_prefix(TEXT)) {
        (true, Some(rest)) => format!("model.{rest}"),
        _ => canonical_module.to_string(),
    }
}

/// What kind of tensor a canonical name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorKind {
    /// The weight of an `nn.Linear` (`[out, in]`): what bitsandbytes quantizes.
    LinearWeight,
    /// The output embedding (lm_head): a Linear, but never quantized by default.
    OutputEmbedding,
    /// Everything else (embeddings, norms, biases, the patch conv, the projector's Parameter).
    Other,
}

/// One tensor the config implies.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpectedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: TensorKind,
    /// Whether the checkpoint may lack it (lm_head when tied).
    pub optional: bool,
}

impl ExpectedTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The module path of a linear weight (`...q_proj` for `...q_proj.weight`).
    pub fn module(&self) -> &str {
        self.name.strip_suffix(".weight").unwrap_or(&self.name)
    }
}

/// Every tensor of the model, canonical names, with the shapes the config implies.
pub fn expected_tensors(config: &ModelConfig) -> Vec<ExpectedTensor> {
    let mut out = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, kind: TensorKind| {
        out.push(ExpectedTensor {
            name,
            shape,
            kind,
            optional: false,
        })
    };
    let t = config.text();
    let (h, i, hd) = (t.hidden_size, t.intermediate_size, t.head_dim);
    let (q, kv) = (t.num_attention_heads * hd, t.num_key_value_heads * hd);
    push(
        EMBED_TOKENS.into(),
        vec![t.vocab_size, h],
        TensorKind::Other,
    );
    for l in 0..t.num_hidden_layers {
        let p = format!("{TEXT}layers.{l}.");
        for norm in [
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ] {
            push(format!("{p}{norm}.weight"), vec![h], TensorKind::Other);
        }
        push(
            format!("{p}self_attn.q_proj.weight"),
            vec![q, h],
            TensorKind::LinearWeight,
        );
        push(
            format!("{p}self_attn.k_proj.weight"),
            vec![kv, h],
            TensorKind::LinearWeight,
        );
        push(
            format!("{p}self_attn.v_proj.weight"),
            vec![kv, h],
            TensorKind::LinearWeight,
        );
        push(
            format!("{p}self_attn.o_proj.weight"),
            vec![h, q],
            TensorKind::LinearWeight,
        );
        push(
            format!("{p}self_attn.q_norm.weight"),
            vec![hd],
            TensorKind::Other,
        );
        push(
            format!("{p}self_attn.k_norm.weight"),
            vec![hd],
            TensorKind::Other,
        );
        push(
            format!("{p}mlp.gate_proj.weight"),
            vec![i, h],
            TensorKind::LinearWeight,
        );
        push(
            format!("{p}mlp.up_proj.weight"),
            vec![i, h],
            TensorKind::LinearWeight,
        );
        push(
            format!("{p}mlp.down_proj.weight"),
            vec![h, i],
            TensorKind::LinearWeight,
        );
    }
    push(format!("{TEXT}norm.weight"), vec![h], TensorKind::Other);
    if let (ModelConfig::ConditionalGeneration(g), Some(v)) = (config, config.vision()) {
        let (vh, vi) = (v.hidden_size, v.intermediate_size);
        let ps = v.patch_size();
        push(
            format!("{VISION}embeddings.patch_embedding.weight"),
            vec![vh, v.num_channels, ps, ps],
            TensorKind::Other,
        );
        push(
            format!("{VISION}embeddings.patch_embedding.bias"),
            vec![vh],
            TensorKind::Other,
        );
        push(
            format!("{VISION}embeddings.position_embedding.weight"),
            vec![v.num_patches(), vh],
            TensorKind::Other,
        );
        for l in 0..v.num_hidden_layers {
            let p = format!("{VISION}encoder.layers.{l}.");
            for norm in ["layer_norm1", "layer_norm2"] {
                push(format!("{p}{norm}.weight"), vec![vh], TensorKind::Other);
                push(format!("{p}{norm}.bias"), vec![vh], TensorKind::Other);
            }
            for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                push(
                    format!("{p}self_attn.{proj}.weight"),
                    vec![vh, vh],
                    TensorKind::LinearWeight,
                );
                push(
                    format!("{p}self_attn.{proj}.bias"),
                    vec![vh],
                    TensorKind::Other,
                );
            }
            push(
                format!("{p}mlp.fc1.weight"),
                vec![vi, vh],
                TensorKind::LinearWeight,
            );
            push(format!("{p}mlp.fc1.bias"), vec![vi], TensorKind::Other);
            push(
                format!("{p}mlp.fc2.weight"),
                vec![vh, vi],
                TensorKind::LinearWeight,
            );
            push(format!("{p}mlp.fc2.bias"), vec![vh], TensorKind::Other);
        }
        push(
            format!("{VISION}post_layernorm.weight"),
            vec![vh],
            TensorKind::Other,
        );
        push(
            format!("{VISION}post_layernorm.bias"),
            vec![vh],
            TensorKind::Other,
        );
        push(
            format!("{PROJECTOR}mm_input_projection_weight"),
            vec![vh, g.text_config.hidden_size],
            TensorKind::Other,
        );
        push(
            format!("{PROJECTOR}mm_soft_emb_norm.weight"),
            vec![vh],
            TensorKind::Other,
        );
    }
    out.push(ExpectedTensor {
        name: LM_HEAD.into(),
        shape: vec![t.vocab_size, h],
        kind: TensorKind::OutputEmbedding,
        optional: config.tie_word_embeddings(),
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_layout_maps_to_one_name() {
        let cg = [
            ("language_model.model.layers.3.mlp.up_proj.weight", "model.language_model.layers.3.mlp.up_proj.weight"),
            ("model.language_model.layers.3.mlp.up_proj.weight", "model.language_model.layers.3.mlp.up_proj.weight"),
            ("vision_tower.vision_model.encoder.layers.0.mlp.fc1.bias", "model.vision_tower.encoder.layers.0.mlp.fc1.bias"),
            ("vision_tower.encoder.layers.0.mlp.fc1.bias", "model.vision_tower.encoder.layers.0.mlp.fc1.bias"),
            ("model.vision_tower.vision_model.post_layernorm.weight", "model.vision_tower.post_layernorm.weight"),
            ("model.vision_tower.post_layernorm.weight", "model.vision_tower.post_layernorm.weight"),
            ("multi_modal_projector.mm_input_projection_weight", "model.multi_modal_projector.mm_input_projection_weight"),
            ("language_model.lm_head.weight", "lm_head.weight"),
            ("lm_head.weight", "lm_head.weight"),
            (
                "language_model.model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4",
                "model.language_model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4",
            ),
        ];
        for (key, want) in cg {
            assert_eq!(canonical_name(key, false).as_deref(), Some(want), "{key}");
        }
        assert_eq!(canonical_name("something.else", false), None);
        assert_eq!(
            canonical_name("model.layers.2.self_attn.k_norm.weight", true).as_deref(),
            Some("model.language_model.layers.2.self_attn.k_norm.weight")
        );
        assert_eq!(
            hf_module_path("model.language_model.layers.2.mlp.up_proj", true),
            "model.layers.2.mlp.up_proj"
        );
        assert_eq!(
            hf_module_path("model.language_model.layers.2.mlp.up_proj", false),
            "model.language_model.layers.2.mlp.up_proj"
        );
    }

    /// Parameter count of gemma-3-4b-it from its config: 4,300,079,472 by the config's shapes;
    /// 238 text + 162 vision linears (the 400 LoRA all-linear modules).
    #[test]
    fn gemma_3_4b_tensor_inventory() {
        let c = ModelConfig::from_json(crate::config::GEMMA_3_4B_IT_CONFIG_JSON).unwrap();
        let t = expected_tensors(&c);
        let total: usize = t.iter().filter(|e| !e.optional).map(|e| e.numel()).sum();
        assert_eq!(total, 4_300_079_472);
        let text_lin = t
            .iter()
            .filter(|e| e.kind == TensorKind::LinearWeight && e.name.starts_with(TEXT))
            .count();
        let vis_lin = t
            .iter()
            .filter(|e| e.kind == TensorKind::LinearWeight && e.name.starts_with(VISION))
            .count();
        assert_eq!((text_lin, vis_lin), (238, 162));
    }
}
