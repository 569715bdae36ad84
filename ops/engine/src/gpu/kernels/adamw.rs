//! AdamW in place (torch.optim.AdamW semantics, f32 states), chunk-aware.

use anyhow::{ensure, Result};
use bytemuck::{Pod, Zeroable};

use super::{elementwise_vec4, StagedVec4, Vec4Kernels};
use crate::gpu::{DType, Gpu, GpuTensor, Recorder, Shader};
pub use crate::shapes::AdamWStep;

/// The three kernels of shaders/adamw.wgsl: (features, entry point).
const KERNELS: [(&[&str], &str); 3] = [
    (&[], "adamw"),
    (&["VEC4"], "adamw4"),
    (&["VEC4", "TEXTURES"], "adamw4_tex"),
];

/// Every module and entry point this family dispatches (validated by `gpu::shader`'s tests).
pub(crate) fn variants() -> Result<Vec<super::Variant>> {
    KERNELS
        .iter()
        .chain(&[(&["BF16"][..], "adamw_bf16")])
        .map(|(features, entry)| Ok((Shader::compose("adamw", features)?, vec![*entry])))
        .collect()
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct AdamParams {
    n: u32,
    _pad: [u32; 3],
    decay_factor: f32,
    step_size: f32,
    bias_correction2_sqrt: f32,
    eps: f32,
    beta2: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    _pad2: f32,
}

impl Gpu {
    /// One AdamW step on `param` with `grad`, updating the f32 moments in place.
    pub fn adamw(
        &self,
        rec: &mut Recorder,
        param: &GpuTensor,
        grad: &GpuTensor,
        exp_avg: &GpuTensor,
        exp_avg_sq: &GpuTensor,
        step: &AdamWStep,
    ) -> Result<()> {
        ensure!(step.step >= 1, "adamw: steps count from 1");
        let c = step.scalars();
        if param.dtype() == DType::BF16 {
            return self.adamw_bf16(rec, [param, grad, exp_avg, exp_avg_sq], step);
        }
        ensure!(
            param.dtype() == DType::F32,
            "adamw: parameters must be f32 or bf16, not {:?}",
            param.dtype()
        );
        let [k, k4, k4_tex] = KERNELS.map(|(features, entry)| {
            Shader::compose("adamw", features).and_then(|s| self.kernel(&s, entry, &[]))
        });
        let (k, k4, k4_tex) = (k?, k4?, k4_tex?);
        let tensors = [param, grad, exp_avg, exp_avg_sq];
        let params = |n: u32| AdamParams {
            n,
            _pad: [0; 3],
            decay_factor: c.decay_factor,
            step_size: c.step_size,
            bias_correction2_sqrt: c.bias_correction2_sqrt,
            eps: c.eps,
            beta2: c.beta2,
            one_minus_beta1: c.one_minus_beta1,
            one_minus_beta2: c.one_minus_beta2,
            _pad2: 0.0,
        };
        // the staged kernel writes param and the moments, and reads all four from textures
        let kernels4 = Vec4Kernels {
            plain: &k4,
            staged: Some(StagedVec4 {
                kernel: &k4_tex,
                written: &[0, 2, 3],
                read: &[0, 1, 2, 3],
            }),
        };
        elementwise_vec4(self, rec, &k, Some(kernels4), &tensors, params)
    }
}

impl Gpu {
    /// [`Gpu::adamw`] on bf16 tensors (parameter, gradient and both moments bf16, chunked alike):
    /// `adamw_bf16`, two elements per invocation.
    fn adamw_bf16(
        &self,
        rec: &mut Recorder,
        tensors: [&GpuTensor; 4],
        step: &AdamWStep,
    ) -> Result<()> {
        let [param, ..] = tensors;
        for t in tensors {
            ensure!(
                t.dtype() == DType::BF16 && t.shape() == param.shape(),
                "adamw: a bf16 parameter needs bf16 gradient and moments of its shape, got {:?} {:?}",
                t.dtype(),
                t.shape()
            );
            ensure!(
                t.chunks().len() == param.chunks().len()
                    && t.chunks()
                        .iter()
                        .zip(param.chunks())
                        .all(|(a, b)| a.rows == b.rows),
                "adamw: the bf16 tensors are chunked differently"
            );
        }
        let k = self.kernel(&Shader::compose("adamw", &["BF16"])?, "adamw_bf16", &[])?;
        let c = step.scalars();
        for (i, chunk) in param.chunks().iter().enumerate() {
            let n = chunk.rows * param.row_len();
            ensure!(
                n.is_multiple_of(2),
                "adamw: a bf16 chunk of {n} elements splits a word"
            );
            let p = AdamParams {
                n: n as u32,
                _pad: [0; 3],
                decay_factor: c.decay_factor,
                step_size: c.step_size,
                bias_correction2_sqrt: c.bias_correction2_sqrt,
                eps: c.eps,
                beta2: c.beta2,
                one_minus_beta1: c.one_minus_beta1,
                one_minus_beta2: c.one_minus_beta2,
                _pad2: 0.0,
            };
            let views: Vec<_> = tensors.iter().map(|t| t.chunks()[i].view()).collect();
            rec.dispatch(
                &k,
                bytemuck::bytes_of(&p),
                &views,
                crate::gpu::groups_1d(self, (n / 2).div_ceil(256) as u32),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::testing::{rel_frobenius, test_gpu, tiny_binding_gpu, TestRng};
    use crate::reference::adamw as reference;

    /// `shape`: odd element counts run the scalar kernel, multiples of 4 the vec4 one (from
    /// staged copies on CPU adapters).
    fn check_gpu(gpu: &Gpu, shape: [usize; 2]) {
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        let n = shape[0] * shape[1];
        let mut p = rng.vec_normal(n);
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        let (gp, gm, gv) = (
            gpu.upload_f32(&shape, &p).unwrap(),
            gpu.upload_f32(&shape, &m).unwrap(),
            gpu.upload_f32(&shape, &v).unwrap(),
        );
        for t in 1..=3u64 {
            let g = rng.vec_normal(n);
            let gg = gpu.upload_f32(&shape, &g).unwrap();
            let s = AdamWStep {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.1,
                step: t,
            };
            let mut rec = Recorder::new(gpu);
            gpu.adamw(&mut rec, &gp, &gg, &gm, &gv, &s).unwrap();
            rec.submit();
            reference::adamw_step(&mut p, &g, &mut m, &mut v, &s);
        }
        for (name, t, want) in [
            ("param", &gp, &p),
            ("exp_avg", &gm, &m),
            ("exp_avg_sq", &gv, &v),
        ] {
            let err = rel_frobenius(&gpu.read_f32(t).unwrap(), want);
            assert!(err < 1e-6, "seed {seed}: adamw {name}: rel err {err}");
        }
    }

    #[test]
    fn adamw_matches_reference() {
        check_gpu(test_gpu(), [37, 41]);
        check_gpu(test_gpu(), [36, 41]);
        // the storage-buffer kernels where the default stages (what GPUs run)
        crate::gpu::staging::without_staging(|| check_gpu(test_gpu(), [36, 41]));
    }

    /// bf16 state: each step against the reference's f32 update rounded on store, from the
    /// state the GPU holds before the step. WGSL's sqrt and division need not be correctly
    /// rounded, and its fma may round the product (the moment's lerp is an fma), so an f32
    /// result a few ulps off may round to the neighbouring bf16: one bf16 ulp of the value, or,
    /// where the lerp cancels to nearly zero, 1e-6 of the tensor's RMS; on few elements.
    fn check_bf16(gpu: &Gpu, shape: [usize; 2]) {
        use crate::reference::cast::{f32_to_bf16, round_to_bf16};
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        let n = shape[0] * shape[1];
        let mut start = rng.vec_normal(n);
        round_to_bf16(&mut start);
        let up = |x: &[f32]| {
            let bits: Vec<u16> = x.iter().map(|&y| f32_to_bf16(y)).collect();
            gpu.upload_bf16(&shape, &bits).unwrap()
        };
        let (gp, gm, gv) = (up(&start), up(&vec![0.0; n]), up(&vec![0.0; n]));
        let (mut exact, mut total) = (0usize, 0usize);
        for t in 1..=3u64 {
            let mut g = rng.vec_normal(n);
            round_to_bf16(&mut g);
            let s = AdamWStep {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.1,
                step: t,
            };
            let (mut p, mut m, mut v) = (
                gpu.read_f32(&gp).unwrap(),
                gpu.read_f32(&gm).unwrap(),
                gpu.read_f32(&gv).unwrap(),
            );
            reference::adamw_step_bf16(&mut p, &g, &mut m, &mut v, &s);
            let mut rec = Recorder::new(gpu);
            gpu.adamw(&mut rec, &gp, &up(&g), &gm, &gv, &s).unwrap();
            rec.submit();
            for (name, tensor, want) in [
                ("param", &gp, &p),
                ("exp_avg", &gm, &m),
                ("exp_avg_sq", &gv, &v),
            ] {
                let rms = (want.iter().map(|w| w * w).sum::<f32>() / n as f32).sqrt();
                for (i, (&got, &want)) in gpu.read_f32(tensor).unwrap().iter().zip(want).enumerate()
                {
                    let ulp = (want.abs() / 128.0).max(rms * 1e-6);
                    assert!(
                        (got - want).abs() <= ulp,
                        "seed {seed}: step {t} {name}[{i}] = {got}, want {want}"
                    );
                    exact += usize::from(got.to_bits() == want.to_bits());
                    total += 1;
                }
            }
        }
        assert!(
            exact * 100 >= total * 99,
            "seed {seed}: only {exact} of {total} values bit-exact"
        );
        let moved = gpu
            .read_f32(&gp)
            .unwrap()
            .iter()
            .zip(&start)
            .filter(|(a, b)| a != b)
            .count();
        assert!(
            moved > n / 2,
            "seed {seed}: only {moved} of {n} parameters moved"
        );
    }

    #[test]
    fn adamw_bf16_matches_reference() {
        check_bf16(test_gpu(), [37, 42]);
        // 4 KiB bindings: several bf16 chunks
        check_bf16(tiny_binding_gpu(), [97, 24]);
    }

    #[test]
    fn adamw_over_chunked_tensors() {
        // 4 KiB chunks: rows of 41 give chunks of 24 rows (a multiple of 4 elements) and a last
        // one of 13, so one tensor mixes both kernels
        check_gpu(tiny_binding_gpu(), [37, 41]);
        check_gpu(tiny_binding_gpu(), [36, 40]);
    }
}
