//! Plain-Rust (CPU, f32 buffers, f64 accumulation) reference of the whole
//! `Gemma3ForConditionalGeneration` forward and of the backward that LoRA training with PEFT needs:
//! the oracle the GPU model is tested against layer by layer.
//!
//! Semantics are transformers 5.24 eager (`modeling_gemma3.py`, `modeling_siglip.py`) + PEFT 0.21
//! (`tuners/lora/layer.py`), checked against the golden fixtures that `tools/fixtures/make.py`
//! dumps from them, in `ops/tests/reference_model.rs`.
//! The backward computes only what the trainable tensors need: every LoRA A/B (text and vision
//! linears), the `modules_to_save` copies of lm_head and embed_tokens (independent, untied), and
//! the input gradients through the frozen layers on the way.
//!
//! Layout: every activation is row-major `[tokens, features]` with `tokens = batch·seq` (text) or
//! `images·patches` (vision).

pub mod gemma3;
pub mod kernels;
pub mod lora;
pub mod loss;
pub mod projector;
pub mod siglip;
pub mod train;

use anyhow::{bail, ensure, Context, Result};

use crate::config::{FloatDtype, ModelConfig};
use crate::names::{EMBED_TOKENS, LM_HEAD, PROJECTOR, TEXT, VISION};
use crate::Weights;
use engine::reference::attention::image_group_ids;
use engine::reference::cross_entropy::{
    lm_head_cross_entropy, CrossEntropyDims, CrossEntropyStats,
};
use gemma3::{
    embed_backward, embed_forward, DecoderLayer, DecoderLayerCache, SequenceContext, TextDims,
};
use kernels::{gemma_rmsnorm_backward, gemma_rmsnorm_forward, matmul_xwt};
use lora::{Adapter, AdapterGrads, Linear, LoraCall};
use loss::{count_label_tokens, shift_labels, LossNormalization};
use projector::{Projector, ProjectorCache};
use siglip::{EncoderLayer, VisionCache, VisionDims, VisionTower};

/// One collated batch, as the guide's collate_fn returns it.
#[derive(Debug, Clone)]
pub struct Batch {
    pub batch: usize,
    pub seq: usize,
    /// `[batch, seq]` each.
    pub input_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub token_type_ids: Vec<i64>,
    /// `[batch, seq]`, -100 where not trained; `None` for a forward without loss.
    pub labels: Option<Vec<i64>>,
    /// `[images, channels, size, size]`, every image of the batch in text order.
    pub pixel_values: Vec<f32>,
    pub images: usize,
}

/// Everything the forward returns (the tensors the golden fixtures hold).
#[derive(Debug, Clone)]
pub struct ForwardOutput {
    /// `[batch, seq, vocab]`.
    pub logits: Vec<f32>,
    /// `num_layers + 1` tensors `[batch, seq, hidden]`: the merged scaled embeddings, the output of
    /// every layer but the last, and the last layer's output after the final norm (as transformers'
    /// `output_hidden_states`).
    pub hidden_states: Vec<Vec<f32>>,
    /// `[images, patches, vision_hidden]` after post_layernorm.
    pub vision_last_hidden_state: Vec<f32>,
    /// `[images, mm_tokens_per_image, hidden]` projector output.
    pub image_features: Vec<f32>,
}

/// Activations the backward needs.
pub struct ForwardCache {
    vision: Option<VisionCache>,
    projector: Option<ProjectorCache>,
    layers: Vec<DecoderLayerCache>,
    /// `[tokens, hidden]` input of the final norm.
    last: Vec<f32>,
    /// `[tokens, hidden]` final-normed hidden states (the lm_head input).
    normed: Vec<f32>,
    image_groups: Vec<i32>,
    key_padding: Vec<u32>,
}

/// Scalars of one micro-batch's loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossOutput {
    /// The micro-batch's share of the step loss (`loss_sum · normalization scale`).
    pub loss: f64,
    pub stats: CrossEntropyStats,
}

