//! The activations of one layer: linear layers with LoRA, a text decoder layer and a SigLIP
//! encoder layer, forward (what is kept, what is working set) and backward.

use super::*;

/// The forward allocations of a `GpuLinear` with a LoRA pair of rank `r` (none when 0): the
/// output, `x·Aᵀ` (kept), with dropout the dropped-out input (a temporary), and the bias
/// placeholders of its matmuls (the base one when it has no bias, two for the pair).
#[allow(clippy::too_many_arguments)]
pub(super) fn linear_forward(
    kept: &mut Vec<Alloc>,
    temps: &mut Vec<Alloc>,
    name: &str,
    rows: u64,
    (d_in, d_out): (u64, u64),
    r: u64,
    dropout: bool,
    bias: bool,
) {
    alloc(kept, name, rows, d_out);
    matmul_placeholders(temps, u64::from(!bias) + if r > 0 { 2 } else { 0 });
    if r > 0 {
        alloc(kept, &format!("{name} LoRA x·Aᵀ"), rows, r);
        if dropout {
            alloc(temps, &format!("{name} LoRA dropout(x)"), rows, d_in);
        }
    }
}

/// The backward allocations of a `GpuLinear`: `dx` when asked, and for the LoRA pair `dh`
/// and with dropout the re-drawn dropout(x) and the dropped-out `dx` part.
pub(super) fn linear_backward(
    list: &mut Vec<Alloc>,
    name: &str,
    rows: u64,
    d_in: u64,
    r: u64,
    dropout: bool,
    need_dx: bool,
) {
    if need_dx {
        alloc(list, &format!("d {name} input"), rows, d_in);
    }
    // dx through the base weight; dB, dh, dA and (when asked) dx for the pair.
    matmul_placeholders(
        list,
        u64::from(need_dx) + if r > 0 { 3 + u64::from(need_dx) } else { 0 },
    );
    if r > 0 {
        alloc(list, &format!("{name} LoRA dh"), rows, r);
        if dropout {
            alloc(list, &format!("{name} LoRA dropout(x)"), rows, d_in);
            if need_dx {
                alloc(list, &format!("{name} LoRA dropout(dx)"), rows, d_in);
            }
        }
    }
}

/// What `GpuDecoderLayer::forward` allocates: `(kept for the backward, temporaries)`.
pub(super) fn text_layer_forward(t: &TextShape) -> (Vec<Alloc>, Vec<Alloc>) {
    let (mut kept, mut temps) = (Vec::new(), Vec::new());
    let (n, h, q, kv, i, r, p) = (t.tokens, t.hidden, t.q, t.kv, t.inter, t.r, t.dropout);
    alloc(&mut kept, "text input_layernorm out", n, h);
    alloc(&mut kept, "text rstd", n, 1);
    linear_forward(&mut kept, &mut temps, "text q_proj", n, (h, q), r, p, false);
    linear_forward(
        &mut kept,
        &mut temps,
        "text k_proj",
        n,
        (h, kv),
        r,
        p,
        false,
    );
    linear_forward(
        &mut kept,
        &mut temps,
        "text v_proj",
        n,
        (h, kv),
        r,
        p,
        false,
    );
    alloc(&mut kept, "text q after q_norm + RoPE", n, q);
    alloc(&mut kept, "text q_norm rstd", n * t.heads, 1);
    alloc(&mut kept, "text k after k_norm + RoPE", n, kv);
    alloc(&mut kept, "text k_norm rstd", n * t.kv_heads, 1);
    alloc(&mut kept, "text attention output", n, q);
    alloc(&mut kept, "text attention log-sum-exp", n * t.heads, 1);
    linear_forward(&mut kept, &mut temps, "text o_proj", n, (q, h), r, p, false);
    alloc(&mut kept, "text attention residual h", n, h);
    alloc(&mut kept, "text rstd", n, 1);
    alloc(&mut kept, "text pre_feedforward_layernorm out", n, h);
    alloc(&mut kept, "text rstd", n, 1);
    linear_forward(
        &mut kept,
        &mut temps,
        "text MLP gate_proj",
        n,
        (h, i),
        r,
        p,
        false,
    );
    linear_forward(
        &mut kept,
        &mut temps,
        "text MLP up_proj",
        n,
        (h, i),
        r,
        p,
        false,
    );
    alloc(&mut kept, "text MLP gelu(gate)·up", n, i);
    linear_forward(
        &mut kept,
        &mut temps,
        "text MLP down_proj",
        n,
        (i, h),
        r,
        p,
        false,
    );
    alloc(&mut kept, "text rstd", n, 1);
    // The layer output is the next layer's input (kept by that layer, or the final norm's).
    alloc(&mut temps, "text layer output", n, h);
    (kept, temps)
}

