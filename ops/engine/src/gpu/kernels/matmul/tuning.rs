//! Choosing a product's tiling: forced by a benchmark or test, tuned on this adapter
//! ([`crate::gpu::tune`]), tuned now, or the path's default; and the timing that tunes it.

use anyhow::{ensure, Result};

use super::codegen::{register_tile, subgroup_tile};
use super::{Gemm, GemmParams, Operands};
use crate::gpu::tune::{candidates, KernelPath, MatmulTiling, ShapeClass, TuneShape, TunedEntry};
use crate::gpu::{BufView, Gpu, Recorder};

/// The tiling a benchmark's env (`RUNNER_MATMUL_SG_TILE`, `RUNNER_MATMUL_TILE`) or a test
/// forces on `path`, if any.
pub(super) fn forced_tiling(path: KernelPath) -> Option<MatmulTiling> {
    #[cfg(test)]
    if let Some(t) = super::tests::FORCED_TILING.with(|f| f.get()) {
        return (t.path() == path).then_some(t);
    }
    match path {
        KernelPath::Subgroup => std::env::var_os("RUNNER_MATMUL_SG_TILE").map(|_| {
            let (tm, tn) = subgroup_tile();
            MatmulTiling::Subgroup { tm, tn }
        }),
        KernelPath::Register => std::env::var_os("RUNNER_MATMUL_TILE").map(|_| {
            let (tm, tn) = register_tile();
            MatmulTiling::Register { tm, tn }
        }),
        KernelPath::Workgroup => None,
    }
}

/// The tiling of `path` where nothing was tuned: the measured defaults (README, Performance).
pub(super) fn default_tiling(path: KernelPath) -> MatmulTiling {
    match path {
        KernelPath::Subgroup => {
            let (tm, tn) = subgroup_tile();
            MatmulTiling::Subgroup { tm, tn }
        }
        KernelPath::Register => {
            let (tm, tn) = register_tile();
            MatmulTiling::Register { tm, tn }
        }
        KernelPath::Workgroup => candidates(KernelPath::Workgroup)[0],
    }
}

impl Gpu {
    /// The tiling of this product: forced (a benchmark's env, a test), tuned for its shape
    /// class on this adapter, tuned now (autotuning on), or the path's default.
    pub(super) fn matmul_tiling(
        &self,
        g: &Gemm,
        operands: Operands,
        nf4: Option<&(BufView, usize)>,
        path: KernelPath,
    ) -> Result<MatmulTiling> {
        if let Some(t) = forced_tiling(path) {
            return Ok(t);
        }
        let p = &g.params;
        let class = ShapeClass::new(p.m, p.n, p.k, g.trans_a, g.trans_b, &operands.features());
        {
            let tuner = self.tuner.lock().unwrap();
            if let Some(t) = tuner.table.get(&class, path) {
                return Ok(t);
            }
            if !tuner.auto {
                return Ok(default_tiling(path));
            }
        }
        let times = self.time_tilings(g, operands, nf4, path)?;
        Ok(self.keep_tuned(&class, times))
    }

    /// Records `times` for `class` in this adapter's table and saves it (a file that cannot
    /// be written only warns: tuning changes speed, never results).
    pub(crate) fn keep_tuned(
        &self,
        class: &ShapeClass,
        times: Vec<(MatmulTiling, f64)>,
    ) -> MatmulTiling {
        let mut tuner = self.tuner.lock().unwrap();
        let info = self.adapter_info();
        tuner.table.adapter = info.name.clone();
        tuner.table.driver = format!("{} {}", info.driver, info.driver_info);
        let best = tuner.table.insert(class, times);
        if let Some(file) = tuner.file.clone() {
            if let Err(e) = tuner.table.save(&file) {
                eprintln!("warning: {e:#}");
            }
        }
        best
    }

