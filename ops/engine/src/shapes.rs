//! The sizes and settings a kernel and its plain-Rust reference share: the vocabulary of the
//! engine's API. (They lived in `reference/` while only the references defined them; the
//! references re-export them, so `reference::attention::AttentionDims` still names them.)

use anyhow::{ensure, Result};

// Attention (kernels::attention, reference::attention).

/// Sizes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionDims {
    pub batch: usize,
    pub seq: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl AttentionDims {
    pub fn q_len(&self) -> usize {
        self.batch * self.seq * self.q_heads * self.head_dim
    }
    pub fn kv_len(&self) -> usize {
        self.batch * self.seq * self.kv_heads * self.head_dim
    }
    pub fn lse_len(&self) -> usize {
        self.batch * self.q_heads * self.seq
    }
    /// q heads per kv head.
    pub fn group(&self) -> usize {
        self.q_heads / self.kv_heads
    }
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.batch > 0
                && self.seq > 0
                && self.q_heads > 0
                && self.kv_heads > 0
                && self.head_dim > 0,
            "attention dims must all be positive, got {self:?}"
        );
        ensure!(
            self.q_heads.is_multiple_of(self.kv_heads),
            "q_heads ({}) must be a multiple of kv_heads ({})",
            self.q_heads,
            self.kv_heads
        );
        Ok(())
    }
}

/// Which (query, key) pairs may attend. See the module docs for the rule.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttentionMask<'a> {
    /// Keys after the query are hidden (the text decoder). False: full attention (SigLIP).
    pub causal: bool,
    /// Sliding layers: only keys with `kv > q - window` (and `kv <= q`); needs `causal`.
    pub sliding_window: Option<usize>,
    /// `[batch, seq]`: image group of each token (>= 0, from [`image_group_ids`]), -1 for text.
    pub image_groups: Option<&'a [i32]>,
    /// `[batch, seq]`: the attention_mask; 0 marks a padding token, which no query may see.
    pub key_padding: Option<&'a [u32]>,
}

impl AttentionMask<'_> {
    pub fn validate(&self, dims: &AttentionDims) -> Result<()> {
        let tokens = dims.batch * dims.seq;
        if let Some(window) = self.sliding_window {
            ensure!(self.causal, "a sliding window needs a causal mask");
            ensure!(window > 0, "the sliding window must be at least 1");
        }
        if let Some(groups) = self.image_groups {
            ensure!(
                groups.len() == tokens,
                "image_groups has {} entries, expected batch*seq = {tokens}",
                groups.len()
            );
        }
        if let Some(padding) = self.key_padding {
            ensure!(
                padding.len() == tokens,
                "key_padding has {} entries, expected batch*seq = {tokens}",
                padding.len()
            );
        }
        Ok(())
    }

    /// Whether query `q` of sample `b` may attend to key `kv`.
    pub fn allows(&self, seq: usize, b: usize, q: usize, kv: usize) -> bool {
        if let Some(padding) = self.key_padding {
            if padding[b * seq + kv] == 0 {
                return false;
            }
        }
        let positional = if self.causal {
            kv <= q && self.sliding_window.is_none_or(|w| kv + w > q)
        } else {
            true
        };
        positional
            || self.image_groups.is_some_and(|g| {
                let (gq, gk) = (g[b * seq + q], g[b * seq + kv]);
                gq >= 0 && gq == gk
            })
    }
}

// Decode attention (kernels::decode_attention, reference::decode_attention).

/// What one decode step attends over.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeShape {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub capacity: usize,
    /// Absolute position of the query (its own key and value are already in the cache).
    pub pos: usize,
    /// Sliding window (a query at `i` sees keys `j` with `i - j < window`); 0 = full attention.
    pub window: usize,
    /// Score scale (Gemma 3: `query_pre_attn_scalar^-0.5`).
    pub scale: f32,
}

impl DecodeShape {
    /// The first key position row `b` sees: after its left padding (`start[b]`) and inside the
    /// window.
    pub fn first_key(&self, start: u32) -> usize {
        let lo_window = if self.window == 0 {
            0
        } else {
            (self.pos + 1).saturating_sub(self.window)
        };
        (start as usize).max(lo_window)
    }
}

// Cross-entropy (kernels::cross_entropy, reference::cross_entropy).

/// torch's default `ignore_index` for cross-entropy; the collator writes it into labels.
pub const IGNORE_INDEX: i32 = -100;

