//! The Gemma 3 multimodal projector on the GPU, the twin of
//! [`crate::reference::projector`]: `vision [images * patches, vision_hidden]` -> 2-D
//! average pool to `mm_tokens_per_image` -> Gemma RMSNorm (`1 + w`, eps = the vision
//! layer_norm_eps) -> `· mm_input_projection_weight [vision_hidden, text_hidden]` (a frozen raw
//! Parameter, no transpose, never quantized, never a LoRA target).

use anyhow::{ensure, Context, Result};

use crate::config::ModelConfig;
use crate::names::PROJECTOR;
use crate::Weights;
use engine::gpu::{DType, Gpu, GpuTensor, MatmulOpts, Recorder};
use engine::reference::pool::PoolDims;

/// The projector's frozen weights on the GPU.
pub struct GpuProjector {
    /// `[vision_hidden]` (the Gemma RMSNorm weight, applied as `1 + w`).
    soft_emb_norm: GpuTensor,
    /// `[vision_hidden, text_hidden]`.
    input_projection: GpuTensor,
    vision_hidden: usize,
    text_hidden: usize,
    /// Patches per image (a square grid) and the pooling kernel (= stride).
    patches: usize,
    pool_kernel: usize,
    eps: f32,
}

/// What [`GpuProjector::forward`] keeps for the backward.
pub struct GpuProjectorCache {
    /// `[images * tokens, vision_hidden]` the RMSNorm input.
    pooled: GpuTensor,
    /// `[images * tokens]` the RMSNorm's saved reciprocal RMS.
    rstd: GpuTensor,
    images: usize,
}

impl GpuProjector {
    /// Uploads `mm_soft_emb_norm.weight` and `mm_input_projection_weight` (any float dtype, as f32).
    pub fn from_weights(gpu: &Gpu, config: &ModelConfig, weights: &Weights) -> Result<Self> {
        let ModelConfig::ConditionalGeneration(g) = config else {
            anyhow::bail!("a text-only model has no multimodal projector");
        };
        let vc = &g.vision_config;
        let (vision_hidden, text_hidden) = (vc.hidden_size, g.text_config.hidden_size);
        let norm_name = format!("{PROJECTOR}mm_soft_emb_norm.weight");
        let proj_name = format!("{PROJECTOR}mm_input_projection_weight");
        let norm = weights.to_f32(&norm_name)?;
        let proj = weights.to_f32(&proj_name)?;
        ensure!(
            norm.len() == vision_hidden,
            "`{norm_name}` has {} values, the vision hidden size is {vision_hidden}",
            norm.len()
        );
        ensure!(
            proj.len() == vision_hidden * text_hidden,
            "`{proj_name}` has {} values, expected [{vision_hidden}, {text_hidden}]",
            proj.len()
        );
        let patches = vc.num_patches();
        Ok(Self {
            soft_emb_norm: gpu.upload_f32(&[vision_hidden], &norm)?,
            input_projection: gpu
                .upload_f32(&[vision_hidden, text_hidden], &proj)
                .with_context(|| format!("uploading `{proj_name}`"))?,
            vision_hidden,
            text_hidden,
            patches,
            pool_kernel: g.pool_kernel(),
            eps: vc.layer_norm_eps as f32,
        })
    }

    fn pool_dims(&self, images: usize) -> PoolDims {
        PoolDims {
            batch: images,
            patches: self.patches,
            channels: self.vision_hidden,
            kernel: self.pool_kernel,
        }
    }

    /// Image tokens per image after pooling.
    pub fn tokens_per_image(&self) -> Result<usize> {
        let side = self.pool_dims(1).out_side()?;
        Ok(side * side)
    }

    /// `vision_out [images * patches, vision_hidden]` -> `features [images * mm_tokens_per_image, text_hidden]`.
    pub fn forward(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder,
        vision_out: &GpuTensor,
        images: usize,
    ) -> Result<(GpuTensor, GpuProjectorCache)> {
        ensure!(
            vision_out.numel() == images * self.patches * self.vision_hidden,
            "projector: vision output {:?} is not {images} images x {} patches x {}",
            vision_out.shape(),
            self.patches,
            self.vision_hidden
        );
        let dims = self.pool_dims(images);
        let rows = images * self.tokens_per_image()?;
        let pooled = gpu.empty(&[rows, self.vision_hidden], DType::F32)?;
        gpu.avg_pool2d_forward(rec, vision_out, &dims, &pooled)?;
        let normed = gpu.empty(&[rows, self.vision_hidden], DType::F32)?;
        let rstd = gpu.empty(&[rows], DType::F32)?;
        gpu.rmsnorm_forward(rec, &pooled, &self.soft_emb_norm, &normed, &rstd, self.eps)?;
        let features = gpu.empty(&[rows, self.text_hidden], DType::F32)?;
        gpu.matmul(
            rec,
            &normed,
            &self.input_projection,
            &features,
            MatmulOpts::default(),
        )?;
        Ok((
            features,
            GpuProjectorCache {
                pooled,
                rstd,
                images,
            },
        ))
    }

    /// `d_features [images * mm_tokens_per_image, text_hidden]` -> `d_vision_out [images * patches, vision_hidden]`.
    pub fn backward(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder,
        cache: &GpuProjectorCache,
        d_features: &GpuTensor,
    ) -> Result<GpuTensor> {
        let rows = cache.pooled.rows();
        ensure!(
            d_features.numel() == rows * self.text_hidden,
            "projector backward: d_features {:?} is not [{rows}, {}]",
            d_features.shape(),
            self.text_hidden
        );
        let d_features = d_features.reshape(&[rows, self.text_hidden])?;
        // d_normed = d_features · Wᵀ with W [vision, text].
        let d_normed = gpu.empty(&[rows, self.vision_hidden], DType::F32)?;
        gpu.matmul(
            rec,
            &d_features,
            &self.input_projection,
            &d_normed,
            MatmulOpts {
                trans_b: true,
                ..Default::default()
            },
        )?;
        let d_pooled = gpu.empty(&[rows, self.vision_hidden], DType::F32)?;
        gpu.rmsnorm_backward(
            rec,
            &cache.pooled,
            &self.soft_emb_norm,
            &d_normed,
            &cache.rstd,
            Some(&d_pooled),
            None,
            false,
        )?;
        let d_vision = gpu.empty(
            &[cache.images * self.patches, self.vision_hidden],
            DType::F32,
        )?;
        gpu.avg_pool2d_backward(rec, &d_pooled, &self.pool_dims(cache.images), &d_vision)?;
        Ok(d_vision)
    }
}
