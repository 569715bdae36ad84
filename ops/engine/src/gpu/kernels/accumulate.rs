//! `acc += addend` in place, the addend repeating over `acc` (`shaders/accumulate.wgsl`):
//! residual connections and the SigLIP position embedding. Reference:
//! [`crate::reference::accumulate`].

use anyhow::{ensure, Result};
use bytemuck::{Pod, Zeroable};

use super::{elementwise_vec4, StagedVec4, Vec4Kernels};
use crate::gpu::{groups_1d, DType, Gpu, GpuTensor, Recorder, Shader};

/// (features, entry): one element per invocation (any addend), four (same shape, vec4 views),
/// four read from staged textures (CPU adapters).
const KERNELS: [(&[&str], &str); 3] = [
    (&[], "accumulate"),
    (&["VEC4"], "accumulate4"),
    (&["VEC4", "TEXTURES"], "accumulate4_tex"),
];

/// Every module and entry point this family dispatches (validated by `gpu::shader`'s tests).
pub(crate) fn variants() -> Result<Vec<super::Variant>> {
    KERNELS
        .iter()
        .map(|(features, entry)| Ok((Shader::compose("accumulate", features)?, vec![*entry])))
        .collect()
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    offset: u32,
    period: u32,
    _pad0: u32,
}

impl Gpu {
    /// `acc += addend`, where `addend` either has `acc`'s shape (a residual; both may be
    /// chunked) or is an unchunked block whose element count divides `acc`'s and repeats over
    /// it (`[patches, hidden]` over `[images * patches, hidden]`). f32 only.
    pub fn accumulate(
        &self,
        rec: &mut Recorder,
        acc: &GpuTensor,
        addend: &GpuTensor,
    ) -> Result<()> {
        ensure!(
            acc.dtype() == DType::F32 && addend.dtype() == DType::F32,
            "accumulate: operands must be f32, got {:?} and {:?}",
            acc.dtype(),
            addend.dtype()
        );
        let same_shape = acc.shape() == addend.shape();
        ensure!(
            same_shape
                || (!addend.is_chunked()
                    && addend.numel() > 0
                    && acc.numel().is_multiple_of(addend.numel())),
            "accumulate: addend {:?} neither matches nor repeats over {:?}",
            addend.shape(),
            acc.shape()
        );
        ensure!(
            acc.numel() < u32::MAX as usize,
            "accumulate: {:?} is too large for 32-bit indexing",
            acc.shape()
        );
        let [k, k4, k4_tex] = KERNELS.map(|(features, entry)| {
            Shader::compose("accumulate", features).and_then(|s| self.kernel(&s, entry, &[]))
        });
        let (kernel, k4, k4_tex) = (k?, k4?, k4_tex?);
        if same_shape {
            // a residual: four elements an invocation where a chunk holds whole vec4s
            let kernels4 = Vec4Kernels {
                plain: &k4,
                staged: Some(StagedVec4 {
                    kernel: &k4_tex,
                    written: &[0],
                    read: &[0, 1],
                }),
            };
            return elementwise_vec4(self, rec, &kernel, Some(kernels4), &[acc, addend], |n| {
                Params {
                    n,
                    offset: 0,
                    period: n,
                    _pad0: 0,
                }
            });
        }
        for chunk in acc.chunks() {
            let n = chunk.rows * acc.row_len();
            let period = addend.numel();
            let p = Params {
                n: n as u32,
                offset: ((chunk.first_row * acc.row_len()) % period) as u32,
                period: period as u32,
                _pad0: 0,
            };
            rec.dispatch(
                &kernel,
                bytemuck::bytes_of(&p),
                &[chunk.view(), addend.view()?],
                groups_1d(self, n.div_ceil(256) as u32),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::testing::{test_gpu, tiny_binding_gpu, TestRng};
    use crate::reference::accumulate::accumulate as reference;

    fn check(gpu: &Gpu, acc_shape: &[usize], addend_shape: &[usize], rng: &mut TestRng, seed: u64) {
        let n: usize = acc_shape.iter().product();
        let m: usize = addend_shape.iter().product();
        let acc0 = rng.vec_normal(n);
        let addend = rng.vec_normal(m);
        let acc = gpu.upload_f32(acc_shape, &acc0).unwrap();
        let add = gpu.upload_f32(addend_shape, &addend).unwrap();
        let mut rec = Recorder::new(gpu);
        gpu.accumulate(&mut rec, &acc, &add).unwrap();
        rec.submit_and_wait().unwrap();
        let mut want = acc0.clone();
        reference(&mut want, &addend).unwrap();
        // one f32 addition per element: exactly the reference's
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&gpu.read_f32(&acc).unwrap()),
            bits(&want),
            "seed {seed}: acc {acc_shape:?} += {addend_shape:?}"
        );
    }

    /// Same-shape (residual) and repeating (position embedding) addends, whole and chunked
    /// accumulators, odd sizes (one element an invocation) and whole vec4s (four, from staged
    /// textures on CPU adapters, from vec4 storage without staging). Every element of `acc` must
    /// change (inputs are random, so an element the kernel skips keeps its old value and fails
    /// the comparison).
    #[test]
    fn accumulate_matches_reference() {
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        let mut all = |gpu: &Gpu| {
            check(gpu, &[37, 29], &[37, 29], &mut rng, seed);
            check(gpu, &[3 * 9, 13], &[9, 13], &mut rng, seed);
            check(gpu, &[1031], &[1031], &mut rng, seed);
            check(gpu, &[301, 12], &[301, 12], &mut rng, seed);
            check(gpu, &[16, 64], &[4, 64], &mut rng, seed);
        };
        for gpu in [test_gpu(), tiny_binding_gpu()] {
            all(gpu);
        }
        crate::gpu::staging::without_staging(|| all(test_gpu()));
    }

    #[test]
    fn accumulate_rejects_a_non_repeating_addend() {
        let gpu = test_gpu();
        let acc = gpu.upload_f32(&[5, 3], &[1.0; 15]).unwrap();
        let add = gpu.upload_f32(&[4], &[1.0; 4]).unwrap();
        let mut rec = Recorder::new(gpu);
        let err = gpu.accumulate(&mut rec, &acc, &add).unwrap_err();
        assert!(
            err.to_string().contains("neither matches nor repeats"),
            "{err}"
        );
    }
}
