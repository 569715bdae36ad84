//! The training side of [`Gemma3Gpu`]: its trainable parameters (LoRA pairs, modules_to_save
//! copies) and `accumulate`, one micro-batch's forward and backward.

use anyhow::{Context, Result};
use data::collate::Batch;
use engine::gpu::kernels::cross_entropy::CrossEntropyArgs;
use engine::gpu::{DType, Gpu, GpuTensor, Recorder};

use super::*;
use crate::gpu::decoder::GpuDecoderLayerCache;
use crate::gpu::linear::{GpuLinear, LoraRun};
use crate::names::{EMBED_TOKENS, LM_HEAD};
use crate::reference::lora::PEFT_PREFIX;
use crate::reference::loss::shift_labels;
use crate::train_model::{GradsReady, Parameter, TrainModel};

impl TrainModel for Gemma3Gpu {
    fn parameters(&self) -> Vec<Parameter> {
        let mut out = Vec::new();
        for lin in self.linears() {
            if let Some(p) = &lin.lora {
                for (half, value, grad) in [("A", &p.a, &p.grad_a), ("B", &p.b, &p.grad_b)] {
                    out.push(Parameter {
                        key: format!("{PEFT_PREFIX}{}.lora_{half}.weight", lin.module),
                        value: value.clone(),
                        grad: grad.clone(),
                    });
                }
            }
        }
        for (name, table) in [
            (LM_HEAD, &self.lm_head_copy),
            (EMBED_TOKENS, &self.embed_copy),
        ] {
            if let Some(t) = table {
                out.push(Parameter {
                    key: format!("{PEFT_PREFIX}{name}"),
                    value: t.value.clone(),
                    grad: t.grad.clone(),
                });
            }
        }
        out
    }

    fn accumulate(
        &mut self,
        gpu: &Gpu,
        rec: &mut Recorder,
        batch: &Batch,
        loss_scale: f32,
        call: u64,
    ) -> Result<GpuTensor> {
        self.accumulate_with(gpu, rec, batch, loss_scale, call, None)
    }

    fn accumulate_notify(
        &mut self,
        gpu: &Gpu,
        rec: &mut Recorder,
        batch: &Batch,
        loss_scale: f32,
        call: u64,
        ready: &mut GradsReady,
    ) -> Result<GpuTensor> {
        self.accumulate_with(gpu, rec, batch, loss_scale, call, Some(ready))
    }

    fn gradient_rows(&self, param: usize, batch: &Batch) -> Option<Vec<u32>> {
        // The embed_tokens copy's gradient reaches only the rows of the ids embedded (image
        // soft tokens are overwritten by the image features and reach no row).
        (Some(param) == self.parameter_groups().embed).then(|| {
            dist::distinct_rows(
                batch
                    .input_ids
                    .iter()
                    .filter(|&&id| Some(id) != self.image_token_index)
                    .map(|&id| id as u32),
            )
        })
    }
}

/// Indices into [`TrainModel::parameters`] of the gradients that become final together in the
/// backward: the lm_head copy (right after the loss), each decoder layer's LoRA pairs, the
/// vision tower's, the embed_tokens copy (last).
struct ParameterGroups {
    layers: Vec<Vec<usize>>,
    vision: Vec<usize>,
    lm_head: Option<usize>,
    embed: Option<usize>,
}

impl Gemma3Gpu {
    /// The groups in `parameters()`'s order: decoder layers' pairs (A then B of each linear),
    /// the tower's, then the lm_head and embed_tokens copies.
    fn parameter_groups(&self) -> ParameterGroups {
        let mut next = 0usize;
        let mut take = |linears: &mut dyn Iterator<Item = &GpuLinear>| -> Vec<usize> {
            let mut out = Vec::new();
            for lin in linears {
                if lin.lora.is_some() {
                    out.extend([next, next + 1]);
                    next += 2;
                }
            }
            out
        };
        let layers: Vec<Vec<usize>> = self
            .layers
            .iter()
            .map(|l| take(&mut l.linears().into_iter()))
            .collect();
        let vision = take(&mut self.vision.iter().flat_map(|v| v.linears()));
        let mut table = |t: &Option<TrainedTable>| {
            t.as_ref().map(|_| {
                next += 1;
                next - 1
            })
        };
        let lm_head = table(&self.lm_head_copy);
        let embed = table(&self.embed_copy);
        ParameterGroups {
            layers,
            vision,
            lm_head,
            embed,
        }
    }

