//! The Gemma 3 multimodal projector (`Gemma3MultiModalProjector`), forward and backward:
//! `vision [images, patches, vision_hidden]` -> 2-D average pool to `mm_tokens_per_image` ->
//! `mm_soft_emb_norm` (Gemma RMSNorm, `1 + w`, eps = the vision layer_norm_eps) ->
//! `· mm_input_projection_weight [vision_hidden, text_hidden]` (a raw Parameter, no transpose).

use anyhow::Result;

use super::kernels::{gemma_rmsnorm_backward, gemma_rmsnorm_forward, matmul_xw, matmul_xwt};
use engine::reference::pool::{avg_pool2d_backward, avg_pool2d_forward, PoolDims};

/// The projector's frozen weights.
#[derive(Debug, Clone)]
pub struct Projector {
    /// `[vision_hidden]`.
    pub soft_emb_norm: Vec<f32>,
    /// `[vision_hidden, text_hidden]`.
    pub input_projection: Vec<f32>,
    pub vision_hidden: usize,
    pub text_hidden: usize,
    /// Patches per image (a square grid) and the pooling kernel (= stride).
    pub patches: usize,
    pub pool_kernel: usize,
    pub eps: f32,
}

/// Activations the projector keeps.
#[derive(Debug, Clone)]
pub struct ProjectorCache {
    pooled: Vec<f32>, // [images, tokens, vision_hidden]
    images: usize,
}

impl Projector {
    fn pool_dims(&self, images: usize) -> PoolDims {
        PoolDims {
            batch: images,
            patches: self.patches,
            channels: self.vision_hidden,
            kernel: self.pool_kernel,
        }
    }

    /// `vision [images, patches, vision_hidden]` -> `image_features [images, tokens, text_hidden]`.
    pub fn forward(&self, vision: &[f32], images: usize) -> Result<(Vec<f32>, ProjectorCache)> {
        let pooled = avg_pool2d_forward(vision, &self.pool_dims(images))?;
        let (normed, _) = gemma_rmsnorm_forward(&pooled, &self.soft_emb_norm, self.eps);
        let rows = normed.len() / self.vision_hidden;
        let out = matmul_xw(
            &normed,
            &self.input_projection,
            rows,
            self.vision_hidden,
            self.text_hidden,
        );
        Ok((out, ProjectorCache { pooled, images }))
    }

    /// `d_features [images, tokens, text_hidden]` -> `d_vision [images, patches, vision_hidden]`.
    pub fn backward(&self, cache: &ProjectorCache, d_features: &[f32]) -> Result<Vec<f32>> {
        let rows = d_features.len() / self.text_hidden;
        // d_normed [rows, vision] = d_features · Wᵀ, W [vision, text] read as a [out=vision, in=text] Linear.
        let d_normed = matmul_xwt(
            d_features,
            &self.input_projection,
            rows,
            self.text_hidden,
            self.vision_hidden,
        );
        let d_pooled =
            gemma_rmsnorm_backward(&cache.pooled, &self.soft_emb_norm, self.eps, &d_normed);
        avg_pool2d_backward(&d_pooled, &self.pool_dims(cache.images))
    }
}
