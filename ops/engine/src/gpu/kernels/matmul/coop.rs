//! The cooperative-matrix matmul: which configuration a product runs on, its dispatch, and the
//! check against the reference that must pass on an adapter and driver before it is selected.

use anyhow::{ensure, Result};

use super::codegen::{coop_kernel, CoopConfig, COOP_TILES};
use super::{Gemm, MatmulOpts, MatmulPrecision, Operands};
use crate::gpu::{BufView, Gpu, Recorder, Shader};

/// The matmul module with the cooperative-matrix kernel for `cfg` appended (f16 operands with
/// an f16 configuration), for workgroups of `lanes`.
pub(super) fn coop_shader(operands: Operands, cfg: CoopConfig, lanes: u32) -> Result<Shader> {
    let mut features = Operands {
        f16: cfg.f16,
        ..operands
    }
    .features();
    features.push("COOP");
    Shader::generated(
        "matmul",
        &features,
        &("coop", cfg.size, cfg.f16, lanes),
        || coop_kernel(cfg, lanes),
    )
}

/// One configuration's check for [`Gpu::verify_coop_matmul`] (the coop kernel is forced while it
/// runs): the largest relative Frobenius error over the cases, each within its bound (f32:
/// 1e-5; f16 operands: 2.4e-3, the bound the f16 test derives).
fn coop_check(gpu: &Gpu, cfg: CoopConfig) -> Result<f64> {
    use crate::gpu::testing::{rel_frobenius, TestRng};
    use crate::reference::matmul as reference;
    let bound = if cfg.f16 { 2.4e-3 } else { 1e-5 };
    let precision = if cfg.f16 {
        MatmulPrecision::F16
    } else {
        MatmulPrecision::F32
    };
    let mut rng = TestRng::new(TestRng::fresh_seed());
    let mut worst = 0.0f64;
    for &(m, n, k, trans_a, trans_b, beta, nf4) in &[
        (37, 29, 23, false, true, 0.0, false),
        (64, 48, 40, false, false, 0.7, false),
        (70, 45, 33, true, false, 0.0, false),
        (40, 36, 64, false, true, 1.0, true),
    ] {
        let a_dims = if trans_a { [k, m] } else { [m, k] };
        let b_dims = if trans_b { [n, k] } else { [k, n] };
        let a = rng.vec_normal(m * k);
        let mut b = rng.vec_normal(n * k);
        let c0 = rng.vec_normal(m * n);
        let bias = rng.vec_normal(n);
        let ga = gpu.upload_f32(&a_dims, &a)?;
        let gc = gpu.upload_f32(&[m, n], &c0)?;
        let gbias = gpu.upload_f32(&[n], &bias)?;
        let opts = MatmulOpts {
            trans_a,
            trans_b,
            beta,
            bias: Some(&gbias),
            precision,
            ..Default::default()
        };
        let mut rec = Recorder::new(gpu);
        if nf4 {
            let (packed, absmax) = crate::reference::nf4::quantize_nf4(&b, 64);
            b = crate::reference::nf4::dequantize_nf4(&packed, &absmax, n * k, 64);
            let w = gpu.upload_nf4(&packed, &absmax, b_dims, 64)?;
            gpu.matmul_nf4(&mut rec, &ga, &w, &gc, opts)?;
        } else {
            let gb = gpu.upload_f32(&b_dims, &b)?;
            gpu.matmul(&mut rec, &ga, &gb, &gc, opts)?;
        }
        rec.submit_and_wait()?;
        let mut want = c0.clone();
        let g = reference::Gemm {
            trans_a,
            trans_b,
            alpha: 1.0,
            beta,
        };
        reference::matmul_batched(&a, &b, &mut want, 1, m, n, k, g, Some(&bias));
        let err = rel_frobenius(&gpu.read_f32(&gc)?, &want);
        ensure!(
            err <= bound,
            "{cfg}: {m}x{n}x{k} (A{} B{}{}) is {err:.2e} from the reference (bound {bound:.0e})",
            if trans_a { "ᵀ" } else { "" },
            if trans_b { "ᵀ" } else { "" },
            if nf4 { ", NF4" } else { "" }
        );
        worst = worst.max(err);
    }
    Ok(worst)
}

impl Gpu {
    /// The cooperative-matrix configuration this product runs on, if any: one the adapter
    /// offers for its precision (8×8 f32 for f32 operands, 16×16 f16 for
    /// `matmul_precision = "f16"`), on an adapter with one subgroup width, and checked against
    /// the reference on this adapter and driver ([`Gpu::verify_coop_matmul`]) — or the one
    /// being checked.
    pub(super) fn coop_for(&self, g: &Gemm) -> Option<CoopConfig> {
        if let Some(trial) = *self.coop_trial.lock().unwrap() {
            return Some(trial);
        }
        if self.coop_configs.is_empty() {
            return None;
        }
        let tuner = self.tuner.lock().unwrap();
        self.coop_configs
            .iter()
            .copied()
            .find(|c| c.f16 == g.f16 && tuner.table.coop_verified.contains(&c.to_string()))
    }

    /// Records `g` on the cooperative-matrix kernel of `cfg`.
    pub(super) fn record_coop(
        &self,
        rec: &mut Recorder,
        g: Gemm,
        nf4: Option<(BufView, usize)>,
        operands: Operands,
        constants: Vec<(&'static str, f64)>,
        cfg: CoopConfig,
    ) -> Result<()> {
        let lanes = self.adapter_info().subgroup_max_size;
        let kernel = self.kernel(
            &coop_shader(operands, cfg, lanes)?,
            "matmul_coop",
            &constants,
        )?;
        let block = COOP_TILES * cfg.size;
        let p = &g.params;
        let groups = [p.n.div_ceil(block), p.m.div_ceil(block), g.batch];
        let bias = g.bias.clone().unwrap_or_else(|| self.dummy_buffer());
        let mut buffers = vec![g.a, g.b, g.c, bias];
        if let Some((absmax, _)) = nf4 {
            buffers.push(absmax);
        }
        rec.dispatch(&kernel, bytemuck::bytes_of(p), &buffers, groups);
        Ok(())
    }

    /// The cooperative-matrix configurations this adapter offers that the coop kernel has.
    pub fn coop_configs(&self) -> &[CoopConfig] {
        &self.coop_configs
    }

    /// Checks every cooperative-matrix configuration of this adapter against the CPU reference
    /// (odd and aligned shapes, transposes, bias and beta, an NF4 weight) and records those that
    /// pass in this adapter's tuning file, which is what selects them: a kernel no run has
    /// checked on a driver is never used there. Returns each configuration's largest relative
    /// error, or why it failed. (`runner gpu --tune` runs this first; tools/gpu-check.sh runs
    /// that.)
    pub fn verify_coop_matmul(&self) -> Vec<(CoopConfig, Result<f64>)> {
        let mut results = Vec::new();
        for &cfg in &self.coop_configs {
            *self.coop_trial.lock().unwrap() = Some(cfg);
            let checked =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| coop_check(self, cfg)))
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("the check panicked")));
            *self.coop_trial.lock().unwrap() = None;
            if checked.is_ok() {
                let mut tuner = self.tuner.lock().unwrap();
                tuner.table.coop_verified.insert(cfg.to_string());
                if let Some(file) = tuner.file.clone() {
                    if let Err(e) = tuner.table.save(&file) {
                        eprintln!("warning: {e:#}");
                    }
                }
            }
            results.push((cfg, checked));
        }
        results
    }
}
