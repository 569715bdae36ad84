use super::*;
use crate::gpu::staging::WeightLayout;
use crate::gpu::testing::{other_tiling_gpu, rel_frobenius, test_gpu, tiny_binding_gpu, TestRng};
use crate::gpu::tune::candidates;
use crate::reference::matmul as reference;

struct Case {
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    beta: f32,
    bias: bool,
    batched_b: bool,
}

impl Case {
    /// `[m, k] · [k, n]`, one batch, no transposes, beta 0, no bias; fields override.
    fn new(m: usize, n: usize, k: usize) -> Case {
        Case {
            batch: 1,
            m,
            n,
            k,
            trans_a: false,
            trans_b: false,
            beta: 0.0,
            bias: false,
            batched_b: false,
        }
    }
}

fn run_case(gpu: &Gpu, c: &Case, rng: &mut TestRng, seed: u64) {
    let shape = |z: usize, r: usize, cc: usize, batched: bool| {
        if batched {
            vec![z, r, cc]
        } else {
            vec![r, cc]
        }
    };
    let a_dims = if c.trans_a { (c.k, c.m) } else { (c.m, c.k) };
    let b_dims = if c.trans_b { (c.n, c.k) } else { (c.k, c.n) };
    let batched = c.batch > 1;
    let a_shape = shape(c.batch, a_dims.0, a_dims.1, batched);
    let b_shape = shape(c.batch, b_dims.0, b_dims.1, batched && c.batched_b);
    let c_shape = shape(c.batch, c.m, c.n, batched);
    let a: Vec<f32> = rng.vec_normal(a_shape.iter().product());
    let mut b: Vec<f32> = rng.vec_normal(b_shape.iter().product());
    let c0: Vec<f32> = rng.vec_normal(c_shape.iter().product());
    let bias: Vec<f32> = rng.vec_normal(c.n);
    let alpha = rng.uniform(0.5, 2.0);

    let ga = gpu.upload_f32(&a_shape, &a).unwrap();
    let gb = if B_BF16.with(|f| f.get()) {
        // bf16 widens exactly: the reference multiplies the widened values.
        let bits: Vec<u16> = b
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_bits())
            .collect();
        b = bits
            .iter()
            .map(|&h| f32::from_bits((h as u32) << 16))
            .collect();
        gpu.upload_bf16(&b_shape, &bits).unwrap()
    } else {
        gpu.upload_f32(&b_shape, &b).unwrap()
    };
    let gc = if c.beta != 0.0 {
        gpu.upload_f32(&c_shape, &c0).unwrap()
    } else {
        let t = gpu.empty(&c_shape, DType::F32).unwrap();
        gpu.poison(&t);
        t
    };
    let gbias = gpu.upload_f32(&[c.n], &bias).unwrap();
    let mut rec = Recorder::new(gpu);
    let opts = MatmulOpts {
        trans_a: c.trans_a,
        trans_b: c.trans_b,
        alpha,
        beta: c.beta,
        bias: c.bias.then_some(&gbias),
        precision: MatmulPrecision::F32,
        frozen_b: FROZEN_B.with(|f| f.get()),
    };
    gpu.matmul(&mut rec, &ga, &gb, &gc, opts).unwrap();
    rec.submit();
    let got = gpu.read_f32(&gc).unwrap();

    let mut want = c0.clone();
    let g = reference::Gemm {
        trans_a: c.trans_a,
        trans_b: c.trans_b,
        alpha,
        beta: c.beta,
    };
    reference::matmul_batched(
        &a,
        &b,
        &mut want,
        c.batch,
        c.m,
        c.n,
        c.k,
        g,
        c.bias.then_some(&bias[..]),
    );
    let err = rel_frobenius(&got, &want);
    assert!(
        err < 1e-5,
        "seed {seed}: {}x{}x{} batch {} ta {} tb {} beta {} bias {}: rel err {err}",
        c.m,
        c.n,
        c.k,
        c.batch,
        c.trans_a,
        c.trans_b,
        c.beta,
        c.bias
    );
}