    /// [`TrainModel::accumulate`], reporting each group of gradients to `ready` once the work
    /// that finishes it is submitted.
    fn accumulate_with(
        &mut self,
        gpu: &Gpu,
        rec: &mut Recorder,
        batch: &Batch,
        loss_scale: f32,
        call: u64,
        mut ready: Option<&mut GradsReady>,
    ) -> Result<GpuTensor> {
        let groups = ready.is_some().then(|| self.parameter_groups());
        let mut report = |rec: &mut Recorder, indices: &[usize]| -> Result<()> {
            match ready.as_mut() {
                Some(f) if !indices.is_empty() => {
                    rec.flush();
                    f(indices)
                }
                _ => Ok(()),
            }
        };
        let p = self.prepare(gpu, batch)?;
        let run = LoraRun {
            settings: self.settings,
            training: true,
            call,
            precision: self.matmul_precision,
        };
        let (dims, ctx) = (self.dims, &p.ctx);
        let checkpoint = self.gradient_checkpointing;
        let (mut x, image_cache) = self.embed(gpu, rec, &p, &run)?;
        // Checkpointed layer inputs: f32, or under `bf16` the bf16 copy of the input the layer
        // really ran on (the residual stream is rounded to bf16 at each layer boundary, as
        // torch's bf16 model holds it, so the recomputed forward sees the same values).
        let mut inputs: Vec<GpuTensor> = Vec::new();
        let mut caches: Vec<GpuDecoderLayerCache> = Vec::new();
        let mut bytes = ActivationBytes::default();
        for (i, layer) in self.layers.iter().enumerate() {
            let rounded = self.round_layer_input(gpu, rec, &x)?;
            let (y, cache) = layer
                .forward(gpu, rec, &x, &dims, ctx, &run)
                .with_context(|| format!("decoder layer {i}"))?;
            bytes.full += cache.bytes();
            if checkpoint {
                let kept = rounded.unwrap_or(x);
                bytes.kept += kept.dtype().bytes_for(kept.numel());
                inputs.push(kept);
                drop(cache);
            } else {
                bytes.kept += cache.bytes();
                caches.push(cache);
            }
            rec.flush();
            x = y;
        }
        self.last_activation_bytes = bytes;
        let tokens = x.rows();
        let normed = gpu.empty(x.shape(), DType::F32)?;
        let rstd = gpu.empty(&[tokens], DType::F32)?;
        gpu.rmsnorm_forward(rec, &x, &self.final_norm, &normed, &rstd, dims.rms_eps)?;

        // Loss: position t predicts labels[t + 1] (reference::loss::shift_labels, cropped to the
        // attention mask as transformers 4.5x does; identical for the collator's -100 padding).
        let mask: Vec<u32> = batch.attention_mask.iter().map(|&v| v as u32).collect();
        let shifted = shift_labels(&batch.labels, &mask, batch.batch_size, batch.seq_len, true);
        let labels = gpu.upload_labels(&shifted, dims.vocab)?;
        let d_normed = gpu.empty(x.shape(), DType::F32)?;
        let totals = gpu.empty(&[4], DType::U32)?;
        gpu.lm_head_cross_entropy(
            rec,
            &CrossEntropyArgs {
                hidden: &normed,
                weight: self.output_embedding()?,
                labels: &labels,
                grad_scale: loss_scale,
                d_hidden: &d_normed,
                d_weight: self.lm_head_copy.as_ref().map(|c| &c.grad),
                totals: &totals,
            },
        )?;
        let mut d = gpu.empty(x.shape(), DType::F32)?;
        gpu.rmsnorm_backward(
            rec,
            &x,
            &self.final_norm,
            &d_normed,
            &rstd,
            Some(&d),
            None,
            false,
        )?;
        // Only the hidden-state gradient and the loss totals outlive the loss.
        drop((x, normed, rstd, labels, d_normed));
        rec.flush();
        if let Some(g) = &groups {
            report(rec, g.lm_head.as_slice())?;
        }
        for (i, layer) in self.layers.iter().enumerate().rev() {
            let cache = if checkpoint {
                let input = gpu.widen_to_f32(rec, &inputs[i])?;
                let (_, cache) = layer
                    .forward(gpu, rec, &input, &dims, ctx, &run)
                    .with_context(|| format!("decoder layer {i} (recomputed)"))?;
                cache
            } else {
                caches.pop().context("one cache per layer")?
            };
            d = layer
                .backward(gpu, rec, &cache, &d, &dims, ctx, &run)
                .with_context(|| format!("decoder layer {i} backward"))?;
            drop(cache);
            if checkpoint {
                inputs.pop();
            }
            rec.flush();
            if let Some(g) = &groups {
                report(rec, &g.layers[i])?;
            }
        }
        // The image features' gradient: the soft-token rows of `d`, through the projector into
        // the tower (only when the tower trains LoRA pairs).
        if let (Some(cache), Some(vision), Some(projector)) =
            (image_cache, &self.vision, &self.projector)
        {
            let mm = self.mm_tokens_per_image;
            let d_features = gpu.empty(&[p.image_starts.len() * mm, dims.hidden], DType::F32)?;
            for (image, &start) in p.image_starts.iter().enumerate() {
                gpu.copy_rows(rec, &d, start, &d_features, image * mm, mm)?;
            }
            let d_vision = projector.backward(gpu, rec, &cache.projector, &d_features)?;
            drop((d_features, cache.projector));
            rec.flush();
            vision.backward(gpu, rec, cache.vision, &d_vision, &run)?;
        }
        if let Some(g) = &groups {
            report(rec, &g.vision)?;
        }
        // `d` is the gradient of the merged embeddings; image soft-token rows were overwritten by
        // the features, so their ids are u32::MAX here and reach no row.
        if let Some(table) = &self.embed_copy {
            let pad = self.pad_token_id.map(|id| id as u32);
            if table.grad.dtype() == DType::BF16 {
                gpu.embedding_scatter_add_bf16(
                    rec,
                    &table.grad,
                    &p.grad_ids,
                    &d,
                    self.embed_scale,
                    pad,
                )?;
            } else {
                let ids = gpu.upload_u32(&[p.grad_ids.len()], &p.grad_ids)?;
                gpu.embedding_scatter_add(rec, &table.grad, &ids, &d, self.embed_scale, pad)?;
            }
        }
        if let Some(g) = &groups {
            report(rec, g.embed.as_slice())?;
        }
        Ok(totals)
    }
}