/// What `GpuDecoderLayer::backward` allocates.
pub(super) fn text_layer_backward(t: &TextShape) -> Vec<Alloc> {
    let mut l = Vec::new();
    let (n, h, q, kv, i, r, p) = (t.tokens, t.hidden, t.q, t.kv, t.inter, t.r, t.dropout);
    alloc(&mut l, "text d down_proj out", n, h);
    linear_backward(&mut l, "text MLP down_proj", n, i, r, p, true);
    alloc(&mut l, "text MLP d gate", n, i);
    alloc(&mut l, "text MLP d up", n, i);
    linear_backward(&mut l, "text MLP gate_proj", n, h, r, p, true);
    linear_backward(&mut l, "text MLP up_proj", n, h, r, p, true);
    alloc(&mut l, "text d h", n, h);
    alloc(&mut l, "text d o_proj out", n, h);
    linear_backward(&mut l, "text o_proj", n, q, r, p, true);
    alloc(&mut l, "text d q (attention)", n, q);
    alloc(&mut l, "text d k (attention)", n, kv);
    alloc(&mut l, "text d v (attention)", n, kv);
    alloc(&mut l, "text attention backward row stats", n * t.heads, 2);
    alloc(&mut l, "text d q before q_norm", n, q);
    alloc(&mut l, "text d k before k_norm", n, kv);
    for name in ["text q_proj", "text k_proj", "text v_proj"] {
        linear_backward(&mut l, name, n, h, r, p, true);
    }
    alloc(&mut l, "text d layer input", n, h);
    l
}

/// Shapes of one text layer's work.
pub(super) struct TextShape {
    pub(super) tokens: u64,
    pub(super) hidden: u64,
    /// heads · head_dim, kv_heads · head_dim.
    pub(super) q: u64,
    pub(super) kv: u64,
    pub(super) inter: u64,
    pub(super) heads: u64,
    pub(super) kv_heads: u64,
    pub(super) r: u64,
    pub(super) dropout: bool,
}

/// Shapes of the SigLIP tower's work. The tower runs one image at a time
/// (`GpuVisionTower`): its layers' buffers are one image's, `[patches, ..]`.
pub(super) struct VisionShape {
    /// Images of the micro-batch.
    pub(super) images: u64,
    pub(super) patches: u64,
    pub(super) patch_dim: u64,
    pub(super) hidden: u64,
    pub(super) inter: u64,
    pub(super) heads: u64,
    pub(super) layers: u64,
    /// The projector's output rows per image and the text hidden size.
    pub(super) tokens_per_image: u64,
    pub(super) text_hidden: u64,
    pub(super) r: u64,
    pub(super) dropout: bool,
    /// lora-train's `bf16`: layer inputs rounded through a bf16 copy, kept when checkpointed.
    pub(super) bf16: bool,
}

/// What one SigLIP encoder layer's forward allocates for one image
/// (`GpuVisionTower::layer_forward`): `(kept for its backward, temporaries, its output)`. Its
/// input is the previous layer's output.
pub(super) fn vision_layer_forward(v: &VisionShape) -> (Vec<Alloc>, Vec<Alloc>, Alloc) {
    let (mut kept, mut temps) = (Vec::new(), Vec::new());
    let (n, h, i, r, p) = (v.patches, v.hidden, v.inter, v.r, v.dropout);
    alloc(&mut kept, "vision layer_norm1 out", n, h);
    alloc(&mut kept, "vision layer_norm1 stats", n, 2);
    for name in ["vision q_proj", "vision k_proj", "vision v_proj"] {
        linear_forward(&mut kept, &mut temps, name, n, (h, h), r, p, true);
    }
    alloc(&mut kept, "vision attention output", n, h);
    alloc(&mut kept, "vision attention log-sum-exp", n * v.heads, 1);
    linear_forward(
        &mut kept,
        &mut temps,
        "vision out_proj",
        n,
        (h, h),
        r,
        p,
        true,
    );
    alloc(&mut kept, "vision layer_norm2 out", n, h);
    alloc(&mut kept, "vision layer_norm2 stats", n, 2);
    linear_forward(
        &mut kept,
        &mut temps,
        "vision MLP fc1",
        n,
        (h, i),
        r,
        p,
        true,
    );
    alloc(&mut kept, "vision MLP gelu", n, i);
    let mut fc2 = Vec::new();
    linear_forward(
        &mut fc2,
        &mut temps,
        "vision MLP fc2",
        n,
        (i, h),
        r,
        p,
        true,
    );
    let out = fc2.remove(0);
    kept.extend(fc2);
    (kept, temps, out)
}

/// What one SigLIP encoder layer's backward allocates for one image
/// (`GpuVisionTower::layer_backward`); the last entry is the gradient of its input when `need_dx`.
pub(super) fn vision_layer_backward(v: &VisionShape, need_dx: bool) -> Vec<Alloc> {
    let mut l = Vec::new();
    let (n, h, i, r, p) = (v.patches, v.hidden, v.inter, v.r, v.dropout);
    linear_backward(&mut l, "vision MLP fc2", n, i, r, p, true);
    alloc(&mut l, "vision MLP d fc1 out", n, i);
    linear_backward(&mut l, "vision MLP fc1", n, h, r, p, true);
    alloc(&mut l, "vision d h", n, h);
    linear_backward(&mut l, "vision out_proj", n, h, r, p, true);
    for name in ["vision d q", "vision d k", "vision d v"] {
        alloc(&mut l, name, n, h);
    }
    alloc(
        &mut l,
        "vision attention backward row stats",
        n * v.heads,
        2,
    );
    for name in ["vision q_proj", "vision k_proj", "vision v_proj"] {
        linear_backward(&mut l, name, n, h, r, p, need_dx);
    }
    if need_dx {
        alloc(&mut l, "vision d layer input", n, h);
    }
    l
}
