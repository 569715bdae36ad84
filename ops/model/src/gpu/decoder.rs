//! One Gemma 3 decoder layer on the GPU, forward and backward: the twin of
//! [`crate::reference::gemma3::DecoderLayer`] (which tests it).
//!
//! On the residual stream `x [tokens = batch·seq, hidden]`:
//! `h = x + post_attention_layernorm(o_proj(attn(rope(q_norm(q)), rope(k_norm(k)), v)))` with q, k,
//! v projections of `input_layernorm(x)`, then
//! `out = h + post_feedforward_layernorm(down(gelu_tanh(gate(n)) · up(n)))`, `n = pre_feedforward_layernorm(h)`.
//! The backward returns `dx` and accumulates the LoRA gradients of the seven linears.

use anyhow::{ensure, Context, Result};

use super::linear::{DenseStorage, GpuLinear, GpuLinearCache, LoraRun};
use crate::config::ModelConfig;
use crate::names::TEXT;
use crate::reference::gemma3::TextDims;
use crate::Weights;
use engine::gpu::kernels::attention::{AttentionGrads, AttentionMaskGpu};
use engine::gpu::{DType, Gpu, GpuTensor, Recorder, RopeTables};
use engine::reference::attention::{AttentionDims, AttentionMask};

/// One decoder layer's frozen weights (Gemma RMSNorm weights are used as `1 + w`).
#[derive(Debug, Clone)]
pub struct GpuDecoderLayer {
    /// `[hidden]` each.
    pub input_layernorm: GpuTensor,
    pub post_attention_layernorm: GpuTensor,
    pub pre_feedforward_layernorm: GpuTensor,
    pub post_feedforward_layernorm: GpuTensor,
    /// `[head_dim]` each, applied per head before RoPE.
    pub q_norm: GpuTensor,
    pub k_norm: GpuTensor,
    pub q_proj: GpuLinear,
    pub k_proj: GpuLinear,
    pub v_proj: GpuLinear,
    pub o_proj: GpuLinear,
    pub gate_proj: GpuLinear,
    pub up_proj: GpuLinear,
    pub down_proj: GpuLinear,
    /// `Some(window)` on sliding-attention layers.
    pub sliding_window: Option<usize>,
    /// RoPE base of this layer type and its linear scaling factor (positions / factor).
    pub rope_theta: f64,
    pub rope_linear_factor: f64,
}

/// Activations one layer keeps for its backward (every tensor f32).
pub struct GpuDecoderLayerCache {
    x: GpuTensor,      // [tokens, hidden] layer input
    rstd_x: GpuTensor, // [tokens]
    q_lin: GpuLinearCache,
    k_lin: GpuLinearCache,
    v_lin: GpuLinearCache,
    q: GpuTensor,      // [tokens, heads, head_dim] before q_norm
    rstd_q: GpuTensor, // [tokens·heads]
    k: GpuTensor,      // [tokens, kv_heads, head_dim] before k_norm
    rstd_k: GpuTensor, // [tokens·kv_heads]
    q_rot: GpuTensor,  // [tokens, heads, head_dim] attention input
    k_rot: GpuTensor,  // [tokens, kv_heads, head_dim]
    v: GpuTensor,      // [tokens, kv_heads, head_dim]
    attn: GpuTensor,   // [tokens, heads, head_dim] attention output (eager rows fixed)
    lse: GpuTensor,    // [batch, heads, seq]
    o_lin: GpuLinearCache,
    o: GpuTensor,      // [tokens, hidden] o_proj output
    rstd_o: GpuTensor, // [tokens]
    h: GpuTensor,      // [tokens, hidden] after the attention residual
    rstd_h: GpuTensor, // [tokens]
    gate_lin: GpuLinearCache,
    up_lin: GpuLinearCache,
    gate: GpuTensor, // [tokens, intermediate]
    up: GpuTensor,   // [tokens, intermediate]
    down_lin: GpuLinearCache,
    down: GpuTensor,      // [tokens, hidden] down_proj output
    rstd_down: GpuTensor, // [tokens]
}

