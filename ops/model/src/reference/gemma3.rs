//! The Gemma 3 text decoder (transformers `Gemma3DecoderLayer`, eager attention), forward and
//! backward: scaled embedding, decoder layers, final norm.
//!
//! Per layer, on the residual stream `x [tokens = batch·seq, hidden]`:
//! `h = x + post_attention_layernorm(o_proj(attn(rope(q_norm(q)), rope(k_norm(k)), v)))` with q, k, v
//! projections of `input_layernorm(x)`, then
//! `out = h + post_feedforward_layernorm(down(gelu_tanh(gate(n)) · up(n)))`, `n = pre_feedforward_layernorm(h)`.

use anyhow::Result;

use super::kernels::{
    gelu_tanh, gelu_tanh_grad, gemma_rmsnorm_backward, gemma_rmsnorm_forward, rope_apply,
    rope_tables,
};
use super::lora::{AdapterGrads, Linear, LinearCache, LoraCall};
use engine::reference::attention::{
    attention_backward, attention_forward, eager_fully_masked_rows, AttentionDims, AttentionMask,
};

/// Sizes and constants of the text decoder.
#[derive(Debug, Clone, Copy)]
pub struct TextDims {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub rms_eps: f32,
    /// `query_pre_attn_scalar ** -0.5`.
    pub attn_scale: f32,
}

/// One decoder layer's frozen weights (Gemma RMSNorm weights are used as `1 + w`).
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    /// `[hidden]` each.
    pub input_layernorm: Vec<f32>,
    pub post_attention_layernorm: Vec<f32>,
    pub pre_feedforward_layernorm: Vec<f32>,
    pub post_feedforward_layernorm: Vec<f32>,
    /// `[head_dim]` each, applied per head before RoPE.
    pub q_norm: Vec<f32>,
    pub k_norm: Vec<f32>,
    /// `[heads·head_dim, hidden]`, `[kv_heads·head_dim, hidden]` ×2, `[hidden, heads·head_dim]`.
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    /// `[intermediate, hidden]` ×2, `[hidden, intermediate]`.
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    /// `Some(window)` on sliding-attention layers.
    pub sliding_window: Option<usize>,
    /// RoPE base of this layer type and its linear scaling factor (positions / factor).
    pub rope_theta: f64,
    pub rope_linear_factor: f64,
}

/// Per-batch inputs every layer shares.
#[derive(Debug, Clone, Copy)]
pub struct SequenceContext<'a> {
    pub batch: usize,
    pub seq: usize,
    /// `[batch, seq]` image run of each token (-1 for text), from `token_type_ids`.
    pub image_groups: &'a [i32],
    /// `[batch, seq]` attention_mask (0 = padding).
    pub key_padding: &'a [u32],
}

/// Activations one layer keeps for its backward.
#[derive(Debug, Clone)]
pub struct DecoderLayerCache {
    x: Vec<f32>,        // [tokens, hidden] layer input
    q_lin: LinearCache, // q/k/v share the input n1 but each keeps its own LoRA intermediate
    k_lin: LinearCache,
    v_lin: LinearCache,
    q: Vec<f32>,     // [tokens, heads, head_dim] before q_norm
    k: Vec<f32>,     // [tokens, kv_heads, head_dim] before k_norm
    q_rot: Vec<f32>, // [tokens, heads, head_dim] attention input
    k_rot: Vec<f32>, // [tokens, kv_heads, head_dim]
    v: Vec<f32>,     // [tokens, kv_heads, head_dim]
    attn: Vec<f32>,  // [tokens, heads, head_dim] attention output
    lse: Vec<f32>,   // [batch, heads, seq]
    o_lin: LinearCache,
    o: Vec<f32>, // [tokens, hidden] o_proj output
    h: Vec<f32>, // [tokens, hidden] after the attention residual
    gate_lin: LinearCache,
    up_lin: LinearCache,
    gate: Vec<f32>, // [tokens, intermediate]
    up: Vec<f32>,   // [tokens, intermediate]
    down_lin: LinearCache,
    down: Vec<f32>, // [tokens, hidden] down_proj output
}

