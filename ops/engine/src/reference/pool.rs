//! 2-D average pooling of the Gemma 3 multimodal projector: the truth `shaders/pool.wgsl` is
//! tested against.
//!
//! Input `[batch, patches, channels]` where the patches form a `side x side` grid in row-major
//! order (`side = sqrt(patches)`, SigLIP's 64x64). Kernel = stride = `kernel` (Gemma 3: 4), no
//! padding; like torch's `AvgPool2d` a remainder that does not fill a window is dropped. Output
//! `[batch, (side / kernel)^2, channels]`, pooled token `(r, c)` at index `r * (side / kernel) + c`,
//! averaging patch rows `r*kernel ..` and columns `c*kernel ..` — the projector's
//! transpose/reshape/AvgPool2d/flatten/transpose in one step.

pub use crate::shapes::PoolDims;
use anyhow::{ensure, Result};

/// Forward: `input [batch, patches, channels]` -> `[batch, (side/kernel)^2, channels]`.
pub fn avg_pool2d_forward(input: &[f32], dims: &PoolDims) -> Result<Vec<f32>> {
    ensure!(
        input.len() == dims.input_len(),
        "pool input has {} elements, expected {}",
        input.len(),
        dims.input_len()
    );
    let (side, out_side, k, c) = (dims.side()?, dims.out_side()?, dims.kernel, dims.channels);
    let mut out = vec![0.0f32; dims.output_len()?];
    let inv = 1.0 / (k * k) as f64;
    for b in 0..dims.batch {
        for r in 0..out_side {
            for col in 0..out_side {
                let o = &mut out[((b * out_side + r) * out_side + col) * c..][..c];
                for (ch, dst) in o.iter_mut().enumerate() {
                    let mut sum = 0.0f64;
                    for dr in 0..k {
                        for dc in 0..k {
                            let patch = (r * k + dr) * side + col * k + dc;
                            sum += input[(b * dims.patches + patch) * c + ch] as f64;
                        }
                    }
                    *dst = (sum * inv) as f32;
                }
            }
        }
    }
    Ok(out)
}

/// Backward: `d_output [batch, (side/kernel)^2, channels]` -> `d_input [batch, patches, channels]`;
/// each patch receives its window's gradient / kernel², dropped remainder patches receive 0.
pub fn avg_pool2d_backward(d_output: &[f32], dims: &PoolDims) -> Result<Vec<f32>> {
    let out_len = dims.output_len()?;
    ensure!(
        d_output.len() == out_len,
        "pool d_output has {} elements, expected {out_len}",
        d_output.len()
    );
    let (side, out_side, k, c) = (dims.side()?, dims.out_side()?, dims.kernel, dims.channels);
    let mut d_input = vec![0.0f32; dims.input_len()];
    let inv = 1.0 / (k * k) as f32;
    for b in 0..dims.batch {
        for row in 0..side {
            for col in 0..side {
                let (r, oc) = (row / k, col / k);
                if r >= out_side || oc >= out_side {
                    continue;
                }
                let src = &d_output[((b * out_side + r) * out_side + oc) * c..][..c];
                let dst = &mut d_input[(b * dims.patches + row * side + col) * c..][..c];
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = s * inv;
                }
            }
        }
    }
    Ok(d_input)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::testing::rel_frobenius;
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    /// The projector as torch writes it: transpose to [B, C, side, side], pool NCHW, flatten, transpose.
    fn naive_projector_pool(x: &[f32], d: &PoolDims) -> Vec<f32> {
        let side = d.side().unwrap();
        let nchw = |b: usize, ch: usize, y: usize, xx: usize| {
            x[(b * d.patches + y * side + xx) * d.channels + ch]
        };
        let os = side / d.kernel;
        let mut pooled = vec![0.0f32; d.batch * d.channels * os * os]; // [B, C, os, os]
        for b in 0..d.batch {
            for ch in 0..d.channels {
                for y in 0..os {
                    for xx in 0..os {
                        let mut s = 0.0;
                        for i in y * d.kernel..(y + 1) * d.kernel {
                            for j in xx * d.kernel..(xx + 1) * d.kernel {
                                s += nchw(b, ch, i, j);
                            }
                        }
                        pooled[((b * d.channels + ch) * os + y) * os + xx] =
                            s / (d.kernel * d.kernel) as f32;
                    }
                }
            }
        }
        let mut out = vec![0.0f32; d.batch * os * os * d.channels];
        for b in 0..d.batch {
            for ch in 0..d.channels {
                for t in 0..os * os {
                    out[(b * os * os + t) * d.channels + ch] =
                        pooled[(b * d.channels + ch) * os * os + t];
                }
            }
        }
        out
    }

    #[test]
    fn forward_matches_torch_layout_and_backward_is_its_adjoint() {
        let seed: u64 = rand::random();
        let mut rng = StdRng::seed_from_u64(seed);
        // exact grids, and grids with a dropped remainder (7 = 2*3 + 1, 10 = 3*3 + 1)
        for d in [
            PoolDims {
                batch: 2,
                patches: 64,
                channels: 5,
                kernel: 4,
            },
            PoolDims {
                batch: 3,
                patches: 49,
                channels: 3,
                kernel: 2,
            },
            PoolDims {
                batch: 1,
                patches: 100,
                channels: 7,
                kernel: 3,
            },
        ] {
            let x: Vec<f32> = (0..d.input_len())
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let y = avg_pool2d_forward(&x, &d).unwrap();
            let err = rel_frobenius(&y, &naive_projector_pool(&x, &d));
            assert!(err < 1e-6, "seed {seed}: {d:?}: rel error {err}");
            // pooling is linear, so backward must satisfy <pool(x), g> = <x, pool_backward(g)>
            let g: Vec<f32> = (0..y.len()).map(|_| rng.random_range(-1.0..1.0)).collect();
            let dx = avg_pool2d_backward(&g, &d).unwrap();
            let lhs: f64 = y
                .iter()
                .zip(&g)
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum();
            let rhs: f64 = x
                .iter()
                .zip(&dx)
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum();
            assert!(
                (lhs - rhs).abs() < 1e-5 * lhs.abs().max(1.0),
                "seed {seed}: {d:?}: {lhs} vs {rhs}"
            );
        }
    }

    #[test]
    fn rejects_non_square_grids_and_oversized_kernels() {
        let d = PoolDims {
            batch: 1,
            patches: 15,
            channels: 1,
            kernel: 2,
        };
        assert!(avg_pool2d_forward(&[1.0; 15], &d).is_err());
        let d = PoolDims {
            batch: 1,
            patches: 4,
            channels: 1,
            kernel: 3,
        };
        assert!(avg_pool2d_forward(&[1.0; 4], &d).is_err());
        let d = PoolDims {
            batch: 1,
            patches: 16,
            channels: 1,
            kernel: 4,
        };
        assert_eq!(avg_pool2d_forward(&[2.0; 16], &d).unwrap(), vec![2.0]);
    }
}
