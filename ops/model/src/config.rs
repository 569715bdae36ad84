//! Model configuration: serde mirrors of the Hugging Face `config.json` of Gemma 3
//! (`Gemma3ForConditionalGeneration`: text + SigLIP vision tower) and of the text-only
//! `Gemma3ForCausalLM` (gemma-3-270m / 1b), with transformers' defaults filled in for every key a
//! Hub config omits, and resolved accessors (layer kinds, RoPE per layer, embedding scale).
//!
//! Defaults and resolution rules follow transformers 5.24 `configuration_gemma3.py`
//! (`Gemma3TextConfig`, `Gemma3Config`, `convert_rope_params_to_dict`) and
//! `configuration_siglip.py` (`SiglipVisionConfig`). Both config layouts are accepted:
//! the older one (`rope_theta`, `rope_local_base_freq`, `rope_scaling`, `sliding_window_pattern`)
//! and transformers 5's (`layer_types`, `rope_parameters` keyed by layer type).

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

mod text;
mod vision;

pub use text::*;
pub use vision::*;

/// google/gemma-3-4b-it's `config.json` as on the Hub (transformers 4.50 layout),
/// for the device memory plan without weights.
pub const GEMMA_3_4B_IT_CONFIG_JSON: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../recipes/configs/gemma-3-4b-it.config.json"
));

/// The architectures this runner implements, as `config.json` names them.
pub const SUPPORTED_ARCHITECTURES: [&str; 2] =
    ["Gemma3ForConditionalGeneration", "Gemma3ForCausalLM"];

/// A parsed and validated model config.
// Parsed once per model: boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    /// `Gemma3ForConditionalGeneration` (`model_type = "gemma3"`): text decoder + SigLIP + projector.
    ConditionalGeneration(Gemma3Config),
    /// `Gemma3ForCausalLM` (`model_type = "gemma3_text"` at top level): the text decoder only.
    CausalLm(Gemma3TextConfig),
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Parses a `config.json` text; the architecture is taken from `architectures[0]`, or from
    /// `model_type` when `architectures` is absent.
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: serde_json::Value =
            serde_json::from_str(text).context("config is not valid JSON")?;
        let obj = raw.as_object().context("config must be a JSON object")?;
        let architectures: Vec<String> = match obj.get("architectures") {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        let model_type = obj.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
        let arch = match architectures.first() {
            Some(a) => a.clone(),
            None => match model_type {
                "gemma3" => "Gemma3ForConditionalGeneration".to_string(),
                "gemma3_text" => "Gemma3ForCausalLM".to_string(),
                "" => bail!(
                    "config names neither `architectures` nor `model_type`; supported architectures: {}",
                    SUPPORTED_ARCHITECTURES.join(", ")
                ),
                other => bail!(
                    "unsupported model_type `{other}` (no `architectures` given); supported architectures: {}",
                    SUPPORTED_ARCHITECTURES.join(", ")
                ),
            },
        };
        let config = match arch.as_str() {
            "Gemma3ForConditionalGeneration" => {
                let c: Gemma3Config = serde_json::from_value(raw.clone())
                    .context("parsing Gemma3ForConditionalGeneration config")?;
                ModelConfig::ConditionalGeneration(c)
            }
            "Gemma3ForCausalLM" => {
                let c: Gemma3TextConfig = serde_json::from_value(raw.clone())
                    .context("parsing Gemma3ForCausalLM config")?;
                ModelConfig::CausalLm(c)
            }
            other => bail!(
                "unsupported architecture `{other}`; supported architectures: {}",
                SUPPORTED_ARCHITECTURES.join(", ")
            ),
        };
        config.validate()?;
        Ok(config)
    }

    pub fn architecture(&self) -> &'static str {
        match self {
            ModelConfig::ConditionalGeneration(_) => SUPPORTED_ARCHITECTURES[0],
            ModelConfig::CausalLm(_) => SUPPORTED_ARCHITECTURES[1],
        }
    }

    pub fn text(&self) -> &Gemma3TextConfig {
        match self {
            ModelConfig::ConditionalGeneration(c) => &c.text_config,
            ModelConfig::CausalLm(t) => t,
        }
    }

    pub fn vision(&self) -> Option<&SiglipVisionConfig> {
        match self {
            ModelConfig::ConditionalGeneration(c) => Some(&c.vision_config),
            ModelConfig::CausalLm(_) => None,
        }
    }

    /// Whether lm_head shares embed_tokens' weight. For the multi-modal model transformers reads
    /// the top-level flag (default true); the text config carries its own.
    pub fn tie_word_embeddings(&self) -> bool {
        match self {
            ModelConfig::ConditionalGeneration(c) => c.tie_word_embeddings,
            ModelConfig::CausalLm(t) => t.tie_word_embeddings,
        }
    }

    /// The dtype the checkpoint declares (`dtype` in transformers 5, `torch_dtype` before).
    pub fn declared_dtype(&self) -> Option<&str> {
        let (a, b) = match self {
            ModelConfig::ConditionalGeneration(c) => (&c.dtype, &c.torch_dtype),
            ModelConfig::CausalLm(t) => (&t.dtype, &t.torch_dtype),
        };
        a.as_deref().or(b.as_deref())
    }

    pub fn validate(&self) -> Result<()> {
        self.text().validate().context("text_config")?;
        if let ModelConfig::ConditionalGeneration(c) = self {
            c.vision_config.validate().context("vision_config")?;
            c.validate_multimodal()?;
        }
        Ok(())
    }
}

