//! Matrix multiply: `C = alpha · op(A) · op(B) + beta · C + bias`, batched, over chunked operands.

use std::sync::OnceLock;

use anyhow::{bail, ensure, Result};
use bytemuck::{Pod, Zeroable};

use crate::gpu::recorder::Bound;
use crate::gpu::staging::{StageFormat, StagedTexture};
use crate::gpu::{BufView, DType, Gpu, GpuTensor, Recorder, Shader, Tiling};

/// How a variant of `shaders/matmul.wgsl` reads its operands: A and B as vec4 or scalar
/// views, bound as storage buffers or as staged linear textures, B an f32 matrix, an NF4
/// weight or a bf16 matrix, every value rounded to f16 or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Operands {
    pub vec4: bool,
    pub textures: bool,
    pub nf4: bool,
    /// B stored as bf16 (two per u32 word).
    pub bf16_b: bool,
    pub f16: bool,
}

impl Operands {
    fn features(self) -> Vec<&'static str> {
        [
            (self.vec4, "VEC4"),
            (self.textures, "TEXTURES"),
            (self.nf4, "NF4"),
            (self.bf16_b, "BF16B"),
            (self.f16, "F16"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect()
    }
}

/// The matmul module for `operands`.
pub(crate) fn shader(operands: Operands) -> Result<Shader> {
    Shader::compose("matmul", &operands.features())
}

/// The precision of a matmul's operands. Products and sums are f32 either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MatmulPrecision {
    #[default]
    F32,
    /// Every value of A and B (an NF4 weight after dequantization) rounded to f16 as it is
    /// read, as f16 tensor math takes it; needs `SHADER_F16`. Values past f16's range (65504)
    /// have no defined f16 value: only for matmul operands, never norms or the residual stream.
    F16,
}

impl MatmulPrecision {
    /// `"f32"` or `"f16"` (the `matmul_precision` param).
    pub fn parse(s: &str) -> Result<MatmulPrecision> {
        match s {
            "f32" => Ok(MatmulPrecision::F32),
            "f16" => Ok(MatmulPrecision::F16),
            other => bail!("expected \"f32\" or \"f16\", got \"{other}\""),
        }
    }
}

/// Every module and entry point [`Gpu::record_gemm_with`] can dispatch (validated by
/// `gpu::shader`'s tests): the workgroup and register kernels on storage buffers, the
/// generated subgroup kernels at the configured tile on buffers or textures, and the unrolled
/// register kernels, each for both operand widths, B as f32, NF4 or bf16 (f32 operands: the
/// bf16 tables never meet the f16 switch, which applies to the base's linears), f32 or f16
/// operands.
pub(crate) fn variants() -> Result<Vec<super::Variant>> {
    let mut all = Vec::new();
    let combos = (0..8)
        .map(|i| [i & 1 != 0, i & 2 != 0, false, i & 4 != 0])
        .chain([false, true].map(|vec4| [vec4, false, true, false]));
    for [vec4, nf4, bf16_b, f16] in combos {
        let operands = Operands {
            vec4,
            textures: false,
            nf4,
            bf16_b,
            f16,
        };
        all.push((
            shader(operands)?,
            vec!["matmul_register", "matmul_workgroup", "matmul_rows"],
        ));
        for trans_a in [false, true] {
            for trans_b in [false, true] {
                for textures in [false, true] {
                    let (tm, tn) = subgroup_tile();
                    let staged = Operands {
                        textures,
                        ..operands
                    };
                    let sg = subgroup_shader(staged, tm, tn, trans_a, trans_b)?;
                    all.push((sg, vec!["matmul_subgroup"]));
                }
                let (tm, tn) = register_tile();
                let unrolled = unrolled_shader(operands, tm, tn, trans_a, trans_b)?;
                all.push((unrolled, vec!["matmul_register_unrolled"]));
            }
        }
    }
    Ok(all)
}

/// Whether the subgroup kernel may read its operands from staged textures (where the adapter
/// stages: [`crate::gpu::staging`]); env `RUNNER_MATMUL_STAGE=0` binds the storage buffers
/// instead, for benchmarking.
fn stage_operands() -> bool {
    static S: OnceLock<bool> = OnceLock::new();
    *S.get_or_init(|| std::env::var("RUNNER_MATMUL_STAGE").map_or(true, |v| v != "0"))
}

/// Up to this many rows of A, `x·Wᵀ` runs the rows kernel (`matmul_rows`: one dot product per
/// output) instead of a tiled one: decoding multiplies one row per sequence.
pub const ROWS_KERNEL_MAX_M: u32 = 8;

/// Whether the rows kernel is used (env `RUNNER_MATMUL_ROWS=0`: never, for benchmarking).
fn rows_kernel() -> bool {
    static R: OnceLock<bool> = OnceLock::new();
    *R.get_or_init(|| std::env::var("RUNNER_MATMUL_ROWS").map_or(true, |v| v != "0"))
}

