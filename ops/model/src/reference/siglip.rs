//! The SigLIP vision tower (transformers `SiglipVisionTransformer` without head), forward and
//! backward to the encoder input (the patch and position embeddings are frozen and nothing
//! below them trains, so no gradient goes to the pixels).
//!
//! `x = patch_conv(pixels) + position_embedding`; per pre-LN layer
//! `h = x + out_proj(attn(layer_norm1(x)))`, `out = h + fc2(gelu_tanh(fc1(layer_norm2(h))))`;
//! then `post_layernorm`. Attention is full (non-causal), with biases, scale `head_dim^-0.5`.

use anyhow::{ensure, Result};

use super::kernels::{
    gelu_tanh, gelu_tanh_grad, layernorm_backward, layernorm_forward, matmul_xwt,
};
use super::lora::{AdapterGrads, Linear, LinearCache, LoraCall};
use engine::reference::attention::{
    attention_backward, attention_forward, AttentionDims, AttentionMask,
};

/// Sizes and constants of the vision tower.
#[derive(Debug, Clone, Copy)]
pub struct VisionDims {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f32,
}

impl VisionDims {
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }
    pub fn num_patches(&self) -> usize {
        self.patches_per_side() * self.patches_per_side()
    }
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
    /// Values per flattened patch, `(c, kh, kw)` order.
    pub fn patch_dim(&self) -> usize {
        self.channels * self.patch_size * self.patch_size
    }
}

/// One encoder layer's frozen weights.
#[derive(Debug, Clone)]
pub struct EncoderLayer {
    /// `[hidden]` each.
    pub layer_norm1_weight: Vec<f32>,
    pub layer_norm1_bias: Vec<f32>,
    pub layer_norm2_weight: Vec<f32>,
    pub layer_norm2_bias: Vec<f32>,
    /// `[hidden, hidden]` with bias `[hidden]`.
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    /// `[intermediate, hidden]`, `[hidden, intermediate]`, with biases.
    pub fc1: Linear,
    pub fc2: Linear,
}

/// The whole tower's frozen weights.
#[derive(Debug, Clone)]
pub struct VisionTower {
    pub dims: VisionDims,
    /// Conv2d weight `[hidden, channels, patch, patch]` seen as `[hidden, patch_dim]`, bias `[hidden]`.
    pub patch_weight: Vec<f32>,
    pub patch_bias: Vec<f32>,
    /// `[num_patches, hidden]`.
    pub position_embedding: Vec<f32>,
    pub layers: Vec<EncoderLayer>,
    /// `[hidden]` each.
    pub post_layernorm_weight: Vec<f32>,
    pub post_layernorm_bias: Vec<f32>,
}

/// Activations one encoder layer keeps.
#[derive(Debug, Clone)]
pub struct EncoderLayerCache {
    x: Vec<f32>, // [tokens, hidden]
    q_lin: LinearCache,
    k_lin: LinearCache,
    v_lin: LinearCache,
    q: Vec<f32>, // [tokens, heads, head_dim]
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>, // [tokens, heads, head_dim]
    lse: Vec<f32>,  // [images, heads, patches]
    o_lin: LinearCache,
    h: Vec<f32>, // [tokens, hidden]
    fc1_lin: LinearCache,
    f1: Vec<f32>, // [tokens, intermediate] fc1 output
    fc2_lin: LinearCache,
}

/// Activations of the whole tower.
#[derive(Debug, Clone)]
pub struct VisionCache {
    images: usize,
    layers: Vec<EncoderLayerCache>,
    /// `[tokens, hidden]` input of post_layernorm.
    last: Vec<f32>,
}

impl EncoderLayer {
    fn attention_setup(
        dims: &VisionDims,
        images: usize,
    ) -> (AttentionDims, AttentionMask<'static>) {
        (
            AttentionDims {
                batch: images,
                seq: dims.num_patches(),
                q_heads: dims.heads,
                kv_heads: dims.heads,
                head_dim: dims.head_dim(),
            },
            AttentionMask::default(),
        )
    }

    pub fn forward(
        &self,
        x: &[f32],
        dims: &VisionDims,
        images: usize,
        lora: &LoraCall,
    ) -> Result<(Vec<f32>, EncoderLayerCache)> {
        let eps = dims.layer_norm_eps;
        let l1 = layernorm_forward(x, &self.layer_norm1_weight, &self.layer_norm1_bias, eps);
        let (q, q_lin) = self.q_proj.forward(&l1, lora);
        let (k, k_lin) = self.k_proj.forward(&l1, lora);
        let (v, v_lin) = self.v_proj.forward(&l1, lora);
        let (adims, mask) = Self::attention_setup(dims, images);
        let scale = (dims.head_dim() as f64).powf(-0.5) as f32;
        let (attn, lse) = attention_forward(&q, &k, &v, &adims, &mask, scale)?;
        let (o, o_lin) = self.out_proj.forward(&attn, lora);
        let h: Vec<f32> = x.iter().zip(&o).map(|(a, b)| a + b).collect();
        let l2 = layernorm_forward(&h, &self.layer_norm2_weight, &self.layer_norm2_bias, eps);
        let (f1, fc1_lin) = self.fc1.forward(&l2, lora);
        let g: Vec<f32> = f1.iter().map(|&v| gelu_tanh(v)).collect();
        let (f2, fc2_lin) = self.fc2.forward(&g, lora);
        let out = h.iter().zip(&f2).map(|(a, b)| a + b).collect();
        Ok((
            out,
            EncoderLayerCache {
                x: x.to_vec(),
                q_lin,
                k_lin,
                v_lin,
                q,
                k,
                v,
                attn,
                lse,
                o_lin,
                h,
                fc1_lin,
                f1,
                fc2_lin,
            },
        ))
    }