/// f16 operands: the GPU product differs from the exact f32 product by what rounding the
/// operands to f16 predicts. WGSL lets an f32 → f16 conversion round to either neighbour
/// (lavapipe's vector conversion does not always round to nearest), so the bound assumes
/// faithful rounding: x becomes x·(1 + δ) with |δ| < 2u, u = 2⁻¹¹. Each term x·y gains a
/// relative error δ₁ + δ₂; with δ uniform on (−2u, 2u) its variance is 2·(2u)²/3, so for
/// random zero-mean data ‖C̃ − C‖ / ‖C‖ ≈ 2u·√(2/3) ≈ 8.0e-4 (round-to-nearest gives half
/// that; f32 accumulation adds ~1e-7). The test requires 1e-4 < err < 2.4e-3: rounding
/// happened, and no more error than 3× the faithful-rounding estimate.
fn f16_sweep(gpu: &Gpu) {
    if !gpu.features().contains(wgpu::Features::SHADER_F16) {
        eprintln!("no SHADER_F16 on this adapter");
        return;
    }
    let seed = TestRng::fresh_seed();
    let mut rng = TestRng::new(seed);
    for &(m, n, k) in &[(37, 29, 23), (70, 45, 33), (64, 48, 40)] {
        for (ta, tb) in [(false, false), (false, true), (true, false)] {
            let a_shape = if ta { [k, m] } else { [m, k] };
            let b_shape = if tb { [n, k] } else { [k, n] };
            let a = rng.vec_normal(m * k);
            let b = rng.vec_normal(k * n);
            let ga = gpu.upload_f32(&a_shape, &a).unwrap();
            let gb = gpu.upload_f32(&b_shape, &b).unwrap();
            let gc = gpu.empty(&[m, n], DType::F32).unwrap();
            gpu.poison(&gc);
            let mut rec = Recorder::new(gpu);
            let opts = MatmulOpts {
                trans_a: ta,
                trans_b: tb,
                precision: MatmulPrecision::F16,
                ..Default::default()
            };
            gpu.matmul(&mut rec, &ga, &gb, &gc, opts).unwrap();
            rec.submit();
            let got = gpu.read_f32(&gc).unwrap();
            let g = reference::Gemm {
                trans_a: ta,
                trans_b: tb,
                alpha: 1.0,
                beta: 0.0,
            };
            let product = |a: &[f32], b: &[f32]| {
                let mut c = vec![0.0; m * n];
                reference::matmul_batched(a, b, &mut c, 1, m, n, k, g, None);
                c
            };
            let exact = rel_frobenius(&got, &product(&a, &b));
            assert!(
                (1e-4..2.4e-3).contains(&exact),
                "seed {seed}: {m}x{n}x{k} ta {ta} tb {tb}: rel error {exact} against f32 operands"
            );
        }
    }
}

#[test]
fn f16_operands_stay_within_the_rounding_bound() {
    f16_sweep(test_gpu());
    f16_sweep(other_tiling_gpu());
}

fn sweep(gpu: &Gpu) {
    let seed = TestRng::fresh_seed();
    let mut rng = TestRng::new(seed);
    // Odd sizes (never multiples of a tile) and aligned sizes (vec4 variant).
    for &(m, n, k) in &[
        (37, 29, 23),
        (70, 45, 33),
        (64, 48, 40),
        (5, 3, 2),
        (1, 131, 9),
        // The rows kernel (M <= 8 with Bᵀ): aligned (vec4) and odd K.
        (4, 260, 36),
        (2, 67, 13),
        // K a multiple of 8 (a bf16 B's rows kernel reads whole texels), one and several
        // rounds of the lanes
        (1, 70, 48),
        (6, 75, 136),
    ] {
        for ta in [false, true] {
            for tb in [false, true] {
                let beta = if rng.unit() < 0.5 {
                    0.0
                } else {
                    rng.uniform(0.5, 1.5)
                };
                let bias = rng.unit() < 0.5;
                let case = Case {
                    trans_a: ta,
                    trans_b: tb,
                    beta,
                    bias,
                    batched_b: true,
                    ..Case::new(m, n, k)
                };
                run_case(gpu, &case, &mut rng, seed);
            }
        }
    }
    for batched_b in [true, false] {
        let case = Case {
            batch: 3,
            trans_b: true,
            bias: true,
            batched_b,
            ..Case::new(19, 21, 12)
        };
        run_case(gpu, &case, &mut rng, seed);
        // the rows kernel over a batch
        let case = Case {
            batch: 2,
            trans_b: true,
            bias: true,
            batched_b,
            ..Case::new(3, 21, 12)
        };
        run_case(gpu, &case, &mut rng, seed);
        let case = Case {
            batch: 2,
            trans_a: true,
            beta: 1.0,
            batched_b,
            ..Case::new(16, 8, 17)
        };
        run_case(gpu, &case, &mut rng, seed);
    }
}