impl GpuDecoderLayerCache {
    /// Device bytes this cache holds (each distinct tensor once; linear caches share their
    /// inputs with the tensors above except the normed inputs and the GeGLU product).
    pub fn bytes(&self) -> u64 {
        let t = |x: &GpuTensor| (x.numel() * 4) as u64;
        let xa = |c: &GpuLinearCache| c.xa.as_ref().map_or(0, t);
        let plain = [
            &self.x,
            &self.rstd_x,
            &self.q,
            &self.rstd_q,
            &self.k,
            &self.rstd_k,
            &self.q_rot,
            &self.k_rot,
            &self.v,
            &self.attn,
            &self.lse,
            &self.o,
            &self.rstd_o,
            &self.h,
            &self.rstd_h,
            &self.gate,
            &self.up,
            &self.down,
            &self.rstd_down,
        ]
        .iter()
        .map(|x| t(x))
        .sum::<u64>();
        // n1 (q/k/v input), n2 (gate/up input), the GeGLU product (down input); attn is counted.
        let inputs = t(&self.q_lin.x) + t(&self.gate_lin.x) + t(&self.down_lin.x);
        let lora = [
            &self.q_lin,
            &self.k_lin,
            &self.v_lin,
            &self.o_lin,
            &self.gate_lin,
            &self.up_lin,
            &self.down_lin,
        ]
        .iter()
        .map(|c| xa(c))
        .sum::<u64>();
        plain + inputs + lora
    }
}

impl GpuDecoderLayerCache {
    /// The rotated keys and the values `[tokens, kv_heads, head_dim]` the attention used: what
    /// a prompt forward leaves in the KV cache for generation.
    pub fn keys_values(&self) -> (&GpuTensor, &GpuTensor) {
        (&self.k_rot, &self.v)
    }
}

/// Per-micro-batch inputs every layer shares: positions, RoPE tables per (base, factor), and an
/// uploaded attention mask per sliding window (global layers: `None`).
pub struct GpuSequence {
    pub batch: usize,
    pub seq: usize,
    /// `[tokens]` u32: the position of each token in its row (right padding: `t % seq`).
    pub positions: GpuTensor,
    masks: Vec<(Option<usize>, AttentionMaskGpu, bool)>,
    ropes: Vec<((u64, u64), RopeTables)>,
}

impl GpuSequence {
    /// `image_groups [batch, seq]` (-1 for text, from `token_type_ids`), `key_padding [batch,
    /// seq]` (the attention_mask); masks and tables for every kind of layer in `layers`.
    pub fn new(
        gpu: &Gpu,
        dims: &TextDims,
        batch: usize,
        seq: usize,
        image_groups: &[i32],
        key_padding: &[u32],
        layers: &[GpuDecoderLayer],
    ) -> Result<Self> {
        let tokens = batch * seq;
        ensure!(
            image_groups.len() == tokens && key_padding.len() == tokens,
            "sequence context: image groups ({}) and attention mask ({}) must have batch x seq = {tokens} entries",
            image_groups.len(),
            key_padding.len()
        );
        let positions: Vec<u32> = (0..tokens).map(|t| (t % seq) as u32).collect();
        let adims = AttentionDims {
            batch,
            seq,
            q_heads: dims.heads,
            kv_heads: dims.kv_heads,
            head_dim: dims.head_dim,
        };
        let mut masks: Vec<(Option<usize>, AttentionMaskGpu, bool)> = Vec::new();
        let mut ropes: Vec<((u64, u64), RopeTables)> = Vec::new();
        for layer in layers {
            if !masks.iter().any(|(w, _, _)| *w == layer.sliding_window) {
                let mask = AttentionMask {
                    causal: true,
                    sliding_window: layer.sliding_window,
                    image_groups: Some(image_groups),
                    key_padding: Some(key_padding),
                };
                // A query that sees no key gets the eager fix-up (rare: long right padding).
                let fully_masked = (0..batch)
                    .any(|b| (0..seq).any(|q| (0..seq).all(|kv| !mask.allows(seq, b, q, kv))));
                masks.push((
                    layer.sliding_window,
                    gpu.attention_mask(&adims, &mask)?,
                    fully_masked,
                ));
            }
            let key = (
                layer.rope_theta.to_bits(),
                layer.rope_linear_factor.to_bits(),
            );
            if !ropes.iter().any(|(k, _)| *k == key) {
                let tables = gpu.rope_tables(
                    layer.rope_theta as f32,
                    layer.rope_linear_factor as f32,
                    dims.head_dim,
                    seq,
                )?;
                ropes.push((key, tables));
            }
        }
        Ok(Self {
            batch,
            seq,
            positions: gpu.upload_u32(&[tokens], &positions)?,
            masks,
            ropes,
        })
    }

