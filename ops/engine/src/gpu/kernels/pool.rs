//! 2-D average pooling of the Gemma 3 projector (`shaders/pool.wgsl`), forward and backward.
//! Reference and layout: [`crate::reference::pool`].

use anyhow::{ensure, Result};
use bytemuck::{Pod, Zeroable};

use crate::gpu::{groups_1d, DType, Gpu, GpuTensor, Recorder, Shader};
use crate::shapes::PoolDims;

fn shader() -> Result<Shader> {
    Shader::compose("pool", &[])
}

/// Every module and entry point this family dispatches (validated by `gpu::shader`'s tests).
pub(crate) fn variants() -> Result<Vec<super::Variant>> {
    Ok(vec![(
        shader()?,
        vec!["avg_pool_forward", "avg_pool_backward"],
    )])
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    batch: u32,
    side: u32,
    channels: u32,
    kernel: u32,
    out_side: u32,
    inv_area: f32,
    _pad: [u32; 2],
}

fn params(dims: &PoolDims) -> Result<Params> {
    let out_side = dims.out_side()?;
    ensure!(
        dims.input_len() < u32::MAX as usize,
        "avg pool: {dims:?} is too large for 32-bit indexing"
    );
    Ok(Params {
        batch: dims.batch as u32,
        side: dims.side()? as u32,
        channels: dims.channels as u32,
        kernel: dims.kernel as u32,
        out_side: out_side as u32,
        inv_area: 1.0 / (dims.kernel * dims.kernel) as f32,
        _pad: [0; 2],
    })
}

fn check(name: &str, t: &GpuTensor, numel: usize) -> Result<()> {
    ensure!(
        t.dtype() == DType::F32,
        "avg pool: {name} must be f32, got {:?}",
        t.dtype()
    );
    ensure!(
        t.numel() == numel,
        "avg pool: {name} has {} elements ({:?}), expected {numel}",
        t.numel(),
        t.shape()
    );
    Ok(())
}

impl Gpu {
    /// Records `output [batch, (side/k)^2, channels] = avg_pool(input [batch, side^2, channels])`.
    pub fn avg_pool2d_forward(
        &self,
        rec: &mut Recorder,
        input: &GpuTensor,
        dims: &PoolDims,
        output: &GpuTensor,
    ) -> Result<()> {
        let p = params(dims)?;
        check("input", input, dims.input_len())?;
        check("output", output, dims.output_len()?)?;
        let kernel = self.kernel(&shader()?, "avg_pool_forward", &[])?;
        let n = dims.output_len()? as u32;
        rec.dispatch(
            &kernel,
            bytemuck::bytes_of(&p),
            &[input.view()?, output.view()?],
            groups_1d(self, n.div_ceil(64)),
        );
        Ok(())
    }

    /// Records `d_input [batch, side^2, channels]` (overwritten) from `d_output`.
    pub fn avg_pool2d_backward(
        &self,
        rec: &mut Recorder,
        d_output: &GpuTensor,
        dims: &PoolDims,
        d_input: &GpuTensor,
    ) -> Result<()> {
        let p = params(dims)?;
        check("d_output", d_output, dims.output_len()?)?;
        check("d_input", d_input, dims.input_len())?;
        let kernel = self.kernel(&shader()?, "avg_pool_backward", &[])?;
        let n = dims.input_len() as u32;
        rec.dispatch(
            &kernel,
            bytemuck::bytes_of(&p),
            &[d_output.view()?, d_input.view()?],
            groups_1d(self, n.div_ceil(64)),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::testing::{rel_frobenius, test_gpu, TestRng};
    use crate::reference::pool::{avg_pool2d_backward, avg_pool2d_forward};

    #[test]
    fn forward_and_backward_match_the_reference() {
        let gpu = test_gpu();
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        // exact grids and grids with a dropped remainder; channel counts not multiples of 4 or 64
        for dims in [
            PoolDims {
                batch: 2,
                patches: 64,
                channels: 37,
                kernel: 4,
            },
            PoolDims {
                batch: 3,
                patches: 121,
                channels: 5,
                kernel: 3,
            },
        ] {
            let x = rng.vec_uniform(dims.input_len(), -1.0, 1.0);
            let gy = rng.vec_uniform(dims.output_len().unwrap(), -1.0, 1.0);
            let xg = gpu.upload_f32(&[dims.input_len()], &x).unwrap();
            let gyg = gpu.upload_f32(&[gy.len()], &gy).unwrap();
            let y = gpu.empty(&[gy.len()], DType::F32).unwrap();
            let gx = gpu.empty(&[x.len()], DType::F32).unwrap();
            gpu.poison(&y);
            gpu.poison(&gx);
            let mut rec = Recorder::new(gpu);
            gpu.avg_pool2d_forward(&mut rec, &xg, &dims, &y).unwrap();
            gpu.avg_pool2d_backward(&mut rec, &gyg, &dims, &gx).unwrap();
            rec.submit();
            let err_y = rel_frobenius(
                &gpu.read_f32(&y).unwrap(),
                &avg_pool2d_forward(&x, &dims).unwrap(),
            );
            let err_gx = rel_frobenius(
                &gpu.read_f32(&gx).unwrap(),
                &avg_pool2d_backward(&gy, &dims).unwrap(),
            );
            assert!(
                err_y < 1e-6 && err_gx < 1e-6,
                "seed {seed}: {dims:?}: forward {err_y}, backward {err_gx}"
            );
        }
    }
}