#[test]
fn matmul_matches_reference_default_tiling() {
    sweep(test_gpu());
}

thread_local! {
    /// Set by a test to run the plain register kernel where the subgroup kernel would run.
    pub(super) static PLAIN_REGISTER_KERNEL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[test]
fn matmul_matches_reference_unstaged_subgroup_kernel() {
    let gpu = test_gpu();
    if gpu.tiling() != Tiling::Register || !subgroup_kernel_fits(gpu) {
        eprintln!("no subgroup kernel on this adapter");
        return;
    }
    crate::gpu::staging::without_staging(|| sweep(gpu));
}

#[test]
fn matmul_matches_reference_plain_register_kernel() {
    let gpu = test_gpu();
    if gpu.tiling() != Tiling::Register || !subgroup_kernel_fits(gpu) {
        eprintln!("the default sweep already runs the plain kernel here");
        return;
    }
    PLAIN_REGISTER_KERNEL.with(|f| f.set(true));
    sweep(gpu);
    PLAIN_REGISTER_KERNEL.with(|f| f.set(false));
}

#[test]
fn matmul_matches_reference_other_tiling() {
    sweep(other_tiling_gpu());
}

thread_local! {
    /// Set by a test to store B as bf16 in every case of a sweep.
    static B_BF16: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// B in bf16 storage (the modules_to_save tables under `bf16 = true`) on every kernel path:
/// staged subgroup, unstaged subgroup, plain register, workgroup tiles, chunked operands.
#[test]
fn matmul_with_bf16_b_matches_reference() {
    B_BF16.with(|f| f.set(true));
    let gpu = test_gpu();
    sweep(gpu);
    crate::gpu::staging::without_staging(|| sweep(gpu));
    PLAIN_REGISTER_KERNEL.with(|f| f.set(true));
    sweep(gpu);
    PLAIN_REGISTER_KERNEL.with(|f| f.set(false));
    sweep(other_tiling_gpu());
    let small = tiny_binding_gpu();
    let seed = TestRng::fresh_seed();
    let mut rng = TestRng::new(seed);
    for tb in [false, true] {
        let case = Case {
            trans_b: tb,
            beta: 0.7,
            ..Case::new(40, 36, 64)
        };
        run_case(small, &case, &mut rng, seed);
    }
    B_BF16.with(|f| f.set(false));
}

thread_local! {
    /// Set by a test to run one tiling wherever its kernel path runs.
    pub(super) static FORCED_TILING: std::cell::Cell<Option<MatmulTiling>> = const { std::cell::Cell::new(None) };
}

/// Every tiling the autotuner may pick computes the same product: each candidate of each path
/// (subgroup or unrolled register kernel on this CPU adapter, workgroup tiles on the other
/// tiling), forced in turn over the sweep's odd and aligned shapes.
#[test]
fn every_tuning_candidate_matches_reference() {
    if std::env::var_os("LP_NATIVE_VECTOR_WIDTH").is_some() {
        // tools/test.sh's reruns at other subgroup widths: the width is a parameter of the
        // generators independent of the tile, and the default tiles run at every width there
        eprintln!("candidates are checked at the default width");
        return;
    }
    let gpu = test_gpu();
    let mut runs = vec![
        (gpu, gpu.matmul_path()),
        (other_tiling_gpu(), KernelPath::Workgroup),
    ];
    if gpu.matmul_path() == KernelPath::Subgroup {
        runs.push((gpu, KernelPath::Register));
    }
    for (g, path) in runs {
        for tiling in candidates(path) {
            FORCED_TILING.with(|f| f.set(Some(tiling)));
            if path == KernelPath::Register && g.matmul_path() == KernelPath::Subgroup {
                PLAIN_REGISTER_KERNEL.with(|f| f.set(true));
            }
            sweep(g);
            PLAIN_REGISTER_KERNEL.with(|f| f.set(false));
        }
    }
    FORCED_TILING.with(|f| f.set(None));
}

/// The tuner times every candidate of the path on scratch operands and keeps the fastest.
#[test]
fn tuning_times_every_candidate() {
    let gpu = test_gpu();
    let path = gpu.matmul_path();
    let (m, n, k) = (64u32, 96u32, 80u32);
    let a = gpu.empty(&[m as usize, k as usize], DType::F32).unwrap();
    let b = gpu.empty(&[n as usize, k as usize], DType::F32).unwrap();
    let c = gpu.empty(&[m as usize, n as usize], DType::F32).unwrap();
    let g = Gemm {
        a: a.view().unwrap(),
        b: b.view().unwrap(),
        c: c.view().unwrap(),
        bias: None,
        params: GemmParams {
            m,
            n,
            k,
            lda: k,
            ldb: k,
            ldc: n,
            alpha: 1.0,
            ..Default::default()
        },
        batch: 1,
        trans_a: false,
        trans_b: true,
        a_contig: k,
        b_contig: k,
        f16: false,
        b_bf16: false,
        frozen_b: false,
    };
    let operands = Operands {
        vec4: true,
        textures: false,
        nf4: false,
        bf16_b: false,
        f16: false,
        row_blocks: false,
    };
    let times = gpu.time_tilings(&g, operands, None, path).unwrap();
    assert_eq!(
        times.iter().map(|t| t.0).collect::<Vec<_>>(),
        candidates(path)
    );
    assert!(
        times.iter().all(|t| t.1 > 0.0 && t.1.is_finite()),
        "{times:?}"
    );
    let best = crate::gpu::tune::fastest(&times).unwrap();
    let least = times.iter().map(|t| t.1).fold(f64::INFINITY, f64::min);
    assert!(times.iter().any(|&(t, s)| t == best && s == least));
}

thread_local! {
    /// Set by a test to mark B frozen in every case of a sweep.
    static FROZEN_B: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Generation: while a `StagedWeightsHold` lives, a frozen B (f32 or bf16) is staged once into
/// a texture of its own and read from there — by the split rows kernel at M <= 8 with Bᵀ, by the
/// subgroup kernel otherwise — on CPU adapters; the same B again reuses that texture.
#[test]
fn frozen_weights_staged_for_generation_match_reference() {
    let gpu = test_gpu();
    let hold = gpu.hold_staged_weights();
    FROZEN_B.with(|f| f.set(true));
    sweep(gpu);
    B_BF16.with(|f| f.set(true));
    sweep(gpu);
    B_BF16.with(|f| f.set(false));
    FROZEN_B.with(|f| f.set(false));

    // one weight, two products: staged by the first, reused by the second
    let seed = TestRng::fresh_seed();
    let mut rng = TestRng::new(seed);
    let (n, k) = (45, 36);
    let w = rng.vec_normal(n * k);
    let gw = gpu.upload_f32(&[n, k], &w).unwrap();
    let opts = MatmulOpts {
        trans_b: true,
        frozen_b: true,
        ..Default::default()
    };
    let mut first = None;
    for m in [1, 5] {
        let x = rng.vec_normal(m * k);
        let gx = gpu.upload_f32(&[m, k], &x).unwrap();
        let gy = gpu.empty(&[m, n], DType::F32).unwrap();
        gpu.poison(&gy);
        let mut rec = Recorder::new(gpu);
        gpu.matmul(&mut rec, &gx, &gw, &gy, opts).unwrap();
        rec.submit();
        let mut want = vec![0.0; m * n];
        let g = reference::Gemm {
            trans_b: true,
            ..Default::default()
        };
        reference::matmul_batched(&x, &w, &mut want, 1, m, n, k, g, None);
        let err = rel_frobenius(&gpu.read_f32(&gy).unwrap(), &want);
        assert!(err < 1e-5, "seed {seed}: frozen {m}x{n}x{k}: rel err {err}");
        if gpu.stages_operands() {
            let view = gw.view().unwrap();
            let staged =
                gpu.frozen
                    .lock()
                    .unwrap()
                    .get(&view, StageFormat::F32, WeightLayout::Linear);
            let staged = staged.expect("the frozen weight stays staged");
            let first = first.get_or_insert_with(|| staged.clone());
            assert!(std::sync::Arc::ptr_eq(first, &staged), "restaged");
        }
    }
    drop(first);
    drop(hold);
    let frozen = gpu.frozen.lock().unwrap();
    if !frozen.held() {
        assert!(frozen.is_empty(), "the last hold frees the textures");
    }
}

/// Generation's decode products: on CPU adapters a frozen weight whose K is whole steps of the
/// rows kernel is kept in row blocks for products of a few rows, odd N leaving the last block
/// part padding; other K stay linear. f32 and bf16, with a bias and an accumulating epilogue,
/// poisoned outputs, the texture reused by the next product; a prompt-sized product before
/// them keeps the linear layout, which the row blocks then replace, and one after them leaves
/// the row blocks kept (a weight is kept once).
#[test]
fn frozen_weights_in_row_blocks_match_reference() {
    use crate::gpu::kernels::row_blocks::row_block_texels;
    let gpu = test_gpu();
    let hold = gpu.hold_staged_weights();
    let seed = TestRng::fresh_seed();
    let mut rng = TestRng::new(seed);
    let lanes = subgroup_width(gpu);
    // K = 128 and 256 are whole steps at 4, 8 and 16 lanes for bf16 (and f32); 72 and 36 are not
    let cases = [
        (37, 256, true),
        (300, 128, true),
        (8, 128, false),
        (45, 64, false),
        (29, 72, true),
        (19, 36, false),
    ];
    for (n, k, bf16) in cases {
        let dtype = if bf16 { DType::BF16 } else { DType::F32 };
        let mut w = rng.vec_normal(n * k);
        if bf16 {
            crate::reference::cast::round_to_bf16(&mut w);
        }
        let gw = gpu.upload_f32_as(&[n, k], &w, dtype).unwrap();
        let bias = rng.vec_normal(n);
        let gbias = gpu.upload_f32(&[n], &bias).unwrap();
        let mut first = None;
        for (m, with_bias, beta) in [
            (20, false, 0.0),
            (1, false, 0.0),
            (3, true, 0.0),
            (8, false, 1.0),
            (20, true, 1.0),
        ] {
            let x = rng.vec_normal(m * k);
            let start = rng.vec_normal(m * n);
            let gx = gpu.upload_f32(&[m, k], &x).unwrap();
            let gy = gpu.upload_f32(&[m, n], &start).unwrap();
            if beta == 0.0 {
                gpu.poison(&gy);
            }
            let opts = MatmulOpts {
                trans_b: true,
                frozen_b: true,
                beta,
                bias: with_bias.then_some(&gbias),
                ..Default::default()
            };
            let mut rec = Recorder::new(gpu);
            gpu.matmul(&mut rec, &gx, &gw, &gy, opts).unwrap();
            rec.submit();
            let mut want = if beta == 0.0 {
                vec![0.0; m * n]
            } else {
                start.clone()
            };
            let g = reference::Gemm {
                trans_b: true,
                beta,
                ..Default::default()
            };
            reference::matmul_batched(
                &x,
                &w,
                &mut want,
                1,
                m,
                n,
                k,
                g,
                with_bias.then_some(&bias[..]),
            );
            let err = rel_frobenius(&gpu.read_f32(&gy).unwrap(), &want);
            let what =
                format!("seed {seed}: {m}x{n}x{k}, bf16 {bf16}, bias {with_bias}, beta {beta}");
            assert!(err < 1e-5, "{what}: rel err {err}");
            if !gpu.stages_operands() {
                continue;
            }
            let lanes = lanes.expect("staging adapters have one subgroup width");
            let view = gw.view().unwrap();
            let format = if bf16 {
                StageFormat::U32
            } else {
                StageFormat::F32
            };
            let frozen = gpu.frozen.lock().unwrap();
            let blocks = frozen.get(&view, format, WeightLayout::RowBlocks { lanes });
            let linear = frozen.get(&view, format, WeightLayout::Linear);
            drop(frozen);
            let in_blocks = row_block_texels(k, bf16, lanes).is_some() && row_blocks_enabled();
            let tiled = m > ROWS_KERNEL_MAX_M as usize;
            let staged = if let (true, Some(blocks)) = (tiled, blocks.clone()) {
                // a prompt's product after the decode steps': copied into a slot, the row
                // blocks kept
                assert!(
                    linear.is_none(),
                    "{what}: kept linearly beside the row blocks"
                );
                blocks
            } else if tiled {
                // the tiled kernel first: linear, replaced by the row blocks below
                linear.expect("kept linearly")
            } else if in_blocks {
                assert!(linear.is_none(), "{what}: staged twice");
                let blocks = blocks.expect("kept in row blocks");
                if let Some(tiled) = first.take().filter(|t| !std::sync::Arc::ptr_eq(t, &blocks)) {
                    assert!(
                        std::sync::Arc::strong_count(&tiled) == 1,
                        "{what}: the linear copy is still kept"
                    );
                }
                blocks
            } else {
                assert!(blocks.is_none(), "{what}: row blocks without whole K steps");
                linear.expect("kept linearly")
            };
            let first = first.get_or_insert_with(|| staged.clone());
            assert!(std::sync::Arc::ptr_eq(first, &staged), "{what}: restaged");
        }
    }
    drop(hold);
}

#[test]
fn matmul_over_chunked_operands() {
    // 4 KiB bindings: every operand below spans several chunks, in M, N and K.
    let gpu = tiny_binding_gpu();
    let seed = TestRng::fresh_seed();
    let mut rng = TestRng::new(seed);
    for ta in [false, true] {
        for tb in [false, true] {
            let case = Case {
                trans_a: ta,
                trans_b: tb,
                bias: true,
                ..Case::new(45, 51, 67)
            };
            run_case(gpu, &case, &mut rng, seed);
            let case = Case {
                trans_a: ta,
                trans_b: tb,
                beta: 0.7,
                ..Case::new(40, 36, 64)
            };
            run_case(gpu, &case, &mut rng, seed);
        }
    }
}

#[test]
fn matmul_rejects_bad_shapes() {
    let gpu = test_gpu();
    let a = gpu.empty(&[3, 4], DType::F32).unwrap();
    let b = gpu.empty(&[5, 6], DType::F32).unwrap();
    let c = gpu.empty(&[3, 6], DType::F32).unwrap();
    let mut rec = Recorder::new(gpu);
    let err = gpu
        .matmul(&mut rec, &a, &b, &c, MatmulOpts::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("disagree"), "{err}");
}

/// The cooperative-matrix kernel against the reference on adapters that have cooperative
/// matrices (a lent GPU through tools/gpu-check.sh; lavapipe has none): every configuration the
/// adapter offers must pass, and passing is what selects it on this adapter and driver.
#[test]
fn coop_matmul_matches_reference_where_the_adapter_has_it() {
    let gpu = test_gpu();
    if gpu.coop_configs().is_empty() {
        eprintln!("no cooperative matrices on this adapter");
        return;
    }
    for (cfg, result) in gpu.verify_coop_matmul() {
        let err = result.unwrap_or_else(|e| panic!("{cfg}: {e:#}"));
        eprintln!("{cfg}: largest relative error {err:.2e}");
    }
}