pub use op_api::params::OneOrMany;

/// `Gemma3Config` (the multi-modal model), defaults = class defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Gemma3Config {
    pub architectures: Option<Vec<String>>,
    pub model_type: Option<String>,
    pub text_config: Gemma3TextConfig,
    pub vision_config: SiglipVisionConfig,
    pub mm_tokens_per_image: usize,
    pub boi_token_index: i64,
    pub eoi_token_index: i64,
    pub image_token_index: i64,
    pub initializer_range: f64,
    pub tie_word_embeddings: bool,
    pub eos_token_id: Option<OneOrMany<i64>>,
    pub dtype: Option<String>,
    pub torch_dtype: Option<String>,
    /// Present in a checkpoint saved with bitsandbytes quantization (kept verbatim).
    pub quantization_config: Option<serde_json::Value>,
}

impl Default for Gemma3Config {
    fn default() -> Self {
        Self {
            architectures: None,
            model_type: None,
            text_config: Gemma3TextConfig::default(),
            vision_config: SiglipVisionConfig::default(),
            mm_tokens_per_image: 256,
            boi_token_index: 255_999,
            eoi_token_index: 256_000,
            image_token_index: 262_144,
            initializer_range: 0.02,
            tie_word_embeddings: true,
            eos_token_id: None,
            dtype: None,
            torch_dtype: None,
            quantization_config: None,
        }
    }
}

impl Gemma3Config {
    /// Soft tokens along one side of the pooled grid (16 for 256).
    pub fn tokens_per_side(&self) -> usize {
        (self.mm_tokens_per_image as f64).sqrt().round() as usize
    }

    /// Average-pooling kernel (= stride) of the projector: patches_per_side / tokens_per_side (4).
    pub fn pool_kernel(&self) -> usize {
        self.vision_config.patches_per_side() / self.tokens_per_side()
    }

    fn validate_multimodal(&self) -> Result<()> {
        if let Some(mt) = &self.model_type {
            if mt != "gemma3" {
                bail!("model_type `{mt}` does not match Gemma3ForConditionalGeneration (expected `gemma3`)");
            }
        }
        let side = self.tokens_per_side();
        if side == 0 || side * side != self.mm_tokens_per_image {
            bail!(
                "mm_tokens_per_image ({}) must be a perfect square",
                self.mm_tokens_per_image
            );
        }
        let patches = self.vision_config.patches_per_side();
        if !patches.is_multiple_of(side) {
            bail!(
                "patches per side ({patches} = image_size / patch_size) must be a multiple of sqrt(mm_tokens_per_image) ({side})"
            );
        }
        let vocab = self.text_config.vocab_size as i64;
        for (name, id) in [
            ("boi_token_index", self.boi_token_index),
            ("eoi_token_index", self.eoi_token_index),
            ("image_token_index", self.image_token_index),
        ] {
            if id < 0 || id >= vocab {
                bail!("{name} ({id}) is outside the vocabulary (vocab_size {vocab})");
            }
        }
        Ok(())
    }
}

