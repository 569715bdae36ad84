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

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// google/gemma-3-4b-it's `config.json` as on the Hub (transformers 4.50 layout, keys per spec §2),
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

/// The attention kind of one decoder layer (`layer_types` entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerType {
    #[serde(rename = "sliding_attention")]
    Sliding,
    #[serde(rename = "full_attention")]
    Full,
}

impl LayerType {
    /// The key of this layer type in `rope_parameters`.
    pub fn key(self) -> &'static str {
        match self {
            LayerType::Sliding => "sliding_attention",
            LayerType::Full => "full_attention",
        }
    }
}

/// One RoPE parameter set, as in `rope_scaling` (old) or one entry of `rope_parameters` (new).
/// `type` is the pre-4.45 spelling of `rope_type`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub legacy_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    /// Keys of RoPE types this runner does not implement (yarn's beta_fast, ...), kept to name them in errors.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

impl RopeParameters {
    /// transformers' `standardize_rope_params`: `rope_type` falls back to `type`, then "default".
    fn kind(&self) -> &str {
        self.rope_type
            .as_deref()
            .or(self.legacy_type.as_deref())
            .unwrap_or("default")
    }

    /// `dict.update(other)`: keys present in `other` win.
    fn update(&mut self, other: &RopeParameters) {
        if other.rope_type.is_some() {
            self.rope_type = other.rope_type.clone();
        }
        if other.legacy_type.is_some() {
            self.legacy_type = other.legacy_type.clone();
        }
        if other.rope_theta.is_some() {
            self.rope_theta = other.rope_theta;
        }
        if other.factor.is_some() {
            self.factor = other.factor;
        }
        for (k, v) in &other.other {
            self.other.insert(k.clone(), v.clone());
        }
    }
}

/// The RoPE a layer uses, resolved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    /// The frequency base (`rope_theta`).
    pub theta: f64,
    /// Linear position scaling: `inv_freq /= factor` (1.0 for default RoPE).
    pub linear_factor: f64,
}

/// `Gemma3TextConfig` (transformers `configuration_gemma3.py`); field names are the HF keys and
/// `Default` is the class defaults, so a key the Hub config omits takes transformers' value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Gemma3TextConfig {
    pub architectures: Option<Vec<String>>,
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub hidden_activation: String,
    pub max_position_embeddings: usize,
    pub initializer_range: f64,
    pub rms_norm_eps: f64,
    pub pad_token_id: Option<i64>,
    pub eos_token_id: Option<OneOrMany<i64>>,
    pub bos_token_id: Option<i64>,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub attention_dropout: f64,
    pub query_pre_attn_scalar: f64,
    pub sliding_window: Option<usize>,
    pub final_logit_softcapping: Option<f64>,
    pub attn_logit_softcapping: Option<f64>,
    pub use_bidirectional_attention: Option<bool>,
    /// transformers 5 layout: one entry per layer.
    pub layer_types: Option<Vec<LayerType>>,
    /// transformers 5 layout: RoPE per layer type (`"full_attention"`, `"sliding_attention"`).
    pub rope_parameters: Option<BTreeMap<String, Option<RopeParameters>>>,
    /// Old layout: every `sliding_window_pattern`-th layer is global (transformers default 6).
    pub sliding_window_pattern: Option<usize>,
    /// Old layout: base of global layers.
    pub rope_theta: Option<f64>,
    /// Old layout: base of sliding layers.
    pub rope_local_base_freq: Option<f64>,
    /// Old layout: scaling of global layers (`{"rope_type": "linear", "factor": 8.0}`).
    pub rope_scaling: Option<RopeParameters>,
    pub dtype: Option<String>,
    pub torch_dtype: Option<String>,
}

impl Default for Gemma3TextConfig {
    fn default() -> Self {
        Self {
            architectures: None,
            model_type: None,
            vocab_size: 262_208,
            hidden_size: 2304,
            intermediate_size: 9216,
            num_hidden_layers: 26,
            num_attention_heads: 8,
            num_key_value_heads: 4,
            head_dim: 256,
            hidden_activation: "gelu_pytorch_tanh".into(),
            max_position_embeddings: 131_072,
            initializer_range: 0.02,
            rms_norm_eps: 1e-6,
            pad_token_id: Some(0),
            eos_token_id: Some(OneOrMany::One(1)),
            bos_token_id: Some(2),
            tie_word_embeddings: true,
            attention_bias: false,
            attention_dropout: 0.0,
            query_pre_attn_scalar: 256.0,
            sliding_window: Some(4096),
            final_logit_softcapping: None,
            attn_logit_softcapping: None,
            use_bidirectional_attention: Some(false),
            layer_types: None,
            rope_parameters: None,
            sliding_window_pattern: None,
            rope_theta: None,
            rope_local_base_freq: None,
            rope_scaling: None,
            dtype: None,
            torch_dtype: None,
        }
    }
}

