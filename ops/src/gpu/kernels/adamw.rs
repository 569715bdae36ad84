//! AdamW in place (torch.optim.AdamW semantics, f32 states), chunk-aware.

use anyhow::{ensure, Result};
use bytemuck::{Pod, Zeroable};

use super::{elementwise_vec4, Vec4Kernels};
use crate::gpu::{DType, Gpu, GpuTensor, Recorder, Shader};
pub use crate::reference::adamw::AdamWStep;

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
        ensure!(
            param.dtype() == DType::F32,
            "adamw: parameters must be f32 master weights"
        );
        ensure!(step.step >= 1, "adamw: steps count from 1");
        let c = step.scalars();
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
            staged: Some((&k4_tex, &[0, 2, 3])),
        };
        elementwise_vec4(self, rec, &k, Some(kernels4), &tensors, params)
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

    #[test]
    fn adamw_over_chunked_tensors() {
        // 4 KiB chunks: rows of 41 give chunks of 24 rows (a multiple of 4 elements) and a last
        // one of 13, so one tensor mixes both kernels
        check_gpu(tiny_binding_gpu(), [37, 41]);
        check_gpu(tiny_binding_gpu(), [36, 40]);
    }
}
