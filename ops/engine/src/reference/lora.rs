//! LoRA (PEFT `Linear`): y += s · dropout(x) · Aᵀ · Bᵀ, with the dropout mask drawn from a
//! counter-based hash of (seed, element index) so backward regenerates it without storing it.
//! x: [T, in], A: [r, in], B: [out, r], h = dropout(x)·Aᵀ: [T, r], y/dy: [T, out].
//! The mask index of `x[i]` is `offset + i` (mod 2³²): `offset` is where `x` starts in the tensor
//! the mask is drawn over, so a slice of rows (one image of a batch) draws the whole call's mask.

use super::matmul::{matmul, Gemm};

/// Chris Wellons' lowbias32 integer hash (also in shaders/lora.wgsl).
pub fn hash32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// Whether element `i` survives dropout with drop probability `p` under `seed`.
pub fn dropout_keep(seed: u32, i: u32, p: f32) -> bool {
    let u = (hash32(i ^ hash32(seed)) >> 8) as f32 * (1.0 / 16_777_216.0);
    u >= p
}

/// dropout(x)[i] = x[i] / (1 − p) if element `offset + i` is kept, else 0 (inverted dropout,
/// as torch).
pub fn dropout(x: &[f32], p: f32, seed: u32, offset: u32) -> Vec<f32> {
    let inv_keep = 1.0 / (1.0 - p);
    x.iter()
        .enumerate()
        .map(|(i, &v)| {
            if dropout_keep(seed, offset.wrapping_add(i as u32), p) {
                v * inv_keep
            } else {
                0.0
            }
        })
        .collect()
}

/// Returns (y + s·h·Bᵀ, h).
#[allow(clippy::too_many_arguments)]
pub fn lora_forward(
    x: &[f32],
    a: &[f32],
    b: &[f32],
    y: &[f32],
    t: usize,
    d_in: usize,
    d_out: usize,
    r: usize,
    scale: f32,
    p: f32,
    seed: u32,
    offset: u32,
) -> (Vec<f32>, Vec<f32>) {
    let xd = dropout(x, p, seed, offset);
    let mut h = vec![0f32; t * r];
    matmul(
        &xd,
        a,
        &mut h,
        t,
        r,
        d_in,
        Gemm {
            trans_b: true,
            ..Default::default()
        },
        None,
    );
    let mut out = y.to_vec();
    matmul(
        &h,
        b,
        &mut out,
        t,
        d_out,
        r,
        Gemm {
            trans_b: true,
            alpha: scale,
            beta: 1.0,
            ..Default::default()
        },
        None,
    );
    (out, h)
}

/// Returns (dA [r, in], dB [out, r], dx contribution [T, in]).
#[allow(clippy::too_many_arguments)]
pub fn lora_backward(
    x: &[f32],
    a: &[f32],
    b: &[f32],
    h: &[f32],
    dy: &[f32],
    t: usize,
    d_in: usize,
    d_out: usize,
    r: usize,
    scale: f32,
    p: f32,
    seed: u32,
    offset: u32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let xd = dropout(x, p, seed, offset);
    let mut db = vec![0f32; d_out * r];
    matmul(
        dy,
        h,
        &mut db,
        d_out,
        r,
        t,
        Gemm {
            trans_a: true,
            alpha: scale,
            ..Default::default()
        },
        None,
    );
    let mut dh = vec![0f32; t * r];
    matmul(
        dy,
        b,
        &mut dh,
        t,
        r,
        d_out,
        Gemm {
            alpha: scale,
            ..Default::default()
        },
        None,
    );
    let mut da = vec![0f32; r * d_in];
    matmul(
        &dh,
        &xd,
        &mut da,
        r,
        d_in,
        t,
        Gemm {
            trans_a: true,
            ..Default::default()
        },
        None,
    );
    let mut dxd = vec![0f32; t * d_in];
    matmul(&dh, a, &mut dxd, t, d_in, r, Gemm::default(), None);
    let dx = dropout(&dxd, p, seed, offset);
    (da, db, dx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_rate_is_close_to_p_and_seeds_differ() {
        let n = 100_000u32;
        let dropped = (0..n).filter(|&i| !dropout_keep(7, i, 0.05)).count() as f64 / n as f64;
        assert!((dropped - 0.05).abs() < 0.005, "{dropped}");
        let same = (0..1000u32)
            .filter(|&i| dropout_keep(7, i, 0.5) == dropout_keep(8, i, 0.5))
            .count();
        assert!((350..650).contains(&same), "{same}");
        assert!((0..1000u32).all(|i| dropout_keep(3, i, 0.0)));
    }

    /// What the offset is for: dropout of a slice of rows at its offset is that slice of the
    /// whole tensor's dropout (indices wrap mod 2³², as the kernel's u32 sum does).
    #[test]
    fn dropout_of_a_slice_at_its_offset_is_that_slice_of_the_whole() {
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin() + 1.5).collect();
        let (p, seed) = (0.3, 5);
        let whole = dropout(&x, p, seed, 0);
        assert!(whole.contains(&0.0) && whole.iter().any(|&v| v != 0.0));
        for (start, end) in [(0, 7), (123, 650), (999, 1000)] {
            let slice = dropout(&x[start..end], p, seed, start as u32);
            assert_eq!(slice, whole[start..end], "rows {start}..{end}");
        }
        assert_ne!(
            dropout(&x[123..650], p, seed, 0),
            whole[123..650],
            "the offset selects the mask"
        );
        let wrapped = dropout(&x[..10], p, seed, u32::MAX - 4);
        assert_eq!(wrapped[5..], dropout(&x[5..10], p, seed, 0)[..]);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (t, d_in, d_out, r) = (3, 4, 5, 2);
        let f = |n: usize, k: usize| {
            (0..n)
                .map(|i| (((i * 7 + k) % 13) as f32 - 6.0) * 0.1)
                .collect::<Vec<f32>>()
        };
        let (x, a, b, dy) = (
            f(t * d_in, 1),
            f(r * d_in, 2),
            f(d_out * r, 3),
            f(t * d_out, 4),
        );
        let y0 = vec![0f32; t * d_out];
        let (s, p, seed) = (2.0, 0.3, 11);
        let loss = |x: &[f32], a: &[f32], b: &[f32]| -> f64 {
            let (y, _) = lora_forward(x, a, b, &y0, t, d_in, d_out, r, s, p, seed, 0);
            y.iter().zip(&dy).map(|(u, v)| *u as f64 * *v as f64).sum()
        };
        let (_, h) = lora_forward(&x, &a, &b, &y0, t, d_in, d_out, r, s, p, seed, 0);
        let (da, db, dx) = lora_backward(&x, &a, &b, &h, &dy, t, d_in, d_out, r, s, p, seed, 0);
        let eps = 1e-2f32;
        let numeric = |which: usize, i: usize| {
            let mut args = [x.clone(), a.clone(), b.clone()];
            args[which][i] += eps;
            let up = loss(&args[0], &args[1], &args[2]);
            args[which][i] -= 2.0 * eps;
            let down = loss(&args[0], &args[1], &args[2]);
            (up - down) / (2.0 * eps as f64)
        };
        for (which, grad) in [(0, &dx), (1, &da), (2, &db)] {
            for (i, &g) in grad.iter().enumerate() {
                let n = numeric(which, i);
                assert!(
                    (n - g as f64).abs() < 1e-3,
                    "arg {which} [{i}]: numeric {n} vs {g}"
                );
            }
        }
    }
}
