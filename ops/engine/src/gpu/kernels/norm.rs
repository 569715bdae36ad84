//! Gemma RMSNorm and LayerNorm over the last dimension, forward and backward (f32).

use anyhow::Result;
use bytemuck::{Pod, Zeroable};

use super::{check, rows_cols};
use crate::gpu::{groups_1d, DType, Gpu, GpuTensor, Recorder, Shader};

fn shader() -> Result<Shader> {
    Shader::compose("norm", &[])
}

/// Every module and entry point this family dispatches (validated by `gpu::shader`'s tests).
pub(crate) fn variants() -> Result<Vec<super::Variant>> {
    Ok(vec![(
        shader()?,
        vec![
            "rmsnorm_forward",
            "rmsnorm_backward_dx",
            "rmsnorm_backward_dw",
            "layernorm_forward",
            "layernorm_backward_dx",
            "layernorm_backward_dw",
        ],
    )])
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct NormParams {
    rows: u32,
    cols: u32,
    eps: f32,
    accumulate: u32,
}

impl Gpu {
    /// Gemma RMSNorm `y = x·rsqrt(mean(x²)+eps)·(1+w)`. x, y: [..., cols]; w: [cols];
    /// rstd: [rows] (saved for backward).
    pub fn rmsnorm_forward(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        w: &GpuTensor,
        y: &GpuTensor,
        rstd: &GpuTensor,
        eps: f32,
    ) -> Result<()> {
        let (rows, cols) = rows_cols(x);
        check("rmsnorm_forward", "x", x, DType::F32, rows * cols)?;
        check("rmsnorm_forward", "w", w, DType::F32, cols)?;
        check("rmsnorm_forward", "y", y, DType::F32, rows * cols)?;
        check("rmsnorm_forward", "rstd", rstd, DType::F32, rows)?;
        let p = NormParams {
            rows: rows as u32,
            cols: cols as u32,
            eps,
            accumulate: 0,
        };
        let k = self.kernel(&shader()?, "rmsnorm_forward", &[])?;
        rec.dispatch(
            &k,
            bytemuck::bytes_of(&p),
            &[x.view()?, w.view()?, y.view()?, rstd.view()?],
            groups_1d(self, rows as u32),
        );
        Ok(())
    }

    /// Backward of [`Gpu::rmsnorm_forward`]: `dx` (overwritten) and/or `dw` (overwritten, or
    /// added to with `accumulate_dw`).
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_backward(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        w: &GpuTensor,
        dy: &GpuTensor,
        rstd: &GpuTensor,
        dx: Option<&GpuTensor>,
        dw: Option<&GpuTensor>,
        accumulate_dw: bool,
    ) -> Result<()> {
        let (rows, cols) = rows_cols(x);
        check("rmsnorm_backward", "dy", dy, DType::F32, rows * cols)?;
        check("rmsnorm_backward", "w", w, DType::F32, cols)?;
        check("rmsnorm_backward", "rstd", rstd, DType::F32, rows)?;
        let p = NormParams {
            rows: rows as u32,
            cols: cols as u32,
            eps: 0.0,
            accumulate: accumulate_dw as u32,
        };
        if let Some(dx) = dx {
            check("rmsnorm_backward", "dx", dx, DType::F32, rows * cols)?;
            let k = self.kernel(&shader()?, "rmsnorm_backward_dx", &[])?;
            rec.dispatch(
                &k,
                bytemuck::bytes_of(&p),
                &[x.view()?, w.view()?, dy.view()?, rstd.view()?, dx.view()?],
                groups_1d(self, rows as u32),
            );
        }
        if let Some(dw) = dw {
            check("rmsnorm_backward", "dw", dw, DType::F32, cols)?;
            let k = self.kernel(&shader()?, "rmsnorm_backward_dw", &[])?;
            rec.dispatch(
                &k,
                bytemuck::bytes_of(&p),
                &[x.view()?, dy.view()?, rstd.view()?, dw.view()?],
                groups_1d(self, cols.div_ceil(64) as u32),
            );
        }
        Ok(())
    }

    /// LayerNorm `y = (x−mean)·rsqrt(var+eps)·w + b`; stats: [rows, 2] = (mean, rstd).
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_forward(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        w: &GpuTensor,
        b: &GpuTensor,
        y: &GpuTensor,
        stats: &GpuTensor,
        eps: f32,
    ) -> Result<()> {
        let (rows, cols) = rows_cols(x);
        check("layernorm_forward", "x", x, DType::F32, rows * cols)?;
        check("layernorm_forward", "w", w, DType::F32, cols)?;
        check("layernorm_forward", "b", b, DType::F32, cols)?;
        check("layernorm_forward", "y", y, DType::F32, rows * cols)?;
        check("layernorm_forward", "stats", stats, DType::F32, rows * 2)?;
        let p = NormParams {
            rows: rows as u32,
            cols: cols as u32,
            eps,
            accumulate: 0,
        };
        let k = self.kernel(&shader()?, "layernorm_forward", &[])?;
        rec.dispatch(
            &k,
            bytemuck::bytes_of(&p),
            &[x.view()?, w.view()?, y.view()?, stats.view()?, b.view()?],
            groups_1d(self, rows as u32),
        );
        Ok(())
    }

    /// Backward of [`Gpu::layernorm_forward`]: `dx` and/or (`dw`, `db`).
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_backward(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        w: &GpuTensor,
        dy: &GpuTensor,
        stats: &GpuTensor,
        dx: Option<&GpuTensor>,
        dw_db: Option<(&GpuTensor, &GpuTensor)>,
        accumulate: bool,
    ) -> Result<()> {
        let (rows, cols) = rows_cols(x);
        check("layernorm_backward", "dy", dy, DType::F32, rows * cols)?;
        check("layernorm_backward", "w", w, DType::F32, cols)?;
        check("layernorm_backward", "stats", stats, DType::F32, rows * 2)?;
        let p = NormParams {
            rows: rows as u32,
            cols: cols as u32,
            eps: 0.0,
            accumulate: accumulate as u32,
        };
        if let Some(dx) = dx {
            check("layernorm_backward", "dx", dx, DType::F32, rows * cols)?;
            let k = self.kernel(&shader()?, "layernorm_backward_dx", &[])?;
            rec.dispatch(
                &k,
                bytemuck::bytes_of(&p),
                &[x.view()?, w.view()?, dy.view()?, stats.view()?, dx.view()?],
                groups_1d(self, rows as u32),
            );
        }
        if let Some((dw, db)) = dw_db {
            check("layernorm_backward", "dw", dw, DType::F32, cols)?;
            check("layernorm_backward", "db", db, DType::F32, cols)?;
            let k = self.kernel(&shader()?, "layernorm_backward_dw", &[])?;
            rec.dispatch(
                &k,
                bytemuck::bytes_of(&p),
                &[x.view()?, dy.view()?, stats.view()?, dw.view()?, db.view()?],
                groups_1d(self, cols.div_ceil(64) as u32),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::testing::{rel_frobenius, test_gpu, TestRng};
    use crate::reference::norm as reference;

    fn poisoned(gpu: &Gpu, shape: &[usize]) -> GpuTensor {
        let t = gpu.empty(shape, DType::F32).unwrap();
        gpu.poison(&t);
        t
    }

    #[test]
    fn rmsnorm_forward_backward_match_reference() {
        let gpu = test_gpu();
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        for &(rows, cols) in &[(7usize, 37usize), (3, 130), (1, 5)] {
            let x = rng.vec_normal(rows * cols);
            let w: Vec<f32> = rng.vec_normal(cols).iter().map(|v| v * 0.3).collect();
            let dy = rng.vec_normal(rows * cols);
            let dw0 = rng.vec_normal(cols);
            let eps = 1e-6;
            let (gx, gw, gdy) = (
                gpu.upload_f32(&[rows, cols], &x).unwrap(),
                gpu.upload_f32(&[cols], &w).unwrap(),
                gpu.upload_f32(&[rows, cols], &dy).unwrap(),
            );
            let (y, rstd, dx) = (
                poisoned(gpu, &[rows, cols]),
                poisoned(gpu, &[rows]),
                poisoned(gpu, &[rows, cols]),
            );
            let dw = gpu.upload_f32(&[cols], &dw0).unwrap();
            let mut rec = Recorder::new(gpu);
            gpu.rmsnorm_forward(&mut rec, &gx, &gw, &y, &rstd, eps)
                .unwrap();
            gpu.rmsnorm_backward(&mut rec, &gx, &gw, &gdy, &rstd, Some(&dx), Some(&dw), true)
                .unwrap();
            rec.submit();
            let (want_y, want_rstd) = reference::rmsnorm_forward(&x, &w, rows, cols, eps);
            let (want_dx, want_dw) = reference::rmsnorm_backward(&x, &w, &dy, rows, cols, eps);
            let want_dw_acc: Vec<f32> = want_dw.iter().zip(&dw0).map(|(a, b)| a + b).collect();
            for (name, got, want) in [
                ("y", gpu.read_f32(&y).unwrap(), want_y),
                ("rstd", gpu.read_f32(&rstd).unwrap(), want_rstd),
                ("dx", gpu.read_f32(&dx).unwrap(), want_dx),
                ("dw", gpu.read_f32(&dw).unwrap(), want_dw_acc),
            ] {
                let err = rel_frobenius(&got, &want);
                assert!(
                    err < 1e-5,
                    "seed {seed}: rmsnorm {rows}x{cols} {name}: rel err {err}"
                );
            }
        }
    }

    #[test]
    fn layernorm_forward_backward_match_reference() {
        let gpu = test_gpu();
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        for &(rows, cols) in &[(9usize, 45usize), (2, 131)] {
            let x: Vec<f32> = rng
                .vec_normal(rows * cols)
                .iter()
                .map(|v| v * 2.0 + 0.5)
                .collect();
            let w = rng.vec_normal(cols);
            let b = rng.vec_normal(cols);
            let dy = rng.vec_normal(rows * cols);
            let eps = 1e-6;
            let g = |s: &[usize], d: &[f32]| gpu.upload_f32(s, d).unwrap();
            let (gx, gw, gb, gdy) = (
                g(&[rows, cols], &x),
                g(&[cols], &w),
                g(&[cols], &b),
                g(&[rows, cols], &dy),
            );
            let (y, stats, dx) = (
                poisoned(gpu, &[rows, cols]),
                poisoned(gpu, &[rows, 2]),
                poisoned(gpu, &[rows, cols]),
            );
            let (dw, db) = (poisoned(gpu, &[cols]), poisoned(gpu, &[cols]));
            let mut rec = Recorder::new(gpu);
            gpu.layernorm_forward(&mut rec, &gx, &gw, &gb, &y, &stats, eps)
                .unwrap();
            gpu.layernorm_backward(
                &mut rec,
                &gx,
                &gw,
                &gdy,
                &stats,
                Some(&dx),
                Some((&dw, &db)),
                false,
            )
            .unwrap();
            rec.submit();
            let (want_y, _, _) = reference::layernorm_forward(&x, &w, &b, rows, cols, eps);
            let (want_dx, want_dw, want_db) =
                reference::layernorm_backward(&x, &w, &dy, rows, cols, eps);
            for (name, got, want) in [
                ("y", gpu.read_f32(&y).unwrap(), want_y),
                ("dx", gpu.read_f32(&dx).unwrap(), want_dx),
                ("dw", gpu.read_f32(&dw).unwrap(), want_dw),
                ("db", gpu.read_f32(&db).unwrap(), want_db),
            ] {
                let err = rel_frobenius(&got, &want);
                assert!(
                    err < 1e-5,
                    "seed {seed}: layernorm {rows}x{cols} {name}: rel err {err}"
                );
            }
        }
    }
}
