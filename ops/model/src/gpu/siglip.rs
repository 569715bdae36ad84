//! The SigLIP vision tower on the GPU (transformers `SiglipVisionTransformer` without head), the
//! twin of [`crate::reference::siglip`]: forward, and the backward LoRA on its linears
//! needs (no gradient to the pixels or the frozen patch/position embeddings).
//!
//! `x = unfold(pixels)·W_patchᵀ + b_patch + position_embedding`; per pre-LN layer
//! `h = x + out_proj(attn(layer_norm1(x)))`, `out = h + fc2(gelu_tanh(fc1(layer_norm2(h))))`;
//! then `post_layernorm`. Attention is full (no mask), scale `head_dim^-0.5`. Every linear is a
//! [`GpuLinear`] so LoRA pairs attach by module path.
//!
//! Images are independent in the tower (attention within an image, norms per token), so it runs
//! one image at a time, forward and backward: the working set is one image's (at 896 px, fc1's
//! output is `[4096, 4304]` f32, 70 MB, within one storage binding), whatever the batch. Each
//! image's linears draw the dropout mask rows of the whole batch's call
//! ([`GpuLinear::forward_at`]), so the result is the batched tower's (the CPU reference runs the
//! batch whole).

use anyhow::{bail, ensure, Context, Result};

use super::linear::{DenseStorage, GpuLinear, GpuLinearCache, LoraRun};
use crate::config::ModelConfig;
use crate::names::VISION;
use crate::reference::siglip::VisionDims;
use crate::Weights;
use engine::gpu::kernels::attention::AttentionMaskGpu;
use engine::gpu::{DType, Gpu, GpuTensor, MatmulOpts, Recorder};
use engine::reference::attention::{AttentionDims, AttentionMask};
use engine::reference::patch::PatchDims;

mod layer;

/// One encoder layer's frozen weights.
pub struct GpuEncoderLayer {
    /// `[hidden]` each.
    layer_norm1_weight: GpuTensor,
    layer_norm1_bias: GpuTensor,
    layer_norm2_weight: GpuTensor,
    layer_norm2_bias: GpuTensor,
    /// `[hidden, hidden]` with bias.
    q_proj: GpuLinear,
    k_proj: GpuLinear,
    v_proj: GpuLinear,
    out_proj: GpuLinear,
    /// `[intermediate, hidden]` and `[hidden, intermediate]`, with biases.
    fc1: GpuLinear,
    fc2: GpuLinear,
}

/// Activations one encoder layer keeps for the backward of one image (the linears' caches hold
/// their inputs: layer_norm1's output, the attention output, layer_norm2's output and the gelu
/// output). `tokens` is one image's patches.
struct GpuEncoderLayerCache {
    /// `[tokens, hidden]` the layer input.
    x: GpuTensor,
    /// `[tokens, 2]` layer_norm1's (mean, rstd).
    ln1_stats: GpuTensor,
    q_lin: GpuLinearCache,
    k_lin: GpuLinearCache,
    v_lin: GpuLinearCache,
    /// `[patches, heads, head_dim]` each (one image).
    q: GpuTensor,
    k: GpuTensor,
    v: GpuTensor,
    /// `[heads, patches]`.
    lse: GpuTensor,
    o_lin: GpuLinearCache,
    /// `[tokens, hidden]` the attention residual's output.
    h: GpuTensor,
    ln2_stats: GpuTensor,
    fc1_lin: GpuLinearCache,
    /// `[tokens, intermediate]` fc1's output (the gelu input).
    f1: GpuTensor,
    fc2_lin: GpuLinearCache,
}

/// What one encoder layer keeps of one image between the forward and its backward.
enum KeptLayer {
    /// Every activation its backward reads.
    Full(Box<GpuEncoderLayerCache>),
    /// Gradient checkpointing: only the layer input `[tokens, hidden]`; the backward runs the
    /// layer's forward again (same dropout masks: same [`LoraRun`]) right before it.
    Input(GpuTensor),
}

/// What the forward keeps of one image for the backward.
struct KeptImage {
    /// One entry per encoder layer, lowest first.
    layers: Vec<KeptLayer>,
    /// `[patches, hidden]` input of post_layernorm and its `[patches, 2]` (mean, rstd).
    last: (GpuTensor, GpuTensor),
}

/// What [`GpuVisionTower::forward`] keeps; empty when the tower has no LoRA pair (nothing to train).
pub struct GpuVisionCache {
    images: usize,
    /// The attention mask of one image (full attention): every image's layers share it, and
    /// the backward reuses it.
    mask: Option<AttentionMaskGpu>,
    /// One entry per image, in batch order.
    kept: Vec<KeptImage>,
}