/// Sizes of one fused lm_head + cross-entropy call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrossEntropyDims {
    pub tokens: usize,
    pub hidden: usize,
    pub vocab: usize,
}

/// The scalars of one call (summed over rows; reduce across micro-batches by adding).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CrossEntropyStats {
    /// Sum over counted rows of `logsumexp(logits) - logits[label]`.
    pub loss_sum: f64,
    /// Rows whose label is not [`IGNORE_INDEX`].
    pub counted: u64,
    /// Counted rows whose argmax (lowest index on ties) equals the label.
    pub correct: u64,
}

// Patch unfolding (kernels::patch, reference::patch).

/// Sizes of one unfold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatchDims {
    pub images: usize,
    pub channels: usize,
    /// Height = width of each image.
    pub image_size: usize,
    /// Height = width of each patch (= the conv stride).
    pub patch_size: usize,
}

impl PatchDims {
    pub fn side(&self) -> usize {
        self.image_size / self.patch_size.max(1)
    }
    pub fn patches_per_image(&self) -> usize {
        self.side() * self.side()
    }
    /// Values per patch row.
    pub fn patch_dim(&self) -> usize {
        self.channels * self.patch_size * self.patch_size
    }
    pub fn rows(&self) -> usize {
        self.images * self.patches_per_image()
    }
    pub fn pixels_len(&self) -> usize {
        self.images * self.channels * self.image_size * self.image_size
    }
    pub fn output_len(&self) -> usize {
        self.rows() * self.patch_dim()
    }
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.images > 0 && self.channels > 0 && self.patch_size > 0,
            "patch unfold: images, channels and patch size must be positive, got {self:?}"
        );
        ensure!(
            self.image_size >= self.patch_size,
            "patch unfold: a {0}x{0} image is smaller than the {1}x{1} patch",
            self.image_size,
            self.patch_size
        );
        Ok(())
    }
}

// Average pooling (kernels::pool, reference::pool).

/// Sizes of one pooling call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolDims {
    pub batch: usize,
    pub patches: usize,
    pub channels: usize,
    pub kernel: usize,
}

impl PoolDims {
    /// Side of the patch grid; errors when `patches` is not a square.
    pub fn side(&self) -> Result<usize> {
        let side = (self.patches as f64).sqrt().round() as usize;
        ensure!(
            side * side == self.patches,
            "{} patches do not form a square grid",
            self.patches
        );
        Ok(side)
    }

    /// Side of the pooled grid.
    pub fn out_side(&self) -> Result<usize> {
        ensure!(self.kernel > 0, "the pooling kernel must be at least 1");
        let side = self.side()?;
        ensure!(
            side >= self.kernel,
            "a {side}x{side} patch grid is smaller than the {0}x{0} pooling kernel",
            self.kernel
        );
        Ok(side / self.kernel)
    }

    pub fn input_len(&self) -> usize {
        self.batch * self.patches * self.channels
    }

    pub fn output_len(&self) -> Result<usize> {
        let s = self.out_side()?;
        Ok(self.batch * s * s * self.channels)
    }
}

// AdamW (kernels::adamw, reference::adamw).

/// The f32 scalars one step uses, computed as torch does in Python floats (f64) and then
/// handed to f32 kernels.
#[derive(Debug, Clone, Copy)]
pub struct AdamWScalars {
    /// 1 − lr·weight_decay
    pub decay_factor: f32,
    /// lr / (1 − β1^t)
    pub step_size: f32,
    /// sqrt(1 − β2^t)
    pub bias_correction2_sqrt: f32,
    pub eps: f32,
    pub beta2: f32,
    /// 1 − β1 (the lerp weight), rounded from f64
    pub one_minus_beta1: f32,
    /// 1 − β2, rounded from f64
    pub one_minus_beta2: f32,
}

/// Hyper-parameters of one step; `step` counts from 1.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step: u64,
}

impl AdamWStep {
    pub fn scalars(&self) -> AdamWScalars {
        let bc1 = 1.0 - self.beta1.powi(self.step as i32);
        let bc2 = 1.0 - self.beta2.powi(self.step as i32);
        AdamWScalars {
            decay_factor: (1.0 - self.lr * self.weight_decay) as f32,
            step_size: (self.lr / bc1) as f32,
            bias_correction2_sqrt: bc2.sqrt() as f32,
            eps: self.eps as f32,
            beta2: self.beta2 as f32,
            one_minus_beta1: (1.0 - self.beta1) as f32,
            one_minus_beta2: (1.0 - self.beta2) as f32,
        }
    }
}
