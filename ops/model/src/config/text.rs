//! The text decoder's config (`Gemma3TextConfig`): layer types, RoPE, and the defaults and
//! layouts of transformers 4 and 5.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::*;

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
pub(super) const DEFAULT_GLOBAL_THETA: f64 = 1_000_000.0;
pub(super) const DEFAULT_LOCAL_THETA: f64 = 10_000.0;
pub(super) const DEFAULT_SLIDING_WINDOW_PATTERN: usize = 6;

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