/// transformers' `Gemma3TextConfig.default_theta`.
const DEFAULT_GLOBAL_THETA: f64 = 1_000_000.0;
const DEFAULT_LOCAL_THETA: f64 = 10_000.0;
const DEFAULT_SLIDING_WINDOW_PATTERN: usize = 6;

impl Gemma3TextConfig {
    /// The kind of every layer: `layer_types` when given, else transformers' rule
    /// `sliding if (i + 1) % sliding_window_pattern != 0 else full`.
    pub fn layer_types(&self) -> Vec<LayerType> {
        match &self.layer_types {
            Some(t) => t.clone(),
            None => {
                let pattern = self
                    .sliding_window_pattern
                    .unwrap_or(DEFAULT_SLIDING_WINDOW_PATTERN);
                (0..self.num_hidden_layers)
                    .map(|i| {
                        if (i + 1) % pattern != 0 {
                            LayerType::Sliding
                        } else {
                            LayerType::Full
                        }
                    })
                    .collect()
            }
        }
    }

    pub fn layer_type(&self, layer: usize) -> LayerType {
        self.layer_types()[layer]
    }

    pub fn is_sliding(&self, layer: usize) -> bool {
        self.layer_type(layer) == LayerType::Sliding
    }

    /// The RoPE parameters of a layer type after transformers' `convert_rope_params_to_dict`:
    /// `rope_scaling` updates the full-attention entry; missing thetas come from `rope_theta`
    /// (global) / `rope_local_base_freq` (sliding) and then the class defaults.
    fn resolved_rope_parameters(&self, kind: LayerType) -> RopeParameters {
        let mut params = self
            .rope_parameters
            .as_ref()
            .and_then(|m| m.get(kind.key()).cloned().flatten())
            .unwrap_or_default();
        if kind == LayerType::Full {
            if let Some(scaling) = &self.rope_scaling {
                params.update(scaling);
            }
        }
        if params.rope_theta.is_none() {
            params.rope_theta = Some(match kind {
                LayerType::Full => self.rope_theta.unwrap_or(DEFAULT_GLOBAL_THETA),
                LayerType::Sliding => self.rope_local_base_freq.unwrap_or(DEFAULT_LOCAL_THETA),
            });
        }
        params
    }

    fn rope_for(&self, kind: LayerType) -> Result<Rope> {
        let p = self.resolved_rope_parameters(kind);
        let theta = p.rope_theta.expect("filled by resolved_rope_parameters");
        let linear_factor = match p.kind() {
            "default" => 1.0,
            "linear" => {
                let f = p.factor.with_context(|| {
                    format!("rope type `linear` for {} needs a `factor`", kind.key())
                })?;
                if !(f.is_finite() && f > 0.0) {
                    bail!(
                        "rope `factor` for {} must be a positive number, got {f}",
                        kind.key()
                    );
                }
                f
            }
            other => bail!(
                "rope type `{other}` for {} layers is not supported (supported: default, linear)",
                kind.key()
            ),
        };
        if !(theta.is_finite() && theta > 0.0) {
            bail!(
                "rope_theta for {} layers must be positive, got {theta}",
                kind.key()
            );
        }
        Ok(Rope {
            theta,
            linear_factor,
        })
    }

    /// The RoPE of one layer (its base and linear factor), per its layer type.
    pub fn rope(&self, layer: usize) -> Rope {
        self.rope_for(self.layer_type(layer))
            .expect("validated when the config was parsed")
    }

    pub fn rope_base(&self, layer: usize) -> f64 {
        self.rope(layer).theta
    }

