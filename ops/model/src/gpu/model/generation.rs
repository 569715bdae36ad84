//! The generation side of [`Gemma3Gpu`] (`super::super::kv_cache` drives it): the prompt
//! forward that fills a KV cache, and the embedding and logits of one decode step.

use anyhow::{ensure, Context, Result};
use data::collate::Batch;
use engine::gpu::{DType, Gpu, GpuTensor, MatmulOpts, Recorder};

use super::*;
use crate::gpu::linear::LoraRun;

/// Generation (issue #15; `super::kv_cache` drives these): the prompt forward that fills a KV
/// cache, and the embedding and logits of one decode step. Kept apart from training so that
/// generation adds to this file without touching the paths above.
impl Gemma3Gpu {
    /// The prompt forward over a (left-padded) batch without caches: `positions [batch·seq]`
    /// replace the sequence's `t % seq` (transformers' generation counts positions from each
    /// row's first real token); `keep_kv(rec, layer, keys, values)` gets every layer's rotated
    /// keys and values `[batch·seq, kv_heads, head_dim]` before they are dropped. Returns the
    /// final-normed hidden state of every row's last position, `[batch, hidden]`.
    pub(crate) fn prefill(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder,
        batch: &Batch,
        positions: &[u32],
        mut keep_kv: impl FnMut(&mut Recorder, usize, &GpuTensor, &GpuTensor) -> Result<()>,
    ) -> Result<GpuTensor> {
        let (bsz, seq) = (batch.batch_size, batch.seq_len);
        ensure!(
            positions.len() == bsz * seq,
            "prefill: {} positions for {bsz} x {seq} tokens",
            positions.len()
        );
        let mut p = self.prepare(gpu, batch)?;
        p.ctx.positions = gpu.upload_u32(&[bsz * seq], positions)?;
        let run = LoraRun {
            settings: self.settings,
            training: false,
            call: 0,
            precision: self.matmul_precision,
        };
        let (mut x, _) = self.embed(gpu, rec, &p, &run)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let (y, cache) = layer
                .forward(gpu, rec, &x, &self.dims, &p.ctx, &run)
                .with_context(|| format!("decoder layer {i}"))?;
            let (k, v) = cache.keys_values();
            keep_kv(rec, i, k, v)?;
            drop(cache);
            rec.flush();
            x = y;
        }
        // Only the last position of each row predicts the first new token.
        let last = gpu.empty(&[bsz, self.dims.hidden], DType::F32)?;
        for b in 0..bsz {
            gpu.copy_rows(rec, &x, b * seq + seq - 1, &last, b, 1)?;
        }
        let normed = gpu.empty(&[bsz, self.dims.hidden], DType::F32)?;
        let rstd = gpu.empty(&[bsz], DType::F32)?;
        gpu.rmsnorm_forward(
            rec,
            &last,
            &self.final_norm,
            &normed,
            &rstd,
            self.dims.rms_eps,
        )?;
        Ok(normed)
    }

    /// Scaled embeddings `[rows, hidden]` of `ids [rows]` u32 (a decode step's new tokens).
    pub(crate) fn embed_ids(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder,
        ids: &GpuTensor,
    ) -> Result<GpuTensor> {
        let x = gpu.empty(&[ids.numel(), self.dims.hidden], DType::F32)?;
        gpu.embedding_gather(
            rec,
            self.input_embedding()?,
            ids,
            &x,
            self.embed_scale,
            self.bf16,
        )?;
        Ok(x)
    }

    /// Logits `[rows, vocab]` of final-normed hidden states `[rows, hidden]`.
    pub(crate) fn logits_of(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder,
        normed: &GpuTensor,
    ) -> Result<GpuTensor> {
        let logits = gpu.empty(&[normed.rows(), self.dims.vocab], DType::F32)?;
        // only generation calls this: the output embedding does not change meanwhile
        let opts = MatmulOpts {
            trans_b: true,
            frozen_b: true,
            ..Default::default()
        };
        gpu.matmul(rec, normed, self.output_embedding()?, &logits, opts)?;
        Ok(logits)
    }
}
