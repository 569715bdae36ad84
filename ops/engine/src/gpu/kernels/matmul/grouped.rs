//! Several products of one x in one dispatch (`shaders/matmul_rows_group.wgsl`): decoding's
//! q/k/v and gate/up projections on CPU adapters, where each dispatch has a fixed cost near a
//! small product's and a product with few outputs keeps few workgroups busy.

use anyhow::{ensure, Result};
use bytemuck::{Pod, Zeroable};

use super::{
    subgroup_width, MatmulOpts, MatmulPrecision, ROWS_KERNEL_MAX_M, SPLIT_ROWS_PER_WORKGROUP,
};
use crate::gpu::kernels::row_blocks::row_block_texels;
use crate::gpu::recorder::Bound;
use crate::gpu::staging::{RowBlocks, StageFormat, STAGE_WIDTH};
use crate::gpu::{DType, Gpu, GpuTensor, Recorder, Shader};

/// Products one grouped dispatch takes (the shader's output bindings).
pub const MAX_GROUP: usize = 3;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct GroupParams {
    m: u32,
    k: u32,
    members: u32,
    _pad: u32,
    n: [u32; 4],
    b_off: [u32; 4],
    first_group: [u32; 4],
}

/// The grouped module for f32 or bf16 weights, staged linearly or in row blocks.
fn shader(bf16: bool, row_blocks: bool) -> Result<Shader> {
    let features: Vec<&str> = [(bf16, "BF16B"), (row_blocks, "ROW_BLOCKS")]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
    Shader::compose("matmul_rows_group", &features)
}

/// Every module and entry point this family dispatches (validated by `gpu::shader`'s tests).
pub(crate) fn variants() -> Result<Vec<super::super::Variant>> {
    let mut all = Vec::new();
    for bf16 in [false, true] {
        for row_blocks in [false, true] {
            all.push((
                shader(bf16, row_blocks)?,
                vec!["matmul_rows_group", "matmul_rows_geglu"],
            ));
        }
    }
    Ok(all)
}

impl Gpu {
    /// `outs[j] [M, N_j] = x [M, K] · weights[j]ᵀ` for frozen weights `weights[j] [N_j, K]`, f32
    /// or bf16 (generation: the weights do not change while a [`Gpu::hold_staged_weights`]
    /// lives). One dispatch for all of them where this adapter stages operands, a hold is alive,
    /// M is at most [`ROWS_KERNEL_MAX_M`], the weights share one dtype, K % 4 == 0 (f32) or
    /// K % 8 == 0 (bf16) and at most [`MAX_GROUP`] weights come; otherwise one [`Gpu::matmul`]
    /// each (`precision` applies there; the grouped kernel's operands are f32).
    pub fn matmul_grouped(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        weights: &[&GpuTensor],
        outs: &[&GpuTensor],
        precision: MatmulPrecision,
    ) -> Result<()> {
        ensure!(
            weights.len() == outs.len() && !weights.is_empty(),
            "matmul_grouped: {} weights for {} outputs",
            weights.len(),
            outs.len()
        );
        let (m, k) = (x.rows(), x.row_len());
        for (j, (w, out)) in weights.iter().zip(outs).enumerate() {
            ensure!(
                w.shape().len() == 2 && w.shape()[1] == k,
                "matmul_grouped: weight {j} {:?} does not take {k} inputs",
                w.shape()
            );
            ensure!(
                out.numel() == m * w.shape()[0],
                "matmul_grouped: output {j} {:?} is not {m} x {}",
                out.shape(),
                w.shape()[0]
            );
        }
        if !self.record_group(rec, x, weights, outs, precision, false)? {
            self.matmul_each(rec, x, weights, outs, precision)?;
        }
        Ok(())
    }

    /// The grouped products' fallback: one [`Gpu::matmul`] per frozen weight.
    fn matmul_each(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        weights: &[&GpuTensor],
        outs: &[&GpuTensor],
        precision: MatmulPrecision,
    ) -> Result<()> {
        let opts = MatmulOpts {
            trans_b: true,
            frozen_b: true,
            precision,
            ..Default::default()
        };
        for (w, out) in weights.iter().zip(outs) {
            self.matmul(rec, x, w, out, opts)?;
        }
        Ok(())
    }