/// The frozen model.
#[derive(Debug, Clone)]
pub struct Gemma3Reference {
    pub text: TextDims,
    /// `[vocab, hidden]` frozen base embedding (also the tied lm_head).
    pub embed_tokens: Vec<f32>,
    /// `sqrt(hidden)` rounded to the embedding's dtype.
    pub embed_scale: f32,
    pub layers: Vec<DecoderLayer>,
    /// `[hidden]`.
    pub final_norm: Vec<f32>,
    /// `[vocab, hidden]` when the checkpoint has its own lm_head; `None` when tied.
    pub lm_head: Option<Vec<f32>>,
    pub vision: Option<VisionTower>,
    pub projector: Option<Projector>,
    pub image_token_index: Option<i64>,
    pub mm_tokens_per_image: usize,
    /// `padding_idx` of the embedding: its row never receives a gradient.
    pub pad_token_id: Option<i64>,
}

fn linear(weights: &Weights, module: &str, with_bias: bool) -> Result<Linear> {
    let w = weights.to_f32(&format!("{module}.weight"))?;
    let shape = weights
        .expected()
        .iter()
        .find(|e| e.name == format!("{module}.weight"))
        .map(|e| e.shape.clone())
        .with_context(|| format!("the config implies no `{module}.weight`"))?;
    let bias = if with_bias {
        Some(weights.to_f32(&format!("{module}.bias"))?)
    } else {
        None
    };
    Ok(Linear {
        module: module.to_string(),
        weight: w,
        bias,
        out_features: shape[0],
        in_features: shape[1],
    })
}