    fn mask(&self, window: Option<usize>) -> Result<(&AttentionMaskGpu, bool)> {
        self.masks
            .iter()
            .find(|(w, _, _)| *w == window)
            .map(|(_, m, f)| (m, *f))
            .with_context(|| format!("no attention mask for sliding window {window:?}"))
    }

    fn rope(&self, theta: f64, factor: f64) -> Result<&RopeTables> {
        self.ropes
            .iter()
            .find(|(k, _)| *k == (theta.to_bits(), factor.to_bits()))
            .map(|(_, r)| r)
            .context("no RoPE tables for this layer")
    }
}

/// `dst += src` (same shape, f32): [`Gpu::accumulate`], four elements an invocation where it can.
pub(crate) fn add_into(
    gpu: &Gpu,
    rec: &mut Recorder,
    src: &GpuTensor,
    dst: &GpuTensor,
) -> Result<()> {
    gpu.accumulate(rec, dst, src)
}

fn rmsnorm(
    gpu: &Gpu,
    rec: &mut Recorder,
    x: &GpuTensor,
    w: &GpuTensor,
    eps: f32,
) -> Result<(GpuTensor, GpuTensor)> {
    let rows = x.numel() / w.numel();
    let y = gpu.empty(x.shape(), DType::F32)?;
    let rstd = gpu.empty(&[rows], DType::F32)?;
    gpu.rmsnorm_forward(rec, x, w, &y, &rstd, eps)?;
    Ok((y, rstd))
}

fn rmsnorm_dx(
    gpu: &Gpu,
    rec: &mut Recorder,
    x: &GpuTensor,
    w: &GpuTensor,
    rstd: &GpuTensor,
    dy: &GpuTensor,
) -> Result<GpuTensor> {
    let dx = gpu.empty(x.shape(), DType::F32)?;
    gpu.rmsnorm_backward(rec, x, w, dy, rstd, Some(&dx), None, false)?;
    Ok(dx)
}