    /// Gemma's gated MLP activation of two frozen products of one x:
    /// `out [M, N] = gelu(x [M, K] · gateᵀ) ⊙ (x · upᵀ)` for `gate`, `up` `[N, K]`
    /// (gelu_pytorch_tanh). One dispatch that stores only the result where
    /// [`Gpu::matmul_grouped`] would group the two; otherwise the two products and
    /// [`Gpu::geglu_forward`]. Either way the same bits: the fused kernel sums each row as the
    /// grouped one does and applies the same GELU.
    pub fn matmul_geglu(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        gate: &GpuTensor,
        up: &GpuTensor,
        out: &GpuTensor,
        precision: MatmulPrecision,
    ) -> Result<()> {
        let (m, k) = (x.rows(), x.row_len());
        ensure!(
            gate.shape().len() == 2 && gate.shape() == up.shape() && gate.shape()[1] == k,
            "matmul_geglu: gate {:?} and up {:?} must both be [N, {k}]",
            gate.shape(),
            up.shape()
        );
        let n = gate.shape()[0];
        ensure!(
            out.numel() == m * n && out.dtype() == DType::F32,
            "matmul_geglu: output {:?} {:?} is not f32 {m} x {n}",
            out.dtype(),
            out.shape()
        );
        if self.record_group(rec, x, &[gate, up], &[out], precision, true)? {
            return Ok(());
        }
        let gate_out = self.empty(&[m, n], DType::F32)?;
        let up_out = self.empty(&[m, n], DType::F32)?;
        // the grouped kernel applies exactly where the fused one does: the products one by one
        self.matmul_each(rec, x, &[gate, up], &[&gate_out, &up_out], precision)?;
        self.geglu_forward(rec, &gate_out, &up_out, &out.reshape(&[m, n])?)
    }