impl Gemma3Reference {
    /// Builds the reference from loaded weights (dense, or NF4 dequantized as bitsandbytes does).
    pub fn from_weights(config: &ModelConfig, weights: &Weights) -> Result<Self> {
        let t = config.text();
        let text = TextDims {
            hidden: t.hidden_size,
            intermediate: t.intermediate_size,
            heads: t.num_attention_heads,
            kv_heads: t.num_key_value_heads,
            head_dim: t.head_dim(),
            vocab: t.vocab_size,
            rms_eps: t.rms_norm_eps as f32,
            attn_scale: t.attn_scale() as f32,
        };
        if t.final_logit_softcapping.is_some() || t.attn_logit_softcapping.is_some() {
            bail!("logit soft-capping is not implemented in the reference (Gemma 3 sets none)");
        }
        let embed = weights.tensor(EMBED_TOKENS)?;
        let embed_dtype = embed.float_dtype().unwrap_or(FloatDtype::F32);
        let embed_scale = t.embed_scale(embed_dtype);
        let embed_tokens = embed.to_f32()?;
        let mut layers = Vec::with_capacity(t.num_hidden_layers);
        for l in 0..t.num_hidden_layers {
            let p = format!("{TEXT}layers.{l}.");
            let v = |n: &str| weights.to_f32(&format!("{p}{n}.weight"));
            let rope = t.rope(l);
            layers.push(DecoderLayer {
                input_layernorm: v("input_layernorm")?,
                post_attention_layernorm: v("post_attention_layernorm")?,
                pre_feedforward_layernorm: v("pre_feedforward_layernorm")?,
                post_feedforward_layernorm: v("post_feedforward_layernorm")?,
                q_norm: v("self_attn.q_norm")?,
                k_norm: v("self_attn.k_norm")?,
                q_proj: linear(weights, &format!("{p}self_attn.q_proj"), false)?,
                k_proj: linear(weights, &format!("{p}self_attn.k_proj"), false)?,
                v_proj: linear(weights, &format!("{p}self_attn.v_proj"), false)?,
                o_proj: linear(weights, &format!("{p}self_attn.o_proj"), false)?,
                gate_proj: linear(weights, &format!("{p}mlp.gate_proj"), false)?,
                up_proj: linear(weights, &format!("{p}mlp.up_proj"), false)?,
                down_proj: linear(weights, &format!("{p}mlp.down_proj"), false)?,
                sliding_window: if t.is_sliding(l) {
                    Some(
                        t.sliding_window()
                            .context("a sliding layer needs `sliding_window`")?,
                    )
                } else {
                    None
                },
                rope_theta: rope.theta,
                rope_linear_factor: rope.linear_factor,
            });
        }
        let final_norm = weights.to_f32(&format!("{TEXT}norm.weight"))?;
        let lm_head = if !config.tie_word_embeddings() && weights.contains(LM_HEAD) {
            Some(weights.to_f32(LM_HEAD)?)
        } else {
            None
        };
        let (mut vision, mut projector, mut image_token_index, mut mm_tokens) =
            (None, None, None, 0);
        if let ModelConfig::ConditionalGeneration(g) = config {
            let vc = &g.vision_config;
            let dims = VisionDims {
                hidden: vc.hidden_size,
                intermediate: vc.intermediate_size,
                heads: vc.num_attention_heads,
                channels: vc.num_channels,
                image_size: vc.image_size(),
                patch_size: vc.patch_size(),
                layer_norm_eps: vc.layer_norm_eps as f32,
            };
            if vc.hidden_act != "gelu_pytorch_tanh" {
                bail!(
                    "vision hidden_act `{}` is not supported (gelu_pytorch_tanh)",
                    vc.hidden_act
                );
            }
            let v = |n: &str| weights.to_f32(&format!("{VISION}{n}"));
            let mut vlayers = Vec::with_capacity(vc.num_hidden_layers);
            for l in 0..vc.num_hidden_layers {
                let p = format!("{VISION}encoder.layers.{l}.");
                let n = |s: &str| weights.to_f32(&format!("{p}{s}"));
                vlayers.push(EncoderLayer {
                    layer_norm1_weight: n("layer_norm1.weight")?,
                    layer_norm1_bias: n("layer_norm1.bias")?,
                    layer_norm2_weight: n("layer_norm2.weight")?,
                    layer_norm2_bias: n("layer_norm2.bias")?,
                    q_proj: linear(weights, &format!("{p}self_attn.q_proj"), true)?,
                    k_proj: linear(weights, &format!("{p}self_attn.k_proj"), true)?,
                    v_proj: linear(weights, &format!("{p}self_attn.v_proj"), true)?,
                    out_proj: linear(weights, &format!("{p}self_attn.out_proj"), true)?,
                    fc1: linear(weights, &format!("{p}mlp.fc1"), true)?,
                    fc2: linear(weights, &format!("{p}mlp.fc2"), true)?,
                });
            }
            vision = Some(VisionTower {
                dims,
                patch_weight: v("embeddings.patch_embedding.weight")?,
                patch_bias: v("embeddings.patch_embedding.bias")?,
                position_embedding: v("embeddings.position_embedding.weight")?,
                layers: vlayers,
                post_layernorm_weight: v("post_layernorm.weight")?,
                post_layernorm_bias: v("post_layernorm.bias")?,
            });
            projector = Some(Projector {
                soft_emb_norm: weights.to_f32(&format!("{PROJECTOR}mm_soft_emb_norm.weight"))?,
                input_projection: weights
                    .to_f32(&format!("{PROJECTOR}mm_input_projection_weight"))?,
                vision_hidden: vc.hidden_size,
                text_hidden: t.hidden_size,
                patches: dims.num_patches(),
                pool_kernel: g.pool_kernel(),
                eps: vc.layer_norm_eps as f32,
            });
            image_token_index = Some(g.image_token_index);
            mm_tokens = g.mm_tokens_per_image;
        }
        if t.hidden_activation != "gelu_pytorch_tanh" {
            bail!(
                "hidden_activation `{}` is not supported (gelu_pytorch_tanh)",
                t.hidden_activation
            );
        }
        Ok(Self {
            text,
            embed_tokens,
            embed_scale,
            layers,
            final_norm,
            lm_head,
            vision,
            projector,
            image_token_index,
            mm_tokens_per_image: mm_tokens,
            pad_token_id: t.pad_token_id,
        })
    }

    /// The embedding table in use: the adapter's trainable copy, else the base.
    fn embedding<'a>(&'a self, adapter: Option<&'a Adapter>) -> &'a [f32] {
        adapter
            .and_then(|a| a.embed_tokens.as_deref())
            .unwrap_or(&self.embed_tokens)
    }

    /// The output projection in use: the adapter's copy, else the checkpoint's lm_head, else tied.
    fn output_embedding<'a>(&'a self, adapter: Option<&'a Adapter>) -> &'a [f32] {
        adapter
            .and_then(|a| a.lm_head.as_deref())
            .or(self.lm_head.as_deref())
            .unwrap_or(&self.embed_tokens)
    }