/// The whole tower on the GPU.
pub struct GpuVisionTower {
    dims: VisionDims,
    /// Conv weight `[hidden, channels, patch, patch]` seen as `[hidden, channels * patch²]`; bias `[hidden]`.
    patch_weight: GpuTensor,
    patch_bias: GpuTensor,
    /// `[num_patches, hidden]`.
    position_embedding: GpuTensor,
    layers: Vec<GpuEncoderLayer>,
    /// `[hidden]` each.
    post_layernorm_weight: GpuTensor,
    post_layernorm_bias: GpuTensor,
    /// lora-train's `bf16`: each encoder layer's input is rounded to bf16 (torch's bf16 tower
    /// passes bf16 hidden states), and a checkpointed layer keeps that bf16 copy: half the
    /// image path's kept bytes.
    pub bf16: bool,
}

fn upload_vector(gpu: &Gpu, weights: &Weights, name: &str, len: usize) -> Result<GpuTensor> {
    let v = weights.to_f32(name)?;
    ensure!(
        v.len() == len,
        "`{name}` has {} values, the config implies {len}",
        v.len()
    );
    gpu.upload_f32(&[len], &v)
}

impl GpuVisionTower {
    /// Uploads the tower (linears dense or NF4 as stored; norms and embeddings as f32).
    pub fn from_weights(
        gpu: &Gpu,
        config: &ModelConfig,
        weights: &Weights,
        dense: DenseStorage,
    ) -> Result<Self> {
        let Some(vc) = config.vision() else {
            bail!("a text-only model has no vision tower");
        };
        if vc.hidden_act != "gelu_pytorch_tanh" {
            bail!(
                "vision hidden_act `{}` is not supported (gelu_pytorch_tanh)",
                vc.hidden_act
            );
        }
        let dims = VisionDims {
            hidden: vc.hidden_size,
            intermediate: vc.intermediate_size,
            heads: vc.num_attention_heads,
            channels: vc.num_channels,
            image_size: vc.image_size(),
            patch_size: vc.patch_size(),
            layer_norm_eps: vc.layer_norm_eps as f32,
        };
        ensure!(
            dims.heads > 0 && dims.hidden.is_multiple_of(dims.heads),
            "vision hidden_size {} is not a multiple of num_attention_heads {}",
            dims.hidden,
            dims.heads
        );
        let h = dims.hidden;
        let vec =
            |name: &str, len: usize| upload_vector(gpu, weights, &format!("{VISION}{name}"), len);
        let patch_name = format!("{VISION}embeddings.patch_embedding.weight");
        let patch = weights.to_f32(&patch_name)?;
        ensure!(
            patch.len() == h * dims.patch_dim(),
            "`{patch_name}` has {} values, expected [{h}, {}, {2}, {2}]",
            patch.len(),
            dims.channels,
            dims.patch_size
        );
        let mut layers = Vec::with_capacity(vc.num_hidden_layers);
        for l in 0..vc.num_hidden_layers {
            let p = format!("encoder.layers.{l}.");
            let lin = |m: &str| {
                GpuLinear::from_weights(gpu, weights, &format!("{VISION}{p}{m}"), true, dense)
            };
            layers.push(GpuEncoderLayer {
                layer_norm1_weight: vec(&format!("{p}layer_norm1.weight"), h)?,
                layer_norm1_bias: vec(&format!("{p}layer_norm1.bias"), h)?,
                layer_norm2_weight: vec(&format!("{p}layer_norm2.weight"), h)?,
                layer_norm2_bias: vec(&format!("{p}layer_norm2.bias"), h)?,
                q_proj: lin("self_attn.q_proj")?,
                k_proj: lin("self_attn.k_proj")?,
                v_proj: lin("self_attn.v_proj")?,
                out_proj: lin("self_attn.out_proj")?,
                fc1: lin("mlp.fc1")?,
                fc2: lin("mlp.fc2")?,
            });
        }
        Ok(Self {
            dims,
            patch_weight: gpu.upload_f32(&[h, dims.patch_dim()], &patch)?,
            patch_bias: vec("embeddings.patch_embedding.bias", h)?,
            position_embedding: {
                let name = format!("{VISION}embeddings.position_embedding.weight");
                let v = weights.to_f32(&name)?;
                ensure!(
                    v.len() == dims.num_patches() * h,
                    "`{name}` has {} values, expected [{}, {h}]",
                    v.len(),
                    dims.num_patches()
                );
                gpu.upload_f32(&[dims.num_patches(), h], &v)?
            },
            layers,
            post_layernorm_weight: vec("post_layernorm.weight", h)?,
            post_layernorm_bias: vec("post_layernorm.bias", h)?,
            bf16: false,
        })
    }

