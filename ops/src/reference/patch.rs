//! SigLIP patch unfold: the truth `shaders/patch.wgsl` is tested against.
//!
//! `pixels [images, channels, size, size]` -> `patches [images * side², channels * patch²]` with
//! `side = size / patch` (a remainder the stride-`patch` convolution never reaches is dropped),
//! patch row `image * side² + row * side + col`, each row flattened in `(channel, kh, kw)` order
//! — the order of the conv weight `[hidden, channels, patch, patch]`, so the patch embedding is
//! `patches · Wᵀ` with `W` seen as `[hidden, channels * patch²]`.

use anyhow::{ensure, Result};

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
