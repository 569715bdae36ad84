//! Gemma RMSNorm and LayerNorm over the last dimension, forward and backward (f32).

use anyhow::Result;
use bytemuck::{Pod, Zeroable};

use super::{check, rows_cols};
use crate::gpu::{groups_1d, DType, Gpu, GpuTensor, Recorder, Shader};

fn shader() -> Result<Shader> {
    Shader::compose("norm", &[])
}

/// The forward kernels for CPU adapters: one subgroup per row.
fn rows_shader() -> Result<Shader> {
    Shader::compose("norm", &["SUBGROUP_ROWS"])
}

/// Rows normalized per workgroup by the `_rows` kernels (norm.wgsl's ROW_SUBGROUPS).
const ROW_SUBGROUPS: usize = 8;

impl Gpu {
    /// The `_rows` forward kernel for `entry` and its workgroup count, where it runs: adapters
    /// that stage operands (CPU adapters with one subgroup width, where a workgroup of 64 with
    /// seven barriers per row costs more than the row) and rows of whole texels. Elsewhere
    /// `None`: the workgroup-per-row kernel, tested on GPUs.
    fn norm_rows_kernel(
        &self,
        entry: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Option<(std::sync::Arc<crate::gpu::Kernel>, [u32; 3])>> {
        let lanes = crate::gpu::kernels::matmul::subgroup_width(self);
        let Some(lanes) = lanes.filter(|_| self.stages_operands() && cols.is_multiple_of(4)) else {
            return Ok(None);
        };
        let k = self.kernel(&rows_shader()?, entry, &[("LANES", lanes as f64)])?;
        Ok(Some((
            k,
            groups_1d(self, rows.div_ceil(ROW_SUBGROUPS) as u32),
        )))
    }
}

/// Every module and entry point this family dispatches (validated by `gpu::shader`'s tests).
pub(crate) fn variants() -> Result<Vec<super::Variant>> {
    Ok(vec![
        (
            rows_shader()?,
            vec!["rmsnorm_forward_rows", "layernorm_forward_rows"],
        ),
        (
            shader()?,
            vec![
                "rmsnorm_forward",
                "rmsnorm_residual_rmsnorm",
                "rmsnorm_backward_dx",
                "rmsnorm_backward_dw",
                "layernorm_forward",
                "layernorm_backward_dx",
                "layernorm_backward_dw",
            ],
        ),
    ])
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
        let bindings = [x.view()?, w.view()?, y.view()?, rstd.view()?];
        if let Some((k, groups)) = self.norm_rows_kernel("rmsnorm_forward_rows", rows, cols)? {
            rec.dispatch(&k, bytemuck::bytes_of(&p), &bindings, groups);
            return Ok(());
        }
        let k = self.kernel(&shader()?, "rmsnorm_forward", &[])?;
        rec.dispatch(
            &k,
            bytemuck::bytes_of(&p),
            &bindings,
            groups_1d(self, rows as u32),
        );
        Ok(())
    }