    pub fn dims(&self) -> &VisionDims {
        &self.dims
    }

    /// Every linear (q, k, v, out_proj, fc1, fc2 of every layer), so the model can attach LoRA
    /// pairs by [`GpuLinear::module`].
    pub fn linears_mut(&mut self) -> Vec<&mut GpuLinear> {
        self.layers
            .iter_mut()
            .flat_map(|l| {
                [
                    &mut l.q_proj,
                    &mut l.k_proj,
                    &mut l.v_proj,
                    &mut l.out_proj,
                    &mut l.fc1,
                    &mut l.fc2,
                ]
            })
            .collect()
    }

    /// Every linear, read-only (for reading LoRA pairs and their gradients back).
    pub fn linears(&self) -> Vec<&GpuLinear> {
        self.layers
            .iter()
            .flat_map(|l| [&l.q_proj, &l.k_proj, &l.v_proj, &l.out_proj, &l.fc1, &l.fc2])
            .collect()
    }

    pub fn has_lora(&self) -> bool {
        self.linears().iter().any(|l| l.lora.is_some())
    }

    /// Index of the lowest layer with a LoRA pair: the backward stops there.
    fn lowest_lora_layer(&self) -> Option<usize> {
        self.layers.iter().position(|l| {
            [&l.q_proj, &l.k_proj, &l.v_proj, &l.out_proj, &l.fc1, &l.fc2]
                .iter()
                .any(|x| x.lora.is_some())
        })
    }

    /// One image's attention (the tower runs image by image).
    fn attention_dims(&self) -> AttentionDims {
        AttentionDims {
            batch: 1,
            seq: self.dims.num_patches(),
            q_heads: self.dims.heads,
            kv_heads: self.dims.heads,
            head_dim: self.dims.head_dim(),
        }
    }

    fn attention_scale(&self) -> f32 {
        (self.dims.head_dim() as f64).powf(-0.5) as f32
    }

    /// `pixels [images, channels, size, size]` -> `[images * patches, hidden]` after post_layernorm.
    /// With `checkpoint` (transformers checkpoints the encoder layers under
    /// `gradient_checkpointing`) only each layer's input is kept for the backward. The images
    /// run one after the other, and the recorder is flushed after each image's patch embedding,
    /// each of its layers and its post_layernorm, so one image's temporaries return to the pool
    /// before the next phase.
    pub fn forward(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder,
        pixels: &GpuTensor,
        run: &LoraRun,
        checkpoint: bool,
    ) -> Result<(GpuTensor, GpuVisionCache)> {
        let d = &self.dims;
        let size = d.image_size;
        let image_len = d.channels * size * size;
        ensure!(
            pixels.numel() > 0 && pixels.numel().is_multiple_of(image_len),
            "pixel_values {:?} is not [images, {}, {size}, {size}]",
            pixels.shape(),
            d.channels
        );
        let images = pixels.numel() / image_len;
        let patches = d.num_patches();
        let train = self.has_lora();
        // `[images, channels·size²]`: one row per image, to copy out one image at a time.
        let pixels = pixels.reshape(&[images, image_len])?;
        let mask = gpu.attention_mask(&self.attention_dims(), &AttentionMask::default())?;
        // `[images * patches, hidden]`: each image's post_layernorm output lands in its rows.
        let y = gpu.empty(&[images * patches, d.hidden], DType::F32)?;
        let mut kept = Vec::new();
        for image in 0..images {
            let first_row = image * patches;
            let mut x = self.embed_patches(gpu, rec, &pixels, image)?;
            rec.flush();
            let mut layers = Vec::new();
            for layer in &self.layers {
                let rounded = self.bf16.then(|| gpu.round_to_bf16(rec, &x)).transpose()?;
                let (out, cache) = self.layer_forward(gpu, rec, layer, x, &mask, first_row, run)?;
                if train {
                    layers.push(if checkpoint {
                        KeptLayer::Input(rounded.unwrap_or(cache.x))
                    } else {
                        KeptLayer::Full(Box::new(cache))
                    });
                }
                rec.flush();
                x = out;
            }
            // `[patches, hidden]` this image's output, copied into its rows of `y`.
            let out = gpu.empty(&[patches, d.hidden], DType::F32)?;
            let stats = gpu.empty(&[patches, 2], DType::F32)?;
            gpu.layernorm_forward(
                rec,
                &x,
                &self.post_layernorm_weight,
                &self.post_layernorm_bias,
                &out,
                &stats,
                d.layer_norm_eps,
            )?;
            gpu.copy_rows(rec, &out, 0, &y, first_row, patches)?;
            if train {
                kept.push(KeptImage {
                    layers,
                    last: (x, stats),
                });
            }
            rec.flush();
        }
        let cache = GpuVisionCache {
            images,
            mask: train.then_some(mask),
            kept,
        };
        Ok((y, cache))
    }

