//! SigLIP patch unfold: the truth `shaders/patch.wgsl` is tested against.
//!
//! `pixels [images, channels, size, size]` -> `patches [images * side², channels * patch²]` with
//! `side = size / patch` (a remainder the stride-`patch` convolution never reaches is dropped),
//! patch row `image * side² + row * side + col`, each row flattened in `(channel, kh, kw)` order
//! — the order of the conv weight `[hidden, channels, patch, patch]`, so the patch embedding is
//! `patches · Wᵀ` with `W` seen as `[hidden, channels * patch²]`.

pub use crate::shapes::PatchDims;
use anyhow::{ensure, Result};

/// `pixels [images, channels, size, size]` -> `patches [images * side², channels * patch²]`.
pub fn patch_unfold(pixels: &[f32], dims: &PatchDims) -> Result<Vec<f32>> {
    dims.validate()?;
    ensure!(
        pixels.len() == dims.pixels_len(),
        "patch unfold: {} pixel values, expected {} images x {} x {1} x {1}",
        pixels.len(),
        dims.images,
        dims.channels
    );
    let (size, ps, side) = (dims.image_size, dims.patch_size, dims.side());
    let mut out = Vec::with_capacity(dims.output_len());
    for img in 0..dims.images {
        for pr in 0..side {
            for pc in 0..side {
                for c in 0..dims.channels {
                    for kh in 0..ps {
                        for kw in 0..ps {
                            let y = pr * ps + kh;
                            let x = pc * ps + kw;
                            out.push(pixels[((img * dims.channels + c) * size + y) * size + x]);
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}
