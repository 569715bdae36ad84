//! One SigLIP encoder layer on the kernels: its forward (keeping what the backward needs, or
//! only the input when checkpointed) and its backward.

use anyhow::Result;
use engine::gpu::kernels::attention::{AttentionGrads, AttentionMaskGpu};
use engine::gpu::{DType, Gpu, GpuTensor, Recorder};

use super::*;
use crate::gpu::linear::LoraRun;

impl GpuVisionTower {
    /// One encoder layer's forward on one image: `x [patches, hidden]`, rows `first_row..` of
    /// the batch (for the dropout masks) -> its output and what its backward reads.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn layer_forward(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder,
        layer: &GpuEncoderLayer,
        x: GpuTensor,
        mask: &AttentionMaskGpu,
        first_row: usize,
        run: &LoraRun,
    ) -> Result<(GpuTensor, GpuEncoderLayerCache)> {
        let d = &self.dims;
        let tokens = x.rows();
        let adims = self.attention_dims();
        let eps = d.layer_norm_eps;
        let ln1 = gpu.empty(&[tokens, d.hidden], DType::F32)?;
        let ln1_stats = gpu.empty(&[tokens, 2], DType::F32)?;
        gpu.layernorm_forward(
            rec,
            &x,
            &layer.layer_norm1_weight,
            &layer.layer_norm1_bias,
            &ln1,
            &ln1_stats,
            eps,
        )?;
        let (q, q_lin) = layer.q_proj.forward_at(gpu, rec, &ln1, run, first_row)?;
        let (k, k_lin) = layer.k_proj.forward_at(gpu, rec, &ln1, run, first_row)?;
        let (v, v_lin) = layer.v_proj.forward_at(gpu, rec, &ln1, run, first_row)?;
        let attn = gpu.empty(&[tokens, d.hidden], DType::F32)?;
        let lse = gpu.empty(&[adims.lse_len()], DType::F32)?;
        gpu.attention_forward(rec, &q, &k, &v, mask, self.attention_scale(), &attn, &lse)?;
        // h = x + out_proj(attn), accumulated into out_proj's fresh output.
        let (h, o_lin) = layer.out_proj.forward_at(gpu, rec, &attn, run, first_row)?;
        gpu.accumulate(rec, &h, &x)?;
        let ln2 = gpu.empty(&[tokens, d.hidden], DType::F32)?;
        let ln2_stats = gpu.empty(&[tokens, 2], DType::F32)?;
        gpu.layernorm_forward(
            rec,
            &h,
            &layer.layer_norm2_weight,
            &layer.layer_norm2_bias,
            &ln2,
            &ln2_stats,
            eps,
        )?;
        let (f1, fc1_lin) = layer.fc1.forward_at(gpu, rec, &ln2, run, first_row)?;
        let g = gpu.empty(&[tokens, d.intermediate], DType::F32)?;
        gpu.gelu_forward(rec, &f1, &g)?;
        let (out, fc2_lin) = layer.fc2.forward_at(gpu, rec, &g, run, first_row)?;
        gpu.accumulate(rec, &out, &h)?;
        Ok((
            out,
            GpuEncoderLayerCache {
                x,
                ln1_stats,
                q_lin,
                k_lin,
                v_lin,
                q,
                k,
                v,
                lse,
                o_lin,
                h,
                ln2_stats,
                fc1_lin,
                f1,
                fc2_lin,
            },
        ))
    }

    /// One encoder layer's backward: accumulates its LoRA grads and returns the gradient of
    /// its input when `need_dx` (`grad` is the gradient of its output).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn layer_backward(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder,
        layer: &GpuEncoderLayer,
        c: &GpuEncoderLayerCache,
        grad: &GpuTensor,
        mask: &AttentionMaskGpu,
        run: &LoraRun,
        need_dx: bool,
    ) -> Result<Option<GpuTensor>> {
        let d = &self.dims;
        let tokens = c.x.rows();
        let empty = || gpu.empty(&[tokens, d.hidden], DType::F32);
        // MLP branch: out = h + fc2(gelu(fc1(ln2(h)))).
        let d_g = layer
            .fc2
            .backward(gpu, rec, &c.fc2_lin, grad, run, true)?
            .expect("asked for dx");
        let d_f1 = gpu.empty(&[tokens, d.intermediate], DType::F32)?;
        gpu.gelu_backward(rec, &c.f1, &d_g, &d_f1, false)?;
        let d_ln2 = layer
            .fc1
            .backward(gpu, rec, &c.fc1_lin, &d_f1, run, true)?
            .expect("asked for dx");
        let d_h = empty()?;
        gpu.layernorm_backward(
            rec,
            &c.h,
            &layer.layer_norm2_weight,
            &d_ln2,
            &c.ln2_stats,
            Some(&d_h),
            None,
            false,
        )?;
        gpu.accumulate(rec, &d_h, grad)?;
        // Attention branch: h = x + out_proj(attn(ln1(x))).
        let d_attn = layer
            .out_proj
            .backward(gpu, rec, &c.o_lin, &d_h, run, true)?
            .expect("asked for dx");
        let (dq, dk, dv) = (empty()?, empty()?, empty()?);
        gpu.attention_backward(
            rec,
            &AttentionGrads {
                q: &c.q,
                k: &c.k,
                v: &c.v,
                out: &c.o_lin.x,
                lse: &c.lse,
                d_out: &d_attn,
            },
            mask,
            self.attention_scale(),
            &dq,
            &dk,
            &dv,
        )?;
        let d_ln1 = layer
            .q_proj
            .backward(gpu, rec, &c.q_lin, &dq, run, need_dx)?;
        let d_ln1_k = layer
            .k_proj
            .backward(gpu, rec, &c.k_lin, &dk, run, need_dx)?;
        let d_ln1_v = layer
            .v_proj
            .backward(gpu, rec, &c.v_lin, &dv, run, need_dx)?;
        let (Some(d_ln1), Some(d_k), Some(d_v)) = (d_ln1, d_ln1_k, d_ln1_v) else {
            return Ok(None);
        };
        gpu.accumulate(rec, &d_ln1, &d_k)?;
        gpu.accumulate(rec, &d_ln1, &d_v)?;
        let d_x = empty()?;
        gpu.layernorm_backward(
            rec,
            &c.x,
            &layer.layer_norm1_weight,
            &d_ln1,
            &c.ln1_stats,
            Some(&d_x),
            None,
            false,
        )?;
        gpu.accumulate(rec, &d_x, &d_h)?;
        Ok(Some(d_x))
    }
}
