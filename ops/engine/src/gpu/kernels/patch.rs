//! SigLIP patch unfold (`shaders/patch.wgsl`): pixels to one row per patch, so the stride-`patch`
//! convolution of the patch embedding is a matmul. Reference: [`crate::reference::patch`].

use anyhow::{ensure, Result};
use bytemuck::{Pod, Zeroable};

use crate::gpu::{groups_1d, DType, Gpu, GpuTensor, Recorder, Shader};
use crate::shapes::PatchDims;

fn shader() -> Result<Shader> {
    Shader::compose("patch", &[])
}

/// Every module and entry point this family dispatches (validated by `gpu::shader`'s tests).
pub(crate) fn variants() -> Result<Vec<super::Variant>> {
    Ok(vec![(shader()?, vec!["patch_unfold"])])
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    channels: u32,
    size: u32,
    patch_size: u32,
    side: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

impl Gpu {
    /// Records `patches [images * side², channels * patch²]` (overwritten) from
    /// `pixels [images, channels, size, size]`, both one binding each.
    pub fn patch_unfold(
        &self,
        rec: &mut Recorder,
        pixels: &GpuTensor,
        dims: &PatchDims,
        patches: &GpuTensor,
    ) -> Result<()> {
        dims.validate()?;
        ensure!(
            pixels.dtype() == DType::F32 && pixels.numel() == dims.pixels_len(),
            "patch unfold: pixels must be f32 [{}, {}, {s}, {s}], got {:?} {:?}",
            dims.images,
            dims.channels,
            pixels.dtype(),
            pixels.shape(),
            s = dims.image_size
        );
        ensure!(
            patches.dtype() == DType::F32
                && patches.shape() == [dims.rows(), dims.patch_dim()].as_slice(),
            "patch unfold: patches must be f32 [{}, {}], got {:?} {:?}",
            dims.rows(),
            dims.patch_dim(),
            patches.dtype(),
            patches.shape()
        );
        ensure!(
            dims.pixels_len().max(dims.output_len()) < u32::MAX as usize,
            "patch unfold: {dims:?} is too large for 32-bit indexing"
        );
        let kernel = self.kernel(&shader()?, "patch_unfold", &[])?;
        // The output is a permutation of (most of) the pixels, so it fits one binding whenever
        // the pixels do.
        let n = dims.output_len();
        let p = Params {
            n: n as u32,
            channels: dims.channels as u32,
            size: dims.image_size as u32,
            patch_size: dims.patch_size as u32,
            side: dims.side() as u32,
            _pad0: 0,
            _pad1: 0,
            _pad2: 0,
        };
        rec.dispatch(
            &kernel,
            bytemuck::bytes_of(&p),
            &[pixels.view()?, patches.view()?],
            groups_1d(self, n.div_ceil(256) as u32),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::testing::{rel_frobenius, test_gpu, TestRng};
    use crate::reference::patch::patch_unfold;

    /// An exact grid and a grid with a dropped remainder.
    #[test]
    fn patch_unfold_matches_reference() {
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        {
            let gpu = test_gpu();
            for dims in [
                PatchDims {
                    images: 2,
                    channels: 3,
                    image_size: 15,
                    patch_size: 5,
                },
                PatchDims {
                    images: 3,
                    channels: 2,
                    image_size: 11,
                    patch_size: 3,
                },
            ] {
                let pixels = rng.vec_uniform(dims.pixels_len(), -1.0, 1.0);
                let pixels_g = gpu
                    .upload_f32(
                        &[dims.images, dims.channels, dims.image_size, dims.image_size],
                        &pixels,
                    )
                    .unwrap();
                let out = gpu
                    .empty(&[dims.rows(), dims.patch_dim()], DType::F32)
                    .unwrap();
                gpu.poison(&out);
                let mut rec = Recorder::new(gpu);
                gpu.patch_unfold(&mut rec, &pixels_g, &dims, &out).unwrap();
                rec.submit_and_wait().unwrap();
                let e = rel_frobenius(
                    &gpu.read_f32(&out).unwrap(),
                    &patch_unfold(&pixels, &dims).unwrap(),
                );
                assert!(e == 0.0, "seed {seed}: {dims:?}: rel err {e}");
            }
        }
    }
}