    pub fn rope_linear_factor(&self, layer: usize) -> f64 {
        self.rope(layer).linear_factor
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Query heads per key/value head (GQA group size).
    pub fn num_kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Attention score scale: `query_pre_attn_scalar ** -0.5`.
    pub fn attn_scale(&self) -> f64 {
        self.query_pre_attn_scalar.powf(-0.5)
    }

    /// The sliding window of sliding layers. transformers halves it (+1) when
    /// `use_bidirectional_attention` is set; validation refuses that variant.
    pub fn sliding_window(&self) -> Option<usize> {
        self.sliding_window
    }

    /// The embedding scale `sqrt(hidden_size)` as transformers applies it: computed in f64, stored
    /// as an f32 buffer, then cast to the embedding weight's dtype (bf16: 50.5 for 2560).
    pub fn embed_scale(&self, weight_dtype: FloatDtype) -> f32 {
        let s = (self.hidden_size as f64).sqrt() as f32;
        weight_dtype.round(s)
    }

    pub fn validate(&self) -> Result<()> {
        if let Some(mt) = &self.model_type {
            if mt != "gemma3_text" {
                bail!("text model_type `{mt}` is not `gemma3_text`");
            }
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                bail!("`{name}` must be positive");
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            bail!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.num_key_value_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!("head_dim ({}) must be even for RoPE", self.head_dim);
        }
        if self.hidden_activation != "gelu_pytorch_tanh" {
            bail!(
                "hidden_activation `{}` is not supported (Gemma 3 uses gelu_pytorch_tanh)",
                self.hidden_activation
            );
        }
        if self.attention_bias {
            bail!("attention_bias = true is not supported (Gemma 3 projections have no bias)");
        }
        if self.use_bidirectional_attention == Some(true) {
            bail!("use_bidirectional_attention = true (EmbeddingGemma) is not supported");
        }
        if let Some(p) = self.sliding_window_pattern {
            if p == 0 {
                bail!("sliding_window_pattern must be positive");
            }
        }
        if let Some(t) = &self.layer_types {
            if t.len() != self.num_hidden_layers {
                bail!(
                    "layer_types has {} entries but num_hidden_layers is {}",
                    t.len(),
                    self.num_hidden_layers
                );
            }
        }
        if let Some(p) = &self.rope_parameters {
            for key in p.keys() {
                if key != "full_attention" && key != "sliding_attention" {
                    bail!(
                        "rope_parameters key `{key}` is not a layer type (expected `full_attention` and/or `sliding_attention`)"
                    );
                }
            }
        }
        let types = self.layer_types();
        if types.contains(&LayerType::Sliding) && self.sliding_window.is_none() {
            bail!("sliding_attention layers need `sliding_window`");
        }
        for kind in [LayerType::Full, LayerType::Sliding] {
            self.rope_for(kind)?;
        }
        Ok(())
    }
}

/// `image_size` / `patch_size` may be an int or a `[h, w]` pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Size2 {
    Square(usize),
    Pair([usize; 2]),
}

impl Size2 {
    fn square(&self, name: &str) -> Result<usize> {
        match self {
            Size2::Square(s) => Ok(*s),
            Size2::Pair([h, w]) if h == w => Ok(*h),
            Size2::Pair([h, w]) => bail!("non-square {name} [{h}, {w}] is not supported"),
        }
    }
}

/// `SiglipVisionConfig` (transformers `configuration_siglip.py`), defaults = class defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SiglipVisionConfig {
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: Size2,
    pub patch_size: Size2,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub attention_dropout: f64,
    pub vision_use_head: bool,
}

impl Default for SiglipVisionConfig {
    fn default() -> Self {
        Self {
            model_type: None,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: Size2::Square(224),
            patch_size: Size2::Square(16),
            hidden_act: "gelu_pytorch_tanh".into(),
            layer_norm_eps: 1e-6,
            attention_dropout: 0.0,
            vision_use_head: true,
        }
    }
}

impl SiglipVisionConfig {
    pub fn image_size(&self) -> usize {
        self.image_size.square("image_size").expect("validated")
    }

    pub fn patch_size(&self) -> usize {
        self.patch_size.square("patch_size").expect("validated")
    }

    /// Patches along one side (896 / 14 = 64 for Gemma 3).
    pub fn patches_per_side(&self) -> usize {
        self.image_size() / self.patch_size()
    }

    pub fn num_patches(&self) -> usize {
        self.patches_per_side() * self.patches_per_side()
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Attention scale `head_dim ** -0.5`.
    pub fn attn_scale(&self) -> f64 {
        (self.head_dim() as f64).powf(-0.5)
    }

    /// Inputs of the patch embedding seen as a linear layer: channels · patch².
    pub fn patch_dim(&self) -> usize {
        self.num_channels * self.patch_size() * self.patch_size()
    }

    pub fn validate(&self) -> Result<()> {
        if let Some(mt) = &self.model_type {
            if mt != "siglip_vision_model" {
                bail!("vision model_type `{mt}` is not supported (expected `siglip_vision_model`)");
            }
        }
        let image = self.image_size.square("image_size")?;
        let patch = self.patch_size.square("patch_size")?;
        if patch == 0 || image == 0 || image % patch != 0 {
            bail!("image_size ({image}) must be a positive multiple of patch_size ({patch})");
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            bail!(
                "hidden_size ({}) must be a multiple of num_attention_heads ({})",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        if self.hidden_act != "gelu_pytorch_tanh" {
            bail!(
                "hidden_act `{}` is not supported (SigLIP in Gemma 3 uses gelu_pytorch_tanh)",
                self.hidden_act
            );
        }
        Ok(())
    }
}

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
        // Defaults transformers fills in (spec §2 table).
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