impl GpuDecoderLayer {
    /// Uploads layer `l` of the text decoder (dense or NF4 linears as stored).
    pub fn from_weights(
        gpu: &Gpu,
        config: &ModelConfig,
        weights: &Weights,
        l: usize,
        dense: DenseStorage,
    ) -> Result<Self> {
        let t = config.text();
        let p = format!("{TEXT}layers.{l}.");
        let norm = |n: &str| -> Result<GpuTensor> {
            let v = weights.to_f32(&format!("{p}{n}.weight"))?;
            gpu.upload_f32(&[v.len()], &v)
        };
        let lin = |n: &str| GpuLinear::from_weights(gpu, weights, &format!("{p}{n}"), false, dense);
        let rope = t.rope(l);
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            pre_feedforward_layernorm: norm("pre_feedforward_layernorm")?,
            post_feedforward_layernorm: norm("post_feedforward_layernorm")?,
            q_norm: norm("self_attn.q_norm")?,
            k_norm: norm("self_attn.k_norm")?,
            q_proj: lin("self_attn.q_proj")?,
            k_proj: lin("self_attn.k_proj")?,
            v_proj: lin("self_attn.v_proj")?,
            o_proj: lin("self_attn.o_proj")?,
            gate_proj: lin("mlp.gate_proj")?,
            up_proj: lin("mlp.up_proj")?,
            down_proj: lin("mlp.down_proj")?,
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
        })
    }

    /// The seven linears (q, k, v, o, gate, up, down), for attaching LoRA pairs.
    pub fn linears(&self) -> [&GpuLinear; 7] {
        [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ]
    }

    pub fn linears_mut(&mut self) -> [&mut GpuLinear; 7] {
        [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.o_proj,
            &mut self.gate_proj,
            &mut self.up_proj,
            &mut self.down_proj,
        ]
    }

    /// `x [tokens, hidden]` -> `out [tokens, hidden]`.
    pub fn forward(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder,
        x: &GpuTensor,
        dims: &TextDims,
        ctx: &GpuSequence,
        run: &LoraRun,
    ) -> Result<(GpuTensor, GpuDecoderLayerCache)> {
        let eps = dims.rms_eps;
        let tokens = ctx.batch * ctx.seq;
        let (hd, heads, kvh) = (dims.head_dim, dims.heads, dims.kv_heads);
        ensure!(
            x.numel() == tokens * dims.hidden,
            "decoder layer: input {:?} is not [{tokens}, {}]",
            x.shape(),
            dims.hidden
        );
        let x = x.reshape(&[tokens, dims.hidden])?;
        let (n1, rstd_x) = rmsnorm(gpu, rec, &x, &self.input_layernorm, eps)?;
        let (q, q_lin) = self.q_proj.forward(gpu, rec, &n1, run)?;
        let (k, k_lin) = self.k_proj.forward(gpu, rec, &n1, run)?;
        let (v, v_lin) = self.v_proj.forward(gpu, rec, &n1, run)?;
        let q = q.reshape(&[tokens, heads, hd])?;
        let k = k.reshape(&[tokens, kvh, hd])?;
        let v = v.reshape(&[tokens, kvh, hd])?;
        let (q_rot, rstd_q) = rmsnorm(gpu, rec, &q, &self.q_norm, eps)?;
        let (k_rot, rstd_k) = rmsnorm(gpu, rec, &k, &self.k_norm, eps)?;
        let rope = ctx.rope(self.rope_theta, self.rope_linear_factor)?;
        gpu.rope(rec, &q_rot, &ctx.positions, rope, false)?;
        gpu.rope(rec, &k_rot, &ctx.positions, rope, false)?;
        let (mask, fully_masked) = ctx.mask(self.sliding_window)?;
        let attn = gpu.empty(&[tokens, heads, hd], DType::F32)?;
        let lse = gpu.empty(&[ctx.batch * heads * ctx.seq], DType::F32)?;
        gpu.attention_forward(rec, &q_rot, &k_rot, &v, mask, dims.attn_scale, &attn, &lse)?;
        if fully_masked {
            gpu.attention_eager_masked_rows(rec, &v, &lse, mask, &attn)?;
        }
        let (o, o_lin) =
            self.o_proj
                .forward(gpu, rec, &attn.reshape(&[tokens, heads * hd])?, run)?;
        let (h, rstd_o) = rmsnorm(gpu, rec, &o, &self.post_attention_layernorm, eps)?;
        add_into(gpu, rec, &x, &h)?;
        let (n2, rstd_h) = rmsnorm(gpu, rec, &h, &self.pre_feedforward_layernorm, eps)?;
        let (gate, gate_lin) = self.gate_proj.forward(gpu, rec, &n2, run)?;
        let (up, up_lin) = self.up_proj.forward(gpu, rec, &n2, run)?;
        let act = gpu.empty(gate.shape(), DType::F32)?;
        gpu.geglu_forward(rec, &gate, &up, &act)?;
        let (down, down_lin) = self.down_proj.forward(gpu, rec, &act, run)?;
        let (out, rstd_down) = rmsnorm(gpu, rec, &down, &self.post_feedforward_layernorm, eps)?;
        add_into(gpu, rec, &h, &out)?;
        Ok((
            out,
            GpuDecoderLayerCache {
                x,
                rstd_x,
                q_lin,
                k_lin,
                v_lin,
                q,
                rstd_q,
                k,
                rstd_k,
                q_rot,
                k_rot,
                v,
                attn,
                lse,
                o_lin,
                o,
                rstd_o,
                h,
                rstd_h,
                gate_lin,
                up_lin,
                gate,
                up,
                down_lin,
                down,
                rstd_down,
            },
        ))
    }

    /// `d_out [tokens, hidden]` -> `dx [tokens, hidden]`, accumulating this layer's LoRA grads.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder,
        cache: &GpuDecoderLayerCache,
        d_out: &GpuTensor,
        dims: &TextDims,
        ctx: &GpuSequence,
        run: &LoraRun,
    ) -> Result<GpuTensor> {
        let c = cache;
        let tokens = c.x.rows();
        let d_out = d_out.reshape(&[tokens, dims.hidden])?;
        let need = |t: Option<GpuTensor>| t.context("linear backward returned no dx");
        // MLP branch: out = h + post_ff_norm(down(gelu(gate)·up))
        let d_down = rmsnorm_dx(
            gpu,
            rec,
            &c.down,
            &self.post_feedforward_layernorm,
            &c.rstd_down,
            &d_out,
        )?;
        let d_act = need(
            self.down_proj
                .backward(gpu, rec, &c.down_lin, &d_down, run, true)?,
        )?;
        let d_gate = gpu.empty(c.gate.shape(), DType::F32)?;
        let d_up = gpu.empty(c.up.shape(), DType::F32)?;
        gpu.geglu_backward(rec, &c.gate, &c.up, &d_act, &d_gate, &d_up, false)?;
        let d_n2 = need(
            self.gate_proj
                .backward(gpu, rec, &c.gate_lin, &d_gate, run, true)?,
        )?;
        let d_n2_up = need(
            self.up_proj
                .backward(gpu, rec, &c.up_lin, &d_up, run, true)?,
        )?;
        add_into(gpu, rec, &d_n2_up, &d_n2)?;
        let d_h = rmsnorm_dx(
            gpu,
            rec,
            &c.h,
            &self.pre_feedforward_layernorm,
            &c.rstd_h,
            &d_n2,
        )?;
        add_into(gpu, rec, &d_out, &d_h)?;
        // Attention branch: h = x + post_attn_norm(o_proj(attn))
        let d_o = rmsnorm_dx(
            gpu,
            rec,
            &c.o,
            &self.post_attention_layernorm,
            &c.rstd_o,
            &d_h,
        )?;
        let d_attn = need(self.o_proj.backward(gpu, rec, &c.o_lin, &d_o, run, true)?)?;
        let (mask, _) = ctx.mask(self.sliding_window)?;
        let d_qrot = gpu.empty(c.q_rot.shape(), DType::F32)?;
        let d_krot = gpu.empty(c.k_rot.shape(), DType::F32)?;
        let d_v = gpu.empty(c.v.shape(), DType::F32)?;
        gpu.attention_backward(
            rec,
            &AttentionGrads {
                q: &c.q_rot,
                k: &c.k_rot,
                v: &c.v,
                out: &c.attn,
                lse: &c.lse,
                d_out: &d_attn,
            },
            mask,
            dims.attn_scale,
            &d_qrot,
            &d_krot,
            &d_v,
        )?;
        let rope = ctx.rope(self.rope_theta, self.rope_linear_factor)?;
        gpu.rope(rec, &d_qrot, &ctx.positions, rope, true)?;
        gpu.rope(rec, &d_krot, &ctx.positions, rope, true)?;
        let d_q = rmsnorm_dx(gpu, rec, &c.q, &self.q_norm, &c.rstd_q, &d_qrot)?;
        let d_k = rmsnorm_dx(gpu, rec, &c.k, &self.k_norm, &c.rstd_k, &d_krot)?;
        let d_n1 = need(self.q_proj.backward(gpu, rec, &c.q_lin, &d_q, run, true)?)?;
        let d_n1_k = need(self.k_proj.backward(gpu, rec, &c.k_lin, &d_k, run, true)?)?;
        let d_n1_v = need(self.v_proj.backward(gpu, rec, &c.v_lin, &d_v, run, true)?)?;
        add_into(gpu, rec, &d_n1_k, &d_n1)?;
        add_into(gpu, rec, &d_n1_v, &d_n1)?;
        let d_x = rmsnorm_dx(gpu, rec, &c.x, &self.input_layernorm, &c.rstd_x, &d_n1)?;
        add_into(gpu, rec, &d_h, &d_x)?;
        Ok(d_x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::linear::{BaseWeight, GpuLoraPair};
    use crate::reference::gemma3::{DecoderLayer, SequenceContext};
    use crate::reference::lora::{Adapter, AdapterGrads, Linear, LoraCall, LoraPair, LoraSettings};
    use engine::gpu::testing::{rel_frobenius, test_gpu, TestRng};
    use engine::reference::attention::image_group_ids;
    use std::collections::BTreeMap;

    pub(crate) fn random_layer(
        gpu: &Gpu,
        rng: &mut TestRng,
        dims: &TextDims,
        prefix: &str,
        sliding_window: Option<usize>,
        rope: (f64, f64),
    ) -> (DecoderLayer, GpuDecoderLayer) {
        let (h, i) = (dims.hidden, dims.intermediate);
        let (qd, kd) = (dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim);
        let mut lin = |name: &str, out: usize, inp: usize| {
            let w: Vec<f32> = rng
                .vec_normal(out * inp)
                .iter()
                .map(|v| v * 1.2 / (inp as f32).sqrt())
                .collect();
            let module = format!("{prefix}{name}");
            let gpu_lin = GpuLinear {
                module: module.clone(),
                weight: BaseWeight::Dense(gpu.upload_f32(&[out, inp], &w).unwrap()),
                bias: None,
                in_features: inp,
                out_features: out,
                lora: None,
            };
            (
                Linear {
                    module,
                    weight: w,
                    bias: None,
                    in_features: inp,
                    out_features: out,
                },
                gpu_lin,
            )
        };
        let (q, gq) = lin("self_attn.q_proj", qd, h);
        let (k, gk) = lin("self_attn.k_proj", kd, h);
        let (v, gv) = lin("self_attn.v_proj", kd, h);
        let (o, go) = lin("self_attn.o_proj", h, qd);
        let (gate, ggate) = lin("mlp.gate_proj", i, h);
        let (up, gup) = lin("mlp.up_proj", i, h);
        let (down, gdown) = lin("mlp.down_proj", h, i);
        let mut norm = |n: usize| {
            let w: Vec<f32> = rng.vec_normal(n).iter().map(|v| v * 0.3).collect();
            (gpu.upload_f32(&[n], &w).unwrap(), w)
        };
        let norms: Vec<(GpuTensor, Vec<f32>)> = vec![
            norm(h),
            norm(h),
            norm(h),
            norm(h),
            norm(dims.head_dim),
            norm(dims.head_dim),
        ];
        let reference = DecoderLayer {
            input_layernorm: norms[0].1.clone(),
            post_attention_layernorm: norms[1].1.clone(),
            pre_feedforward_layernorm: norms[2].1.clone(),
            post_feedforward_layernorm: norms[3].1.clone(),
            q_norm: norms[4].1.clone(),
            k_norm: norms[5].1.clone(),
            q_proj: q,
            k_proj: k,
            v_proj: v,
            o_proj: o,
            gate_proj: gate,
            up_proj: up,
            down_proj: down,
            sliding_window,
            rope_theta: rope.0,
            rope_linear_factor: rope.1,
        };
        let layer = GpuDecoderLayer {
            input_layernorm: norms[0].0.clone(),
            post_attention_layernorm: norms[1].0.clone(),
            pre_feedforward_layernorm: norms[2].0.clone(),
            post_feedforward_layernorm: norms[3].0.clone(),
            q_norm: norms[4].0.clone(),
            k_norm: norms[5].0.clone(),
            q_proj: gq,
            k_proj: gk,
            v_proj: gv,
            o_proj: go,
            gate_proj: ggate,
            up_proj: gup,
            down_proj: gdown,
            sliding_window,
            rope_theta: rope.0,
            rope_linear_factor: rope.1,
        };
        (reference, layer)
    }

    /// LoRA pairs (rank 3, non-zero B) on all seven linears of `layer`, in the adapter too.
    pub(crate) fn attach_lora(
        gpu: &Gpu,
        rng: &mut TestRng,
        layer: &mut GpuDecoderLayer,
        pairs: &mut BTreeMap<String, LoraPair>,
    ) {
        let r = 3;
        for lin in layer.linears_mut() {
            let pair = LoraPair {
                a: rng
                    .vec_normal(r * lin.in_features)
                    .iter()
                    .map(|v| v * 0.3)
                    .collect(),
                b: rng
                    .vec_normal(lin.out_features * r)
                    .iter()
                    .map(|v| v * 0.3)
                    .collect(),
                rank: r,
            };
            lin.lora =
                Some(GpuLoraPair::upload(gpu, &pair, lin.in_features, lin.out_features).unwrap());
            pairs.insert(lin.module.clone(), pair);
        }
    }

    fn run_case(sliding: Option<usize>, rope: (f64, f64), images: bool, dropout: f32) {
        let gpu = test_gpu();
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        let dims = TextDims {
            hidden: 20,
            intermediate: 28,
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
            vocab: 0,
            rms_eps: 1e-6,
            attn_scale: 0.3,
        };
        let (batch, seq) = (2, 13);
        let tokens = batch * seq;
        let prefix = "model.language_model.layers.0.";
        let (reference, mut layer) = random_layer(gpu, &mut rng, &dims, prefix, sliding, rope);
        let mut pairs = BTreeMap::new();
        attach_lora(gpu, &mut rng, &mut layer, &mut pairs);
        let settings = LoraSettings {
            dropout_seed: 5,
            ..LoraSettings::new(3, 6.0, false, dropout)
        };
        let adapter = Adapter {
            settings,
            pairs,
            lm_head: None,
            embed_tokens: None,
        };
        // Right padding of sample 1 long enough that sliding layers have fully masked rows.
        let mut key_padding = vec![1u32; tokens];
        for t in 6..seq {
            key_padding[seq + t] = 0;
        }
        let mut token_types = vec![0u32; tokens];
        if images {
            for t in (2..5).chain(7..10).chain(seq + 1..seq + 4) {
                token_types[t] = 1;
            }
        }
        let groups = image_group_ids(&token_types, batch, seq).unwrap();
        let ctx_ref = SequenceContext {
            batch,
            seq,
            image_groups: &groups,
            key_padding: &key_padding,
        };
        let x: Vec<f32> = rng.vec_normal(tokens * dims.hidden);
        let d_out: Vec<f32> = rng.vec_normal(tokens * dims.hidden);
        let call = LoraCall {
            adapter: Some(&adapter),
            training: true,
            call: 4,
        };
        let (want_out, cache_ref) = reference.forward(&x, &dims, &ctx_ref, &call).unwrap();
        let mut grads = AdapterGrads::zeros_like(&adapter);
        let want_dx = reference
            .backward(&cache_ref, &d_out, &dims, &ctx_ref, &call, Some(&mut grads))
            .unwrap();

        let ctx = GpuSequence::new(
            gpu,
            &dims,
            batch,
            seq,
            &groups,
            &key_padding,
            std::slice::from_ref(&layer),
        )
        .unwrap();
        let run = LoraRun {
            settings,
            training: true,
            call: 4,
            precision: engine::gpu::MatmulPrecision::F32,
        };
        let xg = gpu.upload_f32(&[tokens, dims.hidden], &x).unwrap();
        let dg = gpu.upload_f32(&[tokens, dims.hidden], &d_out).unwrap();
        let mut rec = Recorder::new(gpu);
        let (out, cache) = layer
            .forward(gpu, &mut rec, &xg, &dims, &ctx, &run)
            .unwrap();
        let dx = layer
            .backward(gpu, &mut rec, &cache, &dg, &dims, &ctx, &run)
            .unwrap();
        rec.submit_and_wait().unwrap();
        let what = format!("window {sliding:?} images {images} dropout {dropout} (seed {seed})");
        let e = rel_frobenius(&gpu.read_f32(&out).unwrap(), &want_out);
        assert!(e <= 1e-4, "out: {e} {what}");
        let e = rel_frobenius(&gpu.read_f32(&dx).unwrap(), &want_dx);
        assert!(e <= 1e-3, "dx: {e} {what}");
        for lin in layer.linears() {
            let (ga, gb) = &grads.pairs[&lin.module];
            let pair = lin.lora.as_ref().unwrap();
            for (name, got, want) in [("A", &pair.grad_a, ga), ("B", &pair.grad_b, gb)] {
                let e = rel_frobenius(&gpu.read_f32(got).unwrap(), want);
                assert!(e <= 1e-3, "{} d{name}: {e} {what}", lin.module);
            }
        }
    }

    #[test]
    fn sliding_layer_with_padding_matches_reference() {
        run_case(Some(4), (1e4, 1.0), false, 0.0);
    }

    #[test]
    fn global_layer_with_images_and_dropout_matches_reference() {
        run_case(None, (1e6, 8.0), true, 0.2);
    }

    #[test]
    fn sliding_layer_with_images_matches_reference() {
        run_case(Some(3), (1e4, 1.0), true, 0.0);
    }
}