/// The float type of weights (a checkpoint's `torch_dtype`, a compute or storage dtype): the
/// engine's one [`engine::dtype::DType`], of which only F32, F16 and BF16 occur here.
pub use engine::dtype::DType as FloatDtype;

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const HUB_4B: &str = GEMMA_3_4B_IT_CONFIG_JSON;

    /// The same model as transformers 5 writes it (layer_types + rope_parameters).
    fn v5_4b() -> String {
        let types: Vec<String> = (0..34)
            .map(|i| {
                if (i + 1) % 6 == 0 {
                    "\"full_attention\""
                } else {
                    "\"sliding_attention\""
                }
                .to_string()
            })
            .collect();
        format!(
            r#"{{
          "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "dtype": "bfloat16",
          "mm_tokens_per_image": 256,
          "text_config": {{
            "model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240,
            "num_hidden_layers": 34, "sliding_window": 1024, "layer_types": [{}],
            "rope_parameters": {{
              "full_attention": {{"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
              "sliding_attention": {{"rope_type": "default", "rope_theta": 10000.0}}
            }}
          }},
          "vision_config": {{"model_type": "siglip_vision_model", "hidden_size": 1152, "image_size": 896,
            "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14,
            "vision_use_head": false}}
        }}"#,
            types.join(",")
        )
    }

    fn check_4b(c: &ModelConfig) {
        assert_eq!(c.architecture(), "Gemma3ForConditionalGeneration");
        let t = c.text();
        assert_eq!(
            (t.hidden_size, t.intermediate_size, t.num_hidden_layers),
            (2560, 10240, 34)
        );
        // Defaults transformers fills in (`Gemma3TextConfig`'s).
        assert_eq!(
            (t.num_attention_heads, t.num_key_value_heads, t.head_dim),
            (8, 4, 256)
        );
        assert_eq!(t.vocab_size, 262_208);
        assert_eq!(t.rms_norm_eps, 1e-6);
        assert_eq!(t.query_pre_attn_scalar, 256.0);
        assert_eq!(t.attn_scale(), 0.0625);
        assert_eq!(t.num_kv_groups(), 2);
        assert_eq!(t.sliding_window(), Some(1024));
        assert_eq!(t.final_logit_softcapping, None);
        let globals: Vec<usize> = (0..34).filter(|&i| !t.is_sliding(i)).collect();
        assert_eq!(globals, vec![5, 11, 17, 23, 29]);
        assert_eq!(
            t.rope(5),
            Rope {
                theta: 1e6,
                linear_factor: 8.0
            }
        );
        assert_eq!(
            t.rope(0),
            Rope {
                theta: 1e4,
                linear_factor: 1.0
            }
        );
        assert_eq!(t.embed_scale(FloatDtype::BF16), 50.5);
        assert!((t.embed_scale(FloatDtype::F32) - 50.596_443).abs() < 1e-5);
        let v = c.vision().unwrap();
        assert_eq!(
            (v.patches_per_side(), v.num_patches(), v.head_dim()),
            (64, 4096, 72)
        );
        assert_eq!(
            (v.layer_norm_eps, v.num_channels, v.vision_use_head),
            (1e-6, 3, false)
        );
        let ModelConfig::ConditionalGeneration(g) = c else {
            unreachable!()
        };
        assert_eq!((g.tokens_per_side(), g.pool_kernel()), (16, 4));
        assert_eq!(
            (g.boi_token_index, g.eoi_token_index, g.image_token_index),
            (255_999, 256_000, 262_144)
        );
        assert!(c.tie_word_embeddings());
    }

    #[test]
    fn hub_4b_config_old_layout() {
        let c = ModelConfig::from_json(HUB_4B).unwrap();
        check_4b(&c);
        assert_eq!(c.declared_dtype(), Some("bfloat16"));
    }

    #[test]
    fn transformers5_4b_config_new_layout() {
        let c = ModelConfig::from_json(&v5_4b()).unwrap();
        check_4b(&c);
        assert_eq!(c.declared_dtype(), Some("bfloat16"));
    }

    #[test]
    fn old_style_type_key_and_explicit_bases() {
        let c = ModelConfig::from_json(
            r#"{"model_type": "gemma3_text", "num_hidden_layers": 4, "sliding_window_pattern": 2,
               "rope_theta": 500000, "rope_local_base_freq": 20000, "rope_scaling": {"type": "linear", "factor": 2}}"#,
        )
        .unwrap();
        let t = c.text();
        assert_eq!(c.architecture(), "Gemma3ForCausalLM");
        assert_eq!(
            t.layer_types(),
            vec![
                LayerType::Sliding,
                LayerType::Full,
                LayerType::Sliding,
                LayerType::Full
            ]
        );
        assert_eq!(
            t.rope(1),
            Rope {
                theta: 5e5,
                linear_factor: 2.0
            }
        );
        assert_eq!(
            t.rope(0),
            Rope {
                theta: 2e4,
                linear_factor: 1.0
            }
        );
    }

    /// gemma-3-1b-it shaped text-only config (transformers 4.50 layout, rope_scaling null).
    #[test]
    fn causal_lm_1b() {
        let c = ModelConfig::from_json(
            r#"{"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 1152,
               "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4,
               "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144, "sliding_window": 512,
               "sliding_window_pattern": 6, "rope_theta": 1000000, "rope_local_base_freq": 10000,
               "rope_scaling": null, "max_position_embeddings": 32768, "query_pre_attn_scalar": 256,
               "eos_token_id": [1, 106], "torch_dtype": "bfloat16"}"#,
        )
        .unwrap();
        let t = c.text();
        assert!(c.vision().is_none());
        assert_eq!(t.num_kv_groups(), 4);
        assert_eq!(
            t.rope(5),
            Rope {
                theta: 1e6,
                linear_factor: 1.0
            }
        );
        assert_eq!(t.eos_token_id.as_ref().unwrap().to_vec(), vec![1, 106]);
        // sqrt(1152) = 33.941 -> bf16 34.0
        assert_eq!(t.embed_scale(FloatDtype::BF16), 34.0);
    }

    /// gemma-3-270m shaped config: layer_types given alongside the old rope keys.
    #[test]
    fn causal_lm_270m_layer_types() {
        let types: Vec<&str> = (0..18)
            .map(|i| {
                if (i + 1) % 6 == 0 {
                    "\"full_attention\""
                } else {
                    "\"sliding_attention\""
                }
            })
            .collect();
        let json = format!(
            r#"{{"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 640,
               "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
               "num_key_value_heads": 1, "vocab_size": 262144, "sliding_window": 512,
               "layer_types": [{}], "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
               "rope_scaling": null, "_sliding_window_pattern": 6}}"#,
            types.join(",")
        );
        let c = ModelConfig::from_json(&json).unwrap();
        let t = c.text();
        assert_eq!((0..18).filter(|&i| !t.is_sliding(i)).count(), 3);
        // sqrt(640) = 25.298 -> bf16 25.25
        assert_eq!(t.embed_scale(FloatDtype::BF16), 25.25);
    }

    #[test]
    fn unknown_architecture_is_named() {
        let e = ModelConfig::from_json(
            r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("LlamaForCausalLM"), "{e}");
        assert!(
            e.contains("Gemma3ForConditionalGeneration") && e.contains("Gemma3ForCausalLM"),
            "{e}"
        );
        let e = ModelConfig::from_json(r#"{"model_type": "paligemma"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("paligemma"), "{e}");
    }

    #[test]
    fn bad_layer_types_and_rope_are_refused() {
        let e = ModelConfig::from_json(
            r#"{"model_type": "gemma3_text", "num_hidden_layers": 3, "layer_types": ["full_attention"]}"#,
        )
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("layer_types has 1 entries"),
            "{e:#}"
        );
        let e = ModelConfig::from_json(
            r#"{"model_type": "gemma3_text", "rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 4}}}"#,
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("rope type `yarn`"), "{e:#}");
    }
}