    pub fn backward(
        &self,
        c: &EncoderLayerCache,
        d_out: &[f32],
        dims: &VisionDims,
        images: usize,
        lora: &LoraCall,
        mut grads: Option<&mut AdapterGrads>,
    ) -> Result<Vec<f32>> {
        let d_g = self
            .fc2
            .backward(&c.fc2_lin, d_out, lora, grads.as_deref_mut());
        let d_f1: Vec<f32> = d_g
            .iter()
            .zip(&c.f1)
            .map(|(&g, &x)| g * gelu_tanh_grad(x))
            .collect();
        let d_l2 = self
            .fc1
            .backward(&c.fc1_lin, &d_f1, lora, grads.as_deref_mut());
        let d_h_mlp =
            layernorm_backward(&c.h, &self.layer_norm2_weight, dims.layer_norm_eps, &d_l2);
        let d_h: Vec<f32> = d_out.iter().zip(&d_h_mlp).map(|(a, b)| a + b).collect();
        let d_attn = self
            .out_proj
            .backward(&c.o_lin, &d_h, lora, grads.as_deref_mut());
        let (adims, mask) = Self::attention_setup(dims, images);
        let scale = (dims.head_dim() as f64).powf(-0.5) as f32;
        let (d_q, d_k, d_v) = attention_backward(
            &c.q, &c.k, &c.v, &c.attn, &c.lse, &d_attn, &adims, &mask, scale,
        )?;
        let mut d_l1 = self
            .q_proj
            .backward(&c.q_lin, &d_q, lora, grads.as_deref_mut());
        let d_l1_k = self
            .k_proj
            .backward(&c.k_lin, &d_k, lora, grads.as_deref_mut());
        let d_l1_v = self.v_proj.backward(&c.v_lin, &d_v, lora, grads);
        for ((a, b), c2) in d_l1.iter_mut().zip(&d_l1_k).zip(&d_l1_v) {
            *a += b + c2;
        }
        let d_x_attn =
            layernorm_backward(&c.x, &self.layer_norm1_weight, dims.layer_norm_eps, &d_l1);
        Ok(d_h.iter().zip(&d_x_attn).map(|(a, b)| a + b).collect())
    }
}

impl VisionTower {
    /// Patch embedding + position embedding: `pixels [images, channels, size, size]` ->
    /// `[images, patches, hidden]`, patch `p = row·side + col`, each patch flattened `(c, kh, kw)`.
    pub fn embed(&self, pixels: &[f32], images: usize) -> Result<Vec<f32>> {
        let d = &self.dims;
        let (size, ps, side) = (d.image_size, d.patch_size, d.patches_per_side());
        ensure!(
            pixels.len() == images * d.channels * size * size,
            "pixel_values has {} values, expected {images} images x {} x {size} x {size}",
            pixels.len(),
            d.channels
        );
        let mut patches = Vec::with_capacity(images * d.num_patches() * d.patch_dim());
        for img in 0..images {
            for pr in 0..side {
                for pc in 0..side {
                    for c in 0..d.channels {
                        for kh in 0..ps {
                            let row =
                                ((img * d.channels + c) * size + pr * ps + kh) * size + pc * ps;
                            patches.extend_from_slice(&pixels[row..row + ps]);
                        }
                    }
                }
            }
        }
        let rows = images * d.num_patches();
        let mut x = matmul_xwt(&patches, &self.patch_weight, rows, d.patch_dim(), d.hidden);
        for (r, row) in x.chunks_exact_mut(d.hidden).enumerate() {
            let pos = &self.position_embedding[(r % d.num_patches()) * d.hidden..][..d.hidden];
            for ((o, b), p) in row.iter_mut().zip(&self.patch_bias).zip(pos) {
                *o += b + p;
            }
        }
        Ok(x)
    }

    /// `pixels [images, channels, size, size]` -> `last_hidden_state [images, patches, hidden]`
    /// (after post_layernorm).
    pub fn forward(
        &self,
        pixels: &[f32],
        images: usize,
        lora: &LoraCall,
    ) -> Result<(Vec<f32>, VisionCache)> {
        let mut x = self.embed(pixels, images)?;
        let mut layers = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let (y, cache) = layer.forward(&x, &self.dims, images, lora)?;
            layers.push(cache);
            x = y;
        }
        let out = layernorm_forward(
            &x,
            &self.post_layernorm_weight,
            &self.post_layernorm_bias,
            self.dims.layer_norm_eps,
        );
        Ok((
            out,
            VisionCache {
                images,
                layers,
                last: x,
            },
        ))
    }

    /// `d_last_hidden_state [images, patches, hidden]` -> gradient at the encoder input
    /// (returned for checks; nothing below it trains), accumulating the tower's LoRA grads.
    pub fn backward(
        &self,
        cache: &VisionCache,
        d_out: &[f32],
        lora: &LoraCall,
        mut grads: Option<&mut AdapterGrads>,
    ) -> Result<Vec<f32>> {
        let mut d = layernorm_backward(
            &cache.last,
            &self.post_layernorm_weight,
            self.dims.layer_norm_eps,
            d_out,
        );
        for (layer, c) in self.layers.iter().zip(&cache.layers).rev() {
            d = layer.backward(c, &d, &self.dims, cache.images, lora, grads.as_deref_mut())?;
        }
        Ok(d)
    }
}
