//! The dense building blocks of the model reference, shaped for the model's call sites:
//! matmuls in the three orientations a Linear's forward/backward needs (f64 accumulation, so the
//! oracle is closer to exact than the f32 kernels compared with it), and thin adapters over the
//! gpu helper's kernel references (`engine::reference::{norm, activation, rope}`) for Gemma
//! RMSNorm, LayerNorm, gelu_pytorch_tanh and rotate-half RoPE.

use engine::reference::{norm, rope};

/// `y [m, n] = x [m, k] · wᵀ` with `w [n, k]` (an `nn.Linear` weight `[out, in]`).
pub fn matmul_xwt(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(w.len(), n * k);
    let mut y = vec![0.0f32; m * n];
    for (xi, yi) in x.chunks_exact(k).zip(y.chunks_exact_mut(n)) {
        for (wj, yij) in w.chunks_exact(k).zip(yi.iter_mut()) {
            *yij = dot(xi, wj) as f32;
        }
    }
    y
}

/// `y [m, n] = x [m, k] · w` with `w [k, n]` (a raw Parameter used without transpose, and the
/// input gradient of a Linear: `dx [m, in] = dy [m, out] · W [out, in]`).
pub fn matmul_xw(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(w.len(), k * n);
    let mut acc = vec![0.0f64; n];
    let mut y = vec![0.0f32; m * n];
    for (xi, yi) in x.chunks_exact(k).zip(y.chunks_exact_mut(n)) {
        acc.iter_mut().for_each(|a| *a = 0.0);
        for (&xv, wrow) in xi.iter().zip(w.chunks_exact(n)) {
            let xv = xv as f64;
            for (a, &wv) in acc.iter_mut().zip(wrow) {
                *a += xv * wv as f64;
            }
        }
        for (o, a) in yi.iter_mut().zip(&acc) {
            *o = *a as f32;
        }
    }
    y
}

/// Weight gradient `dw [n, k] += dyᵀ · x` for `dy [m, n]`, `x [m, k]`, scaled by `scale`.
pub fn accumulate_dyt_x(
    dw: &mut [f32],
    dy: &[f32],
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    scale: f32,
) {
    debug_assert_eq!(dw.len(), n * k);
    debug_assert_eq!(dy.len(), m * n);
    debug_assert_eq!(x.len(), m * k);
    let mut acc = vec![0.0f64; n * k];
    for (dyi, xi) in dy.chunks_exact(n).zip(x.chunks_exact(k)) {
        for (&g, arow) in dyi.iter().zip(acc.chunks_exact_mut(k)) {
            if g == 0.0 {
                continue;
            }
            let g = g as f64;
            for (a, &xv) in arow.iter_mut().zip(xi) {
                *a += g * xv as f64;
            }
        }
    }
    for (d, a) in dw.iter_mut().zip(acc) {
        *d += (a * scale as f64) as f32;
    }
}