    /// Image `image`'s patch embeddings `[patches, hidden]` from `pixels [images, channels·size²]`:
    /// the stride-patch conv as unfolded patches · Wᵀ + b, plus the position embeddings.
    fn embed_patches(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder,
        pixels: &GpuTensor,
        image: usize,
    ) -> Result<GpuTensor> {
        let d = &self.dims;
        let size = d.image_size;
        let one = gpu.empty(&[1, pixels.row_len()], DType::F32)?;
        gpu.copy_rows(rec, pixels, image, &one, 0, 1)?;
        let unfold = PatchDims {
            images: 1,
            channels: d.channels,
            image_size: size,
            patch_size: d.patch_size,
        };
        let patches = gpu.empty(&[d.num_patches(), d.patch_dim()], DType::F32)?;
        gpu.patch_unfold(
            rec,
            &one.reshape(&[1, d.channels, size, size])?,
            &unfold,
            &patches,
        )?;
        let x = gpu.empty(&[d.num_patches(), d.hidden], DType::F32)?;
        gpu.matmul(
            rec,
            &patches,
            &self.patch_weight,
            &x,
            MatmulOpts {
                trans_b: true,
                bias: Some(&self.patch_bias),
                ..Default::default()
            },
        )?;
        gpu.accumulate(rec, &x, &self.position_embedding)?;
        Ok(x)
    }

    /// `d_out [images * patches, hidden]` (the gradient of the post_layernorm output):
    /// accumulates the LoRA grads of the tower, down to the lowest layer that has a pair, image
    /// by image (each image's grads add to the pairs' gradient buffers, as micro-batches' do).
    /// Does nothing when the tower has no LoRA pair. Consumes the cache: each image's layer
    /// activations return to the pool at the flush after that layer's backward (a checkpointed
    /// layer is recomputed first, with the image's own dropout masks).
    pub fn backward(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder,
        cache: GpuVisionCache,
        d_out: &GpuTensor,
        run: &LoraRun,
    ) -> Result<()> {
        let Some(lowest) = self.lowest_lora_layer() else {
            return Ok(());
        };
        let GpuVisionCache { images, mask, kept } = cache;
        let Some(mask) = mask else {
            bail!("vision backward: the forward ran without LoRA pairs and kept no activations");
        };
        ensure!(
            kept.len() == images,
            "vision backward: the cache holds {} images, the forward ran {images}",
            kept.len()
        );
        let d = &self.dims;
        let patches = d.num_patches();
        let tokens = images * patches;
        ensure!(
            d_out.numel() == tokens * d.hidden,
            "vision backward: d_out {:?} is not [{tokens}, {}]",
            d_out.shape(),
            d.hidden
        );
        let d_out = d_out.reshape(&[tokens, d.hidden])?;
        for (image, KeptImage { mut layers, last }) in kept.into_iter().enumerate() {
            ensure!(
                layers.len() == self.layers.len(),
                "vision backward: the cache holds {} layers, the tower has {}",
                layers.len(),
                self.layers.len()
            );
            let first_row = image * patches;
            let (last, last_stats) = last;
            // `[patches, hidden]` this image's rows of d_out.
            let d_image = gpu.empty(&[patches, d.hidden], DType::F32)?;
            gpu.copy_rows(rec, &d_out, first_row, &d_image, 0, patches)?;
            let mut grad = gpu.empty(&[patches, d.hidden], DType::F32)?;
            gpu.layernorm_backward(
                rec,
                &last,
                &self.post_layernorm_weight,
                &d_image,
                &last_stats,
                Some(&grad),
                None,
                false,
            )?;
            drop((d_image, last, last_stats));
            rec.flush();
            for i in (lowest..self.layers.len()).rev() {
                let layer = &self.layers[i];
                let c = match layers.pop().context("one kept entry per layer")? {
                    KeptLayer::Full(c) => *c,
                    KeptLayer::Input(x) => {
                        let x = gpu.widen_to_f32(rec, &x)?;
                        self.layer_forward(gpu, rec, layer, x, &mask, first_row, run)?
                            .1
                    }
                };
                // Below the lowest LoRA layer nothing trains: its q/k/v need no input gradient.
                let need_dx = i > lowest;
                let d_x = self.layer_backward(gpu, rec, layer, &c, &grad, &mask, run, need_dx)?;
                drop(c);
                if let Some(d_x) = d_x {
                    grad = d_x;
                }
                rec.flush();
            }
        }
        Ok(())
    }
}
