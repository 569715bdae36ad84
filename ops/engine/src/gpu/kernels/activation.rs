//! GELU (tanh approximation) and GeGLU, forward and backward; elementwise, chunk-aware.

use anyhow::{ensure, Result};
use bytemuck::{Pod, Zeroable};

use super::{elementwise, elementwise_vec4, StagedVec4, Vec4Kernels};
use crate::gpu::{DType, Gpu, GpuTensor, Recorder, Shader};

fn shader() -> Result<Shader> {
    Shader::compose("activation", &[])
}

/// The forward kernels' four-elements-an-invocation modules: vec4 storage, staged textures.
fn shader4(textures: bool) -> Result<Shader> {
    let features: &[&str] = if textures {
        &["VEC4", "TEXTURES"]
    } else {
        &["VEC4"]
    };
    Shader::compose("activation", features)
}

/// Every module and entry point this family dispatches (validated by `gpu::shader`'s tests).
pub(crate) fn variants() -> Result<Vec<super::Variant>> {
    Ok(vec![
        (
            shader()?,
            vec![
                "gelu_forward",
                "gelu_backward",
                "geglu_forward",
                "geglu_backward",
            ],
        ),
        (shader4(false)?, vec!["gelu_forward4", "geglu_forward4"]),
        (
            shader4(true)?,
            vec!["gelu_forward4_tex", "geglu_forward4_tex"],
        ),
    ])
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct ActParams {
    n: u32,
    accumulate: u32,
    _pad: [u32; 2],
}

fn params(accumulate: bool) -> impl Fn(u32) -> ActParams {
    move |n| ActParams {
        n,
        accumulate: accumulate as u32,
        _pad: [0; 2],
    }
}

impl Gpu {
    /// `y = gelu_tanh(x)`.
    pub fn gelu_forward(&self, rec: &mut Recorder, x: &GpuTensor, y: &GpuTensor) -> Result<()> {
        ensure!(x.dtype() == DType::F32, "gelu_forward: x must be f32");
        let k = self.kernel(&shader()?, "gelu_forward", &[])?;
        let k4 = self.kernel(&shader4(false)?, "gelu_forward4", &[])?;
        let k4_tex = self.kernel(&shader4(true)?, "gelu_forward4_tex", &[])?;
        let kernels4 = Vec4Kernels {
            plain: &k4,
            staged: Some(StagedVec4 {
                kernel: &k4_tex,
                written: &[1],
                read: &[0],
            }),
        };
        elementwise_vec4(self, rec, &k, Some(kernels4), &[x, y], params(false))
    }

    /// `dx = dy · gelu'(x)` (or `dx +=` with `accumulate`).
    pub fn gelu_backward(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        dy: &GpuTensor,
        dx: &GpuTensor,
        accumulate: bool,
    ) -> Result<()> {
        ensure!(x.dtype() == DType::F32, "gelu_backward: x must be f32");
        let k = self.kernel(&shader()?, "gelu_backward", &[])?;
        elementwise(self, rec, &k, &[x, dx, dy], params(accumulate))
    }

    /// `out = gelu_tanh(gate) · up`.
    pub fn geglu_forward(
        &self,
        rec: &mut Recorder,
        gate: &GpuTensor,
        up: &GpuTensor,
        out: &GpuTensor,
    ) -> Result<()> {
        ensure!(
            gate.dtype() == DType::F32,
            "geglu_forward: gate must be f32"
        );
        let k = self.kernel(&shader()?, "geglu_forward", &[])?;
        let k4 = self.kernel(&shader4(false)?, "geglu_forward4", &[])?;
        let k4_tex = self.kernel(&shader4(true)?, "geglu_forward4_tex", &[])?;
        let kernels4 = Vec4Kernels {
            plain: &k4,
            staged: Some(StagedVec4 {
                kernel: &k4_tex,
                written: &[1],
                read: &[0, 2],
            }),
        };
        elementwise_vec4(
            self,
            rec,
            &k,
            Some(kernels4),
            &[gate, out, up],
            params(false),
        )
    }

    /// `dgate = dout · up · gelu'(gate)`, `dup = dout · gelu(gate)` (or `+=` with `accumulate`).
    #[allow(clippy::too_many_arguments)]
    pub fn geglu_backward(
        &self,
        rec: &mut Recorder,
        gate: &GpuTensor,
        up: &GpuTensor,
        dout: &GpuTensor,
        dgate: &GpuTensor,
        dup: &GpuTensor,
        accumulate: bool,
    ) -> Result<()> {
        ensure!(
            gate.dtype() == DType::F32,
            "geglu_backward: gate must be f32"
        );
        let k = self.kernel(&shader()?, "geglu_backward", &[])?;
        elementwise(
            self,
            rec,
            &k,
            &[gate, dgate, up, dout, dup],
            params(accumulate),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::testing::{rel_frobenius, test_gpu, tiny_binding_gpu, TestRng};
    use crate::reference::activation as reference;

    fn check_all(gpu: &Gpu, shape: &[usize]) {
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        let n: usize = shape.iter().product();
        let x: Vec<f32> = rng.vec_normal(n).iter().map(|v| v * 2.5).collect();
        let up = rng.vec_normal(n);
        let dy = rng.vec_normal(n);
        let acc0 = rng.vec_normal(n);
        let up_t = |d: &[f32]| gpu.upload_f32(shape, d).unwrap();
        let poisoned = || {
            let t = gpu.empty(shape, DType::F32).unwrap();
            gpu.poison(&t);
            t
        };
        let (gx, gup, gdy) = (up_t(&x), up_t(&up), up_t(&dy));
        let (y, dx, out, dgate) = (poisoned(), poisoned(), poisoned(), poisoned());
        let dup = up_t(&acc0);
        let mut rec = Recorder::new(gpu);
        gpu.gelu_forward(&mut rec, &gx, &y).unwrap();
        gpu.gelu_backward(&mut rec, &gx, &gdy, &dx, false).unwrap();
        gpu.geglu_forward(&mut rec, &gx, &gup, &out).unwrap();
        // dgate overwritten from poison; dup accumulates onto acc0.
        let mut rec2 = Recorder::new(gpu);
        rec.submit();
        gpu.geglu_backward(&mut rec2, &gx, &gup, &gdy, &dgate, &dup, false)
            .unwrap();
        rec2.submit();
        let dup_overwritten = gpu.read_f32(&dup).unwrap();
        let dup2 = up_t(&acc0);
        let dgate2 = up_t(&acc0);
        let mut rec3 = Recorder::new(gpu);
        gpu.geglu_backward(&mut rec3, &gx, &gup, &gdy, &dgate2, &dup2, true)
            .unwrap();
        rec3.submit();

        let (want_dgate, want_dup) = reference::geglu_backward(&x, &up, &dy);
        let add = |a: &[f32]| {
            a.iter()
                .zip(&acc0)
                .map(|(x, y)| x + y)
                .collect::<Vec<f32>>()
        };
        for (name, got, want) in [
            (
                "gelu",
                gpu.read_f32(&y).unwrap(),
                reference::gelu_forward(&x),
            ),
            (
                "gelu dx",
                gpu.read_f32(&dx).unwrap(),
                reference::gelu_backward(&x, &dy),
            ),
            (
                "geglu",
                gpu.read_f32(&out).unwrap(),
                reference::geglu_forward(&x, &up),
            ),
            (
                "geglu dgate",
                gpu.read_f32(&dgate).unwrap(),
                want_dgate.clone(),
            ),
            ("geglu dup", dup_overwritten, want_dup.clone()),
            (
                "geglu dgate acc",
                gpu.read_f32(&dgate2).unwrap(),
                add(&want_dgate),
            ),
            (
                "geglu dup acc",
                gpu.read_f32(&dup2).unwrap(),
                add(&want_dup),
            ),
        ] {
            let err = rel_frobenius(&got, &want);
            assert!(err < 1e-5, "seed {seed}: {name} {shape:?}: rel err {err}");
        }
    }

    /// Odd sizes (one element an invocation) and whole vec4s (the forward kernels take four,
    /// from staged textures on CPU adapters, from vec4 storage without staging).
    #[test]
    fn activations_match_reference() {
        check_all(test_gpu(), &[13, 77]);
        check_all(test_gpu(), &[24, 68]);
        crate::gpu::staging::without_staging(|| check_all(test_gpu(), &[24, 68]));
    }

    #[test]
    fn activations_over_chunked_tensors() {
        // 4 KiB bindings: 41 rows of 53 f32 span several chunks; rows of 52, whole vec4s.
        check_all(tiny_binding_gpu(), &[41, 53]);
        check_all(tiny_binding_gpu(), &[41, 52]);
    }
}