    /// Median seconds of every candidate tiling of `path` on a product shaped like `g`, over
    /// scratch operands of its sizes (outside the pool, zero-filled: values do not change the
    /// work).
    pub(crate) fn time_tilings(
        &self,
        g: &Gemm,
        operands: Operands,
        nf4: Option<&(BufView, usize)>,
        path: KernelPath,
    ) -> Result<Vec<(MatmulTiling, f64)>> {
        let scratch = |v: &BufView| BufView {
            buffer: self.alloc_scratch(v.size),
            offset: 0,
            size: v.size,
        };
        let gemm = Gemm {
            a: scratch(&g.a),
            b: scratch(&g.b),
            c: scratch(&g.c),
            bias: g.bias.as_ref().map(scratch),
            frozen_b: false,
            ..*g
        };
        let scratch_nf4 = nf4.map(|(absmax, block)| (scratch(absmax), *block));
        let constants = g.constants(nf4.map(|(_, block)| *block));
        let mut times = Vec::new();
        for tiling in candidates(path) {
            let run = |timed: bool| -> Result<f64> {
                let mut rec = if timed {
                    Recorder::timed(self)
                } else {
                    Recorder::new(self)
                };
                self.record_gemm_tiled(
                    &mut rec,
                    gemm.clone(),
                    scratch_nf4.clone(),
                    operands,
                    constants.clone(),
                    tiling,
                )?;
                let start = std::time::Instant::now();
                let kernels = rec.submit_timed()?;
                let wall = start.elapsed().as_secs_f64();
                Ok(kernels.map_or(wall, |k| k.iter().map(|t| t.seconds).sum()))
            };
            run(false)?; // compiles the pipeline
            let mut samples = (0..3).map(|_| run(true)).collect::<Result<Vec<_>>>()?;
            samples.sort_by(f64::total_cmp);
            times.push((tiling, samples[1]));
        }
        Ok(times)
    }

    /// Tunes one product shape ahead of time (`runner gpu --tune`): times every candidate of
    /// this adapter's kernel path on scratch operands and keeps the fastest in the tuning file.
    /// Returns the shape class's key and what was measured.
    pub fn tune_matmul(&self, shape: &TuneShape) -> Result<(String, TunedEntry)> {
        let TuneShape {
            m,
            n,
            k,
            trans_a,
            trans_b,
            nf4,
            bf16_b,
            ..
        } = *shape;
        ensure!(
            m > 0 && n > 0 && k > 0,
            "tuning needs a non-empty product, got {m}x{n}x{k}"
        );
        ensure!(!(nf4 && trans_a), "an NF4 product never transposes A");
        ensure!(!(nf4 && bf16_b), "B is NF4 or bf16, not both");
        let view = |bytes: u64| BufView {
            buffer: self.alloc_scratch(bytes),
            offset: 0,
            size: bytes.max(4),
        };
        let (lda, ldb) = (if trans_a { m } else { k }, if trans_b { k } else { n });
        let b_bytes = match (nf4, bf16_b) {
            (true, _) => (n * k).div_ceil(2),
            (false, true) => 2 * n * k,
            (false, false) => 4 * n * k,
        };
        let g = Gemm {
            a: view(4 * m as u64 * k as u64),
            b: view(b_bytes as u64),
            c: view(4 * m as u64 * n as u64),
            bias: None,
            params: GemmParams {
                m,
                n,
                k,
                lda,
                ldb,
                ldc: n,
                a_batch: m * k,
                c_batch: m * n,
                alpha: 1.0,
                ..Default::default()
            },
            batch: 1,
            trans_a,
            trans_b,
            a_contig: lda,
            b_contig: ldb,
            f16: false,
            b_bf16: bf16_b,
            frozen_b: false,
        };
        let absmax = nf4.then(|| (view(4 * (n as u64 * k as u64).div_ceil(64)), 64usize));
        // the operand kinds (and so the shape class) a real product of this shape gets
        let operands = g.operands(nf4);
        let path = self.matmul_path();
        let class = ShapeClass::new(m, n, k, trans_a, trans_b, &operands.features());
        let times = self.time_tilings(&g, operands, absmax.as_ref(), path)?;
        let tiling = self.keep_tuned(&class, times.clone());
        Ok((class.key(), TunedEntry { tiling, times }))
    }

    /// The file this adapter's tunings are kept in, if any.
    pub fn tune_file(&self) -> Option<std::path::PathBuf> {
        self.tuner.lock().unwrap().file.clone()
    }
}