    fn check_batch(&self, b: &Batch) -> Result<()> {
        let n = b.batch * b.seq;
        for (name, len) in [
            ("input_ids", b.input_ids.len()),
            ("attention_mask", b.attention_mask.len()),
            ("token_type_ids", b.token_type_ids.len()),
        ] {
            ensure!(
                len == n,
                "{name} has {len} entries, expected batch x seq = {n}"
            );
        }
        if let Some(l) = &b.labels {
            ensure!(l.len() == n, "labels has {} entries, expected {n}", l.len());
        }
        if let Some((i, id)) = b
            .input_ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id < 0 || id as usize >= self.text.vocab)
        {
            bail!(
                "input_ids[{}][{}] = {id} is outside the vocabulary ({})",
                i / b.seq,
                i % b.seq,
                self.text.vocab
            );
        }
        Ok(())
    }

    /// Full forward. `lora` selects the adapter (and training-mode dropout).
    pub fn forward(&self, batch: &Batch, lora: &LoraCall) -> Result<(ForwardOutput, ForwardCache)> {
        self.check_batch(batch)?;
        let (bsz, seq, h) = (batch.batch, batch.seq, self.text.hidden);
        let tokens = bsz * seq;
        let ids: Vec<u32> = batch.input_ids.iter().map(|&i| i as u32).collect();
        let mut x = embed_forward(self.embedding(lora.adapter), h, &ids, self.embed_scale);

        // Vision tower + projector; features replace the image soft tokens in order.
        let image_positions: Vec<usize> = match self.image_token_index {
            Some(img) => (0..tokens).filter(|&i| batch.input_ids[i] == img).collect(),
            None => Vec::new(),
        };
        let (mut vision_out, mut features, mut vcache, mut pcache) =
            (Vec::new(), Vec::new(), None, None);
        if batch.images > 0 {
            let (Some(vt), Some(pr)) = (&self.vision, &self.projector) else {
                bail!(
                    "the batch has {} images but the model has no vision tower",
                    batch.images
                );
            };
            let (v, vc) = vt.forward(&batch.pixel_values, batch.images, lora)?;
            let (f, pc) = pr.forward(&v, batch.images)?;
            ensure!(
                image_positions.len() == batch.images * self.mm_tokens_per_image,
                "the batch has {} image soft tokens but {} images x {} tokens per image",
                image_positions.len(),
                batch.images,
                self.mm_tokens_per_image
            );
            for (k, &pos) in image_positions.iter().enumerate() {
                x[pos * h..][..h].copy_from_slice(&f[k * h..][..h]);
            }
            (vision_out, features, vcache, pcache) = (v, f, Some(vc), Some(pc));
        } else {
            ensure!(
                image_positions.is_empty(),
                "the batch has {} image soft tokens but no pixel_values",
                image_positions.len()
            );
        }

        let tt: Vec<u32> = batch.token_type_ids.iter().map(|&v| v as u32).collect();
        let image_groups = image_group_ids(&tt, bsz, seq)?;
        let key_padding: Vec<u32> = batch.attention_mask.iter().map(|&v| v as u32).collect();
        let ctx = SequenceContext {
            batch: bsz,
            seq,
            image_groups: &image_groups,
            key_padding: &key_padding,
        };
        let mut hidden_states = vec![x.clone()];
        let mut layer_caches = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let (y, c) = layer
                .forward(&x, &self.text, &ctx, lora)
                .with_context(|| format!("decoder layer {i}"))?;
            layer_caches.push(c);
            x = y;
            if i + 1 < self.layers.len() {
                hidden_states.push(x.clone());
            }
        }
        let (normed, _) = gemma_rmsnorm_forward(&x, &self.final_norm, self.text.rms_eps);
        hidden_states.push(normed.clone());
        let logits = matmul_xwt(
            &normed,
            self.output_embedding(lora.adapter),
            tokens,
            h,
            self.text.vocab,
        );
        Ok((
            ForwardOutput {
                logits,
                hidden_states,
                vision_last_hidden_state: vision_out,
                image_features: features,
            },
            ForwardCache {
                vision: vcache,
                projector: pcache,
                layers: layer_caches,
                last: x,
                normed,
                image_groups,
                key_padding,
            },
        ))
    }

    /// Shifted labels of a batch (see [`shift_labels`]).
    pub fn shifted_labels(batch: &Batch, crop_to_attention_mask: bool) -> Result<Vec<i32>> {
        let labels = batch.labels.as_ref().context("the batch has no labels")?;
        let mask: Vec<u32> = batch.attention_mask.iter().map(|&v| v as u32).collect();
        Ok(shift_labels(
            labels,
            &mask,
            batch.batch,
            batch.seq,
            crop_to_attention_mask,
        ))
    }

    /// Loss of one micro-batch without gradients.
    pub fn loss(
        &self,
        batch: &Batch,
        lora: &LoraCall,
        normalization: LossNormalization,
    ) -> Result<LossOutput> {
        let (_, cache) = self.forward(batch, lora)?;
        let labels = Self::shifted_labels(batch, true)?;
        let dims = self.ce_dims(labels.len());
        let (stats, _) = lm_head_cross_entropy(
            &cache.normed,
            self.output_embedding(lora.adapter),
            &labels,
            &dims,
            0.0,
            None,
        )?;
        let scale = normalization.scale(stats.counted as usize)?;
        Ok(LossOutput {
            loss: stats.loss_sum * scale,
            stats,
        })
    }

    fn ce_dims(&self, tokens: usize) -> CrossEntropyDims {
        CrossEntropyDims {
            tokens,
            hidden: self.text.hidden,
            vocab: self.text.vocab,
        }
    }

    /// Forward + backward of one micro-batch: returns its loss share and ACCUMULATES the gradients
    /// of `loss · normalization scale` into `grads` (made with [`AdapterGrads::zeros_like`] of
    /// `lora.adapter`).
    pub fn forward_backward(
        &self,
        batch: &Batch,
        lora: &LoraCall,
        normalization: LossNormalization,
        grads: &mut AdapterGrads,
    ) -> Result<LossOutput> {
        let adapter = lora
            .adapter
            .context("forward_backward needs an adapter to train")?;
        let (_, cache) = self.forward(batch, lora)?;
        let labels = Self::shifted_labels(batch, true)?;
        let counted = count_label_tokens(&labels);
        let scale = normalization.scale(counted)?;
        let (bsz, seq, h) = (batch.batch, batch.seq, self.text.hidden);
        let tokens = bsz * seq;
        let dims = self.ce_dims(tokens);
        let (stats, d_normed) = lm_head_cross_entropy(
            &cache.normed,
            self.output_embedding(Some(adapter)),
            &labels,
            &dims,
            scale as f32,
            grads.lm_head.as_deref_mut(),
        )?;
        let mut d =
            gemma_rmsnorm_backward(&cache.last, &self.final_norm, self.text.rms_eps, &d_normed);
        let ctx = SequenceContext {
            batch: bsz,
            seq,
            image_groups: &cache.image_groups,
            key_padding: &cache.key_padding,
        };
        for (i, (layer, c)) in self.layers.iter().zip(&cache.layers).enumerate().rev() {
            d = layer
                .backward(c, &d, &self.text, &ctx, lora, Some(grads))
                .with_context(|| format!("decoder layer {i} backward"))?;
        }
        // d is now the gradient of the merged embeddings: image positions go to the projector,
        // the rest to the embedding copy (image soft-token rows are overwritten, so they get none).
        let img = self.image_token_index;
        let mut d_features = Vec::new();
        for t in 0..tokens {
            if Some(batch.input_ids[t]) == img {
                d_features.extend_from_slice(&d[t * h..][..h]);
                d[t * h..][..h].iter_mut().for_each(|v| *v = 0.0);
            }
        }
        if let Some(d_table) = grads.embed_tokens.as_deref_mut() {
            let ids: Vec<u32> = batch
                .input_ids
                .iter()
                .map(|&i| if Some(i) == img { u32::MAX } else { i as u32 })
                .collect();
            // Image soft tokens were replaced: skip them like padding rows.
            let live: Vec<(usize, u32)> = ids
                .iter()
                .copied()
                .enumerate()
                .filter(|&(_, id)| id != u32::MAX)
                .collect();
            let live_ids: Vec<u32> = live.iter().map(|&(_, id)| id).collect();
            let live_d: Vec<f32> = live
                .iter()
                .flat_map(|&(t, _)| d[t * h..][..h].to_vec())
                .collect();
            embed_backward(
                d_table,
                h,
                &live_ids,
                &live_d,
                self.embed_scale,
                self.pad_token_id.map(|p| p as u32),
            );
        }
        if let (Some(vc), Some(pc), Some(vt), Some(pr)) = (
            &cache.vision,
            &cache.projector,
            &self.vision,
            &self.projector,
        ) {
            let d_vision = pr.backward(pc, &d_features)?;
            vt.backward(vc, &d_vision, lora, Some(grads))?;
        }
        Ok(LossOutput {
            loss: stats.loss_sum * scale,
            stats,
        })
    }
}