impl DecoderLayer {
    fn attention_setup<'a>(
        &self,
        dims: &TextDims,
        ctx: &SequenceContext<'a>,
    ) -> (AttentionDims, AttentionMask<'a>) {
        (
            AttentionDims {
                batch: ctx.batch,
                seq: ctx.seq,
                q_heads: dims.heads,
                kv_heads: dims.kv_heads,
                head_dim: dims.head_dim,
            },
            AttentionMask {
                causal: true,
                sliding_window: self.sliding_window,
                image_groups: Some(ctx.image_groups),
                key_padding: Some(ctx.key_padding),
            },
        )
    }

    fn rope(&self, dims: &TextDims, seq: usize) -> (Vec<f32>, Vec<f32>) {
        rope_tables(self.rope_theta, self.rope_linear_factor, dims.head_dim, seq)
    }

    /// `x [tokens, hidden]` -> `out [tokens, hidden]`.
    pub fn forward(
        &self,
        x: &[f32],
        dims: &TextDims,
        ctx: &SequenceContext,
        lora: &LoraCall,
    ) -> Result<(Vec<f32>, DecoderLayerCache)> {
        let eps = dims.rms_eps;
        let (n1, _) = gemma_rmsnorm_forward(x, &self.input_layernorm, eps);
        let (q, q_lin) = self.q_proj.forward(&n1, lora);
        let (k, k_lin) = self.k_proj.forward(&n1, lora);
        let (v, v_lin) = self.v_proj.forward(&n1, lora);
        let (mut q_rot, _) = gemma_rmsnorm_forward(&q, &self.q_norm, eps);
        let (mut k_rot, _) = gemma_rmsnorm_forward(&k, &self.k_norm, eps);
        let (cos, sin) = self.rope(dims, ctx.seq);
        rope_apply(
            &mut q_rot,
            &cos,
            &sin,
            ctx.seq,
            dims.heads,
            dims.head_dim,
            false,
        );
        rope_apply(
            &mut k_rot,
            &cos,
            &sin,
            ctx.seq,
            dims.kv_heads,
            dims.head_dim,
            false,
        );
        let (adims, mask) = self.attention_setup(dims, ctx);
        let (mut attn, lse) =
            attention_forward(&q_rot, &k_rot, &v, &adims, &mask, dims.attn_scale)?;
        eager_fully_masked_rows(&mut attn, &v, &lse, &adims);
        let (o, o_lin) = self.o_proj.forward(&attn, lora);
        let (p, _) = gemma_rmsnorm_forward(&o, &self.post_attention_layernorm, eps);
        let h: Vec<f32> = x.iter().zip(&p).map(|(a, b)| a + b).collect();
        let (n2, _) = gemma_rmsnorm_forward(&h, &self.pre_feedforward_layernorm, eps);
        let (gate, gate_lin) = self.gate_proj.forward(&n2, lora);
        let (up, up_lin) = self.up_proj.forward(&n2, lora);
        let act: Vec<f32> = gate
            .iter()
            .zip(&up)
            .map(|(&g, &u)| gelu_tanh(g) * u)
            .collect();
        let (down, down_lin) = self.down_proj.forward(&act, lora);
        let (f, _) = gemma_rmsnorm_forward(&down, &self.post_feedforward_layernorm, eps);
        let out = h.iter().zip(&f).map(|(a, b)| a + b).collect();
        Ok((
            out,
            DecoderLayerCache {
                x: x.to_vec(),
                q_lin,
                k_lin,
                v_lin,
                q,
                k,
                q_rot,
                k_rot,
                v,
                attn,
                lse,
                o_lin,
                o,
                h,
                gate_lin,
                up_lin,
                gate,
                up,
                down_lin,
                down,
            },
        ))
    }

    /// `d_out [tokens, hidden]` -> `dx [tokens, hidden]`, accumulating this layer's LoRA grads.
    pub fn backward(
        &self,
        cache: &DecoderLayerCache,
        d_out: &[f32],
        dims: &TextDims,
        ctx: &SequenceContext,
        lora: &LoraCall,
        mut grads: Option<&mut AdapterGrads>,
    ) -> Result<Vec<f32>> {
        let c = cache;
        // MLP branch: out = h + post_ff_norm(down(gelu(gate)·up))
        let d_down = gemma_rmsnorm_backward(
            &c.down,
            &self.post_feedforward_layernorm,
            dims.rms_eps,
            d_out,
        );
        let d_act = self
            .down_proj
            .backward(&c.down_lin, &d_down, lora, grads.as_deref_mut());
        let mut d_gate = vec![0.0f32; d_act.len()];
        let mut d_up = vec![0.0f32; d_act.len()];
        for i in 0..d_act.len() {
            d_gate[i] = d_act[i] * c.up[i] * gelu_tanh_grad(c.gate[i]);
            d_up[i] = d_act[i] * gelu_tanh(c.gate[i]);
        }
        let mut d_n2 = self
            .gate_proj
            .backward(&c.gate_lin, &d_gate, lora, grads.as_deref_mut());
        let d_n2_up = self
            .up_proj
            .backward(&c.up_lin, &d_up, lora, grads.as_deref_mut());
        d_n2.iter_mut().zip(&d_n2_up).for_each(|(a, b)| *a += b);
        let d_h_ff =
            gemma_rmsnorm_backward(&c.h, &self.pre_feedforward_layernorm, dims.rms_eps, &d_n2);
        let d_h: Vec<f32> = d_out.iter().zip(&d_h_ff).map(|(a, b)| a + b).collect();
        // Attention branch: h = x + post_attn_norm(o_proj(attn))
        let d_o = gemma_rmsnorm_backward(&c.o, &self.post_attention_layernorm, dims.rms_eps, &d_h);
        let d_attn = self
            .o_proj
            .backward(&c.o_lin, &d_o, lora, grads.as_deref_mut());
        let (adims, mask) = self.attention_setup(dims, ctx);
        let (mut d_qrot, mut d_krot, d_v) = attention_backward(
            &c.q_rot,
            &c.k_rot,
            &c.v,
            &c.attn,
            &c.lse,
            &d_attn,
            &adims,
            &mask,
            dims.attn_scale,
        )?;
        let (cos, sin) = self.rope(dims, ctx.seq);
        rope_apply(
            &mut d_qrot,
            &cos,
            &sin,
            ctx.seq,
            dims.heads,
            dims.head_dim,
            true,
        );
        rope_apply(
            &mut d_krot,
            &cos,
            &sin,
            ctx.seq,
            dims.kv_heads,
            dims.head_dim,
            true,
        );
        let d_q = gemma_rmsnorm_backward(&c.q, &self.q_norm, dims.rms_eps, &d_qrot);
        let d_k = gemma_rmsnorm_backward(&c.k, &self.k_norm, dims.rms_eps, &d_krot);
        let mut d_n1 = self
            .q_proj
            .backward(&c.q_lin, &d_q, lora, grads.as_deref_mut());
        let d_n1_k = self
            .k_proj
            .backward(&c.k_lin, &d_k, lora, grads.as_deref_mut());
        let d_n1_v = self.v_proj.backward(&c.v_lin, &d_v, lora, grads);
        for ((a, b), c2) in d_n1.iter_mut().zip(&d_n1_k).zip(&d_n1_v) {
            *a += b + c2;
        }
        let d_x_attn = gemma_rmsnorm_backward(&c.x, &self.input_layernorm, dims.rms_eps, &d_n1);
        Ok(d_h.iter().zip(&d_x_attn).map(|(a, b)| a + b).collect())
    }
}

/// `Gemma3TextScaledWordEmbedding`: `table[id] · scale`, `ids [tokens]` -> `[tokens, hidden]`.
pub fn embed_forward(table: &[f32], hidden: usize, ids: &[u32], scale: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(ids.len() * hidden);
    for &id in ids {
        out.extend(
            table[id as usize * hidden..][..hidden]
                .iter()
                .map(|v| v * scale),
        );
    }
    out
}

/// Embedding gradient: `d_table[id] += scale · d_out[t]` for every token whose row is not
/// `skip` (`padding_idx`: its row never receives a gradient) and whose `d_out` row is live.
pub fn embed_backward(
    d_table: &mut [f32],
    hidden: usize,
    ids: &[u32],
    d_out: &[f32],
    scale: f32,
    padding_idx: Option<u32>,
) {
    for (t, &id) in ids.iter().enumerate() {
        if Some(id) == padding_idx {
            continue;
        }
        let row = &mut d_table[id as usize * hidden..][..hidden];
        for (d, g) in row.iter_mut().zip(&d_out[t * hidden..][..hidden]) {
            *d += scale * g;
        }
    }
}