/// Options of [`Gpu::matmul`]. `Default`: plain `C = A·B`.
#[derive(Clone, Copy)]
pub struct MatmulOpts<'a> {
    /// A stored [K, M] (or [batch, K, M]): computes Aᵀ·B.
    pub trans_a: bool,
    /// B stored [N, K]: computes A·Bᵀ (a linear layer `x·Wᵀ` with W [out, in]).
    pub trans_b: bool,
    pub alpha: f32,
    /// Accumulate epilogue: `C = ... + beta·C` (0 overwrites without reading C).
    pub beta: f32,
    /// Bias epilogue: a [N] f32 vector added to every row.
    pub bias: Option<&'a GpuTensor>,
    /// The operands' precision (f32 accumulation either way).
    pub precision: MatmulPrecision,
}

impl Default for MatmulOpts<'_> {
    fn default() -> Self {
        MatmulOpts {
            trans_a: false,
            trans_b: false,
            alpha: 1.0,
            beta: 0.0,
            bias: None,
            precision: MatmulPrecision::F32,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
pub(crate) struct GemmParams {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub has_bias: u32,
    pub a_off: u32,
    pub lda: u32,
    pub a_batch: u32,
    pub b_off: u32,
    pub ldb: u32,
    pub b_batch: u32,
    pub c_off: u32,
    pub ldc: u32,
    pub c_batch: u32,
    pub bias_off: u32,
    pub alpha: f32,
    pub beta: f32,
}

/// Tile shape of the register kernel (outputs per invocation); env `RUNNER_MATMUL_TILE=TMxTN`
/// overrides it for benchmarking.
pub(crate) fn register_tile() -> (u32, u32) {
    static T: OnceLock<(u32, u32)> = OnceLock::new();
    *T.get_or_init(|| {
        if let Ok(v) = std::env::var("RUNNER_MATMUL_TILE") {
            if let Some((a, b)) = v.split_once('x') {
                if let (Ok(a), Ok(b)) = (a.parse::<u32>(), b.parse::<u32>()) {
                    if a % 4 == 0 && b % 4 == 0 && (4..=16).contains(&a) && (4..=16).contains(&b) {
                        return (a, b);
                    }
                }
            }
            eprintln!("ignoring RUNNER_MATMUL_TILE={v}: expected TMxTN, multiples of 4 in 4..=16");
        }
        (8, 16)
    })
}

/// WGSL of a fully unrolled register-blocked kernel `matmul_register_unrolled` for one tile
/// shape and transpose pair: every accumulator is its own variable and every vector component
/// a constant swizzle, so the driver keeps them in registers (llvmpipe spills a dynamically
/// indexed private array to memory, which cost 50x in measurements). Appended to the matmul
/// module source (it uses the a4/a1/b4/b1 that the module's features define and its
/// Params/store/a_index/b_index).
#[allow(clippy::needless_range_loop)] // kk names generated variables and indexes `comp`
pub(crate) fn unrolled_register_kernel(tm: u32, tn: u32, trans_a: bool, trans_b: bool) -> String {
    use std::fmt::Write as _;
    let comp = ["x", "y", "z", "w"];
    let tn4 = tn / 4;
    let mut s = String::new();
    let _ = writeln!(s, "\n@compute @workgroup_size(WG_X, WG_Y, 1)");
    let _ = writeln!(
        s,
        "fn matmul_register_unrolled(@builtin(global_invocation_id) gid: vec3<u32>) {{"
    );
    let _ = writeln!(
        s,
        "    let n0 = gid.x * {tn}u;\n    let m0 = gid.y * {tm}u;"
    );
    let _ = writeln!(s, "    if (m0 >= p.m || n0 >= p.n) {{ return; }}");
    let _ = writeln!(s, "    let a_base = p.a_off + gid.z * p.a_batch;\n    let b_base = p.b_off + gid.z * p.b_batch;\n    let c_base = p.c_off + gid.z * p.c_batch;");
    for i in 0..tm {
        for j in 0..tn4 {
            let _ = writeln!(s, "    var c_{i}_{j} = vec4<f32>(0.0);");
        }
    }
    let _ = writeln!(
        s,
        "    let k4 = p.k & ~3u;\n    for (var k = 0u; k < k4; k += 4u) {{"
    );
    // a_i = op(A)[m0 + i, k .. k + 4]
    if trans_a {
        for q in 0..tm / 4 {
            for kk in 0..4 {
                let _ = writeln!(
                    s,
                    "        let t_{q}_{kk} = a4(a_base + (k + {kk}u) * p.lda + m0 + {}u);",
                    4 * q
                );
            }
        }
        for i in 0..tm {
            let (q, c) = (i / 4, comp[(i % 4) as usize]);
            let _ = writeln!(s, "        let a_{i} = vec4<f32>(t_{q}_0.{c}, t_{q}_1.{c}, t_{q}_2.{c}, t_{q}_3.{c});");
        }
    } else {
        for i in 0..tm {
            let _ = writeln!(
                s,
                "        let a_{i} = a4(a_base + (m0 + {i}u) * p.lda + k);"
            );
        }
    }
    // b_kk_j = op(B)[k + kk, n0 + 4j .. n0 + 4j + 4]
    if trans_b {
        for jj in 0..tn {
            let _ = writeln!(
                s,
                "        let u_{jj} = b4(b_base + (n0 + {jj}u) * p.ldb + k);"
            );
        }
        for kk in 0..4 {
            let c = comp[kk];
            for j in 0..tn4 {
                let _ = writeln!(
                    s,
                    "        let b_{kk}_{j} = vec4<f32>(u_{}.{c}, u_{}.{c}, u_{}.{c}, u_{}.{c});",
                    4 * j,
                    4 * j + 1,
                    4 * j + 2,
                    4 * j + 3
                );
            }
        }
    } else {
        for kk in 0..4 {
            for j in 0..tn4 {
                let _ = writeln!(
                    s,
                    "        let b_{kk}_{j} = b4(b_base + (k + {kk}u) * p.ldb + n0 + {}u);",
                    4 * j
                );
            }
        }
    }
    for kk in 0..4 {
        for i in 0..tm {
            for j in 0..tn4 {
                let _ = writeln!(
                    s,
                    "        c_{i}_{j} = fma(vec4<f32>(a_{i}.{}), b_{kk}_{j}, c_{i}_{j});",
                    comp[kk]
                );
            }
        }
    }
    let _ = writeln!(s, "    }}\n    for (var k = k4; k < p.k; k++) {{");
    for j in 0..tn4 {
        let e = |d: u32| format!("b1(b_base + b_index(k, n0 + {}u))", 4 * j + d);
        let _ = writeln!(
            s,
            "        let r_{j} = vec4<f32>({}, {}, {}, {});",
            e(0),
            e(1),
            e(2),
            e(3)
        );
    }
    for i in 0..tm {
        let _ = writeln!(
            s,
            "        let s_{i} = vec4<f32>(a1(a_base + a_index(m0 + {i}u, k)));"
        );
        for j in 0..tn4 {
            let _ = writeln!(s, "        c_{i}_{j} = fma(s_{i}, r_{j}, c_{i}_{j});");
        }
    }
    let _ = writeln!(s, "    }}");
    for i in 0..tm {
        let _ = writeln!(s, "    if (m0 + {i}u < p.m) {{");
        for j in 0..tn4 {
            for (d, c) in comp.iter().enumerate() {
                let n = 4 * j + d as u32;
                let _ = writeln!(s, "        if (n0 + {n}u < p.n) {{ store(m0 + {i}u, n0 + {n}u, c_base, c_{i}_{j}.{c}); }}");
            }
        }
        let _ = writeln!(s, "    }}");
    }
    let _ = writeln!(s, "}}");
    s
}

/// Rows (TM) and columns per lane (TN) of the subgroup kernel's tile: a subgroup of
/// [`SUBGROUP_LANES`] lanes computes TM × (lanes · TN) outputs of C.
const SUBGROUP_TILE: (u32, u32) = (32, 8);

/// The subgroup kernel's tile: [`SUBGROUP_TILE`], or env `RUNNER_MATMUL_SG_TILE=TMxTN` (TM a
/// multiple of 8 up to 128, TN a multiple of 4 up to 16) for benchmarking.
fn subgroup_tile() -> (u32, u32) {
    static T: OnceLock<(u32, u32)> = OnceLock::new();
    *T.get_or_init(|| {
        if let Ok(v) = std::env::var("RUNNER_MATMUL_SG_TILE") {
            if let Some((a, b)) = v.split_once('x') {
                if let (Ok(a), Ok(b)) = (a.parse::<u32>(), b.parse::<u32>()) {
                    if a % 8 == 0 && b % 4 == 0 && (8..=128).contains(&a) && (4..=16).contains(&b)
                    {
                        return (a, b);
                    }
                }
            }
            eprintln!("ignoring RUNNER_MATMUL_SG_TILE={v}: expected TMxTN, TM a multiple of 8 in 8..=128, TN a multiple of 4 in 4..=16");
        }
        SUBGROUP_TILE
    })
}

/// Whether the subgroup kernel issues its FMAs in (row, column, k) order, four in a row on each
/// accumulator (measured faster on llvmpipe: 32×8 this way gave 1.3–1.4× the GFLOP/s of 64×4 in
/// (k, row, column) order at 2048³); env `RUNNER_MATMUL_SG_KINNER=0` restores the latter.
fn subgroup_k_inner() -> bool {
    static K: OnceLock<bool> = OnceLock::new();
    *K.get_or_init(|| std::env::var("RUNNER_MATMUL_SG_KINNER").map_or(true, |v| v != "0"))
}
/// Lanes of the subgroup kernel (its workgroup is exactly one subgroup of this size).
const SUBGROUP_LANES: u32 = 8;

/// WGSL of `matmul_subgroup`, the kernel for CPU adapters that run a subgroup of
/// [`SUBGROUP_LANES`] invocations as one SIMD vector (lavapipe). There a storage load costs a
/// loop over the lanes, so loads are what to save: each lane loads only its own TN columns of
/// op(B) and 1/8 of the TM rows of op(A), and the A values reach the other lanes by
/// `subgroupBroadcast` (a register shuffle). Per 4 steps of K a lane issues TM/8 + TN vec4
/// loads for 4·TM·TN FMAs (the plain register kernel: TM + TN loads for 4·TM·TN). Fully
/// unrolled with one variable per accumulator, like [`unrolled_register_kernel`].
///
/// Lane `l` owns columns `n0 + 4l + 32j + c` (j < TN/4, c < 4). Without TRANS_A it loads rows
/// `m0 + l + 8q` (4 consecutive k); with TRANS_A rows `m0 + 32q + 4l + c` (one k per load).
pub(crate) fn subgroup_kernel(
    tm: u32,
    tn: u32,
    trans_a: bool,
    trans_b: bool,
    k_inner: bool,
) -> String {
    use std::fmt::Write as _;
    let lanes = SUBGROUP_LANES;
    let comp = ["x", "y", "z", "w"];
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(w, "\n@compute @workgroup_size({lanes}, 1, 1)");
    let _ = writeln!(w, "fn matmul_subgroup(@builtin(workgroup_id) wid: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {{");
    let _ = writeln!(
        w,
        "    let m0 = wid.y * {tm}u;\n    let n0 = wid.x * {}u;",
        lanes * tn
    );
    let _ = writeln!(w, "    let a_base = p.a_off + wid.z * p.a_batch;\n    let b_base = p.b_off + wid.z * p.b_batch;\n    let c_base = p.c_off + wid.z * p.c_batch;");
    let col = |j: u32| format!("n0 + lane * 4u + {}u", 32 * (j / 4) + j % 4);
    // Rows a lane loads: q-th group.
    let a_groups = if trans_a {
        tm.div_ceil(4 * lanes)
    } else {
        tm.div_ceil(lanes)
    };
    for i in 0..tm {
        for j in 0..tn {
            let _ = writeln!(w, "    var c{i}_{j} = 0.0;");
        }
    }
    // The value op(A)[m0 + i, k + kk] as a broadcast from the lane that loaded it.
    let a_value = |i: u32, kk: u32| -> String {
        if trans_a {
            let (q, l, c) = (i / (4 * lanes), (i % (4 * lanes)) / 4, i % 4);
            format!("subgroupBroadcast(t{q}_{kk}.{}, {l}u)", comp[c as usize])
        } else {
            let (q, l) = (i / lanes, i % lanes);
            format!("subgroupBroadcast(t{q}.{}, {l}u)", comp[kk as usize])
        }
    };
    let _ = writeln!(
        w,
        "    let k4 = p.k & ~3u;\n    for (var k = 0u; k < k4; k += 4u) {{"
    );
    for q in 0..a_groups {
        if trans_a {
            for kk in 0..4 {
                let _ = writeln!(
                    w,
                    "        let t{q}_{kk} = a4(a_base + (k + {kk}u) * p.lda + m0 + lane * 4u + {}u);",
                    32 * q
                );
            }
        } else {
            let _ = writeln!(
                w,
                "        let t{q} = a4(a_base + (m0 + lane + {}u) * p.lda + k);",
                lanes * q
            );
        }
    }
    // b{j}_{kk} = op(B)[k + kk, column j of this lane]
    if trans_b {
        for j in 0..tn {
            let _ = writeln!(
                w,
                "        let u{j} = b4(b_base + ({}) * p.ldb + k);",
                col(j)
            );
        }
    } else {
        for j4 in 0..tn / 4 {
            for kk in 0..4 {
                let _ = writeln!(
                    w,
                    "        let u{j4}_{kk} = b4(b_base + (k + {kk}u) * p.ldb + {});",
                    col(4 * j4)
                );
            }
        }
    }
    let b_value = |j: u32, kk: u32| -> String {
        if trans_b {
            format!("u{j}.{}", comp[kk as usize])
        } else {
            format!("u{}_{kk}.{}", j / 4, comp[(j % 4) as usize])
        }
    };
    if k_inner {
        for i in 0..tm {
            for kk in 0..4 {
                let _ = writeln!(w, "        let s{i}_{kk} = {};", a_value(i, kk));
            }
            for j in 0..tn {
                for kk in 0..4 {
                    let _ = writeln!(
                        w,
                        "        c{i}_{j} = fma(s{i}_{kk}, {}, c{i}_{j});",
                        b_value(j, kk)
                    );
                }
            }
        }
    } else {
        for kk in 0..4 {
            for i in 0..tm {
                let _ = writeln!(w, "        let s{i}_{kk} = {};", a_value(i, kk));
                for j in 0..tn {
                    let _ = writeln!(
                        w,
                        "        c{i}_{j} = fma(s{i}_{kk}, {}, c{i}_{j});",
                        b_value(j, kk)
                    );
                }
            }
        }
    }
    let _ = writeln!(w, "    }}");
    // K not a multiple of 4: one k per step, op(A) rows m0 + l + 8q loaded by lane l.
    let _ = writeln!(w, "    for (var k = k4; k < p.k; k++) {{");
    for q in 0..tm.div_ceil(lanes) {
        let _ = writeln!(
            w,
            "        let r{q} = a1(a_base + a_index(m0 + lane + {}u, k));",
            lanes * q
        );
    }
    for j in 0..tn {
        let _ = writeln!(w, "        let v{j} = b1(b_base + b_index(k, {}));", col(j));
    }
    for i in 0..tm {
        let _ = writeln!(
            w,
            "        let s{i} = subgroupBroadcast(r{}, {}u);",
            i / lanes,
            i % lanes
        );
        for j in 0..tn {
            let _ = writeln!(w, "        c{i}_{j} = fma(s{i}, v{j}, c{i}_{j});");
        }
    }
    let _ = writeln!(w, "    }}");
    for j in 0..tn {
        let _ = writeln!(w, "    let col{j} = {};", col(j));
    }
    for i in 0..tm {
        let _ = writeln!(w, "    if (m0 + {i}u < p.m) {{");
        for j in 0..tn {
            let _ = writeln!(
                w,
                "        if (col{j} < p.n) {{ store(m0 + {i}u, col{j}, c_base, c{i}_{j}); }}"
            );
        }
        let _ = writeln!(w, "    }}");
    }
    let _ = writeln!(w, "}}");
    s
}

/// Whether this adapter runs [`subgroup_kernel`]: it needs subgroups of exactly
/// [`SUBGROUP_LANES`] lanes (its workgroup must be one whole subgroup, and its broadcasts name
/// lanes by constant index).
fn subgroup_kernel_fits(gpu: &Gpu) -> bool {
    if plain_register_kernel_forced() {
        return false;
    }
    let info = gpu.adapter_info();
    gpu.features().contains(wgpu::Features::SUBGROUP)
        && info.subgroup_min_size == SUBGROUP_LANES
        && info.subgroup_max_size == SUBGROUP_LANES
}

/// Tests of the plain register kernel switch the subgroup kernel off on their own thread.
#[cfg(test)]
fn plain_register_kernel_forced() -> bool {
    tests::PLAIN_REGISTER_KERNEL.with(|f| f.get())
}
#[cfg(not(test))]
fn plain_register_kernel_forced() -> bool {
    false
}

/// The matmul module with the generated subgroup kernel for this variant appended.
fn subgroup_shader(
    operands: Operands,
    tm: u32,
    tn: u32,
    trans_a: bool,
    trans_b: bool,
) -> Result<Shader> {
    let k_inner = subgroup_k_inner();
    Shader::generated(
        "matmul",
        &operands.features(),
        &("subgroup", tm, tn, trans_a, trans_b, k_inner),
        || subgroup_kernel(tm, tn, trans_a, trans_b, k_inner),
    )
}

/// The matmul module (storage buffers) with the unrolled register kernel for this variant
/// appended.
fn unrolled_shader(
    operands: Operands,
    tm: u32,
    tn: u32,
    trans_a: bool,
    trans_b: bool,
) -> Result<Shader> {
    Shader::generated(
        "matmul",
        &Operands {
            textures: false,
            ..operands
        }
        .features(),
        &("unrolled", tm, tn, trans_a, trans_b),
        || unrolled_register_kernel(tm, tn, trans_a, trans_b),
    )
}

/// Copies a GEMM's A, B (and NF4 absmax) into staging slots 0, 1 (and 2): f32 texels, the
/// packed NF4 words as u32. `None` when any of them cannot be staged.
fn stage_gemm_operands(
    rec: &mut Recorder,
    g: &Gemm,
    nf4: Option<&(BufView, usize)>,
) -> Option<Vec<std::sync::Arc<StagedTexture>>> {
    let b_format = if nf4.is_some() || g.b_bf16 {
        StageFormat::U32
    } else {
        StageFormat::F32
    };
    let mut staged = vec![
        rec.stage(0, &g.a, StageFormat::F32)?,
        rec.stage(1, &g.b, b_format)?,
    ];
    if let Some((absmax, _)) = nf4 {
        staged.push(rec.stage(2, absmax, StageFormat::F32)?);
    }
    Some(staged)
}

/// One sub-problem over single buffers (what one dispatch computes).
pub(crate) struct Gemm {
    pub a: BufView,
    pub b: BufView,
    pub c: BufView,
    pub bias: Option<BufView>,
    pub params: GemmParams,
    pub batch: u32,
    pub trans_a: bool,
    pub trans_b: bool,
    /// Contiguous extents of the stored A and B (must be multiples of 4 for the vec4 variant).
    pub a_contig: u32,
    pub b_contig: u32,
    /// Round every operand value to f16 ([`MatmulPrecision::F16`]).
    pub f16: bool,
    /// B is bf16 (two per word; offsets and leading dimensions still count elements).
    pub b_bf16: bool,
}

impl Gpu {
    /// Records `C = alpha · op(A) · op(B) + beta · C + bias`.
    ///
    /// Shapes: A [M,K] (`trans_a`: [K,M]), B [K,N] (`trans_b`: [N,K]), C [M,N]; or batched with
    /// a leading batch dimension on C and on A and/or B (a 2-D operand is shared by every batch).
    /// 2-D operands may be chunked (larger than one binding): the product is split at chunk
    /// boundaries into one dispatch per block, accumulating over K blocks.
    pub fn matmul(
        &self,
        rec: &mut Recorder,
        a: &GpuTensor,
        b: &GpuTensor,
        c: &GpuTensor,
        opts: MatmulOpts,
    ) -> Result<()> {
        for (name, t) in [("A", a), ("C", c)] {
            ensure!(
                t.dtype() == DType::F32,
                "matmul: {name} must be f32, is {:?}",
                t.dtype()
            );
        }
        let b_bf16 = b.dtype() == DType::Bf16;
        ensure!(
            b.dtype() == DType::F32 || (b_bf16 && opts.precision == MatmulPrecision::F32),
            "matmul: B must be f32, or bf16 with f32 operand precision; is {:?}",
            b.dtype()
        );
        let dims = |t: &GpuTensor, name: &str| -> Result<(usize, usize, usize)> {
            match *t.shape() {
                [r, c] => Ok((1, r, c)),
                [z, r, c] => Ok((z, r, c)),
                ref s => bail!("matmul: {name} must be 2-D or 3-D, got {s:?}"),
            }
        };
        let (za, ra, ca) = dims(a, "A")?;
        let (zb, rb, cb) = dims(b, "B")?;
        let (zc, m, n) = dims(c, "C")?;
        let (am, k) = if opts.trans_a { (ca, ra) } else { (ra, ca) };
        let (bk, bn) = if opts.trans_b { (cb, rb) } else { (rb, cb) };
        ensure!(
            am == m && bk == k && bn == n,
            "matmul shapes disagree: A {:?}{}, B {:?}{}, C {:?}",
            a.shape(),
            if opts.trans_a { "ᵀ" } else { "" },
            b.shape(),
            if opts.trans_b { "ᵀ" } else { "" },
            c.shape()
        );
        let batched = c.shape().len() == 3;
        if batched {
            ensure!(
                (a.shape().len() == 2 || za == zc) && (b.shape().len() == 2 || zb == zc),
                "matmul: batch sizes disagree: A {:?}, B {:?}, C {:?}",
                a.shape(),
                b.shape(),
                c.shape()
            );
            ensure!(
                !a.is_chunked() && !b.is_chunked() && !c.is_chunked(),
                "matmul: batched operands cannot be chunked"
            );
        } else {
            ensure!(
                a.shape().len() == 2 && b.shape().len() == 2,
                "matmul: 3-D operands need a 3-D C"
            );
        }
        if let Some(bias) = opts.bias {
            ensure!(
                bias.dtype() == DType::F32 && bias.numel() == n && !bias.is_chunked(),
                "matmul: bias must be an unchunked f32 [{n}], got {:?}",
                bias.shape()
            );
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        let lda = ca as u32;
        let ldb = cb as u32;
        let a_batch = if a.shape().len() == 3 {
            (ra * ca) as u32
        } else {
            0
        };
        let b_batch = if b.shape().len() == 3 {
            (rb * cb) as u32
        } else {
            0
        };
        let c_batch = (m * n) as u32;

        // Split points of M, N and K at every chunk boundary of the operands.
        let bounds = |t: &GpuTensor| t.chunks().iter().map(|ch| ch.first_row).collect::<Vec<_>>();
        let mut ms = vec![0, m];
        let mut ns = vec![0, n];
        let mut ks = vec![0, k];
        if opts.trans_a {
            ks.extend(bounds(a))
        } else {
            ms.extend(bounds(a))
        }
        if opts.trans_b {
            ns.extend(bounds(b))
        } else {
            ks.extend(bounds(b))
        }
        ms.extend(bounds(c));
        for v in [&mut ms, &mut ns, &mut ks] {
            v.sort_unstable();
            v.dedup();
        }
        // Locates the chunk holding `row` and the element offset of (row, col) inside it.
        let locate = |t: &GpuTensor, row: usize, col: usize| -> (BufView, u32) {
            let ch = t
                .chunks()
                .iter()
                .rev()
                .find(|ch| ch.first_row <= row)
                .expect("row inside tensor");
            (ch.view(), ((row - ch.first_row) * t.row_len() + col) as u32)
        };
        let bias_view = match opts.bias {
            Some(bias) => Some(bias.view()?),
            None => None,
        };
        for mw in ms.windows(2) {
            for nw in ns.windows(2) {
                let k_blocks: Vec<_> = if k == 0 {
                    vec![[0, 0]]
                } else {
                    ks.windows(2).map(|w| [w[0], w[1]]).collect()
                };
                for (kb, kw) in k_blocks.iter().enumerate() {
                    let (m0, m1, n0, n1, k0, k1) = (mw[0], mw[1], nw[0], nw[1], kw[0], kw[1]);
                    let (av, a_off) = if opts.trans_a {
                        locate(a, k0, m0)
                    } else {
                        locate(a, m0, k0)
                    };
                    let (bv, b_off) = if opts.trans_b {
                        locate(b, n0, k0)
                    } else {
                        locate(b, k0, n0)
                    };
                    let (cv, c_off) = locate(c, m0, n0);
                    let first = kb == 0;
                    let params = GemmParams {
                        m: (m1 - m0) as u32,
                        n: (n1 - n0) as u32,
                        k: (k1 - k0) as u32,
                        has_bias: (first && opts.bias.is_some()) as u32,
                        a_off,
                        lda,
                        a_batch,
                        b_off,
                        ldb,
                        b_batch,
                        c_off,
                        ldc: n as u32,
                        c_batch,
                        bias_off: n0 as u32,
                        alpha: opts.alpha,
                        beta: if first { opts.beta } else { 1.0 },
                    };
                    let a_contig = if opts.trans_a { params.m } else { params.k };
                    let b_contig = if opts.trans_b { params.k } else { params.n };
                    self.record_gemm(
                        rec,
                        Gemm {
                            a: av,
                            b: bv,
                            c: cv,
                            bias: bias_view.clone(),
                            params,
                            batch: zc as u32,
                            trans_a: opts.trans_a,
                            trans_b: opts.trans_b,
                            a_contig,
                            b_contig,
                            f16: opts.precision == MatmulPrecision::F16,
                            b_bf16,
                        },
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Dispatches one GEMM over single buffers, choosing the kernel for this adapter.
    pub(crate) fn record_gemm(&self, rec: &mut Recorder, g: Gemm) -> Result<()> {
        self.record_gemm_with(rec, g, None)
    }

    /// As [`Gpu::record_gemm`]; with `nf4` (absmax view, blocksize) B is the packed NF4 weight
    /// and the NF4 scales are bound at binding 5.
    pub(crate) fn record_gemm_with(
        &self,
        rec: &mut Recorder,
        g: Gemm,
        nf4: Option<(BufView, usize)>,
    ) -> Result<()> {
        let p = &g.params;
        let vec4 = [
            p.a_off, p.lda, p.a_batch, g.a_contig, p.b_off, p.ldb, p.b_batch, g.b_contig,
        ]
        .iter()
        .all(|v| v % 4 == 0);
        if g.f16 && !self.features().contains(wgpu::Features::SHADER_F16) {
            bail!(
                "matmul_precision = \"f16\" needs an adapter with 16-bit float shaders (SHADER_F16), which {} lacks; use \"f32\"",
                self.adapter_info().name
            );
        }
        let operands = Operands {
            vec4,
            textures: false,
            nf4: nf4.is_some(),
            bf16_b: g.b_bf16,
            f16: g.f16,
        };
        let mut constants = vec![
            ("TRANS_A", g.trans_a as u32 as f64),
            ("TRANS_B", g.trans_b as u32 as f64),
        ];
        if let Some((_, blocksize)) = &nf4 {
            constants.push(("NF4_BLOCK", *blocksize as f64));
        }
        // A few rows against a [N, K] weight (decoding): the rows kernel on the storage buffers.
        if g.trans_b && !g.trans_a && p.m <= ROWS_KERNEL_MAX_M && rows_kernel() {
            let kernel = self.kernel(&shader(operands)?, "matmul_rows", &constants)?;
            let bias = g.bias.clone().unwrap_or_else(|| self.dummy_buffer());
            let mut buffers = vec![g.a, g.b, g.c, bias];
            if let Some((absmax, _)) = nf4 {
                buffers.push(absmax);
            }
            let groups = [p.n.div_ceil(64), p.m, g.batch];
            rec.dispatch(&kernel, bytemuck::bytes_of(p), &buffers, groups);
            return Ok(());
        }
        let (entry, groups) = match self.tiling() {
            Tiling::Register if subgroup_kernel_fits(self) => {
                let (tm, tn) = subgroup_tile();
                let groups = [p.n.div_ceil(tn * SUBGROUP_LANES), p.m.div_ceil(tm), g.batch];
                let bias = g.bias.clone().unwrap_or_else(|| self.dummy_buffer());
                let staged = stage_operands()
                    .then(|| stage_gemm_operands(rec, &g, nf4.as_ref()))
                    .flatten();
                let source = subgroup_shader(
                    Operands {
                        textures: staged.is_some(),
                        ..operands
                    },
                    tm,
                    tn,
                    g.trans_a,
                    g.trans_b,
                )?;
                let kernel = self.kernel(&source, "matmul_subgroup", &constants)?;
                // A, B, C, bias, then the NF4 absmax; A, B and absmax as textures where staged
                let (a, b, absmax) = match &staged {
                    Some(s) => (
                        Bound::Texture(&s[0]),
                        Bound::Texture(&s[1]),
                        s.get(2).map(|t| Bound::Texture(t)),
                    ),
                    None => (
                        Bound::Buffer(g.a),
                        Bound::Buffer(g.b),
                        nf4.map(|(v, _)| Bound::Buffer(v)),
                    ),
                };
                let mut bindings = vec![a, b, Bound::Buffer(g.c), Bound::Buffer(bias)];
                bindings.extend(absmax);
                rec.dispatch_bound(&kernel, bytemuck::bytes_of(p), &bindings, groups);
                return Ok(());
            }
            Tiling::Register => {
                let (tm, tn) = register_tile();
                let (wx, wy) = (8u32, 8u32);
                constants.extend([("WG_X", wx as f64), ("WG_Y", wy as f64)]);
                let source = unrolled_shader(operands, tm, tn, g.trans_a, g.trans_b)?;
                let kernel = self.kernel(&source, "matmul_register_unrolled", &constants)?;
                let bias = g.bias.clone().unwrap_or_else(|| self.dummy_buffer());
                let mut buffers = vec![g.a, g.b, g.c, bias];
                if let Some((absmax, _)) = nf4 {
                    buffers.push(absmax);
                }
                let groups = [p.n.div_ceil(tn * wx), p.m.div_ceil(tm * wy), g.batch];
                rec.dispatch(&kernel, bytemuck::bytes_of(p), &buffers, groups);
                return Ok(());
            }
            Tiling::Workgroup => {
                let (bm, bn, bk, wtm, wtn) = (64u32, 64u32, 16u32, 4u32, 4u32);
                constants.extend([
                    ("BM", bm as f64),
                    ("BN", bn as f64),
                    ("BK", bk as f64),
                    ("WTM", wtm as f64),
                    ("WTN", wtn as f64),
                    ("WGT_X", (bn / wtn) as f64),
                    ("WGT_Y", (bm / wtm) as f64),
                ]);
                (
                    "matmul_workgroup",
                    [p.n.div_ceil(bn), p.m.div_ceil(bm), g.batch],
                )
            }
        };
        let kernel = self.kernel(&shader(operands)?, entry, &constants)?;
        let bias = g.bias.unwrap_or_else(|| self.dummy_buffer());
        let mut buffers = vec![g.a, g.b, g.c, bias];
        if let Some((absmax, _)) = nf4 {
            buffers.push(absmax);
        }
        rec.dispatch(&kernel, bytemuck::bytes_of(p), &buffers, groups);
        Ok(())
    }

    /// A small buffer bound where a kernel's optional input is absent.
    pub(crate) fn dummy_buffer(&self) -> BufView {
        let buffer = self.alloc_storage(16);
        BufView {
            buffer,
            offset: 0,
            size: 16,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::testing::{
        other_tiling_gpu, rel_frobenius, test_gpu, tiny_binding_gpu, TestRng,
    };
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
                        batch: 1,
                        m,
                        n,
                        k,
                        trans_a: ta,
                        trans_b: tb,
                        beta,
                        bias,
                        batched_b: true,
                    };
                    run_case(gpu, &case, &mut rng, seed);
                }
            }
        }
        for batched_b in [true, false] {
            let case = Case {
                batch: 3,
                m: 19,
                n: 21,
                k: 12,
                trans_a: false,
                trans_b: true,
                beta: 0.0,
                bias: true,
                batched_b,
            };
            run_case(gpu, &case, &mut rng, seed);
            let case = Case {
                batch: 2,
                m: 16,
                n: 8,
                k: 17,
                trans_a: true,
                trans_b: false,
                beta: 1.0,
                bias: false,
                batched_b,
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
                batch: 1,
                m: 40,
                n: 36,
                k: 64,
                trans_a: false,
                trans_b: tb,
                beta: 0.7,
                bias: false,
                batched_b: false,
            };
            run_case(small, &case, &mut rng, seed);
        }
        B_BF16.with(|f| f.set(false));
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
                    batch: 1,
                    m: 45,
                    n: 51,
                    k: 67,
                    trans_a: ta,
                    trans_b: tb,
                    beta: 0.0,
                    bias: true,
                    batched_b: false,
                };
                run_case(gpu, &case, &mut rng, seed);
                let case = Case {
                    batch: 1,
                    m: 40,
                    n: 36,
                    k: 64,
                    trans_a: ta,
                    trans_b: tb,
                    beta: 0.7,
                    bias: false,
                    batched_b: false,
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
}