/// Column sums `db [n] += Σ_rows dy [m, n]` (a bias gradient).
pub fn column_sums(dy: &[f32], n: usize) -> Vec<f64> {
    let mut s = vec![0.0f64; n];
    for row in dy.chunks_exact(n) {
        for (a, &v) in s.iter_mut().zip(row) {
            *a += v as f64;
        }
    }
    s
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// Gemma RMSNorm over rows of `w.len()` (`y = x / sqrt(mean(x²) + eps) · (1 + w)`), the gpu
/// helper's reference. Returns `(y [rows, dim], rstd [rows])`.
pub fn gemma_rmsnorm_forward(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let dim = w.len();
    norm::rmsnorm_forward(x, w, x.len() / dim, dim, eps)
}

/// Input gradient of [`gemma_rmsnorm_forward`] (the weight is frozen in LoRA training).
pub fn gemma_rmsnorm_backward(x: &[f32], w: &[f32], eps: f32, dy: &[f32]) -> Vec<f32> {
    let dim = w.len();
    norm::rmsnorm_backward(x, w, dy, x.len() / dim, dim, eps).0
}

/// LayerNorm over rows of `w.len()` (biased variance), the gpu helper's reference.
/// Returns `y [rows, dim]`.
pub fn layernorm_forward(x: &[f32], w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
    let dim = w.len();
    norm::layernorm_forward(x, w, b, x.len() / dim, dim, eps).0
}

/// Input gradient of [`layernorm_forward`] (frozen weight and bias).
pub fn layernorm_backward(x: &[f32], w: &[f32], eps: f32, dy: &[f32]) -> Vec<f32> {
    let dim = w.len();
    norm::layernorm_backward(x, w, dy, x.len() / dim, dim, eps).0
}

pub use engine::reference::activation::{gelu as gelu_tanh, gelu_grad as gelu_tanh_grad};

/// RoPE tables of one layer for positions `0..seq` (`[seq, head_dim / 2]` each), transformers'
/// f32 `inv_freq / factor` and `pos · inv_freq` (the gpu helper's reference).
pub fn rope_tables(
    base: f64,
    linear_factor: f64,
    head_dim: usize,
    seq: usize,
) -> (Vec<f32>, Vec<f32>) {
    let inv = rope::inv_freq(base as f32, head_dim, linear_factor as f32);
    rope::cos_sin_tables(&inv, seq)
}

/// Rotate-half RoPE in place on `x [batch, seq, heads, head_dim]` with position = index in `seq`;
/// `inverse` rotates by the negative angle (the backward).
pub fn rope_apply(
    x: &mut [f32],
    cos: &[f32],
    sin: &[f32],
    seq: usize,
    heads: usize,
    head_dim: usize,
    inverse: bool,
) {
    let tokens = x.len() / (heads * head_dim);
    let positions: Vec<u32> = (0..tokens).map(|t| (t % seq) as u32).collect();
    let y = rope::rope(x, &positions, cos, sin, heads, head_dim, inverse);
    x.copy_from_slice(&y);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numeric_grad(f: impl Fn(&[f32]) -> f64, x: &[f32], i: usize) -> f64 {
        let h = 1e-3f32;
        let (mut a, mut b) = (x.to_vec(), x.to_vec());
        a[i] += h;
        b[i] -= h;
        (f(&a) - f(&b)) / (2.0 * h as f64)
    }

    fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn norm_backwards_match_finite_differences() {
        let dim = 7;
        let x = pseudo_random(3 * dim, 1);
        let w = pseudo_random(dim, 2);
        let b = pseudo_random(dim, 3);
        let dy = pseudo_random(3 * dim, 4);
        let loss_rms = |x: &[f32]| {
            let (y, _) = gemma_rmsnorm_forward(x, &w, 1e-6);
            y.iter()
                .zip(&dy)
                .map(|(a, b)| (*a * *b) as f64)
                .sum::<f64>()
        };
        let dx = gemma_rmsnorm_backward(&x, &w, 1e-6, &dy);
        for (i, &d) in dx.iter().enumerate() {
            assert!(
                (d as f64 - numeric_grad(loss_rms, &x, i)).abs() < 2e-3,
                "rms {i}"
            );
        }
        let loss_ln = |x: &[f32]| {
            let y = layernorm_forward(x, &w, &b, 1e-6);
            y.iter()
                .zip(&dy)
                .map(|(a, b)| (*a * *b) as f64)
                .sum::<f64>()
        };
        let dx = layernorm_backward(&x, &w, 1e-6, &dy);
        for (i, &d) in dx.iter().enumerate() {
            assert!(
                (d as f64 - numeric_grad(loss_ln, &x, i)).abs() < 2e-3,
                "ln {i}"
            );
        }
    }

    #[test]
    fn gelu_grad_matches_finite_differences() {
        for &x in &[-3.1f32, -0.7, 0.0, 0.4, 2.2] {
            let h = 1e-3f64;
            let num = (gelu_tanh((x as f64 + h) as f32) as f64
                - gelu_tanh((x as f64 - h) as f32) as f64)
                / (2.0 * h);
            assert!((gelu_tanh_grad(x) as f64 - num).abs() < 1e-3, "{x}");
        }
        // Hand value: gelu_tanh(1) = 0.5·(1 + tanh(0.7978846·1.044715)) = 0.8411920.
        assert!((gelu_tanh(1.0) - 0.841_192).abs() < 1e-6);
    }

    #[test]
    fn rope_inverse_undoes_forward_and_rotates_pairs() {
        let (seq, heads, hd) = (5, 2, 6);
        let (cos, sin) = rope_tables(10_000.0, 1.0, hd, seq);
        let x = pseudo_random(seq * heads * hd, 9);
        let mut y = x.clone();
        rope_apply(&mut y, &cos, &sin, seq, heads, hd, false);
        // Position 0 is the identity; position 1, pair 0 rotates by exactly 1 radian.
        assert_eq!(&y[..heads * hd], &x[..heads * hd]);
        let (x1, x2) = (x[heads * hd], x[heads * hd + 3]);
        assert!((y[heads * hd] - (x1 * 1f32.cos() - x2 * 1f32.sin())).abs() < 1e-6);
        rope_apply(&mut y, &cos, &sin, seq, heads, hd, true);
        for (a, b) in y.iter().zip(&x) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}