    /// A Gemma decoder sublayer's end and the next one's start in one dispatch (decoding):
    /// `h = residual + rmsnorm(x; w_post)` and `y = rmsnorm(h; w_pre)`, the same bits as
    /// [`Gpu::rmsnorm_forward`], the add and [`Gpu::rmsnorm_forward`] again (rmsnorm_forward's
    /// workgroup-per-row kernel, which GPUs run; CPU adapters sum its rows in another order). x, residual, h, y:
    /// [..., cols]; w_post, w_pre: [cols]. No rstd is kept (no backward follows).
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_residual_rmsnorm(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        residual: &GpuTensor,
        w_post: &GpuTensor,
        w_pre: &GpuTensor,
        h: &GpuTensor,
        y: &GpuTensor,
        eps: f32,
    ) -> Result<()> {
        let name = "rmsnorm_residual_rmsnorm";
        let (rows, cols) = rows_cols(x);
        check(name, "x", x, DType::F32, rows * cols)?;
        check(name, "residual", residual, DType::F32, rows * cols)?;
        check(name, "w_post", w_post, DType::F32, cols)?;
        check(name, "w_pre", w_pre, DType::F32, cols)?;
        check(name, "h", h, DType::F32, rows * cols)?;
        check(name, "y", y, DType::F32, rows * cols)?;
        let p = NormParams {
            rows: rows as u32,
            cols: cols as u32,
            eps,
            accumulate: 0,
        };
        let k = self.kernel(&shader()?, name, &[])?;
        rec.dispatch(
            &k,
            bytemuck::bytes_of(&p),
            &[
                x.view()?,
                residual.view()?,
                w_post.view()?,
                w_pre.view()?,
                h.view()?,
                y.view()?,
            ],
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
        let bindings = [x.view()?, w.view()?, y.view()?, stats.view()?, b.view()?];
        if let Some((k, groups)) = self.norm_rows_kernel("layernorm_forward_rows", rows, cols)? {
            rec.dispatch(&k, bytemuck::bytes_of(&p), &bindings, groups);
            return Ok(());
        }
        let k = self.kernel(&shader()?, "layernorm_forward", &[])?;
        rec.dispatch(
            &k,
            bytemuck::bytes_of(&p),
            &bindings,
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

    /// The fused decode kernel against the reference (fresh random inputs, poisoned outputs,
    /// odd sizes, a row wider than the workgroup), and bit for bit against the three dispatches
    /// it replaces (rmsnorm_forward, the residual add, rmsnorm_forward).
    /// Bit for bit against `rmsnorm_forward`'s workgroup-per-row kernel, which GPUs run: CPU
    /// adapters run its `_rows` kernel, whose sums are in another order.
    #[test]
    fn rmsnorm_residual_rmsnorm_matches_reference_and_the_unfused_kernels() {
        crate::gpu::staging::without_staging(compare_with_unfused);
    }

    fn compare_with_unfused() {
        let gpu = test_gpu();
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        for &(rows, cols) in &[(1usize, 640usize), (3, 37), (2, 130), (1, 5)] {
            let x: Vec<f32> = rng
                .vec_normal(rows * cols)
                .iter()
                .map(|v| v * 4.0)
                .collect();
            let res = rng.vec_normal(rows * cols);
            let w_post: Vec<f32> = rng.vec_normal(cols).iter().map(|v| v * 0.3).collect();
            let w_pre: Vec<f32> = rng.vec_normal(cols).iter().map(|v| v * 0.3).collect();
            let eps = 1e-6;
            let up = |v: &[f32], shape: &[usize]| gpu.upload_f32(shape, v).unwrap();
            let (gx, gres) = (up(&x, &[rows, cols]), up(&res, &[rows, cols]));
            let (gw_post, gw_pre) = (up(&w_post, &[cols]), up(&w_pre, &[cols]));
            let (h, y) = (poisoned(gpu, &[rows, cols]), poisoned(gpu, &[rows, cols]));
            let mut rec = Recorder::new(gpu);
            gpu.rmsnorm_residual_rmsnorm(&mut rec, &gx, &gres, &gw_post, &gw_pre, &h, &y, eps)
                .unwrap();
            // the unfused path: n = rmsnorm(x), n += residual (the decoder's add), rmsnorm(n)
            let (n, rstd) = (poisoned(gpu, &[rows, cols]), poisoned(gpu, &[rows]));
            let (y2, rstd2) = (poisoned(gpu, &[rows, cols]), poisoned(gpu, &[rows]));
            gpu.rmsnorm_forward(&mut rec, &gx, &gw_post, &n, &rstd, eps)
                .unwrap();
            gpu.dropout(&mut rec, &gres, &n, 0.0, 0, 0, 1.0).unwrap();
            gpu.rmsnorm_forward(&mut rec, &n, &gw_pre, &y2, &rstd2, eps)
                .unwrap();
            rec.submit();
            let (got_h, got_y) = (gpu.read_f32(&h).unwrap(), gpu.read_f32(&y).unwrap());
            let (want_h, want_y) =
                reference::rmsnorm_residual_rmsnorm(&x, &res, &w_post, &w_pre, rows, cols, eps);
            let (eh, ey) = (
                rel_frobenius(&got_h, &want_h),
                rel_frobenius(&got_y, &want_y),
            );
            assert!(
                eh < 1e-6 && ey < 1e-6,
                "seed {seed}: {rows}x{cols}: h {eh}, y {ey}"
            );
            let bits = |v: Vec<f32>| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(got_h),
                bits(gpu.read_f32(&n).unwrap()),
                "seed {seed}: h"
            );
            assert_eq!(
                bits(got_y),
                bits(gpu.read_f32(&y2).unwrap()),
                "seed {seed}: y"
            );
        }
    }

    /// Odd sizes read scalars (the workgroup-per-row kernels everywhere); rows of whole texels
    /// run the `_rows` kernels where the adapter stages operands (lavapipe), with row counts that
    /// leave a workgroup's last subgroups idle; `without_staging` runs the GPUs' kernels on them.
    const NORM_SHAPES: [(usize, usize); 5] = [(7, 37), (3, 130), (1, 5), (11, 640), (9, 256)];

    #[test]
    fn rmsnorm_forward_backward_match_reference() {
        check_rmsnorm();
        crate::gpu::staging::without_staging(check_rmsnorm);
    }

    #[test]
    fn layernorm_forward_backward_match_reference() {
        check_layernorm();
        crate::gpu::staging::without_staging(check_layernorm);
    }

    fn check_rmsnorm() {
        let gpu = test_gpu();
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        for &(rows, cols) in &NORM_SHAPES {
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

    fn check_layernorm() {
        let gpu = test_gpu();
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        for &(rows, cols) in NORM_SHAPES.iter().chain(&[(9, 45), (2, 131)]) {
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
            let (want_y, mean, rstd) = reference::layernorm_forward(&x, &w, &b, rows, cols, eps);
            let want_stats: Vec<f32> = mean.iter().zip(&rstd).flat_map(|(&m, &r)| [m, r]).collect();
            let (want_dx, want_dw, want_db) =
                reference::layernorm_backward(&x, &w, &dy, rows, cols, eps);
            for (name, got, want) in [
                ("y", gpu.read_f32(&y).unwrap(), want_y),
                ("stats", gpu.read_f32(&stats).unwrap(), want_stats),
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
