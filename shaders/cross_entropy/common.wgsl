// Fused lm_head + cross-entropy over vocabulary chunks. Reference: ops/engine/src/reference/cross_entropy.rs.
//
// The wrapper (ops/engine/src/gpu/kernels/cross_entropy.rs) walks the vocabulary in blocks of at most
// `vc` rows of W (inside the engine's storage chunks of W), so only a [tokens, vc] block of
// logits ever exists (G, row stride ldg, a multiple of 8). The three products run on the matmul
// kernels (shaders/matmul.wgsl); the modules of shaders/cross_entropy/ hold the softmax parts (each includes this header). Forward per block: G = X·W_cᵀ
// (matmul), ce_stats (merge the block into each row's running max / sum-exp / argmax / label
// logit). Then ce_finish (per-row lse and the three sums). Backward per block, last block first
// (its logits are still in G): G = X·W_cᵀ again, ce_dlogits (G = scale·(softmax − onehot), 0 on
// ignored rows), then the matmuls dX (+)= G·W_c and optionally dW_c += Gᵀ·X.
//
// LABELS [tokens] i32 (-100 = ignored). STATE is [tokens, 8] f32:
// (max, sum exp(z - max), label logit, best logit, best index (bits), lse, -, -).

#include "lib/dispatch"

struct Params {
    tokens: u32, hidden: u32, vc: u32, ldg: u32,
    w_row0: u32,   // first W row of this vocabulary chunk, within the bound storage chunk
    v0: u32,       // global vocabulary index of that row
    first: u32,    // 1 for the first vocabulary chunk (the state starts fresh)
    scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;

const NEG: f32 = -3.0e38;
const IGNORE: i32 = -100;
