//! The SigLIP vision tower's config (`SiglipVisionConfig`).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

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
