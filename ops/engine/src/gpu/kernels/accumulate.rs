//! `acc += addend` in place, the addend repeating over `acc` (`shaders/accumulate.wgsl`):
//! residual connections and the SigLIP position embedding. Reference:
//! [`crate::reference::accumulate`].

use anyhow::{ensure, Result};
use bytemuck::{Pod, Zeroable};

use crate::gpu::{groups_1d, DType, Gpu, GpuTensor, Recorder, Shader};

fn shader() -> Result<Shader> {
    Shader::compose("accumulate", &[])
}

/// Every module and entry point this family dispatches (validated by `gpu::shader`'s tests).
pub(crate) fn variants() -> Result<Vec<super::Variant>> {
    Ok(vec![(shader()?, vec!["accumulate"])])
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
        let kernel = self.kernel(&shader()?, "accumulate", &[])?;
        for (c, chunk) in acc.chunks().iter().enumerate() {
            let n = chunk.rows * acc.row_len();
            let (addend_view, period, offset) = if same_shape {
                (addend.chunks()[c].view(), n, 0)
            } else {
                let period = addend.numel();
                (
                    addend.view()?,
                    period,
                    (chunk.first_row * acc.row_len()) % period,
                )
            };
            let p = Params {
                n: n as u32,
                offset: offset as u32,
                period: period as u32,
                _pad0: 0,
            };
            rec.dispatch(
                &kernel,
                bytemuck::bytes_of(&p),
                &[chunk.view(), addend_view],
                groups_1d(self, n.div_ceil(256) as u32),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::testing::{rel_frobenius, test_gpu, tiny_binding_gpu, TestRng};
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
        let e = rel_frobenius(&gpu.read_f32(&acc).unwrap(), &want);
        assert!(
            e < 1e-7,
            "seed {seed}: acc {acc_shape:?} += {addend_shape:?}: rel err {e}"
        );
    }

    /// Same-shape (residual) and repeating (position embedding) addends, whole and chunked
    /// accumulators, odd sizes. Every element of `acc` must change (inputs are random, so an
    /// element the kernel skips keeps its old value and fails the comparison).
    #[test]
    fn accumulate_matches_reference() {
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        for gpu in [test_gpu(), tiny_binding_gpu()] {
            check(gpu, &[37, 29], &[37, 29], &mut rng, seed);
            check(gpu, &[3 * 9, 13], &[9, 13], &mut rng, seed);
            check(gpu, &[1031], &[1031], &mut rng, seed);
        }
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
