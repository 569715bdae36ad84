//! Reductions to a scalar (sum, max, global L2 norm over many tensors) and gradient clipping.
//! Results stay on the GPU as [1] tensors; read them back once per step.

use anyhow::{ensure, Result};
use bytemuck::{Pod, Zeroable};

use super::check;
use crate::gpu::recorder::Bound;
use crate::gpu::staging::StageFormat;
use crate::gpu::{groups_1d, DType, Gpu, GpuTensor, Recorder, Shader};

/// Elements per partial-reduction workgroup (WG · ITEMS in the shader).
const SEG: usize = 256 * 16;

fn shader() -> Result<Shader> {
    Shader::compose("reduce", &[])
}

/// Every module and entry point this family dispatches (validated by `gpu::shader`'s tests).
pub(crate) fn variants() -> Result<Vec<super::Variant>> {
    Ok(vec![(
        shader()?,
        vec![
            "partial",
            "partial_tex",
            "finish",
            "clip_scale",
            "clip_scale4_tex",
            "partial_bf16",
            "clip_scale_bf16",
        ],
    )])
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct ReduceParams {
    n: u32,
    mode: u32,
    out_index: u32,
    max_norm: f32,
}

const SUM: u32 = 0;
const MAX: u32 = 1;
const SUMSQ: u32 = 2;
const SQRT_SUM: u32 = 3;

impl Gpu {
    fn reduce_many(
        &self,
        rec: &mut Recorder,
        tensors: &[&GpuTensor],
        partial_mode: u32,
        finish_mode: u32,
        out: &GpuTensor,
    ) -> Result<()> {
        check("reduce", "out", out, DType::F32, 1)?;
        let total_partials: usize = tensors
            .iter()
            .flat_map(|t| {
                t.chunks()
                    .iter()
                    .map(|c| (c.rows * t.row_len()).div_ceil(SEG))
            })
            .sum();
        let partials = self.empty(&[total_partials.max(1)], DType::F32)?;
        let partial = self.kernel(&shader()?, "partial", &[])?;
        let partial_tex = self.kernel(&shader()?, "partial_tex", &[])?;
        let partial_bf16 = self.kernel(&shader()?, "partial_bf16", &[])?;
        let mut at = 0usize;
        for t in tensors {
            ensure!(
                matches!(t.dtype(), DType::F32 | DType::BF16),
                "reduce: tensors must be f32 or bf16, got {:?}",
                t.dtype()
            );
            for c in t.chunks() {
                let n = c.rows * t.row_len();
                let groups = n.div_ceil(SEG);
                let p = ReduceParams {
                    n: n as u32,
                    mode: partial_mode,
                    out_index: at as u32,
                    max_norm: 0.0,
                };
                let grid = groups_1d(self, groups as u32);
                if t.dtype() == DType::BF16 {
                    rec.dispatch(
                        &partial_bf16,
                        bytemuck::bytes_of(&p),
                        &[c.view(), partials.view()?],
                        grid,
                    );
                    at += groups;
                    continue;
                }
                match rec.stage(0, &c.view(), StageFormat::F32) {
                    Some(x) => rec.dispatch_bound(
                        &partial_tex,
                        bytemuck::bytes_of(&p),
                        &[Bound::Buffer(partials.view()?), Bound::Texture(&x)],
                        grid,
                    ),
                    None => rec.dispatch(
                        &partial,
                        bytemuck::bytes_of(&p),
                        &[c.view(), partials.view()?],
                        grid,
                    ),
                }
                at += groups;
            }
        }
        let finish = self.kernel(&shader()?, "finish", &[])?;
        let p = ReduceParams {
            n: at as u32,
            mode: finish_mode,
            out_index: 0,
            max_norm: 0.0,
        };
        rec.dispatch(
            &finish,
            bytemuck::bytes_of(&p),
            &[partials.view()?, out.view()?],
            [1, 1, 1],
        );
        Ok(())
    }

    /// out[0] = Σ x.
    pub fn sum(&self, rec: &mut Recorder, x: &GpuTensor, out: &GpuTensor) -> Result<()> {
        self.reduce_many(rec, &[x], SUM, SUM, out)
    }

    /// out[0] = max x (−inf for an empty tensor).
    pub fn max(&self, rec: &mut Recorder, x: &GpuTensor, out: &GpuTensor) -> Result<()> {
        self.reduce_many(rec, &[x], MAX, MAX, out)
    }

    /// out[0] = sqrt(Σ over all tensors of Σ x²): the total gradient norm.
    pub fn global_l2_norm(
        &self,
        rec: &mut Recorder,
        tensors: &[&GpuTensor],
        out: &GpuTensor,
    ) -> Result<()> {
        self.reduce_many(rec, tensors, SUMSQ, SQRT_SUM, out)
    }

    /// Multiplies every tensor in place by min(1, max_norm / (norm[0] + 1e-6)), torch's
    /// `clip_grad_norm_`, with the norm read on the GPU.
    pub fn clip_by_norm(
        &self,
        rec: &mut Recorder,
        tensors: &[&GpuTensor],
        norm: &GpuTensor,
        max_norm: f32,
    ) -> Result<()> {
        check("clip_by_norm", "norm", norm, DType::F32, 1)?;
        let k = self.kernel(&shader()?, "clip_scale", &[])?;
        let k4 = self.kernel(&shader()?, "clip_scale4_tex", &[])?;
        let k_bf16 = self.kernel(&shader()?, "clip_scale_bf16", &[])?;
        for t in tensors {
            ensure!(
                matches!(t.dtype(), DType::F32 | DType::BF16),
                "clip_by_norm: tensors must be f32 or bf16"
            );
            for c in t.chunks() {
                let n = c.rows * t.row_len();
                if t.dtype() == DType::BF16 {
                    let p = ReduceParams {
                        n: n as u32,
                        mode: 0,
                        out_index: 0,
                        max_norm,
                    };
                    rec.dispatch(
                        &k_bf16,
                        bytemuck::bytes_of(&p),
                        &[c.view(), norm.view()?],
                        groups_1d(self, n.div_ceil(2).div_ceil(256) as u32),
                    );
                    continue;
                }
                let p = |n: usize| ReduceParams {
                    n: n as u32,
                    mode: 0,
                    out_index: 0,
                    max_norm,
                };
                // In place from a staged copy, four elements per invocation (CPU adapters).
                let staged = n
                    .is_multiple_of(4)
                    .then(|| rec.stage(0, &c.view(), StageFormat::F32))
                    .flatten();
                match staged {
                    Some(x) => rec.dispatch_bound(
                        &k4,
                        bytemuck::bytes_of(&p(n / 4)),
                        &[
                            Bound::Buffer(c.view()),
                            Bound::Buffer(norm.view()?),
                            Bound::Texture(&x),
                        ],
                        groups_1d(self, (n / 4).div_ceil(256) as u32),
                    ),
                    None => rec.dispatch(
                        &k,
                        bytemuck::bytes_of(&p(n)),
                        &[c.view(), norm.view()?],
                        groups_1d(self, n.div_ceil(256) as u32),
                    ),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::testing::{rel_frobenius, test_gpu, tiny_binding_gpu, TestRng};
    use crate::reference::reduce as reference;

    fn check_gpu(gpu: &Gpu) {
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        // odd counts; and 2048 (a multiple of 4: clipped four at a time from a staged copy on
        // CPU adapters, also when split into 4 KiB chunks)
        let shapes: [&[usize]; 4] = [&[3001], &[67, 45], &[5], &[64, 32]];
        let hosts: Vec<Vec<f32>> = shapes
            .iter()
            .map(|s| rng.vec_normal(s.iter().product()))
            .collect();
        let tensors: Vec<GpuTensor> = shapes
            .iter()
            .zip(&hosts)
            .map(|(s, h)| gpu.upload_f32(s, h).unwrap())
            .collect();
        let outs: Vec<GpuTensor> = (0..3)
            .map(|_| {
                let t = gpu.empty(&[1], DType::F32).unwrap();
                gpu.poison(&t);
                t
            })
            .collect();
        let mut rec = Recorder::new(gpu);
        gpu.sum(&mut rec, &tensors[1], &outs[0]).unwrap();
        gpu.max(&mut rec, &tensors[0], &outs[1]).unwrap();
        let refs: Vec<&GpuTensor> = tensors.iter().collect();
        gpu.global_l2_norm(&mut rec, &refs, &outs[2]).unwrap();
        let max_norm = 10.0;
        gpu.clip_by_norm(&mut rec, &refs, &outs[2], max_norm)
            .unwrap();
        rec.submit();
        let host_refs: Vec<&[f32]> = hosts.iter().map(|h| &h[..]).collect();
        let norm = reference::global_l2_norm(&host_refs);
        let got = |i: usize| gpu.read_f32(&outs[i]).unwrap()[0];
        let rel = |a: f32, b: f32| ((a - b) / b).abs();
        assert!(
            rel(got(0), reference::sum(&hosts[1])) < 1e-4,
            "seed {seed}: sum {} vs {}",
            got(0),
            reference::sum(&hosts[1])
        );
        assert_eq!(got(1), reference::max(&hosts[0]), "seed {seed}: max");
        assert!(
            rel(got(2), norm) < 1e-5,
            "seed {seed}: norm {} vs {norm}",
            got(2)
        );
        let coef = reference::clip_coefficient(norm, max_norm);
        assert!(coef < 1.0, "the test must actually clip");
        for (t, h) in tensors.iter().zip(&hosts) {
            let want: Vec<f32> = h.iter().map(|v| v * coef).collect();
            let err = rel_frobenius(&gpu.read_f32(t).unwrap(), &want);
            assert!(err < 1e-5, "seed {seed}: clipped tensor rel err {err}");
        }
    }

    #[test]
    fn reductions_and_clipping_match_reference() {
        check_gpu(test_gpu());
        // the storage-buffer kernels where the default stages (what GPUs run)
        crate::gpu::staging::without_staging(|| check_gpu(test_gpu()));
    }

    #[test]
    fn reductions_over_chunked_tensors() {
        check_gpu(tiny_binding_gpu());
    }

    /// The global norm over f32 and bf16 gradients together (the LoRA pairs and the bf16
    /// modules_to_save copies), and clipping of both: a bf16 product rounds once, so it is
    /// within one bf16 ulp of the reference product (the two norms differ in the last f32 bits).
    fn check_bf16(gpu: &Gpu) {
        use crate::reference::cast::{f32_to_bf16, round_to_bf16};
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        let shapes: [&[usize]; 3] = [&[67, 45], &[3001], &[64, 32]];
        let bf16 = [true, false, true];
        let hosts: Vec<Vec<f32>> = shapes
            .iter()
            .zip(bf16)
            .map(|(s, b)| {
                let mut v = rng.vec_normal(s.iter().product());
                if b {
                    round_to_bf16(&mut v);
                }
                v
            })
            .collect();
        let tensors: Vec<GpuTensor> = shapes
            .iter()
            .zip(&hosts)
            .zip(bf16)
            .map(|((s, h), b)| {
                if b {
                    let bits: Vec<u16> = h.iter().map(|&v| f32_to_bf16(v)).collect();
                    gpu.upload_bf16(s, &bits).unwrap()
                } else {
                    gpu.upload_f32(s, h).unwrap()
                }
            })
            .collect();
        let norm_t = gpu.empty(&[1], DType::F32).unwrap();
        gpu.poison(&norm_t);
        let refs: Vec<&GpuTensor> = tensors.iter().collect();
        let mut rec = Recorder::new(gpu);
        gpu.global_l2_norm(&mut rec, &refs, &norm_t).unwrap();
        let max_norm = 10.0;
        gpu.clip_by_norm(&mut rec, &refs, &norm_t, max_norm)
            .unwrap();
        rec.submit();
        let host_refs: Vec<&[f32]> = hosts.iter().map(|h| &h[..]).collect();
        let norm = reference::global_l2_norm(&host_refs);
        let got_norm = gpu.read_f32(&norm_t).unwrap()[0];
        assert!(
            ((got_norm - norm) / norm).abs() < 1e-5,
            "seed {seed}: norm {got_norm} vs {norm}"
        );
        let coef = reference::clip_coefficient(norm, max_norm);
        assert!(coef < 1.0, "the test must actually clip");
        for ((t, h), b) in tensors.iter().zip(&hosts).zip(bf16) {
            let got = gpu.read_f32(t).unwrap();
            for (i, (&g, &x)) in got.iter().zip(h).enumerate() {
                let mut want = x * coef;
                if b {
                    want = f32::from_bits((f32_to_bf16(want) as u32) << 16);
                }
                let tol = if b {
                    want.abs() / 128.0
                } else {
                    want.abs() * 1e-5
                };
                assert!(
                    (g - want).abs() <= tol + f32::MIN_POSITIVE,
                    "seed {seed}: element {i}: {g} vs {want}"
                );
            }
        }
    }

    #[test]
    fn bf16_gradients_norm_and_clip() {
        check_bf16(test_gpu());
        check_bf16(tiny_binding_gpu());
    }
}