    /// Records the grouped dispatch when it applies (see [`Gpu::matmul_grouped`]); false when
    /// it does not and no product was recorded.
    /// With `geglu`, `weights` are gate and up and `outs` their activation (see
    /// [`Gpu::matmul_geglu`]).
    fn record_group(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        weights: &[&GpuTensor],
        outs: &[&GpuTensor],
        precision: MatmulPrecision,
        geglu: bool,
    ) -> Result<bool> {
        let (m, k) = (x.rows(), x.row_len());
        let plain = |t: &GpuTensor, dtype: DType| t.dtype() == dtype && !t.is_chunked();
        let Some(lanes) = subgroup_width(self) else {
            return Ok(false);
        };
        let Some(first) = weights.first() else {
            return Ok(false);
        };
        let bf16 = first.dtype() == DType::BF16;
        // a bf16 row of K % 8 == 0 elements is whole texels, as lib/rows_split reads them
        let (weight_dtype, k_align) = if bf16 {
            (DType::BF16, 8)
        } else {
            (DType::F32, 4)
        };
        if !self.stages_operands()
            || precision != MatmulPrecision::F32
            || weights.len() > MAX_GROUP
            || m == 0
            || m > ROWS_KERNEL_MAX_M as usize
            || k == 0
            || !k.is_multiple_of(k_align)
            || !plain(x, DType::F32)
            || !weights.iter().all(|w| plain(w, weight_dtype))
            || !outs.iter().all(|o| plain(o, DType::F32))
        {
            return Ok(false);
        }
        let views = weights
            .iter()
            .map(|w| w.view())
            .collect::<Result<Vec<_>>>()?;
        let format = if bf16 {
            StageFormat::U32
        } else {
            StageFormat::F32
        };
        // in row blocks where K is whole steps of the kernel (every Gemma 3 size), which
        // stream through memory faster than the linear layout
        let row_blocks = row_block_texels(k, bf16, lanes)
            .filter(|_| super::row_blocks_enabled())
            .map(|row_texels| RowBlocks { row_texels, lanes });
        let Some(group) = rec.stage_frozen_group(&views, format, row_blocks)? else {
            return Ok(false);
        };
        let Some(a) = rec.stage(0, &x.view()?, StageFormat::F32) else {
            return Ok(false);
        };
        let mut params = GroupParams {
            m: m as u32,
            k: k as u32,
            members: weights.len() as u32,
            _pad: 0,
            n: [0; 4],
            b_off: [0; 4],
            first_group: [0; 4],
        };
        let mut groups = 0u32;
        for (j, w) in weights.iter().enumerate() {
            let n = u32::try_from(w.shape()[0])?;
            params.n[j] = n;
            // texel (first_row * STAGE_WIDTH) of the packed texture, 4 f32 or 8 bf16 a texel
            let per_texel = if bf16 { 8 } else { 4 };
            params.b_off[j] =
                u32::try_from(group.first_rows[j] as u64 * STAGE_WIDTH as u64 * per_texel)?;
            params.first_group[j] = groups;
            groups += n.div_ceil(SPLIT_ROWS_PER_WORKGROUP);
        }
        let entry = if geglu {
            // both members' rows in each workgroup
            groups = params.n[0].div_ceil(SPLIT_ROWS_PER_WORKGROUP);
            "matmul_rows_geglu"
        } else {
            "matmul_rows_group"
        };
        let kernel = self.kernel(
            &shader(bf16, row_blocks.is_some())?,
            entry,
            &[("SPLIT_LANES", lanes as f64)],
        )?;
        let dummy = self.dummy_buffer();
        let mut bindings = vec![Bound::Texture(&a), Bound::Texture(&group.texture)];
        // the fused activation writes C0 only (and its layout binds no other output)
        let bound_outputs = if geglu { 1 } else { MAX_GROUP };
        for j in 0..bound_outputs {
            bindings.push(Bound::Buffer(match outs.get(j) {
                Some(out) => out.view()?,
                None => dummy.clone(),
            }));
        }
        rec.dispatch_bound(
            &kernel,
            bytemuck::bytes_of(&params),
            &bindings,
            [groups, m as u32, 1],
        );
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::staging::WeightLayout;
    use crate::gpu::testing::{rel_frobenius, test_gpu, TestRng};
    use crate::reference::matmul as reference;

    /// Each output against one reference product, with fresh random inputs, poisoned outputs
    /// and odd sizes: N past a workgroup and inside one, a member of 3 rows, M of 1, 3 and 8;
    /// two and three members; the same group again (its texture reused); `grouped` says whether
    /// the group must have been staged together (else the per-weight fallback ran: odd K, four
    /// members, M past ROWS_KERNEL_MAX_M).
    fn check_group(
        gpu: &Gpu,
        (m, k): (usize, usize),
        ns: &[usize],
        grouped: Option<bool>,
        rng: &mut TestRng,
        seed: u64,
    ) {
        check_group_of(gpu, (m, k), ns, grouped, DType::F32, rng, seed)
    }

    /// [`check_group`] with weights stored in `dtype` (bf16: the reference multiplies the
    /// widened values, which are exact).
    fn check_group_of(
        gpu: &Gpu,
        (m, k): (usize, usize),
        ns: &[usize],
        grouped: Option<bool>,
        dtype: DType,
        rng: &mut TestRng,
        seed: u64,
    ) {
        let x = rng.vec_normal(m * k);
        let gx = gpu.upload_f32(&[m, k], &x).unwrap();
        let mut ws: Vec<Vec<f32>> = ns.iter().map(|&n| rng.vec_normal(n * k)).collect();
        if dtype == DType::BF16 {
            for w in &mut ws {
                crate::reference::cast::round_to_bf16(w);
            }
        }
        let gws: Vec<GpuTensor> = ws
            .iter()
            .zip(ns)
            .map(|(w, &n)| gpu.upload_f32_as(&[n, k], w, dtype).unwrap())
            .collect();
        for _ in 0..2 {
            let outs: Vec<GpuTensor> = ns
                .iter()
                .map(|&n| gpu.empty(&[m, n], DType::F32).unwrap())
                .collect();
            for o in &outs {
                gpu.poison(o);
            }
            let mut rec = Recorder::new(gpu);
            gpu.matmul_grouped(
                &mut rec,
                &gx,
                &gws.iter().collect::<Vec<_>>(),
                &outs.iter().collect::<Vec<_>>(),
                MatmulPrecision::F32,
            )
            .unwrap();
            rec.submit();
            if let Some(grouped) = grouped.filter(|_| gpu.stages_operands()) {
                let views: Vec<_> = gws.iter().map(|w| w.view().unwrap()).collect();
                // in row blocks where K is whole steps of the kernel's lanes
                let bf16 = dtype == DType::BF16;
                let lanes = subgroup_width(gpu).expect("staging adapters have one width");
                let blocks =
                    row_block_texels(k, bf16, lanes).filter(|_| super::super::row_blocks_enabled());
                let format = if bf16 {
                    StageFormat::U32
                } else {
                    StageFormat::F32
                };
                let layout = match blocks {
                    Some(_) => WeightLayout::RowBlocks { lanes },
                    None => WeightLayout::Linear,
                };
                let staged = gpu.frozen.lock().unwrap().group(&views, format, layout);
                assert_eq!(
                    staged.is_some(),
                    grouped,
                    "seed {seed}: {m}x{k} {ns:?} grouped ({layout:?})"
                );
            }
            for (j, (&n, w)) in ns.iter().zip(&ws).enumerate() {
                let mut want = vec![0.0; m * n];
                let g = reference::Gemm {
                    trans_b: true,
                    ..Default::default()
                };
                reference::matmul_batched(&x, w, &mut want, 1, m, n, k, g, None);
                let got = gpu.read_f32(&outs[j]).unwrap();
                assert!(
                    got.iter().all(|v| v.is_finite()),
                    "seed {seed}: {m}x{k} member {j} of {ns:?}: an output was not written"
                );
                let err = rel_frobenius(&got, &want);
                assert!(
                    err < 1e-5,
                    "seed {seed}: {m}x{k} member {j} of {ns:?}: rel err {err}"
                );
            }
        }
    }

    #[test]
    fn grouped_products_match_one_reference_product_each() {
        let gpu = test_gpu();
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        let hold = gpu.hold_staged_weights();
        check_group(gpu, (1, 36), &[70, 3, 129], Some(true), &mut rng, seed);
        check_group(gpu, (3, 64), &[64, 65], Some(true), &mut rng, seed);
        check_group(gpu, (8, 20), &[5, 200, 17], Some(true), &mut rng, seed);
        // K of whole steps at 4, 8 and 16 lanes: in row blocks (the last block part padding)
        check_group(gpu, (2, 128), &[37, 9, 64], Some(true), &mut rng, seed);
        // the fallback: odd K, four members, more than ROWS_KERNEL_MAX_M rows
        check_group(gpu, (2, 13), &[9, 31], Some(false), &mut rng, seed);
        check_group(gpu, (1, 8), &[4, 5, 6, 7], Some(false), &mut rng, seed);
        check_group(gpu, (9, 8), &[4, 5], Some(false), &mut rng, seed);
        // bf16 weights: whole texels of 8 (K % 8 == 0), one and several rounds of the lanes;
        // K % 8 != 0 and a mix of dtypes fall back
        let bf16 = DType::BF16;
        check_group_of(
            gpu,
            (1, 40),
            &[70, 3, 129],
            Some(true),
            bf16,
            &mut rng,
            seed,
        );
        check_group_of(gpu, (5, 136), &[64, 65], Some(true), bf16, &mut rng, seed);
        check_group_of(
            gpu,
            (1, 128),
            &[70, 3, 129],
            Some(true),
            bf16,
            &mut rng,
            seed,
        );
        check_group_of(
            gpu,
            (8, 256),
            &[64, 65, 300],
            Some(true),
            bf16,
            &mut rng,
            seed,
        );
        check_group_of(gpu, (2, 36), &[9, 31], Some(false), bf16, &mut rng, seed);
        let (x, w32, w16) = (
            gpu.upload_f32(&[1, 16], &rng.vec_normal(16)).unwrap(),
            gpu.upload_f32(&[3, 16], &rng.vec_normal(48)).unwrap(),
            gpu.upload_f32_as(&[5, 16], &rng.vec_normal(80), bf16)
                .unwrap(),
        );
        let outs = [
            gpu.empty(&[1, 3], DType::F32).unwrap(),
            gpu.empty(&[1, 5], DType::F32).unwrap(),
        ];
        let mut rec = Recorder::new(gpu);
        gpu.matmul_grouped(
            &mut rec,
            &x,
            &[&w32, &w16],
            &[&outs[0], &outs[1]],
            MatmulPrecision::F32,
        )
        .unwrap();
        rec.submit();
        let views = [w32.view().unwrap(), w16.view().unwrap()];
        let lanes = subgroup_width(gpu).unwrap_or(8);
        let frozen = gpu.frozen.lock().unwrap();
        let any_group = StageFormat::ALL.iter().any(|&f| {
            [WeightLayout::Linear, WeightLayout::RowBlocks { lanes }]
                .iter()
                .any(|&l| frozen.group(&views, f, l).is_some())
        });
        drop(frozen);
        assert!(!any_group, "a mix of dtypes is not grouped");
        drop(hold);
        // without this test's hold (another test's may be alive: either path must be right)
        check_group(gpu, (1, 36), &[70, 3, 129], None, &mut rng, seed);
    }

    /// One fused gate/up activation against the same weights' two grouped products followed by
    /// `geglu_forward` (bit for bit: same sums, same GELU) and against the reference (two
    /// reference products, the reference GeGLU). `fused`: whether a repeat records one dispatch
    /// (the fused kernel) where this adapter groups; else the two products and the activation.
    fn check_geglu(
        gpu: &Gpu,
        (m, k, n): (usize, usize, usize),
        dtype: DType,
        fused: bool,
        rng: &mut TestRng,
        seed: u64,
    ) {
        let what = format!("seed {seed}: geglu {m}x{k}x{n} {dtype:?}");
        let x = rng.vec_normal(m * k);
        let mut ws: Vec<Vec<f32>> = (0..2).map(|_| rng.vec_normal(n * k)).collect();
        if dtype == DType::BF16 {
            ws.iter_mut()
                .for_each(|w| crate::reference::cast::round_to_bf16(w));
        }
        let gx = gpu.upload_f32(&[m, k], &x).unwrap();
        let gate = gpu.upload_f32_as(&[n, k], &ws[0], dtype).unwrap();
        let up = gpu.upload_f32_as(&[n, k], &ws[1], dtype).unwrap();
        let act = gpu.empty(&[m, n], DType::F32).unwrap();
        for round in 0..2 {
            gpu.poison(&act);
            let mut rec = Recorder::new(gpu);
            gpu.matmul_geglu(&mut rec, &gx, &gate, &up, &act, MatmulPrecision::F32)
                .unwrap();
            if round == 1 {
                // the first round may also lay the weights out
                let one = fused && gpu.stages_operands();
                assert_eq!(rec.dispatch_count() == 1, one, "{what}: fused");
            }
            rec.submit();
        }
        let [g_out, u_out, unfused] = [(); 3].map(|_| gpu.empty(&[m, n], DType::F32).unwrap());
        let mut rec = Recorder::new(gpu);
        gpu.matmul_grouped(
            &mut rec,
            &gx,
            &[&gate, &up],
            &[&g_out, &u_out],
            MatmulPrecision::F32,
        )
        .unwrap();
        gpu.geglu_forward(&mut rec, &g_out, &u_out, &unfused)
            .unwrap();
        rec.submit();
        let got = gpu.read_f32(&act).unwrap();
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&gpu.read_f32(&unfused).unwrap()), "{what}");
        let g = reference::Gemm {
            trans_b: true,
            ..Default::default()
        };
        let [mut gate_ref, mut up_ref] = [vec![0.0; m * n], vec![0.0; m * n]];
        reference::matmul_batched(&x, &ws[0], &mut gate_ref, 1, m, n, k, g, None);
        reference::matmul_batched(&x, &ws[1], &mut up_ref, 1, m, n, k, g, None);
        let want = crate::reference::activation::geglu_forward(&gate_ref, &up_ref);
        let err = rel_frobenius(&got, &want);
        assert!(err < 1e-5, "{what}: rel err {err}");
    }

    #[test]
    fn fused_geglu_equals_the_products_then_geglu() {
        let gpu = test_gpu();
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        let hold = gpu.hold_staged_weights();
        // row blocks (K whole steps at 4-16 lanes) and linear; N past a workgroup, odd, small
        check_geglu(gpu, (1, 128, 70), DType::F32, true, &mut rng, seed);
        check_geglu(gpu, (5, 256, 300), DType::BF16, true, &mut rng, seed);
        check_geglu(gpu, (1, 40, 129), DType::BF16, true, &mut rng, seed);
        check_geglu(gpu, (3, 36, 5), DType::F32, true, &mut rng, seed);
        // the fallback: K % 4 != 0, more than ROWS_KERNEL_MAX_M rows
        check_geglu(gpu, (2, 13, 9), DType::F32, false, &mut rng, seed);
        check_geglu(gpu, (9, 16, 33), DType::F32, false, &mut rng, seed);
        drop(hold);
        crate::gpu::staging::without_staging(|| {
            check_geglu(gpu, (1, 128, 70), DType::BF16, false, &mut rng, seed)
        });
    }

    #[test]
    fn mismatched_shapes_are_refused() {
        let gpu = test_gpu();
        let x = gpu.empty(&[1, 8], DType::F32).unwrap();
        let w = gpu.empty(&[4, 6], DType::F32).unwrap();
        let out = gpu.empty(&[1, 4], DType::F32).unwrap();
        let mut rec = Recorder::new(gpu);
        let err = gpu
            .matmul_grouped(&mut rec, &x, &[&w], &[&out], MatmulPrecision::F32)
            .unwrap_err();
        assert!(err.to_string().contains("does not take 8 inputs"), "{err}");
        let w = gpu.empty(&[4, 8], DType::F32).unwrap();
        let small = gpu.empty(&[1, 3], DType::F32).unwrap();
        let err = gpu
            .matmul_grouped(&mut rec, &x, &[&w], &[&small], MatmulPrecision::F32)
            .unwrap_err();
        assert!(err.to_string().contains("is not 1 x 4"), "{err}");
    }
}
